"""Where mha_xp's forward spends its time on NumPy, and what the levers are worth.

Three views of ``layer(x)`` (self-attention, float32 by default) on the
configurations of ``benchmarks/run.py``:

``--cprofile``
    cProfile of repeated calls: the functions with the most own time.
per-op breakdown (default)
    The NumPy operations of mha_xp's attention path replayed one by one on
    the same shapes (dense path: the whole layer; chunked path: one score
    block, times the number of blocks), each timed alone (median), against
    the time of the whole call measured in the same run; what is left is
    Python and wrapper overhead. Elementwise ufuncs run on one core, BLAS on
    all.
experiments (``--experiments``)
    Prototypes of the levers, outside the library, timed interleaved with
    mha_xp's call (median of rounds): a validation-free call, the dense path
    with the softmax normalisation moved onto the output, in-place bias and
    scale folded into the weights, heads written straight into the merged
    layout, and two threads for the elementwise passes.

Run ``python benchmarks/profile_forward.py [--configs tiny,small] [--dtype float32]
[--cprofile] [--experiments]``. It never changes the library.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from _harness import table
from run import CONFIGS, inputs, numpy_mha, weights

import mha_xp
from mha_xp._core._plan import default_blocks


def median_time(fn: Callable[[], object], min_time: float = 0.2, max_repeats: int = 200) -> float:
    """Median seconds per call, with loops for sub-millisecond calls."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    inner = max(1, int(0.002 / max(one, 1e-7)))
    repeats = int(min(max_repeats, max(5, min_time / max(one * inner, 1e-7))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    one = min(median_time(fn, 0.0, 3) for fn in fns.values())
    inner = max(1, int(0.002 / max(one, 1e-7)))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(0.005)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            samples[n].append((time.perf_counter() - t0) / inner)
    return {n: statistics.median(s) for n, s in samples.items()}


def case(name: str, dtype: str):
    B, L, E, H = CONFIGS[name]
    sd = weights(E, dtype)
    x, _ = inputs(B, L, E, dtype)
    layer = mha_xp.MultiHeadAttention.from_state_dict(sd, num_heads=H)
    return (B, L, E, H), sd, x, layer


# -- cProfile ---------------------------------------------------------------------------


def profile(name: str, dtype: str, top: int) -> str:
    _, _, x, layer = case(name, dtype)
    calls = {"tiny": 3000, "small": 20, "medium": 6, "long": 2}[name]
    layer(x)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        layer(x)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    total = stats.total_tt / calls
    return f"cProfile {name} {dtype}: {calls} calls, {total * 1e6:.0f} µs per call under the profiler\n" + \
        "\n".join(out.getvalue().splitlines()[4:])


# -- per-op breakdown ---------------------------------------------------------------------


def dense_ops(shape, sd, x) -> dict[str, tuple[str, Callable[[], object]]]:
    """The dense path's NumPy operations, on the real shapes: name -> (kind, op)."""
    B, L, E, H = shape
    D = E // H
    dt = x.dtype
    w_in, b_in, w_out, b_out = (sd[n] for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                 "out_proj.bias"))
    x2 = x.reshape(B * L, E)
    qkv = (x2 @ w_in.T + b_in).reshape(B, L, 3, H, D).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = 1.0 / math.sqrt(D)
    qs = q * scale
    s = np.matmul(qs, k.swapaxes(-1, -2))
    m = s.max(axis=-1, keepdims=True)
    buf = np.empty_like(s)
    shifted = s - m
    e = np.exp(shifted)
    total = e.sum(axis=-1, keepdims=True)
    p = e / total
    o = p @ v
    merged = np.ascontiguousarray(o.transpose(0, 2, 1, 3)).reshape(B * L, E)
    y = merged @ w_out.T
    return {
        "in-proj matmul": ("BLAS", lambda: x2 @ w_in.T),
        "in-proj bias add (new array)": ("elementwise", lambda: x2 @ w_in.T + b_in),
        "q * scale": ("elementwise", lambda: q * scale),
        "Q K^T matmul": ("BLAS", lambda: np.matmul(qs, k.swapaxes(-1, -2))),
        "row max": ("elementwise", lambda: s.max(axis=-1, keepdims=True)),
        "subtract max (out=)": ("elementwise", lambda: np.subtract(s, m, out=buf)),
        "exp (out=)": ("elementwise", lambda: np.exp(shifted, out=buf)),
        "row sum": ("elementwise", lambda: e.sum(axis=-1, keepdims=True)),
        "divide by sum (out=)": ("elementwise", lambda: np.divide(e, total, out=buf)),
        "P V matmul": ("BLAS", lambda: p @ v),
        "merge heads (copy)": ("elementwise", lambda: np.ascontiguousarray(o.transpose(0, 2, 1, 3))),
        "out-proj matmul": ("BLAS", lambda: merged @ w_out.T),
        "out-proj bias add": ("elementwise", lambda: y + b_out),
    }


def chunked_ops(shape, sd, x) -> tuple[dict[str, tuple[str, Callable[[], object]]], int]:
    """One score block of the chunked path, and how many blocks a call runs."""
    B, L, E, H = shape
    D = E // H
    w_in, b_in = sd["in_proj_weight"], sd["in_proj_bias"]
    qkv = (x.reshape(B * L, E) @ w_in.T + b_in).reshape(B, L, 3, H, D).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (1.0 / math.sqrt(D)), qkv[1], qkv[2]
    qb, kb = default_blocks((B, H), L, L)
    qi, kj, vj = q[..., :qb, :], k[..., :kb, :], v[..., :kb, :]
    s = np.matmul(qi, kj.swapaxes(-1, -2))
    bm = s.max(axis=-1, keepdims=True)
    m_old = bm - 0.5
    buf = np.empty_like(s)
    p = np.exp(s - bm)
    pv = p @ vj
    acc = pv.copy()
    l = p.sum(axis=-1, keepdims=True)
    blocks = math.ceil(L / qb) * math.ceil(L / kb)
    ops = {
        f"Q K^T block matmul ({qb}x{kb})": ("BLAS", lambda: np.matmul(qi, kj.swapaxes(-1, -2))),
        "block row max": ("elementwise", lambda: s.max(axis=-1, keepdims=True)),
        "maximum(m, block max), where": ("elementwise", lambda: np.where(np.maximum(m_old, bm) == -np.inf, 0, bm)),
        "subtract shift (out=)": ("elementwise", lambda: np.subtract(s, bm, out=buf)),
        "exp (out=)": ("elementwise", lambda: np.exp(s - bm, out=buf)),
        "P V block matmul": ("BLAS", lambda: p @ vj),
        "block row sum": ("elementwise", lambda: p.sum(axis=-1, keepdims=True)),
        "rescale: alpha, l, acc": ("elementwise", lambda: (np.exp(m_old - bm), np.exp(m_old - bm) * l + l,
                                                          np.exp(m_old - bm) * acc + pv)),
    }
    return ops, blocks


def breakdown(name: str, dtype: str) -> str:
    shape, sd, x, layer = case(name, dtype)
    B, L, E, H = shape
    total = median_time(lambda: layer(x), 1.0)
    rows, summed = [], {"BLAS": 0.0, "elementwise": 0.0}
    path = "dense" if B * H * L * L * np.dtype(dtype).itemsize <= mha_xp.get_memory_budget() else "chunked"
    if path == "dense":
        ops, mult = dense_ops(shape, sd, x), 1
        # "exp (out=)" includes the subtraction's allocation; the rest replays mha_xp exactly.
        ops.pop("in-proj matmul")
        t_mm = median_time(lambda: x.reshape(B * L, E) @ sd["in_proj_weight"].T, 0.5)
        rows.append(("in-proj matmul", "BLAS", t_mm))
        summed["BLAS"] += t_mm
        times = {op: median_time(fn, 0.5) for op, (_, fn) in ops.items()}
        times["in-proj bias add (new array)"] -= t_mm
        for op, (kind, _) in ops.items():
            rows.append((op, kind, times[op]))
            summed[kind] += times[op]
    else:
        ops, mult = chunked_ops(shape, sd, x)
        proj = dense_ops(shape, sd, x)
        for op in ("in-proj matmul", "in-proj bias add (new array)", "q * scale", "merge heads (copy)",
                   "out-proj matmul", "out-proj bias add"):
            kind, fn = proj[op]
            t = median_time(fn, 0.5)
            if op == "in-proj bias add (new array)":
                t -= rows[0][2]
            rows.append((op, kind, t))
            summed[kind] += t
        for op, (kind, fn) in ops.items():
            t = median_time(fn, 0.3) * mult
            rows.append((f"{op} x {mult}", kind, t))
            summed[kind] += t
    rest = total - summed["BLAS"] - summed["elementwise"]
    out = [(op, kind, f"{t * 1e6:.0f}" if t < 1e-3 else f"{t * 1e3:.2f} ms", f"{100 * t / total:.0f}")
           for op, kind, t in rows]
    out += [("sum of BLAS ops", "", f"{summed['BLAS'] * 1e3:.2f} ms", f"{100 * summed['BLAS'] / total:.0f}"),
            ("sum of elementwise ops", "", f"{summed['elementwise'] * 1e3:.2f} ms",
             f"{100 * summed['elementwise'] / total:.0f}"),
            ("rest: Python, wrappers, allocation", "", f"{rest * 1e3:.3f} ms", f"{100 * rest / total:.0f}"),
            ("whole call layer(x)", "", f"{total * 1e3:.3f} ms", "100")]
    return (f"{name} {shape} {dtype}, {path} path: median time per op (µs unless stated)\n"
            + table(out, ("op", "kind", "time", "% of call")))


# -- prototypes of the levers ------------------------------------------------------------


def prepared(sd: dict[str, np.ndarray], H: int) -> dict[str, np.ndarray]:
    """Weights a layer could derive once: W_in^T with the query rows scaled by
    1/sqrt(D) (and the query bias), W_out^T."""
    E = sd["out_proj.weight"].shape[0]
    scale = np.ones(3 * E, dtype=sd["in_proj_weight"].dtype)
    scale[:E] = 1.0 / math.sqrt(E // H)
    return {"w_in_t": np.ascontiguousarray((sd["in_proj_weight"] * scale[:, None]).T),
            "b_in": sd["in_proj_bias"] * scale,
            "w_out_t": np.ascontiguousarray(sd["out_proj.weight"].T), "b_out": sd["out_proj.bias"]}


def softmax_rows(s: np.ndarray) -> np.ndarray:
    """In place: ``s <- exp(s - max)``; returns the row sums."""
    m = s.max(axis=-1, keepdims=True)
    np.subtract(s, m, out=s)
    np.exp(s, out=s)
    return s.sum(axis=-1, keepdims=True)


_POOL = ThreadPoolExecutor(max_workers=2)


def proto_dense(x: np.ndarray, P: dict[str, np.ndarray], H: int, threads: int = 1) -> np.ndarray:
    """The dense layer with the levers: scale folded into W_q, in-place bias,
    normalisation on the (L, D) output instead of the (L, S) probabilities,
    heads written straight into the merged (B, L, H, D) layout; with
    ``threads=2`` the elementwise passes run on two halves of the heads in
    two threads."""
    B, L, E = x.shape
    D = E // H
    qkv = np.matmul(x.reshape(B * L, E), P["w_in_t"])
    qkv += P["b_in"]
    qkv = qkv.reshape(B, L, 3, H, D)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)
    k_t = qkv[:, :, 1].transpose(0, 2, 3, 1)
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)
    s = np.matmul(q, k_t)
    if threads == 1:
        total = softmax_rows(s)
    else:
        flat = s.reshape(B * H, L, L)
        half = (B * H + 1) // 2
        parts = list(_POOL.map(softmax_rows, (flat[:half], flat[half:])))
        total = np.concatenate(parts).reshape(B, H, L, 1)
    o = np.empty((B, L, H, D), dtype=x.dtype)
    o_heads = o.transpose(0, 2, 1, 3)
    np.matmul(s, v, out=o_heads)
    np.divide(o_heads, total, out=o_heads)
    y = np.matmul(o.reshape(B * L, E), P["w_out_t"])
    y += P["b_out"]
    return y.reshape(B, L, E)


