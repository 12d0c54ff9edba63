"""Everything that depends on which array library is at hand, in one place.

The algorithm is written once against the array API standard; what cannot
be (whether a library writes in place, whether reading a value is free,
how much host memory there is, how JAX learns about our containers) is
answered here, and only here (``tests/test_architecture.py`` holds the rule).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from array_api_compat import (
    array_namespace,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_dask_namespace,
    is_jax_array,
    is_numpy_array,
    is_numpy_namespace,
    is_torch_array,
    is_torch_namespace,
)

__all__ = [
    "host_memory_available",
    "host_readable",
    "is_dask",
    "is_plain_numpy",
    "non_strided_layout",
    "register_pytree",
    "writes_in_place",
]


def is_plain_numpy(x: Any) -> bool:
    """Whether ``x`` is exactly a NumPy ndarray (no subclass): the common case,
    for which namespace lookups take a shortcut."""
    return type(x) is np.ndarray


def is_dask(xp: ModuleType) -> bool:
    """Whether ``xp`` is Dask's array namespace (lazy, blocked arrays)."""
    return is_dask_namespace(xp)


def writes_in_place(xp: ModuleType) -> bool:
    """Whether ``xp``'s elementwise functions take ``out=`` (NumPy, CuPy)."""
    return is_numpy_namespace(xp) or is_cupy_namespace(xp)


def host_readable(x: Any) -> bool:
    """Whether reading values of ``x`` is free: an eager array in host memory
    (NumPy, array-api-strict, torch on the CPU), never a GPU, lazy or traced one."""
    if is_numpy_array(x) or is_array_api_strict_namespace(array_namespace(x)):
        return True
    return is_torch_array(x) and x.device.type == "cpu"


def non_strided_layout(x: Any) -> str | None:
    """The layout of a sparse (or otherwise non-strided) torch tensor, else None."""
    if is_torch_array(x) and str(getattr(x, "layout", "torch.strided")) != "torch.strided":
        return str(x.layout)
    return None


def host_memory_available(xp: ModuleType, device: Any) -> int | None:
    """Bytes of memory available to a host-memory backend, or None if unknown.

    Read from ``/proc/meminfo`` (``MemAvailable``) on Linux, for NumPy,
    array-api-strict and torch on the CPU; None for device memory and other
    systems, where the guard does not apply.
    """
    on_host = is_numpy_namespace(xp) or is_array_api_strict_namespace(xp) or (
        is_torch_namespace(xp) and getattr(device, "type", None) == "cpu")
    if not on_host:
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


_registered: set[type] = set()
_register_lock = threading.Lock()


def register_pytree(cls: type, flatten: Callable[[Any], Any], unflatten: Callable[..., Any],
                    like: Any) -> None:
    """Make ``cls`` a JAX pytree when ``like`` is a JAX array (once per class,
    under a lock: JAX refuses a second registration). mha_xp never imports
    JAX itself; this runs only once JAX arrays are in use."""
    if cls in _registered or not is_jax_array(like):
        return
    with _register_lock:
        if cls in _registered:
            return
        import jax

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
        _registered.add(cls)
