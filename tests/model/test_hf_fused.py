"""Ports of Hugging Face attention with fused projections, and of encoders and
encoder-decoders (``mha_xp._hf._fused``), against the modules themselves.

GPT-2 (``Conv1D``), GPT-NeoX (fused per head, partial rotary), BLOOM (ALiBi),
Falcon (its three fused layouts; RoPE or ALiBi), BERT (self-attention and its
output projection), Whisper, BART and T5 (cross- and self-attention): tiny
configs, random weights (biases and norms included), random inputs. Each
module runs as its model would run it (the causal mask, the ALiBi tensor, the
rotary tables passed in), and the port built with
:meth:`mha_xp.MultiHeadAttention.from_transformers` must give its output:

* in float64, with Hugging Face's float32 casts turned into float64
  (``support.hf.hf_in_float64``), to 1e-10; as shipped, to 1e-5;
* in float32, against the float32 module, to 1e-5;
* decoding through the cache (the decoders' causal self-attention), to 1e-10;
* through the function API (projections by hand, then
  :func:`mha_xp.scaled_dot_product_attention` with the port's options), 1e-10;
* on every backend, 1e-10.

The errors: modules of other classes (TypeError), configs whose head counts
do not fit the module (ValueError), T5's relative position bias (ValueError).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import mha_xp
from mha_xp import MultiHeadAttention
from support import Backend, rel_err
from support.hf import hf_in_float64

torch = pytest.importorskip("torch", reason="the comparisons with Hugging Face need torch")
transformers = pytest.importorskip(
    "transformers", reason="the comparisons with Hugging Face need transformers")

from transformers import modeling_rope_utils  # noqa: E402
from transformers.models.bart import modeling_bart  # noqa: E402
from transformers.models.bert import modeling_bert  # noqa: E402
from transformers.models.bloom import modeling_bloom  # noqa: E402
from transformers.models.falcon import modeling_falcon  # noqa: E402
from transformers.models.gpt2 import modeling_gpt2  # noqa: E402
from transformers.models.gpt_neox import modeling_gpt_neox  # noqa: E402
from transformers.models.t5 import modeling_t5  # noqa: E402
from transformers.models.whisper import modeling_whisper  # noqa: E402

from mha_xp._hf import port_module  # noqa: E402
from mha_xp._hf._fused import FAMILIES  # noqa: E402

B, L, S, PROMPT = 2, 7, 9, 4  # batch, query length, encoder length, decode prompt
TOL64, TOL_SHIPPED, TOL32 = 1e-10, 1e-5, 1e-5
IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "vocab_size": 64}


# --- the cases ---------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One attention module of a tiny model, and how its model calls it."""

    family: str
    modeling: Any  # the modeling module whose float32 casts hf_in_float64 swaps
    model: Callable[[], Any]  # builds the model (random weights) in the default dtype
    module: Callable[[Any], Any]  # the attention module of the model
    run: Callable[[Any, Any, Any, Any], Any]  # (module, model, x, enc) -> output tensor
    kind: str = "causal"  # "causal" self-attention, "bidirectional" or "cross"
    bias: Callable[[Any, int], Any] | None = None  # (model, L) -> bias added to the scores
    width: int = 32
    options: dict[str, Any] = field(default_factory=dict)  # some options the port must give


def _causal(x: Any) -> Any:
    """Hugging Face's eager causal mask: additive, (B, 1, L, L)."""
    n = x.shape[1]
    mask = torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
    return mask[None, None].expand(x.shape[0], 1, n, n)


def _positions(x: Any) -> Any:
    return torch.arange(x.shape[1])[None].expand(x.shape[0], -1)


def _ones(x: Any) -> Any:
    return torch.ones(x.shape[:2], dtype=torch.long)


def _gpt2(**kw: Any) -> Callable[[], Any]:
    return lambda: transformers.GPT2Model(transformers.GPT2Config(
        n_embd=32, n_head=4, n_layer=2, n_positions=32, attn_implementation="eager", **IDS, **kw))


