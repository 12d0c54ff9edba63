"""Attention statistics without the weights: peak memory against the weights.

Measures one call of ``mha_xp.attention_statistics(q, k, key_mass=True,
entropy=True, pool=(64, 64))`` on NumPy float32 at L = S = 16384, H = 1,
D = 64 (default blocks), in a fresh process: the peak extra resident memory
during the call (peak RSS minus RSS before it) and the peak of the memory
traced by ``tracemalloc`` (NumPy reports its allocations there), against the
``L * S * 4`` bytes (1 GiB) of the weights that the statistics would
otherwise be reduced from. First it checks the statistics against the same
reductions of ``scaled_dot_product_attention``'s weights at a small size.

Run ``python benchmarks/attention_statistics.py`` (about a minute); it prints the
figures and writes ``benchmarks/results/attention_statistics.json``. (Not
``statistics.py``: that name would shadow the standard library module that
``_harness`` imports.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _harness import ROOT, machine, peak, reset_peak, rss

import mha_xp
from mha_xp._core._plan import default_blocks

L = S = 16384
H, D = 1, 64
POOL = (64, 64)


def inputs(L: int, S: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((H, L, D)).astype(np.float32),
            rng.standard_normal((H, S, D)).astype(np.float32))


def call(q: np.ndarray, k: np.ndarray) -> dict[str, np.ndarray]:
    return mha_xp.attention_statistics(q, k, key_mass=True, entropy=True, pool=POOL)


def measure() -> dict[str, float]:
    """One call at full size in this process: peak extra RSS, tracemalloc peak, seconds."""
    q, k = inputs(L, S)
    before = rss()
    reset_peak()
    tracemalloc.start()
    t0 = time.perf_counter()
    out = call(q, k)
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    extra = peak() - before
    assert np.all(np.isfinite(out["entropy"])) and abs(float(out["key_mass"].sum()) - L) < 1e-2 * L
    return {"peak_extra_rss_bytes": extra, "tracemalloc_peak_bytes": traced, "seconds": seconds}


def check_small(n: int = 1024) -> float:
    """Worst relative error against the reductions of the dense weights."""
    q, k = inputs(n, n, seed=1)
    out = call(q, k)
    _, w = mha_xp.scaled_dot_product_attention(q, k, k, return_weights=True)
    w = w.astype(np.float64)
    pooled = w.reshape(H, n // POOL[0], POOL[0], n // POOL[1], POOL[1]).mean(axis=(2, 4))
    ref = {"key_mass": w.sum(axis=-2), "entropy": -np.sum(w * np.log(np.where(w > 0, w, 1)), -1),
           "pooled": pooled}
    return max(float(np.linalg.norm(out[n] - r) / np.linalg.norm(r)) for n, r in ref.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "attention_statistics.json")
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(measure()))
        return 0
    err = check_small()
    print(f"check at L = S = 1024: worst relative error vs the dense weights {err:.1e}")
    run = subprocess.run([sys.executable, __file__, "--memory"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    weights = L * S * 4
    report = {"machine": machine(), "dtype": "float32", "shape_H_L_S_D": [H, L, S, D],
              "pool": list(POOL), "blocks": list(default_blocks((H,), L, S)),
              "num_threads": mha_xp.get_num_threads(), "weights_bytes": weights,
              "check_rel_err_L1024": err, **result,
              "rss_ratio_to_weights": result["peak_extra_rss_bytes"] / weights,
              "tracemalloc_ratio_to_weights": result["tracemalloc_peak_bytes"] / weights}
    print(f"attention_statistics(key_mass, entropy, pool={POOL}), float32 NumPy, "
          f"H = {H}, L = S = {L}, D = {D}, blocks {tuple(report['blocks'])}, "
          f"{report['num_threads']} threads: {result['seconds']:.1f} s")
    print(f"  weights it avoids (L * S * 4): {weights / 2**20:8.1f} MiB")
    for name, key in (("peak extra RSS", "peak_extra_rss_bytes"),
                      ("tracemalloc peak", "tracemalloc_peak_bytes")):
        print(f"  {name + ':':30s} {result[key] / 2**20:8.1f} MiB  "
              f"= {result[key] / weights:.4f} x the weights ({weights / result[key]:.0f}x less)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
