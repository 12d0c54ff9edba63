"""Non-finite inputs, strict floating-point settings and the numeric range
(``docs/reliability.rst``, "Non-finite inputs and strict floating point").

The contract: a key hidden from a query (by ``mask``, padding, causal,
``window``, packed sequences or a ``-inf`` bias) never influences that
query's output or gradients, whatever its key and value hold, on every path
(dense, chunked with any blocks, Dask); a row that gives weight to a key or
value holding NaN or ±Inf (or whose own query holds one) is NaN as a whole
(output, weights, log-sum-exp), and its gradients reach only the keys and
values it sees. Every other row is bit for bit what it is with the
non-finite entries replaced by zeros.

Comparisons are made path by path (the same call on the same backend with
and without the non-finite entries), bit for bit; against the float64
reference only to the dtype's tolerance.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import mha_xp
from support import REL_TOL, assert_preserved, make_backend, selected_backends
from support._hypothesis_profiles import budget
from support.reference_variants import ref_positions, ref_variants

sdpa = mha_xp.scaled_dot_product_attention

PATHS = {"dense": {}, "chunk1": {"chunk_size": 1}, "chunk2": {"chunk_size": 2},
         "chunk3x2": {"chunk_size": (3, 2)}, "budget0": {"memory_budget": 0}}
GARBAGE = (np.nan, np.inf, -np.inf)
# Backends whose arrays are NumPy's underneath, where np.errstate applies.
NUMPY_BASED = ("numpy", "array_api_strict", "array_api_strict:device1", "dask")


@pytest.fixture(autouse=True)
def _portable_only(monkeypatch):
    """The bit-for-bit comparisons here are of mha_xp's own path: a call with
    non-finite inputs always takes it, while its all-finite twin may run on
    torch's or JAX's native kernel, equal only to the dtype's tolerance
    (``tests/core/test_native.py`` checks that, and that non-finite inputs
    are never delegated)."""
    monkeypatch.setenv("MHA_XP_NATIVE_KERNELS", "0")


def bits(a: np.ndarray) -> np.ndarray:
    """The bit patterns of a float array (NaN payloads and signed zeros included)."""
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_rows(dirty: np.ndarray, clean: np.ndarray, poisoned: np.ndarray, *,
                exact: bool = True) -> None:
    """Rows (the last axis is a row's features) where ``poisoned`` are all
    NaN; the others equal ``clean``: bit for bit, or as numbers (``exact=False``,
    where a signed zero may flip)."""
    assert dirty.shape == clean.shape and dirty.dtype == clean.dtype
    poisoned = np.broadcast_to(poisoned, dirty.shape[:-1])
    assert np.all(np.isnan(dirty[poisoned])), "a row that sees a non-finite entry is not NaN"
    if exact:
        same = np.all(bits(dirty) == bits(clean), axis=-1)
    else:
        same = np.all(dirty == clean, axis=-1)
    bad = np.argwhere(~same & ~poisoned)
    assert bad.size == 0, f"rows {bad.tolist()} changed although they see no non-finite entry"


def visibility(L: int, S: int, *, mask=None, bias=None, is_causal=False, window=None,
               cu_q=None, cu_k=None) -> np.ndarray:
    """Which key each query sees, ``(L, S)``, from the reference's definitions."""
    allowed, _ = ref_positions(L, S, is_causal=is_causal, window=window, cu_q=cu_q, cu_k=cu_k)
    if mask is not None:
        allowed = allowed & mask
    if bias is not None:
        allowed = allowed & (bias > -np.inf)
    return allowed


def call(backend, dtype: str, q, k, v, fn=sdpa, **kwargs) -> Any:
    """``fn`` on the backend with host inputs; results back on the host."""
    conv = {}
    for name, a in kwargs.items():
        if isinstance(a, np.ndarray):
            a = backend.asarray(a) if a.dtype == bool else backend.asarray(a, dtype)
        conv[name] = a
    res = fn(*(backend.asarray(t, dtype) for t in (q, k, v)), **conv)
    if isinstance(res, tuple):
        return tuple(backend.to_numpy(r) for r in res)
    return backend.to_numpy(res)


@contextlib.contextmanager
def strict(backend, *, backward: bool = False):
    """Every floating-point flag raises (``np.errstate(all="raise")``) and
    every warning is an error; Dask runs its tasks in this thread, where the
    error state is set. mha_xp ignores the benign underflow of its own
    arithmetic where it can set NumPy's error state (``underflow_ignored``
    in ``mha_xp/_core/_finite.py``); it cannot for array-api-strict (which
    exposes none) nor in Dask's backward (a lazy graph of NumPy operations),
    where underflow is ignored here too."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("error")
        lax = backend.name.startswith("array_api_strict") or (backward and backend.name == "dask")
        stack.enter_context(np.errstate(all="raise", under="ignore" if lax else "raise"))
        if backend.name == "dask":
            import dask

            stack.enter_context(dask.config.set(scheduler="synchronous"))
        yield


# -- the structures that hide keys ------------------------------------------------------

L_, S_ = 5, 7


def _structures() -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(7)
    mask = rng.random((L_, S_)) < 0.6
    mask[:, 0] = True  # every row sees a key
    bias = np.round(rng.standard_normal((L_, S_)) * 8) / 8
    bias[rng.random((L_, S_)) < 0.4] = -np.inf
    bias[:, 1] = 0.0
    return {
        "mask": dict(mask=mask),
        "causal": dict(is_causal=True),
        "causal_l_gt_s": dict(is_causal=True, L=S_, S=L_),
        "window": dict(window=(1, 1)),
        "bias": dict(bias=bias),
        "packed": dict(cu_seqlens_q=[0, 2, 5], cu_seqlens_k=[0, 3, 7], is_causal=True),
        "mask_window_causal": dict(mask=mask, window=(2, 0), is_causal=True),
    }


STRUCTURES = _structures()


def _case(name: str, rng, *, hide_two: bool = False,
          ) -> tuple[dict[str, Any], np.ndarray, tuple[np.ndarray, ...]]:
    """A call's keywords, its visibility ``(L, S)`` and ``(q, k, v)``;
    ``hide_two`` masks two more keys for every query."""
    kw = dict(STRUCTURES[name])
    L, S = kw.pop("L", L_), kw.pop("S", S_)
    if hide_two:
        columns = np.ones(S, dtype=bool)
        columns[[1, S - 2]] = False
        kw["mask"] = kw.get("mask", np.ones((L, S), dtype=bool)) & columns
    allowed = visibility(L, S, mask=kw.get("mask"), bias=kw.get("bias"),
                         is_causal=kw.get("is_causal", False), window=kw.get("window"),
                         cu_q=kw.get("cu_seqlens_q"), cu_k=kw.get("cu_seqlens_k"))
    q, k, v = (rng.standard_normal(s) for s in [(2, 3, L, 4), (2, 3, S, 4), (2, 3, S, 3)])
    return kw, allowed, (q, k, v)


def _dirty(k, v, allowed, rng, *, hidden_from_all: bool,
           ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``k`` and ``v`` with NaN/±Inf at some entries of keys hidden from every
    query (``hidden_from_all``: up to two of them), or of one key hidden from
    the most queries while some see it."""
    if hidden_from_all:
        keys = [int(j) for j in np.flatnonzero(~allowed.any(axis=0))[:2]]
    else:
        seen_by = allowed.sum(axis=0)
        partly = np.flatnonzero((seen_by > 0) & (seen_by < allowed.shape[0]))
        keys = [int(partly[np.argmin(seen_by[partly])])] if partly.size else []
    k, v = k.copy(), v.copy()
    for j in keys:
        for target in (k, v):
            feats = rng.random(target.shape[-1]) < 0.5
            feats[int(rng.integers(target.shape[-1]))] = True
            target[..., j, feats] = rng.choice(GARBAGE, size=target[..., j, feats].shape)
    return k, v, keys


def _zeroed(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, 0.0)


# -- 1. hidden keys and values never reach a query --------------------------------------


class TestHiddenValues:
    @pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
    def test_causal_nan_value_reaches_only_the_row_that_sees_it(self, backend, dtype, path):
        rng = np.random.default_rng(0)
        q = k = rng.standard_normal((1, 4, 2))
        v = k.copy()
        v[0, 3] = np.nan
        out = call(backend, dtype, q, k, v, is_causal=True, **path)
        clean = call(backend, dtype, q, k, _zeroed(v), is_causal=True, **path)
        assert_rows(out, clean, np.array([False, False, False, True]))

    @pytest.mark.parametrize("causal", [False, True])
    @pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
    def test_a_packed_sequence_never_poisons_another(self, backend, dtype, path, causal):
        rng = np.random.default_rng(0)
        q = k = v = rng.standard_normal((1, 6, 2))
        v = v.copy()
        v[0, 4] = np.inf
        kw = dict(cu_seqlens_q=[0, 3, 6], is_causal=causal, **path)
        out = call(backend, dtype, q, k, v, **kw)
        clean = call(backend, dtype, q, k, _zeroed(v), **kw)
        # Query 3 sees key 4 only without causal masking; 4 and 5 always.
        assert_rows(out, clean, np.array([False, False, False, not causal, True, True]))

    @pytest.mark.parametrize("structure", STRUCTURES)
    @pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
    def test_every_structure_and_path(self, backend, dtype, structure, path, rng):
        """NaN and ±Inf in the keys and values of keys hidden from some
        queries: those queries' outputs, weights and log-sum-exps are bit for
        bit those with zeros there; the queries that see them are NaN."""
        kw, allowed, (q, k, v) = _case(structure, rng)
        dk, dv, keys = _dirty(k, v, allowed, rng, hidden_from_all=False)
        assert keys, "the structure hides no key"
        sees = allowed[:, keys].any(axis=1)
        assert sees.any() and not sees.all()
        out, w = call(backend, dtype, q, dk, dv, return_weights=True, **kw, **path)
        clean, w_clean = call(backend, dtype, q, _zeroed(dk), _zeroed(dv), return_weights=True,
                              **kw, **path)
        assert_rows(out, clean, sees)
        assert_rows(w, w_clean, sees)
        lse = call(backend, dtype, q, dk, dv, fn=mha_xp.attention_with_lse, **kw, **path)[1]
        lse_clean = call(backend, dtype, q, _zeroed(dk), _zeroed(dv),
                         fn=mha_xp.attention_with_lse, **kw, **path)[1]
        assert_rows(lse[..., None], lse_clean[..., None], sees)
        # The paths agree with each other: the clean rows match the reference.
        ref, _ = ref_variants(q, _zeroed(dk), _zeroed(dv), allowed=allowed, bias=kw.get("bias"))
        diff, size = (np.linalg.norm(x[..., ~sees, :]) for x in (clean - ref, ref))
        assert diff <= REL_TOL[dtype] * size

    def test_keys_hidden_from_every_query_change_nothing(self, backend, dtype, rng):
        for name in STRUCTURES:
            kw, allowed, (q, k, v) = _case(name, rng, hide_two=True)
            dk, dv, keys = _dirty(k, v, allowed, rng, hidden_from_all=True)
            assert keys
            for path in PATHS.values():
                out = call(backend, dtype, q, dk, dv, **kw, **path)
                clean = call(backend, dtype, q, _zeroed(dk), _zeroed(dv), **kw, **path)
                assert bits(out).tobytes() == bits(clean).tobytes(), (name, path)

    @pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
    def test_visible_non_finite_entries_propagate(self, backend, dtype, path, rng):
        """NaN or Inf in a visible key, value or query makes the rows that see
        it NaN (output, weights, log-sum-exp); nothing else changes."""
        q, k, v = (rng.standard_normal(s) for s in [(2, 4, 3), (2, 6, 3), (2, 6, 2)])
        base = call(backend, dtype, q, k, v, return_weights=True, is_causal=True, **path)
        for which, where, value in [("k", (0, 2, 1), np.nan), ("v", (1, 3, 0), np.inf),
                                    ("q", (0, 1, 2), -np.inf), ("v", (0, 5, 1), np.nan)]:
            arrays = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
            arrays[which][where] = value
            out, w = call(backend, dtype, arrays["q"], arrays["k"], arrays["v"],
                          return_weights=True, is_causal=True, **path)
            sees = np.zeros((2, 4), dtype=bool)
            if which == "q":
                sees[where[0], where[1]] = True
            else:  # queries i see keys j <= i + 2
                sees[where[0], max(0, where[1] - 2):] = True
            assert_rows(out, base[0], sees)
            assert_rows(w, base[1], sees)

    def test_dropout_rows_without_garbage_are_unchanged(self, backend, dtype, rng):
        kw, allowed, (q, k, v) = _case("mask", rng)
        dk, dv, keys = _dirty(k, v, allowed, rng, hidden_from_all=False)
        sees = allowed[:, keys].any(axis=1)
        for path in ({}, {"chunk_size": 2}):
            out = call(backend, dtype, q, dk, dv, dropout_p=0.3, seed=5, **kw, **path)
            clean = call(backend, dtype, q, _zeroed(dk), _zeroed(dv), dropout_p=0.3, seed=5,
                         **kw, **path)
            keep = np.broadcast_to(~sees, out.shape[:-1])
            assert bits(out[keep]).tobytes() == bits(clean[keep]).tobytes()

    def test_layer_padding_with_inf_is_inert(self, backend, dtype, rng):
        """The layer's key_padding_mask (the core's per-key padding) with Inf
        and NaN in the padded keys and values."""
        layer = mha_xp.MultiHeadAttention(6, 2, xp=backend.xp, device=backend.device,
                                          dtype=backend.dtype(dtype), seed=3)
        q, kv = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 5, 6))
        pad = np.zeros((2, 5), dtype=bool)
        pad[0, 3:], pad[1, 1] = True, True
        dirty = kv.copy()
        dirty[pad] = rng.choice(GARBAGE, size=dirty[pad].shape)
        outs = []
        for x in (dirty, np.where(pad[..., None], 0.0, kv)):
            xb = backend.asarray(x, dtype)
            outs.append(backend.to_numpy(layer(backend.asarray(q, dtype), xb, xb,
                                               key_padding_mask=backend.asarray(pad),
                                               is_causal=True)))
        assert bits(outs[0]).tobytes() == bits(outs[1]).tobytes()


