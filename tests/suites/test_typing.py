"""The shipped type hints hold: mypy passes on the package, with the
configuration of ``pyproject.toml`` ([tool.mypy]), and the public aliases
accept the arrays of every library a user passes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
mypy_api = pytest.importorskip("mypy.api", reason="mypy is a test dependency: pip install '.[test]'")


def _mypy(*args: str) -> tuple[str, int]:
    out, err, status = mypy_api.run(["--config-file", str(ROOT / "pyproject.toml"),
                                     "--no-incremental", *args])
    return out + err, status


def test_package_type_checks() -> None:
    report, status = _mypy(str(ROOT / "mha_xp"))
    assert status == 0, report


def test_public_aliases_accept_numpy_and_torch_arrays(tmp_path: Path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent("""
        import numpy as np
        import mha_xp
        from mha_xp.typing import Array

        def attend(x: Array) -> Array:
            return mha_xp.scaled_dot_product_attention(x, x, x, is_causal=True)

        attend(np.zeros((1, 2, 3, 4)))
        layer = mha_xp.MultiHeadAttention(8, 2, seed=0)
        y = layer(np.zeros((1, 3, 8)))
        y.shape
    """))
    report, status = _mypy(str(user))
    assert status == 0, report


def test_a_type_error_is_caught(tmp_path: Path) -> None:
    user = tmp_path / "wrong.py"
    user.write_text("import mha_xp\nmha_xp.MultiHeadAttention('eight', 2)\n")
    report, status = _mypy(str(user))
    assert status == 1 and "arg-type" in report, report
