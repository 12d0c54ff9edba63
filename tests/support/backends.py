"""The backend matrix: which array libraries the tests run on, and how.

Backends: ``numpy``, ``array_api_strict`` (strictest flags),
``array_api_strict:device1`` (a non-default device: catches arrays created
without ``device=``), ``torch`` (CPU), ``jax`` (``jax.numpy`` on the CPU, with
float64 enabled), ``dask`` (``dask.array``, lazy: inputs are split into two
chunks along their first axis, and every result brought to the host must
still be a lazy Dask array) and ``cupy`` (needs a CUDA device).
``MHA_XP_BACKENDS=numpy,torch`` restricts the run to those;
``MHA_XP_REQUIRE=numpy,torch,...`` turns a missing backend into a failure
instead of a skip (CI sets it, so PyTorch and array-api-strict never skip
silently there).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "array_api_strict", "array_api_strict:device1", "torch", "jax", "dask", "cupy")
FLOAT16_BACKENDS = ("numpy", "torch", "jax", "dask", "cupy")  # the standard has no float16

# The module behind each backend name (before any ":device").
_MODULES = {"jax": "jax.numpy", "dask": "dask.array"}


def selected_backends(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that ``MHA_XP_BACKENDS`` selects (all when unset)."""
    chosen = os.environ.get("MHA_XP_BACKENDS")
    if not chosen:
        return list(names)
    wanted = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = set(wanted) - set(ALL_BACKENDS)
    if unknown:
        raise ValueError(f"MHA_XP_BACKENDS names unknown backends {sorted(unknown)}; known: {ALL_BACKENDS}")
    return [n for n in names if n in wanted]


def _required() -> set[str]:
    return {n.strip() for n in os.environ.get("MHA_XP_REQUIRE", "").split(",") if n.strip()}


def _unavailable(name: str, reason: str) -> None:
    if name in _required():
        pytest.fail(f"backend {name} is required (MHA_XP_REQUIRE) but unavailable: {reason}")
    pytest.skip(f"optional backend {name} unavailable: {reason}")


@dataclass(frozen=True)
class Backend:
    """One array library on one device, with the test-side conversions."""

    name: str
    xp: ModuleType  # the raw module (numpy, torch, array_api_strict, jax.numpy, dask.array, cupy)
    device: Any

    @property
    def cxp(self) -> ModuleType:
        """The array-API-compatible namespace (array_api_compat.<lib>)."""
        from array_api_compat import array_namespace

        return array_namespace(self.xp.empty((0,)))

    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """Host NumPy array to this backend (dtype by name, default a's).

        Dask arrays are split in two chunks along their first axis (when it
        has two entries or more), so that every test also sees more than one
        chunk: batch-chunked inputs, query blocks, key blocks of a mask.
        """
        dt = self.dtype(dtype if dtype is not None else str(a.dtype))
        x = self.cxp.asarray(a, dtype=dt, device=self.device)
        if self.name == "dask" and x.ndim >= 1 and x.shape[0] >= 2:
            x = x.rechunk({0: (x.shape[0] + 1) // 2})
        return x

    def dtype(self, name: str) -> Any:
        # array_api_compat.dask.array names only the standard's dtypes; Dask
        # computes float16 with NumPy's.
        if self.name == "dask" and name == "float16":
            return np.float16
        return getattr(self.cxp, name)

    def to_numpy(self, x: Any) -> np.ndarray:
        """Bring a result to the host (tests only)."""
        if self.name == "cupy":
            return x.get()
        if self.name == "torch":
            return x.detach().cpu().numpy()
        if self.name.startswith("array_api_strict"):
            return np.asarray(self.xp.asarray(x, device=self.xp.Device("CPU_DEVICE")))
        if self.name == "dask":
            # Every result a test inspects must have stayed lazy until here.
            assert isinstance(x, self.xp.Array), f"expected a lazy dask array, got {type(x)}"
            return np.asarray(x.compute())
        if self.name == "jax":
            return np.from_dlpack(x)
        return np.asarray(x)


def make_backend(name: str) -> Backend:
    """The backend ``name`` (one of ``ALL_BACKENDS``); skips the test when its
    library or device is missing, fails it when ``MHA_XP_REQUIRE`` names it."""
    base, _, dev = name.partition(":")
    module_name = _MODULES.get(base, base)
    try:
        xp = importlib.import_module(module_name)
    except ImportError as exc:
        _unavailable(name, f"cannot import {module_name} ({exc})")
    if module_name == "array_api_strict":
        xp.set_array_api_strict_flags(boolean_indexing=False, data_dependent_shapes=False)
        return Backend(name, xp, xp.Device(dev) if dev else None)
    if module_name == "jax.numpy":
        import jax

        # The tests compare float64 results; JAX computes in float32 unless told
        # (a process-wide switch, harmless to the other backends).
        jax.config.update("jax_enable_x64", True)
        return Backend(name, xp, None)
    if module_name == "cupy":
        try:
            count = xp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing
            _unavailable(name, f"no CUDA device ({exc})")
        if count == 0:
            _unavailable(name, "no CUDA device")
        return Backend(name, xp, None)
    return Backend(name, xp, None)
