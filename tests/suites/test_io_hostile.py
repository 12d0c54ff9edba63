"""Hostile weight files: what a file claims is checked before it is believed.

``load_weights`` must refuse, with a ``ValueError`` naming the file, a small
file that claims a huge array (without allocating it), a compressed member
that would expand to gigabytes (without decompressing it), forged sizes in an
archive's directory or a safetensors header, duplicated names, and dtypes it
cannot represent ("unsupported dtype", never "corrupt"). The files are built
byte by byte here, so these tests need neither torch nor safetensors.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

import mha_xp
from support.files import refused

MHA = mha_xp.MultiHeadAttention


def npy_header(shape, descr="<f8", fortran=False) -> bytes:
    """The first bytes of an .npy file claiming ``shape`` of ``descr``."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran,
                                            "shape": tuple(shape)})
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def state(layer) -> dict[str, np.ndarray]:
    return {n: np.asarray(w) for n, w in layer.state_dict().items()}


def write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def layer_members(layer, **extra: bytes) -> dict[str, bytes]:
    """The .npy members of a 0.1.0-style file of ``layer``, and ``extra``."""
    members = {f"{n}.npy": npy_bytes(w) for n, w in state(layer).items()}
    members["num_heads.npy"] = npy_bytes(np.asarray(layer.num_heads))
    return members | extra


def forge_sizes(data: bytes, sizes: dict[str, int]) -> bytes:
    """``data`` (a zip archive) with the uncompressed size its central
    directory gives the members in ``sizes`` replaced (what zipfile reads)."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", out, at + 28)[0]
        name = bytes(out[at + 46: at + 46 + name_len]).decode()
        if name in sizes:
            struct.pack_into("<I", out, at + 24, sizes[name])
        at = out.find(b"PK\x01\x02", at + 46)
    return bytes(out)


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None,
                      raw_header: bytes | None = None, tail: bytes = b"") -> Path:
    """A safetensors file: ``tensors`` maps names to (dtype code, shape,
    bytes); or ``raw_header`` as it is, with ``tail`` as the data."""
    header, data = {}, b""
    for name, (code, shape, raw) in tensors.items():
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data + tail)
    return path


def f64_tensors(layer) -> dict:
    return {n: ("F64", w.shape, w.astype("<f8").tobytes()) for n, w in state(layer).items()}




@pytest.fixture
def layer():
    return MHA(8, 2, seed=0)


@pytest.fixture
def member_reads(monkeypatch) -> dict[str, int]:
    """Bytes handed out per zip member (every read load_weights makes)."""
    counts: dict[str, int] = {}
    original = zipfile.ZipExtFile.read

    def read(self, n=-1):
        data = original(self, n)
        counts[self.name] = counts.get(self.name, 0) + len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return counts


def peak_bytes(call) -> int:
    """The peak of Python and NumPy allocations while ``call()`` runs."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


