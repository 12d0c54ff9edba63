"""``MultiHeadAttention.from_transformers`` on Hugging Face decoders' attention
modules with separate q/k/v/o projections, against the modules themselves.

Families: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi and gpt-oss, each
on a tiny random model (``support.hf.tiny_causal_lm``: every attention
parameter redrawn, biases, norm scales and sinks included), and, where a
family alternates sliding and full layers, on one of each. The module runs
on random hidden states with the RoPE tables and the additive mask its own
model gives that layer (``support.hf.run_attention``); the port is called
with ``is_causal=True`` (positions ``0..L-1``).

Comparisons (relative error ‖out − ref‖ / ‖ref‖): float64 against the
module run in float64 (``support.hf.hf_in_float64``: Hugging Face's float32
softmax and RoPE tables in float64) to 1e-10; against the shipped module in
float64 (which rounds those to float32) to 1e-5; float32 against the float32
module to 1e-5; decoding through the cache (a prompt, then one token at a
time) against the module's full causal output to 1e-10; the same
computation through the function API (``qk_norm``, ``rope_frequencies``,
``apply_rotary``, ``scaled_dot_product_attention``) to 1e-10; one case on
every backend.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import mha_xp
from support import rel_err
from support.hf import hf_in_float64, run_attention, tiny_causal_lm

torch = pytest.importorskip("torch", reason="the comparisons with Hugging Face need torch")
transformers = pytest.importorskip(
    "transformers", reason="the comparisons with Hugging Face need transformers")

from transformers import modeling_rope_utils  # noqa: E402

from mha_xp._hf import port_module  # noqa: E402

B, L, E, H, KV, D, W = 2, 11, 64, 4, 2, 16, 4  # W: the sliding window
PROMPT = 5  # decoding: a prompt of 5 positions (longer than the window), then one at a time
TINY = dict(hidden_size=E, num_attention_heads=H, num_key_value_heads=KV, num_hidden_layers=2,
            intermediate_size=32, vocab_size=64)

TOL64, TOL_SHIPPED, TOL32 = 1e-10, 1e-5, 1e-5

_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8, "rope_theta": 500000.0}
_DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
         "rope_theta": 1e6}
_GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096,
                 "rope_theta": 150000.0}
_GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}
_TWO_TYPES = ["sliding_attention", "full_attention"]


def _scaling(params: dict[str, Any]) -> dict[str, Any]:
    """The ``rope_scaling`` of ``params``: its ``rope_theta`` is ``rotary_base``."""
    return {k: v for k, v in params.items() if k != "rope_theta"}


@dataclass(frozen=True)
class Case:
    """One layer of one tiny model: its config (a factory), the layer's
    index, the family's modeling module (for ``hf_in_float64``) and the
    options (and head size) the port must give."""

    make: Any
    layer: int
    modeling: str
    options: dict[str, Any]
    head_dim: int = D
    causal: bool = True
    decodes: bool = True  # through mha_xp's cache

    def config(self) -> Any:
        return self.make()

    def module(self) -> Any:
        return importlib.import_module(f"transformers.models.{self.modeling}.modeling_{self.modeling}")


def _rope(base: float, **more: Any) -> dict[str, Any]:
    return {"rotary": True, "rotary_base": base, **more}


CASES: dict[str, Case] = {
    "llama": Case(lambda: transformers.LlamaConfig(**TINY, head_dim=D), 0, "llama",
                  _rope(10000.0)),
    "llama-bias-llama3": Case(
        lambda: transformers.LlamaConfig(**TINY, head_dim=D, attention_bias=True,
                                         max_position_embeddings=64, rope_parameters=dict(_LLAMA3)),
        1, "llama", _rope(500000.0, rope_scaling=_scaling(_LLAMA3), max_position_embeddings=64)),
    # Dynamic NTK: the frequencies of the whole sequence's length (11 > 8);
    # a cache refuses it (its keys were rotated with the frequencies of before).
    "llama-dynamic": Case(
        lambda: transformers.LlamaConfig(**TINY, head_dim=D, max_position_embeddings=8,
                                         rope_parameters=dict(_DYNAMIC)),
        0, "llama", _rope(10000.0, rope_scaling=_scaling(_DYNAMIC), max_position_embeddings=8),
        decodes=False),
    "mistral-sliding": Case(lambda: transformers.MistralConfig(**TINY, head_dim=D, sliding_window=W),
                            1, "mistral", _rope(10000.0) | {"window": (W - 1, 0)}),
    "mistral-full": Case(lambda: transformers.MistralConfig(**TINY, head_dim=D, sliding_window=None),
                         0, "mistral", _rope(10000.0)),
    # Qwen2/3: layers from max_window_layers on slide (here layer 1).
    "qwen2-full": Case(lambda: transformers.Qwen2Config(**TINY, use_sliding_window=True,
                                                        sliding_window=W, max_window_layers=1),
                       0, "qwen2", _rope(10000.0)),
    "qwen2-sliding-yarn": Case(
        lambda: transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=W,
                                         max_window_layers=1, max_position_embeddings=64,
                                         rope_parameters=dict(_YARN)),
        1, "qwen2", _rope(1e6, rope_scaling=_scaling(_YARN), max_position_embeddings=64) | {"window": (W - 1, 0)}),
    "qwen3-full": Case(lambda: transformers.Qwen3Config(**TINY, head_dim=D, rms_norm_eps=1e-5),
                       0, "qwen3", _rope(10000.0) | {"qk_norm": "rms", "qk_norm_eps": 1e-5,
                                                      "qk_norm_offset": 0.0}),
    "qwen3-sliding-bias": Case(
        lambda: transformers.Qwen3Config(**TINY, head_dim=D, attention_bias=True,
                                         use_sliding_window=True, sliding_window=W, max_window_layers=1),
        1, "qwen3", _rope(10000.0) | {"window": (W - 1, 0), "qk_norm": "rms", "qk_norm_eps": 1e-6}),
    # Gemma 2: layer 0 slides, layer 1 is full; scale 24**-0.5, not 16**-0.5.
    "gemma2-sliding": Case(
        lambda: transformers.Gemma2Config(**TINY, head_dim=D, query_pre_attn_scalar=24,
                                          attn_logit_softcapping=5.0, sliding_window=W),
        0, "gemma2", _rope(10000.0) | {"scale": 24 ** -0.5, "softcap": 5.0, "window": (W - 1, 0)}),
    "gemma2-full": Case(
        lambda: transformers.Gemma2Config(**TINY, head_dim=D, query_pre_attn_scalar=24,
                                          attn_logit_softcapping=5.0, sliding_window=W),
        1, "gemma2", {"scale": 24 ** -0.5, "softcap": 5.0}),
    # Gemma 3: the sliding layers' RoPE base is the local one (10^4), the full
    # layers' 10^6 with linear scaling; attn_logit_softcapping is not applied.
    "gemma3-sliding": Case(
        lambda: transformers.Gemma3TextConfig(**TINY, head_dim=D, query_pre_attn_scalar=24,
                                              attn_logit_softcapping=5.0, sliding_window=W,
                                              layer_types=_TWO_TYPES, rope_parameters=copy.deepcopy(_GEMMA3_ROPE)),
        0, "gemma3", _rope(10000.0) | {"scale": 24 ** -0.5, "window": (W - 1, 0), "qk_norm": "rms",
                                       "qk_norm_offset": 1.0, "qk_norm_eps": 1e-6}),
    "gemma3-full": Case(
        lambda: transformers.Gemma3TextConfig(**TINY, head_dim=D, query_pre_attn_scalar=24,
                                              attn_logit_softcapping=5.0, sliding_window=W,
                                              layer_types=_TWO_TYPES, rope_parameters=copy.deepcopy(_GEMMA3_ROPE)),
        1, "gemma3", _rope(1e6, rope_scaling=_scaling(_GEMMA3_ROPE["full_attention"]))
        | {"scale": 24 ** -0.5, "qk_norm": "rms", "qk_norm_offset": 1.0}),
    # EmbeddingGemma-style: both ways, the sliding layers within 3 positions
    # (sliding_window // 2 + 1 = 3 keys each side, the query's own included).
    "gemma3-bidirectional": Case(
        lambda: transformers.Gemma3TextConfig(**TINY, head_dim=D, sliding_window=W, query_pre_attn_scalar=24,
                                              use_bidirectional_attention=True, layer_types=_TWO_TYPES),
        0, "gemma3", {"window": (2, 2), "scale": 24 ** -0.5, "qk_norm": "rms", "qk_norm_offset": 1.0},
        causal=False),
    # Phi: no head_dim in the config (64 / 4); 12 of the 16 features rotated.
    "phi": Case(lambda: transformers.PhiConfig(**TINY, partial_rotary_factor=0.75),
                1, "phi", _rope(10000.0, rotary_dim=12)),
    "phi-qk-layernorm": Case(
        lambda: transformers.PhiConfig(**TINY, partial_rotary_factor=0.5, qk_layernorm=True,
                                       layer_norm_eps=1e-4),
        0, "phi", _rope(10000.0, rotary_dim=8) | {"qk_norm": "layer", "qk_norm_eps": 1e-4}),
    # gpt-oss: head_dim 24 (H * D = 96 != E), its own YaRN, sinks, biases.
    "gpt-oss-sliding": Case(
        lambda: transformers.GptOssConfig(**TINY, head_dim=24, sliding_window=W, num_local_experts=2,
                                          num_experts_per_tok=1),
        0, "gpt_oss", _rope(150000.0, rope_scaling=_scaling(_GPT_OSS_YARN)) | {"window": (W - 1, 0)},
        head_dim=24),
    "gpt-oss-full": Case(
        lambda: transformers.GptOssConfig(**TINY, head_dim=24, sliding_window=W, num_local_experts=2,
                                          num_experts_per_tok=1),
        1, "gpt_oss", {"rope_scaling": _scaling(_GPT_OSS_YARN)}, head_dim=24),
}

# One case per family: the function-API path.
FAMILY_CASES = ["llama-bias-llama3", "mistral-sliding", "qwen2-sliding-yarn", "qwen3-sliding-bias",
                "gemma2-sliding", "gemma3-full", "phi-qk-layernorm", "gpt-oss-sliding"]
DECODING = [name for name, case in CASES.items() if case.causal and case.decodes]


def _x(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((B, L, E))


def _model64(case: Case, monkeypatch: pytest.MonkeyPatch, x: np.ndarray) -> tuple[Any, Any, np.ndarray]:
    """``(config, module, reference)``: the model built and run in float64
    (its RoPE tables computed in float64 from the start)."""
    config = case.config()
    with hf_in_float64(monkeypatch, case.module(), modeling_rope_utils):
        model = tiny_causal_lm(config, torch.float64)
        ref = run_attention(model, case.layer, torch.from_numpy(x))
    return config, model.model.layers[case.layer].self_attn, ref


def _port(module: Any, config: Any, x: np.ndarray, **kw: Any) -> np.ndarray:
    layer = mha_xp.MultiHeadAttention.from_transformers(module, config, **kw)
    return np.asarray(layer(x, is_causal=port_module(module, config).is_causal))


# -- what the port gives ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_port_gives_the_options(name: str) -> None:
    case = CASES[name]
    config = case.config()
    model = tiny_causal_lm(config, torch.float32)
    ported = port_module(model.model.layers[case.layer].self_attn, config)
    for key, want in case.options.items():
        assert ported.options.get(key) == want, (key, ported.options)
    for key in ("window", "scale", "softcap", "rope_scaling", "qk_norm"):  # only where they apply
        assert (key in ported.options) == (key in case.options), (key, ported.options)
    assert (ported.num_heads, ported.num_kv_heads, ported.is_causal) == (H, KV, case.causal)
    layer = mha_xp.MultiHeadAttention.from_transformers(model.model.layers[case.layer].self_attn, config)
    assert layer.state_dict()["q_proj_weight"].shape == (H * case.head_dim, E)


# -- the forward -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_forward_float64(name: str, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _x(rng)
    config, module, ref = _model64(CASES[name], monkeypatch, x)
    y = _port(module, config, x)
    assert y.dtype == np.float64 and y.shape == (B, L, E)
    assert rel_err(y, ref) <= TOL64


@pytest.mark.parametrize("name", list(CASES))
def test_forward_against_shipped_code(name: str, rng: np.random.Generator) -> None:
    """The module as shipped rounds its softmax and RoPE tables to float32."""
    case, x = CASES[name], _x(rng)
    config = case.config()
    model = tiny_causal_lm(config, torch.float64)
    ref = run_attention(model, case.layer, torch.from_numpy(x))
    assert rel_err(_port(model.model.layers[case.layer].self_attn, config, x), ref) <= TOL_SHIPPED


@pytest.mark.parametrize("name", list(CASES))
def test_forward_float32(name: str, rng: np.random.Generator) -> None:
    case, x = CASES[name], _x(rng).astype(np.float32)
    config = case.config()
    model = tiny_causal_lm(config, torch.float32)
    ref = run_attention(model, case.layer, torch.from_numpy(x))
    y = _port(model.model.layers[case.layer].self_attn, config, x)
    assert y.dtype == np.float32
    assert rel_err(y, ref) <= TOL32


# -- decoding --------------------------------------------------------------------------


def _decode(layer: Any, x: Any, xp: Any) -> Any:
    """A prompt of ``PROMPT`` positions through the cache, then one position at a time."""
    cache = layer.init_cache(B, L)
    y, cache = layer(x[:, :PROMPT, :], cache=cache, is_causal=True)
    outs = [y]
    for t in range(PROMPT, L):
        y, cache = layer(x[:, t:t + 1, :], cache=cache, is_causal=True)
        outs.append(y)
    return xp.concat(outs, axis=1)


@pytest.mark.parametrize("name", DECODING)
def test_decoding_matches_the_full_causal_output(name: str, rng: np.random.Generator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    x = _x(rng)
    config, module, ref = _model64(CASES[name], monkeypatch, x)
    layer = mha_xp.MultiHeadAttention.from_transformers(module, config)
    assert rel_err(_decode(layer, x, np), ref) <= TOL64


# -- through the function API ----------------------------------------------------------


def _np(t: Any) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _linear(x: np.ndarray, lin: Any) -> np.ndarray:
    y = x @ _np(lin.weight).T
    return y if lin.bias is None else y + _np(lin.bias)


def _heads(y: np.ndarray, n: int) -> np.ndarray:
    return y.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


def _qk_norm(module: Any, q: np.ndarray, k: np.ndarray, opts: dict[str, Any]) -> tuple[np.ndarray, ...]:
    names = ("q_norm", "k_norm") if hasattr(module, "q_norm") else ("q_layernorm", "k_layernorm")
    out = []
    for x, name in zip((q, k), names):
        norm = getattr(module, name)
        out.append(mha_xp.qk_norm(x, _np(norm.weight), _np(getattr(norm, "bias", None)),
                                  kind=opts["qk_norm"], eps=opts["qk_norm_eps"],
                                  offset=opts.get("qk_norm_offset", 0.0)))
    return tuple(out)


def _function_api(module: Any, opts: dict[str, Any], x: np.ndarray, causal: bool) -> np.ndarray:
    """The module's attention written with mha_xp's functions, from the
    module's weights and the options the case states."""
    out_lin = module.dense if hasattr(module, "dense") else module.o_proj
    q, k, v = (_heads(_linear(x, getattr(module, f"{n}_proj")), h)
               for n, h in (("q", H), ("k", KV), ("v", KV)))
    if "qk_norm" in opts:
        q, k = _qk_norm(module, q, k, opts)
    dim = opts.get("rotary_dim", q.shape[-1])
    inv_freq, factor = mha_xp.rope_frequencies(
        dim, opts["rotary_base"], scaling=opts.get("rope_scaling"),
        max_position_embeddings=opts.get("max_position_embeddings"), xp=np)
    q, k = (mha_xp.apply_rotary(t, rotary_dim=dim, inv_freq=inv_freq, attention_factor=factor)
            for t in (q, k))
    sinks = getattr(module, "sinks", None)
    o = mha_xp.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=opts.get("scale", q.shape[-1] ** -0.5),
        window=opts.get("window"), softcap=opts.get("softcap"), enable_gqa=True,
        sinks=_np(sinks))
    return _linear(o.transpose(0, 2, 1, 3).reshape(B, L, -1), out_lin)


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_function_api_matches_the_module(name: str, rng: np.random.Generator,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    case, x = CASES[name], _x(rng)
    config, module, ref = _model64(case, monkeypatch, x)
    opts = port_module(module, config).options
    for key, want in case.options.items():  # the options used are those the case states
        assert opts.get(key) == want, key
    assert rel_err(_function_api(module, opts, x, case.causal), ref) <= TOL64


# -- every backend ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt-oss-sliding"])
def test_backends(name: str, backend: Any, rng: np.random.Generator,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Sinks, YaRN, a window, biases and head_dim != E / H on each backend,
    the forward and decoding."""
    x = _x(rng)
    config, module, ref = _model64(CASES[name], monkeypatch, x)
    layer = mha_xp.MultiHeadAttention.from_transformers(module, config, xp=backend.xp,
                                                        device=backend.device)
    xb = backend.asarray(x)
    assert rel_err(backend.to_numpy(layer(xb, is_causal=True)), ref) <= TOL64
    assert rel_err(backend.to_numpy(_decode(layer, xb, backend.cxp)), ref) <= TOL64


# -- errors ----------------------------------------------------------------------------


def test_unknown_module_class_is_a_type_error() -> None:
    config = CASES["llama"].config()
    for module in (torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(8, 2)):
        with pytest.raises(TypeError, match=type(module).__name__) as info:
            mha_xp.MultiHeadAttention.from_transformers(module, config)
        for family in ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                       "Gemma2Attention", "Gemma3Attention", "PhiAttention", "GptOssAttention"):
            assert family in str(info.value)


@pytest.mark.parametrize("name", ["llama", "phi", "gpt-oss-full"])
@pytest.mark.parametrize("heads", [{"num_attention_heads": 8}, {"num_key_value_heads": 1},
                                   {"num_attention_heads": 2, "num_key_value_heads": 4}])
def test_head_counts_that_do_not_fit_are_a_value_error(name: str, heads: dict[str, int]) -> None:
    case = CASES[name]
    config = case.config()
    module = tiny_causal_lm(config, torch.float32).model.layers[case.layer].self_attn
    wrong = copy.deepcopy(config)
    for key, value in heads.items():
        object.__setattr__(wrong, key, value)
    with pytest.raises(ValueError, match="num_attention_heads"):
        mha_xp.MultiHeadAttention.from_transformers(module, wrong)


def test_gemma2_bidirectional_is_a_value_error() -> None:
    config = transformers.Gemma2Config(**TINY, head_dim=D, use_bidirectional_attention=True)
    module = tiny_causal_lm(config, torch.float32).model.layers[0].self_attn
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        mha_xp.MultiHeadAttention.from_transformers(module, config)


def test_dynamic_rope_refuses_a_cache() -> None:
    case = CASES["llama-dynamic"]
    config = case.config()
    module = tiny_causal_lm(config, torch.float32).model.layers[case.layer].self_attn
    layer = mha_xp.MultiHeadAttention.from_transformers(module, config)
    with pytest.raises(ValueError, match="dynamic"):
        layer(np.zeros((B, 3, E), np.float32) + 0.5, cache=layer.init_cache(B, L), is_causal=True)


def test_each_module_class_has_one_port() -> None:
    from mha_xp._hf._decoders import FAMILIES as decoders
    from mha_xp._hf._fused import FAMILIES as fused

    assert not set(decoders) & set(fused)
