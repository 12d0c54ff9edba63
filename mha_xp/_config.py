"""The settings: the memory budget, the parallel executor's thread count and
the delegation to native kernels.

No module-level mutable state: each setting's process-wide default comes from
an environment variable (``MHA_XP_MEMORY_BUDGET``, ``MHA_XP_NUM_THREADS``,
``MHA_XP_NATIVE_KERNELS``), a ``with memory_budget(...)`` block (or
``num_threads``, ``native_kernels``) overrides it for the current thread or
task (a ``contextvars`` value), and a call may pass its own value
(``memory_budget=``, ``num_threads=``). All three share one implementation,
:class:`_Setting`.
"""

from __future__ import annotations

import contextvars
import functools
import numbers
import os
import sys
import threading
from typing import Any, ClassVar, Generic, TypeVar

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "blas_controller",
    "get_memory_budget",
    "get_native_kernels",
    "get_num_threads",
    "memory_budget",
    "native_kernels",
    "num_threads",
    "resolve_budget",
    "resolve_num_threads",
]

#: Default budget, in bytes, for the dense score tensor (128 MiB).
DEFAULT_MEMORY_BUDGET = 128 * 2**20

T = TypeVar("T")


class _Setting(Generic[T]):
    """A context-variable setting with an environment-variable default and a
    per-call override; the base of the public ``with`` blocks.

    A subclass names its context variable, environment variable, argument
    name and expected value, and implements ``_valid`` (the value, or None
    when it is not one), ``_parse`` (an environment string to a value) and
    ``_default``. Instances are the ``with`` blocks: immutable, reusable, and
    safe to enter in several threads at once.
    """

    __slots__ = ("_value",)

    # The open blocks of this context, oldest first: an immutable tuple, so
    # that a block's exit removes its own entry wherever it is (see
    # memory_budget's Notes) and other contexts never see the change.
    _open: ClassVar[contextvars.ContextVar[tuple[Any, ...]]]
    _env: ClassVar[str]
    _arg: ClassVar[str]        # the constructor's argument, named in its errors
    _per_call: ClassVar[str]   # the per-call argument, named in its errors
    _expected: ClassVar[str]   # "must be <_expected>, got ..."
    _env_expected: ClassVar[str | None] = None  # the environment's form, if not _expected

    def __init__(self, value: T) -> None:
        self._value = self.check(self._arg, value)

    @staticmethod
    def _valid(value: Any) -> T | None:
        raise NotImplementedError

    @staticmethod
    def _parse(text: str) -> Any:
        return int(text)

    @classmethod
    def _default(cls) -> T:
        raise NotImplementedError

    @classmethod
    def check(cls, name: str, value: Any) -> T:
        """``value`` as the setting's type, or a ``ValueError`` naming ``name``."""
        valid = cls._valid(value)
        if valid is None:
            raise ValueError(f"{name} must be {cls._expected}, got {value!r}")
        return valid

    @classmethod
    def current(cls) -> T:
        """The innermost open block's value, else the environment's, else the default."""
        blocks = cls._open.get()
        if blocks:
            return blocks[-1]._value
        env = os.environ.get(cls._env)
        if env:
            try:
                return cls.check(cls._env, cls._parse(env))
            except ValueError:
                expected = cls._env_expected or cls._expected
                raise ValueError(f"{cls._env} must be {expected}, got {env!r}") from None
        return cls._default()

    @classmethod
    def resolve(cls, per_call: Any) -> T:
        """The value for one call: its own argument, else the one in effect."""
        return cls.current() if per_call is None else cls.check(cls._per_call, per_call)

    def __enter__(self) -> None:
        self._open.set(self._open.get() + (self,))

    def __exit__(self, *exc: object) -> None:
        # Remove this block's entry (the last one of this object: nested uses of
        # one object hold the same value) from this context's open blocks,
        # wherever it is; the others stay as they are. Nothing is kept on the
        # object, so one object may be entered in several threads at once.
        blocks = self._open.get()
        for i in range(len(blocks) - 1, -1, -1):
            if blocks[i] is self:
                self._open.set(blocks[:i] + blocks[i + 1:])
                return

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._value!r})"


def _non_negative_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        return None
    return int(value)


# -- the memory budget -------------------------------------------------------


