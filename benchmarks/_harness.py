"""Harness code shared by the benchmark scripts in this folder (preprocess.py, end_to_end.py).

Not a benchmark itself: the scripts import it from their own directory. It holds what is not specific to
one measurement: importing speciesclf while it may be reinstalled, machine and build description, the
shared data folder, the quiet-machine monitor, number formatting, the common command-line options and the
recording of a run in RESULTS.md (its layout: the newest run per benchmark and machine, then the history).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"

RESULTS_HEADER = """# Benchmark results

The newest run of each benchmark on each machine, in full, after a one-line summary of each; then the
older runs, one line each. A benchmark's `--write-results` keeps this layout: its run replaces the section
of the same benchmark and machine, which moves to the history as one line (the full text of every run
is in git: `git log -p -- benchmarks/RESULTS.md`). A section gives the date, the machine (CPU model from
`lscpu`, the cores the process may use), the exact command, the build measured, the table of medians and
the ratios and target checks the benchmark defines. Compare numbers only within a section, or between
runs on the same machine.
"""
GLANCE_TITLE = "At a glance: the latest run per benchmark and machine"
LATEST_TITLE = "Latest runs"
HISTORY_TITLE = "History: older runs, newest first"
# The order of the latest sections; a benchmark not named here comes after these, by name.
BENCHMARK_ORDER = ("preprocess.py", "end_to_end.py", "load.py", "cpu_vs_gpu.py")


# --------------------------------------------------------------------------------------------- setup


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def retrying(what: str, fn: Callable[[], Any], attempts: int = 10, delay: float = 3.0) -> Any:
    """fn(), retried while speciesclf may be half-way through a reinstall by someone else."""
    error: BaseException | None = None
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # ImportError, AttributeError, OSError... from a half-written install
            error = e
        for name in [n for n in sys.modules if n == "speciesclf" or n.startswith("speciesclf.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        if attempt + 1 < attempts:
            print(f"[bench] {what} failed ({error!r}); retrying in {delay:.0f} s", file=sys.stderr)
            time.sleep(delay)
    raise SystemExit(f"{what} failed {attempts} times: {error!r}")


def import_speciesclf(attempts: int = 10, delay: float = 3.0):
    """Imports speciesclf with its native extension, retrying while a reinstall may be in progress."""

    def attempt():
        module = importlib.import_module("speciesclf")
        backend = importlib.import_module("speciesclf.preprocessing._backend")
        if not backend.native_available():
            raise ImportError(f"native extension not loaded: {backend.NATIVE_IMPORT_ERROR}")
        return module

    return retrying("import speciesclf (native)", attempt, attempts, delay)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "csrc", "python", "CMakeLists.txt", "pyproject.toml"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        text = rev.stdout.strip() or "unknown"
        return text + ("+uncommitted changes in csrc/python/build files" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def machine_info(speciesclf, modules: dict[str, Any]) -> dict:
    """The machine and the build measured; ``modules`` adds {name: module or None} to the version list."""
    so = Path(importlib.import_module("speciesclf._native").__file__)
    info = speciesclf.info()
    versions = {"python": platform.python_version(), "numpy": np.__version__, "pillow": Image.__version__}
    for name, module in modules.items():
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
        "speciesclf": info.get("version"),
        "speciesclf_path": str(Path(speciesclf.__file__).parent),
        "codecs": info.get("codecs"),
        "simd": info.get("simd"),
        "compiler": info.get("compiler"),
        "native_so": str(so),
        "native_so_mtime": _dt.datetime.fromtimestamp(so.stat().st_mtime).isoformat(timespec="seconds"),
        "repo_revision": git_revision(),
    }


def run_info(argv: list[str] | None) -> dict[str, str]:
    """The date and the exact command line, the first two entries of a results dict."""
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python3", *map(shlex.quote, sys.argv if argv is None else [sys.argv[0], *argv])]),
    }


def loadavg() -> tuple[float, ...]:
    return tuple(round(x, 2) for x in os.getloadavg())


def shared_dir() -> Path:
    """$SPECIESCLF_SHARED, by default ../shared from the repo root."""
    return Path(os.environ.get("SPECIESCLF_SHARED", str(REPO.parent / "shared"))).resolve()


# --------------------------------------------------------------------------------------- command line


def add_wait_arguments(p: argparse.ArgumentParser) -> None:
    """--max-wait and --idle-threshold: the quiet-machine options every benchmark takes."""
    p.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="seconds in all to spend waiting, before each round, for other processes to use less than "
        "--idle-threshold cores (default 60; --quick 10; 0 never waits)",
    )
    p.add_argument(
        "--idle-threshold",
        type=float,
        default=0.25,
        help="cores other processes may use for the machine to count as quiet (default 0.25); a round during "
        "which they used more is left out of the medians and run again, up to --repeats extra rounds",
    )


def add_output_arguments(p: argparse.ArgumentParser, quick_help: str) -> None:
    """--quick, --write-results and --json."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument(
        "--write-results",
        action="store_true",
        help="record the run in benchmarks/RESULTS.md: it replaces this benchmark's latest section for this "
        "machine, which moves to the history",
    )
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")