def proto_chunked(x: np.ndarray, P: dict[str, np.ndarray], H: int, q_block: int, k_block: int,
                  threads: int = 1) -> np.ndarray:
    """The chunked forward (online softmax) with the same levers; with
    ``threads=2`` the query blocks are shared between two threads, each
    running its own matmuls and elementwise passes."""
    B, L, E = x.shape
    D = E // H
    qkv = np.matmul(x.reshape(B * L, E), P["w_in_t"])
    qkv += P["b_in"]
    qkv = qkv.reshape(B, L, 3, H, D)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)
    k_t = qkv[:, :, 1].transpose(0, 2, 3, 1)
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)
    o = np.empty((B, L, H, D), dtype=x.dtype)
    o_heads = o.transpose(0, 2, 1, 3)

    def rows(i0: int) -> None:
        i1 = min(i0 + q_block, L)
        qi = q[:, :, i0:i1]
        m = l = acc = None
        for j0 in range(0, L, k_block):
            j1 = min(j0 + k_block, L)
            s = np.matmul(qi, k_t[..., j0:j1])
            bm = s.max(axis=-1, keepdims=True)
            m_new = bm if m is None else np.maximum(m, bm)
            np.subtract(s, m_new, out=s)
            np.exp(s, out=s)
            pv = np.matmul(s, v[:, :, j0:j1])
            if m is None:
                l, acc = s.sum(axis=-1, keepdims=True), pv
            else:
                alpha = np.exp(m - m_new)
                l = alpha * l + s.sum(axis=-1, keepdims=True)
                acc *= alpha
                acc += pv
            m = m_new
        np.divide(acc, l, out=o_heads[:, :, i0:i1])

    starts = range(0, L, q_block)
    if threads == 1:
        for i0 in starts:
            rows(i0)
    else:
        list(_POOL.map(rows, starts))
    y = np.matmul(o.reshape(B * L, E), P["w_out_t"])
    y += P["b_out"]
    return y.reshape(B, L, E)


