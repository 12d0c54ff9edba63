"""Hypothesis budgets of the reliability campaign (see docs/reliability.rst).

Every property test asks for its CI budget with ``@budget(n)``: ``n``
generated cases per backend in CI. The profile, chosen with the
``HYPOTHESIS_PROFILE`` environment variable, scales it:

``ci`` (the default)
    ``n`` cases, derandomized (the same cases on every run, so a CI failure
    reproduces exactly), no example database, no deadline.
``thorough``
    ``20 * n`` cases from fresh random seeds, with Hypothesis' example
    database (``.hypothesis/``) so that a failure found once is replayed
    first next time.

Backends that compile or build a graph per new shape (JAX compiles every
operation for every shape it meets; Dask builds and schedules a graph per
call) run a tenth of each budget (``SLOW_BACKENDS``): every property still
runs there on several generated cases, and the full budget runs on the eager
backends, which share all of mha_xp's code with them.

``MHA_XP_HYPOTHESIS_SCALE=100`` overrides the multiplier of either profile,
e.g. ``HYPOTHESIS_PROFILE=thorough MHA_XP_HYPOTHESIS_SCALE=200 python -m pytest
tests/suites/test_properties.py``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

from hypothesis import HealthCheck, settings

# When a property fails, Hypothesis' pytest plugin imports libcst (where it is
# installed) to suggest a patch; with an old mypy_extensions that import emits
# a DeprecationWarning, which the project's filterwarnings = "error" turns into
# an INTERNALERROR hiding the failure itself. Importing it once here, with the
# warning silenced, lets the failure report come through.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(Exception):
        import hypothesis.extra._patching  # noqa: F401

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_SCALE = {"ci": 1, "thorough": 20}

_COMMON = {
    # Array backends warm up (torch's first call, array-api-strict's checks);
    # a per-example deadline would only measure that.
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [
        # The backend fixture is a frozen description of a library, identical
        # for every generated case: sharing it between cases is intended.
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
}
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", **_COMMON)
if PROFILE not in _SCALE:
    raise ValueError(f"HYPOTHESIS_PROFILE must be one of {sorted(_SCALE)}, got {PROFILE!r}")
settings.load_profile(PROFILE)

SCALE = int(os.environ.get("MHA_XP_HYPOTHESIS_SCALE", _SCALE[PROFILE]))


# Backend name -> divisor of the budget (see the module docstring).
SLOW_BACKENDS = {"jax": 10, "dask": 10}


def budget(n: int):
    """Settings for a property with ``n`` cases per backend in CI.

    Decorates a ``@given`` test; a test taking the ``backend`` fixture runs
    ``n // SLOW_BACKENDS[name]`` cases (at least 2) on those backends.
    """

    def decorate(test):
        full = settings(max_examples=max(1, n * SCALE))
        test = full(test)
        reduced = {name: settings(full, max_examples=max(2, n * SCALE // d))
                   for name, d in SLOW_BACKENDS.items()}

        @functools.wraps(test)
        def run(*args, **kwargs):
            backend = kwargs.get("backend")
            # Hypothesis reads the settings from the test at call time.
            test._hypothesis_internal_use_settings = reduced.get(getattr(backend, "name", None), full)
            return test(*args, **kwargs)

        return run

    return decorate
