"""mha_xp on a CUDA GPU: the CuPy test suite, then mha_xp on CuPy against PyTorch.

One call does everything and writes its results under ``OUTDIR``::

    python3 benchmarks/gpu.py OUTDIR

1. Runs the test suite on the CuPy backend
   (``MHA_XP_BACKENDS=cupy MHA_XP_REQUIRE=cupy python -m pytest -q -x``,
   in a subprocess; log in ``OUTDIR/tests.log``). ``--skip-tests`` skips it.
2. Times a self-attention layer, projections included (B = 1, E = 1024,
   H = 16, so head dim 64; L = S from 512 to 16384), float32 and float16,
   with the same weights and input everywhere:

   ``mha_xp``
       ``mha_xp.MultiHeadAttention`` on CuPy arrays (default memory budget:
       the chunked path once the dense scores exceed 128 MiB).
   ``mha_xp dense``
       The same with ``memory_budget=8 GiB`` (dense scores while they fit).
   ``nn.MHA``
       ``torch.nn.MultiheadAttention`` (eval, ``no_grad``,
       ``need_weights=False``).
   ``F.mha``
       ``torch.nn.functional.multi_head_attention_forward`` (``need_weights=False``).
   ``SDPA``
       ``F.linear`` projections around ``F.scaled_dot_product_attention``,
       the kernel torch picks.
   ``flash``
       The same inside ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` (float16
       only: flash has no float32 kernel).

   Timing: CUDA events (``cupy.cuda.Event`` for CuPy, ``torch.cuda.Event``
   for torch), the device synchronised before each sample; 3 warm-up calls
   each, then rounds in which every implementation runs once (the order
   rotates); medians. TF32 is off on both sides: CuPy's default (the script
   refuses ``CUPY_TF32``), and ``torch.backends.cuda.matmul.allow_tf32 =
   False``. (torch's fused SDPA kernels pick their own arithmetic; flash runs
   in float16 only.) Peak extra device memory of one call: torch's
   ``max_memory_allocated`` and, for CuPy, a memory-pool hook. Each output is
   compared with ``nn.MHA``'s.
3. Writes ``OUTDIR/gpu.md`` (the table, in Markdown) and ``OUTDIR/gpu.json``
   (everything, with the card, driver and library versions), and prints the
   table and issue 6's GPU target (mha_xp ≤ 1.0× ``nn.MHA`` at L = 4096).

Dependencies: CuPy, PyTorch with CUDA and NumPy. array-api-compat (and
array-api-strict, which a few tests import) may be absent: pure-Python wheels
placed in ``.whl/`` at the root of the checkout (or ``--wheels DIR``) are
unpacked into a temporary directory and put on the path, for this process and
for the test run. Nothing is downloaded. Without a CUDA device the script
stops with a message, not a traceback (exit status 2).

``--dry-run`` runs the benchmark's logic on the CPU (NumPy instead of CuPy,
torch on the CPU, wall-clock timing, tiny sizes) to check the script itself
where there is no GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIRS = (ROOT / ".whl", ROOT / "wheels")
B, E, H = 1, 1024, 16
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (512, 4096)
DTYPES = ("float32", "float16")
DENSE_BUDGET = 8 * 2**30
IMPLS = ("mha_xp", "mha_xp_dense", "torch_module", "torch_functional", "torch_sdpa", "torch_flash")
LABELS = {"mha_xp": "mha_xp", "mha_xp_dense": "mha_xp dense", "torch_module": "nn.MHA",
          "torch_functional": "F.mha", "torch_sdpa": "SDPA", "torch_flash": "flash"}
TARGET_L = 4096


class Unavailable(Exception):
    """A missing GPU or library: reported as a message, not a traceback."""


def say(*parts: Any) -> None:
    print(*parts, flush=True)


# -- dependencies ---------------------------------------------------------------


_REEXEC = "MHA_XP_GPU_BENCH_PATH"


def unpack_wheels(dirs: list[Path]) -> list[str]:
    """Unpack the pure-Python wheels of ``dirs`` whose package is not
    importable into a temporary directory and return it, with the checkout
    when mha_xp itself is not importable: the ``PYTHONPATH`` entries this
    script and its test run need (see :func:`reexec_with`)."""
    wheels = sorted(w for d in dirs if d.is_dir() for w in d.glob("*.whl"))
    missing = []
    for w in wheels:
        module = w.name.split("-", 1)[0].replace("-", "_").lower()
        if importlib.util.find_spec(module) is None:
            missing.append(w)
    extra = [] if importlib.util.find_spec("mha_xp") is not None else [str(ROOT)]
    if not missing:
        return extra
    target = Path(tempfile.mkdtemp(prefix="mha_xp_wheels_"))
    for w in missing:
        with zipfile.ZipFile(w) as z:
            z.extractall(target)
        say(f"using {w.name} (unpacked into {target})")
    return [str(target), *extra]


def reexec_with(extra_path: list[str]) -> None:
    """Run this script again with ``extra_path`` in front of ``PYTHONPATH``
    (once), rather than editing ``sys.path`` of a running interpreter."""
    if not extra_path or os.environ.get(_REEXEC):
        return
    env = dict(os.environ, **{_REEXEC: os.pathsep.join(extra_path)})
    env["PYTHONPATH"] = os.pathsep.join([*extra_path, *filter(None, [env.get("PYTHONPATH")])])
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def require_modules() -> None:
    for module, hint in (("numpy", "python -m pip install numpy"),
                         ("array_api_compat",
                          "place its pure-Python wheel in .whl/ at the root of the checkout "
                          "(python3 -m pip download --no-deps --only-binary=:all: -d .whl "
                          "array-api-compat array-api-strict) or pass --wheels DIR")):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not importable: {hint}")


def open_gpu() -> tuple[Any, Any]:
    """Import CuPy and torch and check that both see a CUDA device."""
    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        raise Unavailable("CUPY_TF32 is set: unset it, the comparison is without TF32 on both sides")
    try:
        import cupy
    except ImportError as exc:
        raise Unavailable(f"CuPy is not installed ({exc}); this script needs CuPy and a CUDA GPU "
                          f"(use --dry-run to check the script on a CPU)") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver or device
        raise Unavailable(f"no CUDA device: CuPy says {type(exc).__name__}: {exc}") from None
    if count < 1:
        raise Unavailable("no CUDA device: CuPy sees 0 devices")
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"PyTorch is not installed ({exc})") from None
    if not torch.cuda.is_available():
        raise Unavailable(f"PyTorch {torch.__version__} sees no CUDA device (a CPU-only build?)")
    return cupy, torch


# -- the test suite ---------------------------------------------------------------


def run_tests(out_dir: Path, extra_path: list[str], timeout: int) -> dict[str, Any]:
    """The test suite on the CuPy backend, in a subprocess; the log in ``tests.log``."""
    env = dict(os.environ, MHA_XP_BACKENDS="cupy", MHA_XP_REQUIRE="cupy")
    env["PYTHONPATH"] = os.pathsep.join(
        [*extra_path, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    say(f"\ntests: MHA_XP_BACKENDS=cupy MHA_XP_REQUIRE=cupy {' '.join(cmd[1:])}  (log: tests.log)")
    log = out_dir / "tests.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    lines = log.read_text(errors="replace").strip().splitlines()
    summary = next((ln.strip("= ") for ln in reversed(lines)
                    if any(w in ln for w in ("passed", "failed", "error", "no tests ran"))), "")
    if rc is None:
        summary = f"timed out after {timeout} s; last line: {lines[-1] if lines else ''}"
    result = {"command": " ".join(["MHA_XP_BACKENDS=cupy", "MHA_XP_REQUIRE=cupy", *cmd[1:]]),
              "returncode": rc, "summary": summary, "seconds": time.perf_counter() - t0}
    say(f"tests: {summary} (exit {rc}, {result['seconds']:.0f} s)")
    return result


# -- the benchmark ----------------------------------------------------------------


class Backends:
    """The array library and torch device under test, and how to time them."""

    def __init__(self, dry_run: bool) -> None:
        import numpy as np
        import torch

        self.np, self.torch, self.dry_run = np, torch, dry_run
        if dry_run:
            self.xp, self.dev = np, "cpu"
        else:
            import cupy

            self.xp, self.dev = cupy, "cuda"
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")

    def sync(self) -> None:
        if not self.dry_run:
            self.xp.cuda.Device().synchronize()
            self.torch.cuda.synchronize()

    def time_call(self, fn: Callable[[], Any], lib: str) -> float:
        """Seconds of one call: CUDA events on the library's own stream."""
        self.sync()
        if self.dry_run:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        if lib == "cupy":
            start, end = self.xp.cuda.Event(), self.xp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return self.xp.cuda.get_elapsed_time(start, end) / 1e3
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def peak_bytes(self, fn: Callable[[], Any], lib: str) -> int | None:
        """Peak extra device memory of one call (None in a dry run)."""
        if self.dry_run:
            return None
        self.sync()
        if lib == "cupy":
            cupy = self.xp

            class Peak(cupy.cuda.MemoryHook):
                name = "mha_xp_peak"

                def __init__(self) -> None:
                    self.now = self.peak = 0

                def malloc_postprocess(self, **kw: Any) -> None:
                    self.now += kw["mem_size"]
                    self.peak = max(self.peak, self.now)

                def free_postprocess(self, **kw: Any) -> None:
                    self.now -= kw["mem_size"]

            hook = Peak()
            with hook:
                out = fn()
                self.sync()
            del out
            return hook.peak
        torch = self.torch
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak

    def free(self) -> None:
        if not self.dry_run:
            self.xp.get_default_memory_pool().free_all_blocks()
            self.torch.cuda.empty_cache()

    def is_oom(self, exc: BaseException) -> bool:
        return "out of memory" in str(exc).lower() or type(exc).__name__ in (
            "OutOfMemoryError", "OutOfMemoryError_")


