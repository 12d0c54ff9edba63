"""Every Python example in the README runs, so none can rot."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def _has_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_example_runs(code):
    if "import cupy" in code and not _has_gpu():
        pytest.skip("optional backend cupy unavailable: needs CuPy and a CUDA device")
    for module in ("dask", "jax"):
        if f"import {module}" in code and importlib.util.find_spec(module) is None:
            pytest.skip(f"optional backend {module} unavailable: pip install {module}")
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
