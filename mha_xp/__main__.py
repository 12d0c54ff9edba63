"""The main job, ``python -m mha_xp``: a check of mha_xp's promises on this machine.

It prints seven short tables, each row ending in ``ok``, ``FAIL`` or
``skipped (why)``:

1. **Backends**: which array libraries are installed (NumPy,
   array-api-strict, torch on the CPU and on CUDA, JAX, Dask, CuPy), with
   their versions.
2. **Correctness**: one layer, with the same weights, on every CPU backend
   found, in float32 and float64, with no mask, a causal mask and a key
   padding mask, against a float64 reference written here in plain NumPy (an
   explicit loop over heads, no code shared with the library).
3. **Parity with torch**: a ``torch.nn.MultiheadAttention`` ported with
   :meth:`~mha_xp.MultiHeadAttention.from_torch` gives the module's outputs;
   an indicative timing of mha_xp on NumPy against torch's own module.
4. **A long sequence** in one call, with its peak memory (``tracemalloc``)
   against what the dense score tensor alone would need.
5. **Training without autodiff**: :meth:`~mha_xp.MultiHeadAttention.vjp`
   against finite differences, and a few Adam steps whose loss falls.
6. **Masks and padding**: a fully masked query row gives zeros, padding keys
   holding NaN are ignored, nothing is NaN.
7. **GPU**: the correctness rows on CuPy and torch's CUDA device, when a GPU
   is there.

The exit status is 0 when no row fails and 1 otherwise; the last line says
which. Importing this module has no side effects: optional libraries are
imported only by :func:`main`.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TextIO, cast

import numpy as np
from array_api_compat import array_namespace, device as device_of

import mha_xp

__all__ = ["main", "reference_attention"]

BACKENDS = ("numpy", "array_api_strict", "torch", "torch-cuda", "jax", "dask", "cupy")
GPU_BACKENDS = ("torch-cuda", "cupy")
DTYPES = ("float32", "float64")
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
# The layer of the correctness, parity and GPU tables: small enough that JAX's
# and Dask's per-operation overhead stays a fraction of a second per row.
EMBED_DIM, NUM_HEADS, BATCH = 32, 4, 2
# The tiny layer of the training table: its finite-difference check and its
# Adam steps take milliseconds.
TRAIN_EMBED_DIM, TRAIN_HEADS = 8, 2


# -- bookkeeping and output ---------------------------------------------------


@dataclass
class Tally:
    """The rows that passed, failed and were skipped."""

    passed: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    def result(self, ok: bool, what: str) -> str:
        """Count one check; return its result cell, ``"ok"`` or ``"FAIL"``."""
        if ok:
            self.passed += 1
            return "ok"
        self.failed.append(what)
        return "FAIL"

    def error(self, what: str, exc: Exception) -> str:
        """Count a check that raised; return its result cell."""
        self.failed.append(what)
        return f"FAIL ({type(exc).__name__}: {exc})".replace("\n", " ")

    def skip(self, reason: str) -> str:
        """Count a check that could not run here; return its result cell."""
        self.skipped += 1
        return f"skipped ({reason})"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                notes: Sequence[str] = ()) -> None:
    """Print a titled table; columns are separated by at least two spaces."""
    print(f"\n{title}")
    for note in notes:
        print(f"  {note}")
    widths = [max(len(str(r[i])) for r in [header, *rows] if i < len(r))
              for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [header, *rows]]
    print("  " + lines[0])
    print("  " + "-" * max(len(line) for line in lines))
    for line in lines[1:]:
        print("  " + line)


class Progress:
    """A one-line status on stderr, redrawn in place; silent when disabled.

    Parameters
    ----------
    enabled : bool
        Whether to draw at all (off with ``--no-progress`` or when stderr is
        not a terminal, so that logs and pipes get no carriage returns).
    stream : file, default sys.stderr
        Where to draw.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = sys.stderr if stream is None else stream
        self._width = 0
        self._lock = threading.Lock()

    def show(self, text: str) -> None:
        """Replace the status line with ``text``."""
        if not self.enabled:
            return
        with self._lock:
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()
            self._width = len(text)

    def clear(self) -> None:
        """Erase the status line."""
        if self.enabled and self._width:
            self.show("")
            self._stream.write("\r")
            self._width = 0

    @contextmanager
    def ticking(self, text: str) -> Iterator[None]:
        """Show ``text`` with the seconds elapsed while the block runs.

        A thread redraws the line: the work in the block is one library call
        that cannot report progress itself.
        """
        if not self.enabled:
            yield
            return
        start, done = time.perf_counter(), threading.Event()

        def tick() -> None:
            while not done.wait(0.25):
                self.show(f"{text} ... {time.perf_counter() - start:.1f} s")

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.clear()