def build(bk: Backends, L: int, dtype: str) -> dict[str, tuple[Callable[[], Any], str]]:
    """The implementations for one case: ``name: (callable, library)``."""
    import mha_xp

    np, torch, xp = bk.np, bk.torch, bk.xp
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    b_in, b_out = math.sqrt(6.0 / (4 * E)), 1.0 / math.sqrt(E)
    sd = {"in_proj_weight": rng.uniform(-b_in, b_in, (3 * E, E)),
          "in_proj_bias": rng.normal(0.0, 0.1, 3 * E),
          "out_proj.weight": rng.uniform(-b_out, b_out, (E, E)),
          "out_proj.bias": rng.normal(0.0, 0.1, E)}
    x = np.random.default_rng(1).standard_normal((B, L, E))

    layer = mha_xp.MultiHeadAttention.from_state_dict(
        {n: xp.asarray(w.astype(dtype)) for n, w in sd.items()}, num_heads=H)
    xc = xp.asarray(x.astype(dtype))
    tdt = getattr(torch, dtype)
    module = torch.nn.MultiheadAttention(E, H, batch_first=True, device=bk.dev, dtype=tdt).eval()
    module.load_state_dict({n: torch.from_numpy(w) for n, w in sd.items()})  # copy_ casts
    xt = torch.from_numpy(x).to(device=bk.dev, dtype=tdt)
    xs = xt.transpose(0, 1)
    w_in, bias_in = module.in_proj_weight, module.in_proj_bias
    w_out, bias_out = module.out_proj.weight, module.out_proj.bias
    D = E // H

    def sdpa():
        q, k, v = F.linear(xt, w_in, bias_in).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return F.linear(o.transpose(1, 2).reshape(B, L, E), w_out, bias_out)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa()

    return {
        "mha_xp": (lambda: layer(xc), "cupy"),
        "mha_xp_dense": (lambda: layer(xc, memory_budget=DENSE_BUDGET), "cupy"),
        "torch_module": (lambda: module(xt, xt, xt, need_weights=False)[0], "torch"),
        "torch_functional": (lambda: F.multi_head_attention_forward(
            xs, xs, xs, E, H, w_in, bias_in, None, None, False, 0.0, w_out, bias_out,
            training=False, need_weights=False)[0].transpose(0, 1), "torch"),
        "torch_sdpa": (sdpa, "torch"),
        "torch_flash": (flash, "torch"),
    }