def _neox(**kw: Any) -> Callable[[], Any]:
    return lambda: transformers.GPTNeoXModel(transformers.GPTNeoXConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32,
        max_position_embeddings=64, attn_implementation="eager", **IDS, **kw))


def _bloom(heads: int) -> Callable[[], Any]:
    return lambda: transformers.BloomModel(transformers.BloomConfig(
        hidden_size=8 * heads, n_head=heads, n_layer=1, attn_implementation="eager", **IDS))


def _falcon(**kw: Any) -> Callable[[], Any]:
    return lambda: transformers.FalconModel(transformers.FalconConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=64,
        attn_implementation="eager", **IDS, **kw))


def _bert() -> Any:
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32,
        attn_implementation="eager", **IDS), add_pooling_layer=False)


def _whisper() -> Any:
    # Different head counts in encoder and decoder: the port must pick the module's.
    return transformers.WhisperModel(transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
        max_source_positions=16, max_target_positions=16, decoder_start_token_id=0,
        attn_implementation="eager", **IDS))


def _bart() -> Any:
    return transformers.BartModel(transformers.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, attn_implementation="eager", **IDS))


def _t5() -> Any:
    # d_kv * num_heads = 64 != d_model: mha_xp's head_dim differs from E / H.
    return transformers.T5Model(transformers.T5Config(
        d_model=32, d_kv=16, num_heads=4, num_layers=2, d_ff=32, decoder_start_token_id=0,
        attn_implementation="eager", **IDS))


def _t5_position_bias(model: Any, n: int) -> Any:
    """The decoder's relative position bias (its first layer's), (1, H, n, n)."""
    return model.decoder.block[0].layer[0].SelfAttention.compute_bias(n, n)


def _rotary_run(m: Any, model: Any, x: Any, enc: Any) -> Any:
    return m(x, attention_mask=_causal(x),
             position_embeddings=model.rotary_emb(x, _positions(x)))[0]


def _falcon_rotary_run(m: Any, model: Any, x: Any, enc: Any) -> Any:
    return m(x, alibi=None, attention_mask=_causal(x),
             position_embeddings=model.rotary_emb(x, _positions(x)))[0]


def _falcon_alibi_run(m: Any, model: Any, x: Any, enc: Any) -> Any:
    # The model's own ALiBi tensor; with 4 heads and L <= 12 its bfloat16
    # rounding is exact (slopes 4**-k, small integer positions).
    alibi = modeling_falcon.build_alibi_tensor(_ones(x), m.num_heads, x.dtype)
    return m(x, alibi=alibi, attention_mask=_causal(x))[0]


def _bloom_run(m: Any, model: Any, x: Any, enc: Any) -> Any:
    alibi = modeling_bloom.build_alibi_tensor(_ones(x), m.num_heads, x.dtype)
    return m(x, torch.zeros_like(x), alibi=alibi, attention_mask=_causal(x))[0]


