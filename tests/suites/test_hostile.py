"""Hostile input: a fuzz over malformed arguments to every public entry point.

Each generated case starts from a valid call and breaks exactly one argument:
a wrong rank, shape, dtype, namespace or device, a non-array object, a NaN or
negative scale, a non-positive size, a bad ``chunk_size`` or ``memory_budget``.
Every such call must fail with a ``TypeError`` or ``ValueError`` (exactly
those classes, not a backend's subclass of them) raised inside mha_xp, whose
message names the broken argument: never an exception from deep inside a
backend, never a result.

Some malformed arguments are left out of the fuzz because mha_xp does not
reject them cleanly yet (reported, see docs/reliability.rst): array-valued
``is_causal``/``return_weights``/``average_weights``, the layer's ``seed``,
``device`` and ``bias`` constructor arguments and non-dtype ``dtype`` objects,
a 0-d ``out`` in ``merge_attention`` and ``lse`` of a dtype other than the
output's.
"""

from __future__ import annotations

import importlib.util
import math
import re
import traceback
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import mha_xp
from support import FLOAT16_BACKENDS, make_backend
from support._hypothesis_profiles import budget

PACKAGE = Path(mha_xp.__file__).resolve().parent
MHA = mha_xp.MultiHeadAttention

_CPU_BACKENDS = [name for name, module in [("numpy", "numpy"),
                                           ("array_api_strict", "array_api_strict"),
                                           ("torch", "torch")]
                 if importlib.util.find_spec(module) is not None]


def assert_rejected(call: Callable[[], Any], *names: str) -> None:
    """``call()`` raises exactly TypeError or ValueError, from mha_xp's own
    code, with one of ``names`` in the message as a whole word."""
    try:
        result = call()
    except (TypeError, ValueError) as exc:
        assert type(exc) in (TypeError, ValueError), f"{type(exc).__mro__}: {exc}"
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        assert Path(frame.filename).resolve().is_relative_to(PACKAGE), (
            f"raised outside mha_xp, in {frame.filename}:{frame.lineno}: "
            f"{type(exc).__name__}: {exc}"
        )
        message = str(exc)
        assert any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", message) for n in names), (
            f"the message does not name {' or '.join(names)}: {message}"
        )
        return
    except Exception as exc:  # anything else is a crash
        raise AssertionError(f"crashed with {type(exc).__name__}: {exc}") from exc
    shape = getattr(result, "shape", None) or [getattr(r, "shape", r) for r in result]
    raise AssertionError(f"malformed input accepted; the result has shape {shape}")


# -- building blocks ---------------------------------------------------------------


def dtypes_of(backend) -> list[str]:
    return ["float32", "float64"] + (["float16"] if backend.name in FLOAT16_BACKENDS else [])


def foreign(backend, data) -> tuple[Any, str]:
    """Another library's backend, or the same library on another device."""
    choices = [n for n in _CPU_BACKENDS if n != backend.name.partition(":")[0]]
    if backend.name.startswith("array_api_strict"):
        choices.append("array_api_strict" if backend.name.endswith("device1")
                       else "array_api_strict:device1")
    return make_backend(data.draw(st.sampled_from(choices), label="foreign backend"))


def non_arrays(host: np.ndarray) -> st.SearchStrategy:
    """Objects that are not arrays mha_xp can use, for an argument whose valid
    value would be ``host`` (a NumPy array)."""
    return st.sampled_from([
        "list", "tuple", "none", "str", "int", "float", "bool", "dict", "object",
        "matrix", "masked", "sparse",
    ]).map(lambda kind: {
        "list": lambda: host.tolist(),
        "tuple": lambda: tuple(host.ravel().tolist()),
        "none": lambda: None,
        "str": lambda: "query",
        "int": lambda: 3,
        "float": lambda: 0.5,
        "bool": lambda: True,
        "dict": lambda: {"a": host},
        "object": lambda: object(),
        "matrix": lambda: _matrix(host),
        "masked": lambda: np.ma.masked_array(host, mask=np.zeros(host.shape, dtype=bool)),
        "sparse": lambda: _sparse(host),
    }[kind]())