# -- backends -----------------------------------------------------------------


@dataclass
class Backend:
    """One place the layer can run: a library on a device.

    Attributes
    ----------
    name : str
        One of :data:`BACKENDS`.
    xp : module or None
        The library's module; None when it is not available here.
    device : object
        Device to build on; None for the library's default.
    version : str
        The library's version, or ``"-"``.
    status : str
        ``"ok"``, or why the backend is not available.
    to_numpy : callable
        Brings one of the library's arrays to a NumPy array.
    compile : callable
        Wraps a function of arrays the way the library runs whole programs:
        ``jax.jit`` for JAX, the identity elsewhere.
    """

    name: str
    xp: ModuleType | None
    device: Any = None
    version: str = "-"
    status: str = "ok"
    to_numpy: Callable[[Any], np.ndarray] = np.asarray
    compile: Callable[[Callable[..., Any]], Callable[..., Any]] = field(default=lambda f: f)


def _import(name: str) -> tuple[ModuleType | None, str]:
    """Import an optional library; return ``(module or None, status)``."""
    try:
        return importlib.import_module(name), "ok"
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # a broken install, e.g. CUDA libraries missing
        return None, f"unavailable: {type(exc).__name__}: {exc}"


def _version(name: str) -> str:
    return str(getattr(sys.modules.get(name), "__version__", "-"))


def _torch_to_numpy(t: Any) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy())


def _find(name: str) -> Backend:
    """Import backend ``name`` (one of :data:`BACKENDS`) and describe it."""
    if name == "numpy":
        return Backend(name, np, "cpu", np.__version__)
    if name == "array_api_strict":
        mod, status = _import("array_api_strict")
        return Backend(name, mod, None, _version(name), status, np.from_dlpack)
    if name in ("torch", "torch-cuda"):
        mod, status = _import("torch")
        if name == "torch-cuda" and mod is not None and not mod.cuda.is_available():
            mod, status = None, "no GPU"
        return Backend(name, mod, "cpu" if name == "torch" else "cuda", _version("torch"),
                       status, _torch_to_numpy)
    if name == "jax":
        mod, status = _import("jax.numpy")
        if mod is None:
            return Backend(name, mod, None, "-", status)
        jax = sys.modules["jax"]
        # Process-wide switches, set only by this program: JAX computes in
        # float32 unless told otherwise (the float64 rows need x64), and on a
        # GPU its default float32 matmuls use TF32, too coarse for 1e-5.
        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "float32")
        # Under jit: how JAX code runs, and 5x faster here than eager calls,
        # which compile every operation for every new shape.
        return Backend(name, mod, None, _version("jax"), status, np.asarray, jax.jit)
    if name == "dask":
        mod, status = _import("dask.array")
        return Backend(name, mod, None, _version("dask"), status,
                       lambda a: np.asarray(a.compute()))
    mod, status = _import("cupy")
    if mod is not None:
        try:
            if mod.cuda.runtime.getDeviceCount() == 0:
                mod, status = None, "no GPU"
        except Exception:  # no driver or no device: CuPy raises CUDARuntimeError
            mod, status = None, "no GPU"
    return Backend(name, mod, None, _version("cupy"), status, lambda a: a.get())


def section_backends(names: Sequence[str], requested: bool, tally: Tally) -> list[Backend]:
    """Section 1: find the backends and print what was found.

    Parameters
    ----------
    names : sequence of str
        The backends to look for.
    requested : bool
        Whether the user named them with ``--backend``: a requested backend
        that is not available fails instead of being skipped.
    tally : Tally
        Counts the rows.

    Returns
    -------
    list of Backend
        Those that are available.
    """
    backends = [_find(name) for name in names]
    rows = []
    for b in backends:
        if b.status == "ok":
            result = tally.result(True, f"backend {b.name}")
        elif requested:
            result = tally.result(False, f"backend {b.name} ({b.status})") + f" ({b.status})"
        else:
            result = tally.skip(b.status)
        where = str(b.device if b.device is not None else "default") if b.status == "ok" else "-"
        rows.append([b.name, b.version, where, result])
    print_table("1. Backends", ["backend", "version", "device", "result"], rows)
    return [b for b in backends if b.status == "ok"]


