"""Type aliases of mha_xp's public signatures.

mha_xp accepts the arrays of any library that implements the Python array
API standard, so its hints describe what it relies on rather than one
library's class:

- :class:`Array`: any array API array (NumPy, CuPy, torch, JAX, Dask,
  array-api-strict, ...); a structural protocol, so every such array
  satisfies it without registering;
- :data:`Namespace`: an array API namespace, the module of functions of an
  array library (``numpy``, ``torch``, ``array_api_strict``, or the
  ``array_api_compat`` wrapper of one);
- :data:`Device`: a device object of that library (``"cpu"``, a
  ``torch.device``, a CuPy device, ...);
- :data:`DType`: a dtype object of that library (``numpy.float32``,
  ``torch.float16``, ...).

Examples
--------
>>> import numpy as np
>>> from mha_xp.typing import Array
>>> def attend(x: Array) -> Array:
...     return x
>>> attend(np.zeros((2, 3))).shape
(2, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

__all__ = ["Array", "DType", "Device", "MaskMod", "Namespace", "ScoreMod", "ScoreModVJP"]


class Array(Protocol):
    """Any array of a library implementing the Python array API standard."""

    @property
    def shape(self) -> tuple[Any, ...]:
        """The array's shape (``None`` or NaN entries for unknown sizes)."""

    @property
    def dtype(self) -> Any:
        """The array's dtype."""

    @property
    def ndim(self) -> int:
        """The number of axes."""


#: An array API namespace: the module of an array library's functions.
Namespace = ModuleType
#: A device object of an array library.
Device = Any
#: A dtype object of an array library.
DType = Any

#: ``score_mod(score, b, h, q_idx, kv_idx) -> score``: torch FlexAttention's
#: score modifier, on broadcasting arrays of any library.
ScoreMod = Callable[[Array, Array, Array, Array, Array], Array]

#: ``mask_mod(b, h, q_idx, kv_idx) -> bool array`` (True = may attend).
MaskMod = Callable[[Array, Array, Array, Array], Array]

#: ``score_mod_vjp(grad, score, b, h, q_idx, kv_idx)``: the gradient with
#: respect to the score, or that and a dict of captured arrays' gradients.
ScoreModVJP = Callable[..., Any]
