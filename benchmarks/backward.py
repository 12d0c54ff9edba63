"""Forward + backward: mha_xp's gradients on NumPy against PyTorch autograd.

For each configuration (float32, self-attention, projections included), one
training step's worth of work is timed, interleaved in one process after a
warm-up: mha_xp ``layer.vjp(x)`` then ``backward(dy)`` on NumPy, against
``torch.nn.MultiheadAttention`` and ``F.multi_head_attention_forward`` (which
routes through the fused SDPA kernel) with ``y.backward(dy)``. Then the peak
extra memory of forward + backward at a long sequence is measured for each in
a fresh process.

Run ``python benchmarks/backward.py``; it prints a table and writes
``benchmarks/results/backward.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _harness import ROOT, Progress, in_fresh_process, interleaved, machine, peak_extra, table

import mha_xp

CONFIGS = {  # name: (B, L, E, H)
    "small": (32, 128, 256, 8),
    "medium": (8, 512, 512, 8),
    "long": (1, 4096, 512, 8),
}
MEMORY_CONFIG = ("L8192-E256-H4", (1, 8192, 256, 4))
IMPLS = ("mha_xp", "torch_module", "torch_functional")


def make_case(shape: tuple[int, int, int, int], seed: int = 0):
    import torch

    B, L, E, H = shape
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(E, H, batch_first=True)
    layer = mha_xp.MultiHeadAttention.from_torch(module)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    dy = rng.standard_normal((B, L, E)).astype(np.float32)
    return module, layer, x, dy


def runner(impl: str, module, layer, x, dy):
    """A callable doing one forward and one backward."""
    import torch
    import torch.nn.functional as F

    if impl == "mha_xp":
        def step():
            _, backward = layer.vjp(x)
            return backward(dy)
        return step
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    E, H = module.embed_dim, module.num_heads

    def zero():
        xt.grad = None
        for p in module.parameters():
            p.grad = None

    if impl == "torch_module":
        def step():
            zero()
            module(xt, xt, xt, need_weights=False)[0].backward(dyt)
        return step
    if impl == "torch_functional":
        def step():
            zero()
            xs = xt.transpose(0, 1)
            y = F.multi_head_attention_forward(
                xs, xs, xs, E, H, module.in_proj_weight, module.in_proj_bias, None, None, False,
                0.0, module.out_proj.weight, module.out_proj.bias, training=True,
                need_weights=False)[0]
            y.transpose(0, 1).backward(dyt)
        return step
    raise ValueError(impl)


def check_against_torch(module, layer, x, dy) -> float:
    """Worst relative error of mha_xp's float32 gradients against torch's."""
    import torch

    grads = runner("mha_xp", module, layer, x, dy)()
    xt = torch.from_numpy(x).requires_grad_(True)
    module.zero_grad()
    module(xt, xt, xt, need_weights=False)[0].backward(torch.from_numpy(dy))
    ref = {"query": xt.grad} | {n: p.grad for n, p in module.named_parameters()}
    return max(float(np.linalg.norm(grads[n] - r.numpy()) / np.linalg.norm(r.numpy()))
               for n, r in ref.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backward.json")
    parser.add_argument("--memory", nargs=1, metavar="IMPL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(peak_extra(runner(args.memory[0], *make_case(MEMORY_CONFIG[1]))))
        return 0

    report = {"machine": machine(), "dtype": "float32", "timing": {}, "memory": {}}
    rows = []
    for name, shape in CONFIGS.items():
        case = make_case(shape)
        err = check_against_torch(*case)
        bar = Progress(args.repeats, f"{name:6s} forward+backward")
        times = interleaved({impl: runner(impl, *case) for impl in IMPLS}, args.repeats,
                            progress=bar.step)
        report["timing"][name] = {"shape_B_L_E_H": shape, "seconds": times,
                                  "worst_grad_rel_err_vs_torch": err}
        best = min(times["torch_module"], times["torch_functional"])
        rows.append((name, str(shape), *(f"{times[i] * 1e3:.1f}" for i in IMPLS),
                     f"{times['mha_xp'] / times['torch_module']:.2f}",
                     f"{times['mha_xp'] / times['torch_functional']:.2f}",
                     f"{times['mha_xp'] / best:.2f}", f"{err:.1e}"))
    bar = Progress(len(IMPLS), f"{MEMORY_CONFIG[0]} memory")
    for impl in IMPLS:
        report["memory"][impl] = in_fresh_process(__file__, impl)
        bar.step(impl)
    print("machine:", ", ".join(f"{k}={v}" for k, v in report["machine"].items()))
    print("\nforward + backward, float32, median ms")
    print(table(rows, ("config", "(B, L, E, H)", "mha_xp", "nn.MHA", "F.mha", "x nn.MHA", "x F.mha",
                       "x best", "grad err")))
    mem = report["memory"]
    print(f"\npeak extra memory of forward + backward at {MEMORY_CONFIG[0]} (fresh process each):")
    print(table([(impl, f"{mem[impl] / 1e6:.0f}", f"{mem[impl] / mem['torch_module']:.2f}",
                  f"{mem[impl] / mem['torch_functional']:.2f}") for impl in IMPLS],
                ("impl", "MB", "x nn.MHA", "x F.mha")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