# -- the independent reference ---------------------------------------------------


def reference_attention(
    query: np.ndarray, key: np.ndarray, value: np.ndarray, params: dict[str, np.ndarray],
    num_heads: int, *, causal: bool = False, key_padding_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Multi-head attention in float64 NumPy, one head at a time.

    Written independently of mha_xp (no shared code, an explicit loop over
    heads) so that it can serve as the reference.

    Parameters
    ----------
    query : numpy.ndarray, shape (B, L, E)
        Queries, before the input projection.
    key : numpy.ndarray, shape (B, S, E)
        Keys, before the input projection.
    value : numpy.ndarray, shape (B, S, E)
        Values, before the input projection.
    params : dict of str to numpy.ndarray
        The weights under torch's names: ``in_proj_weight`` (3E, E) with rows q, k, v,
        ``in_proj_bias`` (3E,), ``out_proj.weight`` (E, E), ``out_proj.bias`` (E,).
    num_heads : int
        Number of heads H; ``E % H == 0``.
    causal : bool, default False
        Query ``i`` sees keys ``j <= i`` (``L == S``).
    key_padding_mask : numpy.ndarray of bool, shape (B, S), optional
        True marks keys to ignore; every row must keep one key.

    Returns
    -------
    numpy.ndarray, shape (B, L, E)
        The attention output in float64.
    """
    p = {name: np.asarray(w, dtype=np.float64) for name, w in params.items()}
    E = p["out_proj.weight"].shape[0]
    D = E // num_heads
    w, b = p["in_proj_weight"], p["in_proj_bias"]
    q, k, v = (np.asarray(x, dtype=np.float64) @ w[i * E:(i + 1) * E].T + b[i * E:(i + 1) * E]
               for i, x in enumerate((query, key, value)))
    L, S = q.shape[1], k.shape[1]
    hidden = np.zeros((q.shape[0], L, S), dtype=bool)
    if causal:
        hidden |= np.arange(S)[None, None, :] > np.arange(L)[None, :, None]
    if key_padding_mask is not None:
        hidden |= np.asarray(key_padding_mask, dtype=bool)[:, None, :]
    heads = []
    for h in range(num_heads):
        cols = slice(h * D, (h + 1) * D)
        scores = q[..., cols] @ np.swapaxes(k[..., cols], -1, -2) / math.sqrt(D)
        scores = np.where(hidden, -np.inf, scores)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        heads.append((e / e.sum(axis=-1, keepdims=True)) @ v[..., cols])
    out: np.ndarray = np.concatenate(heads, axis=-1) @ p["out_proj.weight"].T + p["out_proj.bias"]
    return out


def rel_error(out: Any, ref: Any) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN if ``out`` holds one)."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(out, dtype=np.float64) - ref) / np.linalg.norm(ref))


@dataclass(frozen=True)
class Problem:
    """The inputs of the correctness rows, with their float64 references."""

    x: np.ndarray
    padding: np.ndarray
    refs: dict[str, np.ndarray]

    @classmethod
    def make(cls, length: int, seed: int) -> Problem:
        """Random self-attention inputs of ``length`` tokens and their references."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((BATCH, length, EMBED_DIM))
        padding = np.zeros((BATCH, length), dtype=bool)
        padding[0, -5:] = True
        padding[1, length // 3:] = True
        layer = mha_xp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, seed=seed)
        params = {name: np.asarray(w) for name, w in layer.state_dict().items()}
        refs = {
            "plain": reference_attention(x, x, x, params, NUM_HEADS),
            "causal": reference_attention(x, x, x, params, NUM_HEADS, causal=True),
            "padding": reference_attention(x, x, x, params, NUM_HEADS, key_padding_mask=padding),
        }
        return cls(x, padding, refs)


# -- 2 and 7: correctness on every backend ----------------------------------------


def correctness_row(b: Backend, dtype_name: str, problem: Problem, seed: int,
                    tally: Tally) -> list[str]:
    """One table row: the layer on ``b`` in ``dtype_name``, three calls."""
    what = f"correctness {b.name} {dtype_name}"
    try:
        layer = mha_xp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, seed=seed, xp=b.xp,
                                          device=b.device, dtype=getattr(b.xp, dtype_name))
        # layer.xp is the array-API-compatible namespace, whose asarray takes
        # device= on every library (raw CuPy's does not).
        x = layer.xp.asarray(problem.x, dtype=layer.dtype, device=layer.device)
        padding = layer.xp.asarray(problem.padding, device=layer.device)
        results = b.compile(lambda x, padding: {
            "plain": layer(x), "causal": layer(x, is_causal=True),
            "padding": layer(x, key_padding_mask=padding)})(x, padding)
        # The promise: the caller's namespace, device and dtype come back.
        kept = all(array_namespace(r) is layer.xp and device_of(r) == device_of(x)
                   and r.dtype == x.dtype and tuple(r.shape) == problem.x.shape
                   for r in results.values())
        errors = {k: rel_error(b.to_numpy(r), problem.refs[k]) for k, r in results.items()}
    except Exception as exc:
        return [b.name, dtype_name, "-", "-", "-", f"{TOLERANCE[dtype_name]:.0e}", "-",
                tally.error(what, exc)]
    ok = kept and all(e <= TOLERANCE[dtype_name] for e in errors.values())
    return [b.name, dtype_name, *(f"{e:.1e}" for e in errors.values()),
            f"{TOLERANCE[dtype_name]:.0e}", "yes" if kept else "NO", tally.result(ok, what)]