# ---------------------------------------------------------------------------------------------- timing


class ForeignLoad:
    """CPU used by other processes (in cores) between two samples: /proc/stat busy time minus our own."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ok = os.path.exists("/proc/stat")

    def sample(self) -> tuple[float, float, float]:
        busy = 0.0
        if self.ok:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal: everything but idle and iowait is taken
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / self.tick
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    @staticmethod
    def cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        wall = b[0] - a[0]
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall) if wall > 0 else 0.0

    def wait_idle(self, budget: list[float], threshold: float, log: Callable[[str], None]) -> None:
        """Waits (spending from budget[0] seconds) until other processes use < threshold cores."""
        if not self.ok or budget[0] <= 0:
            return
        t0, announced = time.perf_counter(), False
        while budget[0] > 0:
            a = self.sample()
            time.sleep(0.5)
            load = self.cores(a, self.sample())
            if load < threshold:
                break
            if not announced:
                log(f"[bench] other processes use {load:.2f} cores; waiting for the machine to go quiet")
                announced = True
            budget[0] -= time.perf_counter() - a[0]
        if announced:
            log(f"[bench] waited {time.perf_counter() - t0:.1f} s (wait budget left {max(0.0, budget[0]):.0f} s)")


# --------------------------------------------------------------------------------------------- reporting


def median_and_spread(times: list[float], rounds: list[int]) -> tuple[float, float]:
    """(median, (max - min) / median in %) of ``times`` over the rounds ``rounds``."""
    used = [times[i] for i in rounds]
    med = statistics.median(used)
    return med, 100.0 * (max(used) - min(used)) / med


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def loadavg_line(results: dict) -> str:
    """The report's last line: the load average before and after the run."""
    return (
        f"Load average before / after: {results['loadavg_before']} / {results['loadavg_after']} "
        f"({results['machine']['cores']} usable cores)."
    )


_RUN_HEADING = re.compile(r"^(?P<benchmark>\S+\.py) — (?P<title>.+) — (?P<date>\d{4}-\d\d-\d\dT\S+)$")
_VERDICT = re.compile(r"— (PASS|MISS)\b")


@dataclasses.dataclass
class Run:
    """One run's section: its heading ("{script} — {title} — {date}") and the lines below it."""

    heading: str
    lines: list[str]

    def _field(self, name: str) -> str:
        prefix = f"- {name}: "
        return next((line[len(prefix) :] for line in self.lines if line.startswith(prefix)), "")

    @property
    def benchmark(self) -> str:
        return _RUN_HEADING.match(self.heading)["benchmark"]

    @property
    def date(self) -> _dt.datetime:
        return _dt.datetime.fromisoformat(_RUN_HEADING.match(self.heading)["date"])

    @property
    def machine(self) -> str:
        """The CPU and its usable cores, and the GPU where the run names one: runs compare only on one machine."""
        cpu = self._field("Machine").split(" (")[0] or "unknown machine"
        gpu = re.split(r", |: | \(", self._field("GPU"))[0]
        return f"{cpu}; GPU {gpu}" if gpu else cpu

    @property
    def revision(self) -> str:
        found = re.search(r"\(repo ([^;)]+)", self._field("Build"))
        if not found:
            return "?"
        commit, dirty, _ = found[1].partition("+")
        return commit + ("+uncommitted" if dirty else "")

    def _block(self, title: str) -> list[str]:
        """The bullets under a line "{title}" (up to the first line that is no bullet)."""
        try:
            start = self.lines.index(title) + 1
        except ValueError:
            return []
        block = []
        for line in self.lines[start:]:
            if not line.startswith("- "):
                break
            block.append(line[2:])
        return block

    @property
    def headline(self) -> str:
        """The benchmark's first ratio (up to its first "; "): what it was written to show."""
        ratios = self._block("Ratios (same run):")
        return ratios[0].split("; ")[0] if ratios else "no ratios reported"

    @property
    def targets(self) -> str:
        verdicts = [(_VERDICT.search(line) or [None, "not measured"])[1] for line in self._block("Target checks:")]
        counts = [f"{verdicts.count(v)} {v}" for v in ("PASS", "MISS", "not measured") if v in verdicts]
        return ", ".join(counts) or "none"

    def history_line(self) -> str:
        return (
            f"- {self.date.isoformat()} · {self.benchmark} · {self.machine} · repo {self.revision} · "
            f"{self.headline} · targets: {self.targets}"
        )