CASES: dict[str, Case] = {
    "gpt2": Case("gpt2", modeling_gpt2, _gpt2(), lambda md: md.h[1].attn,
                 lambda m, md, x, e: m(x, attention_mask=_causal(x))[0]),
    "gpt2-layer-scaled": Case(
        "gpt2", modeling_gpt2, _gpt2(scale_attn_by_inverse_layer_idx=True),
        lambda md: md.h[1].attn, lambda m, md, x, e: m(x, attention_mask=_causal(x))[0],
        options={"scale": 8 ** -0.5 / 2}),
    # Scores in float32 (baddbmm), whatever the model's dtype.
    "gpt2-reorder-upcast": Case(
        "gpt2", modeling_gpt2, _gpt2(reorder_and_upcast_attn=True, scale_attn_weights=False),
        lambda md: md.h[0].attn, lambda m, md, x, e: m(x, attention_mask=_causal(x))[0],
        options={"scale": 1.0}),
    "gpt2-cross": Case("gpt2", modeling_gpt2, _gpt2(add_cross_attention=True),
                       lambda md: md.h[0].crossattention,
                       lambda m, md, x, e: m(x, encoder_hidden_states=e)[0], kind="cross"),
    "gpt_neox": Case("gpt_neox", modeling_gpt_neox, _neox(rotary_pct=0.25),
                     lambda md: md.layers[0].attention, _rotary_run, width=64,
                     options={"rotary": True, "rotary_dim": 4}),
    "gpt_neox-linear-rope": Case(
        "gpt_neox", modeling_gpt_neox,
        _neox(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0,
                               "partial_rotary_factor": 0.5}, attention_bias=False),
        lambda md: md.layers[0].attention, _rotary_run, width=64,
        options={"rotary_dim": 8, "rotary_base": 500.0}),
    "bloom": Case("bloom", modeling_bloom, _bloom(4), lambda md: md.h[0].self_attention,
                  _bloom_run),
    "bloom-6-heads": Case("bloom", modeling_bloom, _bloom(6), lambda md: md.h[0].self_attention,
                          _bloom_run, width=48),
    "falcon-multi-query": Case("falcon", modeling_falcon, _falcon(bias=True),
                               lambda md: md.h[0].self_attention, _falcon_rotary_run),
    "falcon-classic": Case("falcon", modeling_falcon, _falcon(multi_query=False),
                           lambda md: md.h[0].self_attention, _falcon_rotary_run),
    "falcon-new-gqa": Case("falcon", modeling_falcon,
                           _falcon(new_decoder_architecture=True, num_kv_heads=2, bias=True),
                           lambda md: md.h[0].self_attention, _falcon_rotary_run),
    "falcon-alibi": Case("falcon", modeling_falcon, _falcon(alibi=True, multi_query=False),
                         lambda md: md.h[0].self_attention, _falcon_alibi_run),
    "falcon-alibi-multi-query": Case("falcon", modeling_falcon, _falcon(alibi=True),
                                     lambda md: md.h[0].self_attention, _falcon_alibi_run),
    "bert": Case("bert", modeling_bert, _bert, lambda md: md.encoder.layer[0].attention,
                 lambda m, md, x, e: m.output.dense(m.self(x)[0]), kind="bidirectional"),
    "whisper-cross": Case("whisper", modeling_whisper, _whisper,
                          lambda md: md.decoder.layers[0].encoder_attn,
                          lambda m, md, x, e: m(x, key_value_states=e)[0], kind="cross"),
    "whisper-decoder-self": Case("whisper", modeling_whisper, _whisper,
                                 lambda md: md.decoder.layers[0].self_attn,
                                 lambda m, md, x, e: m(x, attention_mask=_causal(x))[0]),
    "whisper-encoder-self": Case("whisper", modeling_whisper, _whisper,
                                 lambda md: md.encoder.layers[0].self_attn,
                                 lambda m, md, x, e: m(x)[0], kind="bidirectional"),
    "bart-cross": Case("bart", modeling_bart, _bart,
                       lambda md: md.decoder.layers[0].encoder_attn,
                       lambda m, md, x, e: m(x, key_value_states=e)[0], kind="cross"),
    "bart-decoder-self": Case("bart", modeling_bart, _bart,
                              lambda md: md.decoder.layers[0].self_attn,
                              lambda m, md, x, e: m(x, attention_mask=_causal(x))[0]),
    "t5-cross": Case("t5", modeling_t5, _t5, lambda md: md.decoder.block[0].layer[1].EncDecAttention,
                     lambda m, md, x, e: m(x, key_value_states=e)[0], kind="cross",
                     options={"scale": 1.0}),
    "t5-self-position-bias": Case(
        "t5", modeling_t5, _t5, lambda md: md.decoder.block[1].layer[0].SelfAttention,
        lambda m, md, x, e: m(x, mask=_causal(x), position_bias=_t5_position_bias(md, x.shape[1]))[0],
        bias=_t5_position_bias, options={"scale": 1.0}),
}
DECODING = [name for name, c in CASES.items() if c.kind == "causal" and c.bias is None]
ONE_PER_FAMILY = ["gpt2", "gpt_neox", "bloom", "falcon-new-gqa", "falcon-alibi", "bert",
                  "whisper-cross", "bart-decoder-self", "t5-cross"]


