"""Shared pieces of the benchmark scripts: interleaved timing, peak memory of
one call measured in a fresh process, machine description, progress."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# The repository root (for result files). The benchmarks time mha_xp as
# installed (``python -m pip install .``), like any other user of it.
ROOT = Path(__file__).resolve().parents[1]


def rss() -> int:
    """Resident set size of this process, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0). ``ru_maxrss`` cannot
    be used: it carries the parent's peak over fork and exec."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak() -> int:
    """Peak resident set size since the last :func:`reset_peak`, in bytes."""
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kib) * 1024


def peak_extra(fn: Callable[[], object]) -> int:
    """Bytes by which one call of ``fn`` raises the resident set at its peak."""
    before = rss()
    reset_peak()
    fn()
    return peak() - before


def in_fresh_process(script: str, *args: str) -> int:
    """Run ``python script --memory *args`` and return the int it prints last."""
    out = subprocess.run([sys.executable, script, "--memory", *args], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                progress: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call; one warm-up each, then ``repeats`` rounds in
    which every function runs once, so drifts in machine load hit all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress()
    return {name: statistics.median(t) for name, t in times.items()}


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int, label: str = "") -> None:
        self.total, self.done, self.label, self.start = total, 0, label, time.perf_counter()

    def step(self, what: str = "") -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{self.done}/{self.total} {elapsed:6.1f}s {what[:40]:40s}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def machine() -> dict[str, str]:
    """The machine, thread counts, BLAS and library versions."""
    import mha_xp

    info = {"python": platform.python_version(), "numpy": np.__version__,
            "mha_xp": mha_xp.__version__, "cores": str(os.cpu_count())}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        info["blas"] = "unknown"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = str(torch.get_num_threads())
    except ImportError:
        info["torch"] = "not installed"
    info["memory_budget_bytes"] = str(mha_xp.get_memory_budget())
    return info


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain fixed-width table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])
