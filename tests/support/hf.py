"""Hugging Face transformers' own code, run in float64.

Hugging Face's rotary tables and norms cast to float32 (``torch.float``,
``.to(torch.float32)``, ``Tensor.float()``) whatever the model's dtype, so a
float64 model agrees with a float64 reference only to about 1e-7.
:func:`hf_in_float64` runs the shipped code with those casts turned into
float64 ones: the formulas stay Hugging Face's, only the dtype changes, and a
comparison can then be made at float64's rounding.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def hf_in_float64(monkeypatch: pytest.MonkeyPatch, *modules: types.ModuleType) -> Iterator[None]:
    """Within the block, ``torch.float`` and ``torch.float32`` as ``modules``
    see them, ``Tensor.float()`` and torch's default dtype (that of
    ``int_tensor * python_float``) are all float64; undone on exit."""
    import torch

    class _Torch64(types.ModuleType):
        float = torch.float64
        float32 = torch.float64

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    proxy = _Torch64("torch")
    default = torch.get_default_dtype()
    with monkeypatch.context() as m:
        for mod in modules:
            m.setattr(mod, "torch", proxy)
        m.setattr(torch.Tensor, "float", torch.Tensor.double)
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(default)
