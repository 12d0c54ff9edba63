"""Assertions about weight files shared by the I/O tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import mha_xp


def refused(path: Path, *fragments: str, **kwargs) -> str:
    """load_weights refuses ``path`` with a ValueError that names it and
    holds every one of ``fragments``; returns the message."""
    with pytest.raises(ValueError) as info:
        mha_xp.load_weights(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message
