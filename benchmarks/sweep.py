"""Time and memory against sequence length: mha_xp (NumPy) and PyTorch.

Self-attention through the layer, B = 1, E = 256, H = 4, float32, L = S from
256 to 8192: median time of interleaved calls for mha_xp, torch
``nn.MultiheadAttention`` (eval fast path), ``F.multi_head_attention_forward``
and torch SDPA with the same projections, and the peak extra memory of one
call of each in a fresh process. Writes ``benchmarks/results/sweep.json`` and
the plot ``docs/_static/sweep.png`` used by the docs' performance page.

Run ``python benchmarks/sweep.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _harness import ROOT, Progress, in_fresh_process, interleaved, machine, peak_extra, table

import long_sequences as ls

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
E, H = 256, 4
LABELS = {"mha_xp": "mha_xp (NumPy)", "torch_module": "torch nn.MultiheadAttention",
          "torch_functional": "torch F.multi_head_attention_forward",
          "torch_sdpa": "torch SDPA + projections"}


def case(L: int):
    ls.CONFIGS[f"L{L}"] = (1, L, E, H)
    return ls.make_case(f"L{L}")


def plot(report: dict) -> None:
    """Draw time and memory against L from a report (as written to sweep.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(L) for L in report["lengths"]]
    seconds = {int(L): v for L, v in report["seconds"].items()}
    memory = {int(L): v for L, v in report["peak_extra_bytes"].items()}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for impl in ls.IMPLS:
        ax_t.plot(lengths, [seconds[L][impl] for L in lengths], "o-", label=LABELS[impl])
        ax_m.plot(lengths, [max(memory[L][impl], 1) / 1e6 for L in lengths], "o-", label=LABELS[impl])
    ax_t.set(xlabel="sequence length L = S", ylabel="seconds per call", title="time")
    ax_m.set(xlabel="sequence length L = S", ylabel="peak extra memory (MB)", title="memory")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, labels=[str(L) for L in lengths])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"self-attention layer, B=1, E={E}, H={H}, float32, {m['cores']} cores "
                 f"({m['cpu']}), numpy {m['numpy']}, torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    png = ROOT / "docs" / "_static" / "sweep.png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the plot from benchmarks/results/sweep.json")
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((ROOT / "benchmarks" / "results" / "sweep.json").read_text()))
        return 0
    if args.memory:
        import torch

        L, impl = int(args.memory[0]), args.memory[1]
        fn = ls.runner(impl, *case(L))
        with torch.no_grad():
            print(peak_extra(fn))
        return 0

    import torch

    report = {"machine": machine(), "shape": {"B": 1, "E": E, "H": H}, "dtype": "float32",
              "lengths": list(LENGTHS), "seconds": {}, "peak_extra_bytes": {}}
    bar = Progress(len(LENGTHS) * (1 + len(ls.IMPLS)), "sweep")
    for L in LENGTHS:
        fns = {impl: ls.runner(impl, *case(L)) for impl in ls.IMPLS}
        with torch.no_grad():
            report["seconds"][L] = interleaved(fns, args.repeats)
        bar.step(f"L={L} timing")
        report["peak_extra_bytes"][L] = {}
        for impl in ls.IMPLS:
            report["peak_extra_bytes"][L][impl] = in_fresh_process(__file__, str(L), impl)
            bar.step(f"L={L} memory {impl}")
    rows = [(L, *(f"{report['seconds'][L][i] * 1e3:.1f}" for i in ls.IMPLS),
             *(f"{report['peak_extra_bytes'][L][i] / 1e6:.0f}" for i in ls.IMPLS)) for L in LENGTHS]
    print(table(rows, ("L", *(f"{i} ms" for i in ls.IMPLS), *(f"{i} MB" for i in ls.IMPLS))))
    out = ROOT / "benchmarks" / "results" / "sweep.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")

    plot(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
