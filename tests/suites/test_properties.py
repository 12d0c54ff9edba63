"""Property-based tests: invariants of attention on random shapes, dtypes, masks and biases.

Every property runs on every backend (the ``backend`` fixture), on Hypothesis-
generated cases: shapes with L = 1, S = 1, H = 1, head dim 1, E = H, large
batches and broadcasting leading axes; float32 and float64 (and float16 where
the backend has it); boolean masks of every broadcastable rank; biases with
``-inf`` entries; causal masking; custom scales; the dense path and the
chunked one (``chunk_size=``, or a zero memory budget). The CI budget per
property is the ``budget(n)`` on each test (see ``support/_hypothesis_profiles.py``).

Array contents come from ``np.random.default_rng(seed)`` with a drawn seed:
Hypothesis explores and shrinks shapes, flags and seeds, while drawing the
arrays stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st

import mha_xp
from support import FLOAT16_BACKENDS, REL_TOL, assert_preserved
from support._hypothesis_profiles import budget
from support.reference import ref_attention, ref_mha

sdpa = mha_xp.scaled_dot_product_attention

# Tolerance on a weight row's sum (each weight is rounded to the dtype).
SUM_TOL = {"float16": 4e-3, "float32": 1e-5, "float64": 1e-12}


def dtypes_of(backend) -> list[str]:
    """The dtypes a backend is tested in (the standard has no float16)."""
    return ["float32", "float64"] + (["float16"] if backend.name in FLOAT16_BACKENDS else [])


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype``, back in float64: the exact input both
    mha_xp and the float64 reference see."""
    with np.errstate(over="ignore"):  # float16 garbage may overflow to inf, on purpose
        return a.astype(dtype).astype(np.float64)


def assert_matches(out: np.ndarray, ref: np.ndarray, dtype: str, factor: float = 1.0) -> None:
    """‖out − ref‖ ≤ factor · tol · ‖ref‖ (exact zeros where the reference is all zero)."""
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "non-finite values in the output"
    err, size = np.linalg.norm(out - ref), np.linalg.norm(ref)
    assert err <= factor * REL_TOL[dtype] * size, (
        f"relative error {err / size if size else err:.3g} > {factor * REL_TOL[dtype]:.1e} ({dtype})"
    )


def causal_allowed(L: int, S: int) -> np.ndarray:
    """Bottom-right causal mask, True = may attend (the documented convention)."""
    return np.arange(S)[None, :] <= np.arange(L)[:, None] + (S - L)


# -- scaled_dot_product_attention cases --------------------------------------------


@dataclass(frozen=True)
class Case:
    """One call of the attention function, as host float64 arrays already
    rounded to ``dtype``."""

    dtype: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None
    bias: np.ndarray | None
    is_causal: bool
    scale: float | None
    chunk_size: Any
    memory_budget: int | None

    @property
    def lead(self) -> tuple[int, ...]:
        return np.broadcast_shapes(self.q.shape[:-2], self.k.shape[:-2], self.v.shape[:-2])

    @property
    def chunked(self) -> bool:
        return self.chunk_size is not None or self.memory_budget == 0

    def allowed(self) -> np.ndarray:
        """Where each query may attend, ``(..., L, S)``: mask, causal and finite bias."""
        L, S = self.q.shape[-2], self.k.shape[-2]
        ok = np.ones(self.lead + (L, S), dtype=bool)
        if self.mask is not None:
            ok = ok & self.mask
        if self.is_causal:
            ok = ok & causal_allowed(L, S)
        if self.bias is not None:
            ok = ok & (self.bias != -np.inf)
        return ok

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        return ref_attention(self.q, self.k, self.v, allowed=self.mask, bias=self.bias,
                             is_causal=self.is_causal, scale=self.scale)

    def run(self, backend, *, return_weights: bool = False, **changes: Any):
        """Call mha_xp on the backend; returns host arrays (out, weights or None)."""
        c = replace(self, **changes) if changes else self
        args = [backend.asarray(t, c.dtype) for t in (c.q, c.k, c.v)]
        kwargs = dict(
            mask=None if c.mask is None else backend.asarray(c.mask),
            bias=None if c.bias is None else backend.asarray(c.bias, c.dtype),
            is_causal=c.is_causal, scale=c.scale, chunk_size=c.chunk_size,
            memory_budget=c.memory_budget,
        )
        result = sdpa(*args, return_weights=return_weights, **kwargs)
        out, weights = result if return_weights else (result, None)
        L, Dv = c.q.shape[-2], c.v.shape[-1]
        assert_preserved(backend, out, c.dtype, c.lead + (L, Dv))
        if weights is not None:
            assert_preserved(backend, weights, c.dtype, c.lead + (L, c.k.shape[-2]))
            weights = backend.to_numpy(weights).astype(np.float64)
        return backend.to_numpy(out).astype(np.float64), weights