# --- running the modules --------------------------------------------------------

def _randomize(model: Any, seed: int) -> None:
    """Every parameter random (norm scales and biases too, which start at ones
    and zeros), drawn in float64 so that every dtype gets the same values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = min(p.shape) ** -0.5 if p.ndim == 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)


def _inputs(case: Case, name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, name)))
    return rng.standard_normal((B, L, case.width)), rng.standard_normal((B, S, case.width))


@contextlib.contextmanager
def _casts(case: Case, patched: bool) -> Iterator[None]:
    if not patched:
        yield
        return
    with pytest.MonkeyPatch.context() as mp, hf_in_float64(mp, case.modeling, modeling_rope_utils):
        yield


@functools.cache
def _reference(name: str, dtype: str, patched: bool) -> tuple[Any, Any, Any, np.ndarray]:
    """``(model, module, bias or None, output)`` of case ``name`` in ``dtype``,
    with Hugging Face's float32 casts turned into float64 (``patched``) or as
    shipped. The model is built within the same casts (its rotary tables)."""
    case = CASES[name]
    tdtype = getattr(torch, dtype)
    x, enc = (torch.from_numpy(a).to(tdtype) for a in _inputs(case, name))
    with _casts(case, patched), torch.no_grad():
        model = case.model().eval()
        _randomize(model, seed=len(name))
        model = model.to(tdtype)
        module = case.module(model)
        out = case.run(module, model, x, enc)
        bias = None if case.bias is None else case.bias(model, L).numpy()
    return model, module, bias, out.numpy()


def _layer_call(layer: MultiHeadAttention, case: Case, x: Any, enc: Any, bias: Any) -> Any:
    if case.kind == "cross":
        return layer(x, enc)
    return layer(x, bias=bias, is_causal=case.kind == "causal")


def _port(name: str, dtype: str = "float64", patched: bool = True) -> tuple[Any, MultiHeadAttention]:
    model, module, _, _ = _reference(name, dtype, patched)
    return module, MultiHeadAttention.from_transformers(module, model.config)


# --- the forward ----------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_forward_float64(name: str) -> None:
    case = CASES[name]
    model, module, bias, ref = _reference(name, "float64", True)
    ported = port_module(module, model.config)
    assert ported.family == case.family
    assert ported.is_causal == (case.kind == "causal")
    for key, value in case.options.items():
        assert ported.options[key] == pytest.approx(value), (key, ported.options)
    layer = MultiHeadAttention.from_transformers(module, model.config)
    x, enc = _inputs(case, name)
    assert rel_err(_layer_call(layer, case, x, enc, bias), ref) <= TOL64


@pytest.mark.parametrize("name", CASES)
def test_forward_shipped(name: str) -> None:
    """The shipped code, whose rotary tables and softmaxes round to float32."""
    case = CASES[name]
    if name == "gpt2-reorder-upcast":
        pytest.skip("transformers' reorder_and_upcast_attn raises on a float64 model "
                    "(its float32 scores plus the float64 mask are float64)")
    _, layer = _port(name, "float64", False)
    _, _, bias, ref = _reference(name, "float64", False)
    x, enc = _inputs(case, name)
    assert rel_err(_layer_call(layer, case, x, enc, bias), ref) <= TOL_SHIPPED


@pytest.mark.parametrize("name", CASES)
def test_forward_float32(name: str) -> None:
    case = CASES[name]
    _, layer = _port(name, "float32", False)
    assert layer.dtype == np.float32
    _, _, bias, ref = _reference(name, "float32", False)
    x, enc = (a.astype(np.float32) for a in _inputs(case, name))
    out = _layer_call(layer, case, x, enc, bias)
    assert out.dtype == np.float32
    assert rel_err(out, ref) <= TOL32


@pytest.mark.parametrize("name", DECODING)
def test_decode_through_the_cache(name: str) -> None:
    """A prompt, then one token at a time: the module's full causal output."""
    _, layer = _port(name)
    _, _, _, ref = _reference(name, "float64", True)
    x, _ = _inputs(CASES[name], name)
    cache = layer.init_cache(B, L)
    out, cache = layer(x[:, :PROMPT], cache=cache, is_causal=True)
    outs = [out]
    for t in range(PROMPT, L):
        out, cache = layer(x[:, t:t + 1], cache=cache, is_causal=True)
        outs.append(out)
    assert rel_err(np.concatenate(outs, axis=1), ref) <= TOL64