def correctness_table(title: str, backends: Sequence[Backend], problem: Problem, seed: int,
                      tally: Tally, progress: Progress, empty: str) -> None:
    """Print the correctness rows of ``backends`` (a skipped row if none)."""
    rows = []
    for i, b in enumerate(backends):
        for dtype_name in DTYPES:
            label = title.split(" on ")[0].split(":")[0]
            progress.show(f"{label}: {b.name} {dtype_name} ({i + 1}/{len(backends)})")
            rows.append(correctness_row(b, dtype_name, problem, seed, tally))
    progress.clear()
    if not rows:
        rows.append(["-", "-", "-", "-", "-", "-", "-", tally.skip(empty)])
    B, L = problem.x.shape[:2]
    print_table(title, ["backend", "dtype", "plain", "causal", "padding", "tolerance",
                        "kept xp/device/dtype", "result"], rows,
                notes=[f"MultiHeadAttention(embed_dim={EMBED_DIM}, num_heads={NUM_HEADS}), "
                       f"B={B}, L={L}, same weights everywhere",
                       "relative error ||out - ref|| / ||ref|| against a float64 NumPy "
                       "reference (explicit loop over heads); JAX rows run under jax.jit"])


# -- 3: parity with torch.nn.MultiheadAttention -------------------------------------


def _torch_outputs(module: Any, torch: ModuleType, x: np.ndarray,
                   padding: np.ndarray) -> dict[str, np.ndarray]:
    """The module's outputs without a mask, causal, and with key padding."""
    xt = torch.from_numpy(x)
    L = x.shape[1]
    # torch's boolean attn_mask marks what may *not* be attended.
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    with torch.no_grad():
        outs = {"plain": module(xt, xt, xt, need_weights=False)[0],
                "causal": module(xt, xt, xt, attn_mask=causal, need_weights=False)[0],
                "padding": module(xt, xt, xt, key_padding_mask=torch.from_numpy(padding),
                                  need_weights=False)[0]}
    return {k: v.numpy() for k, v in outs.items()}


