"""Worst relative errors of mha_xp per backend and dtype, for the record.

Runs the layer and ``scaled_dot_product_attention`` on random inputs with
masks, padding and causal masking on every available backend, against a
float64 NumPy reference (the test suite's), and ``from_torch`` against
``torch.nn.MultiheadAttention`` in float32. Prints one table.

Run ``python benchmarks/parity.py``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from _harness import ROOT, table

import mha_xp


def _load_reference():
    """The tests' independent float64 reference, loaded from its file (it
    shares no code with mha_xp)."""
    spec = importlib.util.spec_from_file_location(
        "mha_xp_reference", ROOT / "tests" / "support" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_reference = _load_reference()
ref_attention, ref_mha = _reference.ref_attention, _reference.ref_mha


def backends():
    import array_api_strict

    yield "numpy", np, None
    yield "array_api_strict", array_api_strict, None
    try:
        import torch

        yield "torch", torch, None
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            yield "cupy", cupy, None
    except Exception:
        pass


def to_numpy(x):
    if hasattr(x, "get"):
        return x.get()
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def main(trials: int = 20) -> None:
    from array_api_compat import array_namespace

    rows = []
    for name, mod, dev in backends():
        cxp = array_namespace(mod.empty((0,)))
        for dtype in ("float32", "float64"):
            dt = getattr(mod, dtype)
            worst_sdpa = worst_layer = 0.0
            for trial in range(trials):
                rng = np.random.default_rng(trial)
                q, k, v = (rng.standard_normal(s) for s in [(2, 4, 9, 8), (2, 4, 13, 8), (2, 4, 13, 8)])
                mask = rng.random((2, 1, 9, 13)) < 0.8
                arr = lambda a, d=dt: cxp.asarray(a, dtype=d, device=dev)  # noqa: E731
                out = mha_xp.scaled_dot_product_attention(arr(q), arr(k), arr(v), mask=arr(mask, None),
                                                          is_causal=True, chunk_size=(4, 5) if trial % 2 else None)
                worst_sdpa = max(worst_sdpa, rel(to_numpy(out), ref_attention(q, k, v, allowed=mask, is_causal=True)[0]))
                layer = mha_xp.MultiHeadAttention(32, 4, kdim=12, seed=trial, xp=mod, device=dev, dtype=dt)
                x, kv, vv = rng.standard_normal((2, 9, 32)), rng.standard_normal((2, 13, 12)), rng.standard_normal((2, 13, 32))
                pad = rng.random((2, 13)) < 0.3
                pad[:, -1] = False
                y = layer(arr(x), arr(kv), arr(vv), key_padding_mask=arr(pad, None), is_causal=True)
                params = {n: to_numpy(w) for n, w in layer.state_dict().items()}
                ref = ref_mha(params, 4, x, kv, vv, key_padding_mask=pad, is_causal=True)[0]
                worst_layer = max(worst_layer, rel(to_numpy(y), ref))
            rows.append((name, dtype, f"{worst_sdpa:.1e}", f"{worst_layer:.1e}"))
    print(f"worst relative error against the float64 reference over {trials} random cases")
    print(table(rows, ("backend", "dtype", "sdpa", "layer")))

    import torch

    worst = {}
    for trial in range(trials):
        rng = np.random.default_rng(100 + trial)
        torch.manual_seed(trial)
        for batch_first in (True, False):
            m = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=12, vdim=12).eval()
            with torch.no_grad():
                m.in_proj_bias.normal_()
            layer = mha_xp.MultiHeadAttention.from_torch(m)
            x = rng.standard_normal((3, 7, 32)).astype(np.float32)
            kv = rng.standard_normal((3, 10, 12)).astype(np.float32)
            pad = rng.random((3, 10)) < 0.3
            pad[:, 0] = False
            y, w = layer(x, kv, kv, key_padding_mask=pad, return_weights=True, average_weights=False)
            tx, tkv = torch.from_numpy(x), torch.from_numpy(kv)
            if not batch_first:
                tx, tkv = tx.transpose(0, 1), tkv.transpose(0, 1)
            with torch.no_grad():
                ty, tw = m(tx, tkv, tkv, key_padding_mask=torch.from_numpy(pad), average_attn_weights=False)
            if not batch_first:
                ty = ty.transpose(0, 1)
            key = f"batch_first={batch_first}"
            worst[key] = max(worst.get(key, 0.0), rel(y, ty.numpy()), rel(w, tw.numpy()))
    print("\nfrom_torch against torch.nn.MultiheadAttention, float32 (outputs and per-head weights)")
    print(table([(k, f"{v:.1e}") for k, v in worst.items()], ("module", "worst rel. error")))


if __name__ == "__main__":
    main()
