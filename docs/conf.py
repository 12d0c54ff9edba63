"""Sphinx configuration of the mha_xp documentation.

Build (warnings are errors, as in CI)::

    python -m sphinx -W -b html docs build/docs/html
    python -m sphinx -W -b doctest docs build/docs/doctest

``tests/test_docs.py`` runs both builders, so every example on these pages is
executed by the project's test command.
"""

from __future__ import annotations

import doctest
import os
import sys
from pathlib import Path

# Figures are drawn at build time on a machine with no screen.
os.environ.setdefault("MPLBACKEND", "Agg")

# Document the checkout this file belongs to, not whatever mha_xp happens to
# be installed (CI installs the package, then builds these pages).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mha_xp  # noqa: E402

# -- Project -----------------------------------------------------------------

project = "mha_xp"
author = "the mha_xp developers"
copyright = "the mha_xp developers"
release = mha_xp.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# A reference that does not resolve is a warning, so -W fails the build on it.
nitpicky = True
default_role = "literal"

# -- API reference -------------------------------------------------------------

# The stub pages in api/ are written by hand (one per public name) rather than
# generated into the source tree at build time; a name missing its stub makes
# autosummary warn, and tests/test_docs.py checks the list against __all__.
autosummary_generate = False
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
autodoc_member_order = "bysource"

# Members are listed by autodoc's :members: in api/mha_xp.MultiHeadAttention.rst;
# numpydoc's own member tables would need generated stub pages of their own.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False


# -- Executed examples ---------------------------------------------------------

# Exception messages are compared too (no IGNORE_EXCEPTION_DETAIL): the pages
# quote them, so they must stay true; ``...`` stands for the parts not quoted.
#
# Every ``>>>`` block on these pages, and every docstring example the API
# pages include, runs under ``sphinx-build -b doctest``. The setup below only
# decides which optional-backend blocks to skip; each example imports what it
# uses itself, so it can be copied as it is.
doctest_global_setup = f"""
import importlib.util as _ilu
import pathlib as _pathlib

# The pages' own folder, wherever mha_xp is installed: examples load files
# that ship beside the pages (docs/examples), never from the package's path.
DOCS_DIR = _pathlib.Path({str(Path(__file__).resolve().parent)!r})

def _has_gpu():
    if _ilu.find_spec("cupy") is None:
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False

HAS_GPU = _has_gpu()
HAS_TORCH = _ilu.find_spec("torch") is not None
if HAS_TORCH:
    import torch as _torch
    # The observations on the semantics page were made on torch 2.13, which CI pins.
    TORCH_2_13 = _torch.__version__.startswith("2.13.")
else:
    TORCH_2_13 = False
HAS_STRICT = _ilu.find_spec("array_api_strict") is not None
HAS_TRANSFORMERS = HAS_TORCH and _ilu.find_spec("transformers") is not None
HAS_SAFETENSORS = _ilu.find_spec("safetensors") is not None
HAS_DASK = _ilu.find_spec("dask") is not None and _ilu.find_spec("dask.array") is not None
HAS_DISTRIBUTED = HAS_DASK and _ilu.find_spec("distributed") is not None
HAS_JAX = _ilu.find_spec("jax") is not None
"""
doctest_default_flags = (
    doctest.ELLIPSIS
    | doctest.DONT_ACCEPT_TRUE_FOR_1
    | doctest.NORMALIZE_WHITESPACE
)

# -- Figures -------------------------------------------------------------------

plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]  # one format keeps the build short
plot_pre_code = ""  # each example imports what it uses
plot_rcparams = {"figure.dpi": 110, "savefig.bbox": "tight"}

# -- HTML ----------------------------------------------------------------------

html_theme = "pydata_sphinx_theme"
html_title = f"mha_xp {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
# No left sidebar where it would be empty (pages without subpages); the
# comparison table on the semantics page needs the width.
html_sidebars = {"index": [], "semantics": []}
html_static_path = ["_static"]
html_css_files = ["mha_xp.css"]
html_show_sourcelink = False