class TestNpzClaims:
    def test_tiny_file_claiming_a_huge_array(self, tmp_path):
        # The reproducer: 262 bytes whose member header claims 2**39 float64
        # (4 TiB) was an unnamed MemoryError from np.load.
        path = write_zip(tmp_path / "claim.npz", {"in_proj_weight.npy": npy_header((2**39,))})
        assert path.stat().st_size == 262
        peak = peak_bytes(lambda: refused(path, "'in_proj_weight.npy'", "(549755813888,)",
                                          "truncated or corrupt"))
        assert peak < 1 << 20

    def test_forged_directory_sizes_allocate_nothing(self, tmp_path):
        # The directory's sizes agree with the headers' claims (2 GiB in all),
        # but the members hold headers only: memory must follow the bytes
        # that arrive, not the sizes claimed.
        E = 2**13
        big = {"in_proj_weight.npy": npy_header((3 * E, E)),
               "out_proj.weight.npy": npy_header((E, E))}
        real = {"in_proj_bias.npy": npy_bytes(np.zeros(3 * E)),
                "out_proj.bias.npy": npy_bytes(np.zeros(E)),
                "num_heads.npy": npy_bytes(np.asarray(2))}
        data = write_zip(tmp_path / "plain.npz", big | real).read_bytes()
        claims = {"in_proj_weight.npy": len(big["in_proj_weight.npy"]) + 8 * 3 * E * E,
                  "out_proj.weight.npy": len(big["out_proj.weight.npy"]) + 8 * E * E}
        path = tmp_path / "forged.npz"
        path.write_bytes(forge_sizes(data, claims))
        with zipfile.ZipFile(path) as z:
            assert z.getinfo("in_proj_weight.npy").file_size == claims["in_proj_weight.npy"]
        peak = peak_bytes(lambda: refused(path, "ends after 0 of the", "truncated or corrupt"))
        assert peak < 8 << 20

    def test_bomb_in_an_unexpected_member_is_never_opened(self, layer, tmp_path, member_reads,
                                                          monkeypatch):
        # 64 MiB of zeros in 64 kB: np.load decompressed all of it (in the
        # reported case 1.5 GiB, 11 s) before refusing the name.
        path = write_zip(tmp_path / "bomb.npz", layer_members(layer))
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
            with z.open("bomb.npy", "w") as member:
                member.write(npy_header((64 << 20,), "|u1"))
                for _ in range(64):
                    member.write(bytes(1 << 20))
        assert path.stat().st_size < 1 << 20
        opened = []
        original = zipfile.ZipFile.open
        monkeypatch.setattr(zipfile.ZipFile, "open",
                            lambda self, name, *a, **k: opened.append(getattr(
                                name, "filename", name)) or original(self, name, *a, **k))
        refused(path, "unexpected member(s) ['bomb.npy']", "refused unread")
        assert opened == [] and member_reads == {}  # refused from the directory alone

    def test_bomb_in_an_expected_member_is_refused_from_its_header(self, layer, tmp_path,
                                                                   member_reads):
        # A consistent header and size (32 MiB of zeros) but the wrong shape
        # for the layer: refused before the data is decompressed.
        path = write_zip(tmp_path / "bomb.npz", {
            k: v for k, v in layer_members(layer).items() if k != "in_proj_weight.npy"})
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
            with z.open("in_proj_weight.npy", "w") as member:
                member.write(npy_header((2048, 2048)))
                for _ in range(32):
                    member.write(bytes(1 << 20))
        refused(path, "in_proj_weight must have shape (24, 8)", "got (2048, 2048)")
        assert 0 < member_reads["in_proj_weight.npy"] < 1024

    def test_header_claiming_gigabytes_is_not_read(self, layer, tmp_path, member_reads):
        fake = b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b"{" * 100
        path = write_zip(tmp_path / "h.npz", layer_members(layer, **{"out_proj.bias.npy": fake}))
        refused(path, "'out_proj.bias.npy'", "header claims 4294967295 bytes")
        assert member_reads["out_proj.bias.npy"] <= 12

    @pytest.mark.parametrize("data,fragments", [
        (b"\x93NUMPY\x07\x00\x10\x00", ["unknown format version (7, 0)"]),
        (b"\x93NUMPY\x01", ["ends inside its header"]),
        (npy_header((8,))[:40], ["header claims 118 bytes", "within the member's 40"]),
        (npy_header((-8,)) + bytes(64), ["negative shape"]),
        (npy_header((8,)) + bytes(63), ["claims shape (8,)", "64 bytes", "gives it 63"]),
        (npy_header((8,)) + bytes(65), ["claims shape (8,)", "gives it 65"]),
        # A header is a Python literal, read with ast.literal_eval: nothing runs.
        (b"\x93NUMPY\x01\x00" + struct.pack("<H", 118)
         + b"{'descr': __import__('os').system('echo pwned'), 'fortran_order': False, "
           b"'shape': (8,), }".ljust(117) + b"\n", ["not a valid .npy array"]),
    ], ids=["version", "short-magic", "short-header", "negative", "short-data", "long-data",
            "code-in-header"])
    def test_damaged_member_headers(self, layer, tmp_path, data, fragments):
        path = write_zip(tmp_path / "h.npz", layer_members(layer, **{"out_proj.bias.npy": data}))
        refused(path, "'out_proj.bias.npy'", "truncated or corrupt", *fragments)

    def test_object_dtype_is_refused_from_the_header(self, layer, tmp_path, member_reads):
        data = npy_header((8,), "|O") + b"\x80\x04pickle bytes never loaded"
        path = write_zip(tmp_path / "o.npz", layer_members(layer, **{"out_proj.bias.npy": data}))
        refused(path, "'out_proj.bias' holds Python objects", "never unpickles")
        # The 12 bytes of its magic and length, then the header: no data.
        assert member_reads["out_proj.bias.npy"] <= 12 + len(npy_header((8,)))

    @pytest.mark.parametrize("name,member,fragment", [
        ("num_heads.npy", npy_bytes(np.zeros(2**20)), "num_heads must be a 0-d integer"),
        ("mha_xp_config.npy", npy_header((), "<U33554432") + bytes(64),
         "claims 33554432 characters"),
    ], ids=["num_heads-vector", "huge-config"])
    def test_metadata_members_are_checked_before_reading(self, layer, tmp_path, name, member,
                                                         fragment, member_reads):
        path = write_zip(tmp_path / "m.npz", layer_members(layer, **{name: member}),
                         compression=zipfile.ZIP_DEFLATED)
        refused(path, fragment)
        assert member_reads[name] < 1024

    def test_duplicated_member_is_refused(self, layer, tmp_path):
        # np.load reads the last of two equal names, silently.
        path = tmp_path / "twice.npz"
        with pytest.warns(UserWarning, match="Duplicate name"):
            write_zip(path, layer_members(layer))
            with zipfile.ZipFile(path, "a") as z:
                z.writestr("out_proj.bias.npy", npy_bytes(np.ones(8)))
        with np.load(path) as f:
            assert f["out_proj.bias"][0] == 1.0  # what np.load makes of it
        refused(path, "more than one member named ['out_proj.bias.npy']")

    def test_member_without_npy_suffix_is_unexpected(self, layer, tmp_path):
        members = layer_members(layer)
        members["in_proj_weight"] = members.pop("in_proj_weight.npy")
        refused(write_zip(tmp_path / "n.npz", members), "unexpected member(s) ['in_proj_weight']")

    def test_crc_mismatch(self, layer, tmp_path):
        data = bytearray(write_zip(tmp_path / "ok.npz", layer_members(layer)).read_bytes())
        at = bytes(data).find(np.asarray(state(layer)["out_proj.weight"]).tobytes()[:16])
        data[at] ^= 0xFF  # inside the array bytes: only the CRC can tell
        path = tmp_path / "crc.npz"
        path.write_bytes(bytes(data))
        refused(path, "'out_proj.weight.npy'", "BadZipFile", "CRC")

    @pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                             zipfile.ZIP_LZMA])
    def test_compressed_and_fortran_order_members_load(self, layer, tmp_path, compression):
        members = layer_members(layer)
        members["in_proj_weight.npy"] = npy_bytes(np.asfortranarray(state(layer)["in_proj_weight"]))
        assert b"'fortran_order': True" in members["in_proj_weight.npy"][:128]
        loaded = mha_xp.load_weights(write_zip(tmp_path / "c.npz", members, compression))
        for n, w in state(layer).items():
            np.testing.assert_array_equal(loaded.state_dict()[n], w)

    def test_savez_compressed_file_loads(self, layer, tmp_path):
        path = tmp_path / "c.npz"
        np.savez_compressed(path, **state(layer), num_heads=np.asarray(2))
        assert repr(mha_xp.load_weights(path)) == repr(layer)


