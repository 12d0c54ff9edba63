"""Fixtures and hooks: the backend matrix (``support.backends``) as fixtures.

``backend`` runs a test on every selected backend, ``backend_f16`` on those
with float16, ``dtype`` in float32 and float64; ``rng`` gives it fresh random
inputs. ``MHA_XP_BACKENDS`` and ``MHA_XP_REQUIRE`` are described in
``support/backends.py``; the helpers tests import are in ``support``.

JAX compiles every operation for every new shape, and Dask builds and
schedules a graph per call: on them the whole suite takes several times as
long as on the eager backends, which share all of mha_xp's code with them.
By default they run the test files of ``SLOW_BACKEND_FILES`` (the core
semantics, the paths, the gradients, the random generator and what is
specific to them), less the cases of ``BUDGET`` that repeat what their
other cases run; ``MHA_XP_FULL_MATRIX=1`` runs every test on them too.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# Before the first import of support, so that its asserts report their operands
# as the test modules' do (pytest rewrites only test files and conftest.py).
pytest.register_assert_rewrite("support")

from support.backends import ALL_BACKENDS, FLOAT16_BACKENDS, Backend, make_backend, selected_backends  # noqa: E402

# Test files whose backend-parametrised tests run on JAX and Dask by default.
SLOW_BACKEND_FILES = {
    "jax": {"test_attention.py", "test_layer.py", "test_chunked.py", "test_backward.py",
            "test_random.py", "test_scaling.py", "test_batched_decoding.py", "test_hf_decoders.py",
            "test_hf_fused.py", "test_sinks.py", "test_modifiers.py"},
    "dask": {"test_attention.py", "test_layer.py", "test_chunked.py", "test_variants.py",
             "test_dropout.py", "test_random.py", "test_regressions.py", "test_scaling.py",
             "test_nonfinite.py", "test_batched_decoding.py", "test_hf_decoders.py",
             "test_hf_fused.py", "test_sinks.py", "test_modifiers.py"},
}


# Within those files, the JAX and Dask cases that repeat what their other
# cases run (another dtype, the other side of a padding, the dense twin of a
# chunked case, which NumPy, array-api-strict and torch run in full): by file,
# (test name prefix or "", parameter, values deselected).
BUDGET = {
    "test_modifiers.py": [("", "dtype", {"float32"}), ("", "chunk", {None}),
                          ("TestBuiltinsAsModifiers", "backend", {"jax"})],
    "test_batched_decoding.py": [("", "dtype", {"float32"}), ("", "side", {"right"})],
}


def _over_budget(item: pytest.Item, backend: str) -> bool:
    """Whether ``item``, a JAX or Dask case, is one that :data:`BUDGET` leaves out."""
    params = item.callspec.params  # type: ignore[attr-defined]
    for prefix, param, values in BUDGET.get(item.path.name, ()):
        if not item.nodeid.split("::", 1)[1].startswith(prefix):
            continue
        if param == "backend" and backend in values:
            return True
        if param in params and params[param] in values:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect JAX and Dask cases outside ``SLOW_BACKEND_FILES``, and those
    ``BUDGET`` leaves out within them (see the module docstring), unless
    ``MHA_XP_FULL_MATRIX=1``."""
    if os.environ.get("MHA_XP_FULL_MATRIX") == "1":
        return
    keep, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = None if callspec is None else callspec.params.get(
            "backend", callspec.params.get("backend_f16"))
        files = SLOW_BACKEND_FILES.get(name) if isinstance(name, str) else None
        if files is not None and (item.path.name not in files or _over_budget(item, name)):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=selected_backends(ALL_BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param)


@pytest.fixture(params=selected_backends(FLOAT16_BACKENDS))
def backend_f16(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param)


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random inputs per test, reproducible from the test's name."""
    return np.random.default_rng(list(request.node.nodeid.encode()))
