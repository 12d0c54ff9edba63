"""Serial against parallel: the CPU executor's gain, and where it starts to pay.

Times ``scaled_dot_product_attention`` (and, with ``--backward``, the
backward of ``attention_vjp``) on NumPy float32 inputs with
``num_threads=1`` and ``num_threads=N``, alternating, and prints the best of
``--repeat`` rounds of each. The planner's size threshold is lifted for the
run (``--all-sizes``) so that calls below it are measured too: that is how
``mha_xp._core._plan.PARALLEL_FROM`` was chosen.

Run it with the BLAS kernel the CPU supports, e.g.::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/parallel.py --all-sizes
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

import mha_xp
from mha_xp._core import _plan

SIZES = [  # (B, H, L, S, D)
    (1, 4, 64, 64, 32), (1, 4, 128, 128, 32), (2, 4, 128, 128, 32), (2, 8, 128, 128, 32),
    (2, 8, 128, 128, 64), (4, 8, 128, 128, 64), (2, 8, 256, 256, 64), (8, 8, 128, 128, 64),
    (2, 8, 512, 512, 64), (1, 8, 1024, 1024, 64), (1, 8, 4096, 4096, 64),
]


def _best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--all-sizes", action="store_true",
                        help="lift the planner's size threshold for the run")
    parser.add_argument("--backward", action="store_true", help="time the backward too")
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    if args.all_sizes:
        _plan.PARALLEL_FROM = 0
    rng = np.random.default_rng(0)
    print(f"threads={args.threads} causal={args.causal} PARALLEL_FROM=2**"
          f"{math.log2(max(1, _plan.PARALLEL_FROM)):.0f}")
    for B, H, L, S, D in SIZES:
        q, k, v = (rng.standard_normal(shape).astype(np.float32)
                   for shape in [(B, H, L, D), (B, H, S, D), (B, H, S, D)])
        work = B * H * L * S * 2 * D
        repeat = args.repeat if work < 2**31 else max(2, args.repeat // 3)
        best = {}
        for n in (1, args.threads):
            best[n] = [math.inf, math.inf]
        for _ in range(repeat):
            for n in (1, args.threads):
                forward = _best(lambda: mha_xp.scaled_dot_product_attention(
                    q, k, v, is_causal=args.causal, num_threads=n), 1)
                best[n][0] = min(best[n][0], forward)
                if args.backward:
                    out, backward = mha_xp.attention_vjp(q, k, v, is_causal=args.causal,
                                                         num_threads=n)
                    best[n][1] = min(best[n][1], _best(lambda: backward(out), 1))
        line = (f"{(B, H, L, S, D)!s:24} work 2**{math.log2(work):4.1f}  forward "
                f"{best[1][0] * 1e3:8.2f} -> {best[args.threads][0] * 1e3:8.2f} ms "
                f"({best[args.threads][0] / best[1][0]:.2f}x)")
        if args.backward:
            line += (f"  backward {best[1][1] * 1e3:8.2f} -> {best[args.threads][1] * 1e3:8.2f}"
                     f" ms ({best[args.threads][1] / best[1][1]:.2f}x)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