def _broadcastable_shape(draw, full: tuple[int, ...], min_ndim: int) -> tuple[int, ...]:
    """A shape that broadcasts to ``full``: a suffix of it, some axes set to 1."""
    ndim = draw(st.integers(min_ndim, len(full)))
    suffix = full[len(full) - ndim:]
    return tuple(1 if draw(st.booleans()) else n for n in suffix)


@st.composite
def cases(draw, dtypes: list[str], *, causal: bool = True, paths: tuple[str, ...] = (
        "dense", "chunk_size", "budget0")) -> Case:
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    large = draw(st.integers(0, 4)) == 0  # one case in five has a large batch
    lead = list(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    if large:
        lead = [draw(st.integers(16, 48))] + lead[:1]
    top = 3 if large else 6
    L, S = draw(st.integers(1, top)), draw(st.integers(1, top))
    D, Dv = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    # Each of q, k, v may broadcast (size 1) along a leading axis, but not q
    # and k together: the dense path then returns weights and lse with q and
    # k's leading shape instead of the output's (reported), which the chunked
    # path and merge_attention do not.
    pattern = [draw(st.sampled_from([(False, False), (True, False), (False, True)]))
               for _ in lead]
    leads = [tuple(1 if p[i] else n for p, n in zip(pattern, lead)) for i in range(2)]
    leads.append(tuple(1 if draw(st.booleans()) else n for n in lead))
    q, k, v = (rounded(rng.standard_normal(s), dtype) for s in
               (leads[0] + (L, D), leads[1] + (S, D), leads[2] + (S, Dv)))
    full = np.broadcast_shapes(*leads) + (L, S)
    path = draw(st.sampled_from(paths))
    chunk_size = None
    if path == "chunk_size":
        chunk_size = draw(st.integers(1, 4) | st.tuples(st.integers(1, 4), st.integers(1, 4)))
    # Masks and biases of rank < 2 are left to the dense path: the chunked
    # path fails on them (IndexError in _chunked.slice_block, reported).
    min_ndim = 2 if path != "dense" else 0
    mask = bias = None
    if draw(st.booleans()):
        p = draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
        mask = rng.random(_broadcastable_shape(draw, full, min_ndim)) < p
    if draw(st.booleans()):
        spread = draw(st.sampled_from([0.5, 3.0]))
        bias = rng.standard_normal(_broadcastable_shape(draw, full, min_ndim)) * spread
        bias = np.round(bias * 16) / 16  # a grid exact in float16, for the row-constant property
        p_inf = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
        bias = np.where(rng.random(bias.shape) < p_inf, -np.inf, bias)
    return Case(
        dtype=dtype, q=q, k=k, v=v, mask=mask, bias=bias,
        is_causal=causal and draw(st.booleans()),
        scale=draw(st.none() | st.floats(0.05, 2.0)),
        chunk_size=chunk_size, memory_budget=0 if path == "budget0" else None,
    )


def _note(case: Case) -> None:
    note(f"dtype={case.dtype} q{case.q.shape} k{case.k.shape} v{case.v.shape} "
         f"mask={None if case.mask is None else case.mask.shape} "
         f"bias={None if case.bias is None else case.bias.shape} causal={case.is_causal} "
         f"scale={case.scale} chunk_size={case.chunk_size} budget={case.memory_budget}")


class TestAttentionProperties:
    @budget(60)
    @given(data=st.data())
    def test_matches_float64_reference(self, backend, data):
        case = data.draw(cases(dtypes_of(backend)))
        _note(case)
        out, weights = case.run(backend, return_weights=True)
        ref_out, ref_w = case.reference()
        assert_matches(out, ref_out, case.dtype)
        assert_matches(weights, ref_w, case.dtype)
        # Asking for the weights never changes the output, on either path.
        alone, _ = case.run(backend)
        np.testing.assert_array_equal(alone, out)

    @budget(30)
    @given(data=st.data())
    def test_permuting_keys_and_values_together_changes_nothing(self, backend, data):
        case = data.draw(cases(dtypes_of(backend)))
        L, S = case.q.shape[-2], case.k.shape[-2]
        # The causal triangle is tied to key positions: carry it as an explicit mask.
        mask = case.mask
        if case.is_causal:
            mask = causal_allowed(L, S) if mask is None else mask & causal_allowed(L, S)
        case = replace(case, mask=mask, is_causal=False)
        perm = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).permutation(S)
        _note(case)
        note(f"perm={perm}")

        def cols(x):  # permute the key axis where the array has one
            return x if x is None or x.ndim == 0 or x.shape[-1] == 1 else x[..., perm]

        out, _ = case.run(backend)
        moved, _ = case.run(backend, k=case.k[..., perm, :], v=case.v[..., perm, :],
                            mask=cols(case.mask), bias=cols(case.bias))
        assert_matches(moved, out, case.dtype, factor=2.0)

    @budget(30)
    @given(data=st.data())
    def test_per_row_constant_in_bias_changes_nothing(self, backend, data):
        case = data.draw(cases(dtypes_of(backend)))
        L = case.q.shape[-2]
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        # Integers: bias + c is then exact in every dtype (the bias is on a 1/16 grid).
        c = rng.integers(-8, 9, size=case.lead + (L, 1)).astype(np.float64)
        base = np.zeros((1, 1)) if case.bias is None else case.bias
        _note(case)
        out, w = case.run(backend, return_weights=True)
        shifted, w_shifted = case.run(backend, bias=base + c, return_weights=True)
        assert_matches(shifted, out, case.dtype, factor=2.0)
        assert_matches(w_shifted, w, case.dtype, factor=2.0)

    @budget(30)
    @given(data=st.data())
    def test_weight_rows_sum_to_one_or_are_all_zero(self, backend, data):
        case = data.draw(cases(dtypes_of(backend)))
        _note(case)
        _, w = case.run(backend, return_weights=True)
        allowed = case.allowed()
        assert np.all(w >= 0)
        assert np.all(w[~allowed] == 0), "weight on a key that may not be attended"
        empty = ~allowed.any(axis=-1)
        assert np.all(w[empty] == 0), "a fully masked row has non-zero weights"
        sums = w.sum(axis=-1)[~empty]
        np.testing.assert_allclose(sums, 1.0, rtol=0, atol=SUM_TOL[case.dtype])

    @budget(30)
    @given(data=st.data())
    def test_masked_key_never_influences_the_output(self, backend, data):
        case = data.draw(cases(dtypes_of(backend)))
        S = case.k.shape[-2]
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        hidden = rng.random(S) < data.draw(st.sampled_from([0.3, 0.6, 1.0]))
        # A key masked for every query: the mask gains a key axis if it lacked one.
        mask = np.ones((1, S), dtype=bool) if case.mask is None else np.atleast_2d(case.mask)
        mask = np.broadcast_to(mask, mask.shape[:-1] + (S,)) & ~hidden
        case = replace(case, mask=mask)
        _note(case)
        note(f"hidden keys={np.flatnonzero(hidden)}")
        huge = {"float16": 6e4, "float32": 3e38, "float64": 1e300}[case.dtype]
        garbage_k = rng.choice([np.nan, np.inf, -np.inf, huge, -huge], size=case.k.shape)
        # NaN and Inf in masked values too: mha_xp computes on finite
        # stand-ins, so 0 * NaN never happens (tests/core/test_nonfinite.py).
        garbage_v = rng.choice([np.nan, np.inf, -np.inf, huge, -huge, 0.5 * huge],
                               size=case.v.shape)
        k = np.where(hidden[:, None], garbage_k, case.k)
        v = np.where(hidden[:, None], garbage_v, case.v)
        out, w = case.run(backend, return_weights=True)
        # Masked keys near the dtype's maximum are finite, and so take part in
        # the score matmul, whose products then overflow (NumPy warns: "overflow",
        # and "invalid" for inf - inf); the masked scores are discarded all the
        # same. NaN and Inf are replaced before any arithmetic and warn nothing.
        with np.errstate(invalid="ignore", over="ignore"):
            dirty, w_dirty = case.run(backend, k=k, v=v, return_weights=True)
        np.testing.assert_array_equal(dirty, out)
        np.testing.assert_array_equal(w_dirty, w)

    @budget(25)
    @given(data=st.data())
    def test_lse_and_merge_equal_attention_over_the_union(self, backend, data):
        case = data.draw(cases(dtypes_of(backend), causal=False))
        S = case.k.shape[-2]
        if S < 2:
            case = replace(case, k=np.concatenate([case.k] * 2, axis=-2),
                           v=np.concatenate([case.v] * 2, axis=-2), mask=None, bias=None)
            S = 2
        cut = data.draw(st.integers(1, S - 1))
        _note(case)
        note(f"cut={cut}")

        def part(cols):
            def sl(x):
                return x if x is None or x.ndim == 0 or x.shape[-1] == 1 else x[..., cols]
            c = replace(case, k=case.k[..., cols, :], v=case.v[..., cols, :],
                        mask=sl(case.mask), bias=sl(case.bias))
            args = [backend.asarray(t, c.dtype) for t in (c.q, c.k, c.v)]
            return mha_xp.attention_with_lse(
                *args, mask=None if c.mask is None else backend.asarray(c.mask),
                bias=None if c.bias is None else backend.asarray(c.bias, c.dtype),
                scale=c.scale, chunk_size=c.chunk_size, memory_budget=c.memory_budget)

        out, lse = mha_xp.merge_attention(*part(slice(0, cut)), *part(slice(cut, S)))
        ref_out, _ = case.reference()
        assert_matches(backend.to_numpy(out), ref_out, case.dtype, factor=2.0)
        lse = backend.to_numpy(lse).astype(np.float64)
        whole = backend.to_numpy(part(slice(0, S))[1]).astype(np.float64)
        assert np.array_equal(np.isposinf(lse), np.isposinf(whole))
        finite = np.isfinite(whole)
        tol = 10 * REL_TOL["float32" if case.dtype == "float16" else case.dtype]
        np.testing.assert_allclose(lse[finite], whole[finite], rtol=tol, atol=tol)


