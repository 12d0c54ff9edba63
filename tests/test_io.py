"""Weight files: save_weights / load_weights round trips, and hostile files.

A file that is empty, truncated, corrupt, of another format, pickled, or that
holds the wrong names, shapes or dtypes must give a ``ValueError`` naming the
file, must never unpickle anything, and must leave every existing layer as it
was.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import os
import pickle
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import mha_xp
from support.files import refused
from support import FLOAT16_BACKENDS
from support._hypothesis_profiles import budget

MHA = mha_xp.MultiHeadAttention
HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
needs_safetensors = pytest.mark.skipif(
    not HAS_SAFETENSORS, reason="the optional safetensors package is not installed")
FORMATS = ["npz", pytest.param("safetensors", marks=needs_safetensors)]

# Set by _Payload.__reduce__ if anything ever unpickles one.
UNPICKLED: list[str] = []


def _record(what: str) -> None:
    UNPICKLED.append(what)


class _Payload:
    """An object whose unpickling would run code (here: record that it ran)."""

    def __reduce__(self):
        return (_record, ("a pickle was loaded",))


def host(layer) -> dict[str, np.ndarray]:
    return {n: np.array(w) for n, w in layer.to(xp=np).state_dict().items()}


@pytest.fixture
def layer():
    return MHA(8, 2, seed=0)


def saved(tmp_path: Path, layer, fmt: str = "npz") -> Path:
    path = tmp_path / f"weights.{fmt}"
    mha_xp.save_weights(layer, path)
    return path


def write_npz(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def assert_bad_file(path: Path, *fragments: str, **kwargs) -> None:
    """load_weights refuses ``path`` with a ValueError that names the file."""
    refused(path, *fragments, **kwargs)
    assert not UNPICKLED, UNPICKLED


class TestRoundTrip:
    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("kdim,bias", [(None, True), (5, True), (None, False), (3, False)])
    def test_every_backend_and_dtype(self, backend, fmt, kdim, bias, tmp_path):
        dtypes = ["float32", "float64"] + (["float16"] if backend.name in FLOAT16_BACKENDS else [])
        for dtype in dtypes:
            layer = MHA(12, 3, kdim=kdim, vdim=kdim, bias=bias, xp=backend.xp,
                        device=backend.device, dtype=backend.dtype(dtype), seed=1)
            path = tmp_path / f"w_{dtype}.{fmt}"
            mha_xp.save_weights(layer, path)
            loaded = mha_xp.load_weights(path, xp=backend.xp, device=backend.device)
            assert loaded.xp is layer.xp and loaded.device == layer.device
            assert loaded.dtype == layer.dtype
            assert (loaded.embed_dim, loaded.num_heads, loaded.kdim, loaded.vdim) == \
                (layer.embed_dim, layer.num_heads, layer.kdim, layer.vdim)
            assert list(loaded.state_dict()) == list(layer.state_dict())
            for n, w in layer.state_dict().items():
                np.testing.assert_array_equal(backend.to_numpy(loaded.state_dict()[n]),
                                              backend.to_numpy(w))
            x = backend.asarray(np.random.default_rng(0).standard_normal((2, 4, 12)), dtype)
            kv = backend.asarray(np.random.default_rng(1).standard_normal((2, 5, kdim or 12)), dtype)
            np.testing.assert_array_equal(backend.to_numpy(loaded(x, kv)),
                                          backend.to_numpy(layer(x, kv)))

    def test_default_is_numpy(self, layer, tmp_path):
        loaded = mha_xp.load_weights(saved(tmp_path, layer))
        assert loaded.xp is layer.xp and loaded.dtype == np.float64

    def test_npz_is_a_plain_archive_with_torch_names(self, layer, tmp_path):
        with np.load(saved(tmp_path, layer), allow_pickle=False) as f:
            assert sorted(f.files) == ["in_proj_bias", "in_proj_weight", "mha_xp_config",
                                       "num_heads", "out_proj.bias", "out_proj.weight"]
            assert f["num_heads"].shape == () and f["num_heads"].dtype == np.int64
            assert int(f["num_heads"]) == 2
            # The configuration: JSON in a 0-d unicode array, read without pickle.
            assert f["mha_xp_config"].shape == () and f["mha_xp_config"].dtype.kind == "U"
            assert json.loads(str(f["mha_xp_config"])) == layer.config.to_dict()

    @needs_safetensors
    def test_safetensors_has_num_heads_metadata(self, layer, tmp_path):
        from safetensors import safe_open

        with safe_open(saved(tmp_path, layer, "safetensors"), framework="numpy") as f:
            metadata = f.metadata()
            assert sorted(metadata) == ["mha_xp_config", "num_heads"]
            assert metadata["num_heads"] == "2"
            assert json.loads(metadata["mha_xp_config"]) == layer.config.to_dict()
            assert sorted(f.keys()) == sorted(layer.state_dict())

    def test_str_path_and_overwrite(self, layer, tmp_path):
        path = str(tmp_path / "w.npz")
        mha_xp.save_weights(layer, path)
        other = MHA(8, 4, seed=5)
        mha_xp.save_weights(other, path)  # replaces the first file
        loaded = mha_xp.load_weights(path)
        assert loaded.num_heads == 4
        np.testing.assert_array_equal(loaded.state_dict()["in_proj_weight"],
                                      other.state_dict()["in_proj_weight"])
        assert sorted(os.listdir(tmp_path)) == ["w.npz"]  # no temporary file left behind

    def test_format_comes_from_the_content_not_the_suffix(self, layer, tmp_path):
        path = saved(tmp_path, layer)
        renamed = path.rename(tmp_path / "weights.bin")
        assert mha_xp.load_weights(renamed).num_heads == 2

    def test_torch_state_dict_without_num_heads(self, tmp_path):
        torch = pytest.importorskip("torch")
        module = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
        path = write_npz(tmp_path / "torch.npz",
                         {k: t.detach().numpy() for k, t in module.state_dict().items()})
        assert_bad_file(path, "does not record num_heads", "num_heads=")
        loaded = mha_xp.load_weights(path, num_heads=2)
        x = torch.randn(2, 3, 8)
        with torch.no_grad():
            ref, _ = module(x, x, x)
        np.testing.assert_allclose(loaded(x.numpy()), ref.numpy(), atol=1e-6)

    @needs_safetensors
    def test_file_written_by_safetensors_torch(self, tmp_path):
        torch = pytest.importorskip("torch")
        from safetensors.torch import save_file

        module = torch.nn.MultiheadAttention(8, 4, kdim=3, vdim=3, batch_first=True).eval()
        path = tmp_path / "torch.safetensors"
        save_file(module.state_dict(), path)
        loaded = mha_xp.load_weights(path, num_heads=4, xp=torch)
        q, kv = torch.randn(2, 5, 8), torch.randn(2, 6, 3)
        with torch.no_grad():
            ref, _ = module(q, kv, kv)
        torch.testing.assert_close(loaded(q, kv), ref, atol=1e-6, rtol=1e-5)

    def test_num_heads_argument_must_agree(self, layer, tmp_path):
        path = saved(tmp_path, layer)
        assert mha_xp.load_weights(path, num_heads=2).num_heads == 2
        assert_bad_file(path, "records num_heads=2", "num_heads=4", num_heads=4)
        with pytest.raises(ValueError, match="num_heads must be a positive int"):
            mha_xp.load_weights(path, num_heads=0)


class TestSaveErrors:
    def test_suffix(self, layer, tmp_path):
        with pytest.raises(ValueError, match=r"path must end in \.npz or \.safetensors"):
            mha_xp.save_weights(layer, tmp_path / "w.pt")

    @pytest.mark.parametrize("bad", [None, {}, "layer", np.zeros(3)])
    def test_not_a_layer(self, bad, tmp_path):
        with pytest.raises(TypeError, match="layer must be a mha_xp.MultiHeadAttention"):
            mha_xp.save_weights(bad, tmp_path / "w.npz")

    def test_bfloat16_has_no_numpy_dtype(self, tmp_path):
        torch = pytest.importorskip("torch")
        layer = MHA(8, 2, xp=torch, dtype=torch.bfloat16, seed=0)
        with pytest.raises(ValueError, match="bfloat16"):
            mha_xp.save_weights(layer, tmp_path / "w.npz")
        assert not os.listdir(tmp_path)

    def test_safetensors_missing(self, layer, tmp_path, monkeypatch):
        for name in ("safetensors", "safetensors.numpy"):
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
        with pytest.raises(ImportError, match="pip install safetensors"):
            mha_xp.save_weights(layer, tmp_path / "w.safetensors")
        assert not os.listdir(tmp_path)

    @needs_safetensors
    def test_reading_safetensors_needs_no_package(self, layer, tmp_path, monkeypatch):
        """load_weights parses safetensors itself (the package's NumPy reader
        cannot read bfloat16), so only writing needs the package."""
        path = saved(tmp_path, layer, "safetensors")
        for name in ("safetensors", "safetensors.numpy"):
            monkeypatch.setitem(sys.modules, name, None)
        loaded = mha_xp.load_weights(path)
        assert repr(loaded) == repr(layer)
        for n, w in layer.state_dict().items():
            np.testing.assert_array_equal(loaded.state_dict()[n], w)

    def test_failed_save_keeps_the_old_file(self, layer, tmp_path, monkeypatch):
        path = saved(tmp_path, layer)
        before = path.read_bytes()

        def broken(file, **arrays):
            file.write(b"PK\x03\x04 half an archive")
            raise OSError("disk full")

        monkeypatch.setattr(np, "savez", broken)
        with pytest.raises(OSError, match="disk full"):
            mha_xp.save_weights(MHA(8, 4, seed=1), path)
        assert path.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == [path.name]


needs_posix = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and symlinks")


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def hidden_temporaries(*directories: Path) -> list[str]:
    return [n for d in directories for n in os.listdir(d) if n.endswith(".tmp")]


class TestSaveFileSystem:
    """save_weights behaves as np.savez users expect of the file system, and
    replaces the target atomically."""

    @needs_posix
    @pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
    def test_new_file_mode_follows_the_umask(self, layer, tmp_path, mask, mode):
        with umask(mask):
            path = saved(tmp_path, layer)
            np.savez(tmp_path / "numpy.npz", x=np.zeros(1))
        assert stat.S_IMODE(path.stat().st_mode) == mode
        assert stat.S_IMODE((tmp_path / "numpy.npz").stat().st_mode) == mode  # as np.savez

    @needs_posix
    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o666])
    def test_replaced_file_keeps_its_mode(self, layer, tmp_path, mode):
        path = saved(tmp_path, layer)
        path.chmod(mode)
        with umask(0o077):
            mha_xp.save_weights(MHA(8, 4, seed=1), path)
        assert stat.S_IMODE(path.stat().st_mode) == mode
        assert mha_xp.load_weights(path).num_heads == 4

    @needs_posix
    def test_read_only_file_is_not_replaced(self, layer, tmp_path, monkeypatch):
        path = saved(tmp_path, layer)
        before = path.read_bytes()
        path.chmod(0o444)
        if os.geteuid() == 0:  # root may write anything: pretend not to be root
            monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
        with pytest.raises(PermissionError, match="read-only"):
            mha_xp.save_weights(MHA(8, 4, seed=1), path)
        assert path.read_bytes() == before and not hidden_temporaries(tmp_path)

    @needs_posix
    def test_symlink_is_followed(self, layer, tmp_path):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        target = saved(tmp_path / "b", layer)
        target.chmod(0o640)
        link = tmp_path / "a" / "link.npz"
        link.symlink_to(target)
        mha_xp.save_weights(MHA(8, 4, seed=1), link)
        assert link.is_symlink() and link.resolve() == target.resolve()  # the link is kept
        assert mha_xp.load_weights(target).num_heads == 4  # and its target written
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        assert sorted(os.listdir(tmp_path / "a")) == ["link.npz"]
        assert sorted(os.listdir(tmp_path / "b")) == [target.name]

    @needs_posix
    def test_dangling_symlink_creates_its_target(self, layer, tmp_path):
        link = tmp_path / "link.npz"
        link.symlink_to(tmp_path / "real.npz")
        mha_xp.save_weights(layer, link)
        assert link.is_symlink() and (tmp_path / "real.npz").is_file()

    @needs_posix
    def test_symlink_cycle(self, layer, tmp_path):
        (tmp_path / "x.npz").symlink_to(tmp_path / "y.npz")
        (tmp_path / "y.npz").symlink_to(tmp_path / "x.npz")
        with pytest.raises(OSError) as info:
            mha_xp.save_weights(layer, tmp_path / "x.npz")
        assert info.value.errno == errno.ELOOP
        assert (tmp_path / "x.npz").is_symlink() and (tmp_path / "y.npz").is_symlink()

    @needs_posix
    def test_directory_is_synced_after_the_rename(self, layer, tmp_path, monkeypatch):
        events = []
        fsync, replace = os.fsync, os.replace

        def record_fsync(fd):
            events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
            fsync(fd)

        def record_replace(src, dst):
            events.append("replace")
            replace(src, dst)

        monkeypatch.setattr(os, "fsync", record_fsync)
        monkeypatch.setattr(os, "replace", record_replace)
        saved(tmp_path, layer)
        assert events == ["fsync file", "replace", "fsync dir"]

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_temporary_file_is_hidden_beside_the_target(self, layer, tmp_path, monkeypatch, fmt):
        seen = []
        replace = os.replace
        monkeypatch.setattr(os, "replace",
                            lambda src, dst: seen.append((src, dst)) or replace(src, dst))
        path = saved(tmp_path, layer, fmt)
        (src, dst), = seen
        assert os.path.dirname(src) == str(tmp_path) and dst == str(path)
        name = os.path.basename(src)
        assert name.startswith(f".{path.name}.") and name.endswith(".tmp"), name

    @pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, OSError])
    def test_interrupted_save_removes_its_temporary_file(self, layer, tmp_path, monkeypatch,
                                                         interrupt):
        path = saved(tmp_path, layer)
        before = path.read_bytes()

        def broken(file, **arrays):
            file.write(b"PK\x03\x04 half an archive")
            raise interrupt("stopped")

        monkeypatch.setattr(np, "savez", broken)
        with pytest.raises(interrupt):
            mha_xp.save_weights(MHA(8, 4, seed=1), path)
        assert path.read_bytes() == before and not hidden_temporaries(tmp_path)

    @pytest.mark.parametrize("name", [".npz", ".safetensors", ".NPZ"])
    def test_a_name_is_needed_before_the_suffix(self, layer, tmp_path, name):
        with pytest.raises(ValueError, match="needs a file name before its") as info:
            mha_xp.save_weights(layer, tmp_path / name)
        assert "weights" + name in str(info.value)  # an example of a name that works
        assert not os.listdir(tmp_path)

    def test_a_directory_is_not_a_file_name(self, layer, tmp_path):
        with pytest.raises(ValueError, match="path must name a file, got the directory"):
            mha_xp.save_weights(layer, str(tmp_path) + os.sep)


def bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """The bfloat16 nearest below ``a`` (float32's upper half), as uint16."""
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_bf16_safetensors(path: Path, arrays: dict, metadata: dict) -> Path:
    header, data = {}, b""
    for name, a in arrays.items():
        raw = bfloat16_bits(a).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header | {"__metadata__": metadata}).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


