"""RoPE scaling (``mha_xp._model._rope``) against Hugging Face transformers.

Frequencies and attention factors against ``ROPE_INIT_FUNCTIONS`` of
``transformers.modeling_rope_utils`` on tiny configs of several model
families; cosine and sine tables against ``LlamaRotaryEmbedding`` (which
serves every ``rope_type``). Hugging Face computes both in float32
(``torch.float``, ``.float()``) even in a float64 model: each comparison is
made with its shipped code at float32's rounding, and with the same code run
in float64 (``support.hf.hf_in_float64`` swaps the dtype, not the
formulas) at float64's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from support import assert_preserved
from support.hf import hf_in_float64
from mha_xp._model._rope import rope_frequencies, rope_tables

torch = pytest.importorskip("torch", reason="the comparisons with Hugging Face need torch")
transformers = pytest.importorskip(
    "transformers", reason="the comparisons with Hugging Face need transformers")

from transformers import modeling_rope_utils as hf_rope  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

DIM = 16  # rotated features: head_dim 16, or 32 with partial_rotary_factor 0.5


def _llama(rope: dict[str, Any], max_pos: int = 256) -> Any:
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=DIM,
                                    max_position_embeddings=max_pos, rope_parameters=dict(rope))


def _qwen2(rope: dict[str, Any]) -> Any:
    return transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=1024, rope_parameters=dict(rope))


def _gpt_oss(rope: dict[str, Any] | None) -> Any:
    # None: gpt-oss's own YaRN (factor 32, truncate False, rope_theta 150000).
    extra = {} if rope is None else {"rope_parameters": dict(rope)}
    return transformers.GptOssConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=DIM, num_hidden_layers=1, intermediate_size=32,
                                     num_local_experts=2, num_experts_per_tok=1, **extra)


def _gemma3(rope: dict[str, Any]) -> Any:
    # Per layer type; the global ("full_attention") layers take the scaling.
    return transformers.Gemma3TextConfig(
        hidden_size=64, num_attention_heads=4, head_dim=DIM, num_hidden_layers=2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": dict(rope)})


def _phi3(rope: dict[str, Any]) -> Any:
    # Partial rotary: 32 features per head, 16 of them rotated.
    return transformers.Phi3Config(hidden_size=128, num_attention_heads=4, num_hidden_layers=1,
                                   max_position_embeddings=4096, original_max_position_embeddings=1024,
                                   partial_rotary_factor=0.5, rope_parameters=dict(rope))


_SHORT = [1.0 + 0.05 * i for i in range(DIM // 2)]
_LONG = [1.0 + 0.9 * i for i in range(DIM // 2)]

# id: (config, layer_type, seq_lens, max_position_embeddings given to mha_xp)
CASES: dict[str, tuple[Any, str | None, tuple[int | None, ...], int | None]] = {
    "default": (lambda: _llama({"rope_type": "default", "rope_theta": 500000.0}), None, (None,), None),
    "linear": (lambda: _llama({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
               None, (None,), None),
    "linear-gemma3-global": (lambda: _gemma3({"rope_type": "linear", "factor": 8.0,
                                              "rope_theta": 1000000.0}), "full_attention", (None,), None),
    "dynamic": (lambda: _llama({"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}),
                None, (None, 100, 256, 257, 1000), 256),
    "llama3": (lambda: _llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                               "rope_theta": 500000.0}, max_pos=1024), None, (None,), None),
    "yarn-qwen2": (lambda: _qwen2({"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 256, "rope_theta": 1e6}),
                   None, (None,), None),
    "yarn-gpt-oss": (lambda: _gpt_oss(None), None, (None,), None),
    "yarn-mscale": (lambda: _llama({"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                    "mscale_all_dim": 0.707, "beta_fast": 24, "beta_slow": 2,
                                    "original_max_position_embeddings": 32, "rope_theta": 10000.0},
                                   max_pos=1280), None, (None,), None),
    "yarn-attention-factor": (lambda: _llama({"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.25,
                                              "original_max_position_embeddings": 128,
                                              "rope_theta": 10000.0}), None, (None,), None),
    "yarn-no-factor": (lambda: _llama({"rope_type": "yarn", "factor": None,
                                       "original_max_position_embeddings": 64,
                                       "rope_theta": 10000.0}, max_pos=512), None, (None,), 512),
    "longrope-phi3": (lambda: _phi3({"rope_type": "longrope", "short_factor": _SHORT,
                                     "long_factor": _LONG, "rope_theta": 10000.0}),
                      None, (None, 1024, 1025), 4096),
}


def _params(config: Any, layer_type: str | None) -> dict[str, Any]:
    p = config.rope_parameters
    return dict(p[layer_type] if layer_type else p)


def _hf_inv_freq(config: Any, layer_type: str | None, seq_len: int | None) -> tuple[np.ndarray, float]:
    rope_type = _params(config, layer_type)["rope_type"]
    if rope_type == "default":
        fn = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters
        inv, af = fn(config)
    else:
        kw = {} if layer_type is None else {"layer_type": layer_type}
        inv, af = hf_rope.ROPE_INIT_FUNCTIONS[rope_type](config, device="cpu", seq_len=seq_len, **kw)
    return inv.numpy(), float(af)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_matches_hugging_face(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, layer_type, seq_lens, max_pos = CASES[case]
    config = make()
    params = _params(config, layer_type)
    for seq_len in seq_lens:
        inv, af = rope_frequencies(DIM, scaling=params, seq_len=seq_len, max_position_embeddings=max_pos
                                or getattr(config, "max_position_embeddings", None), xp=np)
        assert inv.dtype == np.float64 and inv.shape == (DIM // 2,)
        hf32, hf_af = _hf_inv_freq(config, layer_type, seq_len)
        assert hf32.dtype == np.float32  # as shipped
        with hf_in_float64(monkeypatch, hf_rope, modeling_llama):
            hf64, hf_af64 = _hf_inv_freq(config, layer_type, seq_len)
        assert hf64.dtype == np.float64
        assert _max_rel(inv, hf64) <= 1e-15, (seq_len, inv, hf64)
        assert _max_rel(inv, hf32.astype(np.float64)) <= 1e-6, (seq_len, inv, hf32)
        assert af == pytest.approx(hf_af, rel=1e-15, abs=0) and af == pytest.approx(hf_af64, rel=1e-15)
        assert isinstance(af, float)


def test_schemes_change_what_they_should() -> None:
    """A sanity check independent of Hugging Face: linear divides every
    frequency, llama3 keeps the fastest and divides the slowest, YaRN's
    attention factor is 0.1 ln(factor) + 1."""
    plain, _ = rope_frequencies(DIM, 10000.0, xp=np)
    linear, _ = rope_frequencies(DIM, 10000.0, scaling={"rope_type": "linear", "factor": 4.0}, xp=np)
    np.testing.assert_allclose(linear, plain / 4.0, rtol=1e-15)
    l3, _ = rope_frequencies(DIM, 10000.0, scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, xp=np)
    assert l3[0] == plain[0] and l3[-1] == plain[-1] / 8.0
    _, af = rope_frequencies(DIM, scaling={"rope_type": "yarn", "factor": 16.0,
                                        "original_max_position_embeddings": 64}, xp=np)
    assert af == 0.1 * np.log(16.0) + 1.0
    # dynamic: unchanged up to max_position_embeddings, a larger base beyond.
    dyn = {"rope_type": "dynamic", "factor": 2.0}
    same, _ = rope_frequencies(DIM, 10000.0, scaling=dyn, seq_len=10, max_position_embeddings=64, xp=np)
    np.testing.assert_array_equal(same, plain)
    grown, _ = rope_frequencies(DIM, 10000.0, scaling=dyn, seq_len=640, max_position_embeddings=64, xp=np)
    assert grown[0] == 1.0 and np.all(grown[1:] < plain[1:])


# --- tables against the rotary module -----------------------------------------

TABLE_CASES = ["default", "linear", "dynamic", "llama3", "yarn-mscale", "longrope-phi3"]


def _positions(case: str) -> np.ndarray:
    """Per-row positions (batch of 2): a left-padded row starts late. The
    dynamic and LongRoPE cases go past their original lengths (256, 1024)."""
    start = {"dynamic": 290, "longrope-phi3": 1020}.get(case, 0)
    row = np.arange(start, start + 6)
    return np.stack([row, row + 3])


def _hf_tables(config: Any, pos: np.ndarray, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    module = modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=dtype)
    cos, sin = module(x, torch.from_numpy(pos))
    return cos.numpy(), sin.numpy()


@pytest.mark.parametrize("case", TABLE_CASES)
def test_tables_match_hugging_face_module(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, layer_type, _, max_pos = CASES[case]
    config = make()
    pos = _positions(case)
    seq_len = int(pos.max()) + 1  # what the module's dynamic update reads
    inv, af = rope_frequencies(DIM, scaling=_params(config, layer_type), seq_len=seq_len,
                            max_position_embeddings=max_pos or config.max_position_embeddings, xp=np)
    cos, sin = rope_tables(pos, inv, af)
    assert cos.shape == sin.shape == pos.shape + (DIM // 2,)
    # Hugging Face's tables repeat the half for rotate_half.
    ours = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)

    with hf_in_float64(monkeypatch, hf_rope, modeling_llama):
        hf64 = _hf_tables(config, pos, torch.float64)
    for o, h in zip(ours, hf64):
        assert h.dtype == np.float64
        np.testing.assert_allclose(o, h, rtol=0, atol=1e-14)

    # As shipped: float32 angles, |error| about |angle| * 1e-7.
    hf32 = _hf_tables(config, pos, torch.float32)
    atol = 1e-6 * max(1.0, float(np.max(pos[..., None] * inv)) / 8.0)
    for o, h in zip(ours, hf32):
        assert h.dtype == np.float32
        np.testing.assert_allclose(o, h.astype(np.float64), rtol=0, atol=atol)


# --- every backend ------------------------------------------------------------

BACKEND_SCHEMES = [
    None,
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 4096},
]


@pytest.mark.parametrize("scaling", BACKEND_SCHEMES, ids=["default", "llama3", "yarn"])
def test_backends_agree_with_numpy(backend: Any, dtype: str, scaling: Any) -> None:
    inv, af = rope_frequencies(DIM, 150000.0, scaling=scaling, xp=backend.xp, device=backend.device)
    ref_inv, ref_af = rope_frequencies(DIM, 150000.0, scaling=scaling, xp=np)
    assert_preserved(backend, inv, "float64", (DIM // 2,))
    np.testing.assert_array_equal(backend.to_numpy(inv), ref_inv)  # computed on the host
    assert af == ref_af

    inv_d, _ = rope_frequencies(DIM, 150000.0, scaling=scaling, xp=backend.xp, device=backend.device,
                             dtype=backend.dtype(dtype))
    assert_preserved(backend, inv_d, dtype, (DIM // 2,))

    int_pos = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    float_pos = int_pos * 0.5 + 0.25  # fractional positions
    for pos in (int_pos, float_pos):
        pos_b = backend.asarray(pos, "int64" if pos.dtype.kind == "i" else dtype)
        cos, sin = rope_tables(pos_b, inv_d, af)
        angle = pos[..., None].astype(np.float64) * ref_inv
        for got, want in ((cos, np.cos(angle) * af), (sin, np.sin(angle) * af)):
            assert_preserved(backend, got, dtype, pos.shape + (DIM // 2,))
            tol = 1e-14 if dtype == "float64" else 1e-6
            np.testing.assert_allclose(backend.to_numpy(got), want, rtol=0, atol=tol)


def test_float16_tables_round_once() -> None:
    inv, af = rope_frequencies(DIM, 10000.0, xp=np)
    pos = np.arange(20)
    cos, sin = rope_tables(pos, inv, af, dtype=np.float16)
    assert cos.dtype == np.float16
    want = np.cos(pos[:, None] * inv.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(cos, want)


# --- refused with clear messages ------------------------------------------------

BAD_SCALINGS = [
    ({"rope_type": "ntk"}, ValueError, r"rope_type'\] must be one of \['default', 'linear'"),
    ([("rope_type", "linear")], TypeError, r"scaling must be None, a rope_type name or a dict"),
    ({"rope_type": "linear"}, ValueError, r"must have the keys \['factor'\]; missing: \['factor'\]"),
    ({"rope_type": "linear", "factor": 0.5}, ValueError, r"scaling\['factor'\] \(rope_type 'linear'\) "
     r"must be a finite number >= 1, got 0.5"),
    ({"rope_type": "linear", "factor": "2"}, TypeError, r"must be a real number, got str '2'"),
    ({"rope_type": "linear", "factor": True}, TypeError, r"must be a real number, got bool"),
    ({"rope_type": "linear", "factor": 2.0, "factr": 3}, ValueError, r"unknown keys \['factr'\]"),
    ({"rope_type": "linear", "factor": 2.0, "type": "dynamic"}, ValueError, r"scaling\['type'\]"),
    ({"rope_type": "dynamic", "factor": 2.0}, ValueError, r"needs max_position_embeddings="),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, ValueError, r"high_freq_factor'\] \(1.0\) must be greater"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     ValueError, r"needs scaling\['original_max_position_embeddings'\]"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64.0}, TypeError, r"must be a positive int, got float"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1,
      "beta_slow": 8}, ValueError, r"beta_fast'\] \(1\) must not be less than"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": "no"},
     TypeError, r"scaling\['truncate'\] \(rope_type 'yarn'\) must be a bool"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
      "attention_factor": -1.0}, ValueError, r"attention_factor'\] \(rope_type 'yarn'\) must be a "
     r"positive finite number, got -1.0"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
      "mscale": float("inf"), "mscale_all_dim": 1.0}, ValueError, r"scaling\['mscale'\] \(rope_type "
     r"'yarn'\) must be a finite number, got inf"),
    ({"rope_type": ["yarn"]}, ValueError, r"rope_type'\] must be one of"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 64}, ValueError,
     r"needs scaling\['factor'\] or max_position_embeddings="),
    ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": _LONG,
      "original_max_position_embeddings": 64}, ValueError, r"short_factor'\] \(rope_type 'longrope'\) "
     r"must have dim // 2 = 8 entries, got 3"),
    ({"rope_type": "longrope", "short_factor": _SHORT, "long_factor": [float("nan")] * 8,
      "original_max_position_embeddings": 64, "factor": 2.0}, ValueError, r"long_factor\[0\]"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, ValueError,
     r"base=10000.0 differs from scaling\['rope_theta'\]=500.0"),
]


@pytest.mark.parametrize("scaling, exc, match", BAD_SCALINGS,
                         ids=[f"bad{i}" for i in range(len(BAD_SCALINGS))])
def test_bad_scaling_refused(scaling: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        rope_frequencies(DIM, 10000.0, scaling=scaling, xp=np)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"dim": 7}, ValueError, r"dim \(the number of rotated features\) must be a positive even int, got 7"),
    ({"dim": 8.0}, TypeError, r"dim must be a positive even int, got float"),
    ({"base": -1.0}, ValueError, r"base must be a positive finite number"),
    ({"seq_len": 0}, ValueError, r"seq_len must be a positive int, got 0"),
    ({"dtype": np.int32}, TypeError, r"dtype must be a real floating dtype of numpy"),
    ({"xp": "numpy"}, TypeError, r"xp must be an array API namespace"),
])
def test_bad_arguments_refused(kwargs: dict[str, Any], exc: type, match: str) -> None:
    args = {"dim": DIM, "base": 10000.0, "xp": np, **kwargs}
    with pytest.raises(exc, match=match):
        rope_frequencies(args.pop("dim"), args.pop("base"), **args)


def test_bad_tables_refused() -> None:
    inv, _ = rope_frequencies(DIM, xp=np)
    pos = np.arange(4)
    with pytest.raises(TypeError, match=r"positions must be an integer or real floating array, got dtype bool"):
        rope_tables(pos > 1, inv)
    with pytest.raises(ValueError, match=r"inv_freq must be 1-d, \(dim // 2,\), got shape \(2, 4\)"):
        rope_tables(pos, inv.reshape(2, 4))
    with pytest.raises(ValueError, match=r"attention_factor must be a positive finite number, got 0"):
        rope_tables(pos, inv, 0.0)
    with pytest.raises(TypeError, match=r"attention_factor must be a positive Python float, got str"):
        rope_tables(pos, inv, "1")


def test_mixed_libraries_refused() -> None:
    inv, _ = rope_frequencies(DIM, xp=np)
    with pytest.raises(TypeError, match=r"inv_freq is a torch array but positions is a numpy array"):
        rope_tables(np.arange(4), torch.from_numpy(inv))