def to_host(bk: Backends, y: Any) -> Any:
    if hasattr(y, "detach"):
        return y.detach().float().cpu().numpy().astype("float64")
    if not bk.dry_run:
        y = bk.xp.asnumpy(y)
    return bk.np.asarray(y, dtype="float64")


def run_case(bk: Backends, L: int, dtype: str, repeats: int, warmup: int = 3) -> dict[str, Any]:
    """Every implementation on one case: warm-up, interleaved rounds, medians."""
    torch = bk.torch
    fns = build(bk, L, dtype)
    case: dict[str, Any] = {"L": L, "dtype": dtype, "B": B, "E": E, "H": H,
                            "flops": 8 * B * L * E**2 + 4 * B * L**2 * E,
                            "mha_xp_path": "dense" if B * H * L * L * 4 <= 128 * 2**20 else "chunked",
                            "mha_xp_dense_path": "dense" if B * H * L * L * 4 <= DENSE_BUDGET else "chunked",
                            "seconds": {}, "peak_extra_bytes": {}, "rel_err_vs_nn_mha": {}, "skipped": {}}
    outputs = {}
    with torch.no_grad():
        for name, (fn, lib) in list(fns.items()):
            try:
                for _ in range(warmup):
                    y = fn()
                bk.sync()
                outputs[name] = to_host(bk, y)
                del y
            except Exception as exc:  # flash in float32, out of memory, ...
                reason = "out of memory" if bk.is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                case["skipped"][name] = reason
                del fns[name]
                bk.free()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn, lib = fns[name]
                samples[name].append(bk.time_call(fn, lib))
        case["seconds"] = {n: statistics.median(s) for n, s in samples.items()}
        for name, (fn, lib) in fns.items():
            try:
                case["peak_extra_bytes"][name] = bk.peak_bytes(fn, lib)
            except Exception as exc:
                case["peak_extra_bytes"][name] = None
                say(f"  (memory of {name} not measured: {type(exc).__name__}: {exc})")
    ref = outputs.get("torch_module")
    if ref is not None:
        np = bk.np
        for name, y in outputs.items():
            if name != "torch_module":
                case["rel_err_vs_nn_mha"][name] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    del fns, outputs
    bk.free()
    return case