class TestBfloat16:
    """safetensors BF16 weights (most Hugging Face checkpoints) load: as
    float32 on NumPy (exactly), as bfloat16 where the namespace has it."""

    def test_numpy_gets_float32_exactly(self, layer, tmp_path):
        arrays = host(layer)
        path = write_bf16_safetensors(tmp_path / "bf16.safetensors", arrays, {"num_heads": "2"})
        loaded = mha_xp.load_weights(path)
        assert loaded.xp is layer.xp and loaded.dtype == np.float32
        for n, a in arrays.items():
            want = (bfloat16_bits(a).astype(np.uint32) << 16).view(np.float32)
            np.testing.assert_array_equal(loaded.state_dict()[n], want)

    def test_torch_keeps_bfloat16(self, tmp_path):
        torch = pytest.importorskip("torch")
        pytest.importorskip("safetensors")
        from safetensors.torch import save_file

        module = torch.nn.MultiheadAttention(8, 2, batch_first=True).to(torch.bfloat16)
        path = tmp_path / "hf.safetensors"
        save_file(module.state_dict(), path, metadata={"num_heads": "2"})
        on_numpy = mha_xp.load_weights(path)
        on_torch = mha_xp.load_weights(path, xp=torch)
        assert on_numpy.dtype == np.float32 and on_torch.dtype == torch.bfloat16
        for n, w in module.state_dict().items():
            assert torch.equal(on_torch.state_dict()[n], w)  # bit for bit
            np.testing.assert_array_equal(on_numpy.state_dict()[n], w.float().numpy())
        x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
        assert on_torch(x).dtype == torch.bfloat16

    def test_jax_keeps_bfloat16(self, layer, tmp_path):
        jnp = pytest.importorskip("jax.numpy")
        path = write_bf16_safetensors(tmp_path / "bf16.safetensors", host(layer),
                                      {"num_heads": "2"})
        loaded = mha_xp.load_weights(path, xp=jnp)
        assert loaded.dtype == jnp.bfloat16
        want = mha_xp.load_weights(path)
        for n, w in loaded.state_dict().items():
            np.testing.assert_array_equal(np.asarray(w, dtype=np.float32), want.state_dict()[n])

    def test_other_namespaces_get_float32(self, layer, tmp_path):
        xps = pytest.importorskip("array_api_strict")
        path = write_bf16_safetensors(tmp_path / "bf16.safetensors", host(layer),
                                      {"num_heads": "2"})
        assert mha_xp.load_weights(path, xp=xps).dtype == xps.float32

    def test_mixed_with_float32_is_refused(self, layer, tmp_path):
        arrays = host(layer)
        path = write_bf16_safetensors(tmp_path / "bf16.safetensors", arrays, {"num_heads": "2"})
        # Re-write one entry as F32 in place of BF16: both read as float32,
        # so only the file's own dtypes can tell.
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        data = b""
        for name, a in arrays.items():
            blob = (a.astype("<f4") if name == "out_proj.bias" else bfloat16_bits(a)).tobytes()
            header[name].update(dtype="F32" if name == "out_proj.bias" else "BF16",
                                data_offsets=[len(data), len(data) + len(blob)])
            data += blob
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + data)
        assert_bad_file(path, "out_proj.bias has dtype float32", "bfloat16",
                        "all weights must share one dtype")


