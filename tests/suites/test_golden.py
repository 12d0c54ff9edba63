"""NumPy outputs pinned bit for bit (``tests/support/golden_cases.py``): a
restructuring of the library must not change a single bit of them.

The bits of a matmul depend on the BLAS kernel that computes it, so they are
pinned where NumPy's OpenBLAS runs the kernel the file was written with
(:data:`GOLDEN_KERNEL`); under another kernel (another CPU) the outputs are
held to a relative error of 1e-14 instead, a few units in the last place.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from support.golden_cases import CASES

# The OpenBLAS kernel (threadpoolctl's "architecture") golden.npz was written with.
GOLDEN_KERNEL = "SkylakeX"
GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "golden.npz")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def _blas_kernel() -> str | None:
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", ""):
            return pool.get("architecture")
    return None


@pytest.mark.parametrize("name", sorted(CASES))
def test_bit_identical(golden, name):
    bitwise = _blas_kernel() == GOLDEN_KERNEL
    arrays = CASES[name]()
    stored = sorted((k for k in golden if k.split("/")[0] == name), key=lambda k: int(k.split("/")[1]))
    assert len(arrays) == len(stored), f"{name}: {len(arrays)} arrays, golden file has {len(stored)}"
    for i, (a, key) in enumerate(zip(arrays, stored)):
        want = golden[key]
        assert a.dtype == want.dtype and a.shape == want.shape, (key, a.dtype, a.shape)
        assert np.isfinite(want).all(), key
        if not bitwise:  # another BLAS kernel rounds its matmuls differently
            err = np.linalg.norm((a.astype(np.float64) - want).ravel()) / max(
                np.linalg.norm(want.astype(np.float64).ravel()), np.finfo(np.float64).tiny)
            tol = 1e-14 if want.dtype == np.float64 else 8 * np.finfo(want.dtype).eps
            assert err <= tol, f"{key} changed under the {_blas_kernel()} kernel: relative error {err:.3g}"
            continue
        # Bitwise: array_equal would call -0.0 == 0.0 and ignore NaN payloads.
        assert a.tobytes() == want.tobytes(), f"{key} changed: max abs diff {np.max(np.abs(a.astype(np.float64) - want)):.3g}"
