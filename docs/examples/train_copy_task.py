"""Train multi-head attention in pure NumPy with mha_xp's gradients.

The toy task: each sequence holds random values, one token is marked, and at
every position the model must output the marked token's value. One
self-attention layer can solve it (queries learn to look for the marker, the
value projection carries the value), so the loss falls from about 1 (the
variance of the values) towards 0. Training uses ``MultiHeadAttention.vjp``
and a few lines of Adam; no autodiff framework is involved.

Run ``python docs/examples/train_copy_task.py``.
"""

from __future__ import annotations

import numpy as np

import mha_xp

EMBED_DIM, NUM_HEADS, LENGTH = 8, 2, 8


def make_batch(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(batch, LENGTH, EMBED_DIM)`` and targets ``(batch,)``.

    Feature 0 holds the token's value, feature 1 marks one token per
    sequence, the other features are small noise.
    """
    x = 0.1 * rng.standard_normal((batch, LENGTH, EMBED_DIM))
    x[..., 0] = rng.standard_normal((batch, LENGTH))
    marked = rng.integers(LENGTH, size=batch)
    x[np.arange(batch), marked, 1] = 1.0
    return x, x[np.arange(batch), marked, 0]


def train(steps: int = 400, batch: int = 64, lr: float = 0.03, seed: int = 0) -> list[float]:
    """Train with Adam; return the loss of every step."""
    rng = np.random.default_rng(seed)
    params = mha_xp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, seed=seed).state_dict()
    m = {n: np.zeros_like(w) for n, w in params.items()}
    v = {n: np.zeros_like(w) for n, w in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    losses = []
    for step in range(1, steps + 1):
        x, target = make_batch(rng, batch)
        layer = mha_xp.MultiHeadAttention.from_state_dict(params, num_heads=NUM_HEADS)
        y, backward = layer.vjp(x)                     # self-attention
        err = y[..., 0] - target[:, None]              # every position predicts the value
        losses.append(float(np.mean(err**2)))
        grad_y = np.zeros_like(y)
        grad_y[..., 0] = 2.0 * err / err.size          # d mean(err**2) / dy
        grads = backward(grad_y)
        for n in params:                               # Adam
            m[n] = beta1 * m[n] + (1 - beta1) * grads[n]
            v[n] = beta2 * v[n] + (1 - beta2) * grads[n] ** 2
            m_hat, v_hat = m[n] / (1 - beta1**step), v[n] / (1 - beta2**step)
            params[n] = params[n] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return losses


if __name__ == "__main__":
    losses = train()
    for step in (0, 49, 99, 199, 299, len(losses) - 1):
        print(f"step {step + 1:4d}: loss {losses[step]:.4f}")
