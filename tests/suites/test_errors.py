"""Bad input gets a clear TypeError/ValueError that names the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mha_xp
from support import make_backend

MHA = mha_xp.MultiHeadAttention
sdpa = mha_xp.scaled_dot_product_attention


@pytest.fixture
def qkv(rng):
    return [rng.standard_normal(s) for s in [(2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 6)]]


class TestSDPAErrors:
    @pytest.mark.parametrize("which", [0, 1, 2])
    def test_not_an_array(self, qkv, which):
        qkv[which] = qkv[which].tolist()
        name = ["query", "key", "value"][which]
        with pytest.raises(TypeError, match=rf"{name} must be an array.*got list"):
            sdpa(*qkv)

    def test_wrong_rank(self, qkv):
        with pytest.raises(ValueError, match=r"query must have at least 2 dimensions.*\(8,\)"):
            sdpa(qkv[0][0, 0, 0], *qkv[1:])
        with pytest.raises(ValueError, match="same number of dimensions"):
            sdpa(qkv[0][0], *qkv[1:])

    def test_feature_mismatch(self, qkv, rng):
        with pytest.raises(ValueError, match="query and key must have the same feature size"):
            sdpa(qkv[0], rng.standard_normal((2, 3, 5, 7)), qkv[2])

    def test_key_value_lengths_differ(self, qkv, rng):
        with pytest.raises(ValueError, match=r"key and value must have the same length.*\(2, 3, 6, 6\)"):
            sdpa(qkv[0], qkv[1], rng.standard_normal((2, 3, 6, 6)))

    def test_batch_dims_do_not_broadcast(self, qkv, rng):
        with pytest.raises(ValueError, match="do not broadcast"):
            sdpa(qkv[0], rng.standard_normal((2, 2, 5, 8)), rng.standard_normal((2, 2, 5, 6)))

    @pytest.mark.parametrize("dt", [np.int64, np.int32, np.bool_, np.complex128])
    def test_non_floating_inputs(self, qkv, dt):
        with pytest.raises(TypeError, match=r"key must have a real floating dtype.*got"):
            sdpa(qkv[0], qkv[1].astype(dt), qkv[2])

    def test_mixed_dtypes(self, qkv):
        with pytest.raises(TypeError, match=r"value has dtype float32 but query has dtype float64"):
            sdpa(qkv[0], qkv[1], qkv[2].astype(np.float32))

    def test_float_mask(self, qkv):
        with pytest.raises(TypeError, match=r"mask must be a boolean array.*float64.*bias="):
            sdpa(*qkv, mask=np.zeros((4, 5)))

    def test_int_mask(self, qkv):
        with pytest.raises(TypeError, match="mask must be a boolean array"):
            sdpa(*qkv, mask=np.ones((4, 5), dtype=np.int64))

    def test_mask_not_broadcastable(self, qkv):
        with pytest.raises(ValueError, match=r"mask must broadcast to the attention scores.*\(2, 3, 4, 5\).*\(5, 4\)"):
            sdpa(*qkv, mask=np.ones((5, 4), dtype=bool))
        with pytest.raises(ValueError, match="mask must broadcast"):  # would enlarge the output
            sdpa(*qkv, mask=np.ones((7, 2, 3, 4, 5), dtype=bool))

    def test_bad_bias(self, qkv):
        with pytest.raises(TypeError, match="bias must be a float array.*boolean"):
            sdpa(*qkv, bias=np.ones((4, 5), dtype=bool))
        with pytest.raises(TypeError, match="bias has dtype float32 but the inputs are float64"):
            sdpa(*qkv, bias=np.ones((4, 5), dtype=np.float32))
        with pytest.raises(ValueError, match="bias must broadcast"):
            sdpa(*qkv, bias=np.ones((4, 6)))

    @pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf, -math.inf])
    def test_scale_not_positive_finite(self, qkv, scale):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            sdpa(*qkv, scale=scale)

    @pytest.mark.parametrize("scale", ["0.5", True, np.ones(1), [0.5]])
    def test_scale_not_a_number(self, qkv, scale):
        with pytest.raises(TypeError, match="scale must be a positive finite Python float"):
            sdpa(*qkv, scale=scale)

    def test_mixed_namespaces(self, qkv):
        strict = make_backend("array_api_strict")
        with pytest.raises(TypeError, match=r"key is an array_api_strict array but query is a numpy array"):
            sdpa(qkv[0], strict.asarray(qkv[1]), qkv[2])
        with pytest.raises(TypeError, match=r"mask is an array_api_strict array but query is a numpy array"):
            sdpa(*qkv, mask=strict.asarray(np.ones((4, 5), dtype=bool)))

    def test_mixed_devices(self, qkv):
        strict = make_backend("array_api_strict")
        d1 = make_backend("array_api_strict:device1")
        with pytest.raises(ValueError, match=r"value is on device .*device1.* but query is on device"):
            sdpa(strict.asarray(qkv[0]), strict.asarray(qkv[1]), d1.asarray(qkv[2]))

    def test_torch_mixed_with_numpy(self, qkv):
        torch = pytest.importorskip("torch", reason="optional backend torch not installed")
        with pytest.raises(TypeError, match="key is a torch array but query is a numpy array"):
            sdpa(qkv[0], torch.asarray(qkv[1]), qkv[2])


class TestLayerConstructionErrors:
    def test_embed_dim_not_divisible(self):
        with pytest.raises(ValueError, match=r"embed_dim \(10\) must be divisible by num_heads \(3\)"):
            MHA(10, 3)

    @pytest.mark.parametrize("arg", ["embed_dim", "num_heads", "kdim", "vdim"])
    @pytest.mark.parametrize("value,exc", [(0, ValueError), (-4, ValueError), (2.5, TypeError),
                                           ("8", TypeError), (True, TypeError)])
    def test_sizes(self, arg, value, exc):
        kwargs = {"embed_dim": 8, "num_heads": 2} | {arg: value}
        with pytest.raises(exc, match=f"{arg} must be a positive int"):
            MHA(kwargs.pop("embed_dim"), kwargs.pop("num_heads"), **kwargs)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="dtype must be a real floating dtype of numpy, got int64"):
            MHA(8, 2, dtype=np.int64)

    def test_not_a_namespace(self):
        with pytest.raises(TypeError, match="xp must be an array API namespace"):
            MHA(8, 2, xp=math)


class TestLayerCallErrors:
    @pytest.fixture
    def layer(self):
        return MHA(8, 2, kdim=4, vdim=6, seed=0)

    @pytest.fixture
    def xkv(self, rng):
        return [rng.standard_normal(s) for s in [(2, 3, 8), (2, 5, 4), (2, 5, 6)]]

    def test_integer_input(self, layer, xkv):
        with pytest.raises(TypeError, match="query must have a real floating dtype.*int64"):
            layer(xkv[0].astype(np.int64), *xkv[1:])

    def test_dtype_differs_from_layer(self, layer, xkv):
        with pytest.raises(TypeError, match=r"key has dtype float32 but the layer's weights are float64.*layer.to\(dtype"):
            layer(xkv[0], xkv[1].astype(np.float32), xkv[2])

    def test_wrong_rank(self, layer, xkv):
        with pytest.raises(ValueError, match=r"query must be \(B, L, E\) or unbatched \(L, E\)"):
            layer(xkv[0][None], *xkv[1:])
        with pytest.raises(ValueError, match="key must have the rank of query"):
            layer(xkv[0], xkv[1][0], xkv[2])

    def test_feature_sizes(self, layer, xkv, rng):
        with pytest.raises(ValueError, match=r"query must have 8 features \(embed_dim\)"):
            layer(rng.standard_normal((2, 3, 7)), *xkv[1:])
        with pytest.raises(ValueError, match=r"key must have 4 features \(kdim\)"):
            layer(xkv[0], xkv[2], xkv[2])
        with pytest.raises(ValueError, match=r"value must have 6 features \(vdim\)"):
            layer(xkv[0], xkv[1], xkv[1])

    def test_key_value_lengths_differ(self, layer, xkv, rng):
        with pytest.raises(ValueError, match="key and value must have the same batch size and length"):
            layer(xkv[0], xkv[1], rng.standard_normal((2, 4, 6)))

    def test_batch_sizes_differ(self, layer, xkv, rng):
        with pytest.raises(ValueError, match="query and key must have the same batch size"):
            layer(xkv[0], *(rng.standard_normal((3, 5, d)) for d in (4, 6)))

    def test_key_padding_mask(self, layer, xkv):
        with pytest.raises(TypeError, match="key_padding_mask must be a boolean array.*True marks padding"):
            layer(*xkv, key_padding_mask=np.zeros((2, 5)))
        with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, S\) = \(2, 5\), got \(5,\)"):
            layer(*xkv, key_padding_mask=np.zeros(5, dtype=bool))

    def test_mask(self, layer, xkv):
        with pytest.raises(TypeError, match="mask must be a boolean array"):
            layer(*xkv, mask=np.zeros((3, 5)))
        with pytest.raises(ValueError, match=r"mask must broadcast to the attention scores \(B, H, L, S\) = \(2, 2, 3, 5\)"):
            layer(*xkv, mask=np.ones((3, 4), dtype=bool))

    def test_bias(self, layer, xkv):
        with pytest.raises(TypeError, match="bias has dtype float32"):
            layer(*xkv, bias=np.zeros((3, 5), dtype=np.float32))

    def test_namespace_differs_from_layer(self, layer, xkv):
        strict = make_backend("array_api_strict")
        with pytest.raises(TypeError, match=r"query is an array_api_strict array but the layer's weights are numpy arrays.*layer.to\(xp="):
            layer(strict.asarray(xkv[0]), *xkv[1:])

    def test_device_differs_from_layer(self, xkv):
        strict, d1 = make_backend("array_api_strict"), make_backend("array_api_strict:device1")
        layer = MHA(8, 2, kdim=4, vdim=6, xp=strict.xp, seed=0)
        with pytest.raises(ValueError, match=r"query is on device .*device1.*layer.to\("):
            layer(*(d1.asarray(t) for t in xkv))


class TestWeightsErrors:
    @pytest.fixture
    def sd(self):
        return MHA(8, 2, seed=0).state_dict()

    def test_missing_entry(self, sd):
        del sd["out_proj.weight"]
        with pytest.raises(ValueError, match=r"missing \['out_proj.weight'\]"):
            MHA.from_state_dict(sd, num_heads=2)

    def test_extra_entry(self, sd):
        sd["bias_k"] = np.zeros((1, 1, 8))
        with pytest.raises(ValueError, match=r"unexpected \['bias_k'\].*add_bias_kv"):
            MHA.from_state_dict(sd, num_heads=2)

    def test_misshaped_entry(self, sd):
        sd["in_proj_bias"] = np.zeros(23)
        with pytest.raises(ValueError, match=r"in_proj_bias must have shape \(24,\) for embed_dim=8, got \(23,\)"):
            MHA.from_state_dict(sd, num_heads=2)
        sd["in_proj_bias"] = np.zeros(24)
        sd["in_proj_weight"] = np.zeros((24, 7))
        with pytest.raises(ValueError, match=r"in_proj_weight must have shape \(24, 8\)"):
            MHA.from_state_dict(sd, num_heads=2)

    def test_num_heads_does_not_divide(self, sd):
        # The output projection's columns are num_heads * head_dim (embed_dim here).
        with pytest.raises(ValueError, match=r"the 8 columns of out_proj.weight .* must be divisible by num_heads \(3\)"):
            MHA.from_state_dict(sd, num_heads=3)

    def test_mixed_dtypes(self, sd):
        sd["out_proj.bias"] = sd["out_proj.bias"].astype(np.float32)
        with pytest.raises(TypeError, match="out_proj.bias has dtype float32 but out_proj.weight has float64"):
            MHA.from_state_dict(sd, num_heads=2)

    def test_non_array_entry(self, sd):
        sd["out_proj.bias"] = [0.0] * 8
        with pytest.raises(TypeError, match="out_proj.bias must be an array, got list"):
            MHA.from_state_dict(sd, num_heads=2)

    def test_not_a_mapping(self):
        with pytest.raises(TypeError, match="state_dict must be a mapping"):
            MHA.from_state_dict([("in_proj_weight", np.zeros((3, 3)))], num_heads=1)

    def test_from_weights_shapes(self, rng):
        W = {n: rng.standard_normal((6, 6)) for n in ("q_weight", "k_weight", "v_weight", "out_weight")}
        with pytest.raises(ValueError, match=r"k_weight must have 6 rows"):
            MHA.from_weights(**(W | {"k_weight": rng.standard_normal((5, 6))}), num_heads=2)
        with pytest.raises(ValueError, match=r"q_bias must have shape \(6,\)"):
            MHA.from_weights(**W, q_bias=np.zeros(5), num_heads=2)
        with pytest.raises(ValueError, match=r"out_weight must be 2-D"):
            MHA.from_weights(**(W | {"out_weight": np.zeros(6)}), num_heads=2)
        with pytest.raises(TypeError, match="v_weight must be an array"):
            MHA.from_weights(**(W | {"v_weight": None}), num_heads=2)

    def test_from_torch_rejects_other_modules(self):
        torch = pytest.importorskip("torch", reason="optional backend torch not installed")
        with pytest.raises(TypeError, match="module must be a torch.nn.MultiheadAttention, got Linear"):
            MHA.from_torch(torch.nn.Linear(4, 4))