def _median_seconds(call: Callable[[], Any], repeats: int) -> float:
    call()  # warm-up: first-call allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _parity_timing(torch: ModuleType, seed: int, quick: bool, tally: Tally) -> list[str]:
    """Time a port on NumPy against the module itself, float32, a mid-sized call."""
    B, L, E, H = (2, 256, 64, 4) if quick else (4, 512, 128, 8)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = np.random.default_rng(seed + 1).standard_normal((B, L, E)).astype(np.float32)
    layer = mha_xp.MultiHeadAttention.from_torch(module)
    xt = torch.from_numpy(x)
    repeats = 3 if quick else 9
    with torch.no_grad():
        t_torch = _median_seconds(lambda: module(xt, xt, xt, need_weights=False), repeats)
        ref = module(xt, xt, xt, need_weights=False)[0].numpy()
    t_ours = _median_seconds(lambda: layer(x), repeats)
    err = rel_error(layer(x), ref)
    return [f"timing B={B} L={L} E={E} H={H}", "float32", f"{err:.1e}", "-", "-",
            f"{TOLERANCE['float32']:.0e}",
            f"{t_ours * 1e3:.2f} ms / {t_torch * 1e3:.2f} ms = {t_ours / t_torch:.2f}x",
            tally.result(err <= TOLERANCE["float32"], "parity timing")]


def section_parity(torch: ModuleType | None, why_not: str, problem: Problem, seed: int,
                   quick: bool, tally: Tally, progress: Progress) -> None:
    """Section 3: a ported ``torch.nn.MultiheadAttention`` against the module."""
    header = ["case", "dtype", "plain", "causal", "padding", "tolerance",
              "mha_xp (NumPy) / torch", "result"]
    title = "3. Parity with torch.nn.MultiheadAttention (MultiHeadAttention.from_torch)"
    if torch is None:
        print_table(title, header, [["-"] * 7 + [tally.skip(why_not)]])
        return
    progress.show("3. parity with torch")
    with torch.random.fork_rng():  # the module's initialisation leaves torch's RNG as it was
        torch.manual_seed(seed)
        module = torch.nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=True).eval()
    rows = []
    case = f"port B={BATCH} L={problem.x.shape[1]}"
    for dtype_name in DTYPES:
        try:
            m = copy.deepcopy(module).to(getattr(torch, dtype_name))
            layer = mha_xp.MultiHeadAttention.from_torch(m)
            x = problem.x.astype(dtype_name)
            ours = {"plain": layer(x), "causal": layer(x, is_causal=True),
                    "padding": layer(x, key_padding_mask=problem.padding)}
            theirs = _torch_outputs(m, torch, x, problem.padding)
            errors = [rel_error(ours[k], theirs[k]) for k in ours]
            ok = all(e <= TOLERANCE[dtype_name] for e in errors)
            rows.append([case, dtype_name, *(f"{e:.1e}" for e in errors),
                         f"{TOLERANCE[dtype_name]:.0e}", "-",
                         tally.result(ok, f"parity {dtype_name}")])
        except Exception as exc:
            rows.append([case, dtype_name, "-", "-", "-", "-", "-",
                         tally.error(f"parity {dtype_name}", exc)])
    try:
        rows.append(_parity_timing(torch, seed, quick, tally))
    except Exception as exc:
        rows.append(["timing", "float32", "-", "-", "-", "-", "-",
                     tally.error("parity timing", exc)])
    progress.clear()
    print_table(title, header, rows, notes=[
        "relative error of the port against the module's own output (eval, no_grad, "
        "need_weights=False)",
        "timing: median of a few calls, float32, torch's threads as set; indicative only, "
        "not a benchmark (benchmarks/run.py is)"])