def _matrix(host: np.ndarray) -> Any:
    with warnings.catch_warnings():  # np.matrix is pending deprecation: that is the point
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(np.atleast_2d(host.reshape(-1)))


def _sparse(host: np.ndarray) -> Any:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.asarray(np.atleast_1d(host)).to_sparse()


def other_float(backend, dtype: str, data) -> str:
    return data.draw(st.sampled_from([d for d in dtypes_of(backend) if d != dtype]))


def bad_dtype_array(backend, host: np.ndarray, data, *, bool_ok: bool = True) -> Any:
    """``host`` as integers, booleans (unless ``bool_ok`` is False) or complex
    numbers on the backend."""
    kinds = ["int32", "int64", "uint8", "complex64"] + (["bool"] if bool_ok else [])
    kind = data.draw(st.sampled_from(kinds))
    if kind == "bool":
        return backend.asarray(host > 0)
    if kind == "complex64":
        return backend.asarray(host, "complex64")
    return backend.asarray(np.abs(np.round(host)).astype(kind), kind)


BAD_SCALES = [math.nan, math.inf, -math.inf, 0.0, -1.0, -1e-300, "0.5", [0.5], 1j, True,
              np.array(0.5), np.array([0.5, 0.5])]
BAD_CHUNKS = [0, -1, -7, 2.5, "2", (1,), (1, 2, 3), (0, 1), (1, -1), True, (True, 1), [],
              {}, 1.0, np.array([2, 2]), (2.0, 2)]
BAD_BUDGETS = [-1, -(2**40), 1.5, "1", True, [1], math.nan, np.array([1])]


# -- scaled_dot_product_attention and attention_with_lse ----------------------------


@st.composite
def sdpa_base(draw, dtypes):
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    L, S, D, Dv = (draw(st.integers(1, 4)) for _ in range(4))
    return dict(dtype=draw(st.sampled_from(dtypes)), lead=lead, L=L, S=S, D=D, Dv=Dv,
                seed=draw(st.integers(0, 2**16)))


SDPA_KINDS = [
    "non_array", "rank_low", "rank_high", "bad_dtype", "mixed_dtype", "namespace",
    "feature", "length", "lead", "no_features",
    "mask_dtype", "mask_shape", "mask_non_array", "mask_namespace",
    "bias_dtype", "bias_other_float", "bias_shape", "bias_non_array", "bias_namespace",
    "scale", "chunk_size", "memory_budget",
]


