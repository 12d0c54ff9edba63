"""The demo, ``python -m mha_xp``, runs, exits 0 and reports small errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
# A result row: backend, dtype, relative error, tolerance, difference from numpy, ...
ROW = re.compile(
    r"^ +(?P<backend>\S.*?) +(?P<dtype>float32|float64) +(?P<err>\S+) +\S+ +\S+ +.* (?P<status>ok|FAIL.*)$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    # Run from the repository root so that ``-m mha_xp`` picks up this
    # checkout rather than some installed copy.
    return subprocess.run(
        [sys.executable, "-m", "mha_xp"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )


class TestDemo:
    def test_exits_zero(self, demo: subprocess.CompletedProcess[str]) -> None:
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "Traceback" not in demo.stderr

    def test_lists_backends(self, demo: subprocess.CompletedProcess[str]) -> None:
        backends = demo.stdout.split("Backends", 1)[1].split("Shapes", 1)[0]
        for name in ("numpy", "array_api_strict", "torch (CPU)", "torch (CUDA)", "jax", "dask", "cupy"):
            assert name in backends

    def test_reports_errors_within_tolerance(self, demo: subprocess.CompletedProcess[str]) -> None:
        rows = [m.groupdict() for m in ROW.finditer(demo.stdout)]
        numpy_rows = {r["dtype"]: r for r in rows if r["backend"] == "numpy"}
        assert set(numpy_rows) == {"float32", "float64"}, demo.stdout
        for row in rows:
            err = float(row["err"])  # a NaN would fail the comparison below
            assert 0.0 <= err <= TOLERANCE[row["dtype"]], row
            assert row["status"] == "ok", row
