"""The main job, ``python -m mha_xp``: its options, its tables and its verdict.

The program runs as a user runs it (a subprocess from the repository root, so
that ``-m mha_xp`` picks up this checkout); its tables are parsed, so that a
row that fails, a NaN or an error above its tolerance fails here too.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mha_xp.__main__ as job

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("numpy", "array_api_strict", "torch", "torch-cuda", "jax", "dask", "cupy")
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
SECTIONS = ("1. Backends", "2. Correctness", "3. Parity with torch", "4. Long sequence",
            "5. Training without autodiff", "6. Masks and padding", "7. GPU")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mha_xp", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def tables(stdout: str) -> dict[str, list[dict[str, str]]]:
    """Each section's rows as dicts keyed by the header's cells.

    A section is a title line (``"N. ..."``), note lines, a header, a line of
    dashes and rows up to the next blank line; cells are separated by two or
    more spaces.
    """
    out: dict[str, list[dict[str, str]]] = {}
    for block in stdout.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or not re.match(r"\d\. ", lines[0]):
            continue
        dashes = next(i for i, line in enumerate(lines) if set(line.strip()) == {"-"})
        header = re.split(r"\s{2,}", lines[dashes - 1].strip())
        out[lines[0]] = [dict(zip(header, re.split(r"\s{2,}", line.strip())))
                         for line in lines[dashes + 1:]]
    return out


def section(parsed: dict[str, list[dict[str, str]]], start: str) -> list[dict[str, str]]:
    (rows,) = [rows for title, rows in parsed.items() if title.startswith(start)]
    return rows


def within(value: str, tolerance: float) -> bool:
    number = float(value)  # "nan" parses, and fails the comparison
    return not math.isnan(number) and 0.0 <= number <= tolerance


@pytest.fixture(scope="module")
def quick() -> subprocess.CompletedProcess[str]:
    return run("--quick", "--no-progress")


@pytest.fixture(scope="module")
def parsed(quick: subprocess.CompletedProcess[str]) -> dict[str, list[dict[str, str]]]:
    return tables(quick.stdout)


class TestQuickRun:
    def test_exits_zero_without_traceback(self, quick: subprocess.CompletedProcess[str]) -> None:
        assert quick.returncode == 0, quick.stdout + quick.stderr
        assert "Traceback" not in quick.stdout + quick.stderr
        assert quick.stdout.rstrip().splitlines()[-1].startswith("All "), quick.stdout

    def test_every_section_present(self, parsed: dict[str, list[dict[str, str]]]) -> None:
        for start in SECTIONS:
            assert section(parsed, start), start

    def test_every_row_ok_or_skipped(self, parsed: dict[str, list[dict[str, str]]]) -> None:
        for title, rows in parsed.items():
            for row in rows:
                result = row["result"]
                assert result in ("ok", "-") or result.startswith("skipped ("), (title, row)

    def test_lists_every_backend(self, parsed: dict[str, list[dict[str, str]]]) -> None:
        rows = section(parsed, "1. Backends")
        assert [r["backend"] for r in rows] == list(BACKENDS)
        assert {r["backend"]: r["result"] for r in rows}["numpy"] == "ok"

    def test_correctness_within_tolerance(self, parsed: dict[str, list[dict[str, str]]]) -> None:
        rows = section(parsed, "2. Correctness")
        found = [r["backend"] for r in section(parsed, "1. Backends")
                 if r["result"] == "ok" and r["backend"] not in ("torch-cuda", "cupy")]
        assert sorted({r["backend"] for r in rows}) == sorted(found)
        assert {(r["backend"], r["dtype"]) for r in rows} >= {("numpy", "float32"),
                                                             ("numpy", "float64")}
        for row in rows + section(parsed, "7. GPU"):
            if row["result"] == "ok":
                for case in ("plain", "causal", "padding"):
                    assert within(row[case], TOLERANCE[row["dtype"]]), row
                assert row["kept xp/device/dtype"] == "yes", row

    def test_parity_with_torch(self, parsed: dict[str, list[dict[str, str]]]) -> None:
        pytest.importorskip("torch")
        rows = section(parsed, "3. Parity with torch")
        assert [r["dtype"] for r in rows] == ["float32", "float64", "float32"], rows
        for row in rows:
            assert within(row["plain"], TOLERANCE[row["dtype"]]), row
        for row in rows[:2]:
            assert within(row["causal"], TOLERANCE[row["dtype"]]), row
            assert within(row["padding"], TOLERANCE[row["dtype"]]), row
        assert re.fullmatch(r"[\d.]+ ms / [\d.]+ ms = [\d.]+x", rows[2]["mha_xp (NumPy) / torch"])

    def test_long_sequence_in_linear_memory(self, parsed: dict[str, list[dict[str, str]]]) -> None:
        (row,) = section(parsed, "4. Long sequence")
        assert row["L"] == "4096"
        assert within(row["rel. error"], TOLERANCE["float32"]), row
        share = float(row["share"].removesuffix(" %"))
        assert 0.0 < share < 25.0, row

    def test_training_loss_falls(self, parsed: dict[str, list[dict[str, str]]]) -> None:
        rows = section(parsed, "5. Training without autodiff")
        assert within(rows[0]["value"], 1e-6), rows[0]
        losses = [float(r["value"]) for r in rows if r["check"].startswith("loss at step")]
        assert len(losses) >= 3 and all(math.isfinite(x) for x in losses), rows
        assert losses[-1] < 0.5 * losses[0], rows

    def test_masks_give_zeros_not_nan(self, parsed: dict[str, list[dict[str, str]]]) -> None:
        rows = section(parsed, "6. Masks and padding")
        assert "numpy" in [r["backend"] for r in rows]
        for row in rows:
            assert float(row["masked row max|out|"]) == 0.0, row
            assert float(row["all-padded max|out|"]) == 0.0, row
            assert within(row["NaN padding vs truncated"], TOLERANCE["float32"]), row
            assert row["NaN count"] == "0", row


class TestOptions:
    def test_help_lists_the_options(self) -> None:
        result = run("--help")
        assert result.returncode == 0, result.stderr
        for option in ("--backend", "--quick", "--no-progress", "--seed"):
            assert option in result.stdout
        for name in BACKENDS:
            assert name in result.stdout

    def test_backend_restricts_the_run(self) -> None:
        result = run("--backend", "numpy", "--quick", "--no-progress")
        assert result.returncode == 0, result.stdout + result.stderr
        parsed = tables(result.stdout)
        assert [r["backend"] for r in section(parsed, "1. Backends")] == ["numpy"]
        for start in ("2. Correctness", "6. Masks and padding"):
            assert {r["backend"] for r in section(parsed, start)} == {"numpy"}, start
        (parity,) = section(parsed, "3. Parity with torch")
        assert parity["result"] == "skipped (torch not selected)"
        assert section(parsed, "4. Long sequence")[0]["result"] == "ok"

    def test_unknown_backend_is_refused(self) -> None:
        result = run("--backend", "nonsense")
        assert result.returncode != 0
        assert "nonsense" in result.stderr
        for name in BACKENDS:
            assert name in result.stderr

    def test_no_progress_line_when_stderr_is_not_a_terminal(
            self, quick: subprocess.CompletedProcess[str]) -> None:
        assert "\r" not in quick.stdout + quick.stderr


class TestInProcess:
    def test_a_failed_check_gives_exit_one(self, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setattr(job, "TOLERANCE", {"float32": 1e-30, "float64": 1e-30})
        assert job.main(["--backend", "numpy", "--quick", "--no-progress"]) == 1
        out = capsys.readouterr().out
        assert "FAIL" in section(tables(out), "2. Correctness")[0]["result"]
        assert out.rstrip().splitlines()[-1].startswith("FAILED: ")

    def test_import_has_no_side_effects(self) -> None:
        optional = ("torch", "jax", "dask", "array_api_strict", "cupy")
        code = ("import sys, mha_xp.__main__; "
                f"print([m for m in {optional!r} if m in sys.modules])")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, check=True)
        assert result.stdout.strip() == "[]", result.stdout
        assert result.stderr == ""

    def test_progress_redraws_one_line(self) -> None:
        stream = io.StringIO()
        progress = job.Progress(True, stream)
        progress.show("a long label")
        progress.show("short")
        progress.clear()
        assert stream.getvalue() == "\ra long label\rshort       \r     \r"
        silent = io.StringIO()
        job.Progress(False, silent).show("x")
        assert silent.getvalue() == ""