def _sdpa_mutation(backend, base: dict, data, kind: str) -> tuple[dict, tuple[str, ...], str]:
    """A valid call's arguments with one of them broken; the names that the
    error must mention; a description."""
    rng = np.random.default_rng(base["seed"])
    dt, lead, L, S, D, Dv = (base[n] for n in ("dtype", "lead", "L", "S", "D", "Dv"))
    host = {"query": rng.standard_normal(lead + (L, D)),
            "key": rng.standard_normal(lead + (S, D)),
            "value": rng.standard_normal(lead + (S, Dv))}
    args = {n: backend.asarray(a, dt) for n, a in host.items()}
    scores = lead + (L, S)
    qkv = data.draw(st.sampled_from(["query", "key", "value"]), label="target")
    names: tuple[str, ...] = (qkv,)
    if kind == "non_array":
        args[qkv] = data.draw(non_arrays(host[qkv]), label="object")
    elif kind == "rank_low":
        flat = host[qkv].reshape(-1)
        args[qkv] = backend.asarray(flat[:2] if data.draw(st.booleans()) else np.asarray(flat[0]), dt)
    elif kind == "rank_high":
        args[qkv] = backend.asarray(host[qkv][None], dt)
    elif kind == "bad_dtype":
        args[qkv] = bad_dtype_array(backend, host[qkv], data)
    elif kind == "mixed_dtype":
        args[qkv] = backend.asarray(host[qkv], other_float(backend, dt, data))
    elif kind == "namespace":
        args[qkv] = foreign(backend, data).asarray(host[qkv], "float32")
        if dt != "float32":
            names = (qkv, "query")  # query comes first: the dtype or namespace message names both
    elif kind == "feature":
        qkv = data.draw(st.sampled_from(["query", "key"]), label="target")
        names = (qkv,)
        shape = host[qkv].shape[:-1] + (D + 1,)
        args[qkv] = backend.asarray(rng.standard_normal(shape), dt)
    elif kind == "length":
        qkv = data.draw(st.sampled_from(["key", "value"]), label="target")
        names = (qkv,)
        shape = host[qkv].shape[:-2] + (S + 1, host[qkv].shape[-1])
        args[qkv] = backend.asarray(rng.standard_normal(shape), dt)
    elif kind == "lead":
        if not lead:  # give all three a leading axis first
            lead = (1,)
            host = {n: a[None] for n, a in host.items()}
        axis = data.draw(st.integers(0, len(lead) - 1))
        if lead[axis] == 1:  # a size the others cannot broadcast to needs them at 2 or more
            host = {n: np.repeat(a, 2, axis=axis) for n, a in host.items()}
            lead = lead[:axis] + (2,) + lead[axis + 1:]
        args = {n: backend.asarray(a, dt) for n, a in host.items()}
        shape = list(lead)
        shape[axis] += 1
        args[qkv] = backend.asarray(rng.standard_normal(tuple(shape) + host[qkv].shape[-2:]), dt)
    elif kind == "no_features":
        for n, last in (("query", 0), ("key", 0)):
            args[n] = backend.asarray(np.zeros(host[n].shape[:-1] + (last,)), dt)
        names = ("query", "scale")
    elif kind.startswith("mask") or kind.startswith("bias"):
        arg = kind.split("_")[0]
        names = (arg,)
        full = np.zeros(scores)
        what = kind.split("_", 1)[1]
        if what == "dtype" and arg == "mask":  # a float or integer mask
            args[arg] = (backend.asarray(full, dt) if data.draw(st.booleans())
                         else bad_dtype_array(backend, full, data, bool_ok=False))
        elif what == "dtype":  # a boolean or integer bias
            args[arg] = (backend.asarray(full > 0) if data.draw(st.booleans())
                         else backend.asarray(full.astype("int64"), "int64"))
        elif what == "other_float":
            args[arg] = backend.asarray(full, other_float(backend, dt, data))
        elif what == "shape":
            bad = data.draw(st.sampled_from([(L + 1, S), (L, S + 1), (S + 1,),
                                             (2,) + scores, (L + 1, 1)]))
            args[arg] = backend.asarray(np.ones(bad, dtype=bool)) if arg == "mask" \
                else backend.asarray(np.zeros(bad), dt)
        elif what == "non_array":
            args[arg] = data.draw(non_arrays(full > 0 if arg == "mask" else full))
            if args[arg] is None:
                args[arg] = [[True]]  # None is the valid default
        elif what == "namespace":
            other = foreign(backend, data)
            args[arg] = other.asarray(np.ones(scores, dtype=bool)) if arg == "mask" \
                else other.asarray(full, "float32")
    else:  # scale, chunk_size, memory_budget
        names = (kind,)
        pool = {"scale": BAD_SCALES, "chunk_size": BAD_CHUNKS, "memory_budget": BAD_BUDGETS}
        args[kind] = data.draw(st.sampled_from(pool[kind]), label=kind)
    return args, names, f"{kind} {names} {base}"


def _call_sdpa(fn, args: dict) -> Callable[[], Any]:
    q, k, v = (args.pop(n) for n in ("query", "key", "value"))
    return lambda: fn(q, k, v, **args)