# -- 4: a long sequence --------------------------------------------------------------


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _traced_call(call: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``call()``; return its result, seconds and peak extra traced bytes.

    NumPy reports its allocations to ``tracemalloc``, so the peak covers
    every array the call made, from any thread. Tracing someone else started
    (``python -X tracemalloc``) is left running.
    """
    ours = not tracemalloc.is_tracing()
    if ours:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        start = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - start
        return out, seconds, tracemalloc.get_traced_memory()[1] - before
    finally:
        if ours:
            tracemalloc.stop()


def section_long(length: int, seed: int, tally: Tally, progress: Progress) -> None:
    """Section 4: one self-attention call over ``length`` tokens on NumPy, float32.

    Its peak memory is set against the dense ``(B, H, L, S)`` score tensor
    alone; the error is measured on a sample of query rows against the
    float64 reference.
    """
    E, H = 64, 4
    dense = H * length * length * 4
    title = f"4. Long sequence in linear memory (NumPy, float32, E={E}, H={H}, no mask)"
    header = ["L", "dense scores would need", "peak extra memory", "share", "time",
              "rel. error", "tolerance", "result"]
    try:
        layer = mha_xp.MultiHeadAttention(E, H, seed=seed, dtype=np.float32)
        x = np.random.default_rng(seed).standard_normal((1, length, E)).astype(np.float32)
        with progress.ticking(f"4. long sequence: one call, L={length}"):
            # The default budget, passed explicitly so that an environment
            # setting cannot turn this into a dense call of several GiB.
            out, seconds, peak = _traced_call(
                lambda: layer(x, memory_budget=mha_xp.DEFAULT_MEMORY_BUDGET))
        sample = np.unique(np.linspace(0, length - 1, 128).round().astype(int))
        params = {n: np.asarray(w, dtype=np.float64) for n, w in layer.state_dict().items()}
        with progress.ticking(f"4. long sequence: float64 reference on {sample.size} rows"):
            err = rel_error(out[:, sample], reference_attention(x[:, sample], x, x, params, H))
    except Exception as exc:
        print_table(title, header, [[str(length), _mib(dense)] + ["-"] * 5
                                    + [tally.error("long sequence", exc)]])
        return
    ok = err <= TOLERANCE["float32"] and peak < dense / 4 and not np.isnan(out).any()
    print_table(title, header, [[
        str(length), _mib(dense), _mib(peak), f"{100 * peak / dense:.1f} %", f"{seconds:.2f} s",
        f"{err:.1e}", f"{TOLERANCE['float32']:.0e}", tally.result(ok, "long sequence")]],
        notes=["peak: tracemalloc during the call (inputs excluded, output included); "
               "ok below a quarter of the dense score tensor",
               f"error on {sample.size} query rows spread over the sequence against the "
               "float64 reference"])


# -- 5: training without autodiff ----------------------------------------------------


def _loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray,
                    target: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Mean squared error of a causal layer of ``params`` and its gradients."""
    layer = mha_xp.MultiHeadAttention.from_state_dict(params, num_heads=TRAIN_HEADS)
    y, backward = layer.vjp(x, is_causal=True)
    diff = y - target
    return float(np.mean(diff**2)), cast("dict[str, np.ndarray]", backward(2.0 * diff / diff.size))


def _gradient_check(params: dict[str, np.ndarray], x: np.ndarray, target: np.ndarray,
                    seed: int) -> float:
    """Relative gap between vjp's directional derivative and a central difference."""
    rng = np.random.default_rng(seed)
    direction = {n: rng.standard_normal(w.shape) for n, w in params.items()}
    _, grads = _loss_and_grads(params, x, target)
    exact = sum(float(np.sum(grads[n] * direction[n])) for n in params)
    eps = 1e-5

    def loss_at(t: float) -> float:
        return _loss_and_grads({n: w + t * direction[n] for n, w in params.items()}, x, target)[0]

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    return abs(exact - numeric) / abs(numeric)


def section_training(steps: int, seed: int, tally: Tally) -> None:
    """Section 5: fit a tiny layer to a teacher layer's outputs with ``vjp`` and Adam."""
    E, H, B, L = TRAIN_EMBED_DIM, TRAIN_HEADS, 16, 10
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, L, E))
    target = np.asarray(mha_xp.MultiHeadAttention(E, H, seed=seed + 1)(x, is_causal=True))
    params = cast("dict[str, np.ndarray]", mha_xp.MultiHeadAttention(E, H, seed=seed).state_dict())
    rows = []
    try:
        gap = _gradient_check(params, x, target, seed)
        rows.append(["vjp vs central finite difference", f"{gap:.1e}", "<= 1e-06",
                     tally.result(gap <= 1e-6, "gradient check")])
    except Exception as exc:
        rows.append(["vjp vs central finite difference", "-", "<= 1e-06",
                     tally.error("gradient check", exc)])
    try:
        losses = _adam(params, x, target, steps)
        shown = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
        for i in shown[:-1]:
            rows.append([f"loss at step {i + 1}", f"{losses[i]:.2e}", "-", "-"])
        ok = losses[-1] < 0.5 * losses[0]
        rows.append([f"loss at step {steps}", f"{losses[-1]:.2e}",
                     f"< 0.5 x step 1 ({losses[-1] / losses[0]:.2f} x)",
                     tally.result(ok, "training loss")])
    except Exception as exc:
        rows.append(["training", "-", "-", tally.error("training loss", exc)])
    print_table("5. Training without autodiff (MultiHeadAttention.vjp, NumPy float64)",
                ["check", "value", "criterion", "result"], rows,
                notes=[f"a layer (E={E}, H={H}, causal) fitted by Adam to a teacher layer's "
                       f"outputs, B={B}, L={L}, mean squared error"])


