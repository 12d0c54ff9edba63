"""The memory guard: what it reads (the system's, the cgroup's and the
address-space limit, on fake files), which backends it covers, how much it
counts for the chunked path's weights, and what it says.

The guard refuses a ``return_weights=True`` call whose weights cannot fit
with a ``MemoryError`` before anything is computed, rather than leaving it to
the operating system's OOM killer, which in a container kills the process.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from array_api_compat import array_namespace, device as device_of

import mha_xp
from mha_xp._checks import format_bytes
from mha_xp._core import _plan
from mha_xp._lib import _backends
from mha_xp._lib._backends import host_memory_available, memory_available
from mha_xp._spec import AttentionSpec, Request

ROOT = Path(__file__).resolve().parents[2]
GiB, MiB = 2**30, 2**20
sdpa = mha_xp.scaled_dot_product_attention
MHA = mha_xp.MultiHeadAttention


def _write(base: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _available(tmp_path: Path, files: dict[str, str], rlimit_as: int = -1) -> int | None:
    """``memory_available`` on fake ``/proc`` and ``/sys/fs/cgroup`` trees."""
    _write(tmp_path, files)
    return memory_available(proc=str(tmp_path / "proc"), cgroup_root=str(tmp_path / "cg"),
                            rlimit_as=rlimit_as)


MEMINFO = "MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:    8388608 kB\n"  # 8 GiB


class TestProbes:
    """Each source on its own, then the least of them."""

    def test_meminfo(self, tmp_path):
        assert _available(tmp_path, {"proc/meminfo": MEMINFO}) == 8 * GiB

    def test_nothing_known_is_none(self, tmp_path):
        assert _available(tmp_path, {}) is None
        assert _available(tmp_path, {"proc/meminfo": "garbage\nMemAvailable: lots kB\n"}) is None

    def test_cgroup_v2_limit_less_working_set(self, tmp_path):
        # usage 1.5 GiB, of which 0.5 GiB inactive page cache (reclaimable)
        files = {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/kubepods/pod1/app\n",
            "cg/kubepods/pod1/app/memory.max": f"{2 * GiB}\n",
            "cg/kubepods/pod1/app/memory.current": f"{3 * GiB // 2}\n",
            "cg/kubepods/pod1/app/memory.stat": (f"anon 1\ninactive_file {GiB // 2}\n"
                                                 f"active_file 7\n"),
            "cg/kubepods/pod1/memory.max": "max\n",
            "cg/kubepods/pod1/memory.current": f"{3 * GiB}\n",
        }
        assert _available(tmp_path, files) == GiB

    def test_cgroup_v2_ancestor_limit_counts(self, tmp_path):
        files = {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/a/b\n",
            "cg/a/b/memory.max": "max\n",
            "cg/a/b/memory.current": f"{GiB}\n",
            "cg/a/memory.max": f"{4 * GiB}\n",
            "cg/a/memory.current": f"{3 * GiB}\n",  # siblings use the rest
        }
        assert _available(tmp_path, files) == GiB

    def test_cgroup_v2_unlimited_leaves_meminfo(self, tmp_path):
        files = {"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/\n",
                 "cg/memory.max": "max\n", "cg/memory.current": "12345\n"}
        assert _available(tmp_path, files) == 8 * GiB

    def test_cgroup_v2_without_namespace_falls_back_to_the_mount(self, tmp_path):
        # A container without its own cgroup namespace: /proc/self/cgroup names
        # the host's path, the container sees its own cgroup at the mount's root.
        files = {"proc/self/cgroup": "0::/system.slice/docker-abc.scope\n",
                 "cg/memory.max": f"{GiB}\n", "cg/memory.current": f"{GiB // 4}\n"}
        assert _available(tmp_path, files) == 3 * GiB // 4
        _write(tmp_path, {"proc/self/cgroup": "0::/../../elsewhere\n"})
        assert _available(tmp_path, {}) == 3 * GiB // 4

    def test_cgroup_v1(self, tmp_path):
        unlimited = "9223372036854771712\n"
        files = {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": ("12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
                                 "3:memory:/docker/abc\n0::/\n"),
            "cg/memory/docker/abc/memory.limit_in_bytes": unlimited,
            "cg/memory/docker/abc/memory.usage_in_bytes": f"{GiB}\n",
            "cg/memory/docker/abc/memory.stat": (f"cache 5\ninactive_file 3\n"
                                                 f"hierarchical_memory_limit {3 * GiB}\n"
                                                 f"total_inactive_file {GiB // 4}\n"),
            "cg/memory/memory.limit_in_bytes": unlimited,
            "cg/memory/memory.usage_in_bytes": f"{10 * GiB}\n",
            # a hybrid system's unified hierarchy has no memory controller
            "cg/memory.max": f"{GiB}\n",
        }
        assert _available(tmp_path, files) == 3 * GiB - 3 * GiB // 4

    def test_cgroup_v1_limit_in_bytes(self, tmp_path):
        files = {"proc/self/cgroup": "5:memory:/\n",
                 "cg/memory/memory.limit_in_bytes": f"{2 * GiB}\n",
                 "cg/memory/memory.usage_in_bytes": f"{GiB // 2}\n"}
        assert _available(tmp_path, files) == 3 * GiB // 2

    def test_cgroup_usage_over_the_limit_is_zero_available(self, tmp_path):
        files = {"proc/self/cgroup": "0::/\n", "cg/memory.max": "100\n",
                 "cg/memory.current": "500\n"}
        assert _available(tmp_path, files) == 0

    def test_address_space_limit(self, tmp_path):
        page = os.sysconf("SC_PAGE_SIZE")
        files = {"proc/meminfo": MEMINFO, "proc/self/statm": "1000 200 30 4 0 100 0\n"}
        assert _available(tmp_path, files, rlimit_as=1000 * page + GiB) == GiB
        assert _available(tmp_path, files, rlimit_as=-1) == 8 * GiB  # RLIM_INFINITY
        assert _available(tmp_path, files, rlimit_as=100 * GiB) == 8 * GiB

    def test_the_least_of_all(self, tmp_path):
        page = os.sysconf("SC_PAGE_SIZE")
        files = {"proc/meminfo": MEMINFO, "proc/self/statm": "1000 1 1 1 0 1 0\n",
                 "proc/self/cgroup": "0::/\n", "cg/memory.max": f"{3 * GiB}\n",
                 "cg/memory.current": "0\n"}
        assert _available(tmp_path, files, rlimit_as=1000 * page + 5 * GiB) == 3 * GiB
        assert _available(tmp_path, files, rlimit_as=1000 * page + 2 * GiB) == 2 * GiB

    def test_this_system(self):
        avail = memory_available()
        assert avail is None or avail > 0


class TestBackends:
    """Host-memory backends are guarded, JAX on a CPU device included."""

    @pytest.fixture
    def known(self, monkeypatch):
        monkeypatch.setattr(_backends, "memory_available", lambda: 12345)

    def test_which_backends(self, backend, known):
        x = backend.asarray(np.zeros((2, 3)), "float32")
        xp, dev = array_namespace(x), device_of(x)
        on_host = backend.name != "dask" and backend.name != "cupy"
        assert host_memory_available(xp, dev) == (12345 if on_host else None)

    def test_jax_on_the_cpu(self, known):
        jax = pytest.importorskip("jax", reason="optional backend jax not installed")
        x = jax.numpy.zeros(3)
        assert device_of(x).platform == "cpu"  # the test machine's JAX
        assert host_memory_available(array_namespace(x), device_of(x)) == 12345
        seen = []

        def traced(y):  # under jax.jit the device is unknown: the default backend's
            seen.append(host_memory_available(array_namespace(y), device_of(y)))
            return y

        jax.jit(traced)(x)
        assert seen == [12345]

    def test_torch_on_another_device_is_not(self, known):
        torch = pytest.importorskip("torch", reason="optional backend torch not installed")
        xp = array_namespace(torch.zeros(1))
        assert host_memory_available(xp, torch.device("meta")) is None

    def test_guard_raises_on_every_host_backend(self, backend, rng, monkeypatch):
        monkeypatch.setattr(_backends, "memory_available", lambda: 10_000)
        monkeypatch.setattr(_plan, "_GUARD_FROM_BYTES", 0)
        q = backend.asarray(rng.standard_normal((2, 40, 8)), "float32")
        layer = MHA(8, 2, seed=0, xp=backend.xp, device=backend.device,
                    dtype=backend.dtype("float32"))
        if backend.name in ("dask", "cupy"):  # lazy or device memory: not guarded
            out, w = sdpa(q, q, q, return_weights=True)
            assert tuple(w.shape) == (2, 40, 40)
            return
        with pytest.raises(MemoryError, match=r"\(2, 40, 40\) attention weights, 12.5 KiB in "
                                              r"float32 .*only 9.77 KiB of memory"):
            sdpa(q, q, q, return_weights=True)
        with pytest.raises(MemoryError, match="call without return_weights"):
            layer(q, return_weights=True)
        sdpa(q, q, q)  # without the weights: the chunked path, no error
        layer(q)

    def test_guard_raises_under_jax_jit(self, rng, monkeypatch):
        jax = pytest.importorskip("jax", reason="optional backend jax not installed")
        monkeypatch.setattr(_backends, "memory_available", lambda: 10_000)
        monkeypatch.setattr(_plan, "_GUARD_FROM_BYTES", 0)
        q = jax.numpy.asarray(rng.standard_normal((2, 40, 8)), dtype=jax.numpy.float32)
        with pytest.raises(MemoryError, match="return_weights=True needs"):
            jax.jit(lambda x: sdpa(x, x, x, return_weights=True))(q)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


class TestChunkedPeak:
    """The chunked path holds about twice the weights (the blocks and their
    concatenation) and the guard counts that, not the weights once."""

    @pytest.mark.parametrize("shape, dtype, chunk", [
        ((2, 4, 1024, 32), "float32", None),
        ((2, 4, 1024, 32), "float64", 256),
        ((2, 4, 1024, 32), "float16", None),
        ((1, 2, 2048, 16), "float32", (64, 2048)),
        ((8, 1024, 64), "float32", (1024, 1024)),  # one block
    ])
    def test_estimate_is_the_measured_peak(self, rng, shape, dtype, chunk):
        q = rng.standard_normal(shape).astype(dtype)
        peak = _peak(lambda: sdpa(q, q, q, return_weights=True, memory_budget=0,
                                  chunk_size=chunk))
        plan = _plan.plan_call(q, q, q, AttentionSpec(scale=1.0), Request(
            return_weights=True, chunk_size=None if chunk is None else
            (chunk, chunk) if isinstance(chunk, int) else chunk, memory_budget=0),
            xp=array_namespace(q))
        weights = math.prod(shape[:-1]) * shape[-2] * max(4, np.dtype(dtype).itemsize)
        assert plan.executor == "chunked"
        if plan.blocks[0] < shape[-2] or plan.blocks[1] < shape[-2]:
            assert peak > 2 * weights  # blocks and their concatenation: the guard once counted one
        assert 0.85 <= plan.weights_bytes / peak <= 1.25, (plan.weights_bytes / peak)

    def test_the_peak_is_what_is_compared(self, rng, monkeypatch):
        q = rng.standard_normal((2, 4, 1024, 32)).astype("float32")  # 32 MiB of weights
        monkeypatch.setattr(_backends, "memory_available", lambda: 40 * MiB)
        with pytest.raises(MemoryError, match=r"32.0 MiB in float32 \(101 MiB at the peak, "
                                              r"while .*only 40.0 MiB"):
            sdpa(q, q, q, return_weights=True)
        monkeypatch.setattr(_backends, "memory_available", lambda: 120 * MiB)
        out, w = sdpa(q, q, q, return_weights=True)
        assert w.shape == (2, 4, 1024, 1024)

    def test_the_dense_path_stays_within_the_memory(self, rng, monkeypatch):
        q = rng.standard_normal((2, 4, 1024, 32)).astype("float32")
        monkeypatch.setattr(_backends, "memory_available", lambda: 10 * GiB)
        plan = _plan.plan_call(q, q, q, AttentionSpec(scale=1.0),
                               Request(return_weights=True, memory_budget=10**12),
                               xp=array_namespace(q))
        assert plan.executor == "dense" and plan.weights_bytes <= plan.available


class TestMessage:
    @pytest.mark.parametrize("n, text", [
        (0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.00 KiB"), (25_600, "25.0 KiB"),
        (10_000, "9.77 KiB"), (200 * MiB, "200 MiB"), (3 * GiB // 2, "1.50 GiB"),
        (5 * 2**40, "5.00 TiB"), (2**60, "1024 PiB"),
    ])
    def test_sizes_are_readable(self, n, text):
        assert format_bytes(n) == text

    def test_small_weights_are_not_zero_gib(self, rng, monkeypatch):
        monkeypatch.setattr(_backends, "memory_available", lambda: 1000)
        monkeypatch.setattr(_plan, "_GUARD_FROM_BYTES", 0)
        q = rng.standard_normal((2, 40, 8))
        with pytest.raises(MemoryError) as info:
            sdpa(q, q, q, return_weights=True)
        message = str(info.value)
        assert "0.0 GiB" not in message
        assert "25.0 KiB in float64" in message and "only 1000 bytes of memory" in message
        assert "return_weights" in message  # names the argument, and how to fix the call


@pytest.mark.parametrize("fn", [mha_xp.scaled_dot_product_attention, mha_xp.attention_with_lse,
                                mha_xp.attention_vjp, MHA.__call__, MHA.vjp],
                         ids=lambda f: f.__qualname__)
def test_raises_sections_list_memory_error(fn):
    after = fn.__doc__.split("Raises\n", 1)[1]
    raises = re.split(r"\n\s*(See Also|Notes|Examples)\n\s*-+\n", after)[0]
    assert re.search(r"^\s*MemoryError$", raises, re.MULTILINE), raises


ADDRESS_SPACE_CHILD = textwrap.dedent("""
    import resource, time
    import numpy as np
    import mha_xp

    page = resource.getpagesize()
    with open("/proc/self/statm") as f:
        vsize = int(f.read().split()[0]) * page
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (vsize + 2**30, hard))  # 1 GiB more
    q = np.zeros((1, 8, 8192, 8), dtype=np.float32)  # weights: 2 GiB
    start = time.perf_counter()
    try:
        mha_xp.scaled_dot_product_attention(q, q, q, return_weights=True)
    except MemoryError as exc:
        print("refused after %.3f s: %s" % (time.perf_counter() - start, exc))
    out = mha_xp.scaled_dot_product_attention(q, q, q)  # the chunked path fits
    print("attention without weights", out.shape)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")
def test_address_space_limit_is_refused_up_front():
    """Under ``RLIMIT_AS`` (``ulimit -v``) the guard refuses what the address
    space cannot hold, before allocating, with its own message."""
    run = subprocess.run([sys.executable, "-c", ADDRESS_SPACE_CHILD], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "refused after" in run.stdout, run.stdout
    assert "return_weights=True needs the (1, 8, 8192, 8192) attention weights, 2.00 GiB" \
        in run.stdout
    assert float(run.stdout.split("refused after ")[1].split(" s")[0]) < 1.0
    assert "attention without weights (1, 8, 8192, 8)" in run.stdout
