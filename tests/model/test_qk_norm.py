"""QK normalisation of real models (``mha_xp._model._qk_norm``) against
Hugging Face transformers' norm modules and torch autograd.

The modules: ``Qwen3RMSNorm`` (rounding before the weight, like
``LlamaRMSNorm``), ``Gemma3RMSNorm`` (``1 + weight``), Phi's
``torch.nn.LayerNorm`` (bias, eps 1e-5), ``CohereLayerNorm`` (one weight per
head) and ``ChameleonLayerNorm`` (per head, with bias). Hugging Face's RMSNorms
and Cohere's LayerNorm compute float64 inputs in float32: they are compared as
shipped at float32's rounding, and run in float64
(``support.hf.hf_in_float64``) at float64's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from support import REL_TOL, assert_preserved, rel_err
from support.hf import hf_in_float64
from mha_xp._model._qk_norm import qk_norm, qk_norm_backward

torch = pytest.importorskip("torch", reason="the comparisons with autograd and Hugging Face need torch")
transformers = pytest.importorskip(
    "transformers", reason="the comparisons with Hugging Face need transformers")

from transformers.models.chameleon import modeling_chameleon  # noqa: E402
from transformers.models.cohere import modeling_cohere  # noqa: E402
from transformers.models.gemma3 import modeling_gemma3  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402

B, H, L, D = 2, 3, 5, 8


def _inputs(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    # An offset mean and unequal spreads per row, as projected queries have.
    x = rng.standard_normal((B, H, L, D)) * rng.uniform(0.5, 3.0, (B, H, L, 1)) + 0.7
    w = 1.0 + 0.3 * rng.standard_normal((H, D))
    b = 0.2 * rng.standard_normal((H, D))
    g = rng.standard_normal((B, H, L, D))
    return x, w, b, g


# id: (factory of the Hugging Face module, layout it takes, qk_norm options, per-head, bias,
#      module of the torch casts to swap for float64 or None when it computes natively)
MODULES: dict[str, tuple[Any, str, dict[str, Any], bool, bool, Any]] = {
    "qwen3": (lambda: modeling_qwen3.Qwen3RMSNorm(D, eps=1e-6), "BHLD",
              {"kind": "rms", "eps": 1e-6, "round_before_weight": True}, False, False, modeling_qwen3),
    "gemma3": (lambda: modeling_gemma3.Gemma3RMSNorm(D, eps=1e-6), "BHLD",
               {"kind": "rms", "eps": 1e-6, "offset": 1.0}, False, False, modeling_gemma3),
    "phi": (lambda: torch.nn.LayerNorm(D, eps=1e-5), "BHLD",
            {"kind": "layer", "eps": 1e-5}, False, True, None),
    "cohere": (lambda: modeling_cohere.CohereLayerNorm((H, D), eps=1e-5), "BLHD",
               {"kind": "layer", "eps": 1e-5}, True, False, modeling_cohere),
    "chameleon": (lambda: modeling_chameleon.ChameleonLayerNorm((H, D)), "BLHD",
                  {"kind": "layer", "eps": 1e-5, "round_before_weight": True}, True, True, None),
}


def _module(case: str, w: np.ndarray, b: np.ndarray, dtype: Any) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """The module with our weights, and those weights as mha_xp takes them."""
    make, _, _, per_head, has_bias, _ = MODULES[case]
    m = make().to(dtype)
    w_np = w if per_head else w[0]
    b_np = (b if per_head else b[0]) if has_bias else None
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w_np))
        if has_bias:
            m.bias.copy_(torch.from_numpy(b_np))
    return m, w_np, b_np


def _run_module(m: Any, layout: str, x: np.ndarray, dtype: Any, g: np.ndarray | None = None) -> tuple:
    """The module's output in (B, H, L, D), and with ``g`` its gradients."""
    xt = torch.from_numpy(x).to(dtype)
    if layout == "BLHD":
        xt = xt.transpose(1, 2)
    xt.requires_grad_(g is not None)
    y = m(xt)
    if layout == "BLHD":
        y = y.transpose(1, 2)
    if g is None:
        return (y.detach().numpy(),)
    y.backward(torch.from_numpy(g).to(dtype))
    dx = xt.grad.transpose(1, 2) if layout == "BLHD" else xt.grad
    db = None if getattr(m, "bias", None) is None else m.bias.grad.numpy()
    return y.detach().numpy(), dx.numpy(), m.weight.grad.numpy(), db


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("case", list(MODULES))
def test_forward_matches_hugging_face(case: str, rng: np.random.Generator,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, b, _ = _inputs(rng)
    _, layout, opts, _, _, casts = MODULES[case]
    m32, w_np, b_np = _module(case, w, b, torch.float32)
    for dt in ("float32", "float64"):
        y = qk_norm(x.astype(dt), w_np.astype(dt), None if b_np is None else b_np.astype(dt), **opts)
        assert y.dtype == np.dtype(dt) and y.shape == x.shape
        # float32: the module as shipped; float64 too, against the module's float32 arithmetic.
        (ref32,) = _run_module(m32, layout, x.astype(np.float32), torch.float32)
        assert _max_abs(y, ref32) <= 1e-6 * max(1.0, float(np.max(np.abs(ref32))))
    m64, _, _ = _module(case, w, b, torch.float64)
    (shipped,) = _run_module(m64, layout, x, torch.float64)
    y64 = qk_norm(x, w_np, b_np, **opts)
    tol64 = 1e-14 if casts is None else 1e-6  # the shipped RMSNorms drop float64 to float32
    assert _max_abs(y64, shipped) <= tol64 * max(1.0, float(np.max(np.abs(shipped))))
    if casts is not None:
        with hf_in_float64(monkeypatch, casts):
            (ref64,) = _run_module(m64, layout, x, torch.float64)
        assert _max_abs(y64, ref64) <= 1e-14 * max(1.0, float(np.max(np.abs(ref64))))


@pytest.mark.parametrize("case", list(MODULES))
def test_backward_matches_autograd(case: str, rng: np.random.Generator,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 gradients of the module (run in float64) by torch autograd."""
    x, w, b, g = _inputs(rng)
    _, layout, opts, _, _, casts = MODULES[case]
    opts = {k: v for k, v in opts.items() if k != "round_before_weight"}
    m, w_np, b_np = _module(case, w, b, torch.float64)
    with hf_in_float64(monkeypatch, *([casts] if casts is not None else [])):
        _, dx_ref, dw_ref, db_ref = _run_module(m, layout, x, torch.float64, g)
    dx, dw, db = qk_norm_backward(x, w_np, b_np, g, **opts)
    assert dx.dtype == dw.dtype == np.float64 and dw.shape == w_np.shape
    for got, want in ((dx, dx_ref), (dw, dw_ref)) + (((db, db_ref),) if b_np is not None else ()):
        assert _max_abs(got, want) <= 1e-12 * max(1.0, float(np.max(np.abs(want))))
    assert (db is None) == (b_np is None)


@pytest.mark.parametrize("case", list(MODULES))
def test_float16_rounds_where_hugging_face_does(case: str, rng: np.random.Generator) -> None:
    """In float16 each module rounds where ``round_before_weight`` says: our
    result is within one unit in the last place of the module's, and the
    other rounding is measurably further."""
    x, w, b, _ = _inputs(rng)
    _, layout, opts, _, _, _ = MODULES[case]
    m, w_np, b_np = _module(case, w.astype(np.float16).astype(np.float64),
                            b.astype(np.float16).astype(np.float64), torch.float16)
    x16 = x.astype(np.float16)
    (ref,) = _run_module(m, layout, x16.astype(np.float64), torch.float16)
    args = (x16, w_np.astype(np.float16), None if b_np is None else b_np.astype(np.float16))
    y = qk_norm(*args, **opts)
    assert y.dtype == np.float16
    ulp = np.spacing(np.abs(ref.astype(np.float16))).astype(np.float64)
    assert np.max(np.abs(y.astype(np.float64) - ref) / ulp) <= 1.0
    other = qk_norm(*args, **{**opts, "round_before_weight": not opts.get("round_before_weight", False)})
    assert np.mean(other != ref) > np.mean(y != ref)


# --- every backend, every variant, against torch autograd ------------------------

VARIANTS = {
    "rms": ({"kind": "rms"}, None, False),
    "rms-shared-w": ({"kind": "rms", "eps": 1e-5}, "shared", False),
    "rms-per-head-offset": ({"kind": "rms", "offset": 1.0}, "per_head", False),
    "layer-shared-w-bias": ({"kind": "layer", "eps": 1e-5}, "shared", True),
    "layer-per-head-bias": ({"kind": "layer"}, "per_head", True),
    "layer-no-weight": ({"kind": "layer", "eps": 0.0}, None, False),
}


def _torch_reference(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, g: np.ndarray,
                     kind: str, eps: float = 1e-6, offset: float = 0.0) -> list[np.ndarray | None]:
    """float64 forward from the definition and its gradients by autograd."""
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = None if w is None else torch.from_numpy(w).requires_grad_(True)
    bt = None if b is None else torch.from_numpy(b).requires_grad_(True)
    c = xt - xt.mean(-1, keepdim=True) if kind == "layer" else xt
    y = c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
    per_head = (lambda t: t[:, None, :] if t.ndim == 2 else t)
    if wt is not None:
        y = y * (offset + per_head(wt))
    if bt is not None:
        y = y + per_head(bt)
    y.backward(torch.from_numpy(g))
    out = [y.detach().numpy(), xt.grad.numpy()]
    return out + [None if t is None else t.grad.numpy() for t in (wt, bt)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backends_match_autograd(backend: Any, dtype: str, variant: str, rng: np.random.Generator) -> None:
    opts, weight, has_bias = VARIANTS[variant]
    x, w, b, g = _inputs(rng)
    w = None if weight is None else (w if weight == "per_head" else w[0])
    b = None if not has_bias else (b if weight == "per_head" else b[0])
    ref_y, ref_dx, ref_dw, ref_db = _torch_reference(x, w, b, g, **opts)
    on = (lambda a: None if a is None else backend.asarray(a, dtype))
    y = qk_norm(on(x), on(w), on(b), **opts)
    assert_preserved(backend, y, dtype, x.shape)
    assert rel_err(backend.to_numpy(y), ref_y) <= REL_TOL[dtype]
    dx, dw, db = qk_norm_backward(on(x), on(w), on(b), on(g), **opts)
    assert_preserved(backend, dx, dtype, x.shape)
    assert rel_err(backend.to_numpy(dx), ref_dx) <= REL_TOL[dtype]
    for got, want, arr in ((dw, ref_dw, w), (db, ref_db, b)):
        if arr is None:
            assert got is None
            continue
        assert_preserved(backend, got, dtype, arr.shape)
        assert rel_err(backend.to_numpy(got), want) <= REL_TOL[dtype]


def test_shared_weight_on_any_rank(rng: np.random.Generator) -> None:
    """A weight of shape (D,) needs no head axis: (L, D) and (D,) work too."""
    x = rng.standard_normal((L, D))
    w = rng.standard_normal(D)
    y = qk_norm(x, w, kind="rms", eps=0.0)
    np.testing.assert_allclose(y, x / np.sqrt((x * x).mean(-1, keepdims=True)) * w, rtol=1e-14)
    dx, dw, _ = qk_norm_backward(x[0], w, None, x[1], eps=0.0)
    assert dx.shape == dw.shape == (D,)


# --- refused with clear messages ---------------------------------------------------

def test_bad_arguments_refused(rng: np.random.Generator) -> None:
    x, w, b, g = _inputs(rng)
    cases = [
        ({"kind": "RMS"}, ValueError, r"kind must be 'rms' .* or 'layer' .*, got 'RMS'"),
        ({"eps": -1e-6}, ValueError, r"eps must be a non-negative finite number, got -1e-06"),
        ({"eps": "1e-6"}, TypeError, r"eps must be a Python float, got str"),
        ({"offset": float("nan"), "weight": w[0]}, ValueError, r"offset must be a finite number"),
        ({"offset": 1.0}, ValueError, r"offset=1.0 applies to a weight \(offset \+ weight\): pass weight="),
        ({"weight": w[:, :4]}, ValueError, r"weight must have shape \(D,\) = \(8,\), shared by the heads "
         r"or \(H, D\) = \(3, 8\) per head, for x of shape \(2, 3, 5, 8\) \(\.\.\., H, L, D\); got \(3, 4\)"),
        ({"weight": w[0].astype(np.float32)}, TypeError, r"weight has dtype float32 but x is float64"),
        ({"bias": b[0]}, ValueError, r"bias is for kind='layer'"),
        ({"bias": b[0, :2], "kind": "layer"}, ValueError, r"bias must have shape \(D,\) = \(8,\)"),
        ({"round_before_weight": "yes"}, TypeError, r"round_before_weight must be a Python bool"),
        ({"x": x.astype(np.int64)}, TypeError, r"x must have a real floating dtype"),
        ({"x": x[..., :0]}, ValueError, r"x must have a non-empty feature axis"),
    ]
    for kwargs, exc, match in cases:
        kw = {"x": x, "weight": None, "bias": None, **kwargs}
        with pytest.raises(exc, match=match):
            qk_norm(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), **kw)
    with pytest.raises(ValueError, match=r"grad_y must have x's shape \(2, 3, 5, 8\) and dtype float64, "
                                         r"got shape \(2, 3, 5, 4\)"):
        qk_norm_backward(x, None, None, g[..., :4])


def test_mixed_libraries_refused(rng: np.random.Generator) -> None:
    x, w, _, _ = _inputs(rng)
    with pytest.raises(TypeError, match=r"weight is a torch array but x is a numpy array"):
        qk_norm(x, torch.from_numpy(w[0]))
