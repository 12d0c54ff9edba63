"""The docs' training example (pure NumPy, mha_xp's gradients) really learns."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "train_copy_task.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_copy_task", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_falls_well_below_its_start():
    losses = _load().train(steps=150)
    start, end = losses[0], sum(losses[-10:]) / 10
    assert start > 0.5  # predicting nothing costs the variance of the values
    assert end < 0.05 * start, (start, end)