class TestAttentionFunctions:
    @pytest.mark.parametrize("kind", SDPA_KINDS)
    @budget(10)
    @given(data=st.data())
    def test_scaled_dot_product_attention(self, backend, kind, data):
        base = data.draw(sdpa_base(dtypes_of(backend)))
        args, names, what = _sdpa_mutation(backend, base, data, kind)
        note(what)
        extra = {"return_weights": data.draw(st.booleans()), "is_causal": data.draw(st.booleans())}
        assert_rejected(_call_sdpa(mha_xp.scaled_dot_product_attention, args | extra), *names)

    @pytest.mark.parametrize("kind", SDPA_KINDS)
    @budget(5)
    @given(data=st.data())
    def test_attention_with_lse(self, backend, kind, data):
        base = data.draw(sdpa_base(dtypes_of(backend)))
        args, names, what = _sdpa_mutation(backend, base, data, kind)
        note(what)
        assert_rejected(_call_sdpa(mha_xp.attention_with_lse, args), *names)

    @pytest.mark.parametrize("kind", ["non_array", "bad_dtype", "mixed_dtype", "shape",
                                      "namespace"])
    @budget(10)
    @given(data=st.data())
    def test_merge_attention(self, backend, kind, data):
        base = data.draw(sdpa_base(dtypes_of(backend)))
        rng = np.random.default_rng(base["seed"])
        dt, lead, L, Dv = base["dtype"], base["lead"], base["L"], base["Dv"]
        q, k, v = (backend.asarray(rng.standard_normal(lead + s), dt)
                   for s in [(L, 3), (4, 3), (4, Dv)])
        out1, lse1 = mha_xp.attention_with_lse(q, k, v)
        out2, lse2 = mha_xp.attention_with_lse(q, k, v, is_causal=True)
        args = {"out1": out1, "lse1": lse1, "out2": out2, "lse2": lse2}
        host = {n: backend.to_numpy(a).astype(np.float64) for n, a in args.items()}
        target = data.draw(st.sampled_from(sorted(args)), label="target")
        names = (target,)
        work = "float32" if dt == "float16" and target.startswith("lse") else dt
        if kind == "non_array":
            args[target] = data.draw(non_arrays(host[target]))
        elif kind == "bad_dtype":
            args[target] = bad_dtype_array(backend, host[target], data)
        elif kind == "mixed_dtype":
            # out1 and lse1 fix the dtypes that out2 and lse2 must have.
            target = data.draw(st.sampled_from(["out2", "lse2"]), label="target")
            names = (target,)
            work = "float32" if dt == "float16" and target == "lse2" else dt
            args[target] = backend.asarray(host[target], other_float(backend, work, data))
        elif kind == "shape":
            shape = host[target].shape
            bad = data.draw(st.sampled_from([shape + (1,), shape[:-1] + (shape[-1] + 1,),
                                             (2,) + shape]))
            args[target] = backend.asarray(np.zeros(bad), work)
            if target == "out1":
                names = ("out1", "out2", "lse1")
        elif kind == "namespace":
            args[target] = foreign(backend, data).asarray(host[target], "float32")
            names = (target, "out1")
        note(f"{kind} {target} {base}")
        assert_rejected(lambda: mha_xp.merge_attention(**args), *names)


# -- the layer -----------------------------------------------------------------------


BAD_SIZES = [0, -1, -8, 2.5, "8", True, [8], np.float64(8.0), None, math.nan]
CALL_KINDS = [
    "non_array", "rank", "bad_dtype", "mixed_dtype", "namespace", "features", "batch",
    "length", "padding_dtype", "padding_shape", "padding_non_array", "padding_namespace",
    "mask_dtype", "mask_shape", "bias_dtype", "bias_shape", "bias_other_float",
    "chunk_size", "memory_budget",
]


