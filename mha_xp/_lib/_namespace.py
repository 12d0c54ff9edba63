"""Namespace, device and dtype helpers shared by the public entry points.

Every public function gets its namespace once, here, and every error a user
sees about namespaces, devices or dtypes is worded here.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import array_api_compat
import array_api_compat.numpy as _compat_numpy
import numpy as _numpy
from array_api_compat import array_namespace, device, is_array_api_obj

from ._backends import is_plain_numpy, non_strided_layout

Array = Any

# NumPy 2.1 and later implement every function of the standard that mha_xp
# calls (``astype`` and ``matrix_transpose`` were the last, in 2.1 and 2.0),
# with the standard's signatures: array-api-compat's wrappers of them
# (``asarray``, ``astype``, ``zeros``, ``matmul``, ``matrix_transpose``,
# ``permute_dims``, ...) only check ``device`` and forward the call, at about
# a microsecond each, which is most of a tiny call's cost.
_NUMPY_IS_STANDARD = _numpy.lib.NumpyVersion(_numpy.__version__) >= "2.1.0"


def compute_namespace(xp: ModuleType) -> ModuleType:
    """The namespace to compute with for the array-API-compatible namespace
    ``xp``: NumPy itself in place of ``array_api_compat.numpy`` where NumPy
    implements the standard (>= 2.1), ``xp`` otherwise.

    The one place that knows the two are interchangeable: the rest of
    mha_xp computes with whichever this returns (array-api-strict and the
    other libraries are unaffected), and the public faces keep showing the
    compat namespace (``layer.xp``)."""
    return _numpy if xp is _compat_numpy and _NUMPY_IS_STANDARD else xp


_PLAIN_NUMPY = compute_namespace(_compat_numpy)


def device_of(x: Array) -> Any:
    """``array_api_compat.device(x)``, with a shortcut for plain NumPy arrays
    (always on ``"cpu"``), for which the general lookup costs a microsecond."""
    return "cpu" if is_plain_numpy(x) else device(x)


def namespace_and_device(x: Array) -> tuple[ModuleType, Any]:
    """The namespace to compute with (:func:`compute_namespace`) and
    ``device(x)``, with a shortcut for plain NumPy arrays (the common case,
    where this lookup is a measurable share of a small call)."""
    if is_plain_numpy(x):
        return _PLAIN_NUMPY, "cpu"
    return compute_namespace(array_namespace(x)), device(x)

__all__ = [
    "Array",
    "common_namespace",
    "compute_dtype",
    "compute_namespace",
    "convert",
    "device_of",
    "dtype_name",
    "lib_name",
    "namespace_and_device",
    "normalize_namespace",
    "require_bool",
    "require_real_floating",
]


def lib_name(xp: ModuleType) -> str:
    """Return the user-facing name of a namespace (``numpy``, ``torch``, ...)."""
    name = getattr(xp, "__name__", None) or repr(xp)
    return name.removeprefix("array_api_compat.")


def _a(name: str) -> str:
    """``name`` with its indefinite article: "a numpy", "an array_api_strict"."""
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def dtype_name(dtype: Any) -> str:
    """Return a short dtype name (``float32`` rather than ``torch.float32``)."""
    if isinstance(dtype, type):  # a scalar type such as np.float32
        return dtype.__name__
    return str(dtype).rsplit(".", 1)[-1]


def normalize_namespace(xp: Any) -> ModuleType:
    """Turn a user-given namespace (``numpy``, ``torch``, ...) into its
    array-API-compatible namespace (``array_api_compat.numpy``, ...)."""
    try:
        return array_namespace(xp.empty((0,)))
    except Exception as exc:  # any failure means "not a usable array library"
        raise TypeError(
            f"xp must be an array API namespace such as numpy, cupy, torch or "
            f"array_api_strict, got {xp!r} (creating an array with it failed: "
            f"{type(exc).__name__}: {exc})"
        ) from exc


def _require_array(name: str, x: Any) -> None:
    """Raise ``TypeError`` unless ``x`` is an array mha_xp can compute with.

    Refused, besides non-arrays (``None``, lists, Python scalars): NumPy
    masked arrays, whose mask every array API function would silently ignore
    (and whose ``matmul`` broadcasts wrongly), and sparse or other non-strided
    torch tensors, which fail deep inside torch on the first reshape.
    """
    if is_plain_numpy(x):  # the common case, and always acceptable
        return
    if x is None or not is_array_api_obj(x) or isinstance(x, (bool, int, float, complex)):
        raise TypeError(
            f"{name} must be an array (numpy, cupy, torch, array_api_strict, ...), "
            f"got {type(x).__name__}"
        )
    if type(x).__module__.startswith("numpy.ma"):
        raise TypeError(
            f"{name} is a NumPy masked array, whose mask mha_xp would ignore: pass "
            f"np.ma.getdata({name}) and say which entries to skip with mask= "
            f"(or the layer's key_padding_mask=)"
        )
    layout = non_strided_layout(x)
    if layout is not None:
        raise TypeError(
            f"{name} is a torch tensor with layout {layout}; mha_xp computes with dense "
            f"(strided) tensors: pass {name}.to_dense()"
        )


def _mismatch(name: str, x_xp: ModuleType, x_dev: Any, first: str | None, xp: ModuleType,
              dev: Any, hint: Any) -> None:
    """Raise the error of :func:`common_namespace` for array ``name`` of
    ``x_xp`` on ``x_dev``, where ``first`` (None: the layer's weights) is
    of ``xp`` on ``dev``; worded only when raised."""
    if first is None:  # checking against a layer
        where_ns = f"the layer's weights are {lib_name(xp)} arrays"
        where_dev = f"the layer's weights are on device {dev}"
        fix = hint() if callable(hint) else hint
    else:
        where_ns = f"{first} is {_a(lib_name(xp))} array"
        where_dev = f"{first} is on device {dev}"
        fix = "pass all arrays from one library, on one device"
    if x_xp is not xp:
        raise TypeError(
            f"{name} is {_a(lib_name(x_xp))} array but {where_ns}; "
            f"mha_xp never converts between array libraries: {fix}"
        )
    raise ValueError(
        f"{name} is on device {x_dev} but {where_dev}; "
        f"mha_xp never moves arrays between devices: {fix}"
    )


def common_namespace(
    expected: tuple[ModuleType, Any, str | Callable[[], str]] | None = None, /,
    **arrays: Array | None
) -> tuple[ModuleType, Any]:
    """Return the namespace and device shared by the named arrays.

    ``None`` entries are skipped. Every array must come from the same library
    and live on the same device; mha_xp never converts or moves user arrays,
    so a mismatch raises an error naming both arguments.

    Parameters
    ----------
    expected : tuple of (namespace, device, hint), optional
        When given (a layer's namespace and device), every array must match
        it; ``hint`` (a string, or a function that makes it, called only for
        an error message) is appended to the error message and says how to
        move the layer.
    **arrays
        The arrays to check, by argument name.

    Returns
    -------
    xp : module
        The namespace to compute with (:func:`compute_namespace` of the
        array-API-compatible one).
    device : object
        The common device.

    Raises
    ------
    TypeError
        If an argument is not an array or the libraries differ.
    ValueError
        If the devices differ.
    """
    xp = dev = first = hint = None
    if expected is not None:
        xp, dev, hint = expected
        xp = compute_namespace(xp)
    for name, x in arrays.items():
        if x is None:
            continue
        _require_array(name, x)
        x_xp, x_dev = namespace_and_device(x)
        if xp is None:
            xp, dev, first = x_xp, x_dev, name
            continue
        # A device of None is unknown, not different: JAX reports None for
        # arrays traced under jax.jit (jax-ml/jax#26000).
        if x_xp is not xp or (x_dev != dev and x_dev is not None and dev is not None):
            _mismatch(name, x_xp, x_dev, first, xp, dev, hint)
    if xp is None:
        raise TypeError("no array was given")
    return xp, dev


def require_real_floating(name: str, x: Array, xp: ModuleType) -> None:
    """Raise ``TypeError`` unless ``x`` is an array with a real floating dtype."""
    _require_array(name, x)
    # NumPy's isdtype parses its arguments in Python; a plain ndarray's
    # kind answers the same question ("f": float16 to longdouble).
    if (x.dtype.kind != "f") if is_plain_numpy(x) else not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, float32 or float64), "
            f"got {dtype_name(x.dtype)}"
        )


def require_bool(name: str, x: Array, xp: ModuleType, meaning: str) -> None:
    """Raise ``TypeError`` unless ``x`` is a boolean array."""
    _require_array(name, x)
    if not xp.isdtype(x.dtype, "bool"):
        raise TypeError(
            f"{name} must be a boolean array ({meaning}), got dtype "
            f"{dtype_name(x.dtype)}; to add a float bias to the scores, pass bias= instead"
        )


def compute_dtype(dtype: Any, xp: ModuleType) -> Any:
    """Dtype the attention is computed in: float32 for 16-bit inputs (softmax
    sums and matmul accumulations overflow float16), the input's otherwise."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def convert(x: Array, xp: ModuleType, dev: Any) -> Array:
    """Bring ``x`` into namespace ``xp`` on device ``dev`` (for explicit
    requests such as ``from_weights(..., xp=...)`` and ``layer.to``).

    An array that already lives there is returned as it is; one that crosses
    libraries is copied, so the result never shares memory with the source
    (a torch module that keeps training must not change a ported layer).
    """
    if is_array_api_obj(x) and array_namespace(x) is xp:
        if dev is None or device(x) == dev:
            return x
        return array_api_compat.to_device(x, dev)
    if hasattr(x, "detach"):  # a torch tensor: leave autograd behind
        x = x.detach()
    try:
        return xp.asarray(x, device=dev, copy=True)
    except Exception:
        pass
    try:
        y = xp.asarray(xp.from_dlpack(x), copy=True)
    except Exception:
        # Last resort, through host memory (e.g. a CUDA tensor to NumPy).
        if hasattr(x, "cpu") and hasattr(x, "numpy"):  # torch
            host = x.cpu().numpy()
        elif hasattr(x, "get"):  # CuPy
            host = x.get()
        else:
            raise TypeError(
                f"cannot convert a {type(x).__module__}.{type(x).__name__} to {lib_name(xp)}"
            ) from None
        return xp.asarray(host, device=dev, copy=True)
    return y if dev is None or device(y) == dev else array_api_compat.to_device(y, dev)