class memory_budget(_Setting[int]):  # lower case: called like a function, as contextlib's
    """Set the memory budget for the attention calls inside a ``with`` block.

    While the dense ``(..., H, L, S)`` score tensor, in the compute dtype,
    fits the budget, attention takes the dense path; above it, the chunked
    path, whose memory is linear in the sequence length. The setting is local
    to the current thread (or asyncio task) and undone on exit.

    Parameters
    ----------
    nbytes : int
        Budget in bytes; 0 always takes the chunked path.

    Raises
    ------
    ValueError
        If ``nbytes`` is not a non-negative int.

    Notes
    -----
    Every block's setting holds while the block is open, the most recently
    entered open block's winning; a block that exits removes its own setting
    only. Blocks normally exit innermost first, and then this is the usual
    nesting; but blocks held open by generators (``with memory_budget(n):
    yield``) may exit in any order, and then too each exit leaves the other
    open blocks' settings in force, and the last exit leaves none behind (a
    ``contextvars`` token reset out of order would restore a stale value).

    The budget is read when a call is planned, in Python. Under ``jax.jit``
    that is when the function is traced: the compiled function keeps the
    path chosen with the budget of its first trace, whatever budget is in
    effect when it is called again with inputs of the same shapes. To
    choose per call, pass ``memory_budget=`` (or ``chunk_size=``) to the
    attention call and make it a static argument of the jitted function
    (``jax.jit(f, static_argnames="budget")``), or jit one function per
    budget.

    Examples
    --------
    >>> import numpy as np
    >>> import mha_xp
    >>> q = k = v = np.random.default_rng(0).standard_normal((2, 64, 8))
    >>> with mha_xp.memory_budget(0):   # force the chunked path
    ...     out = mha_xp.scaled_dot_product_attention(q, k, v)
    >>> bool(np.allclose(out, mha_xp.scaled_dot_product_attention(q, k, v)))
    True
    """

    __slots__ = ()
    _open = contextvars.ContextVar("mha_xp_memory_budget", default=())
    _env, _arg, _per_call = "MHA_XP_MEMORY_BUDGET", "nbytes", "memory_budget"
    _expected = "a non-negative int number of bytes"
    _valid = staticmethod(_non_negative_int)

    @classmethod
    def _default(cls) -> int:
        return DEFAULT_MEMORY_BUDGET

    @property
    def nbytes(self) -> int:
        """The budget this block sets, in bytes."""
        return self._value


def get_memory_budget() -> int:
    """Return the memory budget in effect, in bytes.

    Returns
    -------
    int
        The innermost :func:`memory_budget` block's value, else the
        ``MHA_XP_MEMORY_BUDGET`` environment variable (bytes), else
        128 MiB.

    Examples
    --------
    >>> import mha_xp
    >>> with mha_xp.memory_budget(2**20):
    ...     mha_xp.get_memory_budget()
    1048576
    """
    return memory_budget.current()


def resolve_budget(per_call: Any) -> int:
    """The budget for one call: its own argument, else the one in effect."""
    return memory_budget.resolve(per_call)


# -- the parallel executor's thread count --------------------------------------


def _positive_int(value: Any) -> int | None:
    valid = _non_negative_int(value)
    return valid if valid else None


def _cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _in_dask_worker() -> bool:
    # Only asked when distributed is already imported: a process that has not
    # imported it cannot be one of its workers, and importing it costs 0.5 s.
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except (ValueError, AttributeError):
        return False
    return True


@functools.cache
def blas_controller() -> Any:
    """threadpoolctl's controller of the BLAS libraries loaded when it is
    first asked for (NumPy's among them, the one the parallel executor
    limits).

    Cached, as the one exception to "no module-level state": finding the
    libraries scans the process's shared objects (0.3 to 0.7 ms measured
    here, twice per call otherwise), while the controller holds no setting
    of its own; it reads and sets the libraries' live thread counts.
    """
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _blas_limit(cpus: int) -> int:
    """The caller's BLAS thread limit (threadpoolctl's view), if below ``cpus``."""
    counts = [lib["num_threads"] for lib in blas_controller().info()]
    return max(1, min([cpus, *counts]))


