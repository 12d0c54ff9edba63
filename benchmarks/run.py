"""mha_xp against its peers on the CPU: the one benchmark entry point.

What is timed
    A self-attention layer, projections included (``y = layer(x)`` with
    ``x`` of shape ``(B, L, E)`` and ``H`` heads), with the same weights and
    the same input in every implementation:

    ``mha_xp``
        ``mha_xp.MultiHeadAttention`` on NumPy arrays.
    ``nn.MHA``
        ``torch.nn.MultiheadAttention`` (eval, ``no_grad``, batch-first,
        ``need_weights=False``: its "fast path").
    ``F.mha``
        ``torch.nn.functional.multi_head_attention_forward``
        (``need_weights=False``, which routes through torch's fused SDPA).
    ``SDPA+proj``
        ``F.linear`` for the projections around torch's fused
        ``F.scaled_dot_product_attention``.
    ``numpy``
        The straightforward dense multi-head attention a NumPy user writes by
        hand (:func:`numpy_mha`).

    "torch best" is the faster of ``nn.MHA`` and ``F.mha`` in the same run.
    Forward + backward (``--no-backward`` skips it) times mha_xp's
    ``layer.vjp(x)`` then ``backward(dy)`` (gradients of the input and of
    every parameter) against torch autograd (``y.backward(dy)``, the same
    gradients) through ``nn.MHA``, ``F.mha`` and ``SDPA+proj``.

    On the peers' own arrays (``--no-native`` skips them; float32 forward,
    no memory measurement): ``forward, torch inputs`` times the layer on torch
    tensors (delegated to torch's SDPA where the semantics coincide) against
    ``SDPA+proj``; ``forward, jax.jit`` times the layer on JAX arrays under
    ``jax.jit`` against ``jax.nn.dot_product_attention`` with the same
    projections, jitted (``jax dpa+proj``).

Configurations ``(B, L, E, H)``
    tiny (1, 16, 64, 4), small (32, 128, 256, 8), medium (8, 512, 512, 8),
    long (1, 4096, 512, 8), in every dtype of ``--dtypes`` (float32 and
    float64 by default); and a sweep over the sequence length (B = 1,
    E = 256, H = 4, L = 256 ... 8192, forward, float32) for the plot.

How
    All implementations of a case run in one process, interleaved: after one
    warm-up call each, every round runs each implementation once, in an order
    that rotates from round to round, after an untimed pause of 10 ms (the
    BLAS and OpenMP threads of the previous implementation spin for a while
    after their work; the pause lets them go idle, so no implementation pays
    for its predecessor). Sub-millisecond calls are timed in loops of
    ``inner`` calls. The figure is the median over rounds. Repeats adapt to
    the case's duration (at least 3 rounds, about 10 s per case; ``--quick``:
    at least 2, about 1.5 s). Before timing, every output (and, for the
    backward, the gradients of the input and of ``in_proj_weight``) is
    compared with mha_xp's; the relative errors go to the JSON.

    Peak extra memory is measured for every case in a fresh process
    (``python benchmarks/run.py --memory ...``, through
    ``_harness.in_fresh_process``): the peak resident set during one call
    minus the resident set before it (``_harness.peak_extra``), after one
    call on a tiny input (L = 8) that takes the one-time costs (lazy imports,
    thread pools); NumPy-only cases never import torch there. Two such
    processes run at a time, after all timing is done.

FLOP count (stated per call; GFLOP/s = count / median time)
    forward: ``F = 8 B L E^2 + 4 B L^2 E``: the four projections (Q, K, V and
    output; ``2 B L E^2`` each) and the two attention matmuls (``Q K^T`` and
    ``P V``; ``2 B L^2 E`` each, summed over heads). Softmax, scaling and
    bias additions are not counted. Forward + backward: ``3 F`` (the
    backward's matmuls are twice the forward's; recomputation by a chunked
    backward is not counted, it is overhead, not work).

    "% peak" relates GFLOP/s to the machine's matmul peak, measured in the
    same run per dtype: the best of 5 NumPy ``(n, n) @ (n, n)`` products
    (n = 4096 for float32, 3072 for float64; ``2 n^3`` FLOPs).

Outputs
    A table per mode and dtype on stdout (times, ``mha_xp / peer`` ratios,
    GFLOP/s, % of peak, peak extra MB), the issue-18 targets met or missed,
    and the change against ``benchmarks/results/baseline.json`` (the previous
    release's results) when it exists. ``benchmarks/results/run.json`` holds
    everything, with the machine, thread counts, BLAS and library versions;
    ``benchmarks/results/run.png`` plots time and memory against L. A
    ``--quick`` run writes ``run_quick.json`` and ``run_quick.png`` instead,
    so a smoke run never replaces the full results the docs quote.

Run ``python benchmarks/run.py`` (about 7-10 minutes on 2 cores),
``python benchmarks/run.py --quick`` (about 1-2 minutes), and
``python benchmarks/run.py --save-baseline`` at a release to make its results
the new baseline.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _harness import ROOT, Progress, in_fresh_process, machine, peak_extra, table

import mha_xp

RESULTS = ROOT / "benchmarks" / "results"

CONFIGS: dict[str, tuple[int, int, int, int]] = {  # name: (B, L, E, H)
    "tiny": (1, 16, 64, 4),
    "small": (32, 128, 256, 8),
    "medium": (8, 512, 512, 8),
    "long": (1, 4096, 512, 8),
}
SWEEP_B, SWEEP_E, SWEEP_H = 1, 256, 4
SWEEP_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_SWEEP_LENGTHS = (256, 512, 1024, 2048)

FORWARD_IMPLS = ("mha_xp", "torch_module", "torch_functional", "torch_sdpa", "numpy")
BACKWARD_IMPLS = ("mha_xp", "torch_module", "torch_functional", "torch_sdpa")
# mha_xp on the peer's own arrays against the peer's native kernel with the
# same projections (float32 forward): the modes, their implementations, and
# the configurations they run (JAX's kernel materialises the scores, and
# jax.jit unrolls mha_xp's chunked loop at long: long is left out there).
NATIVE_MODES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    # mode: (inputs, implementations, configs)
    "forward, torch inputs": ("torch", ("mha_xp", "torch_sdpa"), ("tiny", "small", "medium", "long")),
    "forward, jax.jit": ("jax", ("mha_xp", "jax_dpa"), ("tiny", "small", "medium")),
}
LABELS = {
    "mha_xp": "mha_xp",
    "jax_dpa": "jax dpa+proj",
    "torch_module": "nn.MHA",
    "torch_functional": "F.mha",
    "torch_sdpa": "SDPA+proj",
    "numpy": "numpy",
}
PLOT_LABELS = {
    "mha_xp": "mha_xp (NumPy)",
    "torch_module": "torch nn.MultiheadAttention (eval)",
    "torch_functional": "torch F.multi_head_attention_forward",
    "torch_sdpa": "torch SDPA + F.linear projections",
    "numpy": "hand-written NumPy MHA",
    "jax_dpa": "jax.nn.dot_product_attention + projections (jax.jit)",
}
FLOP_FORMULA = {
    "forward": "8*B*L*E**2 + 4*B*L**2*E",
    "forward+backward": "3 * (8*B*L*E**2 + 4*B*L**2*E)",
}
GAP_S = 0.010  # untimed pause before each timed sample
MIN_SAMPLE_S = 0.005  # sub-millisecond calls are looped to at least this per sample


# -- the cases -------------------------------------------------------------------


def flops(mode: str, B: int, L: int, E: int) -> int:
    """FLOPs of one call (see the module docstring)."""
    forward = 8 * B * L * E**2 + 4 * B * L**2 * E
    return forward if mode == "forward" else 3 * forward


def weights(E: int, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights under torch's names, drawn in float64 then cast: torch's
    initialisation scale, with non-zero biases so that they take part."""
    rng = np.random.default_rng(seed)
    bound_in, bound_out = math.sqrt(6.0 / (4 * E)), 1.0 / math.sqrt(E)
    sd = {
        "in_proj_weight": rng.uniform(-bound_in, bound_in, (3 * E, E)),
        "in_proj_bias": rng.normal(0.0, 0.1, 3 * E),
        "out_proj.weight": rng.uniform(-bound_out, bound_out, (E, E)),
        "out_proj.bias": rng.normal(0.0, 0.1, E),
    }
    return {name: w.astype(dtype) for name, w in sd.items()}


