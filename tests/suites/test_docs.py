"""The documentation builds with warnings as errors, and every example in it runs.

Two Sphinx builds, each in a subprocess exactly as a person would run them:
``-b html`` (which also draws the figures) and ``-b doctest`` (which executes
every ``>>>`` example on the pages and in the docstrings they include). They
share one doctree cache, so the second build does not parse the sources again.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mha_xp

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None,
    reason="sphinx is not installed (python -m pip install '.[docs]')",
)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs")


def _sphinx(builder: str, build_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sphinx -W -b BUILDER`` on docs/; fail with its output."""
    cmd = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
        "-b", builder, "-d", str(build_dir / "doctrees"),
        str(DOCS), str(build_dir / builder),
    ]
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def test_api_reference_lists_every_public_name():
    """Each public name has its page (autosummary warns, and so fails -W, if a
    listed page is missing; this catches a name that is not listed at all)."""
    index = (DOCS / "api" / "index.rst").read_text(encoding="utf-8")
    listed = set(re.findall(r"^ {3}(\w+)$", index, flags=re.MULTILINE))
    public = set(mha_xp.__all__) - {"__version__"}
    assert public <= listed, f"missing from docs/api/index.rst: {sorted(public - listed)}"
    assert ".. data:: __version__" in index
    for name in public:
        assert (DOCS / "api" / f"mha_xp.{name}.rst").is_file(), name


def test_html_builds_without_warnings(build_dir: Path):
    _sphinx("html", build_dir)
    html = build_dir / "html"
    for page in ("index", "semantics", "api/index", "api/mha_xp.MultiHeadAttention",
                 "user_guide/quickstart", "user_guide/gpu", "user_guide/embedding",
                 "user_guide/porting", "user_guide/weights", "user_guide/chunked",
                 "user_guide/attention_maps"):
        assert (html / f"{page}.html").is_file(), page
    # The attention-map figure was drawn at build time and is on its page.
    images = list((html / "_images").glob("attention_maps-*.png"))
    assert images and all(p.stat().st_size > 10_000 for p in images), images
    assert "attention_maps-1.png" in (html / "user_guide" / "attention_maps.html").read_text(
        encoding="utf-8"
    )


def test_every_example_runs(build_dir: Path):
    _sphinx("doctest", build_dir)
    report = (build_dir / "doctest" / "output.txt").read_text(encoding="utf-8")
    match = re.search(r"^\s*(\d+) tests\n\s*(\d+) failures in tests", report, flags=re.MULTILINE)
    assert match, report
    ran, failed = map(int, match.groups())
    assert failed == 0, report
    # Every page's examples are collected (a page whose blocks stopped being
    # recognised as doctests would silently drop out).
    for page in ("index", "user_guide/quickstart", "user_guide/chunked", "user_guide/weights",
                 "user_guide/attention_maps", "api/mha_xp.scaled_dot_product_attention"):
        assert f"Document: {page}\n" in report, page
    assert ran >= 150, report
