"""Long sequences: mha_xp's chunked path against PyTorch, side by side.

Times a self-attention layer (projections included) on NumPy float32 against
``torch.nn.MultiheadAttention`` (eval fast path), ``torch.nn.functional.
multi_head_attention_forward`` and torch's fused ``scaled_dot_product_attention``
with the same projections, all with the same weights, interleaved in one
process after a warm-up (medians of repeats). Peak extra memory is measured for
each case in a fresh process (peak RSS during the call minus RSS before it).
The largest case (L = 65536) runs mha_xp only, the dense path being out of
reach (64 GiB of scores), and checks sampled rows against a float64 reference.

Run ``python benchmarks/long_sequences.py`` (``--quick`` skips L = 65536);
it prints a table and writes ``benchmarks/results/long_sequences.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _harness import ROOT, Progress, in_fresh_process, interleaved, machine, peak, peak_extra, reset_peak, rss

import mha_xp

CONFIGS = {  # name: (B, L, E, H)
    "L4096-E512-H8": (1, 4096, 512, 8),
    "L16384-E256-H4": (1, 16384, 256, 4),
}
HUGE = ("L65536-E256-H4", (1, 65536, 256, 4))
IMPLS = ("mha_xp", "torch_module", "torch_functional", "torch_sdpa")
TARGETS = {  # issue 3: (max ratio to nn.MHA, max ratio to F.mha_forward, max peak MB)
    "L4096-E512-H8": (1.0, 1.5, 200),
    "L16384-E256-H4": (1.0, 2.0, 400),
}


def make_case(config: str, seed: int = 0):
    """The torch module, the mha_xp port, and the input in both libraries."""
    import torch

    B, L, E, H = CONFIGS.get(config) or dict([HUGE])[config]
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():
        module.in_proj_bias.normal_(0, 0.1)
        module.out_proj.bias.normal_(0, 0.1)
    layer = mha_xp.MultiHeadAttention.from_torch(module)
    x = np.random.default_rng(seed).standard_normal((B, L, E)).astype(np.float32)
    return module, layer, x, torch.from_numpy(x)


def runner(impl: str, module, layer, x, xt):
    """A zero-argument callable running one implementation once."""
    import torch
    import torch.nn.functional as F

    E, H = module.embed_dim, module.num_heads
    if impl == "mha_xp":
        return lambda: layer(x)
    if impl == "torch_module":
        return lambda: module(xt, xt, xt, need_weights=False)[0]
    if impl == "torch_functional":
        xs = xt.transpose(0, 1)
        return lambda: F.multi_head_attention_forward(
            xs, xs, xs, E, H, module.in_proj_weight, module.in_proj_bias, None, None, False,
            0.0, module.out_proj.weight, module.out_proj.bias, training=False,
            need_weights=False)[0]
    if impl == "torch_sdpa":
        def sdpa():
            B, L, _ = xt.shape
            qkv = F.linear(xt, module.in_proj_weight, module.in_proj_bias)
            q, k, v = qkv.view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v)
            return F.linear(o.transpose(1, 2).reshape(B, L, E), module.out_proj.weight,
                            module.out_proj.bias)
        return sdpa
    raise ValueError(impl)


def measure_memory(config: str, impl: str) -> int:
    """Peak extra bytes of one call, in this (fresh) process."""
    import torch

    module, layer, x, xt = make_case(config)
    fn = runner(impl, module, layer, x, xt)
    with torch.no_grad():
        return peak_extra(fn)


def memory_in_fresh_process(config: str, impl: str) -> int:
    return in_fresh_process(__file__, config, impl)


def time_config(config: str, repeats: int) -> dict[str, float]:
    """Median seconds per call of every implementation, interleaved."""
    import torch

    module, layer, x, xt = make_case(config)
    fns = {impl: runner(impl, module, layer, x, xt) for impl in IMPLS}
    with torch.no_grad():
        ref = fns["torch_functional"]().transpose(0, 1).numpy()  # (L, B, E) -> (B, L, E)
        ours = fns["mha_xp"]()
        err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
        bar = Progress(repeats, f"{config} timing")
        result = interleaved(fns, repeats, progress=bar.step)
    result["rel_err_vs_torch"] = err
    return result


def huge_case(samples: int = 8) -> dict[str, float]:
    """L = 65536 on mha_xp only, checked on sampled rows in float64."""
    module, layer, x, _ = make_case(HUGE[0])
    before = rss()
    reset_peak()
    t0 = time.perf_counter()
    y = layer(x)
    seconds = time.perf_counter() - t0
    peak_bytes = peak() - before
    sd = {n: np.asarray(w, dtype=np.float64) for n, w in layer.state_dict().items()}
    E, H = layer.embed_dim, layer.num_heads
    d = E // H
    x64 = x[0].astype(np.float64)
    wq, wk, wv = np.split(sd["in_proj_weight"], 3)
    bq, bk, bv = np.split(sd["in_proj_bias"], 3)
    rows = np.random.default_rng(1).choice(x.shape[1], samples, replace=False)
    q = x64[rows] @ wq.T + bq
    k = x64 @ wk.T + bk
    v = x64 @ wv.T + bv
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        s = q[:, sl] @ k[:, sl].T / np.sqrt(d)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        heads.append((p / p.sum(axis=1, keepdims=True)) @ v[:, sl])
    ref = np.concatenate(heads, axis=1) @ sd["out_proj.weight"].T + sd["out_proj.bias"]
    err = float(np.linalg.norm(y[0, rows] - ref) / np.linalg.norm(ref))
    return {"seconds": seconds, "peak_extra_bytes": peak_bytes, "sampled_rows": samples,
            "rel_err_sampled_vs_float64": err}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip L = 65536")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_sequences.json")
    parser.add_argument("--memory", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(measure_memory(*args.memory))
        return 0

    report = {"machine": machine(), "dtype": "float32", "configs": {}}
    print("machine:", ", ".join(f"{k}={v}" for k, v in report["machine"].items()))
    for config in CONFIGS:
        times = time_config(config, args.repeats)
        bar = Progress(len(IMPLS), f"{config} memory")
        memory = {}
        for impl in IMPLS:
            memory[impl] = memory_in_fresh_process(config, impl)
            bar.step(impl)
        report["configs"][config] = {"seconds": times, "peak_extra_bytes": memory}

    header = f"{'config':16s} {'impl':17s} {'time':>9s} {'peak MB':>9s} {'x nn.MHA':>9s} {'x F.mha':>8s} {'x SDPA':>7s}"
    print("\n" + header + "\n" + "-" * len(header))
    ok = True
    for config, r in report["configs"].items():
        t, m = r["seconds"], r["peak_extra_bytes"]
        for impl in IMPLS:
            print(f"{config:16s} {impl:17s} {t[impl]:8.3f}s {m[impl] / 1e6:9.1f} "
                  f"{t[impl] / t['torch_module']:9.2f} {t[impl] / t['torch_functional']:8.2f} "
                  f"{t[impl] / t['torch_sdpa']:7.2f}")
        max_mod, max_fun, max_mb = TARGETS[config]
        checks = {
            f"time <= {max_mod} x nn.MHA": t["mha_xp"] / t["torch_module"] <= max_mod,
            f"time <= {max_fun} x F.mha": t["mha_xp"] / t["torch_functional"] <= max_fun,
            f"peak <= {max_mb} MB": m["mha_xp"] / 1e6 <= max_mb,
        }
        r["targets"] = checks
        ok &= all(checks.values())
        print(f"{'':16s} targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in checks.items())
              + f"; rel. error vs torch {t['rel_err_vs_torch']:.1e}")
    if not args.quick:
        print(f"\n{HUGE[0]}: running mha_xp only ...", flush=True)
        huge = huge_case()
        report["configs"][HUGE[0]] = huge
        print(f"{HUGE[0]:16s} mha_xp {huge['seconds']:8.1f}s, peak {huge['peak_extra_bytes'] / 1e6:.0f} MB, "
              f"rel. error on {huge['sampled_rows']} sampled rows vs float64: "
              f"{huge['rel_err_sampled_vs_float64']:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
