"""Transitional: moved to :mod:`mha_xp._model._norm`."""

from ._model._norm import qk_layer_norm, qk_layer_norm_backward

__all__ = ["qk_layer_norm", "qk_layer_norm_backward"]
