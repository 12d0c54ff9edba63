"""The backend matrix, dtypes and tolerances every test shares.

Backends: ``numpy``, ``array_api_strict`` (strictest flags),
``array_api_strict:device1`` (a non-default device: catches arrays created
without ``device=``), ``torch`` (CPU), ``jax`` (``jax.numpy`` on the CPU, with
float64 enabled), ``dask`` (``dask.array``, lazy: inputs are split into two
chunks along their first axis, and every result brought to the host must
still be a lazy Dask array) and ``cupy`` (needs a CUDA device).
``MHA_XP_BACKENDS=numpy,torch`` restricts the run to those;
``MHA_XP_REQUIRE=numpy,torch,...`` turns a missing backend into a failure
instead of a skip (CI sets it, so PyTorch and array-api-strict never skip
silently there).

JAX compiles every operation for every new shape, and Dask builds and
schedules a graph per call: on them the whole suite takes several times as
long as on the eager backends, which share all of mha_xp's code with them.
By default they run the test files of ``SLOW_BACKEND_FILES`` (the core
semantics, the paths, the gradients, the random generator and what is
specific to them); ``MHA_XP_FULL_MATRIX=1`` runs every test on them too.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "array_api_strict", "array_api_strict:device1", "torch", "jax", "dask", "cupy")
FLOAT16_BACKENDS = ("numpy", "torch", "jax", "dask", "cupy")  # the standard has no float16

# The module behind each backend name (before any ":device").
_MODULES = {"jax": "jax.numpy", "dask": "dask.array"}

# Relative error ‖out − ref‖ / ‖ref‖ allowed against the float64 reference, per dtype.
# float16 inputs are computed in float32; the bound covers rounding the result to float16.
REL_TOL = {"float16": 2e-3, "float32": 1e-5, "float64": 1e-12}


# Test files whose backend-parametrised tests run on JAX and Dask by default.
SLOW_BACKEND_FILES = {
    "jax": {"test_attention.py", "test_layer.py", "test_chunked.py", "test_backward.py",
            "test_random.py", "test_scaling.py"},
    "dask": {"test_attention.py", "test_layer.py", "test_chunked.py", "test_variants.py",
             "test_dropout.py", "test_random.py", "test_regressions.py", "test_scaling.py"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect JAX and Dask cases outside ``SLOW_BACKEND_FILES`` (see the
    module docstring) unless ``MHA_XP_FULL_MATRIX=1``."""
    if os.environ.get("MHA_XP_FULL_MATRIX") == "1":
        return
    keep, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = None if callspec is None else callspec.params.get(
            "backend", callspec.params.get("backend_f16"))
        files = SLOW_BACKEND_FILES.get(name) if isinstance(name, str) else None
        if files is not None and item.path.name not in files:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _selected(names: tuple[str, ...]) -> list[str]:
    chosen = os.environ.get("MHA_XP_BACKENDS")
    if not chosen:
        return list(names)
    wanted = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = set(wanted) - set(ALL_BACKENDS)
    if unknown:
        raise ValueError(f"MHA_XP_BACKENDS names unknown backends {sorted(unknown)}; known: {ALL_BACKENDS}")
    return [n for n in names if n in wanted]


def _required() -> set[str]:
    return {n.strip() for n in os.environ.get("MHA_XP_REQUIRE", "").split(",") if n.strip()}


def _unavailable(name: str, reason: str) -> None:
    if name in _required():
        pytest.fail(f"backend {name} is required (MHA_XP_REQUIRE) but unavailable: {reason}")
    pytest.skip(f"optional backend {name} unavailable: {reason}")


@dataclass(frozen=True)
class Backend:
    """One array library on one device, with the test-side conversions."""

    name: str
    xp: ModuleType  # the raw module (numpy, torch, array_api_strict, jax.numpy, dask.array, cupy)
    device: Any

    @property
    def cxp(self) -> ModuleType:
        """The array-API-compatible namespace (array_api_compat.<lib>)."""
        from array_api_compat import array_namespace

        return array_namespace(self.xp.empty((0,)))

    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """Host NumPy array to this backend (dtype by name, default a's).

        Dask arrays are split in two chunks along their first axis (when it
        has two entries or more), so that every test also sees more than one
        chunk: batch-chunked inputs, query blocks, key blocks of a mask.
        """
        dt = self.dtype(dtype if dtype is not None else str(a.dtype))
        x = self.cxp.asarray(a, dtype=dt, device=self.device)
        if self.name == "dask" and x.ndim >= 1 and x.shape[0] >= 2:
            x = x.rechunk({0: (x.shape[0] + 1) // 2})
        return x

    def dtype(self, name: str) -> Any:
        # array_api_compat.dask.array names only the standard's dtypes; Dask
        # computes float16 with NumPy's.
        if self.name == "dask" and name == "float16":
            return np.float16
        return getattr(self.cxp, name)

    def to_numpy(self, x: Any) -> np.ndarray:
        """Bring a result to the host (tests only)."""
        if self.name == "cupy":
            return x.get()
        if self.name == "torch":
            return x.detach().cpu().numpy()
        if self.name.startswith("array_api_strict"):
            return np.asarray(self.xp.asarray(x, device=self.xp.Device("CPU_DEVICE")))
        if self.name == "dask":
            # Every result a test inspects must have stayed lazy until here.
            assert isinstance(x, self.xp.Array), f"expected a lazy dask array, got {type(x)}"
            return np.asarray(x.compute())
        if self.name == "jax":
            return np.from_dlpack(x)
        return np.asarray(x)


def make_backend(name: str) -> Backend:
    base, _, dev = name.partition(":")
    module_name = _MODULES.get(base, base)
    try:
        xp = importlib.import_module(module_name)
    except ImportError as exc:
        _unavailable(name, f"cannot import {module_name} ({exc})")
    if module_name == "array_api_strict":
        xp.set_array_api_strict_flags(boolean_indexing=False, data_dependent_shapes=False)
        return Backend(name, xp, xp.Device(dev) if dev else None)
    if module_name == "jax.numpy":
        import jax

        # The tests compare float64 results; JAX computes in float32 unless told
        # (a process-wide switch, harmless to the other backends).
        jax.config.update("jax_enable_x64", True)
        return Backend(name, xp, None)
    if module_name == "cupy":
        try:
            count = xp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing
            _unavailable(name, f"no CUDA device ({exc})")
        if count == 0:
            _unavailable(name, "no CUDA device")
        return Backend(name, xp, None)
    return Backend(name, xp, None)


@pytest.fixture(params=_selected(ALL_BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param)


@pytest.fixture(params=_selected(FLOAT16_BACKENDS))
def backend_f16(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request.param)


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Fresh random inputs per test, reproducible from the test's name."""
    return np.random.default_rng(list(request.node.nodeid.encode()))


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "non-finite values in the output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"relative error {err:.3g} > {REL_TOL[dtype]:.0e} ({dtype})"


def assert_preserved(backend: Backend, x: Any, dtype: str, shape: tuple[int, ...]) -> None:
    """The result has the backend's namespace, device, dtype and the expected shape."""
    from array_api_compat import array_namespace, device

    ref = backend.cxp.empty((1,), dtype=backend.dtype(dtype), device=backend.device)
    assert array_namespace(x) is array_namespace(ref)
    assert device(x) == device(ref)
    assert x.dtype == backend.dtype(dtype)
    assert tuple(x.shape) == shape
