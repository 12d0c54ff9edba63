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
  ``mha_xp_config`` holding the JSON. ``np.load(..., allow_pickle=False)``
  reads it; :func:`load_weights` reads it with its own reader, which never
  unpickles.
- ``.safetensors`` (writing needs the optional ``safetensors`` package;
  reading does not): the same names, with ``num_heads`` and ``mha_xp_config``
  in the header's metadata. The format stores raw arrays only and cannot run
  code. Files of bfloat16 weights (most Hugging Face checkpoints) load too.

Files without a configuration (written by mha_xp 0.1.0, which stored only the
parameters and ``num_heads``, or a torch state dict saved as it is) still
load: the options that are not parameters are then passed to
:func:`load_weights`.

Loading trusts nothing in the file. The archive's directory (npz) or the
header (safetensors) is checked first: member names, dtypes, shapes, and that
the sizes they claim are those of the bytes that are there; then the head
count, the configuration and the shapes against each other; only then is any
array data read, in chunks, so that memory follows the bytes that actually
arrive and never a size the file claims. Any problem with the file becomes a
``ValueError`` that names the file, and a failed load changes nothing (it only
ever builds a new layer). Saving writes to a temporary file beside the target
and renames it over the target, so a failed save never leaves a truncated
weight file behind.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import io
import json
import math
import numbers
import os
import secrets
import stat
import zipfile
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import IO, Any, cast

import numpy as np
from numpy.lib import format as npy_format

from ._checks import check_positive_int
from ._layer import MultiHeadAttention
from ._lib._namespace import dtype_name, normalize_namespace
from ._model._params import (
    OPTIONS,
    LayerConfig,
    check_option_names,
    check_param_names,
    config_from_shapes,
    param_shapes,
)
from .typing import Device, Namespace

__all__ = ["load_weights", "save_weights"]

# The key (npz) or metadata field (safetensors) that records the head count,
# which a torch state_dict does not hold.
_NUM_HEADS = "num_heads"
# The key (npz) or metadata field (safetensors) holding the JSON of the
# layer's configuration, LayerConfig.to_dict().
_CONFIG = "mha_xp_config"
_SUFFIXES = (".npz", ".safetensors")
# Weight dtypes a file may hold: the array API's real floating dtypes that
# NumPy represents (and bfloat16 in a safetensors file, read as float32).
_FLOAT_DTYPES = ("float16", "float32", "float64")

# First bytes of the formats load_weights recognises (and of one it refuses).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive; an empty one
_NPY_MAGIC = b"\x93NUMPY"

# np.load's own limit on an .npy header (its max_header_size): a header
# claiming more is refused before it is read.
_MAX_NPY_HEADER = 10_000
# A configuration is JSON of a few hundred characters (some twenty more per
# head with ALiBi slopes): one claiming millions is damage, refused unread.
_MAX_CONFIG_CHARS = 1 << 22
# The Rust safetensors reader's limit on the header.
_MAX_SAFETENSORS_HEADER = 100_000_000
# Array data is read in pieces of this size, so that memory grows with the
# bytes that arrive, not with the size a (possibly forged) directory claims.
_CHUNK = 1 << 20

# safetensors dtype codes load_weights reads, with the NumPy dtype of their
# bytes (bfloat16: the upper half of a float32, converted on reading) ...
_ST_READ = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}
_ST_NAMES = {"F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16",
             # ... and the names of the ones it refuses, for the message.
             "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
             "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
             "C64": "complex64"}


def _parameter_names() -> frozenset[str]:
    """Every name a state dict can hold: both layouts of the input
    projections and every optional pair (from :func:`param_shapes`, so that
    the list follows the layer)."""
    full = LayerConfig.from_options(2, 1, add_bias_kv=True, normalize_qk=True,
                                    qk_norm_bias=True, sinks=True)
    return frozenset(param_shapes(full, packed=True)) | frozenset(param_shapes(full, packed=False))