class TestHostileFiles:
    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            mha_xp.load_weights(tmp_path / "nothing.npz")

    def test_empty_file(self, tmp_path):
        path = tmp_path / "empty.npz"
        path.write_bytes(b"")
        assert_bad_file(path, "is empty")

    def test_npy_file(self, layer, tmp_path):
        path = tmp_path / "one.npy"
        np.save(path, layer.state_dict()["in_proj_weight"])
        assert_bad_file(path, "single .npy array")

    def test_pickle_is_never_loaded(self, tmp_path):
        path = tmp_path / "weights.npz"
        path.write_bytes(pickle.dumps({"in_proj_weight": _Payload()}))
        assert_bad_file(path, "never unpickles")

    def test_object_array_in_npz_is_never_unpickled(self, layer, tmp_path):
        arrays = host(layer) | {"num_heads": np.asarray(2)}
        obj = np.empty(1, dtype=object)
        obj[0] = _Payload()
        arrays["out_proj.bias"] = obj
        path = write_npz(tmp_path / "objects.npz", arrays)  # np.savez pickles object arrays
        assert_bad_file(path, "'out_proj.bias' holds Python objects", "never unpickles")

    def test_torch_save_archive_is_never_unpickled(self, layer, tmp_path):
        torch = pytest.importorskip("torch")
        path = tmp_path / "weights.pt"
        torch.save({"payload": _Payload(), **{n: torch.asarray(w) for n, w in host(layer).items()}},
                   path)
        assert path.read_bytes()[:2] == b"PK"  # a zip archive, like .npz
        assert_bad_file(path, "is a torch.save archive", "never unpickles")

    def test_foreign_zip(self, tmp_path):
        path = tmp_path / "weights.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("in_proj_weight.npy", b"not an array at all")
        assert_bad_file(path)

    @pytest.mark.parametrize("change,fragments", [
        (lambda a: a.pop("out_proj.weight"), ["missing", "out_proj.weight"]),
        (lambda a: a.update(bias_k=np.zeros((1, 1, 8))), ["unexpected", "bias_k"]),
        (lambda a: a.update({"in_proj_weight": np.zeros((24, 7))}), ["in_proj_weight", "shape"]),
        (lambda a: a.update({"out_proj.bias": np.zeros(8, dtype=np.float32)}), ["dtype"]),
        (lambda a: a.update({"out_proj.bias": np.zeros(8, dtype=np.int64)}), ["int64", "float"]),
        (lambda a: a.update({"out_proj.bias": np.zeros(8, dtype=np.complex128)}), ["complex128"]),
        (lambda a: a.update({"out_proj.bias": np.zeros(8, dtype=np.longdouble)}), ["float"]),
        (lambda a: a.update({"out_proj.bias": np.zeros(8, dtype=[("x", "f8")])}), ["dtype"]),
        (lambda a: a.update(num_heads=np.asarray(3)), ["divisible by num_heads"]),
        (lambda a: a.update(num_heads=np.asarray(0)), ["num_heads must be a positive"]),
        (lambda a: a.update(num_heads=np.asarray(-2)), ["num_heads must be a positive"]),
        (lambda a: a.update(num_heads=np.asarray(2.0)), ["num_heads must be a 0-d integer"]),
        (lambda a: a.update(num_heads=np.asarray([2, 2])), ["num_heads must be a 0-d integer"]),
        (lambda a: a.update(num_heads=np.asarray("2")), ["num_heads must be a 0-d integer"]),
    ], ids=["missing", "extra", "shape", "mixed-dtypes", "int", "complex", "longdouble",
            "structured", "heads-not-dividing", "heads-0", "heads-negative", "heads-float",
            "heads-vector", "heads-str"])
    def test_mismatched_npz(self, layer, tmp_path, change, fragments):
        arrays = host(layer) | {"num_heads": np.asarray(2)}
        change(arrays)
        assert_bad_file(write_npz(tmp_path / "w.npz", arrays), *fragments)

    def test_big_endian_file_loads(self, layer, tmp_path):
        arrays = {n: w.astype(">f8") for n, w in host(layer).items()} | {"num_heads": np.asarray(2)}
        loaded = mha_xp.load_weights(write_npz(tmp_path / "w.npz", arrays))
        x = np.random.default_rng(0).standard_normal((1, 3, 8))
        np.testing.assert_array_equal(loaded(x), layer(x))

    @needs_safetensors
    @pytest.mark.parametrize("metadata,fragment", [
        ({"num_heads": "two"}, "must be an integer"), ({"num_heads": "0"}, "positive"),
        ({}, "does not record num_heads"), ({"num_heads": "3"}, "divisible"),
    ])
    def test_mismatched_safetensors(self, layer, tmp_path, metadata, fragment):
        from safetensors.numpy import save_file

        path = tmp_path / "w.safetensors"
        save_file(host(layer), path, metadata=metadata)
        assert_bad_file(path, fragment)

    @needs_safetensors
    def test_safetensors_with_integer_entry(self, layer, tmp_path):
        from safetensors.numpy import save_file

        path = tmp_path / "w.safetensors"
        save_file(host(layer) | {"out_proj.bias": np.zeros(8, dtype=np.int32)}, path,
                  metadata={"num_heads": "2"})
        assert_bad_file(path, "int32")

    def test_failed_load_leaves_the_layer_untouched(self, layer, tmp_path):
        before = host(layer)
        path = saved(tmp_path, layer)
        path.write_bytes(path.read_bytes()[:-40])
        current = layer
        with pytest.raises(ValueError):
            current = mha_xp.load_weights(path)
        assert current is layer
        for n, w in host(layer).items():
            np.testing.assert_array_equal(w, before[n])