# -- the layer -------------------------------------------------------------------------


@st.composite
def layer_cases(draw, dtypes: list[str]) -> dict[str, Any]:
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    H = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 4))  # 1 gives E = H
    E = H * head_dim
    kdim = draw(st.none() | st.integers(1, 6))
    vdim = draw(st.none() | st.integers(1, 6))
    large = draw(st.integers(0, 4)) == 0
    B = draw(st.integers(16, 40)) if large else draw(st.integers(1, 3))
    top = 3 if large else 5
    L, S = draw(st.integers(1, top)), draw(st.integers(1, top))
    cross = draw(st.booleans()) or kdim is not None or vdim is not None
    if not cross:
        S = L
    kd, vd = kdim or E, vdim or E
    params = {}
    if kd == E and vd == E:
        params["in_proj_weight"] = rng.standard_normal((3 * E, E)) / math.sqrt(E)
    else:
        params |= {"q_proj_weight": rng.standard_normal((E, E)) / math.sqrt(E),
                   "k_proj_weight": rng.standard_normal((E, kd)) / math.sqrt(kd),
                   "v_proj_weight": rng.standard_normal((E, vd)) / math.sqrt(vd)}
    params["out_proj.weight"] = rng.standard_normal((E, E)) / math.sqrt(E)
    if draw(st.booleans()):
        params["in_proj_bias"] = rng.standard_normal(3 * E)
        params["out_proj.bias"] = rng.standard_normal(E)
    params = {n: rounded(w, dtype) for n, w in params.items()}
    q = rounded(rng.standard_normal((B, L, E)), dtype)
    k = rounded(rng.standard_normal((B, S, kd)), dtype) if cross else q
    v = rounded(rng.standard_normal((B, S, vd)), dtype) if cross else q
    path = draw(st.sampled_from(["dense", "chunk_size", "budget0"]))
    min_ndim = 2 if path != "dense" else 0  # see cases()
    full = (B, H, L, S)
    pad = mask = bias = None
    if draw(st.booleans()):
        pad = rng.random((B, S)) < draw(st.sampled_from([0.3, 0.7, 1.0]))
    if draw(st.booleans()):
        mask = rng.random(_broadcastable_shape(draw, full, min_ndim)) < 0.7
    if draw(st.booleans()):
        bias = rounded(rng.standard_normal(_broadcastable_shape(draw, full, min_ndim)), dtype)
    return dict(
        dtype=dtype, H=H, params=params, q=q, k=k, v=v, cross=cross, pad=pad, mask=mask,
        bias=bias, is_causal=draw(st.booleans()), unbatched=B == 1 and draw(st.booleans()),
        average=draw(st.booleans()),
        chunk_size=draw(st.integers(1, 4)) if path == "chunk_size" else None,
        memory_budget=0 if path == "budget0" else None,
    )