_PARAM_NAMES = _parameter_names()


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One weight of a file, as its header describes it; ``read`` gets the
    data (a host NumPy array in native byte order)."""

    shape: tuple[int, ...]
    dtype: str  # the file's dtype, by NumPy name ("bfloat16" for safetensors BF16)
    read: Callable[[], np.ndarray]


def _path_str(path: Any) -> str:
    path = os.fspath(path)
    return path if isinstance(path, str) else os.fsdecode(path)


def _format_of_name(path: str) -> str:
    directory, name = os.path.split(path)
    example = os.path.join(directory, "weights.npz")
    if not name:
        raise ValueError(f"path must name a file, got the directory {path!r}: give a file "
                         f"name, e.g. {example!r}")
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            if len(name) == len(suffix):
                raise ValueError(
                    f"path needs a file name before its {name} suffix, got {path!r}: "
                    f"e.g. {os.path.join(directory, 'weights' + name)!r}"
                )
            return suffix[1:]
    raise ValueError(
        f"path must end in .npz or .safetensors (the format is chosen by the "
        f"suffix), got {path!r}"
    )


def _import_safetensors(path: str, doing: str) -> ModuleType:
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError(
            f"{doing} {path!r} needs the optional safetensors package "
            f"(python -m pip install safetensors), which is not importable: {exc}"
        ) from exc
    return safetensors.numpy


# -- saving ---------------------------------------------------------------------------


def _save_target(path: str) -> tuple[str, int | None]:
    """The file a save replaces (``path`` with symlinks followed, as
    ``open(path, "wb")`` would) and its permission bits (None if it does not
    exist yet)."""
    target = os.path.realpath(path)
    if os.path.islink(target):  # realpath gives up on a cycle of links
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode) & 0o777
    except FileNotFoundError:
        return target, None
    if not os.access(target, os.W_OK):
        # np.savez (open(path, "wb")) fails here too; replacing the file by
        # renaming would bypass the protection its owner asked for.
        raise PermissionError(errno.EACCES, "the file is read-only; save_weights does not "
                              "replace a file it may not write (change its mode first)", path)
    return target, mode


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new hidden file ``.<name>.<random>.tmp`` in ``directory``, opened
    for writing, with the mode a new file gets from ``open()``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        # (A long name is cut, so that the temporary name fits NAME_MAX.)
        tmp = os.path.join(directory, f".{name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            # 0o666 and the kernel applies the umask (and a default ACL), as
            # for open(path, "wb"); mkstemp's fixed 0o600 would not.
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", directory)


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable, where the OS allows it (on
    POSIX the new directory entry is on disk only once the directory is
    synced; Windows cannot open a directory, and some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_write(path: str) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` (a symlink's target) only once it
    is complete and on disk, with the existing file's permission bits."""
    target, mode = _save_target(path)
    directory, name = os.path.split(target)
    fd, tmp = _create_temp(directory, name)
    try:
        if mode is not None:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            else:
                os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:  # also KeyboardInterrupt: no temporary file is left
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


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
        is complete; a symlink is followed, and its target replaced.

    Raises
    ------
    TypeError
        If ``layer`` is not a :class:`MultiHeadAttention` or ``path`` is not
        a path.
    ValueError
        If ``path`` has another suffix, has no file name before the suffix
        (``dir/.npz``) or names a directory, or the layer's dtype is not
        float16, float32 or float64 (bfloat16, for example, has no NumPy
        dtype: convert the layer with ``layer.to(dtype=...)`` first).
    ImportError
        For a ``.safetensors`` path when the ``safetensors`` package is not
        installed.
    OSError
        If the file cannot be written: ``PermissionError`` for an existing
        file the caller may not write (as ``np.savez`` would) or a directory
        where no temporary file can be created; ``OSError`` for a cycle of
        symlinks, a missing directory or a full disk.

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

    The file is written to a hidden temporary file ``.<name>.<random>.tmp``
    in the target's directory (the directory of a symlink's target), flushed
    to disk, and renamed over the target, after which the directory is
    synced where the OS allows it: a reader sees the old file or the new one,
    never part of one, also after a crash. A save that fails with an
    exception (``KeyboardInterrupt`` included) removes its temporary file; a
    process killed outright (``SIGKILL``, power loss) can leave it behind,
    to be deleted by hand. A new file gets the mode ``open()`` gives one
    (``0o666`` less the umask); a replaced file keeps its permission bits,
    though it is a new file: its owner becomes the caller, and other hard
    links to the old file keep the old contents.

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
    path = _path_str(path)
    fmt = _format_of_name(path)
    name = dtype_name(layer.dtype)
    if name not in _FLOAT_DTYPES:
        raise ValueError(
            f"save_weights stores float16, float32 or float64 weights, but the layer's are "
            f"{name}: convert it first, e.g. layer.to(dtype=...float32)"
        )
    host = layer.to(xp=np)
    arrays: dict[str, Any] = {n: np.ascontiguousarray(w) for n, w in host.state_dict().items()}
    config = json.dumps(layer.config.to_dict(), allow_nan=False)
    if fmt == "npz":
        extra: dict[str, Any] = {_NUM_HEADS: np.asarray(layer.num_heads, dtype=np.int64),
                 _CONFIG: np.asarray(config)}  # a unicode array: loads without pickle
        with _atomic_write(path) as f:
            # A file object, so that np.savez adds no ".npz" of its own.
            np.savez(f, **arrays, **extra)
    else:
        st = _import_safetensors(path, "writing")
        data = st.save(arrays, metadata={_NUM_HEADS: str(layer.num_heads), _CONFIG: config})
        with _atomic_write(path) as f:
            f.write(data)