def inputs(B: int, L: int, E: int, dtype: str, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The input ``x`` and the output gradient ``dy``, ``(B, L, E)`` each."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, L, E)).astype(dtype),
            rng.standard_normal((B, L, E)).astype(dtype))


def numpy_mha(x: np.ndarray, w_in: np.ndarray, b_in: np.ndarray, w_out: np.ndarray,
              b_out: np.ndarray, num_heads: int) -> np.ndarray:
    """Multi-head self-attention as a NumPy user writes it: dense scores,
    textbook softmax, no in-place tricks."""
    B, L, E = x.shape
    D = E // num_heads
    qkv = x @ w_in.T + b_in
    q, k, v = qkv.reshape(B, L, 3, num_heads, D).transpose(2, 0, 3, 1, 4)
    s = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(D)  # a Python float keeps float32
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(B, L, E)
    return o @ w_out.T + b_out


def torch_module_from(sd: dict[str, np.ndarray], E: int, H: int, dtype: str):
    """A ``torch.nn.MultiheadAttention`` (batch-first) holding the weights ``sd``."""
    import torch

    module = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=getattr(torch, dtype))
    module.load_state_dict({name: torch.from_numpy(w) for name, w in sd.items()})
    return module


def forward_runner(impl: str, B: int, L: int, E: int, H: int, dtype: str) -> Callable[[], Any]:
    """A zero-argument callable running one forward of ``impl``; torch ones
    must be called under ``torch.no_grad()``."""
    sd = weights(E, dtype)
    x, _ = inputs(B, L, E, dtype)
    if impl == "mha_xp":
        layer = mha_xp.MultiHeadAttention.from_state_dict(sd, num_heads=H)
        return lambda: layer(x)
    if impl == "numpy":
        w_in, b_in, w_out, b_out = (sd[n] for n in ("in_proj_weight", "in_proj_bias",
                                                     "out_proj.weight", "out_proj.bias"))
        return lambda: numpy_mha(x, w_in, b_in, w_out, b_out, H)

    import torch
    import torch.nn.functional as F

    module = torch_module_from(sd, E, H, dtype).eval()
    xt = torch.from_numpy(x)
    if impl == "torch_module":
        return lambda: module(xt, xt, xt, need_weights=False)[0]
    w_in, b_in = module.in_proj_weight, module.in_proj_bias
    w_out, b_out = module.out_proj.weight, module.out_proj.bias
    if impl == "torch_functional":
        xs = xt.transpose(0, 1)  # (L, B, E), a view
        return lambda: F.multi_head_attention_forward(
            xs, xs, xs, E, H, w_in, b_in, None, None, False, 0.0, w_out, b_out,
            training=False, need_weights=False)[0].transpose(0, 1)
    if impl == "torch_sdpa":
        D = E // H

        def sdpa():
            q, k, v = F.linear(xt, w_in, b_in).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v)
            return F.linear(o.transpose(1, 2).reshape(B, L, E), w_out, b_out)
        return sdpa
    raise ValueError(f"unknown implementation {impl!r}")