class TestSafetensorsClaims:
    def test_offsets_past_the_file_allocate_nothing(self, layer, tmp_path):
        tensors = f64_tensors(layer)
        header = {n: {"dtype": c, "shape": list(s), "data_offsets": [0, len(r)]}
                  for n, (c, s, r) in tensors.items()}
        header["in_proj_weight"] = {"dtype": "F64", "shape": [2**37],
                                    "data_offsets": [0, 2**40]}
        path = write_safetensors(tmp_path / "claim.safetensors", {},
                                 raw_header=json.dumps(header).encode())
        peak = peak_bytes(lambda: refused(path, "truncated or corrupt"))
        assert peak < 1 << 20

    def test_header_length_past_the_file(self, tmp_path):
        path = tmp_path / "h.safetensors"
        path.write_bytes((2**40).to_bytes(8, "little") + b'{"a": 1}')
        refused(path, "its header claims 1099511627776 bytes", "truncated or corrupt")

    def test_unexpected_entry_is_refused_by_name(self, layer, tmp_path):
        tensors = f64_tensors(layer) | {"bomb": ("U8", (16,), bytes(16))}
        refused(write_safetensors(tmp_path / "u.safetensors", tensors, {"num_heads": "2"}),
                "unexpected entries ['bomb']", "refused unread")

    def test_duplicated_entry_is_refused(self, layer, tmp_path):
        tensors = f64_tensors(layer)
        text = json.dumps({n: {"dtype": c, "shape": list(s), "data_offsets": [0, len(r)]}
                           for n, (c, s, r) in tensors.items()})
        twice = text[:-1] + ', "out_proj.bias": {"dtype": "F64", "shape": [8], ' \
                            '"data_offsets": [0, 64]}}'
        path = write_safetensors(tmp_path / "d.safetensors", {}, raw_header=twice.encode(),
                                 tail=bytes(1024))
        refused(path, "names ['out_proj.bias'] more than once")

    @pytest.mark.parametrize("change,fragment", [
        (lambda h: h["out_proj.bias"].update(data_offsets=[0, 64]), "overlapping or missing"),
        (lambda h: h["out_proj.bias"].update(data_offsets=[o + 8 for o in
                                                           h["out_proj.bias"]["data_offsets"]]),
         "overlapping or missing"),
        (lambda h: h["out_proj.bias"].update(shape=[9]), "claims shape (9,)"),
        (lambda h: h["out_proj.bias"].update(shape=[8.0]), "malformed header record"),
        (lambda h: h["out_proj.bias"].update(shape=[True] * 8), "malformed header record"),
        (lambda h: h["out_proj.bias"].update(shape=[2**62] * 10**5), "malformed header record"),
        (lambda h: h["out_proj.bias"].update(data_offsets=[5]), "malformed header record"),
        (lambda h: h["out_proj.bias"].pop("dtype"), "malformed header record"),
        (lambda h: h.update(__metadata__={"num_heads": 2}), "__metadata__ is not a mapping"),
        (lambda h: h.update(__metadata__=[1]), "__metadata__ is not a mapping"),
    ], ids=["overlap", "gap", "shape-vs-offsets", "float-dim", "bool-dim", "many-dims", "one-offset", "no-dtype",
            "metadata-int", "metadata-list"])
    def test_damaged_header_records(self, layer, tmp_path, change, fragment):
        header, data = {}, b""
        for n, (c, s, r) in f64_tensors(layer).items():
            header[n] = {"dtype": c, "shape": list(s),
                         "data_offsets": [len(data), len(data) + len(r)]}
            data += r
        header["__metadata__"] = {"num_heads": "2"}
        change(header)
        path = write_safetensors(tmp_path / "r.safetensors", {},
                                 raw_header=json.dumps(header).encode(), tail=data)
        refused(path, "truncated or corrupt", fragment)

    @pytest.mark.parametrize("tail", [b"\0" * 8, b""], ids=["trailing-bytes", "exact"])
    def test_data_must_fill_the_file_exactly(self, layer, tmp_path, tail):
        path = write_safetensors(tmp_path / "t.safetensors", f64_tensors(layer),
                                 {"num_heads": "2"}, tail=tail)
        if tail:
            refused(path, "the file holds", "after the header")
        else:
            assert repr(mha_xp.load_weights(path)) == repr(layer)

    @pytest.mark.parametrize("header", [b"{not json", b'["a list"]', b'{"a": ' * 5000,
                                        b'{"x": "\xff"}'],
                             ids=["not-json", "list", "deep", "not-utf8"])
    def test_header_that_is_not_a_json_object(self, tmp_path, header):
        refused(write_safetensors(tmp_path / "j.safetensors", {}, raw_header=header),
                "truncated or corrupt")


