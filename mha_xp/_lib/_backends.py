"""Everything that depends on which array library is at hand, in one place.

The algorithm is written once against the array API standard; what cannot
be (whether a library writes in place, whether reading a value is free,
how much host memory there is, how JAX learns about our containers) is
answered here, and only here (``tests/suites/test_architecture.py`` holds the rule).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

import numpy as np
from array_api_compat import (
    array_namespace,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_dask_namespace,
    is_jax_array,
    is_jax_namespace,
    is_numpy_array,
    is_numpy_namespace,
    is_torch_array,
    is_torch_namespace,
)

__all__ = [
    "host_memory_available",
    "host_readable",
    "block_namespace",
    "is_dask",
    "is_plain_numpy",
    "is_traced",
    "memory_available",
    "native_attention_library",
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


def block_namespace(xp: ModuleType) -> tuple[ModuleType, bool]:
    """The namespace that the blocks of a call of ``xp`` arrays are computed
    in, and whether it is another one: NumPy (array-api-compat's) for Dask,
    whose tasks compute on NumPy chunks; ``xp`` itself otherwise."""
    if is_dask_namespace(xp):
        import array_api_compat.numpy as np_compat

        return np_compat, True
    return xp, False


def writes_in_place(xp: ModuleType) -> bool:
    """Whether ``xp``'s elementwise functions take ``out=`` (NumPy, CuPy)."""
    return is_numpy_namespace(xp) or is_cupy_namespace(xp)


def host_readable(x: Any) -> bool:
    """Whether reading values of ``x`` is free: an eager array in host memory
    (NumPy, array-api-strict, torch on the CPU), never a GPU, lazy or traced one."""
    if is_plain_numpy(x) or is_numpy_array(x) or is_array_api_strict_namespace(array_namespace(x)):
        return True
    return is_torch_array(x) and x.device.type == "cpu"


def native_attention_library(x: Any) -> str | None:
    """Which native attention kernel the library of ``x`` has, where mha_xp
    may delegate to it (:mod:`mha_xp._core._native`): ``"torch"`` for a
    torch tensor in host memory (``torch.nn.functional.
    scaled_dot_product_attention``; on other devices the all-finite check
    that delegation needs is not free), ``"jax"`` for a JAX array, traced or
    not (``jax.nn.dot_product_attention``); None otherwise."""
    if type(x) is np.ndarray:  # the common case, answered first
        return None
    if is_torch_array(x):
        return "torch" if x.device.type == "cpu" else None
    return "jax" if is_jax_array(x) else None


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer (inside ``jax.jit``, ``jax.grad``, ...),
    whose values cannot be read in Python."""
    if not is_jax_array(x):
        return False
    import jax  # already imported: x is a JAX array

    return isinstance(x, jax.core.Tracer)


def non_strided_layout(x: Any) -> str | None:
    """The layout of a sparse (or otherwise non-strided) torch tensor, else None."""
    if is_torch_array(x) and str(getattr(x, "layout", "torch.strided")) != "torch.strided":
        return str(x.layout)
    return None


def _on_host(xp: ModuleType, device: Any) -> bool:
    """Whether arrays of ``xp`` on ``device`` live in host memory: NumPy,
    array-api-strict, torch on the CPU, JAX on a CPU device (``device`` is
    None for arrays traced under ``jax.jit``, which land on the default
    device, jax-ml/jax#26000)."""
    if is_numpy_namespace(xp) or is_array_api_strict_namespace(xp):
        return True
    if is_torch_namespace(xp):
        return getattr(device, "type", None) == "cpu"
    if is_jax_namespace(xp):
        if device is None:
            import jax  # already imported: xp is jax.numpy

            return jax.default_backend() == "cpu"
        return getattr(device, "platform", None) == "cpu"
    return False


def host_memory_available(xp: ModuleType, device: Any) -> int | None:
    """Bytes of memory available to a host-memory backend, or None if unknown.

    For NumPy, array-api-strict, torch on the CPU and JAX on a CPU device:
    the least of what is known (:func:`memory_available`: the system's
    ``MemAvailable``, the process's cgroup limit less its usage, the
    address-space limit less the process's size). None for device memory,
    and where nothing is known, where the guard does not apply.
    """
    return memory_available() if _on_host(xp, device) else None


def memory_available(*, proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup",
                     rlimit_as: int | None = None) -> int | None:
    """The least of the memory limits this process can read, in bytes.

    Parameters
    ----------
    proc, cgroup_root : str
        Where ``/proc`` and the cgroup file systems are mounted (tests point
        them at fake files).
    rlimit_as : int, optional
        The soft ``RLIMIT_AS``; default read with :func:`resource.getrlimit`
        (``resource.RLIM_INFINITY``, -1 on Linux, for none).

    Returns
    -------
    int or None
        The minimum of: ``MemAvailable`` of ``/proc/meminfo``; for the
        cgroup of ``/proc/self/cgroup`` and each of its ancestors, the limit
        less the usage (v2 ``memory.max - memory.current``, v1
        ``memory.limit_in_bytes`` (and ``hierarchical_memory_limit``) less
        ``memory.usage_in_bytes``), the usage without the inactive page
        cache of ``memory.stat``, which the kernel reclaims before it kills
        (the working set, as the kubelet counts it); the soft ``RLIMIT_AS``
        less the virtual size of ``/proc/self/statm``. None when none of them
        is known (not Linux); never negative.
    """
    known = [v for v in (_meminfo_available(os.path.join(proc, "meminfo")),
                         _cgroup_available(os.path.join(proc, "self", "cgroup"), cgroup_root),
                         _address_space_available(os.path.join(proc, "self", "statm"),
                                                  rlimit_as))
             if v is not None]
    return max(0, min(known)) if known else None


def _read_int(path: str) -> int | None:
    """The integer a one-line file holds; None for "max", a missing or
    unreadable file, or the "unlimited" of cgroup v1 (about 2**63)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # "max" (cgroup v2's unlimited) or garbage
    value = int(text)
    return None if value >= _UNLIMITED else value


def _read_keyed(path: str) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``/proc/meminfo``) as ints; a
    missing file or a malformed line gives nothing for it."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return out


def _meminfo_available(path: str) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (in kB there), in bytes."""
    kib = _read_keyed(path).get("MemAvailable")
    return None if kib is None else kib * 1024


# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712
# with 4 KiB pages); anything this large is no limit.
_UNLIMITED = 2**62


def _cgroup_dirs(proc_cgroup: str, cgroup_root: str) -> list[tuple[str, str]]:
    """``(version, directory)`` of the memory cgroup of ``/proc/self/cgroup``
    and its ancestors below the mount, innermost first: the v1 ``memory``
    controller's under ``cgroup_root/memory``, else the v2 unified one's
    under ``cgroup_root``. A path that does not exist there (a container
    without its own cgroup namespace, which sees its cgroup at the mount's
    root) leaves the mount's root alone."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []  # "id:controllers:path"; v2's line is "0::path"
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            found = [("v1", os.path.join(cgroup_root, "memory"), path)]
            break  # a v1 memory controller is the one in charge (hybrid systems)
        if controllers == "" and path:
            found.append(("v2", cgroup_root, path))
    if not found:
        return []
    version, mount, path = found[0]
    mount = os.path.normpath(mount)
    here = os.path.normpath(os.path.join(mount, path.lstrip("/")))
    if os.path.commonpath([mount, here]) != mount or not os.path.isdir(here):
        here = mount  # "/../.." (outside our namespace) or not mounted here
    dirs = [(version, here)]
    while here != mount:
        here = os.path.dirname(here)
        dirs.append((version, here))
    return dirs


def _cgroup_available(proc_cgroup: str, cgroup_root: str) -> int | None:
    """The least ``limit - usage`` over the memory cgroup and its ancestors
    (usage without inactive page cache), or None where no limit is set."""
    least = None
    for version, d in _cgroup_dirs(proc_cgroup, cgroup_root):
        stat = _read_keyed(os.path.join(d, "memory.stat"))
        if version == "v2":
            limit = _read_int(os.path.join(d, "memory.max"))
            usage = _read_int(os.path.join(d, "memory.current"))
            cache = stat.get("inactive_file", 0)
        else:
            limits = [_read_int(os.path.join(d, "memory.limit_in_bytes")),
                      stat.get("hierarchical_memory_limit")]
            limits = [v for v in limits if v is not None and v < _UNLIMITED]
            limit = min(cast("list[int]", limits)) if limits else None
            usage = _read_int(os.path.join(d, "memory.usage_in_bytes"))
            cache = stat.get("total_inactive_file", stat.get("inactive_file", 0))
        if limit is None:
            continue
        left = limit - max(0, (usage or 0) - cache)
        least = left if least is None else min(least, left)
    return least


def _address_space_available(statm: str, rlimit_as: int | None) -> int | None:
    """The soft ``RLIMIT_AS`` less the process's virtual size (the first
    field of ``/proc/self/statm``, in pages), or None without a limit."""
    if rlimit_as is None:
        try:
            import resource
        except ImportError:  # not a Unix
            return None
        rlimit_as = resource.getrlimit(resource.RLIMIT_AS)[0]
        infinity = resource.RLIM_INFINITY
    else:
        infinity = -1
    if rlimit_as == infinity or rlimit_as < 0 or rlimit_as >= _UNLIMITED:
        return None
    try:
        with open(statm) as f:
            pages = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # a limit, but no size to subtract: say nothing rather than guess
    return rlimit_as - pages * os.sysconf("SC_PAGE_SIZE")


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