def native_runner(inputs: str, impl: str, B: int, L: int, E: int, H: int,
                  dtype: str) -> Callable[[], Any]:
    """A forward of ``impl`` on the arrays of ``inputs`` ("torch": mha_xp's
    layer on torch tensors, or torch's SDPA with ``F.linear`` projections;
    "jax": each jitted, mha_xp's layer on JAX arrays or
    ``jax.nn.dot_product_attention`` with the same projections)."""
    if inputs == "torch":
        if impl != "mha_xp":
            return forward_runner(impl, B, L, E, H, dtype)
        import torch

        sd = {n: torch.from_numpy(w) for n, w in weights(E, dtype).items()}
        layer = mha_xp.MultiHeadAttention.from_state_dict(sd, num_heads=H)
        xt = torch.from_numpy(inputs_of(B, L, E, dtype))
        return lambda: layer(xt)
    import jax
    import jax.numpy as jnp

    sd = {n: jnp.asarray(w) for n, w in weights(E, dtype).items()}
    x = jnp.asarray(inputs_of(B, L, E, dtype))
    if impl == "mha_xp":
        layer = mha_xp.MultiHeadAttention.from_state_dict(sd, num_heads=H)
        f = jax.jit(lambda x: layer(x))
    else:
        D = E // H

        def plain(x):
            qkv = (x @ sd["in_proj_weight"].T + sd["in_proj_bias"]).reshape(B, L, 3, H, D)
            o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
            return o.reshape(B, L, E) @ sd["out_proj.weight"].T + sd["out_proj.bias"]
        f = jax.jit(plain)
    return lambda: f(x).block_until_ready()


def inputs_of(B: int, L: int, E: int, dtype: str) -> np.ndarray:
    """The input ``x`` of :func:`inputs`."""
    return inputs(B, L, E, dtype)[0]


def backward_runner(impl: str, B: int, L: int, E: int, H: int, dtype: str) -> Callable[[], Any]:
    """A callable doing one forward and one backward of ``impl``; it returns
    the gradients of the input and of ``in_proj_weight``."""
    sd = weights(E, dtype)
    x, dy = inputs(B, L, E, dtype)
    if impl == "mha_xp":
        layer = mha_xp.MultiHeadAttention.from_state_dict(sd, num_heads=H)

        def step():
            _, backward = layer.vjp(x)
            return backward(dy)
        return step

    import torch
    import torch.nn.functional as F

    module = torch_module_from(sd, E, H, dtype)  # training mode; dropout is 0
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    w_in, b_in = module.in_proj_weight, module.in_proj_bias
    w_out, b_out = module.out_proj.weight, module.out_proj.bias
    D = E // H

    def forward():
        if impl == "torch_module":
            return module(xt, xt, xt, need_weights=False)[0]
        if impl == "torch_functional":
            xs = xt.transpose(0, 1)
            return F.multi_head_attention_forward(
                xs, xs, xs, E, H, w_in, b_in, None, None, False, 0.0, w_out, b_out,
                training=True, need_weights=False)[0].transpose(0, 1)
        if impl == "torch_sdpa":
            q, k, v = F.linear(xt, w_in, b_in).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v)
            return F.linear(o.transpose(1, 2).reshape(B, L, E), w_out, b_out)
        raise ValueError(f"unknown implementation {impl!r}")

    def step():
        xt.grad = None
        for p in module.parameters():
            p.grad = None
        forward().backward(dyt)
        return {"query": xt.grad, "in_proj_weight": w_in.grad}
    return step


def as_numpy(result: Any) -> dict[str, np.ndarray]:
    """A runner's result as NumPy arrays by name (``out`` for a forward)."""
    if not isinstance(result, dict):
        result = {"out": result}
    return {name: (r.detach().numpy() if hasattr(r, "detach") else np.asarray(r))
            for name, r in result.items() if name in ("out", "query", "in_proj_weight")}


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def mha_xp_path(B: int, L: int, H: int, dtype: str) -> str:
    """Which attention path mha_xp's forward takes (its dense scores against
    the memory budget in effect)."""
    return "dense" if B * H * L * L * np.dtype(dtype).itemsize <= mha_xp.get_memory_budget() else "chunked"