class TestDtypes:
    @pytest.mark.parametrize("code,named", [
        ("F8_E4M3", "F8_E4M3 (float8_e4m3fn)"), ("F8_E5M2", "F8_E5M2 (float8_e5m2)"),
        ("I64", "I64 (int64)"), ("U8", "U8 (uint8)"), ("BOOL", "BOOL (bool)"),
        ("F33", "'F33'"),
    ])
    def test_unsupported_safetensors_dtype(self, layer, tmp_path, code, named):
        tensors = f64_tensors(layer)
        tensors["out_proj.bias"] = (code, (8,), bytes(8 * 8))
        message = refused(write_safetensors(tmp_path / "d.safetensors", tensors,
                                            {"num_heads": "2"}),
                          f"unsupported dtype {named} for entry 'out_proj.bias'")
        assert "corrupt" not in message

    @pytest.mark.parametrize("dtype", ["<i8", "<u4", "<c16", "|b1", "<M8[s]"])
    def test_unsupported_npz_dtype(self, layer, tmp_path, dtype):
        members = layer_members(layer, **{
            "out_proj.bias.npy": npy_header((8,), dtype) + bytes(8 * np.dtype(dtype).itemsize)})
        message = refused(write_zip(tmp_path / "d.npz", members),
                          f"unsupported dtype {np.dtype(dtype)} for entry 'out_proj.bias'")
        assert "corrupt" not in message


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
class TestTruncated:
    def test_cut_anywhere_names_the_file(self, layer, tmp_path, fmt):
        if fmt == "npz":
            good = write_zip(tmp_path / "w.npz", layer_members(layer)).read_bytes()
        else:
            good = write_safetensors(tmp_path / "w.safetensors", f64_tensors(layer),
                                     {"num_heads": "2"}).read_bytes()
        for cut in (10, len(good) // 3, len(good) // 2, len(good) - 1):
            path = tmp_path / f"cut.{fmt}"
            path.write_bytes(good[:cut])
            refused(path, "truncated or corrupt")
