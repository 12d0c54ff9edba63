"""mha_xp over Dask: the same large batch on 1 and on 2 worker processes.

A ``dask.distributed.LocalCluster`` on loopback with ``n`` worker processes
of one thread each (Dask sets ``OMP_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1``
in its workers, so each worker uses one core) runs a self-attention layer
(float32, ``E``, ``H`` heads) over ``B`` sequences of length ``L``, chunked
along the batch. The input is drawn on the workers (``dask.array.random``),
as a dataset already distributed would be, and each sequence's result is
reduced to one number, so what is timed is attention, not moving arrays to
the client. Per configuration: one warm-up run, then the median of
``--repeats`` runs (cluster start-up excluded).

Reported: seconds per run, throughput (sequences per second), speed-up of
2 workers over 1, and each worker's peak resident memory during the timed
runs (``VmHWM`` after a reset of the kernel's peak mark, minus the resident
set before; ``ru_maxrss`` would carry the nanny's peak over the spawn).

Run ``python benchmarks/dask_workers.py [--batch 4096] [--chunk 64]
[--repeats 3]``; results go to ``benchmarks/results/dask_workers.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import _harness
from _harness import machine, table

import mha_xp

RESULTS = Path(__file__).resolve().parent / "results"


def _reset_peak() -> int:
    """In a worker: reset the peak-RSS mark, return the resident set now."""
    _harness.reset_peak()
    return _harness.rss()


def _peak() -> int:
    return _harness.peak()


def run(n_workers: int, args: argparse.Namespace) -> dict:
    import dask.array as da
    from dask.distributed import Client, LocalCluster

    layer = mha_xp.MultiHeadAttention(args.embed, args.heads, seed=0, dtype=np.float32).to(xp=da)
    shape = (args.batch, args.length, args.embed)
    x = da.random.default_rng(0).standard_normal(
        shape, chunks=(args.chunk, args.length, args.embed), dtype=np.float32)
    y = layer(x)
    per_sequence = da.mean(y * y, axis=(1, 2))

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("mha_xp"))  # imports out of the timing
        per_sequence[: args.chunk].compute()  # warm-up: one chunk
        before = client.run(_reset_peak)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = per_sequence.compute()
            times.append(time.perf_counter() - t0)
        peaks = client.run(_peak)
        threads = client.run(lambda: __import__("os").environ.get("OPENBLAS_NUM_THREADS"))
    assert np.all(np.isfinite(result))
    seconds = statistics.median(times)
    return {
        "workers": n_workers,
        "seconds": seconds,
        "all_seconds": times,
        "sequences_per_s": args.batch / seconds,
        "peak_extra_bytes_per_worker": sorted(peaks[w] - before[w] for w in peaks),
        "openblas_threads_per_worker": sorted(set(threads.values()), key=str),
        "checksum": float(np.sum(result)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64, help="sequences per chunk (task)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "dask_workers.json")
    args = parser.parse_args()

    runs = [run(n, args) for n in (1, 2)]
    assert abs(runs[0]["checksum"] - runs[1]["checksum"]) <= 1e-3 * abs(runs[0]["checksum"])
    speedup = runs[0]["seconds"] / runs[1]["seconds"]
    rows = [[str(r["workers"]), f"{r['seconds']:.2f}", f"{r['sequences_per_s']:.0f}",
             f"{runs[0]['seconds'] / r['seconds']:.2f}x",
             ", ".join(f"{b / 2**20:.0f}" for b in r["peak_extra_bytes_per_worker"])]
            for r in runs]
    print(f"mha_xp layer over Dask: B={args.batch} sequences, L={args.length}, E={args.embed}, "
          f"H={args.heads}, float32, {args.chunk} sequences per chunk "
          f"({args.batch // args.chunk} tasks), median of {args.repeats}")
    print(table(rows, ["workers", "s per run", "sequences/s", "speed-up", "peak extra MB per worker"]))
    report = {"config": vars(args) | {"out": str(args.out)}, "machine": machine(), "runs": runs,
              "speedup_2_over_1": speedup}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
