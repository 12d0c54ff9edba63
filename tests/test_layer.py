"""MultiHeadAttention against the float64 reference, torch parity, weights I/O."""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from support import assert_close, assert_preserved, make_backend, rel_err
from support.reference import ref_mha

MHA = mha_xp.MultiHeadAttention


def _host_params(layer, backend):
    return {n: backend.to_numpy(w) for n, w in layer.state_dict().items()}


class TestAgainstReference:
    @pytest.mark.parametrize("bias", [True, False])
    def test_self_attention(self, backend, dtype, rng, bias):
        layer = MHA(16, 4, bias=bias, xp=backend.xp, device=backend.device,
                    dtype=backend.dtype(dtype), seed=3)
        if bias:  # torch's init zeroes the biases; draw some so they are tested
            sd = {n: backend.to_numpy(w) for n, w in layer.state_dict().items()}
            sd["in_proj_bias"] = rng.standard_normal(48)
            sd["out_proj.bias"] = rng.standard_normal(16)
            layer = MHA.from_state_dict({n: backend.asarray(w, dtype) for n, w in sd.items()},
                                        num_heads=4)
        x = rng.standard_normal((3, 7, 16))
        y, w = layer(backend.asarray(x, dtype), return_weights=True, average_weights=False)
        assert_preserved(backend, y, dtype, (3, 7, 16))
        assert_preserved(backend, w, dtype, (3, 4, 7, 7))
        ref_y, ref_w = ref_mha(_host_params(layer, backend), 4, x)
        assert_close(backend.to_numpy(y), ref_y, dtype)
        assert_close(backend.to_numpy(w), ref_w, dtype)

    def test_cross_attention_kdim_vdim_all_masks(self, backend, dtype, rng):
        layer = MHA(12, 3, kdim=5, vdim=7, xp=backend.xp, device=backend.device,
                    dtype=backend.dtype(dtype), seed=4)
        q, k, v = rng.standard_normal((2, 6, 12)), rng.standard_normal((2, 9, 5)), rng.standard_normal((2, 9, 7))
        pad = rng.random((2, 9)) < 0.3
        pad[:, -1] = False  # keep the bottom-right key so causal rows are never empty
        mask = rng.random((2, 1, 6, 9)) < 0.8
        bias = rng.standard_normal((3, 6, 9))
        y, w = layer(*(backend.asarray(t, dtype) for t in (q, k, v)),
                     key_padding_mask=backend.asarray(pad), mask=backend.asarray(mask),
                     bias=backend.asarray(bias, dtype), is_causal=True, return_weights=True)
        assert_preserved(backend, y, dtype, (2, 6, 12))
        assert_preserved(backend, w, dtype, (2, 6, 9))
        ref_y, ref_w = ref_mha(_host_params(layer, backend), 3, q, k, v, key_padding_mask=pad,
                               allowed=mask, bias=bias, is_causal=True)
        assert_close(backend.to_numpy(y), ref_y, dtype)
        assert_close(backend.to_numpy(w), ref_w.mean(axis=1), dtype)

    def test_unbatched(self, backend, dtype, rng):
        layer = MHA(8, 2, xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype), seed=5)
        x, kv = rng.standard_normal((5, 8)), rng.standard_normal((6, 8))
        pad = np.array([False, True, False, False, True, False])
        y, w = layer(backend.asarray(x, dtype), backend.asarray(kv, dtype),
                     key_padding_mask=backend.asarray(pad), return_weights=True, average_weights=False)
        assert_preserved(backend, y, dtype, (5, 8))
        assert_preserved(backend, w, dtype, (2, 5, 6))
        ref_y, ref_w = ref_mha(_host_params(layer, backend), 2, x[None], kv[None],
                               key_padding_mask=pad[None])
        assert_close(backend.to_numpy(y), ref_y[0], dtype)
        assert_close(backend.to_numpy(w), ref_w[0], dtype)

    def test_key_defaults(self, backend, dtype, rng):
        layer = MHA(8, 2, xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype), seed=6)
        x, kv = (backend.asarray(rng.standard_normal(s), dtype) for s in [(2, 4, 8), (2, 5, 8)])
        np.testing.assert_array_equal(backend.to_numpy(layer(x)), backend.to_numpy(layer(x, x, x)))
        np.testing.assert_array_equal(backend.to_numpy(layer(x, kv)), backend.to_numpy(layer(x, kv, kv)))
        np.testing.assert_array_equal(backend.to_numpy(layer(x, value=kv)),
                                      backend.to_numpy(layer(x, kv, kv)))

    def test_fully_masked_query_gives_output_bias(self, backend, dtype, rng):
        E = 8
        sd = {"in_proj_weight": rng.standard_normal((3 * E, E)), "in_proj_bias": rng.standard_normal(3 * E),
              "out_proj.weight": rng.standard_normal((E, E)), "out_proj.bias": rng.standard_normal(E)}
        layer = MHA.from_state_dict({n: backend.asarray(w, dtype) for n, w in sd.items()}, num_heads=2)
        mask = np.ones((3, 4), dtype=bool)
        mask[1] = False
        y, w = layer(backend.asarray(rng.standard_normal((2, 3, E)), dtype),
                     backend.asarray(rng.standard_normal((2, 4, E)), dtype),
                     mask=backend.asarray(mask), return_weights=True)
        y, w = backend.to_numpy(y), backend.to_numpy(w)
        assert np.all(np.isfinite(y)) and np.all(w[:, 1] == 0)
        np.testing.assert_allclose(y[:, 1], np.broadcast_to(sd["out_proj.bias"], (2, E)), rtol=1e-6)