# -- 2. no gradient reaches or leaves a masked position ----------------------------------


def _grads(backend, dtype, q, k, v, grad_out=None, **kw) -> dict[str, np.ndarray]:
    conv = {n: (backend.asarray(a) if isinstance(a, np.ndarray) and a.dtype == bool
                else backend.asarray(a, dtype) if isinstance(a, np.ndarray) else a)
            for n, a in kw.items()}
    out, backward = mha_xp.attention_vjp(*(backend.asarray(t, dtype) for t in (q, k, v)), **conv)
    go = np.ones(tuple(out.shape)) if grad_out is None else grad_out
    grads = backward(backend.asarray(go, dtype))
    return {n: backend.to_numpy(g) for n, g in grads.items()}


def _expected_nan(allowed: np.ndarray, bad_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows ``bad_rows (L,)``: ``(keys (S,), positions (L, S))`` whose
    gradients become NaN: the keys a bad row sees, and those positions."""
    positions = allowed & bad_rows[:, None]
    return positions.any(axis=0), positions


class TestHiddenGradients:
    @pytest.mark.parametrize("path", [{}, {"chunk_size": 1}, {"chunk_size": (2, 1)}],
                             ids=["default", "chunk1", "chunk2x1"])
    def test_issue_example(self, backend, dtype, path):
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((3, 2)) for _ in range(3))
        k[2] = np.nan
        mask = np.array([True, True, False])
        dirty = _grads(backend, dtype, q, k, v, mask=mask, chunk_size=path.get("chunk_size"))
        clean = _grads(backend, dtype, q, _zeroed(k), v, mask=mask,
                       chunk_size=path.get("chunk_size"))
        for name in ("query", "key", "value"):
            assert bits(dirty[name]).tobytes() == bits(clean[name]).tobytes(), name
        assert np.all(dirty["key"][2] == 0) and np.all(dirty["value"][2] == 0)

    @pytest.mark.parametrize("structure", STRUCTURES)
    def test_keys_hidden_from_every_query(self, backend, dtype, structure, rng):
        """Garbage in keys no query sees: every gradient (bias included) is
        bit for bit the one with zeros there, and theirs are 0."""
        kw, allowed, (q, k, v) = _case(structure, rng, hide_two=True)
        dk, dv, keys = _dirty(k, v, allowed, rng, hidden_from_all=True)
        assert keys
        for path in ({}, {"chunk_size": 2}, {"chunk_size": (3, 1)}):
            dirty = _grads(backend, dtype, q, dk, dv, **kw, **path)
            clean = _grads(backend, dtype, q, _zeroed(dk), _zeroed(dv), **kw, **path)
            for name in dirty:
                assert bits(dirty[name]).tobytes() == bits(clean[name]).tobytes(), (name, path)
            assert np.all(dirty["key"][..., keys, :] == 0)
            assert np.all(dirty["value"][..., keys, :] == 0)

    @pytest.mark.parametrize("structure", ["mask", "causal", "bias", "packed", "window"])
    def test_nan_reaches_only_what_a_bad_row_sees(self, backend, dtype, structure, rng):
        """Garbage in keys some queries see: those queries' gradients are NaN,
        and so are those of the keys and values they see and of the bias
        there; every other gradient is unchanged."""
        kw, allowed, (q, k, v) = _case(structure, rng)
        dk, dv, keys = _dirty(k, v, allowed, rng, hidden_from_all=False)
        bad_rows = allowed[:, keys].any(axis=1)
        nan_keys, nan_positions = _expected_nan(allowed, bad_rows)
        for path in ({}, {"chunk_size": 2}):
            dirty = _grads(backend, dtype, q, dk, dv, **kw, **path)
            clean = _grads(backend, dtype, q, _zeroed(dk), _zeroed(dv), **kw, **path)
            assert_rows(dirty["query"], clean["query"], bad_rows, exact=False)
            assert_rows(dirty["key"], clean["key"], nan_keys, exact=False)
            assert_rows(dirty["value"], clean["value"], nan_keys, exact=False)
            if "bias" in dirty:
                assert_rows(dirty["bias"][..., None], clean["bias"][..., None],
                            nan_positions, exact=False)

    @pytest.mark.parametrize("path", [{}, {"chunk_size": 2}], ids=["default", "chunk2"])
    def test_non_finite_upstream_gradient_stays_in_its_row(self, backend, dtype, path, rng):
        kw, allowed, (q, k, v) = _case("mask_window_causal", rng)
        go = rng.standard_normal((2, 3, L_, 3))
        row = int(np.flatnonzero(allowed.any(axis=1) & ~allowed.all(axis=1))[0])
        bad_rows = np.arange(L_) == row
        dirty_go = go.copy()
        dirty_go[..., row, 1] = np.nan
        dirty = _grads(backend, dtype, q, k, v, grad_out=dirty_go, **kw, **path)
        clean = _grads(backend, dtype, q, k, v, grad_out=np.where(bad_rows[:, None], 0.0, go),
                       **kw, **path)
        nan_keys, _ = _expected_nan(allowed, bad_rows)
        assert_rows(dirty["query"], clean["query"], bad_rows, exact=False)
        assert_rows(dirty["key"], clean["key"], nan_keys, exact=False)
        assert_rows(dirty["value"], clean["value"], nan_keys, exact=False)

    def test_dropout_and_softcap_gradients(self, backend, dtype, rng):
        kw, allowed, (q, k, v) = _case("mask", rng, hide_two=True)
        dk, dv, keys = _dirty(k, v, allowed, rng, hidden_from_all=True)
        for extra in (dict(dropout_p=0.4, seed=9), dict(softcap=1.5), dict(alibi_slopes=[0.5] * 3)):
            dirty = _grads(backend, dtype, q, dk, dv, **kw, **extra)
            clean = _grads(backend, dtype, q, _zeroed(dk), _zeroed(dv), **kw, **extra)
            for name in dirty:
                assert bits(dirty[name]).tobytes() == bits(clean[name]).tobytes(), (name, extra)


# -- 3. unsigned cu_seqlens ----------------------------------------------------------------


UNSIGNED = ("uint8", "uint16", "uint32", "uint64")


class TestUnsignedCuSeqlens:
    @pytest.mark.parametrize("udtype", UNSIGNED)
    def test_equal_to_int64(self, backend, udtype, rng):
        if getattr(backend.cxp, udtype, None) is None:
            pytest.skip(f"{backend.name} has no {udtype}")
        q, k, v = (rng.standard_normal(s) for s in [(2, 6, 4), (2, 6, 4), (2, 6, 3)])
        cu_q, cu_k = np.array([0, 3, 6]), np.array([0, 2, 6])
        for kw in (dict(is_causal=True), dict(window=(1, 0)),
                   dict(is_causal=True, alibi_slopes=[0.5, 0.5]),
                   dict(is_causal=True, chunk_size=2)):
            results = []
            for dt in ("int64", udtype):
                args = [backend.asarray(t, "float64") for t in (q, k, v)]
                out = sdpa(*args, cu_seqlens_q=backend.asarray(cu_q, dt),
                           cu_seqlens_k=backend.asarray(cu_k, dt), **kw)
                results.append(backend.to_numpy(out))
            assert bits(results[1]).tobytes() == bits(results[0]).tobytes(), kw
        # Causal ALiBi within each sequence, against the reference.
        ref, _ = ref_variants(q[:, None], k[:, None], v[:, None], is_causal=True,
                              alibi=[0.5], cu_q=cu_q, cu_k=cu_k)
        args = [backend.asarray(t, "float64") for t in (q, k, v)]
        out = sdpa(*args, cu_seqlens_q=backend.asarray(cu_q, udtype),
                   cu_seqlens_k=backend.asarray(cu_k, udtype), is_causal=True,
                   alibi_slopes=[0.5, 0.5])
        np.testing.assert_allclose(backend.to_numpy(out), ref[:, 0], rtol=1e-12, atol=1e-12)

    def test_lists_and_mixed_dtypes(self, backend, rng):
        q, k, v = (rng.standard_normal(s) for s in [(6, 4), (6, 4), (6, 3)])
        args = [backend.asarray(t, "float64") for t in (q, k, v)]
        outs = [backend.to_numpy(sdpa(*args, cu_seqlens_q=cq, cu_seqlens_k=ck, is_causal=True))
                for cq, ck in [([0, 3, 6], [0, 2, 6]),
                               (backend.asarray(np.array([0, 3, 6]), "int32"),
                                backend.asarray(np.array([0, 2, 6]), "uint8"))]]
        assert bits(outs[0]).tobytes() == bits(outs[1]).tobytes()


# -- 4. a scale beyond the compute dtype ------------------------------------------------


class TestScaleRange:
    def test_scale_that_overflows_float32_is_refused(self, backend, rng):
        q = backend.asarray(rng.standard_normal((2, 3, 4)), "float32")
        for fn in (sdpa, mha_xp.attention_with_lse, mha_xp.attention_vjp):
            with pytest.raises(ValueError, match=r"scale=1e\+39 overflows float32.*3\.40282e\+38"):
                fn(q, q, q, scale=1e39)
        out = sdpa(q, q, q, scale=1e30)  # representable: accepted
        assert_preserved(backend, out, "float32", (2, 3, 4))

    def test_float64_takes_it(self, backend, rng):
        q = backend.asarray(rng.standard_normal((2, 3, 4)), "float64")
        out = backend.to_numpy(sdpa(q, q, q, scale=1e39))
        assert np.all(np.isfinite(out))

    def test_float16_is_checked_against_float32(self, backend_f16, rng):
        q = backend_f16.asarray(rng.standard_normal((2, 3, 4)), "float16")
        with pytest.raises(ValueError, match="overflows float32"):
            sdpa(q, q, q, scale=1e39)
        sdpa(q, q, q, scale=7e4)  # beyond float16's maximum, within float32's


# -- 5. strict floating-point settings ---------------------------------------------------


class TestStrictFloatingPoint:
    """Documented-inert input raises nothing under ``np.errstate(all="raise")``
    with every warning an error, on the dense and chunked paths and in the
    backward (NumPy-based backends; the others never raise on floating-point
    flags, and run the same calls)."""

    @pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
    def test_masked_garbage_fully_masked_rows_and_minus_inf_bias(self, backend, dtype, path, rng):
        q, k, v = (rng.standard_normal(s) for s in [(2, 5, 4), (2, 7, 4), (2, 7, 3)])
        k[:, 6], v[:, 6, 1], k[:, 5, 2], v[:, 5] = np.inf, np.nan, -np.inf, np.inf
        mask = np.ones((5, 7), dtype=bool)
        mask[:, 5:], mask[3] = False, False  # two garbage keys, one fully masked row
        bias = np.zeros((5, 7))
        bias[:, 2], bias[1] = -np.inf, -np.inf  # a key and a whole row
        for kw in (dict(mask=mask), dict(mask=mask, bias=bias, is_causal=True),
                   dict(mask=mask, window=(2, 1), softcap=3.0)):
            with strict(backend):
                out, w = call(backend, dtype, q, k, v, return_weights=True, **kw, **path)
                _, lse = call(backend, dtype, q, k, v, fn=mha_xp.attention_with_lse, **kw, **path)
            with strict(backend, backward=True):
                grads = _grads(backend, dtype, q, k, v, **kw, **path)
            assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
            assert all(np.all(np.isfinite(g)) for g in grads.values())
            empty = [3, 1] if "bias" in kw else [3]
            assert np.all(out[:, empty] == 0) and np.all(np.isposinf(lse[:, empty]))
            assert np.all(grads["query"][:, empty] == 0)

    @pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
    def test_rows_without_keys(self, backend, dtype, path, rng):
        q, k, v = (rng.standard_normal(s) for s in [(2, 6, 4), (2, 3, 4), (2, 3, 3)])
        with strict(backend):
            # L > S: queries 0 to 2 see no key.
            out = call(backend, dtype, q, k, v, is_causal=True, **path)
        with strict(backend, backward=True):
            grads = _grads(backend, dtype, q, k, v, is_causal=True, **path)
            dropped = _grads(backend, dtype, q, k, v, is_causal=True, dropout_p=1.0, seed=1, **path)
        assert np.all(out[:, :3] == 0) and np.all(grads["query"][:, :3] == 0)
        assert all(np.all(g == 0) for g in dropped.values())

    @pytest.mark.parametrize("path", PATHS.values(), ids=PATHS)
    def test_scores_of_a_few_hundred(self, backend, dtype, path, rng):
        """Score differences of hundreds: the softmax's exponentials, small
        weights times small values and the gradients underflow to subnormal
        numbers or 0, correctly rounded; no flag reaches the caller."""
        q, k = (rng.standard_normal(s) * 30 for s in [(2, 5, 4), (2, 7, 4)])
        v = rng.standard_normal((2, 7, 3)) * 1e-3
        with strict(backend):
            out, w = call(backend, dtype, q, k, v, is_causal=True, return_weights=True, **path)
            _, lse = call(backend, dtype, q, k, v, fn=mha_xp.attention_with_lse, **path)
        with strict(backend, backward=True):
            grads = _grads(backend, dtype, q, k, v, is_causal=True, **path)
        ref, ref_w = ref_variants(q, k, v, is_causal=True)
        assert np.linalg.norm(out - ref) <= REL_TOL[dtype] * np.linalg.norm(ref)
        assert np.linalg.norm(w - ref_w) <= REL_TOL[dtype] * np.linalg.norm(ref_w)
        assert np.all(np.isfinite(lse)) and all(np.all(np.isfinite(g)) for g in grads.values())

    @pytest.mark.parametrize("path", [{}, {"chunk_size": 2}], ids=["dense", "chunk2"])
    def test_float16_scores_of_a_few_hundred(self, backend_f16, path, rng):
        """float16 inputs whose scores reach a few hundred, with a masked +inf
        key: outputs, weights (rounded to float16, many to subnormals) and
        gradients raise nothing."""
        q, k = (rng.standard_normal(s) * 30 for s in [(2, 5, 4), (2, 7, 4)])
        v = rng.standard_normal((2, 7, 3))
        k[:, 6] = np.inf
        mask = np.ones((5, 7), dtype=bool)
        mask[:, 6] = False
        with strict(backend_f16):
            out, w = call(backend_f16, "float16", q, k, v, mask=mask, return_weights=True, **path)
        with strict(backend_f16, backward=True):
            grads = _grads(backend_f16, "float16", q, k, v, mask=mask, **path)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
        assert all(np.all(np.isfinite(g)) for g in grads.values())
        assert np.all(w[..., 6] == 0) and np.all(grads["key"][:, 6] == 0)


# -- 6. merge_attention: either convention for an empty side -----------------------------


class TestMergeEmptySide:
    @pytest.mark.parametrize("empty", [np.inf, -np.inf])
    def test_either_infinity_marks_an_empty_side(self, backend, dtype, empty, rng):
        q, k, v = (rng.standard_normal(s) for s in [(2, 4, 3), (2, 6, 3), (2, 6, 2)])
        out1, lse1 = call(backend, dtype, q, k, v, fn=mha_xp.attention_with_lse)
        lse2 = np.full_like(lse1, empty)
        lse2[1, 2] = 0.5  # one row not empty
        out2 = rng.standard_normal(out1.shape)
        out2[lse2 == empty] = np.nan  # an empty side's output is ignored, whatever it holds
        xs = [backend.asarray(a, dtype) for a in (out1, lse1, out2)]
        with strict(backend) if backend.name in NUMPY_BASED else contextlib.nullcontext():
            out, lse = mha_xp.merge_attention(xs[0], xs[1], xs[2], backend.asarray(lse2, dtype))
            both, lse_both = mha_xp.merge_attention(
                xs[2], backend.asarray(np.full_like(lse1, empty), dtype),
                xs[2], backend.asarray(np.full_like(lse1, -empty), dtype))
        out, lse = backend.to_numpy(out), backend.to_numpy(lse)
        empty_rows = lse2 == empty
        assert bits(out[empty_rows]).tobytes() == bits(out1[empty_rows].astype(out.dtype)).tobytes()
        assert bits(lse[empty_rows]).tobytes() == bits(lse1[empty_rows].astype(lse.dtype)).tobytes()
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
        assert np.all(backend.to_numpy(both) == 0)
        assert np.all(np.isposinf(backend.to_numpy(lse_both)))

    def test_nan_lse_propagates(self, backend, dtype, rng):
        out1 = rng.standard_normal((3, 2))
        lse1 = np.array([0.1, np.nan, 0.3])
        out, lse = mha_xp.merge_attention(*(backend.asarray(a, dtype) for a in
                                            (out1, lse1, out1, np.array([np.inf, 0.0, -np.inf]))))
        out, lse = backend.to_numpy(out), backend.to_numpy(lse)
        assert np.all(np.isnan(out[1])) and np.isnan(lse[1])
        assert np.all(np.isfinite(out[[0, 2]])) and np.all(np.isfinite(lse[[0, 2]]))


# -- 7. property: hidden non-finite entries change nothing, on every path -----------------


@st.composite
def hidden_garbage(draw) -> dict[str, Any]:
    """A call with random structural masking and NaN/±Inf at entries of keys
    hidden from at least one query; where its queries look."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    L, S = draw(st.integers(1, 9)), draw(st.integers(2, 9))
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    D, Dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kw: dict[str, Any] = {"is_causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 3)), draw(st.integers(-1, 3)))
    if draw(st.booleans()):  # packed sequences, query and key boundaries apart
        n = draw(st.integers(1, 3))
        cuts_q = sorted(draw(st.lists(st.integers(0, L), min_size=n - 1, max_size=n - 1)))
        cuts_k = sorted(draw(st.lists(st.integers(0, S), min_size=n - 1, max_size=n - 1)))
        kw["cu_seqlens_q"], kw["cu_seqlens_k"] = [0, *cuts_q, L], [0, *cuts_k, S]
    if draw(st.booleans()):
        kw["mask"] = rng.random((L, S)) < draw(st.sampled_from([0.3, 0.7]))
    if draw(st.booleans()):
        bias = np.round(rng.standard_normal((H, L, S)) * 8) / 8
        kw["bias"] = np.where(rng.random((H, L, S)) < 0.3, -np.inf, bias)
    allowed = visibility(L, S, mask=kw.get("mask"), is_causal=kw["is_causal"],
                         window=kw.get("window"), cu_q=kw.get("cu_seqlens_q"),
                         cu_k=kw.get("cu_seqlens_k"))
    allowed = allowed & (kw["bias"] > -np.inf if "bias" in kw else True)  # (H, L, S) or (L, S)
    hidden_somewhere = ~np.all(allowed.reshape(-1, L, S), axis=(0, 1))
    q, k, v = (rng.standard_normal(s) for s in [(B, H, L, D), (B, H, S, D), (B, H, S, Dv)])
    dirty_k, dirty_v = k.copy(), v.copy()
    for j in np.flatnonzero(hidden_somewhere & (rng.random(S) < 0.6)):
        for target in (dirty_k, dirty_v):
            hit = rng.random(target.shape[:-2] + (target.shape[-1],)) < 0.5
            garbage = rng.choice(GARBAGE, size=hit.shape)
            target[..., j, :] = np.where(hit, garbage, target[..., j, :])
    bad_keys = ~(np.all(np.isfinite(dirty_k), axis=-1) & np.all(np.isfinite(dirty_v), axis=-1))
    sees = np.any(allowed & bad_keys[:, :, None, :], axis=-1)  # (B, H, L)
    path = draw(st.sampled_from(["dense", "chunked", "dask"]))
    if path == "chunked":
        kw["chunk_size"] = (draw(st.integers(1, L)), draw(st.integers(1, S)))
    dask_chunks = None
    if path == "dask":
        dask_chunks = {0: draw(st.integers(1, B)), 2: draw(st.integers(1, L))}
        if draw(st.booleans()):
            kw["chunk_size"] = (draw(st.integers(1, L)), draw(st.integers(1, S)))
    return dict(q=q, k=dirty_k, v=dirty_v, kw=kw, sees=sees, path=path, dask_chunks=dask_chunks)


class TestHiddenGarbageProperty:
    @pytest.fixture(params=selected_backends(("numpy", "dask")))
    def backend(self, request):
        return make_backend(request.param)

    @budget(60)
    @given(data=st.data())
    def test_hidden_garbage_changes_nothing(self, backend, data):
        """Every path gives, bit for bit, the output of the same path with the
        non-finite entries replaced by zeros, in every query that does not
        see them; the queries that see them are NaN."""
        case = data.draw(hidden_garbage())
        if case["path"] == "dask" and backend.name != "dask":
            case["path"], case["dask_chunks"] = "dense", None
        note({n: (a if n != "kw" else {m: getattr(b, "shape", b) for m, b in a.items()})
              for n, a in case.items() if n not in ("q", "k", "v", "sees")})
        dtype = data.draw(st.sampled_from(["float32", "float64"]))

        def run(k, v):
            arrays = [backend.asarray(t, dtype) for t in (case["q"], k, v)]
            if case["dask_chunks"] is not None:
                arrays[0] = arrays[0].rechunk(case["dask_chunks"])
                arrays[1:] = [a.rechunk({0: case["dask_chunks"][0]}) for a in arrays[1:]]
            kw = {n: (backend.asarray(a) if isinstance(a, np.ndarray) and a.dtype == bool
                      else backend.asarray(a, dtype) if isinstance(a, np.ndarray) else a)
                  for n, a in case["kw"].items()}
            return backend.to_numpy(sdpa(*arrays, **kw))

        dirty = run(case["k"], case["v"])
        clean = run(_zeroed(case["k"]), _zeroed(case["v"]))
        assert_rows(dirty, clean, case["sees"])


def test_in_place_stand_ins_equal_the_portable_ones(rng):
    """NumPy's fast path for the finite stand-ins (a copy and a masked fill)
    against the portable ``where``, and the input left alone."""
    import array_api_compat.numpy as xp

    from mha_xp._core._finite import finite_part

    for dtype in (np.float16, np.float32, np.float64):
        x = rng.standard_normal((3, 4, 5)).astype(dtype)
        x[rng.random(x.shape) < 0.3] = np.nan
        x[rng.random(x.shape) < 0.1] = np.inf
        x[0, 0, 0], x[0, 0, 1] = -np.inf, -0.0
        before = x.copy()
        (fast, fast_bad), (portable, portable_bad) = (finite_part(x, xp=xp, in_place=flag)
                                                      for flag in (True, False))
        assert bits(fast).tobytes() == bits(portable).tobytes()
        assert np.array_equal(fast_bad, portable_bad)
        assert np.array_equal(fast_bad, ~np.isfinite(x).all(axis=-1))
        assert bits(x).tobytes() == bits(before).tobytes()
        assert np.all(np.isfinite(fast))
        assert bits(fast[0, 0, 1:2]).tobytes() == bits(x[0, 0, 1:2]).tobytes()  # -0.0 kept


def test_in_place_values_with_flags_equal_the_portable_ones(rng):
    """The values with their flag column, NumPy's one-pass fast path against
    the portable ``where`` and ``concat``, leading shapes broadcasting."""
    import array_api_compat.numpy as xp

    from mha_xp._core._finite import finite_values

    v = rng.standard_normal((1, 3, 6, 4))
    v[rng.random(v.shape) < 0.2] = np.nan
    v[0, 1, 2, 3] = -np.inf
    key_bad = rng.random((2, 3, 6)) < 0.3
    before = v.copy()
    fast, portable = (finite_values(v, key_bad, xp=xp, in_place=flag) for flag in (True, False))
    assert fast.shape == portable.shape == (2, 3, 6, 5)
    assert bits(fast).tobytes() == bits(portable).tobytes()
    expected_flag = key_bad | ~np.isfinite(v).all(axis=-1)
    assert np.array_equal(fast[..., 4], expected_flag.astype(float))
    assert bits(v).tobytes() == bits(before).tobytes()
