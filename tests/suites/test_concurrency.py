"""Concurrency: one layer shared by 8 threads gives the serial results, bit for bit.

A layer holds no mutable state (calling it never changes it) and the memory
budget is a ``contextvars`` value, local to each thread. The threads start
together behind a barrier and each makes several calls, on the dense path, the
chunked path (``chunk_size=``) and a thread-local ``with memory_budget(0)``
block, while the other threads use other paths and other budgets.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mha_xp

THREADS = 8
ROUNDS = 3
# Per thread: the path its calls take. Threads with different paths run at the
# same time, so a budget leaking from one thread to another would change bits.
PATHS = [{}, {"chunk_size": 2}, {"chunk_size": (3, 1)}, {"budget": 0},
         {}, {"chunk_size": 2}, {"budget": 0}, {"budget": 2**40}]


def _run_threads(work):
    """``work(i)`` in THREADS threads started together; their results in order."""
    barrier = threading.Barrier(THREADS)

    def task(i):
        barrier.wait(timeout=60)
        return work(i)

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return [f.result(timeout=120) for f in [pool.submit(task, i) for i in range(THREADS)]]


def _call(fn, path, *args, **kwargs):
    """``fn`` on the thread's path: a chunk size, or a thread-local budget block."""
    if "budget" in path:
        with mha_xp.memory_budget(path["budget"]):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs, **path)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shared_layer_gives_serial_results(backend, dtype, rng):
    layer = mha_xp.MultiHeadAttention(16, 4, kdim=6, vdim=6, xp=backend.xp,
                                      device=backend.device, dtype=backend.dtype(dtype), seed=3)
    weights_before = {n: backend.to_numpy(w).copy() for n, w in layer.state_dict().items()}
    # Each thread its own inputs, and one input all threads share.
    shared = backend.asarray(rng.standard_normal((2, 7, 16)), dtype)
    xs = [backend.asarray(rng.standard_normal((2, 7, 16)), dtype) for _ in range(THREADS)]
    kvs = [backend.asarray(rng.standard_normal((2, 9, 6)), dtype) for _ in range(THREADS)]
    pad = backend.asarray(rng.random((2, 9)) < 0.3)

    def calls(i):
        path = PATHS[i]
        out = []
        for _ in range(ROUNDS):
            y, w = _call(layer, path, xs[i], kvs[i], key_padding_mask=pad, is_causal=True,
                         return_weights=True)
            out += [y, w, _call(layer, path, shared, kvs[0])]
        return [backend.to_numpy(a) for a in out]

    serial = [calls(i) for i in range(THREADS)]
    concurrent = _run_threads(calls)
    for i in range(THREADS):
        for got, want in zip(concurrent[i], serial[i]):
            np.testing.assert_array_equal(got, want)
    # Thread 0 (dense) and thread 1 (chunked) agree on the shared input, to rounding.
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(serial[0][2], serial[1][2], rtol=tol, atol=tol)
    for n, w in layer.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(w), weights_before[n])


def test_attention_function_from_many_threads(backend, rng):
    q, k, v = (backend.asarray(rng.standard_normal(s), "float64")
               for s in [(3, 2, 5, 8), (3, 2, 11, 8), (3, 2, 11, 4)])
    mask = backend.asarray(rng.random((5, 11)) < 0.7)

    def calls(i):
        path = PATHS[i]
        out, w = _call(mha_xp.scaled_dot_product_attention, path, q, k, v, mask=mask,
                       return_weights=True)
        o2, lse = _call(mha_xp.attention_with_lse, path, q, k, v, is_causal=True)
        return [backend.to_numpy(a) for a in (out, w, o2, lse)]

    serial = [calls(i) for i in range(THREADS)]
    for i, results in enumerate(_run_threads(calls)):
        for got, want in zip(results, serial[i]):
            np.testing.assert_array_equal(got, want)


def test_memory_budget_is_thread_local():
    """A ``with memory_budget(...)`` block in one thread is invisible to the others."""
    seen = [None] * THREADS
    inside = threading.Barrier(THREADS)

    def work(i):
        with mha_xp.memory_budget(1000 + i):
            inside.wait(timeout=60)  # every thread is inside its own block now
            seen[i] = mha_xp.get_memory_budget()
            inside.wait(timeout=60)
        return mha_xp.get_memory_budget()

    after = _run_threads(work)
    assert seen == [1000 + i for i in range(THREADS)]
    assert after == [mha_xp.get_memory_budget()] * THREADS
