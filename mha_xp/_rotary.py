"""Transitional: moved to :mod:`mha_xp._model._rotary`."""

from ._model._rotary import apply_rotary

__all__ = ["apply_rotary"]
