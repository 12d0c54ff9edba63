"""Programmable attention on NumPy: what block masks save and what a score_mod costs.

(a) Document masking. Eight documents packed into 8192 tokens (B = 1, H = 8,
    D = 64, float32), each attending causally to itself only, through a
    ``mask_mod`` capturing the document ids and its block mask
    (``create_block_mask``, blocks of 128 and of 256): the chunked path skips
    the empty blocks and evaluates no ``mask_mod`` on the full ones. Against
    attending each document on its own (eight causal calls, the work that
    cannot be avoided), at the default threads and on one thread, and, for
    reference, against ``cu_seqlens_q=`` with
    ``is_causal=True`` (the built-in equivalent) and the ``mask_mod`` without
    a block mask. Two layouts: documents of 1024 tokens (aligned with the
    blocks) and of uneven lengths. Target: block mask / separate <= 1.3.
(b) A score_mod whose bias is computed per block from captured (L,)-sized
    arrays, never an (L, S) one: ``-|t_q - t_k| + u_k`` from timestamps ``t``
    and per-key offsets ``u`` (L = S = 4096, B = 1, H = 8, D = 64, float32),
    against the same attention without it, with and without ``is_causal``.
    Target: with / without <= 1.3.

Each pair is timed interleaved in one process after a warm-up (medians of
the repeats); the results are checked against each other first. Run
``python benchmarks/flex.py`` (``--repeats N``, ``--quick`` for 2 repeats
and one block size); it prints the tables and the ratios, and writes
``benchmarks/results/flex.json`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _harness import ROOT, Progress, interleaved, machine, table

import mha_xp

H, D = 8, 64
DOC_TOKENS = 8192
LAYOUTS = {  # name: the eight documents' lengths
    "aligned": [1024] * 8,
    "uneven": [1536, 512, 1200, 848, 1024, 900, 1124, 1048],
}
BLOCK_SIZES = (128, 256)
BIAS_L = 4096
TARGET = 1.3


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def document_case(lengths: list[int], block: int, seed: int = 0):
    """The callables of part (a) and the error of the block-masked result."""
    assert sum(lengths) == DOC_TOKENS
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, H, DOC_TOKENS, D)).astype(np.float32) for _ in range(3))
    doc = np.repeat(np.arange(len(lengths)), lengths)
    ends = np.cumsum([0] + lengths)
    cu = [int(e) for e in ends]

    def document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = mha_xp.create_block_mask(document, None, None, DOC_TOKENS, DOC_TOKENS,
                                          block_size=block)
    sdpa = mha_xp.scaled_dot_product_attention
    def separate():
        return [sdpa(q[..., a:e, :], k[..., a:e, :], v[..., a:e, :], is_causal=True)
                for a, e in zip(ends, ends[1:])]

    def one_thread(f):
        def run():
            with mha_xp.num_threads(1):
                return f()
        return run

    fns = {
        "block_mask": lambda: sdpa(q, k, v, block_mask=block_mask),
        "separate": separate,
        "cu_seqlens": lambda: sdpa(q, k, v, cu_seqlens_q=cu, is_causal=True),
        # The same two on one thread (the parallel executor off).
        "block_mask_1t": one_thread(lambda: sdpa(q, k, v, block_mask=block_mask)),
        "separate_1t": one_thread(separate),
    }
    alone = np.concatenate(fns["separate"](), axis=-2)
    err = max(_rel(fns["block_mask"](), alone), _rel(fns["cu_seqlens"](), alone))
    return fns, block_mask, err, (q, k, v, document)


def bias_case(is_causal: bool, seed: int = 0):
    """The callables of part (b) and the error against a bias given as an array
    (checked on the first 512 queries, where the (L, S) bias is small)."""
    rng = np.random.default_rng(seed)
    L = BIAS_L
    q, k, v = (rng.standard_normal((1, H, L, D)).astype(np.float32) for _ in range(3))
    t = np.sort(rng.random(L).astype(np.float32)) * 8.0       # irregular timestamps
    u = (0.5 * rng.standard_normal(L)).astype(np.float32)      # per-key offsets

    def time_bias(score, b, h, q_idx, kv_idx):
        tq = t[q_idx[0, 0, :, 0]][:, None]                     # (Lb, 1)
        tk = t[kv_idx[0, 0, 0, :]][None, :]                    # (1, Sb)
        return score + (u[kv_idx[0, 0, 0, :]][None, :] - np.abs(tq - tk))  # (Lb, Sb) term

    sdpa = mha_xp.scaled_dot_product_attention
    fns = {
        "score_mod": lambda: sdpa(q, k, v, score_mod=time_bias, is_causal=is_causal),
        "plain": lambda: sdpa(q, k, v, is_causal=is_causal),
    }
    n = 512
    bias = (u[None, :] - np.abs(t[:n, None] - t[None, :])).astype(np.float32)
    mask = None
    if is_causal:  # the first n queries of L = S: rows 0..n-1
        mask = np.arange(n)[:, None] >= np.arange(L)[None, :]
    want = sdpa(q[..., :n, :], k, v, bias=bias, mask=mask)
    got = fns["score_mod"]()[..., :n, :]
    return fns, _rel(got, want)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats, blocks of 128 only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "flex.json")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    blocks = BLOCK_SIZES[:1] if args.quick else BLOCK_SIZES

    report = {"machine": machine(), "dtype": "float32", "target_ratio": TARGET,
              "documents": {}, "score_mod_bias": {}}
    doc_rows = []
    for layout, lengths in LAYOUTS.items():
        for block in blocks:
            fns, block_mask, err, (q, k, v, document) = document_case(lengths, block)
            name = f"{layout}/block{block}"
            bar = Progress(repeats, f"(a) {name:18s}")
            times = interleaved(fns, repeats, progress=bar.step)
            # mask_mod without a block mask (every block evaluated, none skipped):
            # once, it is slow; it shows what the block mask saves.
            t0 = time.perf_counter()
            mha_xp.scaled_dot_product_attention(q, k, v, mask_mod=document,
                                                chunk_size=(block, block))
            times["mask_mod_only"] = time.perf_counter() - t0
            ratio = times["block_mask"] / times["separate"]
            report["documents"][name] = {
                "lengths": lengths, "block_size": block, "sparsity": block_mask.sparsity(),
                "seconds": times, "ratio_block_mask_vs_separate": ratio,
                "ratio_cu_seqlens_vs_separate": times["cu_seqlens"] / times["separate"],
                "ratio_block_mask_vs_separate_one_thread":
                    times["block_mask_1t"] / times["separate_1t"],
                "rel_err_vs_separate": err}
            doc_rows.append((name, f"{block_mask.sparsity():.3f}",
                             *(f"{times[n] * 1e3:.0f}" for n in
                               ("block_mask", "separate", "cu_seqlens", "mask_mod_only")),
                             f"{ratio:.2f}", "yes" if ratio <= TARGET else "NO",
                             f"{times['block_mask_1t'] * 1e3:.0f}",
                             f"{times['separate_1t'] * 1e3:.0f}",
                             f"{times['block_mask_1t'] / times['separate_1t']:.2f}", f"{err:.1e}"))
    bias_rows = []
    for causal in (False, True):
        fns, err = bias_case(causal)
        name = f"L{BIAS_L}" + ("-causal" if causal else "")
        bar = Progress(repeats, f"(b) {name:18s}")
        times = interleaved(fns, repeats, progress=bar.step)
        ratio = times["score_mod"] / times["plain"]
        report["score_mod_bias"][name] = {"L": BIAS_L, "is_causal": causal, "seconds": times,
                                          "ratio_score_mod_vs_plain": ratio,
                                          "rel_err_vs_bias_array": err}
        bias_rows.append((name, f"{times['score_mod'] * 1e3:.0f}", f"{times['plain'] * 1e3:.0f}",
                          f"{ratio:.2f}", "yes" if ratio <= TARGET else "NO", f"{err:.1e}"))

    print("machine:", ", ".join(f"{k}={v}" for k, v in report["machine"].items()))
    print(f"\n(a) document mask, 8 documents in {DOC_TOKENS} tokens, B=1, H={H}, D={D}, "
          f"float32, median ms ({repeats} repeats; mask_mod_only: one call)")
    print(table(doc_rows, ("layout/block", "sparsity", "block_mask", "separate", "cu_seqlens",
                           "mask_mod_only", "ratio", f"<= {TARGET}", "bm 1 thr", "sep 1 thr",
                           "ratio 1 thr", "rel err")))
    print(f"\n(b) score_mod bias from captured (L,) arrays, L=S={BIAS_L}, B=1, H={H}, D={D}, "
          f"float32, median ms")
    print(table(bias_rows, ("config", "score_mod", "plain", "ratio", f"<= {TARGET}", "rel err")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