def test_bert_padding_mask() -> None:
    """BERT's additive padding mask is mha_xp's key_padding_mask."""
    model, module, _, _ = _reference("bert", "float64", True)
    x, _ = _inputs(CASES["bert"], "bert")
    pad = np.zeros((B, L), dtype=bool)
    pad[0, -2:] = pad[1, :1] = True
    additive = torch.from_numpy(np.where(pad, torch.finfo(torch.float64).min, 0.0))[:, None, None]
    with torch.no_grad():
        ref = module.output.dense(module.self(torch.from_numpy(x), attention_mask=additive)[0])
    layer = MultiHeadAttention.from_transformers(module, model.config)
    assert rel_err(layer(x, key_padding_mask=pad), ref.numpy()) <= TOL64


def test_falcon_alibi_in_its_model() -> None:
    """The module as FalconModel runs it with SDPA (its default), which folds
    ALiBi / sqrt(D) into the mask it passes: the port on the module's inputs."""
    config = transformers.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                       alibi=True, attn_implementation="sdpa", **IDS)
    model = transformers.FalconModel(config).eval()
    _randomize(model, seed=3)
    model = model.to(torch.float64)
    seen: dict[str, Any] = {}

    def hook(module: Any, args: Any, kwargs: Any, out: Any) -> None:
        seen.update(x=args[0] if args else kwargs["hidden_states"], y=out[0])

    attn = model.h[0].self_attention
    attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(torch.from_numpy(np.random.default_rng(3).integers(0, 64, (B, L))))
    layer = MultiHeadAttention.from_transformers(attn, model.config)
    assert rel_err(layer(seen["x"].numpy(), is_causal=True), seen["y"].numpy()) <= TOL64


# --- the function API -------------------------------------------------------------

def _heads(t: np.ndarray, n: int, d: int) -> np.ndarray:
    return t.reshape(t.shape[0], t.shape[1], n, d).transpose(0, 2, 1, 3)


def _rotate(t: np.ndarray, options: dict[str, Any], d: int) -> np.ndarray:
    """RoPE as the port's options ask, with the function API."""
    positions, rotary_dim = np.arange(t.shape[2]), options.get("rotary_dim")
    if not options.get("rope_scaling"):
        return mha_xp.apply_rotary(t, positions, base=options["rotary_base"], rotary_dim=rotary_dim)
    inv_freq, factor = mha_xp.rope_frequencies(
        rotary_dim or d, options["rotary_base"], scaling=options["rope_scaling"],
        max_position_embeddings=options["max_position_embeddings"], xp=np)
    return mha_xp.apply_rotary(t, positions, rotary_dim=rotary_dim, inv_freq=inv_freq,
                               attention_factor=factor)


@pytest.mark.parametrize("name", CASES)
def test_function_api(name: str) -> None:
    """The port's weights projected by hand (NumPy), then
    scaled_dot_product_attention with the port's options."""
    case = CASES[name]
    model, module, bias, ref = _reference(name, "float64", True)
    ported = port_module(module, model.config)
    sd = {k: v.detach().numpy() for k, v in ported.state_dict.items()}
    H, Hkv, opts = ported.num_heads, ported.num_kv_heads, ported.options
    D = sd["q_proj_weight"].shape[0] // H
    x, enc = _inputs(case, name)
    src = enc if case.kind == "cross" else x
    b = sd.get("in_proj_bias", np.zeros(H * D + 2 * Hkv * D))
    q = _heads(x @ sd["q_proj_weight"].T + b[:H * D], H, D)
    k = _heads(src @ sd["k_proj_weight"].T + b[H * D:(H + Hkv) * D], Hkv, D)
    v = _heads(src @ sd["v_proj_weight"].T + b[(H + Hkv) * D:], Hkv, D)
    if opts.get("rotary"):
        q, k = _rotate(q, opts, D), _rotate(k, opts, D)
    out = mha_xp.scaled_dot_product_attention(
        q, k, v, is_causal=case.kind == "causal", scale=opts.get("scale"), bias=bias,
        alibi_slopes=opts.get("alibi"), enable_gqa=Hkv != H)
    out = out.transpose(0, 2, 1, 3).reshape(B, L, H * D) @ sd["out_proj.weight"].T
    out = out + sd.get("out_proj.bias", 0.0)
    assert rel_err(out, ref) <= TOL64


