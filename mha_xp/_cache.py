"""Transitional: moved to :mod:`mha_xp._model._cache`."""

from ._model._cache import KVCache

__all__ = ["KVCache"]