class TestPaddingIsInert:
    def test_nan_and_inf_in_padded_keys_and_values(self, backend, dtype, rng):
        layer = MHA(8, 2, xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype), seed=7)
        q, kv = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 5, 8))
        pad = np.array([[False, True, False, False, True], [False, False, False, True, True]])
        clean, dirty = kv.copy(), kv.copy()
        clean[pad] = 0.0
        dirty[pad] = np.where(rng.random(dirty[pad].shape) < 0.5, np.nan, np.inf)
        out = [backend.to_numpy(layer(backend.asarray(q, dtype), backend.asarray(t, dtype),
                                      key_padding_mask=backend.asarray(pad)))
               for t in (clean, dirty)]
        np.testing.assert_array_equal(out[0], out[1])
        assert np.all(np.isfinite(out[1]))


class TestInitialisation:
    def test_seed_gives_same_weights_on_every_backend(self, backend, dtype):
        ref = MHA(16, 4, kdim=6, seed=11, dtype=getattr(np, dtype))
        here = MHA(16, 4, kdim=6, seed=11, xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))
        assert list(here.state_dict()) == list(ref.state_dict())
        for name, w in ref.state_dict().items():
            np.testing.assert_array_equal(backend.to_numpy(here.state_dict()[name]), w)

    def test_torch_scheme(self):
        layer = MHA(64, 8, seed=0)
        sd = layer.state_dict()
        bound = np.sqrt(6 / (64 + 3 * 64))  # Xavier-uniform on the packed (3E, E) weight
        assert np.abs(sd["in_proj_weight"]).max() <= bound
        assert np.abs(sd["in_proj_weight"]).max() > 0.9 * bound
        assert np.abs(sd["out_proj.weight"]).max() <= 1 / 8
        assert not np.any(sd["in_proj_bias"]) and not np.any(sd["out_proj.bias"])
        other = MHA(64, 8, seed=1).state_dict()["in_proj_weight"]
        assert not np.array_equal(sd["in_proj_weight"], other)

    def test_default_dtype_is_the_namespaces(self, backend):
        layer = MHA(8, 2, xp=backend.xp, device=backend.device)
        info = backend.cxp.__array_namespace_info__()
        assert layer.dtype == info.default_dtypes(device=backend.device)["real floating"]


