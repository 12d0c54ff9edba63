"""The demo run by ``python -m mha_xp``.

It builds one self-attention layer (``embed_dim=64``, ``num_heads=8``,
``seed=0``) on every array library it finds, runs it on the same random input
in float32 and float64, and prints a table: the relative error of each run
against a float64 reference written here in plain NumPy (an explicit loop over
heads, independent of the library's code), the largest difference from NumPy
in the same dtype, and the median time per call.

The exit status is 0 when every error is within tolerance (float32 ``1e-5``,
float64 ``1e-12``, relative) and 1 otherwise, or when a backend fails.

Importing this module has no side effects: optional libraries (torch, CuPy,
JAX, Dask, array-api-strict) are imported only when :func:`main` runs.
"""

from __future__ import annotations

import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

import mha_xp

__all__ = ["main", "reference_attention"]

BATCH, LENGTH, EMBED_DIM, NUM_HEADS, SEED = 4, 128, 64, 8, 0
DTYPES = ("float32", "float64")
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
WARMUP, REPEATS = 3, 15


@dataclass
class Backend:
    """One place the layer can run: a library on a device.

    Attributes
    ----------
    name : str
        Label in the printed tables.
    xp : module or None
        The library's module (``numpy``, ``torch``, ...); None when unavailable.
    device : object
        Device to build the layer on; None for the library's default.
    version : str
        The library's version, or ``"-"``.
    status : str
        ``"ok"``, or why the backend is skipped (``"not installed"``, ``"no GPU"``).
    to_numpy : callable
        Brings one of the library's arrays back to a NumPy array.
    sync : callable
        Waits for queued device work to finish (a no-op on the CPU).
    finish : callable
        Turns a result into computed data: ``compute()`` for Dask's lazy
        arrays, the identity elsewhere (timed with the call).
    """

    name: str
    xp: ModuleType | None
    device: Any = None
    version: str = "-"
    status: str = "ok"
    to_numpy: Callable[[Any], np.ndarray] = np.asarray
    sync: Callable[[], None] = field(default=lambda: None)
    finish: Callable[[Any], Any] = field(default=lambda result: result)


def _import(name: str) -> tuple[ModuleType | None, str]:
    """Import an optional library; return ``(module or None, status)``."""
    try:
        return importlib.import_module(name), "ok"
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # a broken install (e.g. CUDA libraries missing)
        return None, f"unavailable ({type(exc).__name__}: {exc})"


