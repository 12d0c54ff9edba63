"""The dense executor: one ``(..., L, S)`` score tensor for the whole call."""

from __future__ import annotations

from types import ModuleType
from typing import cast


from .._lib._backends import writes_in_place
from .._lib._inplace import multiply_into
from .._lib._namespace import Array, device_of
from .._lib._shapes import broadcast_lead, expand
from .._lib._softmax import masked_softmax, unnormalised_attention, with_ones_column
from .._spec import AttentionSpec, Block, Plan
from ._positions import diag_offset, dropout_scale, with_lead_index
from ._scores import block_scores

__all__ = ["run"]


def run(query: Array, key: Array, value: Array, spec: AttentionSpec, block: Block, plan: Plan,
        /, *, xp: ModuleType) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
    """``(out, weights or None, stats or None)`` in the compute dtype, with
    the full broadcast leading shape."""
    L, S = query.shape[-2], key.shape[-2]
    lead = broadcast_lead(query, key, value)
    block = with_lead_index(spec, block, lead, xp=xp, device=device_of(query))
    everything = (slice(0, L), slice(0, S))
    # Scale Q (L x D) rather than the scores (L x S).
    scores = cast(Array, block_scores(query * spec.scale, key, spec, *everything,
                                      diag_offset(L, S, spec, block), xp=xp,
                                      in_place=writes_in_place(xp), block=block))
    if spec.dropout is None:
        # Leave exp(s - m) unnormalised, get its row sums from the P V matmul
        # and divide the (L, Dv) output rather than the (L, S) probabilities:
        # two passes over the scores fewer (the weights, when asked for, are
        # normalised after the matmul).
        out, weights, stats = unnormalised_attention(
            scores, with_ones_column(value, xp=xp), xp=xp, return_weights=plan.return_weights)
    else:
        weights, stats = cast("tuple[Array, tuple[Array, Array]]",
                              masked_softmax(scores, None, xp=xp, return_stats=True))
        drop = dropout_scale(spec, block, *everything, dtype=scores.dtype, xp=xp,
                             device=device_of(query))
        # The weights go back undropped: only overwrite them when they do not.
        out = xp.matmul(multiply_into(weights, drop, xp=xp, in_place=writes_in_place(xp)
                                      and not plan.return_weights), value)
    out = expand(out, lead + (L, value.shape[-1]), xp)
    weights = expand(weights, lead + (L, S), xp) if plan.return_weights else None
    if not plan.return_stats:
        return out, weights, None
    return out, weights, (expand(stats[0], lead + (L,), xp), expand(stats[1], lead + (L,), xp))
