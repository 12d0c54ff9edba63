"""State that outlives a call: the memory budget's ``with`` blocks, the JAX
pytree registration of ``KVCache``, and the caches themselves (what a cache
made by hand must be, and which layer accepts which cache, under ``jax.jit``
and ``jax.lax.scan`` too)."""

from __future__ import annotations

import asyncio
import copy
import pickle
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from array_api_compat import array_namespace, device as device_of

import mha_xp
from mha_xp import KVCache, get_memory_budget, memory_budget
from support import make_backend, rel_err

ROOT = Path(__file__).resolve().parents[2]
MHA = mha_xp.MultiHeadAttention
DEFAULT = mha_xp.DEFAULT_MEMORY_BUDGET
OTHER_LAYER = r"cache belongs to another layer \(its init_cache made it"


@pytest.fixture(autouse=True)
def _no_env_budget(monkeypatch):
    monkeypatch.delenv("MHA_XP_MEMORY_BUDGET", raising=False)


def _jax():
    jax = pytest.importorskip("jax", reason="optional backend jax not installed")
    jax.config.update("jax_enable_x64", True)
    return jax


# -- the memory budget ---------------------------------------------------------


def _holding(n):
    """A generator that holds a ``with memory_budget(n)`` block open while suspended."""
    with memory_budget(n):
        yield get_memory_budget()
        yield get_memory_budget()


class TestMemoryBudgetBlocks:
    def test_generators_closed_out_of_order_leave_nothing_behind(self):
        first, second = _holding(7), _holding(9)
        assert next(first) == 7 and next(second) == 9
        first.close()  # the older block exits first
        assert get_memory_budget() == 9  # the open block still holds
        second.close()
        assert get_memory_budget() == DEFAULT  # not 7: no stale budget

    def test_generators_closed_in_order(self):
        first, second = _holding(7), _holding(9)
        next(first), next(second)
        second.close()
        assert get_memory_budget() == 7
        first.close()
        assert get_memory_budget() == DEFAULT

    @pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1),
                                       (2, 1, 0)])
    def test_any_exit_order_keeps_the_latest_open_block(self, order):
        gens = [_holding(n) for n in (10, 20, 30)]
        for g in gens:
            next(g)
        open_ = [0, 1, 2]
        for i in order:
            gens[i].close()
            open_.remove(i)
            assert get_memory_budget() == ((10, 20, 30)[open_[-1]] if open_ else DEFAULT)

    def test_nesting_and_exceptions(self):
        with memory_budget(1):
            with memory_budget(2):
                assert get_memory_budget() == 2
            assert get_memory_budget() == 1
            with pytest.raises(KeyError), memory_budget(3):
                raise KeyError
            assert get_memory_budget() == 1
        assert get_memory_budget() == DEFAULT

    def test_one_object_reused_and_nested(self):
        block = memory_budget(5)
        assert repr(block) == "memory_budget(5)" and block.nbytes == 5
        for _ in range(2):
            with block:
                with memory_budget(6), block:
                    assert get_memory_budget() == 5
                assert get_memory_budget() == 5
            assert get_memory_budget() == DEFAULT

    def test_one_object_in_eight_threads_at_once(self):
        block, threads = memory_budget(11), 8
        barrier, inside = threading.Barrier(threads), threading.Barrier(threads)

        def work(i):
            barrier.wait(timeout=60)
            with block:
                inside.wait(timeout=60)  # every thread inside at once
                seen = get_memory_budget()
                inside.wait(timeout=60)
            return seen, get_memory_budget()

        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(work, range(threads)))
        assert results == [(11, DEFAULT)] * threads
        assert get_memory_budget() == DEFAULT

    def test_asyncio_tasks_see_their_own_blocks(self):
        async def task(n, started, others):
            with memory_budget(n):
                started.set()
                await others.wait()
                return get_memory_budget()

        async def main():
            events = [asyncio.Event(), asyncio.Event()]
            a = asyncio.create_task(task(100, events[0], events[1]))
            b = asyncio.create_task(task(200, events[1], events[0]))
            return await asyncio.gather(a, b), get_memory_budget()

        assert asyncio.run(main()) == ([100, 200], DEFAULT)

    @pytest.mark.parametrize("bad", [-1, 1.5, True, "1", None])
    def test_bad_budgets(self, bad):
        with pytest.raises(ValueError, match="nbytes must be a non-negative int"):
            memory_budget(bad)

    def test_jax_jit_keeps_the_budget_of_its_first_trace(self, monkeypatch):
        """The documented limit (memory_budget's Notes, the embedding guide):
        the path is chosen when the function is traced."""
        jax = _jax()
        from mha_xp._core import _plan

        seen, real = [], _plan.plan_blocks
        monkeypatch.setattr(_plan, "plan_blocks", lambda *a: seen.append(real(*a)) or seen[-1])
        q = jax.numpy.asarray(np.random.default_rng(0).standard_normal((2, 64, 8)))
        f = jax.jit(lambda x: mha_xp.scaled_dot_product_attention(x, x, x))
        with memory_budget(0):
            f(q)
        f(q)  # the default budget would take the dense path: not retraced
        assert seen == [(64, 64)]
        g = jax.jit(lambda x, budget: mha_xp.scaled_dot_product_attention(
            x, x, x, memory_budget=budget), static_argnames="budget")
        g(q, budget=0)
        g(q, budget=None)  # a static argument: one trace per budget
        assert seen == [(64, 64), (64, 64), None]