def _adam(params: dict[str, np.ndarray], x: np.ndarray, target: np.ndarray,
          steps: int, lr: float = 0.02) -> list[float]:
    """Adam on ``params`` (a copy); return the loss of every step."""
    params = dict(params)
    m = {n: np.zeros_like(w) for n, w in params.items()}
    v = {n: np.zeros_like(w) for n, w in params.items()}
    losses = []
    for step in range(1, steps + 1):
        loss, grads = _loss_and_grads(params, x, target)
        losses.append(loss)
        for n in params:
            m[n] = 0.9 * m[n] + 0.1 * grads[n]
            v[n] = 0.999 * v[n] + 0.001 * grads[n] ** 2
            m_hat, v_hat = m[n] / (1 - 0.9**step), v[n] / (1 - 0.999**step)
            params[n] = params[n] - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    return losses


# -- 6: masks and padding ------------------------------------------------------------


def masks_row(b: Backend, seed: int, tally: Tally) -> list[str]:
    """Fully masked rows, NaN-filled padding keys and a fully padded item on ``b``."""
    rng = np.random.default_rng(seed)
    B, H, L, S, D, pad = 2, 2, 6, 8, 4, 3
    try:
        layer = mha_xp.MultiHeadAttention(H * D, H, seed=seed, xp=b.xp, device=b.device,
                                          dtype=getattr(b.xp, "float32"))
        xp, dev = layer.xp, layer.device

        def put(a: np.ndarray) -> Any:
            return xp.asarray(a, dtype=None if a.dtype == bool else xp.float32, device=dev)

        q, k, v = (rng.standard_normal((B, H, n, D)) for n in (L, S, S))
        mask = np.ones((L, S), dtype=bool)
        mask[2] = False  # query row 2 may attend to nothing
        x, kv = rng.standard_normal((B, L, H * D)), rng.standard_normal((B, S, H * D))
        kv[:, S - pad:] = np.nan  # padding keys and values hold garbage
        padding = np.zeros((B, S), dtype=bool)
        padding[0, S - pad:] = True
        padding[1] = True  # batch item 1 is all padding

        def run(q: Any, k: Any, v: Any, mask: Any, x: Any, kv: Any, padding: Any,
                kept: Any) -> tuple[Any, Any, Any]:
            return (mha_xp.scaled_dot_product_attention(q, k, v, mask=mask),
                    layer(x, kv, kv, key_padding_mask=padding), layer(x, kept, kept))

        arrays = [put(a) for a in (q, k, v, mask, x, kv, padding, kv[:, :S - pad])]
        out, padded, truncated = (b.to_numpy(r) for r in b.compile(run)(*arrays))
    except Exception as exc:
        return [b.name, "-", "-", "-", "-", tally.error(f"masks {b.name}", exc)]
    masked_row = float(np.max(np.abs(out[..., 2, :])))
    gap = rel_error(padded[0], truncated[0])
    all_padded = float(np.max(np.abs(padded[1])))  # the output bias, zero at initialisation
    nans = int(np.isnan(out).sum() + np.isnan(padded).sum())
    ok = masked_row == 0.0 and gap <= TOLERANCE["float32"] and all_padded == 0.0 and nans == 0
    return [b.name, f"{masked_row:.1e}", f"{gap:.1e}", f"{all_padded:.1e}", str(nans),
            tally.result(ok, f"masks {b.name}")]


def section_masks(backends: Sequence[Backend], seed: int, tally: Tally) -> None:
    """Section 6: masked rows and padding give zeros, never NaN, on every backend."""
    rows = [masks_row(b, seed, tally) for b in backends]
    if not rows:
        rows.append(["-"] * 5 + [tally.skip("no backend available")])
    print_table("6. Masks and padding give zeros, not NaN (float32)",
                ["backend", "masked row max|out|", "NaN padding vs truncated",
                 "all-padded max|out|", "NaN count", "result"], rows,
                notes=["masked row: scaled_dot_product_attention, mask= hides every key "
                       "of one query row (expected exactly 0)",
                       "padding: the layer with key_padding_mask= over keys holding NaN, "
                       f"against the call without them (<= {TOLERANCE['float32']:.0e}); "
                       "a fully padded item (expected exactly 0)"])