# -- reading: the format --------------------------------------------------------------


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


def _unreadable(path: str, fmt: str, detail: str | BaseException) -> ValueError:
    if isinstance(detail, BaseException):
        detail = f"{type(detail).__name__}: {detail}"
    kind = ".npz" if fmt == "npz" else "safetensors"
    return ValueError(f"{path!r} is not a readable {kind} weight file (truncated or corrupt?): "
                      f"{detail}")


def _unsupported_dtype(path: str, key: str, dtype: str) -> ValueError:
    return ValueError(f"{path!r}: unsupported dtype {dtype} for entry {key!r}; weights must be "
                      "float16, float32 or float64 (or bfloat16 in a safetensors file)")


def _bad_num_heads(path: str, dtype: Any, shape: Any) -> ValueError:
    return ValueError(f"{path!r}: num_heads must be a 0-d integer array, got dtype {dtype} "
                      f"and shape {shape}")


# -- reading: .npz --------------------------------------------------------------------


def _open_zip(path: str, fh: IO[bytes]) -> zipfile.ZipFile:
    """The archive's directory (read from the file's end; no member is read)."""
    try:
        return zipfile.ZipFile(fh)
    except Exception as exc:  # BadZipFile, struct.error, UnicodeDecodeError, ...
        raise _unreadable(path, "npz", exc) from exc


def _npz_members(path: str, z: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The members by entry name, checked from the directory alone: a member
    that does not belong is refused by name, before it is decompressed."""
    names = [info.filename for info in z.infolist()]
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise ValueError(
            f"{path!r} is a torch.save archive (a pickle in a zip), not an .npz weight file: "
            "load_weights never unpickles; save the weights with mha_xp.save_weights, "
            "safetensors.torch.save_file or np.savez instead"
        )
    twice = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if twice:
        # np.load would silently read the last of them.
        raise ValueError(f"{path!r} holds more than one member named {twice} (a damaged or "
                         "hand-built archive): save the layer again")
    members, unexpected = {}, []
    for info in z.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else ""
        if key in _PARAM_NAMES or key in (_NUM_HEADS, _CONFIG):
            members[key] = info
        else:
            unexpected.append(info.filename)
    if unexpected:
        shown = unexpected[:5] + (["..."] if len(unexpected) > 5 else [])
        raise ValueError(
            f"{path!r} holds unexpected member(s) {shown}, refused unread: an .npz weight file "
            f"holds one .npy member per parameter, named as in a torch state dict "
            f"({sorted(_PARAM_NAMES)}), and {_NUM_HEADS}.npy and {_CONFIG}.npy"
        )
    return members


def _member_bytes(path: str, z: zipfile.ZipFile, info: zipfile.ZipInfo,
                  start: int, count: int) -> np.ndarray:
    """Bytes ``start`` to ``start + count`` of a member (a uint8 array),
    fewer where it ends first; reading to its end checks its CRC. Memory is
    allocated up to the archive's real size on disk, and beyond it (a
    compressed member) only as bytes arrive: never for ``count`` or the
    member's claimed size alone."""
    on_disk = os.fstat(z.fp.fileno()).st_size  # type: ignore[union-attr]
    # np.empty, not bytearray: no zero-fill of memory about to be overwritten.
    out = np.empty(min(count, on_disk), dtype=np.uint8)
    try:
        with cast(zipfile.ZipExtFile, z.open(info)) as member:
            if start and len(member.read(start)) < start:  # start: a header, <= 10 kB
                return out[:0]
            got = 0
            with memoryview(cast(Any, out)) as view:
                while got < out.size:
                    n = member.readinto(view[got:got + _CHUNK])
                    if not n:
                        break
                    got += n
            if got < out.size or got == count:
                return out[:got]
            parts = [out]
            while got < count:
                chunk = member.read(min(count - got, _CHUNK))
                if not chunk:
                    break
                parts.append(np.frombuffer(chunk, dtype=np.uint8))
                got += len(chunk)
    except MemoryError:  # a real array too big for this machine: not damage
        raise
    except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError, encryption, ...
        raise _unreadable(path, "npz", f"member {info.filename!r}: {type(exc).__name__}: "
                                       f"{exc}") from exc
    return np.concatenate(parts)