@pytest.mark.parametrize("fmt", FORMATS)
class TestDamagedFilesFuzz:
    """Truncations and byte flips anywhere in a valid file: either the file
    still loads as a valid layer of the same architecture (a flip inside the
    raw array bytes of a safetensors file, which has no checksum), or
    load_weights raises ValueError naming it; nothing else, ever."""

    @pytest.fixture
    def good(self, fmt, tmp_path_factory):
        layer = MHA(8, 2, kdim=3, vdim=3, seed=0)
        path = tmp_path_factory.mktemp("good") / f"w.{fmt}"
        mha_xp.save_weights(layer, path)
        return path.read_bytes()

    @budget(25)
    @given(cut=st.floats(0.0, 1.0, exclude_max=True))
    def test_truncated(self, fmt, good, cut, tmp_path_factory):
        path = tmp_path_factory.mktemp("cut") / f"w.{fmt}"
        path.write_bytes(good[: int(cut * len(good))])
        note(f"kept {int(cut * len(good))} of {len(good)} bytes")
        assert_bad_file(path)

    @budget(40)
    @given(flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)),
                          min_size=1, max_size=4))
    def test_bytes_flipped(self, fmt, good, flips, tmp_path_factory):
        data = bytearray(good)
        for where, xor in flips:
            data[int(where * len(data))] ^= xor
        path = tmp_path_factory.mktemp("flip") / f"w.{fmt}"
        path.write_bytes(bytes(data))
        note(f"flipped at {[int(w * len(data)) for w, _ in flips]} of {len(data)}")
        try:
            loaded = mha_xp.load_weights(path)
        except ValueError as exc:
            assert str(path) in str(exc)
        else:
            assert (loaded.embed_dim, loaded.num_heads, loaded.kdim, loaded.vdim) == (8, 2, 3, 3)
        assert not UNPICKLED


