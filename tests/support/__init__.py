"""What the tests share, importable as ``support`` (``tests/`` is on
``sys.path`` because ``tests/conftest.py`` is there, in pytest's default
``prepend`` import mode).

``support.backends``
    the backend matrix: ``Backend``, ``make_backend``, ``ALL_BACKENDS``,
    ``FLOAT16_BACKENDS``, ``MHA_XP_BACKENDS`` and ``MHA_XP_REQUIRE``;
``support.assertions``
    ``REL_TOL``, ``rel_err``, ``assert_close``, ``assert_preserved``;
``support.reference``, ``support.reference_variants``
    independent float64 references in plain NumPy;
``support.golden_cases``
    the configurations ``tests/suites/test_golden.py`` pins bit for bit;
``support._hypothesis_profiles``
    Hypothesis budgets (``budget``); imported only by the property tests,
    since importing it loads a Hypothesis profile.

The first two are re-exported here: ``from support import assert_close``.
``tests/conftest.py`` registers this package for pytest's assertion
rewriting, so its ``assert`` statements report their operands.
"""

from .assertions import REL_TOL, assert_close, assert_preserved, rel_err
from .backends import ALL_BACKENDS, FLOAT16_BACKENDS, Backend, make_backend, selected_backends

__all__ = [
    "ALL_BACKENDS",
    "FLOAT16_BACKENDS",
    "REL_TOL",
    "Backend",
    "assert_close",
    "assert_preserved",
    "make_backend",
    "rel_err",
    "selected_backends",
]