def _npy_header(path: str, z: zipfile.ZipFile,
                info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """The shape, dtype and order an ``.npy`` member claims, and where its
    data starts, from its header alone (at most ``_MAX_NPY_HEADER`` bytes)."""
    def bad(why: str) -> ValueError:
        return _unreadable(path, "npz", f"member {info.filename!r} is not a valid .npy "
                                        f"array: {why}")

    prefix = _member_bytes(path, z, info, 0, 12).tobytes()
    if prefix[:6] != _NPY_MAGIC:
        raise bad(f"it starts with {prefix[:8]!r}, not the .npy magic")
    if len(prefix) < 8:
        raise bad("it ends inside its header")
    version = cast("tuple[int, int]", tuple(prefix[6:8]))  # len(prefix) >= 8
    # Versions 2.0 and 3.0 have a 4-byte header length; 3.0 a UTF-8 header.
    field = {(1, 0): 2, (2, 0): 4, (3, 0): 4}.get(version)
    if field is None:
        raise bad(f"unknown format version {version}")
    if len(prefix) < 8 + field:
        raise bad("it ends inside its header")
    length = int.from_bytes(prefix[8:8 + field], "little")
    start = 8 + field + length
    if length > _MAX_NPY_HEADER or start > info.file_size:
        raise bad(f"its header claims {length} bytes (at most {_MAX_NPY_HEADER}, and within the "
                  f"member's {info.file_size})")
    text = _member_bytes(path, z, info, 8 + field, length).tobytes()
    if len(text) != length:
        raise bad("it ends inside its header")
    if version == (3, 0) and not text.isascii():
        # np.save writes 3.0 only for structured dtypes with non-Latin-1 field
        # names; an ASCII 3.0 header reads as a 2.0 one.
        raise bad("a format 3.0 header with non-ASCII text (a structured dtype)")
    read = npy_format.read_array_header_1_0 if field == 2 else npy_format.read_array_header_2_0
    try:  # a Python literal, parsed with ast.literal_eval (no code runs)
        shape, fortran, dtype = read(io.BytesIO(prefix[8:8 + field] + text),
                                     max_header_size=_MAX_NPY_HEADER)
    except Exception as exc:  # ValueError, SyntaxError, RecursionError, MemoryError
        raise bad(f"{type(exc).__name__}: {exc}") from exc
    if any(n < 0 for n in shape):
        raise bad(f"negative shape {shape}")
    return tuple(shape), dtype, fortran, start


def _check_npz_member(path: str, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """What each member may hold, from its header."""
    if dtype.hasobject:
        raise ValueError(f"{path!r}: entry {key!r} holds Python objects, which load_weights "
                         "never unpickles")
    if key == _NUM_HEADS:
        if shape != () or dtype.kind not in "iu":
            raise _bad_num_heads(path, dtype, shape)
    elif key == _CONFIG:
        if shape != () or dtype.kind != "U" or dtype.itemsize == 0:
            raise ValueError(f"{path!r}: {_CONFIG} must be a 0-d unicode array holding JSON, "
                             f"got dtype {dtype} and shape {shape}")
        if dtype.itemsize // 4 > _MAX_CONFIG_CHARS:
            raise ValueError(f"{path!r}: {_CONFIG} claims {dtype.itemsize // 4} characters, "
                             f"more than a layer configuration ever needs ({_MAX_CONFIG_CHARS}): "
                             "damaged, or not written by mha_xp")
    elif dtype.kind != "f" or dtype.name not in _FLOAT_DTYPES:
        raise _unsupported_dtype(path, key, str(dtype))


def _npz_array(path: str, z: zipfile.ZipFile, info: zipfile.ZipInfo, start: int,
               shape: tuple[int, ...], dtype: np.dtype, fortran: bool) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    data = _member_bytes(path, z, info, start, nbytes)
    if len(data) != nbytes:
        raise _unreadable(path, "npz", f"member {info.filename!r} ends after {len(data)} of "
                                       f"the {nbytes} bytes its header claims")
    a = data.view(dtype)  # no copy
    a = a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
    return a.astype(dtype.newbyteorder("="), copy=False)


def _scan_npz(path: str, z: zipfile.ZipFile) -> tuple[dict[str, _Entry], Any, Any]:
    """The weights (unread), and the head count and configuration (read:
    they are small, and checked to be)."""
    entries = {}
    for key, info in _npz_members(path, z).items():
        shape, dtype, fortran, start = _npy_header(path, z, info)
        _check_npz_member(path, key, shape, dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if start + nbytes != info.file_size:
            raise _unreadable(
                path, "npz", f"member {info.filename!r} claims shape {shape} of {dtype} "
                f"({nbytes} bytes of data), but the archive's directory gives it "
                f"{info.file_size - start} bytes of data")
        read = functools.partial(_npz_array, path, z, info, start, shape, dtype, fortran)
        entries[key] = _Entry(shape, dtype.name, read)
    heads, config = entries.pop(_NUM_HEADS, None), entries.pop(_CONFIG, None)
    return (entries, None if heads is None else int(heads.read()[()]),
            None if config is None else str(config.read()[()]))


# -- reading: safetensors -------------------------------------------------------------


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A JSON reader keeps the last of two equal keys: a second tensor of the
    # same name would silently replace the first.
    counts = collections.Counter(k for k, _ in pairs)
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:
        raise _DuplicateKey(twice)
    return dict(pairs)


def _safetensors_header(path: str, fh: IO[bytes], size: int) -> tuple[dict[str, Any], int]:
    """The header JSON and the offset of the data; its claimed length is
    checked against the file's size before it is read."""
    length = int.from_bytes(fh.read(8), "little")
    if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise _unreadable(path, "safetensors", f"its header claims {length} bytes, but the "
                          f"file has {size - 8} after the length (and at most "
                          f"{_MAX_SAFETENSORS_HEADER} are allowed)")
    raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ValueError(f"{path!r} names {exc.args[0]} more than once in its header (a "
                         "damaged or hand-built file): save the layer again") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError
        raise _unreadable(path, "safetensors", f"its header is not JSON: "
                                               f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise _unreadable(path, "safetensors", f"its header is a JSON {type(header).__name__}, "
                                               "not an object")
    return header, 8 + length


def _is_size(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _safetensors_record(path: str, key: str,
                        record: Any) -> tuple[str, tuple[int, ...], int, int]:
    """Dtype code, shape and data offsets of one header record."""
    shape = record.get("shape") if isinstance(record, dict) else None
    offsets = record.get("data_offsets") if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("dtype"), str)
            # At most NumPy's 64 axes: also keeps math.prod cheap on a hostile shape.
            and isinstance(shape, list) and len(shape) <= 64 and all(_is_size(n) for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(_is_size(n) for n in offsets) and offsets[0] <= offsets[1]):
        raise _unreadable(path, "safetensors", f"entry {key!r} has a malformed header record "
                                               f"{str(record)[:200]}")
    code = record["dtype"]
    if code not in _ST_READ:
        named = f"{code} ({_ST_NAMES[code]})" if code in _ST_NAMES else repr(code)
        raise _unsupported_dtype(path, key, named)
    begin, end = offsets
    nbytes = math.prod(shape) * np.dtype(_ST_READ[code]).itemsize
    if end - begin != nbytes:
        raise _unreadable(path, "safetensors", f"entry {key!r} claims shape {tuple(shape)} of "
                          f"{code} ({nbytes} bytes), but its data_offsets span {end - begin}")
    return code, tuple(shape), begin, end


def _safetensors_array(path: str, fh: IO[bytes], start: int, shape: tuple[int, ...],
                       code: str) -> np.ndarray:
    raw = np.dtype(_ST_READ[code])
    # The size was checked against the file's; np.empty does not zero-fill.
    buf = np.empty(math.prod(shape) * raw.itemsize, dtype=np.uint8)
    fh.seek(start)
    got = 0
    with memoryview(cast(Any, buf)) as view:
        while got < buf.size:
            n = fh.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise _unreadable(path, "safetensors", "the file ended while being read (was "
                                                       "it truncated meanwhile?)")
            got += n
    a = buf.view(raw)
    if code == "BF16":
        # bfloat16 is the upper half of a float32: widening is exact.
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.reshape(shape).astype(a.dtype.newbyteorder("="), copy=False)


def _scan_safetensors(path: str, fh: IO[bytes]) -> tuple[dict[str, _Entry], Any, Any]:
    """The weights (unread) and the metadata's head count and configuration,
    every record checked against the bytes in the file."""
    size = os.fstat(fh.fileno()).st_size
    header, data_start = _safetensors_header(path, fh, size)
    metadata = header.pop("__metadata__", None)  # absent or null: none
    metadata = {} if metadata is None else metadata
    if not (isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise _unreadable(path, "safetensors", "its __metadata__ is not a mapping of strings "
                                               "to strings")
    unexpected = sorted(k for k in header if k not in _PARAM_NAMES)
    if unexpected:
        raise ValueError(
            f"{path!r} holds unexpected entries {unexpected[:5]}, refused unread: a safetensors "
            f"weight file holds the parameters of a torch state dict ({sorted(_PARAM_NAMES)})"
        )
    entries, spans = {}, []
    for key, record in header.items():
        code, shape, begin, end = _safetensors_record(path, key, record)
        spans.append((begin, end, key))
        read = functools.partial(_safetensors_array, path, fh, data_start + begin, shape, code)
        entries[key] = _Entry(shape, _ST_NAMES[code], read)
    # The arrays tile the data exactly, as the Rust reader requires: no gaps,
    # no overlaps, nothing after the last, and nothing past the file's end.
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise _unreadable(path, "safetensors", f"entry {key!r} starts at byte {begin} of "
                              f"the data, expected {at} (overlapping or missing data)")
        at = end
    if at != size - data_start:
        raise _unreadable(path, "safetensors", f"its arrays take {at} bytes, but the file holds "
                          f"{size - data_start} after the header")
    return entries, metadata.get(_NUM_HEADS), metadata.get(_CONFIG)


# -- reading: checks ------------------------------------------------------------------


def _file_num_heads(path: str, raw: Any) -> int | None:
    """The head count a file records (None if it records none)."""
    if raw is None:
        return None
    value: Any = raw
    if isinstance(raw, str):
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(
                f"{path!r}: the num_heads metadata must be an integer, got {raw!r}"
            ) from None
    if not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{path!r}: num_heads must be a positive integer, got {raw!r}")
    return int(value)


def _file_config(path: str, raw: str | None) -> LayerConfig | None:
    """The layer configuration a file records (None if it records none)."""
    if raw is None:
        return None
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


def _file_heads(path: str, in_file: int | None, config: LayerConfig | None,
                num_heads: int | None) -> int:
    """The head count: the file's (which must agree with its configuration
    and with ``num_heads``), or ``num_heads`` for a file without one."""
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
    return in_file if in_file is not None else num_heads  # type: ignore[return-value]


def _check_before_reading(
    path: str, entries: Mapping[str, _Entry], raw_heads: Any, raw_config: Any,
    num_heads: int | None, options: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    """Everything but the array data: names, one dtype, the head count, the
    shapes against it, the configuration against the weights, and the
    options. Returns the head count and the options of the layer."""
    in_file = _file_num_heads(path, raw_heads)
    config = _file_config(path, raw_config)
    shapes = {name: entry.shape for name, entry in entries.items()}
    try:
        check_param_names(shapes)  # first: the names explain most bad files
    except ValueError as exc:
        raise ValueError(f"{path!r} does not hold valid weights: {exc}") from exc
    reference = entries["out_proj.weight"].dtype
    for name, entry in entries.items():
        if entry.dtype != reference:
            # Checked on the file's dtypes: bfloat16 and float32 entries are
            # both float32 once read.
            raise ValueError(f"{path!r} does not hold valid weights: {name} has dtype "
                             f"{entry.dtype} but out_proj.weight has {reference}; all "
                             "weights must share one dtype")
    heads = _file_heads(path, in_file, config, num_heads)
    try:
        weights = config_from_shapes(shapes, heads)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} does not hold valid weights: {exc}") from exc
    if config is None:
        if options:  # an option's own error, worded as the constructor words it
            config_from_shapes(shapes, heads, **options)
        return heads, options
    _check_config_fits(path, config, weights)
    _check_options_agree(path, config, options)
    return heads, config.options()


def _read_weight_file(
    path: str, num_heads: int | None, options: dict[str, Any],
) -> tuple[dict[str, np.ndarray], int, dict[str, Any], str]:
    """The file's weights, head count, layer options and dtype name, every
    check that needs no array data done before any is read."""
    fmt = _sniff(path)
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(open(path, "rb"))
        if fmt == "npz":
            z = stack.enter_context(_open_zip(path, fh))
            entries, raw_heads, raw_config = _scan_npz(path, z)
        else:
            entries, raw_heads, raw_config = _scan_safetensors(path, fh)
        heads, options = _check_before_reading(path, entries, raw_heads, raw_config,
                                               num_heads, options)
        params = {name: entry.read() for name, entry in entries.items()}
    return params, heads, options, entries["out_proj.weight"].dtype


def load_weights(
    path: str | os.PathLike[str],
    *,
    num_heads: int | None = None,
    xp: Namespace | None = None,
    device: Device | None = None,
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
        A new layer with the file's weights, dtype and configuration. A
        safetensors file of bfloat16 weights gives a bfloat16 layer where the
        namespace has that dtype (``xp=torch``, ``xp=jax.numpy``), and a
        float32 layer elsewhere (NumPy, the default, has no bfloat16); the
        widening to float32 is exact.

    Raises
    ------
    ValueError
        A file that is empty, truncated, corrupt or of another format (a
        ``.npy`` array, a pickle, a ``torch.save`` archive); an ``.npz``
        archive with a member that is not one of the expected ``.npy``
        arrays (refused by name, unread), two members of one name, a member
        whose header is damaged or claims more or fewer bytes than the
        member holds, or one that holds Python objects; a safetensors file
        whose header is not JSON, names an entry twice, or claims offsets
        that do not tile the file's data; an entry of a dtype other than
        float16, float32, float64 (or bfloat16 in safetensors), such as an
        integer or float8 one (``unsupported dtype``); entries that are
        missing, unexpected, mis-shaped or of mixed dtypes; a configuration
        that is malformed or does not fit the weights; a ``num_heads`` that is
        missing, invalid or disagrees with the file's. The message names the
        file and the problem. Also an option that disagrees with the file's
        configuration (the message names the option, the file's value and the
        one given), or an option value its validator refuses.
    TypeError
        A ``path`` that is not a path, a bad ``xp``, an unknown option, or an
        option of the wrong type.
    OSError
        A file that does not exist or cannot be read.

    See Also
    --------
    save_weights : Write such a file.
    MultiHeadAttention.from_state_dict : The validation applied.

    Notes
    -----
    Nothing the file claims is trusted before it is checked. The directory of
    an ``.npz`` archive and the header of a safetensors file are checked
    first: names, dtypes, shapes, and that the sizes they claim are those of
    the bytes that are there; then the head count, the configuration and the
    shapes against each other. Only then is array data read, in pieces, so
    that the memory used follows the bytes actually in the file: a small file
    claiming a huge array, or a compressed member that would expand to
    gigabytes, is refused without the allocation or the decompression. The
    file is validated on the host (NumPy) before anything is moved to
    ``xp``/``device``, so a bad file fails the same way on every backend.
    Loading builds a new layer and changes no existing one, so an error leaves
    the caller's layer as it was. Reading safetensors files needs no extra
    package; ``.npz`` members may be stored or compressed
    (``np.savez_compressed``).

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
    path = _path_str(path)
    if num_heads is not None:
        num_heads = check_positive_int("num_heads", num_heads)
    options = check_option_names(options)
    params, heads, options, file_dtype = _read_weight_file(path, num_heads, options)
    try:
        layer = MultiHeadAttention.from_state_dict(params, num_heads=heads, **options)
    except (TypeError, ValueError) as exc:  # checked already: a bug, if it happens
        raise ValueError(f"{path!r} does not hold valid weights: {exc}") from exc
    # bfloat16 was read as float32 (exactly); a namespace that has bfloat16
    # gets the file's dtype back, exactly too.
    dtype = None
    if file_dtype == "bfloat16" and xp is not None:
        dtype = getattr(normalize_namespace(xp), "bfloat16", None)
    if xp is not None or device is not None or dtype is not None:
        layer = layer.to(xp=xp, device=device, dtype=dtype)
    return layer