def _layer_mask(mask: np.ndarray, unbatched: bool) -> np.ndarray:
    """A per-head ``(H, L, S)`` mask as the layer takes it on batched input,
    ``(1, H, L, S)``: it refuses the ambiguous 3-D form there."""
    return mask[None] if not unbatched and mask.ndim == 3 and mask.shape[0] != 1 else mask


class TestLayerProperties:
    @budget(40)
    @given(data=st.data())
    def test_layer_matches_float64_reference(self, backend, data):
        c = data.draw(layer_cases(dtypes_of(backend)))
        note({k: (v.shape if isinstance(v, np.ndarray) else v) for k, v in c.items()
              if k != "params"})
        dt = c["dtype"]
        layer = mha_xp.MultiHeadAttention.from_state_dict(
            {n: backend.asarray(w, dt) for n, w in c["params"].items()}, num_heads=c["H"])
        mask_ok = c["mask"] is None or c["mask"].ndim <= 3  # an unbatched mask has no B axis
        unbatched = c["unbatched"] and mask_ok and (c["bias"] is None or c["bias"].ndim <= 3)
        first = (lambda a: a[0]) if unbatched else (lambda a: a)
        q = backend.asarray(first(c["q"]), dt)
        k = q if not c["cross"] else backend.asarray(first(c["k"]), dt)
        v = q if not c["cross"] else backend.asarray(first(c["v"]), dt)
        out, w = layer(
            q, k, v,
            key_padding_mask=None if c["pad"] is None else backend.asarray(first(c["pad"])),
            mask=None if c["mask"] is None else backend.asarray(_layer_mask(c["mask"], unbatched)),
            bias=None if c["bias"] is None else backend.asarray(c["bias"], dt),
            is_causal=c["is_causal"], return_weights=True, average_weights=c["average"],
            chunk_size=c["chunk_size"], memory_budget=c["memory_budget"],
        )
        B, L, E = c["q"].shape
        S = c["k"].shape[1]
        assert_preserved(backend, out, dt, ((L, E) if unbatched else (B, L, E)))
        ref_out, ref_w = ref_mha(c["params"], c["H"], c["q"], c["k"], c["v"],
                                 key_padding_mask=c["pad"], allowed=c["mask"],
                                 bias=c["bias"], is_causal=c["is_causal"])
        if c["average"]:
            ref_w = ref_w.mean(axis=1)
        if unbatched:
            ref_out, ref_w = ref_out[0], ref_w[0]
        assert tuple(w.shape) == ref_w.shape
        assert_matches(backend.to_numpy(out), ref_out, dt)
        assert_matches(backend.to_numpy(w), ref_w, dt)
