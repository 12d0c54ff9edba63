"""Tolerances against the float64 reference, and the checks every test shares."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends import Backend

# Relative error ‖out − ref‖ / ‖ref‖ allowed against the float64 reference, per dtype.
# float16 inputs are computed in float32; the bound covers rounding the result to float16.
REL_TOL = {"float16": 2e-3, "float32": 1e-5, "float64": 1e-12}


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "non-finite values in the output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]:.0e} ({dtype})"


def assert_preserved(backend: Backend, x: Any, dtype: str, shape: tuple[int, ...]) -> None:
    """The result has the backend's namespace, device, dtype and the expected shape."""
    from array_api_compat import array_namespace, device

    ref = backend.cxp.empty((1,), dtype=backend.dtype(dtype), device=backend.device)
    assert array_namespace(x) is array_namespace(ref)
    assert device(x) == device(ref)
    assert x.dtype == backend.dtype(dtype)
    assert tuple(x.shape) == shape
