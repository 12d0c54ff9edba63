"""Weight files: save a layer and load it back, never unpickling.

A file holds the layer's parameters (its :meth:`MultiHeadAttention.state_dict`
under torch's names), its ``num_heads``, and its whole configuration
(:attr:`MultiHeadAttention.config`: every size, flag and option, RoPE, window,
ALiBi, soft-capping, dropout and ``add_zero_attn`` included) as JSON, so that
:func:`load_weights` rebuilds a layer with an equal repr and bit-identical
outputs. Two formats, chosen by the file name when saving and by the file's
first bytes when loading:

- ``.npz`` (always available): a NumPy zip archive with one ``.npy`` member
  per weight, plus a 0-d integer ``num_heads`` and a 0-d unicode
  ``mha_xp_config`` holding the JSON. It is read with ``np.load(...,
  allow_pickle=False)``, so an archive that holds Python objects is refused
  rather than unpickled.
- ``.safetensors`` (needs the optional ``safetensors`` package): the same
  names, with ``num_heads`` and ``mha_xp_config`` in the header's metadata.
  The format stores raw arrays only and cannot run code.

Files without a configuration (written by mha_xp 0.1.0, which stored only the
parameters and ``num_heads``, or a torch state dict saved as it is) still
load: the options that are not parameters are then passed to
:func:`load_weights`.

Loading validates everything through :meth:`MultiHeadAttention.from_state_dict`
on the host first; any problem with the file becomes a ``ValueError`` that
names the file, and a failed load changes nothing (it only ever builds a new
layer). Saving writes to a temporary file beside the target and renames it, so
a failed save never leaves a truncated weight file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import os
import tempfile
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import IO, Any

import numpy as np

from ._checks import check_positive_int
from ._layer import MultiHeadAttention
from ._lib._namespace import dtype_name
from ._model._params import OPTIONS, LayerConfig, check_option_names

__all__ = ["load_weights", "save_weights"]

# The key (npz) or metadata field (safetensors) that records the head count,
# which a torch state_dict does not hold.
_NUM_HEADS = "num_heads"
# The key (npz) or metadata field (safetensors) holding the JSON of the
# layer's configuration, LayerConfig.to_dict().
_CONFIG = "mha_xp_config"
_SUFFIXES = (".npz", ".safetensors")
# Weight dtypes a file may hold: the array API's real floating dtypes that
# NumPy, and so both formats' readers here, represent.
_FLOAT_DTYPES = ("float16", "float32", "float64")

# First bytes of the formats load_weights recognises (and of one it refuses).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive; an empty one
_NPY_MAGIC = b"\x93NUMPY"


def _format_of_name(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"path must end in .npz or .safetensors (the format is chosen by the "
            f"suffix), got {path!r}"
        )
    return suffix[1:]


def _import_safetensors(path: str, doing: str) -> ModuleType:
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError(
            f"{doing} {path!r} needs the optional safetensors package "
            f"(python -m pip install safetensors), which is not importable: {exc}"
        ) from exc
    return safetensors.numpy


@contextlib.contextmanager
def _atomic_write(path: str) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` only once it is complete."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_weights(layer: MultiHeadAttention, path: str | os.PathLike[str]) -> None:
    """Write a layer to an ``.npz`` or ``.safetensors`` file.

    The file holds the arrays of :meth:`MultiHeadAttention.state_dict` under
    torch's names, as NumPy arrays of the layer's dtype, the layer's
    ``num_heads``, and its configuration (:attr:`MultiHeadAttention.config`:
    sizes, flags and every option that is not a parameter, such as
    ``rotary``, ``window``, ``alibi``, ``softcap``, ``add_zero_attn`` and
    ``dropout``); :func:`load_weights` reads it back into a layer with an
    equal repr and bit-identical outputs.

    Parameters
    ----------
    layer : MultiHeadAttention
        The layer to save, in any namespace and on any device (its weights
        are copied to host memory).
    path : str or os.PathLike
        The file to write. Its suffix chooses the format: ``.npz`` (always
        available) or ``.safetensors`` (needs the optional ``safetensors``
        package). An existing file is replaced, and only once the new one
        is complete.

    Raises
    ------
    TypeError
        If ``layer`` is not a :class:`MultiHeadAttention` or ``path`` is not
        a path.
    ValueError
        If ``path`` has another suffix, or the layer's dtype is not float16,
        float32 or float64 (bfloat16, for example, has no NumPy dtype: convert
        the layer with ``layer.to(dtype=...)`` first).
    ImportError
        For a ``.safetensors`` path when the ``safetensors`` package is not
        installed.

    See Also
    --------
    load_weights : Read the file back.
    MultiHeadAttention.state_dict : The arrays that are saved.

    Notes
    -----
    In an ``.npz`` file the head count is a 0-d ``int64`` member named
    ``num_heads`` and the configuration a 0-d unicode member named
    ``mha_xp_config`` holding the JSON of ``layer.config.to_dict()``; in a
    ``.safetensors`` file they are the ``num_heads`` and ``mha_xp_config``
    entries of the header's metadata. ``num_heads`` is written as by mha_xp
    0.1.0, so that older readers still load the parameters (though not the
    options). Both files hold nothing but arrays and text, so loading them
    never runs code.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> import mha_xp
    >>> layer = mha_xp.MultiHeadAttention(16, 4, seed=0)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "attention.npz")
    ...     mha_xp.save_weights(layer, path)
    ...     with np.load(path, allow_pickle=False) as f:   # a plain NumPy archive
    ...         print(sorted(f.files), int(f["num_heads"]))
    ['in_proj_bias', 'in_proj_weight', 'mha_xp_config', 'num_heads', 'out_proj.bias',
     'out_proj.weight'] 4
    """
    if not isinstance(layer, MultiHeadAttention):
        raise TypeError(f"layer must be a mha_xp.MultiHeadAttention, got {type(layer).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):
        path = os.fsdecode(path)
    fmt = _format_of_name(path)
    name = dtype_name(layer.dtype)
    if name not in _FLOAT_DTYPES:
        raise ValueError(
            f"save_weights stores float16, float32 or float64 weights, but the layer's are "
            f"{name}: convert it first, e.g. layer.to(dtype=...float32)"
        )
    host = layer.to(xp=np)
    arrays = {n: np.ascontiguousarray(w) for n, w in host.state_dict().items()}
    config = json.dumps(layer.config.to_dict(), allow_nan=False)
    if fmt == "npz":
        extra = {_NUM_HEADS: np.asarray(layer.num_heads, dtype=np.int64),
                 _CONFIG: np.asarray(config)}  # a unicode array: loads without pickle
        with _atomic_write(path) as f:
            # A file object, so that np.savez adds no ".npz" of its own.
            np.savez(f, **arrays, **extra)
    else:
        st = _import_safetensors(path, "writing")
        data = st.save(arrays, metadata={_NUM_HEADS: str(layer.num_heads), _CONFIG: config})
        with _atomic_write(path) as f:
            f.write(data)


def _sniff(path: str) -> str:
    """The format of the file at ``path`` from its first bytes."""
    with open(path, "rb") as f:  # missing or unreadable files raise OSError here
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "npz"
    if head.startswith(_NPY_MAGIC):
        raise ValueError(
            f"{path!r} is a single .npy array, not a weight file: save the whole layer "
            "with mha_xp.save_weights (or np.savez(path, **layer.state_dict()))"
        )
    # safetensors: an 8-byte little-endian header size, then a JSON object.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "safetensors"
    if not head:
        raise ValueError(f"{path!r} is empty, not a weight file")
    raise ValueError(
        f"{path!r} is neither an .npz archive nor a safetensors file (it starts with "
        f"{head!r}); it may be truncated or corrupt, or of another format "
        "(load_weights never unpickles, so torch.save/pickle files are refused)"
    )


def _read_npz(path: str) -> tuple[dict[str, Any], Any, Any]:
    arrays: dict[str, Any] = {}
    try:
        # Our own file object: np.load leaks the handle it opens when the
        # archive is corrupt (a ResourceWarning), and closes ours with it.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as exc:
                    if "allow_pickle" in str(exc):
                        raise ValueError(
                            f"entry {key!r} holds Python objects, which load_weights "
                            "never unpickles"
                        ) from exc
                    raise
    except MemoryError:
        raise
    except Exception as exc:  # any other failure to parse means a corrupt or foreign file
        raise ValueError(
            f"{path!r} is not a readable .npz weight file (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return arrays, arrays.pop(_NUM_HEADS, None), arrays.pop(_CONFIG, None)


def _read_safetensors(path: str) -> tuple[dict[str, Any], Any, Any]:
    _import_safetensors(path, "reading")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            arrays = {key: np.array(f.get_tensor(key), copy=True) for key in f.keys()}
    except MemoryError:
        raise
    except Exception as exc:  # SafetensorError and friends: a corrupt or foreign file
        raise ValueError(
            f"{path!r} is not a readable safetensors weight file (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return arrays, metadata.get(_NUM_HEADS), metadata.get(_CONFIG)


def _file_num_heads(path: str, raw: Any) -> int | None:
    """The head count a file records (None if it records none)."""
    if raw is None:
        return None
    value: Any = raw
    if isinstance(raw, np.ndarray):
        if raw.shape != () or raw.dtype.kind not in "iu":
            raise ValueError(
                f"{path!r}: num_heads must be a 0-d integer array, got dtype "
                f"{raw.dtype} and shape {raw.shape}"
            )
        value = int(raw)
    elif isinstance(raw, str):
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(
                f"{path!r}: the num_heads metadata must be an integer, got {raw!r}"
            ) from None
    if not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{path!r}: num_heads must be a positive integer, got {raw!r}")
    return int(value)


def _file_config(path: str, raw: Any) -> LayerConfig | None:
    """The layer configuration a file records (None if it records none)."""
    if raw is None:
        return None
    if isinstance(raw, np.ndarray):
        if raw.shape != () or raw.dtype.kind != "U":
            raise ValueError(
                f"{path!r}: {_CONFIG} must be a 0-d unicode array holding JSON, got dtype "
                f"{raw.dtype} and shape {raw.shape}"
            )
        raw = str(raw[()])
    try:
        return LayerConfig.from_dict(json.loads(raw))
    except (TypeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{path!r} holds a malformed layer configuration ({_CONFIG}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _check_config_fits(path: str, config: LayerConfig, weights: LayerConfig) -> None:
    """The sizes and flags of the file's configuration are those of its weights."""
    for field in dataclasses.fields(LayerConfig):
        stored, found = getattr(config, field.name), getattr(weights, field.name)
        if field.name not in OPTIONS and stored != found:
            raise ValueError(
                f"{path!r} is inconsistent (edited or damaged after saving?): its layer "
                f"configuration ({_CONFIG}) has {field.name}={stored!r}, but its weights have "
                f"{field.name}={found!r}"
            )


