"""NumPy outputs pinned bit for bit (``tests/support/golden_cases.py``): a
restructuring of the library must not change a single bit of them."""

from __future__ import annotations

import os

import numpy as np
import pytest

from support.golden_cases import CASES

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden", "golden.npz")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bit_identical(golden, name):
    arrays = CASES[name]()
    stored = sorted((k for k in golden if k.split("/")[0] == name), key=lambda k: int(k.split("/")[1]))
    assert len(arrays) == len(stored), f"{name}: {len(arrays)} arrays, golden file has {len(stored)}"
    for i, (a, key) in enumerate(zip(arrays, stored)):
        want = golden[key]
        assert a.dtype == want.dtype and a.shape == want.shape, (key, a.dtype, a.shape)
        assert np.isfinite(want).all(), key
        # Bitwise: array_equal would call -0.0 == 0.0 and ignore NaN payloads.
        assert a.tobytes() == want.tobytes(), f"{key} changed: max abs diff {np.max(np.abs(a.astype(np.float64) - want)):.3g}"