class TestLayer:
    @pytest.mark.parametrize("kind", ["size", "divisible", "xp", "dtype"])
    @budget(10)
    @given(data=st.data())
    def test_constructor(self, backend, kind, data):
        dtype = data.draw(st.sampled_from(dtypes_of(backend)))
        kwargs = dict(embed_dim=8, num_heads=2, kdim=None, vdim=None, xp=backend.xp,
                      device=backend.device, dtype=backend.dtype(dtype), seed=0)
        if kind == "size":
            arg = data.draw(st.sampled_from(["embed_dim", "num_heads", "kdim", "vdim"]))
            bad = data.draw(st.sampled_from([b for b in BAD_SIZES
                                             if b is not None or arg in ("embed_dim", "num_heads")]))
            kwargs[arg] = bad
            names = (arg,)
        elif kind == "divisible":
            H = data.draw(st.integers(2, 7))
            kwargs["num_heads"] = H
            kwargs["embed_dim"] = H * data.draw(st.integers(1, 4)) + data.draw(st.integers(1, H - 1))
            names = ("embed_dim", "num_heads")
        elif kind == "xp":
            kwargs["xp"] = data.draw(st.sampled_from(["numpy", math, object(), 1, np.ndarray]))
            kwargs["device"] = None
            names = ("xp",)
        else:
            kwargs["dtype"] = data.draw(st.sampled_from(
                [getattr(backend.xp, n) for n in ("int32", "int64", "uint8", "bool", "complex64")
                 if hasattr(backend.xp, n)]))
            names = ("dtype",)
        note(f"{kind}: {kwargs}")
        embed_dim, num_heads = kwargs.pop("embed_dim"), kwargs.pop("num_heads")
        assert_rejected(lambda: MHA(embed_dim, num_heads, **kwargs), *names)

    @pytest.mark.parametrize("kind", CALL_KINDS)
    @budget(8)
    @given(data=st.data())
    def test_call(self, backend, kind, data):
        dt = data.draw(st.sampled_from(dtypes_of(backend)))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
        H, hd = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
        E, kdim, vdim = H * hd, data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
        B, L, S = (data.draw(st.integers(1, 3)) for _ in range(3))
        layer = MHA(E, H, kdim=kdim, vdim=vdim, xp=backend.xp, device=backend.device,
                    dtype=backend.dtype(dt), seed=0)
        before = {n: backend.to_numpy(w).copy() for n, w in layer.state_dict().items()}
        host = {"query": rng.standard_normal((B, L, E)), "key": rng.standard_normal((B, S, kdim)),
                "value": rng.standard_normal((B, S, vdim))}
        args = {n: backend.asarray(a, dt) for n, a in host.items()}
        scores = (B, H, L, S)
        target = data.draw(st.sampled_from(["query", "key", "value"]), label="target")
        names: tuple[str, ...] = (target,)
        if kind == "non_array":
            args[target] = data.draw(non_arrays(host[target]))
            if args[target] is None and target != "query":
                args[target] = "value"  # None is the valid default of key and value
        elif kind == "rank":
            a = host[target]
            args[target] = backend.asarray(a[None] if data.draw(st.booleans()) else a[0, 0], dt)
        elif kind == "bad_dtype":
            args[target] = bad_dtype_array(backend, host[target], data)
        elif kind == "mixed_dtype":
            args[target] = backend.asarray(host[target], other_float(backend, dt, data))
        elif kind == "namespace":
            args[target] = foreign(backend, data).asarray(host[target], dt if dt != "float16"
                                                          else "float32")
        elif kind == "features":
            a = host[target]
            args[target] = backend.asarray(rng.standard_normal(a.shape[:-1] + (a.shape[-1] + 1,)), dt)
        elif kind == "batch":
            for n in ("key", "value"):
                a = host[n]
                args[n] = backend.asarray(rng.standard_normal((B + 1,) + a.shape[1:]), dt)
            names = ("key", "query")
        elif kind == "length":
            target = data.draw(st.sampled_from(["key", "value"]))
            a = host[target]
            args[target] = backend.asarray(rng.standard_normal((B, S + 1, a.shape[-1])), dt)
            names = (target,)
        elif kind.startswith("padding"):
            names = ("key_padding_mask",)
            pad = np.zeros((B, S), dtype=bool)
            what = kind.split("_", 1)[1]
            if what == "dtype":
                args["key_padding_mask"] = (
                    backend.asarray(pad.astype(float), dt) if data.draw(st.booleans())
                    else bad_dtype_array(backend, pad.astype(float), data, bool_ok=False))
            elif what == "shape":
                bad = data.draw(st.sampled_from([(B, S + 1), (S,), (B,), (B, 1, S), (B + 1, S)]))
                args["key_padding_mask"] = backend.asarray(np.zeros(bad, dtype=bool))
            elif what == "non_array":
                args["key_padding_mask"] = data.draw(non_arrays(pad))
                if args["key_padding_mask"] is None:
                    args["key_padding_mask"] = pad.tolist()
            else:
                args["key_padding_mask"] = foreign(backend, data).asarray(pad)
        elif kind.startswith(("mask", "bias")):
            arg, what = kind.split("_", 1)
            names = (arg,)
            full = np.zeros(scores)
            if what == "dtype":
                args[arg] = (bad_dtype_array(backend, full, data, bool_ok=False) if arg == "mask"
                             else backend.asarray(full > 0))
            elif what == "shape":
                bad = data.draw(st.sampled_from([(L + 1, S), (L, S + 1), (S + 1,), (2,) + scores]))
                args[arg] = backend.asarray(np.ones(bad, dtype=bool)) if arg == "mask" \
                    else backend.asarray(np.zeros(bad), dt)
            else:
                args[arg] = backend.asarray(full, other_float(backend, dt, data))
        else:
            names = (kind,)
            args[kind] = data.draw(st.sampled_from(BAD_CHUNKS if kind == "chunk_size"
                                                   else BAD_BUDGETS))
        note(f"{kind} {names}: E={E} H={H} kdim={kdim} vdim={vdim} B={B} L={L} S={S} {dt}")
        q = args.pop("query")
        extra = {"is_causal": data.draw(st.booleans()), "return_weights": data.draw(st.booleans())}
        assert_rejected(lambda: layer(q, **args, **extra), *names)
        # A rejected call leaves the layer as it was.
        for n, w in layer.state_dict().items():
            np.testing.assert_array_equal(backend.to_numpy(w), before[n])