def _check_options_agree(path: str, config: LayerConfig, options: Mapping[str, Any]) -> None:
    """Options passed to load_weights may repeat the file's values, not change them."""
    for name, given in options.items():
        stored = getattr(config, name)
        # Compare normal forms, so that alibi=True agrees with the standard slopes.
        if getattr(dataclasses.replace(config, **{name: given}), name) != stored:
            raise ValueError(
                f"{path!r} stores {name}={stored!r}, but load_weights was given "
                f"{name}={given!r}: drop {name}= to load the layer as it was saved, or build "
                f"a changed one with MultiHeadAttention.from_state_dict(layer.state_dict(), "
                f"num_heads=..., **options)"
            )


def _check_entries(path: str, arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every entry a floating NumPy array, in native byte order."""
    out = {}
    for key, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise ValueError(
                f"{path!r}: entry {key!r} is not a NumPy array (a foreign zip member?), "
                f"got {type(a).__name__}"
            )
        if a.dtype.kind != "f" or a.dtype.name not in _FLOAT_DTYPES:
            raise ValueError(
                f"{path!r}: entry {key!r} has dtype {a.dtype}; weights must be float16, "
                "float32 or float64"
            )
        out[key] = a.astype(a.dtype.newbyteorder("="), copy=False)
    return out


def load_weights(
    path: str | os.PathLike[str],
    *,
    num_heads: int | None = None,
    xp: ModuleType | None = None,
    device: Any = None,
    **options: Any,
) -> MultiHeadAttention:
    """Build a layer from an ``.npz`` or ``.safetensors`` weight file.

    Reads a file written by :func:`save_weights` (or any ``.npz`` /
    safetensors file holding a torch ``nn.MultiheadAttention`` state dict),
    never unpickling anything, and validates the names, shapes and dtypes of
    its arrays with :meth:`MultiHeadAttention.from_state_dict`. A file written
    by :func:`save_weights` gives back the saved layer: its configuration
    (every option, ``rotary``, ``window``, ``alibi``, ``softcap``,
    ``add_zero_attn``, ``dropout``, ...) comes from the file.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Its format is recognised from its first bytes, whatever its
        suffix.
    num_heads : int, optional
        Number of heads. Needed only for a file that does not record it (a
        torch state dict saved as it is); for one that does, it must agree.
    xp : module, optional
        Namespace of the layer's weights; default NumPy.
    device : optional
        Device of the layer's weights; default the namespace's default device.
    **options
        The options that are not parameters, as in
        :meth:`MultiHeadAttention.from_state_dict` (``add_zero_attn``,
        ``rotary``, ``rotary_base``, ``rotary_interleaved``, ``rotary_dim``,
        ``window``, ``alibi``, ``softcap``, ``dropout``). For a file without a
        configuration (written by mha_xp 0.1.0, or a torch state dict) they
        set the layer's options; for a file with one they may only repeat its
        values (compared in normal form: ``alibi=True`` agrees with the
        standard slopes, ``window=(-1, 0)`` with ``(None, 0)``).

    Returns
    -------
    MultiHeadAttention
        A new layer with the file's weights, dtype and configuration.

    Raises
    ------
    ValueError
        A file that is empty, truncated, corrupt or of another format (a
        ``.npy`` array, a pickle, a ``torch.save`` archive), that holds
        Python objects or non-floating arrays, whose entries are missing,
        unexpected, mis-shaped or of mixed dtypes, or whose configuration is
        malformed or does not fit its weights; a ``num_heads`` that is
        missing, invalid or disagrees with the file's. The message names the
        file and the problem. Also an option that disagrees with the file's
        configuration (the message names the option, the file's value and the
        one given), or an option value its validator refuses.
    TypeError
        A ``path`` that is not a path, a bad ``xp``, an unknown option, or an
        option of the wrong type.
    OSError
        A file that does not exist or cannot be read.
    ImportError
        A safetensors file when the ``safetensors`` package is not installed.

    See Also
    --------
    save_weights : Write such a file.
    MultiHeadAttention.from_state_dict : The validation applied.

    Notes
    -----
    The file is validated on the host (NumPy) before anything is moved to
    ``xp``/``device``, so a bad file fails the same way on every backend.
    Loading builds a new layer and changes no existing one, so an error leaves
    the caller's layer as it was.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> import mha_xp
    >>> layer = mha_xp.MultiHeadAttention(16, 4, kdim=6, vdim=6, rotary=True, seed=0)
    >>> x = np.random.default_rng(1).standard_normal((2, 5, 16))
    >>> kv = np.random.default_rng(2).standard_normal((2, 7, 6))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "attention.npz")
    ...     mha_xp.save_weights(layer, path)
    ...     loaded = mha_xp.load_weights(path)
    >>> loaded.num_heads, loaded.kdim, loaded.config.rotary
    (4, 6, True)
    >>> bool(np.array_equal(loaded(x, kv), layer(x, kv)))
    True

    A file without a configuration (a state dict saved with ``np.savez``)
    takes its options here:

    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "state.npz")
    ...     np.savez(path, **layer.state_dict())
    ...     again = mha_xp.load_weights(path, num_heads=4, rotary=True)
    >>> repr(again) == repr(layer)
    True

    A damaged file gives an error that names it:

    >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +ELLIPSIS
    ...     path = os.path.join(tmp, "attention.npz")
    ...     mha_xp.save_weights(layer, path)
    ...     with open(path, "r+b") as f:
    ...         _ = f.truncate(100)
    ...     mha_xp.load_weights(path)
    Traceback (most recent call last):
    ...
    ValueError: '...attention.npz' is not a readable .npz weight file (truncated or corrupt?): ...
    """
    path = os.fspath(path)
    if not isinstance(path, str):
        path = os.fsdecode(path)
    if num_heads is not None:
        num_heads = check_positive_int("num_heads", num_heads)
    options = check_option_names(options)
    fmt = _sniff(path)
    arrays, raw_heads, raw_config = _read_npz(path) if fmt == "npz" else _read_safetensors(path)
    params = _check_entries(path, arrays)
    in_file = _file_num_heads(path, raw_heads)
    config = _file_config(path, raw_config)
    if config is not None:
        if in_file is not None and in_file != config.num_heads:
            raise ValueError(
                f"{path!r} is inconsistent: it records num_heads={in_file}, but its layer "
                f"configuration ({_CONFIG}) has num_heads={config.num_heads}"
            )
        in_file = config.num_heads
    if in_file is None and num_heads is None:
        raise ValueError(
            f"{path!r} does not record num_heads (not written by mha_xp.save_weights?): "
            "pass num_heads= to load_weights"
        )
    if in_file is not None and num_heads is not None and in_file != num_heads:
        raise ValueError(
            f"{path!r} records num_heads={in_file}, but num_heads={num_heads} was passed"
        )
    heads = in_file if in_file is not None else num_heads
    try:
        layer = MultiHeadAttention.from_state_dict(params, num_heads=heads)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} does not hold valid weights: {exc}") from exc
    if config is not None:
        _check_config_fits(path, config, layer.config)
        _check_options_agree(path, config, options)
        options = config.options()
    if options:
        # The weights are valid and the file's own options fit them: an error
        # here is about an option passed in, and names it.
        layer = MultiHeadAttention.from_state_dict(params, num_heads=heads, **options)
    if xp is not None or device is not None:
        layer = layer.to(xp=xp, device=device)
    return layer