# -- report ---------------------------------------------------------------------------


def fmt_ms(s: float | None) -> str:
    return "—" if s is None else f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [f"mha_xp on CuPy against PyTorch on {dev.get('name', '?')} "
             f"(B = {B}, E = {E}, H = {H}; median ms per call, "
             f"{'wall clock: a CPU dry run, the numbers mean nothing' if 'dry run' in dev.get('name', '') else 'CUDA events; TF32 off'}; "
             f"ratios are mha_xp's time over the peer's, < 1 means mha_xp is faster)", ""]
    head = ["dtype", "L", *(f"{LABELS[i]} ms" for i in IMPLS), "mha_xp / nn.MHA",
            "mha_xp / torch best", "mha_xp / flash", "mha_xp TFLOP/s", "mha_xp MB", "nn.MHA MB",
            "mha_xp err"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in report["cases"]:
        t, m = c["seconds"], c["peak_extra_bytes"]
        ours = t.get("mha_xp")
        best = min([t[i] for i in ("torch_module", "torch_functional") if i in t], default=None)
        ratio = lambda other: "—" if ours is None or other is None else f"{ours / other:.2f}"  # noqa: E731
        mbs = lambda v: "—" if v is None else f"{v / 1e6:.0f}"  # noqa: E731
        err = c["rel_err_vs_nn_mha"].get("mha_xp")
        row = [c["dtype"], str(c["L"]), *(fmt_ms(t.get(i)) for i in IMPLS),
               ratio(t.get("torch_module")), ratio(best), ratio(t.get("torch_flash")),
               "—" if ours is None else f"{c['flops'] / ours / 1e12:.1f}",
               mbs(m.get("mha_xp")), mbs(m.get("torch_module")),
               "—" if err is None else f"{err:.0e}"]
        lines.append("| " + " | ".join(row) + " |")
    skipped = sorted({f"{LABELS[n]} ({c['dtype']}): {why}" for c in report["cases"]
                      for n, why in c["skipped"].items()})
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    lines += ["", "Target (issue 6): mha_xp ≤ 1.0 × nn.MHA at L = 4096:"]
    if not report["targets"]:
        lines.append("- not measured (no L = 4096 in this run)")
    for t in report["targets"]:
        lines.append(f"- {t['dtype']}: {t['value']:.2f} × nn.MHA — {'met' if t['met'] else 'MISSED'}"
                     f" (× flash: {t['x_flash']})")
    if report.get("tests"):
        lines += ["", f"CuPy test suite: {report['tests']['summary']} (exit {report['tests']['returncode']})"]
    return "\n".join(lines) + "\n"


def describe(bk: Backends) -> dict[str, Any]:
    np, torch = bk.np, bk.torch
    import array_api_compat

    import mha_xp

    info = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "array_api_compat": array_api_compat.__version__, "mha_xp": mha_xp.__version__,
            "torch_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if bk.dry_run:
        return info | {"name": f"CPU dry run ({platform.processor() or platform.machine()})"}
    cupy = bk.xp
    info |= {"cupy": cupy.__version__, "torch_cuda": torch.version.cuda,
             "name": torch.cuda.get_device_name(0), "CUPY_TF32": os.environ.get("CUPY_TF32", "unset")}
    try:  # details only: never let them stop the run
        props = cupy.cuda.runtime.getDeviceProperties(0)
        info |= {"memory_GiB": round(props["totalGlobalMem"] / 2**30, 1),
                 "compute_capability": f"{props['major']}.{props['minor']}",
                 "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                 "cuda_driver": cupy.cuda.runtime.driverGetVersion()}
    except Exception as exc:
        info["details_error"] = f"{type(exc).__name__}: {exc}"
    return info


def main() -> int:
    parser = argparse.ArgumentParser(
        description="The CuPy test suite, then mha_xp on CuPy against PyTorch on the same GPU "
                    "(see the module docstring).")
    parser.add_argument("out_dir", type=Path, help="directory for tests.log, gpu.md and gpu.json")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    parser.add_argument("--tests-timeout", type=int, default=480, metavar="S",
                        help="seconds allowed to the test suite (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"only L = {QUICK_LENGTHS}, fewer repeats")
    parser.add_argument("--lengths", type=str, default=None,
                        help=f"comma-separated sequence lengths (default {','.join(map(str, LENGTHS))})")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 15, quick 5)")
    parser.add_argument("--wheels", type=Path, action="append", default=[],
                        help="a directory of pure-Python wheels to use when a package is missing "
                             "(default: .whl/ and wheels/ at the root of the checkout)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script on a CPU: NumPy for CuPy, torch on the CPU, tiny sizes")
    args = parser.parse_args()

    global E, H
    if args.dry_run:
        E, H = 64, 4
    lengths = (tuple(int(v) for v in args.lengths.split(",")) if args.lengths
               else (32, 64) if args.dry_run else QUICK_LENGTHS if args.quick else LENGTHS)
    repeats = args.repeats or (3 if args.dry_run else 5 if args.quick else 15)

    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        extra_path = unpack_wheels([*args.wheels, *WHEEL_DIRS])
        reexec_with(extra_path)
        extra_path = [p for p in os.environ.get(_REEXEC, "").split(os.pathsep) if p]
        require_modules()
        if not args.dry_run:
            open_gpu()
    except Unavailable as exc:
        msg = f"gpu.py: cannot run: {exc}"
        print(msg, file=sys.stderr)
        try:
            (args.out_dir / "error.txt").write_text(msg + "\n")
        except OSError:
            pass
        return 2
    report: dict[str, Any] = {"command": "python3 benchmarks/gpu.py " + " ".join(sys.argv[1:]),
                              "shape": {"B": B, "E": E, "H": H}, "lengths": list(lengths),
                              "repeats": repeats, "tests": None, "cases": []}
    if not args.skip_tests and not args.dry_run:
        report["tests"] = run_tests(args.out_dir, extra_path, args.tests_timeout)

    bk = Backends(args.dry_run)
    report["device"] = describe(bk)
    say("\ndevice: " + ", ".join(f"{k}={v}" for k, v in report["device"].items()))
    t0 = time.perf_counter()
    for dtype in DTYPES:
        for L in lengths:
            case = run_case(bk, L, dtype, repeats)
            report["cases"].append(case)
            t = case["seconds"]
            say(f"{dtype:8s} L={L:6d}  " + "  ".join(f"{LABELS[n]} {fmt_ms(s)} ms" for n, s in t.items())
                + f"   ({time.perf_counter() - t0:.0f} s)")
    report["targets"] = []
    for c in report["cases"]:
        t = c["seconds"]
        if c["L"] == TARGET_L and "mha_xp" in t and "torch_module" in t:
            report["targets"].append({
                "dtype": c["dtype"], "value": t["mha_xp"] / t["torch_module"],
                "met": t["mha_xp"] <= t["torch_module"],
                "x_flash": f"{t['mha_xp'] / t['torch_flash']:.2f}" if "torch_flash" in t else "n/a"})
    md = markdown(report)
    (args.out_dir / "gpu.md").write_text(md)
    (args.out_dir / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    say("\n" + md)
    say(f"wrote {args.out_dir / 'gpu.md'} and {args.out_dir / 'gpu.json'}")
    tests = report["tests"]
    return 1 if tests is not None and tests["returncode"] != 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
