"""Beyond one machine and one framework: Dask (lazy, distributed), JAX (jit),
PyTorch (autograd, CUDA).

The whole suite already runs on each of these through the ``backend``
fixture; this file checks what is specific to them: that Dask chunks are
independent tasks and a real ``LocalCluster`` gives NumPy's numbers, that
JAX traces under ``jax.jit`` (and differentiates), and that CUDA tensors
stay on the device.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import mha_xp
from support import REL_TOL, rel_err
from support.reference import ref_attention

da = pytest.importorskip("dask.array", reason="optional backend dask unavailable: pip install 'dask[array]'")


def _counted(x: np.ndarray, chunks: tuple, calls: list) -> "da.Array":
    """``x`` as a Dask array whose blocks record their index when computed."""

    def load(block, block_info=None):
        calls.append(tuple(block_info[0]["chunk-location"]))
        return block

    return da.from_array(x, chunks=chunks).map_blocks(load, dtype=x.dtype)


class TestDaskChunks:
    def test_batch_chunks_are_independent_tasks(self, rng):
        B, H, L, S, D = 8, 2, 6, 7, 4
        q, k, v = (rng.standard_normal(s) for s in [(B, H, L, D), (B, H, S, D), (B, H, S, D)])
        calls: list = []
        out = mha_xp.scaled_dot_product_attention(
            _counted(q, (2, H, L, D), calls), da.from_array(k, chunks=(2, H, S, D)),
            da.from_array(v, chunks=(2, H, S, D)), is_causal=True)
        assert isinstance(out, da.Array)
        assert out.chunks[0] == (2, 2, 2, 2)
        assert calls == []  # lazy: nothing computed yet
        first = out.blocks[1].compute(scheduler="sync")
        assert sorted(set(calls)) == [(1, 0, 0, 0)], "one output chunk must read one query chunk"
        ref, _ = ref_attention(q, k, v, is_causal=True)
        assert rel_err(first, ref[2:4]) <= REL_TOL["float64"]

    def test_query_chunks_are_independent_tasks(self, rng):
        # Blocks of queries are independent given all keys: the query axis
        # may be chunked, and the causal triangle stays aligned globally.
        H, L, S, D = 2, 12, 9, 4
        q, k, v = (rng.standard_normal(s) for s in [(H, L, D), (H, S, D), (H, S, D)])
        calls: list = []
        out = mha_xp.scaled_dot_product_attention(
            _counted(q, (H, 4, D), calls), da.from_array(k), da.from_array(v), is_causal=True)
        assert out.chunks[-2] == (4, 4, 4)
        part = out.blocks[0, 2].compute(scheduler="sync")
        assert sorted(set(calls)) == [(0, 2, 0)]
        ref, _ = ref_attention(q, k, v, is_causal=True)
        assert rel_err(part, ref[:, 8:]) <= REL_TOL["float64"]
        assert rel_err(out.compute(), ref) <= REL_TOL["float64"]

    @pytest.mark.parametrize("axis", ["key", "feature"])
    def test_key_and_feature_chunks_are_merged_not_refused(self, rng, axis):
        # Every query needs all its keys: chunks along S (and along D, Dv) are
        # merged into one per block of queries; the result is still right.
        B, L, S, D = 4, 5, 12, 6
        q, k, v = (rng.standard_normal(s) for s in [(B, L, D), (B, S, D), (B, S, D)])
        kv_chunks = (2, 4, D) if axis == "key" else (2, S, 2)
        mask = rng.random((B, L, S)) < 0.7
        out, w = mha_xp.scaled_dot_product_attention(
            da.from_array(q, chunks=(2, L, 2 if axis == "feature" else D)),
            da.from_array(k, chunks=kv_chunks), da.from_array(v, chunks=kv_chunks),
            mask=da.from_array(mask, chunks=(2, L, 4)), return_weights=True)
        assert out.chunks[0] == (2, 2) and out.chunks[-1] == (D,)
        ref, ref_w = ref_attention(q, k, v, allowed=mask)
        assert rel_err(out.compute(), ref) <= REL_TOL["float64"]
        assert rel_err(w.compute(), ref_w) <= REL_TOL["float64"]

    def test_layer_weights_are_one_key_each_not_copied_per_task(self, rng):
        E, H, B, L = 32, 4, 64, 10
        layer = mha_xp.MultiHeadAttention(E, H, seed=1, dtype=np.float32)
        x = rng.standard_normal((B, L, E)).astype(np.float32)
        lazy = layer.to(xp=da)
        y = lazy(da.from_array(x, chunks=(4, L, E)))
        assert y.chunks[0] == (4,) * 16
        weight_bytes = sum(np.asarray(p).nbytes for p in layer.state_dict().values())
        graph_bytes = len(pickle.dumps(dict(y.__dask_graph__())))
        # 16 tasks each carrying the weights would take >= 16x their size; one
        # key per parameter (the input itself is in the graph too) takes ~1x.
        assert graph_bytes < 4 * weight_bytes + x.nbytes + 2**17, (graph_bytes, weight_bytes)
        assert rel_err(y.compute(), layer(x)) <= REL_TOL["float32"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning",
                            "ignore::UserWarning", "ignore::RuntimeWarning")
def test_local_cluster_with_two_worker_processes(rng):
    """A real distributed run: 2 worker processes on loopback, many chunks."""
    distributed = pytest.importorskip(
        "dask.distributed", reason="optional dask.distributed unavailable: pip install 'dask[distributed]'")
    E, H, B, L = 64, 4, 96, 24
    layer = mha_xp.MultiHeadAttention(E, H, seed=2, dtype=np.float64)
    x = rng.standard_normal((B, L, E))
    padding = rng.random((B, L)) < 0.2
    padding[:, 0] = False
    expected = layer(x, key_padding_mask=padding, is_causal=True)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        lazy = layer.to(xp=da)
        y = lazy(da.from_array(x, chunks=(8, L, E)),
                 key_padding_mask=da.from_array(padding, chunks=(8, L)), is_causal=True)
        assert y.npartitions == 12
        assert len(client.scheduler_info()["workers"]) == 2
        y = client.persist(y)
        distributed.wait(y)
        holders = set().union(*client.who_has(y).values())
        got = y.compute()
    assert len(holders) == 2, f"the chunks were computed on {holders} only"
    assert rel_err(got, expected) <= REL_TOL["float64"]


class TestJax:
    @pytest.fixture(autouse=True)
    def _jax(self):
        jax = pytest.importorskip("jax", reason="optional backend jax unavailable: pip install jax")
        jax.config.update("jax_enable_x64", True)
        self.jax, self.jnp = jax, jax.numpy

    @pytest.mark.parametrize("chunk_size", [None, (3, 4)])
    def test_sdpa_under_jit(self, rng, chunk_size):
        q, k, v = (rng.standard_normal(s) for s in [(2, 3, 7, 4), (2, 3, 9, 4), (2, 3, 9, 5)])
        bias = rng.standard_normal((7, 9))
        mask = rng.random((2, 1, 7, 9)) < 0.8

        @self.jax.jit
        def f(q, k, v, bias, mask):
            return mha_xp.scaled_dot_product_attention(
                q, k, v, bias=bias, mask=mask, is_causal=True, chunk_size=chunk_size)

        out = f(*(self.jnp.asarray(t) for t in (q, k, v, bias, mask)))
        ref, _ = ref_attention(q, k, v, allowed=mask, bias=bias, is_causal=True)
        assert rel_err(np.asarray(out), ref) <= REL_TOL["float64"]

    def test_layer_under_jit_matches_numpy(self, rng):
        layer = mha_xp.MultiHeadAttention(16, 4, kdim=6, vdim=10, seed=0, dtype=np.float32)
        jl = layer.to(xp=self.jnp)
        x, kv, val = (rng.standard_normal(s).astype(np.float32) for s in [(3, 5, 16), (3, 7, 6), (3, 7, 10)])
        step = self.jax.jit(lambda a, b, c: jl(a, b, c, is_causal=True))
        got = step(*(self.jnp.asarray(t) for t in (x, kv, val)))
        assert rel_err(np.asarray(got), layer(x, kv, val, is_causal=True)) <= REL_TOL["float32"]

    def test_jax_grad_through_forward_matches_vjp(self, rng):
        layer = mha_xp.MultiHeadAttention(8, 2, seed=3, dtype=np.float64)
        x, gy = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
        _, backward = layer.vjp(x, is_causal=True)
        ours = backward(gy)
        jl = layer.to(xp=self.jnp)
        loss = self.jax.jit(self.jax.grad(lambda a: self.jnp.sum(jl(a, is_causal=True) * gy)))
        assert rel_err(np.asarray(loss(self.jnp.asarray(x))), ours["query"]) <= 1e-12


class TestTorchCuda:
    def test_cuda_tensors_stay_on_the_device(self, rng):
        torch = pytest.importorskip("torch", reason="optional backend torch unavailable")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
        layer = mha_xp.MultiHeadAttention(16, 4, seed=0, dtype=np.float32)
        x = rng.standard_normal((2, 6, 16)).astype(np.float32)
        tl = layer.to(xp=torch, device="cuda")
        tx = torch.tensor(x, device="cuda", requires_grad=True)
        y = tl(tx, is_causal=True)
        assert y.device.type == "cuda"
        y.sum().backward()  # autograd on the device
        assert tx.grad.device.type == "cuda"
        assert rel_err(y.detach().cpu().numpy(), layer(x, is_causal=True)) <= REL_TOL["float32"]
