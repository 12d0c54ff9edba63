"""Transitional: the layer's former view of the score-level variants.

The variants now live in :class:`mha_xp._spec.AttentionSpec` and their
positional semantics in :mod:`mha_xp._core._positions`; this module goes
once the layer builds its spec itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._attention import alibi_slopes
from ._core._positions import combine
from ._lib._namespace import Array

__all__ = ["Variants", "alibi_slopes", "combine"]


@dataclass(frozen=True)
class Variants:
    """The score-level variants of one attention call, validated.

    Positions are measured by ``rel = diag(i) - j``, the distance of key ``j``
    left of query ``i``'s diagonal, where ``diag(i)`` is the key bottom-right
    aligned with query ``i``: ``i + offset`` (``offset = S - L`` unless given,
    and shifted for a block of rows that does not start at 0), or, for packed
    sequences with different query and key boundaries, ``q_diag[i]``.

    Attributes
    ----------
    window : (int, int) or None
        ``(left, right)``: keys with ``-right <= rel <= left`` are seen; a
        negative entry is unbounded.
    softcap : float or None
        Scores ``s -> softcap * tanh(s / softcap)`` before any bias.
    neg_slopes : array or None
        Minus the ALiBi slopes, broadcastable to the leading (batch, head)
        shape followed by ``(1, 1)``, in the compute dtype; adds
        ``neg_slopes * |rel|``.
    q_seg, k_seg : array or None
        The sequence of each query ``(L,)`` and key ``(S,)`` of a packed batch.
    q_diag : array or None
        ``diag(i)`` per query ``(L,)``, when it is not ``i + offset``.
    offset : int or None
        ``diag(0)`` of the rows at hand (default ``S - L``).
    dropout : (float, int) or None
        ``(p, seed)``: dropout on the attention weights with probability
        ``0 < p <= 1``, its keep-mask from :func:`~mha_xp._random.dropout_keep`
        at the global position (flattened leading index, query row, key
        column) under ``seed``.
    lead_index : array or None
        The global flattened index of each leading (batch, head) position of
        the rows at hand, int32, of the broadcast leading shape; None: the
        C-order index over that shape (``arange(prod(lead))`` reshaped).
    row_start : int
        Global index of the first row at hand (a Dask task's block of rows).
    """

    window: tuple[int, int] | None = None
    softcap: float | None = None
    neg_slopes: Array | None = None
    q_seg: Array | None = None
    k_seg: Array | None = None
    q_diag: Array | None = None
    offset: int | None = None
    dropout: tuple[float, int] | None = None
    lead_index: Array | None = None
    row_start: int = 0

    def positional(self) -> bool:
        """Whether a mask or bias depends on the positions beyond the causal triangle."""
        return self.window is not None or self.neg_slopes is not None or self.q_seg is not None
