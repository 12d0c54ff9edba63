"""Batched decoding with a length per sequence: left- and right-padded
prompts and sequences that finish early decode as if each ran alone.

The reference is each sequence run alone through the same layer without a
cache (causal self-attention over its own tokens), which the rest of the
suite checks against torch; here the cache's per-sequence bookkeeping is
what is under test: slots, lengths, RoPE positions and the causal diagonal
of each sequence.
"""

from __future__ import annotations

import numpy as np
import pytest

import mha_xp
from support import assert_preserved, rel_err

MHA = mha_xp.MultiHeadAttention
TOL = {"float32": 2e-6, "float64": 1e-13}
OPTIONS = {
    "plain": dict(),
    "gqa-rotary-sinks": dict(num_kv_heads=2, rotary=True, sinks=True),
    "window-alibi-norm": dict(window=(3, 0), alibi=True, normalize_qk=True, qk_norm="rms"),
    "yarn-head_dim-scale": dict(num_kv_heads=1, head_dim=6, scale=0.4, rotary=True,
                                rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 8}),
}


def _layer(rng, **options):
    base = MHA(16, 4, seed=11, **options)
    # Random values for every parameter (zero biases and sinks, unit norms
    # would let a wrong slot or position go unseen).
    sd = {n: w + 0.3 * rng.standard_normal(w.shape) for n, w in base.state_dict().items()}
    return MHA.from_state_dict(sd, num_heads=4, **base.config.options())


def _alone(layer, tokens):
    """Causal self-attention over one sequence, without a cache."""
    return layer(tokens[None], is_causal=True)[0]


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prompts_then_steps(backend, dtype, rng, name, side):
    layer = _layer(rng, **OPTIONS[name])
    lb = layer.to(xp=backend.xp, device=backend.device, dtype=backend.dtype(dtype))
    lens, T, steps = [5, 2, 4], 5, 3
    prompts = [rng.standard_normal((n, 16)) for n in lens]
    x, pad = np.zeros((3, T, 16)), np.zeros((3, T), dtype=bool)
    for b, n in enumerate(lens):
        rows = slice(T - n, T) if side == "left" else slice(0, n)
        x[b, rows] = prompts[b]
        pad[b] = True
        pad[b, rows] = False
    # NaN in the padding: it must take no slot and reach no other output.
    x[pad] = np.nan
    cache = lb.init_cache(3, T + steps)
    y, cache = lb(backend.asarray(x, dtype), key_padding_mask=backend.asarray(pad),
                  cache=cache, is_causal=True)
    assert_preserved(backend, y, dtype, (3, T, 16))
    assert np.array_equal(backend.to_numpy(cache.length), lens)
    outs = backend.to_numpy(y)
    news = [rng.standard_normal((3, 1, 16)) for _ in range(steps)]
    done = np.array([[False], [False], [True]])  # sequence 2 stops after the first step
    stepped = []
    for t, new in enumerate(news):
        finished = done if t >= 1 else None
        y, cache = lb(backend.asarray(new, dtype), cache=cache, is_causal=True,
                      key_padding_mask=None if finished is None else backend.asarray(finished))
        stepped.append(backend.to_numpy(y))
    assert np.array_equal(backend.to_numpy(cache.length), [lens[0] + 3, lens[1] + 3, lens[2] + 1])
    # (The padding rows' own outputs are NaN: their queries hold the NaN.)
    for b, n in enumerate(lens):
        k = steps if b < 2 else 1
        tokens = np.concatenate([prompts[b]] + [news[t][b] for t in range(k)], axis=0)
        ref = _alone(layer, tokens)  # float64 NumPy
        rows = slice(T - n, T) if side == "left" else slice(0, n)
        got = np.concatenate([outs[b, rows]] + [stepped[t][b] for t in range(k)], axis=0)
        assert rel_err(got, ref) <= TOL[dtype], (b, rel_err(got, ref))


def test_positions_and_slots(rng):
    """The cache's own bookkeeping, read directly: compacted slots, lengths and
    the positions it gives a call."""
    from mha_xp import KVCache

    key = rng.standard_normal((2, 1, 4, 3))
    cache = KVCache(np.zeros((2, 1, 6, 3)), np.zeros((2, 1, 6, 3)), np.array([1, 0]))
    keep = np.array([[False, True, False, True], [True, True, True, False]])
    np.testing.assert_array_equal(cache.positions(4, keep)[:, 0], [[0, 1, 1, 2], [0, 1, 2, 2]])
    new = cache.append(key, key, keep)
    np.testing.assert_array_equal(new.length, [3, 3])
    np.testing.assert_array_equal(new.key[0, 0, 1:3], key[0, 0, [1, 3]])
    np.testing.assert_array_equal(new.key[1, 0, 0:3], key[1, 0, :3])
    assert not new.key[0, 0, 0].any() and not new.key[0, 0, 3:].any()
    # one length for the batch, no padding: positions length + i
    np.testing.assert_array_equal(KVCache(key, key, 1).positions(2), [1, 2])


def test_per_sequence_step_under_jax_jit(rng):
    jax = pytest.importorskip("jax", reason="optional backend jax not installed")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    layer = _layer(rng, num_kv_heads=2, rotary=True)
    lj = layer.to(xp=jnp)
    prompts = [rng.standard_normal((n, 16)) for n in (4, 2)]
    x, pad = np.zeros((2, 4, 16)), np.ones((2, 4), dtype=bool)
    for b, p in enumerate(prompts):
        x[b, 4 - len(p):], pad[b, 4 - len(p):] = p, False
    _, cache = lj(jnp.asarray(x), key_padding_mask=jnp.asarray(pad), cache=lj.init_cache(2, 8),
                  is_causal=True)
    step = jax.jit(lambda xs, c: lj(xs, cache=c, is_causal=True))
    news = [rng.standard_normal((2, 1, 16)) for _ in range(3)]
    outs = []
    for new in news:
        y, cache = step(jnp.asarray(new), cache)
        outs.append(np.asarray(y))
    assert step._cache_size() == 1
    for b, p in enumerate(prompts):
        ref = _alone(layer, np.concatenate([p] + [n[b] for n in news], axis=0))[len(p):]
        assert rel_err(np.concatenate([o[b] for o in outs], axis=0), ref) <= 1e-13


def test_overflow_of_the_longest_sequence_is_an_error(rng):
    layer = MHA(8, 2, seed=0)
    x = rng.standard_normal((2, 3, 8))
    pad = np.array([[False, False, False], [True, True, False]])
    _, cache = layer(x, key_padding_mask=pad, cache=layer.init_cache(2, 4), is_causal=True)
    np.testing.assert_array_equal(cache.length, [3, 1])
    with pytest.raises(ValueError, match="the cache holds 3 of its max_length = 4 positions: "
                                         "2 more do not fit"):
        layer(x[:, :2], cache=cache, is_causal=True)