def test_round_trip_through_a_buffer_of_bytes(layer, tmp_path):
    """The npz writer produces what np.load reads with allow_pickle=False."""
    path = saved(tmp_path, layer)
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
        for n, w in layer.state_dict().items():
            np.testing.assert_array_equal(f[n], w)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_real_model_options_round_trip(tmp_path, fmt):
    """A layer with every option of pretrained models' attention (head_dim
    apart from embed_dim, scale, per-head QK LayerNorm with biases, sinks,
    RoPE scaling) saves and loads to an equal config and bit-identical
    outputs, decoding included."""
    if fmt == "safetensors":
        pytest.importorskip("safetensors", reason="optional dependency safetensors not installed")
    rng = np.random.default_rng(3)
    base = mha_xp.MultiHeadAttention(
        12, 4, num_kv_heads=2, head_dim=6, scale=0.35, sinks=True, normalize_qk=True,
        qk_norm="layer", qk_norm_eps=1e-5, qk_norm_bias=True, qk_norm_per_head=True,
        rotary=True, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 16},
        max_position_embeddings=64, window=(5, 0), seed=0)
    sd = {n: w + 0.2 * rng.standard_normal(w.shape) for n, w in base.state_dict().items()}
    layer = mha_xp.MultiHeadAttention.from_state_dict(sd, num_heads=4, **base.config.options())
    path = tmp_path / f"w.{fmt}"
    mha_xp.save_weights(layer, path)
    loaded = mha_xp.load_weights(path)
    assert loaded.config == layer.config and repr(loaded) == repr(layer)
    assert sorted(loaded.state_dict()) == sorted(sd)
    x = rng.standard_normal((2, 7, 12))
    assert np.array_equal(loaded(x, is_causal=True), layer(x, is_causal=True))
    y, cache = loaded(x[:, :4], cache=loaded.init_cache(2, 8), is_causal=True)
    assert np.array_equal(y, layer(x[:, :4], is_causal=True))