class TestWeightsIO:
    def test_state_dict_round_trip(self, backend, dtype, rng):
        for kdim in (None, 5):
            layer = MHA(8, 2, kdim=kdim, xp=backend.xp, device=backend.device,
                        dtype=backend.dtype(dtype), seed=8)
            again = MHA.from_state_dict(layer.state_dict(), num_heads=2)
            assert again.xp is layer.xp and again.device == layer.device and again.dtype == layer.dtype
            for name, w in layer.state_dict().items():
                np.testing.assert_array_equal(backend.to_numpy(again.state_dict()[name]), backend.to_numpy(w))

    def test_from_weights_equals_state_dict(self, backend, dtype, rng):
        E, kdim, vdim = 6, 4, 3
        W = {"q_weight": (E, E), "k_weight": (E, kdim), "v_weight": (E, vdim), "out_weight": (E, E)}
        W = {n: rng.standard_normal(s) for n, s in W.items()}
        b = {n: rng.standard_normal(E) for n in ("q_bias", "k_bias", "v_bias", "out_bias")}
        layer = MHA.from_weights(**{n: backend.asarray(a, dtype) for n, a in (W | b).items()}, num_heads=3)
        sd = _host_params(layer, backend)
        assert sorted(sd) == ["in_proj_bias", "k_proj_weight", "out_proj.bias", "out_proj.weight",
                              "q_proj_weight", "v_proj_weight"]
        np.testing.assert_array_equal(sd["k_proj_weight"], W["k_weight"].astype(dtype))
        np.testing.assert_array_equal(sd["in_proj_bias"],
                                      np.concatenate([b["q_bias"], b["k_bias"], b["v_bias"]]).astype(dtype))
        x, kv, vv = rng.standard_normal((2, 3, E)), rng.standard_normal((2, 4, kdim)), rng.standard_normal((2, 4, vdim))
        y = layer(*(backend.asarray(t, dtype) for t in (x, kv, vv)))
        assert_close(backend.to_numpy(y), ref_mha(sd, 3, x, kv, vv)[0], dtype)

    def test_from_weights_missing_biases_are_zero(self, rng):
        W = [rng.standard_normal((4, 4)) for _ in range(4)]
        ob = rng.standard_normal(4)
        layer = MHA.from_weights(q_weight=W[0], k_weight=W[1], v_weight=W[2], out_weight=W[3],
                                 out_bias=ob, num_heads=2)
        np.testing.assert_array_equal(layer.state_dict()["in_proj_bias"], np.zeros(12))
        np.testing.assert_array_equal(layer.state_dict()["out_proj.bias"], ob)
        nobias = MHA.from_weights(q_weight=W[0], k_weight=W[1], v_weight=W[2], out_weight=W[3], num_heads=2)
        assert "in_proj_bias" not in nobias.state_dict()

    def test_to_moves_between_backends(self, backend, dtype, rng):
        src = MHA(8, 2, seed=9, dtype=np.float64)
        moved = src.to(xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))
        assert moved.dtype == backend.dtype(dtype) and src.dtype == np.float64
        x = rng.standard_normal((2, 4, 8))
        assert_close(backend.to_numpy(moved(backend.asarray(x, dtype))), src(x), dtype)
        back = moved.to(xp=np, dtype=np.float64)
        assert back.xp is src.xp


torch = pytest.importorskip("torch", reason="optional backend torch not installed")


def _torch_case(rng, *, batch_first, kdim, bias):
    torch.manual_seed(int(rng.integers(2**31)))
    m = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    with torch.no_grad():  # torch zeroes biases at init: give them values
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_()
    return m


