"""The counter-based generator behind dropout: Threefry-2x32-20 on int32 words.

Checked against the Random123 known-answer vectors, against ``jax.random``'s
threefry core, and against a plain NumPy uint32 implementation written here
from the Random123 specification; every backend must give the same bits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mha_xp._lib._random import dropout_keep, random_words, threefry2x32

M32 = np.uint64(0xFFFFFFFF)

# Random123's kat_vectors for threefry2x32_20: (key, counter, output), uint32 words.
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]

# Frozen output of random_words(SEED, range(2), range(2), range(3)), read unsigned:
# changing the generator changes every dropout mask ever drawn, so it must be
# deliberate. Computed with jax.extend.random.threefry_2x32 (see test below).
GOLDEN_SEED = 2**40 + 5
GOLDEN = np.array(
    [[[0x69CF71F0, 0x44B148CD, 0x33EEB599], [0x814146DD, 0xC197ACFA, 0xABAC8BAB]],
     [[0xF97AA262, 0xAA20257B, 0xEDE43C9A], [0x2D0520C7, 0x389A392B, 0xECC18474]]],
    dtype=np.uint32,
)


def ref_threefry(key, counter):
    """Threefry-2x32, 20 rounds, in NumPy uint64 arithmetic masked to 32 bits
    (an implementation independent of mha_xp's int32 one)."""
    k0, k1 = (np.asarray(k, dtype=np.uint64) & M32 for k in key)
    x0, x1 = (np.asarray(c, dtype=np.uint64) & M32 for c in counter)
    ks = [k0, k1, k0 ^ k1 ^ np.uint64(0x1BD11BDA)]
    rot = [13, 15, 26, 6, 17, 29, 16, 24]
    x0, x1 = (x0 + ks[0]) & M32, (x1 + ks[1]) & M32
    for r in range(20):
        x0 = (x0 + x1) & M32
        s = np.uint64(rot[r % 8])
        x1 = ((x1 << s) | (x1 >> (np.uint64(32) - s))) & M32
        x1 = x1 ^ x0
        if r % 4 == 3:
            n = r // 4 + 1
            x0 = (x0 + ks[n % 3]) & M32
            x1 = (x1 + ks[(n + 1) % 3] + np.uint64(n)) & M32
    return x0.astype(np.uint32), x1.astype(np.uint32)


def ref_words(seed, bh, rows, cols):
    """The documented definition: key_b = threefry(seed, (b, 0)); word =
    threefry(key_b, (i, j // 2))[j % 2]; bh of any shape, rows and cols 1-d."""
    bh = np.asarray(bh, dtype=np.uint64)[..., None, None]
    kb = ref_threefry((seed & 0xFFFFFFFF, seed >> 32), (bh, np.zeros_like(bh)))
    rows = np.asarray(rows, dtype=np.uint64)[:, None]
    cols = np.asarray(cols, dtype=np.uint64)[None, :]
    y0, y1 = ref_threefry(kb, (rows, cols // np.uint64(2)))
    return np.where(cols % np.uint64(2) == 0, y0, y1)


def words_u32(backend, w):
    out = backend.to_numpy(w)
    assert out.dtype == np.int32
    return out.view(np.uint32)


def signed(a):
    return np.asarray(a, dtype=np.uint32).view(np.int32)


def test_reference_matches_known_answers():
    for key, ctr, expected in KAT:
        y0, y1 = ref_threefry(key, ctr)
        assert (int(y0), int(y1)) == expected


@pytest.mark.parametrize("array_key", [False, True], ids=["int-key", "array-key"])
def test_known_answer_vectors(backend, array_key):
    for key, ctr, expected in KAT:
        x0 = backend.asarray(signed([ctr[0]]), "int32")
        x1 = backend.asarray(signed([ctr[1]]), "int32")
        if array_key:
            k = tuple(backend.asarray(signed([kk]), "int32") for kk in key)
        else:
            k = key
        y0, y1 = threefry2x32(k, (x0, x1))
        got = (int(words_u32(backend, y0)[0]), int(words_u32(backend, y1)[0]))
        assert got == expected, [hex(g) for g in got]


def test_matches_jax_threefry(backend, rng):
    """Bit parity with jax.random's threefry core on random keys and counters."""
    jr = pytest.importorskip("jax.extend.random")
    n = 257
    for _ in range(3):
        key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
        ctr = rng.integers(0, 2**32, size=(2, n), dtype=np.uint64).astype(np.uint32)
        # jax splits the flattened count into halves: (x0 words, x1 words).
        expected = np.asarray(jr.threefry_2x32(key, ctr.reshape(-1))).reshape(2, n)
        x0, x1 = (backend.asarray(signed(c), "int32") for c in ctr)
        y0, y1 = threefry2x32((int(key[0]), int(key[1])), (x0, x1))
        np.testing.assert_array_equal(words_u32(backend, y0), expected[0])
        np.testing.assert_array_equal(words_u32(backend, y1), expected[1])
        np.testing.assert_array_equal(np.stack(ref_threefry(key, ctr)), expected)


def test_array_keys_broadcast(backend, rng):
    """Per-position keys (the per-(batch, head) keys of dropout) broadcast
    against the counter."""
    keys = rng.integers(0, 2**32, size=(2, 3, 1), dtype=np.uint64).astype(np.uint32)
    ctr = rng.integers(0, 2**32, size=(2, 5), dtype=np.uint64).astype(np.uint32)
    k = tuple(backend.asarray(signed(kk), "int32") for kk in keys)
    x = tuple(backend.asarray(signed(c), "int32") for c in ctr)
    y0, y1 = threefry2x32(k, x)
    r0, r1 = ref_threefry(keys, ctr)
    np.testing.assert_array_equal(words_u32(backend, y0), r0)
    np.testing.assert_array_equal(words_u32(backend, y1), r1)


def test_words_match_definition_and_golden(backend):
    w = random_words(GOLDEN_SEED, range(2), range(2), range(3), xp=backend.cxp,
                     device=backend.device)
    got = words_u32(backend, w)
    np.testing.assert_array_equal(got, ref_words(GOLDEN_SEED, range(2), range(2), range(3)))
    np.testing.assert_array_equal(got, GOLDEN)


def test_golden_from_jax():
    """The frozen words are what jax's threefry gives for the definition."""
    jr = pytest.importorskip("jax.extend.random")
    seed_key = np.array([GOLDEN_SEED & 0xFFFFFFFF, GOLDEN_SEED >> 32], dtype=np.uint32)
    out = np.zeros((2, 2, 3), dtype=np.uint32)
    for b in range(2):
        kb = np.asarray(jr.threefry_2x32(seed_key, np.array([b, 0], dtype=np.uint32)))
        for i in range(2):
            for j in range(3):
                pair = np.asarray(jr.threefry_2x32(kb, np.array([i, j // 2], np.uint32)))
                out[b, i, j] = pair[j % 2]
    np.testing.assert_array_equal(out, GOLDEN)


def test_same_mask_every_backend(backend, rng):
    """Identical bits on every backend: the mask equals the NumPy reference's,
    for a seed above 2**32 and a batch-by-head leading shape."""
    seed = int(rng.integers(2**32, 2**63))
    bh = np.arange(6).reshape(2, 3)
    p = 0.3
    keep = dropout_keep(seed, backend.asarray(bh, "int64"), range(7), range(11), p,
                        xp=backend.cxp, device=backend.device)
    got = backend.to_numpy(keep)
    assert got.dtype == np.bool_ and got.shape == (2, 3, 7, 11)
    expected = ref_words(seed, bh, range(7), range(11)) >= round(p * 2**32)
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.sum() < got.size


def test_blocks_equal_slices_of_full_mask(backend, rng):
    seed, p = 2024, 0.4
    B, L, S = 4, 13, 17
    kw = dict(xp=backend.cxp, device=backend.device)
    full = backend.to_numpy(dropout_keep(seed, range(B), range(L), range(S), p, **kw))
    for _ in range(4):
        i0, i1 = sorted(rng.choice(L + 1, size=2, replace=False))
        j0, j1 = sorted(rng.choice(S + 1, size=2, replace=False))
        b = int(rng.integers(B))
        block = dropout_keep(seed, b, range(i0, i1), range(j0, j1), p, **kw)
        np.testing.assert_array_equal(backend.to_numpy(block), full[b, i0:i1, j0:j1])
    # Blocks starting or ending inside a column pair, and strided columns.
    for j0, j1 in ((1, 2), (3, 8), (0, 1), (16, 17)):
        block = dropout_keep(seed, 1, range(2, 5), range(j0, j1), p, **kw)
        np.testing.assert_array_equal(backend.to_numpy(block), full[1, 2:5, j0:j1])
    block = dropout_keep(seed, range(B), range(L), range(15, 0, -3), p, **kw)
    np.testing.assert_array_equal(backend.to_numpy(block), full[:, :, 15:0:-3])
    # Index arrays (any integer dtype, any order) address the same entries.
    rows = rng.permutation(L)[:5]
    cols = rng.permutation(S)[:6]
    block = dropout_keep(seed, backend.asarray(np.array([3, 1]), "int64"),
                         backend.asarray(rows, "int32"), backend.asarray(cols, "int64"), p, **kw)
    np.testing.assert_array_equal(backend.to_numpy(block), full[[3, 1]][:, rows][:, :, cols])
    # A 0-d index array addresses one (batch, head) like an int (regression:
    # it used to drop a row axis instead).
    block = dropout_keep(seed, backend.asarray(np.array(2), "int64"), range(3, 7), range(S), p, **kw)
    np.testing.assert_array_equal(backend.to_numpy(block), full[2, 3:7])


def test_device_and_namespace_preserved(backend):
    from array_api_compat import array_namespace, device

    keep = dropout_keep(1, range(2), range(3), range(4), 0.5, xp=backend.cxp,
                        device=backend.device)
    ref = backend.cxp.empty((1,), device=backend.device)
    assert array_namespace(keep) is array_namespace(ref)
    assert device(keep) == device(ref)
    assert keep.dtype == backend.cxp.bool
    backend.to_numpy(keep)  # and, on Dask, still lazy
    # Without device=, ranges follow the index arrays given.
    rows = backend.asarray(np.arange(3), "int64")
    keep2 = dropout_keep(1, range(2), rows, range(4), 0.5, xp=backend.cxp)
    assert device(keep2) == device(ref)
    np.testing.assert_array_equal(backend.to_numpy(keep2), backend.to_numpy(keep))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bound(backend, p):
    keep = backend.to_numpy(
        dropout_keep(11, range(8), range(64), range(64), p, xp=backend.cxp, device=backend.device)
    )
    n = keep.size
    rate = keep.mean()
    # 5 standard deviations of a binomial proportion: fails by chance with
    # probability below 1e-6 for a good generator.
    assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), rate
    # No row, column or head may be systematically off either (a broken
    # counter layout shows up as stripes): each marginal within 6 sigma.
    for axis, size in ((0, 8), (1, 64), (2, 64)):
        other = n // size
        marg = keep.mean(axis=tuple(a for a in range(3) if a != axis))
        assert np.all(np.abs(marg - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / other)), (axis, marg)


def test_p_zero_and_one(backend):
    kw = dict(xp=backend.cxp, device=backend.device)
    assert backend.to_numpy(dropout_keep(3, range(2), range(5), range(6), 0.0, **kw)).all()
    none = backend.to_numpy(dropout_keep(3, range(2), range(5), range(6), 1.0, **kw))
    assert none.shape == (2, 5, 6) and not none.any()


def test_different_seeds_differ(backend):
    kw = dict(xp=backend.cxp, device=backend.device)
    masks = [backend.to_numpy(dropout_keep(s, range(4), range(32), range(32), 0.5, **kw))
             for s in (0, 1, 2**32, 2**63 + 1)]
    n = masks[0].size
    for a in range(4):
        for b in range(a + 1, 4):
            agree = np.mean(masks[a] == masks[b])
            # independent masks agree on about half the entries
            assert abs(agree - 0.5) <= 5 * math.sqrt(0.25 / n), (a, b, agree)
    # Neighbouring heads, rows and columns are not copies of one another.
    m = masks[0]
    for x, y in ((m[0], m[1]), (m[:, 0], m[:, 1]), (m[..., 0], m[..., 1])):
        assert abs(np.mean(x == y) - 0.5) <= 5 * math.sqrt(0.25 / x.size)


def test_same_call_twice_is_bit_identical(backend):
    kw = dict(xp=backend.cxp, device=backend.device)
    a = backend.to_numpy(random_words(99, range(3), range(9), range(10), **kw))
    b = backend.to_numpy(random_words(99, range(3), range(9), range(10), **kw))
    np.testing.assert_array_equal(a, b)


def test_jax_without_x64():
    """JAX's default mode has no 64-bit integers: the int32 words need none."""
    jax = pytest.importorskip("jax")
    with jax.enable_x64(False):
        w = random_words(GOLDEN_SEED, range(2), range(2), range(3), xp=jax.numpy)
        assert w.dtype == jax.numpy.int32
        np.testing.assert_array_equal(np.asarray(w).view(np.uint32), GOLDEN)


def test_under_jax_jit_with_traced_offsets():
    """A block whose row offset is traced (as in a jax.lax loop) regenerates
    the same bits as the eager full mask."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def block(i0):
        rows = i0 + jnp.arange(4, dtype=jnp.int32)
        return dropout_keep(5, range(2), rows, range(7), 0.3, xp=jnp)

    full = np.asarray(dropout_keep(5, range(2), range(12), range(7), 0.3, xp=jnp))
    for i0 in (0, 4, 8):
        np.testing.assert_array_equal(np.asarray(jax.jit(block)(i0)), full[:, i0:i0 + 4])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(seed=-1), ValueError, "seed must be a non-negative int"),
        (dict(seed=2**64), ValueError, "seed must be below 2\\*\\*64"),
        (dict(seed=1.5), TypeError, "seed must be a non-negative int for dropout .* got float 1.5"),
        (dict(seed=None), TypeError, "seed must be a non-negative int for dropout"),
        (dict(seed=np.random.default_rng(0)), TypeError, "for dropout"),
        (dict(p=1.5), ValueError, "p must be a dropout probability in \\[0, 1\\], got 1.5"),
        (dict(p=float("nan")), ValueError, "p must be a dropout probability"),
        (dict(p=True), TypeError, "p must be a Python float"),
        (dict(p="0.1"), TypeError, "p must be a Python float"),
        (dict(rows=range(-1, 3)), ValueError, "rows must hold indices in \\[0, 2\\*\\*31\\)"),
        (dict(cols=2**31), ValueError, "cols must be an index in \\[0, 2\\*\\*31\\)"),
        (dict(cols=[0, 1]), TypeError, "cols must be an int, a range or an integer array"),
        (dict(rows=np.zeros(3)), TypeError, "rows must be an integer array of indices, got dtype float64"),
        (dict(rows=np.zeros((2, 2), dtype=np.int64)), ValueError, "rows must be .* 1-d array, got shape \\(2, 2\\)"),
    ],
)
def test_errors(kwargs, exc, match):
    import array_api_compat.numpy as xp

    args = dict(seed=0, batch_head_index=0, rows=range(3), cols=range(4), p=0.1) | kwargs
    with pytest.raises(exc, match=match):
        dropout_keep(**args, xp=xp)
