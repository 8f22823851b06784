"""benchmarks/RESULTS.md's layout, kept by the benchmarks' --write-results (benchmarks/_harness.py).

The newest run of each benchmark on each machine is shown in full (after a summary table), and a run it
replaces becomes one line of the history.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _harness  # noqa: E402

EPYC = "AMD EPYC"
XEON = "Intel Xeon"


def results(date: str, cpu: str = EPYC, revision: str = "abc1234", command: str = "python3 benchmarks/x.py") -> dict:
    return {
        "date": date,
        "command": command,
        "machine": {
            "cpu": cpu,
            "cores": 2,
            "platform": "Linux-test",
            "speciesclf": "0.1.0",
            "repo_revision": revision,
            "native_so_mtime": "2026-01-01T00:00:00",
            "compiler": "gcc 12",
            "simd": ["avx2"],
            "codecs": {"jpeg": "libjpeg-turbo"},
            "versions": {"python": "3.11"},
        },
    }


def body(ratio: str, verdicts=("PASS", "MISS")) -> str:
    checks = [f"- target {i}: measured {ratio} — {v}" for i, v in enumerate(verdicts)]
    return "\n".join(
        ["| Method | img/s |", "|---|---:|", f"| native | {ratio} |", "", "Ratios (same run):", f"- native = {ratio}× reference",
         "- second ratio", "", "Target checks:", *checks, "", "Load average before / after: (1, 1, 1) / (1, 1, 1)."]
    )


PREPROCESS = "preprocess.py — preprocessing throughput"
LOAD = "load.py — HTTP serving under concurrent load"


def write(path: Path, date: str, title: str = PREPROCESS, ratio: str = "2.10", details=(), **machine) -> None:
    _harness.write_results(results(date, **machine), body(ratio), title, list(details), path=path)


def sections(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("### ")]


def test_first_run_creates_the_layout(tmp_path):
    path = tmp_path / "RESULTS.md"
    write(path, "2026-11-27T08:00:00+00:00", ratio="2.10")
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == [f"## {_harness.GLANCE_TITLE}", f"## {_harness.LATEST_TITLE}", f"## {_harness.HISTORY_TITLE}"]
    assert sections(text) == [f"### {PREPROCESS} — 2026-11-27T08:00:00+00:00"]
    assert "| preprocess.py | AMD EPYC, 2 usable cores | 2026-11-27T08:00:00+00:00 | abc1234 | native = 2.10× reference | 1 PASS, 1 MISS |" in text
    assert "- Command: `python3 benchmarks/x.py`" in text and "| native | 2.10 |" in text


def test_a_new_run_replaces_the_latest_and_moves_it_to_the_history(tmp_path):
    path = tmp_path / "RESULTS.md"
    write(path, "2026-11-27T08:00:00+00:00", ratio="2.10", revision="old0001")
    write(path, "2026-11-27T09:00:00+00:00", ratio="2.30", revision="new0002")
    text = path.read_text()
    assert sections(text) == [f"### {PREPROCESS} — 2026-11-27T09:00:00+00:00"]
    assert "| native | 2.30 |" in text and "| native | 2.10 |" not in text  # the old table is gone
    latest, history = text.split(f"## {_harness.HISTORY_TITLE}")
    assert "2.30" in latest and "2.10" not in latest
    assert history.strip().splitlines() == [
        "- 2026-11-27T08:00:00+00:00 · preprocess.py · AMD EPYC, 2 usable cores · repo old0001 · "
        "native = 2.10× reference · targets: 1 PASS, 1 MISS"
    ]
    # A third run: the history stays newest first.
    write(path, "2026-11-27T10:00:00+00:00", ratio="2.50")
    runs, history = _harness.parse_results(path.read_text())
    assert [r.heading for r in runs] == [f"{PREPROCESS} — 2026-11-27T10:00:00+00:00"]
    assert ["2.30×" in history[0], "2.10×" in history[1]] == [True, True]


def test_one_latest_section_per_benchmark_and_machine(tmp_path):
    path = tmp_path / "RESULTS.md"
    write(path, "2026-11-27T08:00:00+00:00", title=LOAD, ratio="1.90")
    write(path, "2026-11-27T08:30:00+00:00", ratio="2.10")
    write(path, "2026-11-27T09:00:00+00:00", ratio="9.00", cpu=XEON, details=["- GPU: NVIDIA H200, CUDA 12.8, driver 570"])
    write(path, "2026-11-27T09:30:00+00:00", title=LOAD, ratio="2.00")
    text = path.read_text()
    # preprocess before load (the harness's order), then by machine; the GPU is part of the machine
    assert sections(text) == [
        f"### {PREPROCESS} — 2026-11-27T08:30:00+00:00",
        f"### {PREPROCESS} — 2026-11-27T09:00:00+00:00",
        f"### {LOAD} — 2026-11-27T09:30:00+00:00",
    ]
    assert "| preprocess.py | Intel Xeon, 2 usable cores; GPU NVIDIA H200 |" in text
    _, history = _harness.parse_results(text)
    assert len(history) == 1 and "load.py" in history[0] and "1.90×" in history[0]


def test_a_file_in_the_former_layout_is_restructured_on_the_next_write(tmp_path):
    """Every run used to be a "## " section appended at the end."""
    old = [_harness.run_section(results(date), body(ratio), title, []) for date, title, ratio in (
        ("2026-11-27T08:00:00+00:00", PREPROCESS, "1.50"),
        ("2026-11-27T08:10:00+00:00", LOAD, "1.70"),
        ("2026-11-27T08:20:00+00:00", PREPROCESS, "1.60"),
    )]
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nEach section is one run.\n" + "".join(
        f"\n## {run.heading}\n" + "\n".join(run.lines) + "\n" for run in old))
    write(path, "2026-11-27T09:00:00+00:00", title=LOAD, ratio="2.00")
    text = path.read_text()
    assert sections(text) == [f"### {PREPROCESS} — 2026-11-27T08:20:00+00:00", f"### {LOAD} — 2026-11-27T09:00:00+00:00"]
    _, history = _harness.parse_results(text)
    assert [line.split(" · ")[1] for line in history] == ["load.py", "preprocess.py"]
    assert "1.70×" in history[0] and "1.50×" in history[1]
    assert "Each section is one run." not in text


def test_rendering_is_stable(tmp_path):
    path = tmp_path / "RESULTS.md"
    for i, title in enumerate((PREPROCESS, LOAD, PREPROCESS)):
        write(path, f"2026-11-27T0{i}:00:00+00:00", title=title)
    text = path.read_text()
    assert _harness.render_results(*_harness.parse_results(text)) == text


@pytest.mark.parametrize("headline_missing", [True, False])
def test_runs_without_ratios_or_targets(tmp_path, headline_missing):
    path = tmp_path / "RESULTS.md"
    text = "| a | b |" if headline_missing else "Ratios (same run):\n- only this"
    _harness.write_results(results("2026-11-27T08:00:00+00:00"), text, PREPROCESS, [], path=path)
    row = next(line for line in path.read_text().splitlines() if line.startswith("| preprocess.py"))
    assert row.endswith("| no ratios reported | none |" if headline_missing else "| only this | none |")


def test_the_committed_results_file_is_in_the_layout():
    text = (BENCHMARKS / "RESULTS.md").read_text(encoding="utf-8")
    runs, history = _harness.parse_results(text)
    keys = [(run.benchmark, run.machine) for run in runs]
    assert runs and len(keys) == len(set(keys)), "one latest section per benchmark and machine"
    assert _harness.render_results(runs, history) == text, "RESULTS.md is not what --write-results writes"
    assert len(text.splitlines()) < 400