# -- the pytree registration ---------------------------------------------------

REGISTRATION_RACE = textwrap.dedent("""
    import threading, time
    import jax
    import jax.numpy as jnp
    import mha_xp

    # Widen the window between "registered yet?" and "register": a registration
    # that takes 50 ms, as a thread switch in the middle of it would. Without
    # the lock every thread registers, and all but one get JAX's "Duplicate
    # custom PyTreeDef type registration".
    real, calls = jax.tree_util.register_pytree_node, []
    def slow_register(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.05)
        return real(*args, **kwargs)
    jax.tree_util.register_pytree_node = slow_register

    THREADS = 8
    layer = mha_xp.MultiHeadAttention(8, 2, seed=0).to(xp=jnp)
    barrier = threading.Barrier(THREADS)
    errors, caches = [], [None] * THREADS

    def work(i):
        barrier.wait(timeout=60)
        try:
            caches[i] = layer.init_cache(1, 4)  # the first caches of the process
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    print("errors", errors)
    print("registrations", len(calls))
    print("leaves", sorted({len(jax.tree_util.tree_leaves(c)) for c in caches}))
""")


def test_first_caches_in_eight_threads_register_once():
    pytest.importorskip("jax", reason="optional backend jax not installed: the pytree "
                                      "registration is JAX's")
    run = subprocess.run([sys.executable, "-c", REGISTRATION_RACE], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "errors []" in run.stdout, run.stdout
    assert "registrations 1" in run.stdout, run.stdout
    assert "leaves [3]" in run.stdout, run.stdout  # every cache is a pytree of its 3 arrays


# -- caches made by hand -------------------------------------------------------


def _layer(backend, dtype="float64", seed=0):
    return MHA(8, 2, seed=seed, xp=backend.xp, device=backend.device,
               dtype=backend.dtype(dtype))


def _kv(backend, rng, shape=(1, 2, 6, 4), dtype="float64"):
    return (backend.asarray(rng.standard_normal(shape), dtype),
            backend.asarray(rng.standard_normal(shape), dtype))


class TestHandMadeCache:
    def test_python_int_length_is_converted(self, backend, rng):
        layer = _layer(backend)
        x = backend.asarray(rng.standard_normal((1, 5, 8)), "float64")
        _, built = layer(x[:, :3, :], cache=layer.init_cache(1, 6), is_causal=True)
        by_hand = KVCache(built.key, built.value, 3)
        assert array_namespace(by_hand.length) is array_namespace(built.key)
        assert device_of(by_hand.length) == device_of(built.key)
        assert by_hand.length.ndim == 0 and layer.xp.isdtype(by_hand.length.dtype, "integral")
        assert by_hand.owner is None
        y_hand, c_hand = layer(x[:, 3:, :], cache=by_hand, is_causal=True)
        y_made, c_made = layer(x[:, 3:, :], cache=built, is_causal=True)
        np.testing.assert_array_equal(backend.to_numpy(y_hand), backend.to_numpy(y_made))
        assert int(backend.to_numpy(c_hand.length)) == 5

    def test_array_length_is_kept(self, backend, rng):
        k, v = _kv(backend, rng)
        length = backend.cxp.asarray(2, device=backend.device)
        assert KVCache(k, v, length).length is length

    @pytest.mark.parametrize("length, error, match", [
        ([3], TypeError, "cache.length must be an integer array \\(0-d or \\(B,\\)\\) or an int, got list"),
        (3.0, TypeError, "cache.length must be an integer array \\(0-d or \\(B,\\)\\) or an int, got float"),
        (True, TypeError, "cache.length must be an integer array \\(0-d or \\(B,\\)\\) or an int, got bool"),
        (None, TypeError, "cache.length must be an integer array \\(0-d or \\(B,\\)\\) or an int"),
        (-1, ValueError, r"cache.length must be in \[0, max_length\] = \[0, 6\].*got -1"),
        (7, ValueError, r"cache.length must be in \[0, max_length\] = \[0, 6\].*got 7"),
    ])
    def test_bad_python_lengths(self, backend, rng, length, error, match):
        k, v = _kv(backend, rng)
        with pytest.raises(error, match=match):
            KVCache(k, v, length)

    def test_bad_array_lengths(self, backend, rng):
        k, v = _kv(backend, rng)
        xp, dev = backend.cxp, backend.device
        # One length per sequence, (B,), is a cache's other form; (B + 1,) is not.
        assert KVCache(k, v, xp.asarray([2], device=dev)).length.shape == (1,)
        with pytest.raises(ValueError, match=r"0-d .* or of shape \(B,\) = \(1,\) .* got shape \(2,\)"):
            KVCache(k, v, xp.asarray([2, 3], device=dev))
        with pytest.raises(TypeError, match="signed integer array .* dtype float64"):
            KVCache(k, v, xp.asarray(2.0, dtype=xp.float64, device=dev))
        with pytest.raises(TypeError, match="signed integer array .* dtype uint8"):
            KVCache(k, v, xp.asarray(2, dtype=xp.uint8, device=dev))
        negative = xp.asarray(-2, device=dev)
        if backend.name in ("numpy", "torch") or backend.name.startswith("array_api_strict"):
            with pytest.raises(ValueError, match=r"cache.length must be in \[0, max_length\]"):
                KVCache(k, v, negative)
        else:  # not readable for free (documented on KVCache): accepted
            assert KVCache(k, v, negative).length is negative

    def test_bad_arrays(self, backend, rng):
        k, v = _kv(backend, rng)
        with pytest.raises(TypeError, match="cache.key must be an array"):
            KVCache(np.zeros((1, 2, 6, 4)).tolist(), v, 0)
        with pytest.raises(TypeError, match="cache.value must be an array"):
            KVCache(k, None, 0)
        with pytest.raises(TypeError, match="cache.key has dtype float64 but cache.value has "
                                            "float32"):
            KVCache(k, backend.asarray(rng.standard_normal((1, 2, 6, 4)), "float32"), 0)
        with pytest.raises(TypeError, match="cache.key must have a real floating dtype"):
            KVCache(backend.asarray(np.zeros((1, 2, 6, 4), dtype=np.int64)), v, 0)
        with pytest.raises(ValueError, match=r"cache.key must be 4-D .* got shape \(2, 6, 4\)"):
            KVCache(k[0, ...], v[0, ...], 0)
        with pytest.raises(ValueError, match=r"one shape, got \(1, 2, 6, 4\) and \(1, 2, 5, 4\)"):
            KVCache(k, v[:, :, :5, :], 0)

    def test_mixed_libraries(self, rng):
        torch = make_backend("torch")
        k, v = _kv(torch, rng)
        with pytest.raises(TypeError, match="cache.value is a numpy array but cache.key is a"):
            KVCache(k, np.zeros((1, 2, 6, 4)), 0)
        with pytest.raises(TypeError, match="cache.length is a numpy array but cache.key is a"):
            KVCache(k, v, np.asarray(0))

    def test_mixed_devices(self, rng):
        strict = make_backend("array_api_strict:device1")
        k, v = _kv(strict, rng)
        other = strict.xp.asarray(v, device=strict.xp.Device("CPU_DEVICE"))
        with pytest.raises(ValueError, match="cache.value is on device"):
            KVCache(k, other, 0)
        with pytest.raises(ValueError, match="cache.length is on device"):
            KVCache(k, v, strict.xp.asarray(0, device=strict.xp.Device("CPU_DEVICE")))


# -- which layer accepts which cache -------------------------------------------


class TestCacheOwner:
    def test_another_layers_cache_is_refused(self, backend, rng):
        a, b = _layer(backend, seed=0), _layer(backend, seed=1)  # the same shapes
        x = backend.asarray(rng.standard_normal((1, 2, 8)), "float64")
        with pytest.raises(ValueError, match=OTHER_LAYER):
            b(x, cache=a.init_cache(1, 4), is_causal=True)
        _, cache = a(x, cache=a.init_cache(1, 4), is_causal=True)
        assert cache.owner is a.init_cache(1, 4).owner  # the returned cache is a's too
        with pytest.raises(ValueError, match="another layer"):
            b(x, cache=cache, is_causal=True)
        a(x, cache=cache, is_causal=True)

    def test_an_unpickled_cache_is_rebuilt_by_hand(self, rng):
        layer = MHA(8, 2, seed=0)
        x = rng.standard_normal((1, 2, 8))
        _, cache = layer(x, cache=layer.init_cache(1, 4), is_causal=True)
        loaded = pickle.loads(pickle.dumps(cache))
        with pytest.raises(ValueError, match=r"or the cache was unpickled.*KVCache\(cache.key"):
            layer(x, cache=loaded, is_causal=True)
        y, _ = layer(x, cache=KVCache(loaded.key, loaded.value, loaded.length), is_causal=True)
        np.testing.assert_array_equal(y, layer(x, cache=cache, is_causal=True)[0])

    def test_layer_to_starts_its_own_caches(self, rng):
        layer = MHA(8, 2, seed=0)
        x = rng.standard_normal((1, 2, 8))
        moved = layer.to()  # the same library, device and dtype: still a new layer
        with pytest.raises(ValueError, match=r"layer.to\(...\) .* make new layers"):
            moved(x, cache=layer.init_cache(1, 4), is_causal=True)
        # carried over by hand, deliberately: a cache made by hand belongs to no layer
        _, cache = layer(x, cache=layer.init_cache(1, 4), is_causal=True)
        carried = KVCache(cache.key, cache.value, cache.length)
        y, _ = moved(x, cache=carried, is_causal=True)
        np.testing.assert_array_equal(y, layer(x, cache=cache, is_causal=True)[0])

    def test_copies_keep_the_owner(self, rng):
        layer = MHA(8, 2, seed=0)
        x = rng.standard_normal((1, 2, 8))
        cache = layer.init_cache(1, 4)
        for c in (copy.copy(cache), copy.deepcopy(cache)):
            assert c.owner is cache.owner
            layer(x, cache=c, is_causal=True)

    def test_a_cache_of_another_library_or_device(self, rng):
        torch_layer = MHA(8, 2, seed=0, xp=make_backend("torch").xp)
        x = make_backend("torch").asarray(rng.standard_normal((1, 2, 8)), "float32")
        with pytest.raises(TypeError, match="cache.key is a numpy array but the layer's "
                                            "weights are torch arrays"):
            torch_layer(x, cache=MHA(8, 2, seed=0).init_cache(1, 4), is_causal=True)
        strict = make_backend("array_api_strict:device1")
        layer = MHA(8, 2, seed=0, xp=strict.xp, device=strict.device)
        cpu = MHA(8, 2, seed=0, xp=strict.xp)
        with pytest.raises(ValueError, match="cache.key is on device"):
            layer(strict.asarray(rng.standard_normal((1, 2, 8))),
                  cache=KVCache(*(t for t in (cpu.init_cache(1, 4).key,) * 2), 0),
                  is_causal=True)


class TestCacheUnderJax:
    def _layers(self):
        jax = _jax()
        base = MHA(16, 4, num_kv_heads=2, rotary=True, seed=8)
        return jax, base, base.to(xp=jax.numpy)

    def test_jit_refuses_another_layers_cache(self, rng):
        jax, _, lj = self._layers()
        other = MHA(16, 4, num_kv_heads=2, rotary=True, seed=9).to(xp=jax.numpy)
        step = jax.jit(lambda xs, c: lj(xs, cache=c, is_causal=True))
        x = jax.numpy.asarray(rng.standard_normal((2, 1, 16)))
        with pytest.raises(ValueError, match=OTHER_LAYER):
            step(x, other.init_cache(2, 8))
        y, cache = step(x, lj.init_cache(2, 8))
        assert cache.owner is lj.init_cache(2, 8).owner  # through jit and back
        lj(x, cache=cache, is_causal=True)

    def test_scan_carries_the_cache(self, rng):
        jax, base, lj = self._layers()
        x = rng.standard_normal((2, 6, 16))
        full = base(x, is_causal=True)

        def step(cache, xt):  # xt: (2, 16), one position of every sequence
            y, cache = lj(xt[:, None, :], cache=cache, is_causal=True)
            return cache, y[:, 0, :]

        xs = jax.numpy.asarray(np.swapaxes(x, 0, 1))  # (6, 2, 16), time first
        cache, ys = jax.lax.scan(step, lj.init_cache(2, 8), xs)
        assert cache.owner is lj.init_cache(2, 8).owner
        assert int(cache.length) == 6
        assert rel_err(np.swapaxes(np.asarray(ys), 0, 1), full) <= 1e-13
        lj(jax.numpy.asarray(x[:, :1]), cache=cache, is_causal=True)  # still lj's

    def test_pytree_round_trips_without_checks(self):
        jax, _, lj = self._layers()
        cache = lj.init_cache(1, 4)
        leaves, tree = jax.tree_util.tree_flatten(cache)
        assert len(leaves) == 3
        rebuilt = jax.tree_util.tree_unflatten(tree, [None, None, None])  # any leaves
        assert rebuilt.key is None and rebuilt.owner is cache.owner
        same = jax.tree_util.tree_map(lambda a: a, cache)
        assert same.owner is cache.owner and same.length is cache.length
        other = MHA(16, 4, num_kv_heads=2, rotary=True, seed=9).to(xp=jax.numpy)
        assert jax.tree_util.tree_structure(other.init_cache(1, 4)) != tree

    def test_a_negative_traced_length_is_not_checked(self):
        """Documented: under jax.jit the length cannot be read, so a cache
        made there by hand is checked for everything but its value."""
        jax, _, lj = self._layers()
        cache = lj.init_cache(1, 4)
        made = jax.jit(lambda k, v, n: KVCache(k, v, n))(cache.key, cache.value,
                                                         jax.numpy.asarray(-1))
        assert int(made.length) == -1 and made.owner is None
