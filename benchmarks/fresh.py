"""Each implementation alone in a fresh process: the figures the speed targets use.

``run.py`` times every implementation of a case in one process, interleaved.
That is fair to neither side on a small machine: torch's and JAX's thread
pools keep spinning after their calls and slow the NumPy work that follows
(measured: mha_xp at long took 0.45 s in a NumPy-only process and 0.56 s
interleaved with torch). Here every (implementation, configuration) runs in
a process of its own that imports only what it needs, after a warm-up; the
rounds alternate the implementations' order, and the figure is the median
over rounds of each process's median call.

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/fresh.py [--rounds 3]
        [--configs tiny,small,medium,long,vlong] [--out benchmarks/results/fresh.json]

Implementations and configurations are those of ``run.py`` (float32 forward
of a self-attention layer, projections included), plus ``vlong``
``(1, 16384, 256, 4)``. "torch best" is the fastest of ``nn.MHA``, ``F.mha``
and ``SDPA+proj``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import ROOT, machine, table

CONFIGS = {"tiny": (1, 16, 64, 4), "small": (32, 128, 256, 8), "medium": (8, 512, 512, 8),
           "long": (1, 4096, 512, 8), "vlong": (1, 16384, 256, 4)}
IMPLS = ("mha_xp", "numpy", "torch_module", "torch_functional", "torch_sdpa")
TORCH = ("torch_module", "torch_functional", "torch_sdpa")
TARGETS = {"tiny": ("numpy", 1.0), "small": ("torch", 1.0), "medium": ("torch", 0.9),
           "long": ("torch", 0.9), "vlong": ("torch_functional", 1.0)}


def one(impl: str, config: str) -> dict[str, float]:
    """In the child: the median seconds of one call (after a warm-up)."""
    from run import forward_runner  # the implementations of run.py

    B, L, E, H = CONFIGS[config]
    fn = forward_runner(impl, B, L, E, H, "float32")
    if impl.startswith("torch"):
        import torch

        torch.set_grad_enabled(False)
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    inner = max(1, int(0.005 / max(once, 1e-7)))
    repeats = max(5, min(50, int(2.0 / max(once * inner, 1e-7))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return {"seconds": statistics.median(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="tiny,small,medium,long,vlong")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fresh.json")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    configs = args.configs.split(",")
    times: dict[str, dict[str, list[float]]] = {c: {i: [] for i in IMPLS} for c in configs}
    for r in range(args.rounds):
        for config in configs:
            order = IMPLS[r % len(IMPLS):] + IMPLS[:r % len(IMPLS)]
            for impl in order:
                if config == "vlong" and impl in ("numpy", "torch_module"):
                    continue  # both hold the 4 GiB score tensor
                out = subprocess.run([sys.executable, __file__, "--one", impl, config],
                                     capture_output=True, text=True, check=True)
                times[config][impl].append(json.loads(out.stdout)["seconds"])
                print(f"round {r + 1} {config:6s} {impl:16s} "
                      f"{times[config][impl][-1] * 1e3:9.3f} ms", file=sys.stderr)
    medians = {c: {i: statistics.median(t) for i, t in ts.items() if t} for c, ts in times.items()}
    rows, targets = [], []
    for config in configs:
        m = medians[config]
        best = min(m[i] for i in TORCH if i in m)
        rows.append([config] + [f"{m[i] * 1e3:.3f}" if i in m else "-" for i in IMPLS]
                    + [f"{m['mha_xp'] / best:.2f}", f"{m['mha_xp'] / m['numpy']:.2f}"
                       if "numpy" in m else "-"])
        peer, limit = TARGETS[config]
        ref = best if peer == "torch" else m[peer]
        targets.append({"config": config, "against": peer, "ratio": m["mha_xp"] / ref,
                        "limit": limit, "met": m["mha_xp"] / ref <= limit})
    print(table(rows, ["config", *IMPLS, "× torch best", "× numpy"]))
    for t in targets:
        print(f"{t['config']:6s} mha_xp / {t['against']}: {t['ratio']:.2f} "
              f"(target <= {t['limit']}: {'met' if t['met'] else 'missed'})")
    from threadpoolctl import threadpool_info

    blas = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for d in threadpool_info()]
    print(f"BLAS: {blas}")
    args.out.write_text(json.dumps({"machine": machine(), "blas": blas, "rounds": args.rounds,
                                    "times": times, "medians": medians, "targets": targets},
                                   indent=1))


if __name__ == "__main__":
    main()
