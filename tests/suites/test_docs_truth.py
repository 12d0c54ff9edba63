"""The README and the docs describe the library that exists.

- every public name (``mha_xp.__all__``) appears in the README and in the
  docs' index, so no part of the API is invisible;
- no page says that a public name, or an argument of a public function or of
  the layer, is unsupported: when something becomes supported, the sentence
  that said otherwise must go (this has happened);
- the packaging claims hold: the license file the metadata names exists.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest

import mha_xp

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
INDEX = (ROOT / "docs" / "index.rst").read_text(encoding="utf-8")
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
         for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.rst"))]}
PUBLIC = sorted(set(mha_xp.__all__) - {"__version__"})

# A sentence that denies support ("not supported yet", "unsupported", ...).
DENIAL = re.compile(r"not\s+(?:yet\s+)?supported|unsupported|not\s+implemented|not\s+available\s+yet",
                    re.IGNORECASE)
# Messages quoted from a file reader (a dtype "unsupported" in a weight
# file) are about data, not about the API.
QUOTED_DATA_ERROR = re.compile(r"unsupported dtype", re.IGNORECASE)


def _options() -> set[str]:
    """The keyword arguments of the public functions and of the layer."""
    names: set[str] = set()
    for func in (mha_xp.scaled_dot_product_attention, mha_xp.attention_with_lse,
                 mha_xp.attention_vjp, mha_xp.MultiHeadAttention.__init__,
                 mha_xp.MultiHeadAttention.__call__, mha_xp.MultiHeadAttention.from_torch):
        names |= {p.name for p in inspect.signature(func).parameters.values()
                  if p.name not in {"self", "query", "key", "value"}}
    return names


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?;])\s+|\n\s*\n", text)


@pytest.mark.parametrize("name", PUBLIC)
def test_readme_shows_every_public_name(name: str) -> None:
    assert re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", README), (
        f"README.md never mentions mha_xp.{name}: add it where a reader meets it "
        "(and to its list of public names)")


@pytest.mark.parametrize("name", PUBLIC)
def test_docs_index_lists_every_public_name(name: str) -> None:
    assert re.search(rf"mha_xp\.{re.escape(name)}\b", INDEX), (
        f"docs/index.rst does not list mha_xp.{name} among the public names")


def test_no_page_calls_a_public_name_or_option_unsupported() -> None:
    names = set(PUBLIC) | _options()
    found = []
    for page, text in PAGES.items():
        for sentence in _sentences(text):
            if not DENIAL.search(sentence) or QUOTED_DATA_ERROR.search(sentence):
                continue
            named = sorted(n for n in names if re.search(rf"\b{re.escape(n)}\b", sentence))
            if named:
                found.append(f"{page}: {' '.join(sentence.split())[:160]!r} names {named}")
    assert not found, "pages deny support for what exists:\n" + "\n".join(found)


def test_the_denial_check_catches_a_stale_sentence() -> None:
    stale = "`add_bias_kv`, `add_zero_attn` and dropout are not supported yet: they are refused."
    names = set(PUBLIC) | _options()
    (sentence,) = [s for s in _sentences(stale) if DENIAL.search(s)]
    assert {"add_bias_kv", "add_zero_attn"} <= {n for n in names if re.search(rf"\b{n}\b", sentence)}


def test_license_file_named_by_the_metadata_exists() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "BSD-3-Clause"
    for name in project["license-files"]:
        text = (ROOT / name).read_text(encoding="utf-8")
        assert "BSD 3-Clause License" in text and "Redistribution and use" in text
    assert (ROOT / "CHANGELOG.md").is_file()
