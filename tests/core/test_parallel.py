"""The parallel CPU executor (``mha_xp/_core/_parallel.py``): the serial
path's numbers, forward and backward, on every variant (to rounding: see
``TOL``), and the same bits on every run; the
thread count honoured; BLAS held to one thread during the call and restored
after; never chosen where it would oversubscribe (a Dask worker, a caller's
thread pool, a caller's BLAS limit), for tiny calls or other libraries; and
the ``num_threads`` and ``native_kernels`` settings' precedence and errors.

The size thresholds (``_plan.PARALLEL_FROM``, ``_plan.TASK_WORK``) are
lowered in most tests so that small inputs are split into many tasks.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import mha_xp
from mha_xp._core import _chunked, _dense, _execute, _parallel, _plan
from mha_xp._spec import AttentionSpec, Request

sdpa = mha_xp.scaled_dot_product_attention
MHA = mha_xp.MultiHeadAttention


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("MHA_XP_NUM_THREADS", "MHA_XP_NATIVE_KERNELS", "MHA_XP_MEMORY_BUDGET"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def small_tasks(monkeypatch):
    """Any call is large enough for the executor, and tasks may be tiny."""
    monkeypatch.setattr(_plan, "PARALLEL_FROM", 0)
    monkeypatch.setattr(_plan, "TASK_WORK", 1)


@pytest.fixture
def backward_log(monkeypatch):
    """The names of the threads that ran the parallel executor's backward tasks."""
    seen: list[str] = []
    inner = _parallel.attention_backward

    def run(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return inner(*args, **kwargs)

    monkeypatch.setattr(_parallel, "attention_backward", run)
    return seen


@pytest.fixture
def kernel_log(monkeypatch):
    """The names of the threads that ran the serial kernels (dense, chunked)."""
    seen: list[str] = []
    for name, module in (("dense", _dense), ("chunked", _chunked)):
        inner = module.run

        def run(*args, _inner=inner, **kwargs):
            seen.append(threading.current_thread().name)
            return _inner(*args, **kwargs)

        monkeypatch.setattr(module, "run", run)  # as the parallel executor calls it
        monkeypatch.setitem(_execute.EXECUTORS, name, run)  # as the serial path does
    return seen


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _blas_threads():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def _both(f):
    """``f()`` serially and on three threads."""
    with mha_xp.num_threads(1):
        serial = f()
    with mha_xp.num_threads(3):
        parallel = f()
    return serial, parallel


# Every row takes the serial path's operations in its order; only the BLAS
# library may round a product differently when the matrices' sizes differ
# (a task's rows or heads are fewer): OpenBLAS's AVX-512 kernel gave the same
# bits here, its Haswell kernel (OPENBLAS_CORETYPE=Haswell) up to a few ulps
# apart in float32 and one in float16.
TOL = {np.dtype(np.float16): (2e-3, 1e-3), np.dtype(np.float32): (2e-6, 1e-6),
       np.dtype(np.float64): (1e-13, 1e-14)}  # (rtol, atol)


def _equal(a, b):
    """The serial and parallel results agree to ``TOL`` (NaN where NaN)."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for name in a:
            _equal(a[name], b[name])
    elif isinstance(a, tuple):
        for x, y in zip(a, b):
            _equal(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        rtol, atol = TOL[a.dtype]
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# -- the serial path's numbers -------------------------------------------------

CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"window": (5, 2), "is_causal": False},
    "mask_bias": {"mask": "mask", "bias": "bias", "is_causal": True},
    "alibi_softcap": {"alibi_slopes": [0.5, 0.25, 0.125, 0.0625], "softcap": 3.0},
    "dropout": {"dropout_p": 0.3, "seed": 7},
    "packed": {"cu_seqlens_q": [0, 9, 24], "cu_seqlens_k": [0, 12, 24]},
}


def _inputs(rng, case, heads_kv=4, L=24, S=24):
    q = _f32(rng, 2, 4, L, 8)
    k, v = _f32(rng, 2, heads_kv, S, 8), _f32(rng, 2, heads_kv, S, 6)
    kwargs = dict(CASES[case])
    if kwargs.get("mask") == "mask":
        mask = rng.random((2, 1, L, S)) < 0.7
        mask[1, 0, 3] = False  # a fully masked row
        kwargs["mask"] = mask
        kwargs["bias"] = _f32(rng, 4, L, S)
    return q, k, v, kwargs


@pytest.mark.usefixtures("small_tasks")
class TestSameNumbers:
    @pytest.mark.parametrize("budget", [None, 0], ids=["dense", "chunked"])
    @pytest.mark.parametrize("case", sorted(CASES))
    def test_forward_with_weights(self, rng, case, budget, kernel_log):
        q, k, v, kw = _inputs(rng, case)
        chunk = None if budget is None else (5, 7)  # rows split at multiples of 5
        serial, parallel = _both(lambda: sdpa(q, k, v, return_weights=True, chunk_size=chunk,
                                              memory_budget=budget, **kw))
        _equal(serial, parallel)
        assert any(name.startswith("mha_xp") for name in kernel_log)

    @pytest.mark.parametrize("case", ["plain", "causal", "window", "dropout"])
    def test_rows_split_when_heads_are_few(self, rng, case, kernel_log):
        q, k, v = _f32(rng, 1, 40, 8), _f32(rng, 1, 40, 8), _f32(rng, 1, 40, 8)
        kw = CASES[case]
        for chunk in (None, (3, 8)):
            serial, parallel = _both(lambda: mha_xp.attention_with_lse(q, k, v, chunk_size=chunk,
                                                                       **kw))
            _equal(serial, parallel)
        assert sum(name.startswith("mha_xp") for name in kernel_log) > 2

    @pytest.mark.parametrize("heads_kv", [1, 2], ids=["mqa", "gqa"])
    def test_grouped_heads(self, rng, heads_kv):
        q, k, v, kw = _inputs(rng, "causal", heads_kv=heads_kv)
        _equal(*_both(lambda: sdpa(q, k, v, return_weights=True, **kw)))

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_backward(self, rng, case, backward_log):
        q, k, v, kw = _inputs(rng, case, heads_kv=2 if case == "causal" else 4)

        def grads():
            out, backward = mha_xp.attention_vjp(q, k, v, **kw)
            return out, backward(np.cos(out))

        _equal(*_both(grads))
        assert any(name.startswith("mha_xp") for name in backward_log)

    def test_backward_of_broadcast_inputs(self, rng, backward_log):
        # The keys are shared by the batch: the backward splits only along
        # the heads, where nothing is broadcast; with values shared by the
        # heads too, along nothing (serially).
        q, k, bias = _f32(rng, 2, 3, 16, 8), _f32(rng, 1, 3, 16, 8), _f32(rng, 3, 16, 16)
        for v, tasks in ((_f32(rng, 2, 3, 16, 8), 3), (_f32(rng, 2, 1, 16, 8), 0)):
            def grads():
                out, backward = mha_xp.attention_vjp(q, k, v, bias=bias, is_causal=True)
                return backward(np.sin(out))

            backward_log.clear()
            _equal(*_both(grads))
            assert sum(name.startswith("mha_xp") for name in backward_log) == tasks

    def test_layer_forward_and_vjp(self, rng, backward_log):
        layer = MHA(16, 4, dtype=np.float32, dropout=0.2, seed=0)
        x = _f32(rng, 3, 20, 16)

        def call():
            out, w = layer(x, is_causal=True, return_weights=True, training=True,
                           dropout_seed=3)
            y, backward = layer.vjp(x, is_causal=True, training=True, dropout_seed=3)
            return out, w, y, backward(np.ones_like(y))

        _equal(*_both(call))
        assert any(name.startswith("mha_xp") for name in backward_log)

    def test_per_call_threads_reach_the_backward(self, rng, backward_log):
        q = _f32(rng, 4, 16, 8)
        layer = MHA(8, 2, dtype=np.float32, seed=0)
        for vjp in (lambda: mha_xp.attention_vjp(q, q, q, num_threads=2),
                    lambda: layer.vjp(q, num_threads=2)):
            with mha_xp.num_threads(1):
                out, backward = vjp()
            backward(out)
        assert len(backward_log) == 4 + 4 * 2  # the batch; the batch times the heads
        out, backward = mha_xp.attention_vjp(q, q, q, num_threads=1)
        with mha_xp.num_threads(2):
            backward(out)
        assert len(backward_log) == 12

    def test_float16_and_non_finite_rows(self, rng):
        q, k, v = (rng.standard_normal((2, 2, 12, 8)).astype(np.float16) for _ in range(3))
        k[0, 1, 4, 2] = np.nan
        _equal(*_both(lambda: sdpa(q, k, v, return_weights=True)))

    @pytest.mark.parametrize("case", ["causal", "dropout"])
    def test_the_same_bits_on_every_run(self, rng, case):
        """The tasks are fixed by the sizes: repeated calls agree bit for bit."""
        q, k, v, kw = _inputs(rng, case)
        with mha_xp.num_threads(3):
            runs = []
            for _ in range(3):
                out, backward = mha_xp.attention_vjp(q, k, v, **kw)
                runs.append([out, *backward(np.cos(out)).values()])
        for run in runs[1:]:
            assert all(a.tobytes() == b.tobytes() for a, b in zip(runs[0], run))


# -- what runs where --------------------------------------------------------------


def _large(rng):
    """Inputs at the planner's real threshold."""
    q, k, v = (_f32(rng, 4, 8, 256, 64) for _ in range(3))
    assert 32 * 256 * 256 * 128 == _plan.PARALLEL_FROM
    return q, k, v


def _plan_of(q, k, v, **request):
    return _plan.plan_call(q, k, v, AttentionSpec(scale=1.0), Request(**request), xp=np)


class TestChoice:
    def test_real_thresholds(self, rng):
        q, k, v = _large(rng)
        assert _plan_of(q, k, v, num_threads=2).threads == 2
        small = _f32(rng, 1, 16, 8)
        assert _plan_of(small, small, small, num_threads=2).threads == 1

    def test_tiny_calls_never_read_the_default(self, rng, monkeypatch):
        def fail(*args):
            raise AssertionError("the default was computed for a tiny call")

        monkeypatch.setattr(mha_xp._config, "_blas_limit", fail)
        small = _f32(rng, 1, 16, 8)
        sdpa(small, small, small)

    def test_one_thread_is_serial(self, rng, kernel_log):
        q, k, v = _large(rng)
        assert _plan_of(q, k, v, num_threads=1).threads == 1
        sdpa(q, k, v, num_threads=1)
        with mha_xp.num_threads(1):
            mha_xp.attention_vjp(q, k, v)[1](q)
        assert kernel_log and not any(n.startswith("mha_xp") for n in kernel_log)

    def test_only_plain_numpy(self, rng):
        xps = pytest.importorskip("array_api_strict")
        q, k, v = (xps.asarray(t) for t in _large(rng))
        plan = _plan.plan_call(q, k, v, AttentionSpec(scale=1.0), Request(num_threads=2),
                               xp=xps)
        assert plan.threads == 1

    @pytest.mark.usefixtures("small_tasks")
    def test_thread_count_is_honoured(self, rng, monkeypatch):
        """Three tasks wait for each other: only three threads at once get through."""
        names: set[str] = set()
        meet = threading.Barrier(3)
        inner = _dense.run

        def run(*args, **kwargs):
            names.add(threading.current_thread().name)
            meet.wait(timeout=30)
            return inner(*args, **kwargs)

        monkeypatch.setattr(_dense, "run", run)
        q, k, v = _f32(rng, 12, 16, 8), _f32(rng, 12, 16, 8), _f32(rng, 12, 16, 8)
        with mha_xp.num_threads(1):
            want = sdpa(q, k, v)
        names.clear()
        meet = threading.Barrier(3)
        got = sdpa(q, k, v, num_threads=3)  # 12 tasks, in rounds of 3
        _equal(got, want)
        assert len(names) == 3 and all(n.startswith("mha_xp") for n in names)

    @pytest.mark.usefixtures("small_tasks")
    def test_blas_held_to_one_thread_and_restored(self, rng, monkeypatch):
        before = threadpool_info()
        inside: list[list[int]] = []
        inner = _dense.run

        def run(*args, **kwargs):
            inside.append(_blas_threads())
            return inner(*args, **kwargs)

        monkeypatch.setattr(_dense, "run", run)
        q = _f32(rng, 4, 16, 8)
        sdpa(q, q, q, num_threads=2)
        assert inside and all(t == [1] * len(t) for t in inside)
        assert threadpool_info() == before

    @pytest.mark.usefixtures("small_tasks")
    def test_an_error_in_a_task_restores_everything(self, rng, monkeypatch):
        before = threadpool_info()

        def run(*args, **kwargs):
            raise FloatingPointError("from a task")

        monkeypatch.setattr(_dense, "run", run)
        q = _f32(rng, 4, 16, 8)
        with pytest.raises(FloatingPointError, match="from a task"):
            sdpa(q, q, q, num_threads=2)
        assert threadpool_info() == before
        monkeypatch.undo()
        sdpa(q, q, q, num_threads=2)  # the executor is free again

    @pytest.mark.usefixtures("small_tasks")
    def test_a_second_call_at_once_runs_serially(self, rng, kernel_log):
        """While one call holds the CPUs, another (from another thread) runs serially."""
        q = _f32(rng, 4, 16, 8)
        with _parallel._cpus_in_use:
            out = sdpa(q, q, q, num_threads=2)
        assert kernel_log and not any(n.startswith("mha_xp") for n in kernel_log)
        with mha_xp.num_threads(1):
            np.testing.assert_array_equal(out, sdpa(q, q, q))  # the serial path itself

    def test_caller_errstate_reaches_the_tasks(self, rng, small_tasks):
        q = _f32(rng, 4, 16, 8)
        q[0, 0, 0] = np.inf  # the stand-ins keep the call itself quiet
        with np.errstate(invalid="raise", over="raise", divide="raise"):
            out = sdpa(q, q, q, num_threads=2)
        assert np.isnan(out[0, 0]).all() and np.isfinite(out[1:]).all()


# -- no oversubscription ----------------------------------------------------------


class TestDefault:
    def test_cpus_of_the_process(self):
        cpus = len(__import__("os").sched_getaffinity(0))
        assert mha_xp.get_num_threads() == max(1, min([cpus, *_blas_threads()]))

    def test_other_threads_get_one(self):
        with ThreadPoolExecutor(2) as pool:
            assert pool.submit(mha_xp.get_num_threads).result() == 1
            with mha_xp.num_threads(2):  # not inherited by the pool's threads
                assert pool.submit(mha_xp.get_num_threads).result() == 1

    def test_a_caller_blas_limit(self):
        with threadpool_limits(limits=1, user_api="blas"):
            assert mha_xp.get_num_threads() == 1

    def test_dask_threaded_scheduler(self, rng, kernel_log, small_tasks):
        dask = pytest.importorskip("dask")
        q = _f32(rng, 4, 16, 8)

        def task():
            return mha_xp.get_num_threads(), sdpa(q, q, q)

        with dask.config.set(scheduler="threads"):
            n, out = dask.delayed(task)().compute()
        assert n == 1 and kernel_log and not any(s.startswith("mha_xp") for s in kernel_log)

    def test_dask_distributed_worker(self, rng):
        pytest.importorskip("distributed")
        from distributed import Client, LocalCluster

        from mha_xp._config import _in_dask_worker

        q = _large(rng)[0]

        def task():
            return _in_dask_worker(), mha_xp.get_num_threads(), _plan_of(q, q, q).threads

        assert not _in_dask_worker()
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            assert client.submit(task).result() == (True, 1, 1)


# -- the settings ----------------------------------------------------------------


class TestSettings:
    def test_precedence(self, rng, monkeypatch):
        q, k, v = _large(rng)
        monkeypatch.setenv("MHA_XP_NUM_THREADS", "3")
        assert mha_xp.get_num_threads() == 3 and _plan_of(q, k, v).threads == 3
        with mha_xp.num_threads(2):
            assert _plan_of(q, k, v).threads == 2
            assert _plan_of(q, k, v, num_threads=5).threads == 5
            assert _plan_of(q, k, v, num_threads=1).threads == 1
        assert mha_xp.get_num_threads() == 3

    def test_blocks_nest_and_repr(self):
        block = mha_xp.num_threads(4)
        assert repr(block) == "num_threads(4)" and block.n == 4
        with block, mha_xp.num_threads(2):
            assert mha_xp.get_num_threads() == 2
        assert repr(mha_xp.native_kernels(False)) == "native_kernels(False)"

    def test_native_kernels(self, monkeypatch):
        assert mha_xp.get_native_kernels() is True
        with mha_xp.native_kernels(False):
            assert mha_xp.get_native_kernels() is False
            with mha_xp.native_kernels(True):
                assert mha_xp.get_native_kernels() is True
        monkeypatch.setenv("MHA_XP_NATIVE_KERNELS", "0")
        assert mha_xp.get_native_kernels() is False
        with mha_xp.native_kernels(True):
            assert mha_xp.get_native_kernels() is True

    @pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
    def test_bad_thread_counts(self, bad, rng):
        with pytest.raises(ValueError, match=r"^n must be an int >= 1 .*, got " + repr(bad)):
            mha_xp.num_threads(bad)
        if bad is not None:
            q = rng.standard_normal((4, 8))
            with pytest.raises(ValueError, match=r"^num_threads must be an int >= 1"):
                sdpa(q, q, q, num_threads=bad)
            layer = MHA(8, 2, seed=0)
            for call in (layer, layer.vjp):
                with pytest.raises(ValueError, match=r"^num_threads must be an int >= 1"):
                    call(q[None], num_threads=bad)
            with pytest.raises(ValueError, match=r"^num_threads must be an int >= 1"):
                mha_xp.attention_vjp(q, q, q, num_threads=bad)

    @pytest.mark.parametrize("bad", [1, 0, "1", None])
    def test_bad_native_kernels(self, bad):
        with pytest.raises(ValueError, match=r"^enabled must be a bool, got " + repr(bad)):
            mha_xp.native_kernels(bad)

    @pytest.mark.parametrize("name,value,getter", [
        ("MHA_XP_NUM_THREADS", "0", mha_xp.get_num_threads),
        ("MHA_XP_NUM_THREADS", "two", mha_xp.get_num_threads),
        ("MHA_XP_NATIVE_KERNELS", "yes", mha_xp.get_native_kernels),
    ])
    def test_bad_environment(self, monkeypatch, name, value, getter):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=rf"^{name} must be .*, got {value!r}"):
            getter()


# -- the split ---------------------------------------------------------------------


@pytest.mark.parametrize("lead,L,align,n", [
    ((2, 8), 64, 1, 8), ((3,), 10, 3, 8), ((), 50, 7, 8), ((1, 1), 5, 1, 8), ((5, 3), 1, 1, 4),
])
def test_split_covers_every_position_once(lead, L, align, n):
    axes = [a for a, size in enumerate(lead) if size > 1]
    tasks = _plan.split(lead, axes, L, align, n)
    seen = np.zeros(lead + (L,), dtype=int)
    for slices, rows in tasks:
        assert rows.start % align == 0
        index = tuple(slices.get(a, slice(None)) for a in range(len(lead))) + (rows,)
        seen[index] += 1
    assert (seen == 1).all()
    assert len(tasks) >= min(n, max(1, np.prod(lead, dtype=int)) * -(-L // align))