def find_backends() -> list[Backend]:
    """Return every backend the demo knows about, available or not.

    Returns
    -------
    list of Backend
        NumPy first (always available), then array-api-strict, torch on the
        CPU, torch on CUDA, JAX, Dask and CuPy; unavailable ones carry the
        reason in ``status``.
    """
    backends = [Backend("numpy", np, "cpu", np.__version__)]

    strict, status = _import("array_api_strict")
    backends.append(
        Backend("array_api_strict", strict, None, getattr(strict, "__version__", "-"), status,
                to_numpy=np.from_dlpack)
    )

    torch, status = _import("torch")
    version = getattr(torch, "__version__", "-")

    def torch_to_numpy(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy()

    backends.append(Backend("torch (CPU)", torch, "cpu", version, status, to_numpy=torch_to_numpy))
    if torch is not None and not torch.cuda.is_available():
        status = "no GPU"
    backends.append(
        Backend("torch (CUDA)", torch if status == "ok" else None, "cuda", version, status,
                to_numpy=torch_to_numpy,
                sync=(torch.cuda.synchronize if status == "ok" else lambda: None))
    )

    jnp, status = _import("jax.numpy")
    if jnp is not None:
        import jax

        # The demo compares float64 runs too; JAX computes in float32 unless
        # told otherwise (a process-wide switch, set here by the demo program,
        # never by the library).
        jax.config.update("jax_enable_x64", True)
    backends.append(
        Backend("jax", jnp, None, getattr(sys.modules.get("jax"), "__version__", "-"), status,
                to_numpy=np.asarray,
                finish=lambda result: result.block_until_ready())
    )

    dask_array, status = _import("dask.array")
    backends.append(
        Backend("dask", dask_array, None, getattr(sys.modules.get("dask"), "__version__", "-"),
                status, to_numpy=lambda a: np.asarray(a.compute()),
                finish=lambda result: result.compute())
    )

    cupy, status = _import("cupy")
    if cupy is not None:
        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                status = "no GPU"
        except Exception:  # no driver, or no device: CuPy raises CUDARuntimeError
            status = "no GPU"
    backends.append(
        Backend("cupy", cupy if status == "ok" else None, None, getattr(cupy, "__version__", "-"),
                status, to_numpy=lambda a: a.get(),
                sync=(lambda: cupy.cuda.Device().synchronize()) if status == "ok" else lambda: None)
    )
    return backends


def reference_attention(x: np.ndarray, params: dict[str, np.ndarray], num_heads: int) -> np.ndarray:
    """Multi-head self-attention in float64 NumPy, one head at a time.

    Written independently of mha_xp's implementation (no shared code, an
    explicit loop over heads) so that it can serve as the reference.

    Parameters
    ----------
    x : numpy.ndarray, shape (B, L, E)
        Queries, keys and values (self-attention).
    params : dict of str to numpy.ndarray
        torch's names: ``in_proj_weight`` (3E, E) with rows q, k, v,
        ``in_proj_bias`` (3E,), ``out_proj.weight`` (E, E), ``out_proj.bias`` (E,).
    num_heads : int
        Number of heads H; ``E % H == 0``.

    Returns
    -------
    numpy.ndarray, shape (B, L, E)
        The attention output in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    p = {name: np.asarray(w, dtype=np.float64) for name, w in params.items()}
    E = x.shape[-1]
    D = E // num_heads
    w_in, b_in = p["in_proj_weight"], p["in_proj_bias"]
    q, k, v = (x @ w_in[i * E:(i + 1) * E].T + b_in[i * E:(i + 1) * E] for i in range(3))
    heads = []
    for h in range(num_heads):
        cols = slice(h * D, (h + 1) * D)
        scores = q[..., cols] @ np.swapaxes(k[..., cols], -1, -2) / math.sqrt(D)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        heads.append((e / e.sum(axis=-1, keepdims=True)) @ v[..., cols])
    return np.concatenate(heads, axis=-1) @ p["out_proj.weight"].T + p["out_proj.bias"]


def median_time(call: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Median wall time of ``call()`` in seconds, after a few warm-up calls.

    Parameters
    ----------
    call : callable
        The work to time.
    sync : callable
        Waits for the device to finish; called before every clock read so
        asynchronous GPU launches are not mistaken for finished work.

    Returns
    -------
    float
        The median over ``REPEATS`` timed calls.
    """
    for _ in range(WARMUP):
        call()
    sync()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _format_time(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:8.1f} us"


def main() -> int:
    """Run the demo and print its tables.

    Returns
    -------
    int
        0 when every backend ran and every relative error is within
        tolerance, 1 otherwise.
    """
    rng = np.random.default_rng(SEED)
    x64 = rng.standard_normal((BATCH, LENGTH, EMBED_DIM))  # drawn in float64, cast per run
    layer64 = mha_xp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, seed=SEED)
    params64 = {name: np.asarray(w) for name, w in layer64.state_dict().items()}
    ref = reference_attention(x64, params64, NUM_HEADS)
    ref_norm = float(np.linalg.norm(ref))

    print(f"mha_xp {mha_xp.__version__} demo: self-attention, "
          f"MultiHeadAttention(embed_dim={EMBED_DIM}, num_heads={NUM_HEADS}, seed={SEED})\n")
    backends = find_backends()
    print("Backends")
    for b in backends:
        where = "" if b.status != "ok" else f"device {b.device if b.device is not None else 'default'}"
        shown = b.status if b.status != "ok" else where
        print(f"  {b.name:<18} {b.version:<14} {shown}")

    print("\nShapes")
    print(f"  input  {x64.shape}  (B, L, E)")
    print(f"  output {layer64(x64).shape}  (B, L, E)")
    for name, w in params64.items():
        print(f"  {name:<15} {w.shape}")

    print("\nResults against a float64 NumPy reference (explicit loop over heads)")
    print("  rel. error = ||out - ref|| / ||ref||;"
          "  vs numpy = max|out - out_numpy| / max|out_numpy|, same dtype")
    header = (f"  {'backend':<18} {'dtype':<8} {'rel. error':>10}  {'tolerance':>9}  "
              f"{'vs numpy':>9}  {'median time':>12}  status")
    print(header)
    print("  " + "-" * (len(header) - 2))
    failures = 0
    numpy_out: dict[str, np.ndarray] = {}
    for b in backends:
        if b.status != "ok" or b.xp is None:
            continue
        for dtype_name in DTYPES:
            try:
                layer = mha_xp.MultiHeadAttention(
                    EMBED_DIM, NUM_HEADS, seed=SEED, xp=b.xp, device=b.device,
                    dtype=getattr(b.xp, dtype_name),
                )
                # layer.xp is the array-API-compatible namespace, whose asarray
                # takes device= on every library (raw CuPy's does not).
                x = layer.xp.asarray(x64, dtype=layer.dtype, device=layer.device)
                result = layer(x)
                # The promise: the caller's namespace, device and dtype come back.
                same = (array_namespace(result) is layer.xp and device(result) == device(x)
                        and result.dtype == x.dtype and tuple(result.shape) == x64.shape)
                out = b.to_numpy(result)
                seconds = median_time(lambda: b.finish(layer(x)), b.sync)
            except Exception as exc:
                failures += 1
                print(f"  {b.name:<18} {dtype_name:<8} FAILED: {type(exc).__name__}: {exc}")
                continue
            err = float(np.linalg.norm(out.astype(np.float64) - ref)) / ref_norm
            if b.xp is np:
                numpy_out[dtype_name] = out
            base = numpy_out.get(dtype_name)
            diff = (float(np.max(np.abs(out - base))) / float(np.max(np.abs(base)))
                    if base is not None else math.nan)
            ok = same and err <= TOLERANCE[dtype_name]
            failures += not ok
            status = "ok" if ok else "FAIL" if same else "FAIL (namespace/device/dtype/shape)"
            print(f"  {b.name:<18} {dtype_name:<8} {err:10.2e}  {TOLERANCE[dtype_name]:9.0e}  "
                  f"{diff:9.1e}  {_format_time(seconds):>12}  {status}")

    if failures:
        print(f"\n{failures} run(s) failed or exceeded the tolerance")
        return 1
    print("\nAll runs within tolerance.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