class num_threads(_Setting[int]):  # lower case: called like a function, as contextlib's
    """Set the number of threads of the parallel CPU executor inside a ``with`` block.

    Large calls on plain NumPy arrays split their work into blocks of
    (batch · head, query rows) and run them on this many threads, with the
    BLAS library held to one thread each for the duration of the call. The
    setting is local to the current thread (or asyncio task) and undone on
    exit; a call may pass ``num_threads=`` instead.

    Parameters
    ----------
    n : int
        The number of threads, at least 1; 1 turns the parallel executor off.

    Raises
    ------
    ValueError
        If ``n`` is not an int of at least 1.

    See Also
    --------
    get_num_threads : The number in effect.

    Notes
    -----
    Without a block, a per-call argument or the ``MHA_XP_NUM_THREADS``
    environment variable, the number is what the caller allows, so that
    mha_xp never oversubscribes the CPUs: the CPUs this process may run on
    (``os.sched_getaffinity``), but 1 inside a Dask worker and in any thread
    other than the main one (a caller's thread pool, a Dask threaded
    scheduler: their threads already share the CPUs), and no more than the
    BLAS threads the caller allows (``threadpoolctl.threadpool_limits``,
    ``OMP_NUM_THREADS`` or ``OPENBLAS_NUM_THREADS``, as threadpoolctl sees
    them). These checks cost about half a millisecond and are made only for
    calls large enough for the executor to be considered. An
    explicit setting is used as given, in any thread; in a thread pool of
    your own, pass it only if that pool leaves CPUs idle.

    Calls on other libraries (torch, JAX, CuPy, Dask), and calls too small
    for threads to pay, are unaffected. Each row takes the serial path's
    operations in its order, so the results are the serial ones to
    rounding: bit for bit where the BLAS library rounds a matrix product
    independently of the matrices' sizes (OpenBLAS's AVX-512 kernel did in
    the tests), within a few units in the last place otherwise (its Haswell
    kernel); and the same bits on every run. See :doc:`../performance`.

    Like the memory budget, the number is read when a call is planned, and
    in an asyncio task or thread it is that context's own.

    Examples
    --------
    >>> import mha_xp
    >>> with mha_xp.num_threads(1):   # serial
    ...     mha_xp.get_num_threads()
    1
    """

    __slots__ = ()
    _open = contextvars.ContextVar("mha_xp_num_threads", default=())
    _env, _arg, _per_call = "MHA_XP_NUM_THREADS", "n", "num_threads"
    _expected = "an int >= 1 (1 turns the parallel executor off)"
    _valid = staticmethod(_positive_int)

    @classmethod
    def _default(cls) -> int:
        cpus = _cpus()
        if cpus == 1 or threading.current_thread() is not threading.main_thread():
            return 1
        if _in_dask_worker():
            return 1
        return _blas_limit(cpus)

    @property
    def n(self) -> int:
        """The number of threads this block sets."""
        return self._value


def get_num_threads() -> int:
    """Return the number of threads the parallel CPU executor uses.

    Returns
    -------
    int
        The innermost :func:`num_threads` block's value, else the
        ``MHA_XP_NUM_THREADS`` environment variable, else what the caller
        allows: the CPUs this process may use, but 1 in a Dask worker or a
        thread other than the main one, and at most a caller's BLAS limit
        (see :func:`num_threads`).

    Examples
    --------
    >>> import mha_xp
    >>> with mha_xp.num_threads(2):
    ...     mha_xp.get_num_threads()
    2
    """
    return num_threads.current()


def resolve_num_threads(per_call: Any) -> int:
    """The thread count for one call: its own argument, else the one in effect."""
    return num_threads.resolve(per_call)


# -- delegation to native kernels ------------------------------------------------


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


class native_kernels(_Setting[bool]):  # lower case: called like a function, as contextlib's
    """Allow or forbid delegation to the array library's own attention kernels.

    With delegation allowed (the default), calls whose semantics a library's
    native kernel reproduces (``torch.nn.functional.scaled_dot_product_attention``,
    ``jax.nn.dot_product_attention``) run on it; forbidden, every call takes
    mha_xp's portable path. The setting is local to the current thread (or
    asyncio task) and undone on exit.

    Parameters
    ----------
    enabled : bool
        True to allow delegation, False to forbid it.

    Raises
    ------
    ValueError
        If ``enabled`` is not a bool.

    See Also
    --------
    get_native_kernels : The setting in effect.

    Notes
    -----
    The ``MHA_XP_NATIVE_KERNELS`` environment variable (``"0"`` or ``"1"``)
    sets the default for the process. Like the memory budget, the setting is
    read when a call is planned (under ``jax.jit``, when it is traced).

    Examples
    --------
    >>> import mha_xp
    >>> with mha_xp.native_kernels(False):   # the portable path only
    ...     mha_xp.get_native_kernels()
    False
    """

    __slots__ = ()
    _open = contextvars.ContextVar("mha_xp_native_kernels", default=())
    _env, _arg, _per_call = "MHA_XP_NATIVE_KERNELS", "enabled", "native_kernels"
    _expected, _env_expected = "a bool", '"0" or "1"'
    _valid = staticmethod(_bool)

    @staticmethod
    def _parse(text: str) -> Any:
        return {"0": False, "1": True}.get(text.strip(), text)

    @classmethod
    def _default(cls) -> bool:
        return True

    @property
    def enabled(self) -> bool:
        """Whether this block allows delegation."""
        return self._value


def get_native_kernels() -> bool:
    """Return whether delegation to the array library's native kernels is allowed.

    Returns
    -------
    bool
        The innermost :func:`native_kernels` block's value, else the
        ``MHA_XP_NATIVE_KERNELS`` environment variable (``"0"`` or ``"1"``),
        else True.

    Examples
    --------
    >>> import mha_xp
    >>> mha_xp.get_native_kernels()
    True
    """
    return native_kernels.current()