def experiments(name: str, dtype: str, rounds: int) -> str:
    shape, sd, x, layer = case(name, dtype)
    B, L, E, H = shape
    P = prepared(sd, H)
    ref = layer(x)
    fns: dict[str, Callable[[], object]] = {"mha_xp layer(x)": lambda: layer(x)}
    w = [sd[n] for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")]
    fns["hand-written numpy"] = lambda: numpy_mha(x, *w, H)
    dense = B * H * L * L * x.dtype.itemsize <= mha_xp.get_memory_budget()
    if dense:
        fns["proto dense, 1 thread"] = lambda: proto_dense(x, P, H)
        fns["proto dense, softmax in 2 threads"] = lambda: proto_dense(x, P, H, threads=2)
        check = {"proto dense, 1 thread": proto_dense(x, P, H),
                 "proto dense, softmax in 2 threads": proto_dense(x, P, H, threads=2)}
    else:
        qb, kb = default_blocks((B, H), L, L)
        fns[f"proto chunked ({qb}x{kb}), 1 thread"] = lambda: proto_chunked(x, P, H, qb, kb)
        fns[f"proto chunked ({qb}x{kb}), 2 threads"] = lambda: proto_chunked(x, P, H, qb, kb, 2)
        small_q = max(1, qb // 4)
        fns[f"proto chunked ({small_q}x{kb}), 2 threads"] = lambda: proto_chunked(x, P, H, small_q, kb, 2)
        check = {f"proto chunked ({qb}x{kb}), 2 threads": proto_chunked(x, P, H, qb, kb, 2)}
    errs = {n: float(np.linalg.norm(y - ref) / np.linalg.norm(ref)) for n, y in check.items()}
    t = interleaved_medians(fns, rounds)
    base = t["mha_xp layer(x)"]
    rows = [(n, f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms", f"{s / base:.2f}",
             f"{errs[n]:.0e}" if n in errs else "") for n, s in t.items()]
    return (f"{name} {shape} {dtype}: prototypes, interleaved medians of {rounds} rounds\n"
            + table(rows, ("variant", "time", "x mha_xp", "rel err")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--experiments", action="store_true")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    for name in args.configs.split(","):
        if args.cprofile:
            print(profile(name, args.dtype, args.top), "\n")
        elif args.experiments:
            print(experiments(name, args.dtype, args.rounds), "\n")
        else:
            print(breakdown(name, args.dtype), "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