def parse_results(text: str) -> tuple[list[Run], list[str]]:
    """(the runs shown in full, the history lines) of a RESULTS.md. Also reads the former layout, in which
    every run was a "## " section appended to the file, so that the first write restructures it."""
    runs: list[Run] = []
    history: list[str] = []
    current: Run | None = None
    in_history = False
    for line in text.splitlines():
        heading = line[3:] if line.startswith("## ") else line[4:] if line.startswith("### ") else None
        if heading is not None:
            in_history = heading == HISTORY_TITLE
            current = Run(heading, []) if _RUN_HEADING.match(heading) else None
            if current is not None:
                runs.append(current)
            continue
        if in_history:
            if line.startswith("- "):
                history.append(line)
        elif current is not None:
            current.lines.append(line)
    return runs, history


def _history_date(line: str) -> _dt.datetime:
    try:
        return _dt.datetime.fromisoformat(line[2:].split(" · ", 1)[0])
    except ValueError:
        return _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def render_results(runs: list[Run], history: list[str]) -> str:
    """The file for these runs: of each benchmark and machine the newest in full, every older one (and
    ``history``) as a line of the history, newest first."""
    latest: dict[tuple[str, str], Run] = {}
    history = list(history)
    for run in sorted(runs, key=lambda r: r.date):
        key = (run.benchmark, run.machine)
        if key in latest:
            history.append(latest[key].history_line())
        latest[key] = run
    history.sort(key=_history_date, reverse=True)

    def order(key: tuple[str, str]) -> tuple:
        benchmark, machine = key
        rank = BENCHMARK_ORDER.index(benchmark) if benchmark in BENCHMARK_ORDER else len(BENCHMARK_ORDER)
        return rank, benchmark, machine

    shown = [latest[key] for key in sorted(latest, key=order)]
    out = [RESULTS_HEADER, f"## {GLANCE_TITLE}", "", "| Benchmark | Machine | Date | Repo | First ratio | Target checks |"]
    out.append("|---|---|---|---|---|---|")
    for run in shown:
        cells = (run.benchmark, run.machine, run.date.isoformat(), run.revision, run.headline, run.targets)
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    out += ["", f"## {LATEST_TITLE}"]
    for run in shown:
        body = list(run.lines)
        while body and not body[0].strip():
            body.pop(0)
        while body and not body[-1].strip():
            body.pop()
        out += ["", f"### {run.heading}", "", *body]
    out += ["", f"## {HISTORY_TITLE}", ""]
    out += history or ["No older runs yet."]
    return "\n".join(out) + "\n"


def run_section(results: dict, body: str, title: str, details: list[str]) -> Run:
    """A run's section: the machine / command / build / versions lines, the script's own ``details``
    lines, then ``body``."""
    m = results["machine"]
    lines = [
        "",
        f"- Machine: {m['cpu']}, {m['cores']} usable cores ({m['platform']})",
        f"- Command: `{results['command']}`",
        f"- Build: speciesclf {m['speciesclf']} (repo {m['repo_revision']}; _native built {m['native_so_mtime']}), "
        f"{m['compiler']}, SIMD {', '.join(m['simd'] or [])}, codecs {m['codecs']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        *details,
        "",
        *body.splitlines(),
    ]
    return Run(f"{title} — {results['date']}", lines)


def write_results(results: dict, body: str, title: str, details: list[str], path: Path = RESULTS) -> None:
    """Records a run in RESULTS.md: it becomes the latest section of its benchmark and machine, and the
    section it replaces a line of the history. Written to a temporary file and renamed into place, so an
    interrupted write leaves the previous file."""
    runs, history = parse_results(path.read_text(encoding="utf-8")) if path.exists() else ([], [])
    runs.append(run_section(results, body, title, details))
    partial = path.with_name(path.name + ".partial")
    partial.write_text(render_results(runs, history), encoding="utf-8")
    os.replace(partial, path)


def finish(results: dict, body: str, args, title: str, details: list[str], dump: dict | None = None) -> None:
    """Prints the body and the total time, then writes --json (``dump``, by default ``results``) and
    --write-results as asked."""
    print(body)
    log(f"[bench] total {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results if dump is None else dump, indent=2, default=str)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    if args.write_results:
        write_results(results, body, title, details)
        log(f"[bench] recorded the run in {RESULTS}")