# --- the backends ----------------------------------------------------------------

@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_backends(backend: Backend, name: str) -> None:
    case = CASES[name]
    model, module, bias, ref = _reference(name, "float64", True)
    layer = MultiHeadAttention.from_transformers(module, model.config, xp=backend.xp,
                                                 device=backend.device)
    x, enc = (backend.asarray(a) for a in _inputs(case, name))
    out = _layer_call(layer, case, x, enc, None if bias is None else backend.asarray(bias))
    assert rel_err(backend.to_numpy(out), ref) <= TOL64


# --- the errors ----------------------------------------------------------------

def test_families_registered() -> None:
    assert {"GPT2Attention", "GPTNeoXAttention", "BloomAttention", "FalconAttention",
            "BertAttention", "WhisperAttention", "BartAttention", "T5Attention"} <= set(FAMILIES)


@pytest.mark.parametrize("make", [lambda md: md.h[0].mlp, lambda md: torch.nn.Linear(4, 4)],
                         ids=["GPT2MLP", "Linear"])
def test_unknown_module_class(make: Callable[[Any], Any]) -> None:
    model, _, _, _ = _reference("gpt2", "float64", True)
    with pytest.raises(TypeError, match="GPT2Attention"):
        MultiHeadAttention.from_transformers(make(model), model.config)


# name: (config attribute, wrong value, message)
WRONG_HEADS = {
    "gpt2": ("n_head", 8, "num_attention_heads=8"),
    "gpt_neox": ("num_attention_heads", 8, "heads of 8 features"),
    "bloom": ("n_head", 2, "num_attention_heads=2"),
    "falcon-classic": ("num_attention_heads", 8, "num_attention_heads=8"),
    "falcon-new-gqa": ("num_kv_heads", 1, "num_kv_heads=1"),
    "bert": ("num_attention_heads", 3, "num_attention_heads=3"),
    "whisper-cross": ("decoder_attention_heads", 2, "decoder_attention_heads=2"),
    "bart-cross": ("decoder_attention_heads", 8, "decoder_attention_heads=8"),
    "t5-cross": ("d_kv", 8, "d_kv=8"),
}


@pytest.mark.parametrize("name", WRONG_HEADS)
def test_config_head_counts_that_do_not_fit(name: str) -> None:
    attr, value, message = WRONG_HEADS[name]
    model, module, _, _ = _reference(name, "float64", True)
    config = copy.deepcopy(model.config)
    setattr(config, attr, value)
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention.from_transformers(module, config)


def test_falcon_heads_that_do_not_divide() -> None:
    model, module, _, _ = _reference("falcon-new-gqa", "float64", True)
    config = copy.deepcopy(model.config)
    config.num_kv_heads = 3
    module = copy.deepcopy(module)
    module.num_kv_heads = 3
    with pytest.raises(ValueError, match="does not divide"):
        MultiHeadAttention.from_transformers(module, config)


def test_t5_relative_position_bias_is_refused() -> None:
    model, _, _, _ = _reference("t5-cross", "float64", True)
    module = model.encoder.block[0].layer[0].SelfAttention
    assert module.has_relative_attention_bias
    with pytest.raises(ValueError, match="relative position bias.*bias="):
        MultiHeadAttention.from_transformers(module, model.config)