# -- timing ----------------------------------------------------------------------


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, including time stolen by
    the hypervisor; CPU seconds of this process and its children)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """Cores used by other processes (and the hypervisor) while a case ran:
    on a shared machine, the figure that says whether a timing can be trusted.
    With 2 cores, 2-thread BLAS and OpenMP regions wait for a time slice
    whenever another process holds a core, so even 0.5 distorts timings."""

    def __enter__(self) -> "OtherLoad":
        self.t0, (self.busy0, self.own0) = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own = cpu_seconds()
        self.cores = max(0.0, ((busy - self.busy0) - (own - self.own0)) / (time.perf_counter() - self.t0))


def timed(fns: dict[str, Callable[[], Any]], *, budget_s: float, min_repeats: int,
          max_repeats: int, label: str) -> tuple[dict[str, float], dict[str, Any], int, int]:
    """Median seconds per call of each function, interleaved.

    ``_harness.interleaved`` with three additions (see the module docstring):
    the order rotates each round, an untimed pause precedes every sample,
    and sub-millisecond calls are looped ``inner`` times per sample. Returns
    ``(medians, warm-up results, repeats, inner)``.
    """
    names = list(fns)
    first: dict[str, Any] = {}
    warm: dict[str, float] = {}
    for name in names:
        time.sleep(GAP_S)
        t0 = time.perf_counter()
        first[name] = fns[name]()
        warm[name] = time.perf_counter() - t0
    inner = max(1, math.ceil(MIN_SAMPLE_S / max(min(warm.values()), 1e-7)))
    round_s = inner * sum(warm.values()) + GAP_S * len(names)
    repeats = int(min(max_repeats, max(min_repeats, round(budget_s / round_s))))
    bar = Progress(repeats, label)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            time.sleep(GAP_S)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
        bar.step()
    return {n: statistics.median(s) for n, s in samples.items()}, first, repeats, inner


def matmul_peak(dtype: str, repeats: int) -> dict[str, float]:
    """The machine's matmul throughput with NumPy's BLAS: best and median of
    ``repeats`` square products."""
    n = 4096 if dtype == "float32" else 3072
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    a @ b  # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t0)
    gflop = 2 * n**3 / 1e9
    return {"n": n, "best_gflops": gflop / min(seconds),
            "median_gflops": gflop / statistics.median(seconds)}


def run_case(mode: str, dtype: str, name: str, shape: tuple[int, int, int, int],
             impls: tuple[str, ...], quick: bool, label: str) -> dict[str, Any]:
    """Time one case: every implementation, interleaved; check outputs."""
    import torch

    B, L, E, H = shape
    if mode in NATIVE_MODES:
        make = lambda *a: native_runner(NATIVE_MODES[mode][0], *a)  # noqa: E731
    else:
        make = forward_runner if mode == "forward" else backward_runner
    fns = {impl: make(impl, B, L, E, H, dtype) for impl in impls}
    budget, lo, hi = (1.5, 2, 15) if quick else (10.0, 3, 41)
    with torch.set_grad_enabled(mode == "forward+backward"), OtherLoad() as load:
        seconds, first, repeats, inner = timed(fns, budget_s=budget, min_repeats=lo,
                                               max_repeats=hi, label=label)
    ref = as_numpy(first["mha_xp"])
    errors = {}
    for impl in impls:
        if impl != "mha_xp":
            got = as_numpy(first[impl])
            errors[impl] = max(rel_err(got[k], ref[k]) for k in ref)
    del fns, first
    return {
        "mode": mode, "dtype": dtype, "config": name, "shape_B_L_E_H": list(shape),
        "flops": flops(mode, B, L, E), "mha_xp_path": mha_xp_path(B, L, H, dtype),
        "repeats": repeats, "inner": inner, "other_load_cores": round(load.cores, 2),
        "seconds": seconds,
        "rel_err_vs_mha_xp": errors, "peak_extra_bytes": {},
    }


# -- memory in a fresh process ----------------------------------------------------


def measure_memory(mode: str, dtype: str, B: int, L: int, E: int, H: int, impl: str) -> int:
    """Peak extra bytes of one call in this (fresh) process.

    One call on a tiny input of the same layer comes first, so that one-time
    costs (lazy imports, thread pools, kernel selection) are not counted,
    while the heap has not yet cached anything of the case's size.
    """
    make = forward_runner if mode == "forward" else backward_runner
    warm = make(impl, 1, 8, E, H, dtype)
    fn = make(impl, B, L, E, H, dtype)
    if impl in ("mha_xp", "numpy"):  # torch is never imported for these
        warm()
        return peak_extra(fn)
    import torch

    with torch.set_grad_enabled(mode != "forward"):
        warm()
        return peak_extra(fn)


def measure_all_memory(cases: list[dict[str, Any]], workers: int = 2) -> None:
    """Fill ``peak_extra_bytes`` of every case, one fresh process per
    (case, implementation), ``workers`` at a time."""
    jobs = [(case, impl) for case in cases for impl in case["seconds"]
            if case["mode"] not in NATIVE_MODES]
    bar = Progress(len(jobs), "memory (fresh processes)")

    def one(job):
        case, impl = job
        B, L, E, H = case["shape_B_L_E_H"]
        args = (case["mode"], case["dtype"], str(B), str(L), str(E), str(H), impl)
        try:
            value = in_fresh_process(__file__, *args)
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or "").strip().splitlines()[-1:] or ["?"]
            print(f"\nmemory of {args} failed: {tail[0]}", file=sys.stderr)
            value = None
        return case, impl, value

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for case, impl, value in pool.map(one, jobs):
            case["peak_extra_bytes"][impl] = value
            bar.step(f"{case['config']} {impl}")