# -- odd but valid arguments are accepted, with the documented result ---------------


@pytest.mark.parametrize("kwargs", [
    {"scale": np.float32(0.5)}, {"scale": Fraction(1, 2)}, {"scale": 1e-300},
    {"chunk_size": np.int64(2)}, {"chunk_size": [2, 3]}, {"chunk_size": 10**30},
    {"memory_budget": np.int64(0)}, {"memory_budget": 10**30},
    {"is_causal": 1}, {"is_causal": np.bool_(True)},
], ids=repr)
def test_odd_but_valid_arguments(backend, kwargs, rng):
    q, k, v = (backend.asarray(rng.standard_normal(s), "float64")
               for s in [(2, 3, 4, 5), (2, 1, 6, 5), (1, 3, 6, 7)])
    out = mha_xp.scaled_dot_product_attention(q, k, v, **kwargs)
    assert tuple(out.shape) == (2, 3, 4, 7)
    plain = {"scale": float(kwargs["scale"])} if "scale" in kwargs else {}
    if "is_causal" in kwargs:
        plain["is_causal"] = True
    ref = mha_xp.scaled_dot_product_attention(q, k, v, **plain)
    np.testing.assert_allclose(backend.to_numpy(out), backend.to_numpy(ref), rtol=1e-12, atol=1e-15)