class TestTorchParity:
    """from_torch(m) reproduces torch.nn.MultiheadAttention, float32, ≤ 1e-5 relative."""

    @pytest.mark.parametrize("batch_first", [True, False])
    @pytest.mark.parametrize("kdim", [None, 6])
    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("xp_name", ["numpy", "torch", "array_api_strict"])
    def test_module_parity(self, rng, batch_first, kdim, bias, xp_name):
        m = _torch_case(rng, batch_first=batch_first, kdim=kdim, bias=bias)
        target = make_backend(xp_name)
        layer = MHA.from_torch(m, xp=target.xp)
        assert layer.dtype == target.dtype("float32")
        B, L, S = 3, 5, 7
        q = rng.standard_normal((B, L, 16)).astype(np.float32)
        kv = rng.standard_normal((B, S, kdim or 16)).astype(np.float32)
        pad = rng.random((B, S)) < 0.3
        pad[:, 0] = False  # torch's MHA gives NaN for fully masked rows; ours gives zeros
        keep = rng.random((L, S)) < 0.7
        keep[:, 0] = True
        causal = np.tril(np.ones((L, S), dtype=bool), k=S - L)
        for kwargs, torch_kwargs in [
            ({}, {}),
            ({"key_padding_mask": pad}, {"key_padding_mask": torch.asarray(pad)}),
            ({"mask": keep}, {"attn_mask": torch.asarray(~keep)}),
            ({"is_causal": True, "key_padding_mask": pad},
             {"attn_mask": torch.asarray(~causal), "key_padding_mask": torch.asarray(pad)}),
        ]:
            for average in (True, False):
                y, w = layer(target.asarray(q), target.asarray(kv), target.asarray(kv),
                             **{n: target.asarray(a) for n, a in kwargs.items() if n != "is_causal"},
                             is_causal=kwargs.get("is_causal", False),
                             return_weights=True, average_weights=average)
                tq, tkv = torch.asarray(q), torch.asarray(kv)
                if not batch_first:
                    tq, tkv = tq.transpose(0, 1), tkv.transpose(0, 1)
                with torch.no_grad():
                    ty, tw = m(tq, tkv, tkv, need_weights=True, average_attn_weights=average, **torch_kwargs)
                if not batch_first:
                    ty = ty.transpose(0, 1)
                assert rel_err(target.to_numpy(y), ty.numpy()) <= 1e-5, kwargs
                assert rel_err(target.to_numpy(w), tw.numpy()) <= 1e-5, kwargs

    def test_unbatched_parity(self, rng):
        m = _torch_case(rng, batch_first=True, kdim=None, bias=True)
        layer = MHA.from_torch(m)
        x = rng.standard_normal((5, 16)).astype(np.float32)
        pad = np.array([False, False, True, False, False])
        for average in (True, False):
            y, w = layer(x, key_padding_mask=pad, return_weights=True, average_weights=average)
            with torch.no_grad():
                ty, tw = m(*(torch.asarray(x),) * 3, key_padding_mask=torch.asarray(pad),
                           average_attn_weights=average)
            assert y.shape == tuple(ty.shape) and w.shape == tuple(tw.shape)
            assert rel_err(y, ty.numpy()) <= 1e-5 and rel_err(w, tw.numpy()) <= 1e-5

    def test_float64_module_keeps_dtype(self, rng):
        m = _torch_case(rng, batch_first=True, kdim=None, bias=True).double()
        layer = MHA.from_torch(m)
        assert layer.dtype == np.float64
        x = rng.standard_normal((2, 4, 16))
        with torch.no_grad():
            ty = m(*(torch.asarray(x),) * 3, need_weights=False)[0]
        assert rel_err(layer(x), ty.numpy()) <= 1e-12

    @pytest.mark.parametrize("kdim", [None, 6])
    def test_torch_state_dict_loads_and_round_trips(self, rng, kdim):
        m = _torch_case(rng, batch_first=True, kdim=kdim, bias=True)
        sd = m.state_dict()
        layer = MHA.from_state_dict(sd, num_heads=4, xp=np)
        assert list(layer.state_dict()) == list(sd)
        m2 = torch.nn.MultiheadAttention(16, 4, batch_first=True, kdim=kdim, vdim=kdim).eval()
        m2.load_state_dict({n: torch.asarray(w) for n, w in layer.state_dict().items()})
        for name, t in m2.state_dict().items():
            np.testing.assert_array_equal(t.numpy(), sd[name].numpy())
        in_torch = MHA.from_state_dict(sd, num_heads=4)  # stays in torch
        assert in_torch.xp.__name__.endswith("torch")

    def test_port_does_not_share_memory(self, rng):
        m = _torch_case(rng, batch_first=True, kdim=None, bias=True)
        ports = [MHA.from_torch(m), MHA.from_state_dict(m.state_dict(), num_heads=4, xp=np),
                 MHA.from_torch(m, xp=torch).to(xp=np)]
        before = [p.state_dict()["in_proj_weight"].copy() for p in ports]
        with torch.no_grad():
            m.in_proj_weight.add_(1.0)
        for port, weights in zip(ports, before):
            np.testing.assert_array_equal(port.state_dict()["in_proj_weight"], weights)