# -- the machine ----------------------------------------------------------------------


def openblas_threads() -> str:
    """NumPy's OpenBLAS thread count, asked from the library itself."""
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower()
                           and line.split()[-1].startswith("/")})
        for path in libs:
            lib = ctypes.CDLL(path)
            for fname in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                          "scipy_openblas_get_num_threads", "openblas_get_num_threads"):
                f = getattr(lib, fname, None)
                if f is not None:
                    return str(f())
    except OSError:
        pass
    return "unknown"


def describe_machine() -> dict[str, Any]:
    """``_harness.machine()`` plus the thread counts, torch's build and git state."""
    import torch

    info: dict[str, Any] = dict(machine())
    info["platform"] = platform.platform()
    info["numpy_blas_threads"] = openblas_threads()
    info["torch_interop_threads"] = str(torch.get_num_interop_threads())
    info["torch_mkl"] = str(torch.backends.mkl.is_available())
    info["torch_mkldnn"] = str(torch.backends.mkldnn.is_available())
    try:
        import array_api_compat

        info["array_api_compat"] = array_api_compat.__version__
    except ImportError:
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MHA_XP_MEMORY_BUDGET"):
        if var in os.environ:
            info[var] = os.environ[var]
    try:
        with open("/proc/loadavg") as f:
            info["load_average_at_start"] = f.read().split()[0]
    except OSError:
        pass
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        info["git_commit"] = git("rev-parse", "--short", "HEAD")
        info["git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


# -- reporting ----------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def mb(nbytes: int | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 1e6:.1f}" if nbytes < 1e7 else f"{nbytes / 1e6:.0f}"


def torch_best(seconds: dict[str, float]) -> tuple[str, float]:
    """The faster of ``nn.MHA`` and ``F.mha``; where neither ran (the native
    modes), the fastest peer."""
    peers = [i for i in ("torch_module", "torch_functional") if i in seconds] or \
        [i for i in seconds if i != "mha_xp"]
    return min(((i, seconds[i]) for i in peers), key=lambda t: t[1])


def case_table(cases: list[dict[str, Any]], peak_gflops: float) -> str:
    """Rows: one per (config, implementation), and "torch best"."""
    rows = []
    for c in cases:
        t, mem = c["seconds"], c["peak_extra_bytes"]
        ours = t["mha_xp"]
        for impl, s in t.items():
            gf = c["flops"] / s / 1e9
            ratio = "—" if impl == "mha_xp" else f"{ours / s:.2f}"
            rows.append((c["config"] if impl == "mha_xp" else "", LABELS[impl], ms(s), ratio,
                         f"{gf:.1f}", f"{100 * gf / peak_gflops:.0f}", mb(mem.get(impl)),
                         f"{c['rel_err_vs_mha_xp'][impl]:.0e}" if impl != "mha_xp" else c["mha_xp_path"],
                         f"{c['other_load_cores']:.1f}" if impl == "mha_xp" else ""))
        best, s = torch_best(t)
        who = "torch best" if best in ("torch_module", "torch_functional") else "peer"
        rows.append(("", f"{who} ({LABELS[best]})", ms(s), f"{ours / s:.2f}", "", "", "", "", ""))
    return table(rows, ("config", "impl", "ms", "mha_xp/this", "GFLOP/s", "% peak", "peak MB",
                        "err / path", "others"))


def targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's targets (float32, ratios of times measured side by side in
    this run), each met or missed; a target whose cases did not run is left out."""
    by = {(c["mode"], c["config"]): c["seconds"] for c in cases
          if c["dtype"] == "float32" and c["config"] in CONFIGS}
    out = []

    def check(config: str, what: str, value: float, limit: float, unit: str = "×") -> None:
        out.append({"config": config, "target": what, "value": value, "limit": limit,
                    "met": value <= limit, "unit": unit})

    def best(t: dict[str, float], impls: tuple[str, ...]) -> float:
        return min(t[i] for i in impls if i in t)

    torch_all = ("torch_module", "torch_functional", "torch_sdpa")
    fwd = {config: t for (mode, config), t in by.items() if mode == "forward"}
    if "tiny" in fwd:
        t = fwd["tiny"]
        check("tiny", "forward: mha_xp / hand-written numpy", t["mha_xp"] / t["numpy"], 1.0)
        check("tiny", "forward: mha_xp / hand-written numpy (stretch)", t["mha_xp"] / t["numpy"], 0.5)
    if "small" in fwd:
        check("small", "forward: mha_xp / torch best (nn.MHA, F.mha, SDPA+proj)",
              fwd["small"]["mha_xp"] / best(fwd["small"], torch_all), 1.0)
    for config in ("medium", "long"):
        if config in fwd:
            check(config, "forward: mha_xp / torch best (nn.MHA, F.mha, SDPA+proj)",
                  fwd[config]["mha_xp"] / best(fwd[config], torch_all), 0.9)
    for config in ("small", "medium", "long"):
        t = by.get(("forward+backward", config))
        if t is not None:
            check(config, "forward + backward: mha_xp / torch autograd best",
                  t["mha_xp"] / best(t, torch_all), 1.0)
    for (mode, config), t in sorted(by.items()):
        if mode == "forward, torch inputs":
            check(config, "torch inputs: mha_xp / SDPA+proj", t["mha_xp"] / t["torch_sdpa"], 1.05)
        elif mode == "forward, jax.jit":
            check(config, "jax.jit: mha_xp / jax dpa+proj", t["mha_xp"] / t["jax_dpa"], 1.1)
    return out


def compare_with_baseline(report: dict[str, Any], baseline: dict[str, Any]) -> str:
    """The change of mha_xp's time, and of its ratio to torch's best, per case."""
    key = lambda c: (c["mode"], c["dtype"], c["config"])  # noqa: E731
    old = {key(c): c for c in baseline.get("cases", [])}
    rows = []
    for c in report["cases"]:
        b = old.get(key(c))
        if b is None or "mha_xp" not in b["seconds"]:
            continue
        new_t, old_t = c["seconds"]["mha_xp"], b["seconds"]["mha_xp"]
        new_r = new_t / torch_best(c["seconds"])[1]
        old_r = old_t / torch_best(b["seconds"])[1]
        flag = "slower?" if new_r / old_r > 1.15 else "faster" if new_r / old_r < 0.87 else ""
        rows.append((c["mode"], c["dtype"], c["config"], ms(old_t), ms(new_t),
                     f"{new_t / old_t:.2f}", f"{old_r:.2f}", f"{new_r:.2f}", flag))
    m = baseline.get("machine", {})
    head = (f"change against the baseline (mha_xp {m.get('mha_xp', '?')}, commit "
            f"{m.get('git_commit', '?')}, {baseline.get('date', '?')}; time new/old, and "
            f"mha_xp / torch best old -> new, which cancels machine drift; "
            f"flagged beyond ±15 %):")
    if not rows:
        return head + "\n(no case in common)"
    return head + "\n" + table(rows, ("mode", "dtype", "config", "old ms", "new ms", "new/old",
                                      "x best old", "x best new", ""))


def _list_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    def item(cells: list[str]) -> str:
        first, *rest = cells
        return "\n".join([f"   * - {first}", *(f"     - {c}" for c in rest)])

    return "\n".join([f".. list-table:: {title}", "   :header-rows: 1", "",
                      item(header), *(item(r) for r in rows)]) + "\n"


def rst_report(report: dict[str, Any]) -> str:
    """The tables of a run as reStructuredText (included by docs/performance.rst)."""
    m = report["machine"]
    peaks = ", ".join(f"{d} {p['best_gflops']:.0f} GFLOP/s" for d, p in report["matmul_peak"].items())
    parts = [f"Run of {report['date'][:10]} (``{report['command']}``, mha_xp {m['mha_xp']}, commit "
             f"``{m.get('git_commit', '?')}``{' with local changes' if m.get('git_dirty') == 'True' else ''}) "
             f"on {m['cores']} cores ({m['cpu']}), Python {m['python']}, NumPy {m['numpy']} with "
             f"{m['blas']} ({m['numpy_blas_threads']} threads), PyTorch {m['torch']} "
             f"({m['torch_threads']} threads). Measured matmul peak: {peaks}. Times are medians in "
             f"milliseconds; a ratio is mha_xp's time over the peer's (below 1: mha_xp is faster); "
             f"memory is the peak extra resident memory of one call, in MB, each in a fresh process.", ""]
    modes = list(dict.fromkeys(c["mode"] for c in report["cases"] if c["config"] in CONFIGS))
    for mode in modes:
        for dtype in report["options"]["dtypes"] if mode not in NATIVE_MODES else ["float32"]:
            cases = [c for c in report["cases"] if c["mode"] == mode and c["dtype"] == dtype
                     and c["config"] in CONFIGS]
            if not cases:
                continue
            impls = list(cases[0]["seconds"])
            peak = report["matmul_peak"][dtype]["best_gflops"]
            rows = []
            for c in cases:
                t = c["seconds"]
                best = torch_best(t)[1]
                gf = c["flops"] / t["mha_xp"] / 1e9
                rows.append([f"{c['config']} {tuple(c['shape_B_L_E_H'])}", *(ms(t[i]) for i in impls),
                             *(f"{t['mha_xp'] / t[i]:.2f}" for i in impls if i != "mha_xp"),
                             f"{t['mha_xp'] / best:.2f}", f"{gf:.1f} ({100 * gf / peak:.0f} %)"])
            header = ["config (B, L, E, H)", *(f"{LABELS[i]} ms" for i in impls),
                      *(f"÷ {LABELS[i]}" for i in impls if i != "mha_xp"), "÷ torch best",
                      "mha_xp GFLOP/s (% peak)"]
            parts.append(_list_table(f"{mode.capitalize()}, {dtype}: time and mha_xp's ratios", header, rows))
            mem_rows = [[c["config"], *(mb(c["peak_extra_bytes"].get(i)) for i in impls)] for c in cases]
            parts.append(_list_table(f"{mode.capitalize()}, {dtype}: peak extra memory (MB)",
                                     ["config", *(LABELS[i] for i in impls)], mem_rows))
    sweep = [c for c in report["cases"] if c["config"].startswith("sweep-")]
    if sweep:
        impls = list(sweep[0]["seconds"])
        rows = [[str(c["shape_B_L_E_H"][1]), c["mha_xp_path"], *(ms(c["seconds"][i]) for i in impls),
                 f"{c['seconds']['mha_xp'] / torch_best(c['seconds'])[1]:.2f}",
                 *(mb(c["peak_extra_bytes"].get(i)) for i in impls)] for c in sweep]
        header = ["L", "mha_xp path", *(f"{LABELS[i]} ms" for i in impls), "÷ torch best",
                  *(f"{LABELS[i]} MB" for i in impls)]
        parts.append(_list_table(f"Sweep, forward, float32, B = {SWEEP_B}, E = {SWEEP_E}, H = {SWEEP_H}",
                                 header, rows))
    if report.get("targets"):
        rows = [[t["config"], t["target"], f"{t['value']:.2f}", f"≤ {t['limit']:g}",
                 "met" if t["met"] else "missed"] for t in report["targets"]]
        parts.append(_list_table("Issue 18's targets (float32, side by side in one process)",
                                 ["config", "target", "this run", "target", ""], rows))
    busy = [c for c in report["cases"] if c.get("other_load_cores", 0) > 0.3]
    if busy:
        parts.append(f"Other processes used up to {max(c['other_load_cores'] for c in busy):.1f} cores "
                     f"during {len(busy)} of the {len(report['cases'])} cases; their timings are "
                     f"less reliable.\n")
    return "\n".join(parts)


def plot(report: dict[str, Any], png: Path) -> None:
    """Time and peak extra memory against L for the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    sweep = [c for c in report["cases"] if c["config"].startswith("sweep-")]
    if not sweep:
        return
    lengths = [c["shape_B_L_E_H"][1] for c in sweep]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"mha_xp": dict(color="C3", lw=2.5, marker="o"), "numpy": dict(color="C7", ls="--", marker="s")}
    for impl in FORWARD_IMPLS:
        style = styles.get(impl, dict(marker="o"))
        ax_t.plot(lengths, [c["seconds"][impl] * 1e3 for c in sweep], label=PLOT_LABELS[impl], **style)
        mem = [c["peak_extra_bytes"].get(impl) for c in sweep]
        if any(m is not None for m in mem):
            ax_m.plot(lengths, [np.nan if m is None else max(m, 1) / 1e6 for m in mem],
                      label=PLOT_LABELS[impl], **style)
    chunked = [L for c, L in zip(sweep, lengths) if c["mha_xp_path"] == "chunked"]
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, labels=[str(L) for L in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        if chunked:
            ax.axvspan(chunked[0] / 2**0.5, lengths[-1] * 2**0.25, color="C3", alpha=0.06)
    if chunked:
        ax_m.text(chunked[0] / 2**0.5, 0.97, " mha_xp: chunked path", transform=ax_m.get_xaxis_transform(),
                  va="top", fontsize=8, color="C3")
    ax_t.set(xlabel="sequence length L = S", ylabel="milliseconds per call (median)", title="time")
    ax_m.set(xlabel="sequence length L = S", ylabel="peak extra memory (MB, fresh process)",
             title="memory")
    ax_t.legend(fontsize=7.5)
    m = report["machine"]
    fig.suptitle(f"self-attention layer, B={SWEEP_B}, E={SWEEP_E}, H={SWEEP_H}, float32 — "
                 f"{m['cores']} cores ({m['cpu']}), numpy {m['numpy']} ({m['blas']}), "
                 f"torch {m['torch']}, mha_xp {m['mha_xp']}", fontsize=8.5)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description="mha_xp against torch and hand-written NumPy on the CPU: time, "
                    "throughput and memory (see the module docstring).")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and a shorter sweep (L <= 2048): a smoke run; "
                             "writes run_quick.json/.png")
    parser.add_argument("--no-backward", action="store_true", help="skip forward + backward")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sequence-length sweep (no plot)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    parser.add_argument("--no-native", action="store_true",
                        help="skip mha_xp on torch tensors and on JAX arrays under jax.jit against "
                             "torch's SDPA and jax.nn.dot_product_attention (float32 forward)")
    parser.add_argument("--dtypes", default="float32,float64",
                        help="comma-separated dtypes of the named configs (default float32,float64)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default benchmarks/results/run.json, run_quick.json with --quick); "
                             "the plot goes beside it with .png")
    parser.add_argument("--baseline", type=Path, default=RESULTS / "baseline.json",
                        help="results of the previous release to compare with (default %(default)s)")
    parser.add_argument("--save-baseline", action="store_true",
                        help="also write this run's results to the baseline file")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the plot and the docs' tables from the JSON (--out) without running anything")
    parser.add_argument("--memory", nargs=7, metavar=("MODE", "DTYPE", "B", "L", "E", "H", "IMPL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        mode, dtype, B, L, E, H, impl = args.memory
        print(measure_memory(mode, dtype, int(B), int(L), int(E), int(H), impl))
        return 0

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for d in dtypes:
        if d not in ("float32", "float64"):
            parser.error(f"--dtypes: {d!r} is not float32 or float64")
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"--configs: {c!r} is not one of {', '.join(CONFIGS)}")
    out = args.out or RESULTS / ("run_quick.json" if args.quick else "run.json")
    if args.plot_only:
        report = json.loads(out.read_text())
        plot(report, out.with_suffix(".png"))
        out.with_suffix(".rst").write_text(rst_report(report))
        print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.rst')}")
        return 0
    start = time.perf_counter()

    import torch

    report: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": describe_machine(),
        "options": {"quick": args.quick, "backward": not args.no_backward, "sweep": not args.no_sweep,
                    "native": not args.no_native,
                    "memory": not args.no_memory, "dtypes": dtypes, "configs": configs},
        "flop_formula": FLOP_FORMULA,
        "timing": ("median over rounds; implementations interleaved in rotating order, "
                   f"{GAP_S * 1e3:.0f} ms untimed pause before each sample, one warm-up call each"),
        "matmul_peak": {},
        "cases": [],
    }
    print("machine:", ", ".join(f"{k}={v}" for k, v in report["machine"].items()))

    for dtype in dtypes + (["float32"] if "float32" not in dtypes and not args.no_sweep else []):
        report["matmul_peak"][dtype] = matmul_peak(dtype, 3 if args.quick else 5)
        p = report["matmul_peak"][dtype]
        print(f"matmul peak {dtype}: {p['best_gflops']:.1f} GFLOP/s (best of (n x n) @ (n x n), "
              f"n = {p['n']}; median {p['median_gflops']:.1f})")

    plan = []  # (mode, dtype, name, shape, impls)
    modes = ["forward"] + ([] if args.no_backward else ["forward+backward"])
    for mode in modes:
        for dtype in dtypes:
            for name in configs:
                plan.append((mode, dtype, name, CONFIGS[name],
                             FORWARD_IMPLS if mode == "forward" else BACKWARD_IMPLS))
    if not args.no_native:
        for mode, (lib, impls, native_configs) in NATIVE_MODES.items():
            try:
                __import__(lib)
            except ImportError:
                print(f"{lib} is not installed: no {mode!r} cases")
                continue
            modes.append(mode)
            for name in configs:
                if name in native_configs:
                    plan.append((mode, "float32", name, CONFIGS[name], impls))
    if not args.no_sweep:
        for L in QUICK_SWEEP_LENGTHS if args.quick else SWEEP_LENGTHS:
            plan.append(("forward", "float32", f"sweep-L{L}", (SWEEP_B, L, SWEEP_E, SWEEP_H),
                         FORWARD_IMPLS))
    for i, (mode, dtype, name, shape, impls) in enumerate(plan, 1):
        label = f"[{i}/{len(plan)}] {mode} {dtype} {name}".ljust(44)
        report["cases"].append(run_case(mode, dtype, name, shape, impls, args.quick, label))
    timing_s = time.perf_counter() - start
    if not args.no_memory:
        measure_all_memory(report["cases"])

    for mode in modes:
        for dtype in dtypes if mode not in NATIVE_MODES else ["float32"]:
            cases = [c for c in report["cases"] if c["mode"] == mode and c["dtype"] == dtype
                     and c["config"] in CONFIGS]
            if not cases:
                continue
            peak = report["matmul_peak"][dtype]["best_gflops"]
            print(f"\n{mode}, {dtype}: median ms per call; mha_xp/this = mha_xp's time over this "
                  f"one's (< 1: mha_xp faster); % of the {peak:.0f} GFLOP/s matmul peak; "
                  f"err = rel. error vs mha_xp; path = mha_xp's attention path; others = cores "
                  f"used by other processes meanwhile")
            print(case_table(cases, peak))
    sweep = [c for c in report["cases"] if c["config"].startswith("sweep-")]
    if sweep:
        print(f"\nsweep: forward, float32, B={SWEEP_B}, E={SWEEP_E}, H={SWEEP_H}")
        print(case_table(sweep, report["matmul_peak"]["float32"]["best_gflops"]))

    busy = [c for c in report["cases"] if c["other_load_cores"] > 0.3]
    if busy:
        print(f"\nWARNING: other processes used up to {max(c['other_load_cores'] for c in busy):.1f} "
              f"cores during {len(busy)} of {len(report['cases'])} cases "
              f"({', '.join(sorted({c['config'] for c in busy}))}): their timings are distorted "
              f"(multi-threaded BLAS and OpenMP wait for time slices); rerun on a quiet machine")
    report["targets"] = targets(report["cases"])
    if report["targets"]:
        print("\nissue 18 targets (float32; ratios of times side by side in this process):")
        print(table([(t["config"], t["target"], f"{t['value']:.2f}",
                      f"<= {t['limit']:g}", "met" if t["met"] else "MISSED") for t in report["targets"]],
                    ("config", "target", "value", "limit", "")))

    if args.baseline.is_file() and args.baseline.resolve() != out.resolve():
        print("\n" + compare_with_baseline(report, json.loads(args.baseline.read_text())))
    else:
        print(f"\nno baseline at {args.baseline} (make one with --save-baseline)")

    report["wall_seconds"] = {"timing": timing_s, "total": time.perf_counter() - start}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".rst").write_text(rst_report(report))
    written = [out, out.with_suffix(".rst")]
    if sweep:
        png = out.with_suffix(".png")
        plot(report, png)
        written.append(png)
    if args.save_baseline:
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(report, indent=1) + "\n")
        written.append(args.baseline)
    show = lambda p: p.relative_to(ROOT) if p.resolve().is_relative_to(ROOT) else p  # noqa: E731
    print(f"\nwrote {', '.join(str(show(p)) for p in written)} "
          f"in {report['wall_seconds']['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