# -- the program ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (``argparse`` exits with status 2 on a bad one)."""
    parser = argparse.ArgumentParser(
        prog="python -m mha_xp",
        description="Check mha_xp's promises on this machine: correctness against an "
                    "independent float64 reference on every array library found, parity "
                    "with torch.nn.MultiheadAttention, a long sequence in linear memory, "
                    "training without autodiff, masks that give zeros not NaN, and CuPy "
                    "on a GPU.",
        epilog="Exit status: 0 when every check passes, 1 when one fails, 2 for a bad "
               "command line. A backend named with --backend that is not available fails.")
    parser.add_argument("--backend", nargs="+", metavar="NAME", type=_backend_name,
                        help="check only these backends, of: " + ", ".join(BACKENDS)
                             + " (default: all; sections 4-5 need numpy, 3 needs torch)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller problems and fewer steps: a smoke test")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress line on stderr (also off when stderr is not a terminal)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights and inputs (default 0)")
    return parser.parse_args(argv)


def _backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise argparse.ArgumentTypeError(
            f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def _torch_for_parity(backends: Sequence[Backend], selected: Sequence[str]) -> tuple[Any, str]:
    for b in backends:
        if b.name == "torch":
            return b.xp, ""
    return None, "torch not selected" if "torch" not in selected else "torch not installed"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks and print their tables.

    Parameters
    ----------
    argv : sequence of str, optional
        The command-line arguments; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 when no check failed, 1 otherwise.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    progress = Progress(not args.no_progress and sys.stderr.isatty())
    tally = Tally()
    selected = list(dict.fromkeys(args.backend or BACKENDS))
    print(f"mha_xp {mha_xp.__version__}: checking its promises"
          f"{' (quick)' if args.quick else ''}, seed {args.seed}")
    backends = section_backends(selected, args.backend is not None, tally)
    cpu = [b for b in backends if b.name not in GPU_BACKENDS]
    gpu = [b for b in backends if b.name in GPU_BACKENDS]
    problem = Problem.make(32 if args.quick else 64, args.seed)
    guarded("2. Correctness", tally, progress, correctness_table,
            "2. Correctness on the CPU backends", cpu, problem, args.seed, tally, progress,
            "no CPU backend selected")
    guarded("3. Parity with torch", tally, progress, section_parity,
            *_torch_for_parity(backends, selected), problem, args.seed, args.quick, tally,
            progress)
    if "numpy" in selected:
        guarded("4. Long sequence", tally, progress, section_long,
                4096 if args.quick else 16384, args.seed, tally, progress)
        guarded("5. Training without autodiff", tally, progress, section_training,
                20 if args.quick else 60, args.seed, tally)
    else:
        for title in ("4. Long sequence in linear memory", "5. Training without autodiff"):
            print_table(title, ["result"], [[tally.skip("numpy not selected")]])
    guarded("6. Masks and padding", tally, progress, section_masks, backends, args.seed, tally)
    why = "no GPU backend selected" if not set(GPU_BACKENDS) & set(selected) else "no GPU"
    guarded("7. GPU", tally, progress, correctness_table,
            "7. GPU: the correctness rows on CuPy and torch CUDA", gpu, problem, args.seed,
            tally, progress, why)
    return summary(tally, time.perf_counter() - start)


def guarded(title: str, tally: Tally, progress: Progress, run: Callable[..., None],
            *args: Any) -> None:
    """Run one section; an error it did not expect becomes a failed row, not a traceback."""
    try:
        run(*args)
    except Exception as exc:
        progress.clear()
        print_table(title, ["result"], [[tally.error(title, exc)]])


def summary(tally: Tally, seconds: float) -> int:
    """Print the one-line verdict; return the exit status."""
    total = tally.passed + len(tally.failed)
    if tally.failed:
        print(f"\nFAILED: {len(tally.failed)} of {total} checks ({', '.join(tally.failed)}); "
              f"{tally.skipped} skipped, {seconds:.1f} s")
        return 1
    print(f"\nAll {total} checks passed ({tally.skipped} skipped) in {seconds:.1f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
