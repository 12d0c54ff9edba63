"""An independent float64 reference, in plain NumPy with explicit loops.

Written from the definition ("Attention Is All You Need", with the
conventions of mha_xp: True in ``allowed`` = may attend, bottom-right causal,
zero output for a query with nothing to attend to), sharing no code with
mha_xp.
"""

from __future__ import annotations

import math

import numpy as np


def ref_attention(q, k, v, *, allowed=None, bias=None, is_causal=False, scale=None):
    """Reference SDPA: ``q (..., L, D)``, ``k (..., S, D)``, ``v (..., S, Dv)``.

    Returns ``(out (..., L, Dv), weights (..., L, S))`` in float64.
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    L, S = q.shape[-2], k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    if allowed is None:
        allowed = np.ones((L, S), dtype=bool)
    allowed = np.broadcast_to(allowed, lead + (L, S))
    bias = np.zeros((L, S)) if bias is None else np.asarray(bias, dtype=np.float64)
    bias = np.broadcast_to(bias, lead + (L, S))
    q, k, v = (np.broadcast_to(t, lead + t.shape[-2:]) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = np.zeros(lead + (L, v.shape[-1]))
    weights = np.zeros(lead + (L, S))
    for idx in np.ndindex(*lead):
        for i in range(L):
            keys = [j for j in range(S)
                    if allowed[idx + (i, j)] and not (is_causal and j > i + S - L)]
            scores = {j: float(q[idx + (i,)] @ k[idx + (j,)]) * scale + bias[idx + (i, j)]
                      for j in keys}
            finite = [s for s in scores.values() if s != -math.inf]
            if not finite:
                continue  # nothing to attend to: zero output and weights
            top = max(finite)
            e = {j: math.exp(s - top) for j, s in scores.items()}
            total = sum(e.values())
            for j, ej in e.items():
                weights[idx + (i, j)] = ej / total
                out[idx + (i,)] += ej / total * v[idx + (j,)]
    return out, weights


def ref_mha(params, num_heads, query, key=None, value=None, *, key_padding_mask=None,
            allowed=None, bias=None, is_causal=False):
    """Reference layer from torch-named parameters; batched ``(B, L, E)`` only.

    Returns ``(out (B, L, E), weights (B, H, L, S))``.
    """
    p = {n: np.asarray(w, dtype=np.float64) for n, w in params.items()}
    key = query if key is None else key
    value = key if value is None else value
    E = p["out_proj.weight"].shape[0]
    if "in_proj_weight" in p:
        wq, wk, wv = np.split(p["in_proj_weight"], 3)
    else:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    bq, bk, bv = np.split(p.get("in_proj_bias", np.zeros(3 * E)), 3)
    bo = p.get("out_proj.bias", np.zeros(E))
    B, L, _ = query.shape
    S = key.shape[1]
    d = E // num_heads
    out = np.zeros((B, L, E))
    weights = np.zeros((B, num_heads, L, S))
    allowed_full = np.ones((B, num_heads, L, S), dtype=bool)
    if allowed is not None:
        allowed_full &= np.broadcast_to(allowed, allowed_full.shape)
    if key_padding_mask is not None:
        allowed_full &= ~np.asarray(key_padding_mask)[:, None, None, :]
    bias_full = np.zeros((B, num_heads, L, S)) if bias is None else np.broadcast_to(
        np.asarray(bias, dtype=np.float64), (B, num_heads, L, S))
    for b in range(B):
        x_q, x_k, x_v = (np.asarray(t[b], dtype=np.float64) for t in (query, key, value))
        heads = []
        for h in range(num_heads):
            rows = slice(h * d, (h + 1) * d)
            qh = x_q @ wq[rows].T + bq[rows]
            kh = x_k @ wk[rows].T + bk[rows]
            vh = x_v @ wv[rows].T + bv[rows]
            if key_padding_mask is not None:  # padded values never contribute
                vh = np.where(np.asarray(key_padding_mask[b])[:, None], 0.0, vh)
            o, w = ref_attention(qh, kh, vh, allowed=allowed_full[b, h],
                                 bias=bias_full[b, h], is_causal=is_causal)
            heads.append(o)
            weights[b, h] = w
        out[b] = np.concatenate(heads, axis=-1) @ p["out_proj.weight"].T + bo
    return out, weights
