"""Transitional: the backward now lives in :mod:`mha_xp._core._backward`."""

from ._lib._shapes import unbroadcast

__all__ = ["unbroadcast"]
