"""An independent float64 reference for the attention variants, in plain
NumPy with explicit loops over (batch, head, query, key).

Written from the definitions (torch's ``enable_gqa``, FlashAttention's
``window_size``, ``alibi_slopes``, ``softcap`` and varlen ``cu_seqlens``),
sharing no code with mha_xp: every query's visible keys and relative
position are worked out per entry, sequence by sequence.
"""

from __future__ import annotations

import math

import numpy as np


def ref_alibi_slopes(n):
    """The ALiBi paper's slopes (ofirpress/attention_with_linear_biases,
    ``get_slopes``), copied in its own recursive form."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + ref_alibi_slopes(2 * closest)[0::2][: n - closest]


def _segments(cu, n):
    """For each position, (sequence start, sequence length) from cu_seqlens."""
    if cu is None:
        return [(0, n)] * n
    out = []
    for t in range(n):
        s = max(i for i in range(len(cu) - 1) if cu[i] <= t and (t < cu[i + 1]))
        out.append((int(cu[s]), int(cu[s + 1] - cu[s]), s))
    return out


def ref_variants(q, k, v, *, allowed=None, bias=None, is_causal=False, scale=None,
                 window=None, alibi=None, softcap=None, cu_q=None, cu_k=None):
    """Reference attention with every variant; ``q (..., Hq, L, D)``,
    ``k, v (..., Hkv, S, D)`` with ``Hq % Hkv == 0``.

    Returns ``(out (..., Hq, L, Dv), weights (..., Hq, L, S))`` in float64.
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    L, S = q.shape[-2], k.shape[-2]
    hq, hkv = q.shape[-3], k.shape[-3]
    group = hq // hkv
    lead = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]) + (hq,)
    allowed = np.broadcast_to(np.ones((L, S), bool) if allowed is None else allowed, lead + (L, S))
    bias = np.broadcast_to(np.zeros((L, S)) if bias is None else np.asarray(bias, np.float64),
                           lead + (L, S))
    q = np.broadcast_to(q, lead + q.shape[-2:])
    k = np.broadcast_to(k, lead[:-1] + (hkv,) + k.shape[-2:])
    v = np.broadcast_to(v, lead[:-1] + (hkv,) + v.shape[-2:])
    if alibi is not None:
        alibi = np.broadcast_to(np.asarray(alibi, np.float64), lead)
    if cu_q is not None and cu_k is None:
        cu_k = cu_q
    seg_q, seg_k = _segments(cu_q, L), _segments(cu_k, S)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = np.zeros(lead + (L, v.shape[-1]))
    weights = np.zeros(lead + (L, S))
    for idx in np.ndindex(*lead):
        kv_idx = idx[:-1] + (idx[-1] // group,)
        for i in range(L):
            scores = {}
            for j in range(S):
                if cu_q is not None:
                    (q0, lq, sq), (k0, lk, sk) = seg_q[i], seg_k[j]
                    if sq != sk:
                        continue
                    rel = (i - q0) + lk - lq - (j - k0)
                else:
                    rel = i + S - L - j
                if not allowed[idx + (i, j)] or (is_causal and rel < 0):
                    continue
                if window is not None:
                    left, right = window
                    if (left >= 0 and rel > left) or (right >= 0 and rel < -right):
                        continue
                s = float(q[idx + (i,)] @ k[kv_idx + (j,)]) * scale
                if softcap is not None:
                    s = softcap * math.tanh(s / softcap)
                s += bias[idx + (i, j)]
                if alibi is not None:
                    s -= alibi[idx] * abs(rel)
                scores[j] = s
            finite = [s for s in scores.values() if s != -math.inf]
            if not finite:
                continue
            top = max(finite)
            e = {j: math.exp(s - top) for j, s in scores.items()}
            total = sum(e.values())
            for j, ej in e.items():
                weights[idx + (i, j)] = ej / total
                out[idx + (i,)] += ej / total * v[kv_idx + (j,)]
    return out, weights


def central_differences(f, arrays, grad_out, eps=1e-6):
    """Gradients of ``sum(f(*arrays) * grad_out)`` with respect to every
    array, by central differences in float64."""
    grads = []
    for n, x in enumerate(arrays):
        g = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            up = [a.copy() for a in arrays]
            down = [a.copy() for a in arrays]
            up[n][idx] += eps
            down[n][idx] -= eps
            g[idx] = (np.sum(f(*up) * grad_out) - np.sum(f(*down) * grad_out)) / (2 * eps)
        grads.append(g)
    return grads


def ref_positions(L, S, *, is_causal=False, window=None, cu_q=None, cu_k=None):
    """``(allowed (L, S), rel (L, S))`` of the definitions above, for
    expressing the variants as a mask and bias in torch."""
    if cu_q is not None and cu_k is None:
        cu_k = cu_q
    seg_q, seg_k = _segments(cu_q, L), _segments(cu_k, S)
    allowed = np.zeros((L, S), bool)
    rel = np.zeros((L, S))
    for i in range(L):
        for j in range(S):
            if cu_q is not None:
                (q0, lq, sq), (k0, lk, sk) = seg_q[i], seg_k[j]
                if sq != sk:
                    continue
                r = (i - q0) + lk - lq - (j - k0)
            else:
                r = i + S - L - j
            rel[i, j] = r
            if is_causal and r < 0:
                continue
            if window is not None:
                left, right = window
                if (left >= 0 and r > left) or (right >= 0 and r < -right):
                    continue
            allowed[i, j] = True
    return allowed, rel
