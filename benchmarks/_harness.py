"""Harness code shared by the benchmark scripts in this folder (preprocess.py, end_to_end.py).

Not a benchmark itself: the scripts import it from their own directory. It holds what is not specific to
one measurement: importing speciesclf while it may be reinstalled, machine and build description, the
shared data folder, the quiet-machine monitor, number formatting, the common command-line options and the
appending of a section to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
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

Each section is one run of one benchmark script, appended by its `--write-results` option and never
edited afterwards. A section gives the date, the machine (CPU model from `lscpu`, the cores the process
may use), the exact command, the build that was measured, the table of median throughputs and the ratios
or target checks the benchmark defines. Compare numbers only within a section or across sections from the
same machine.
"""


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
        backend = importlib.import_module("speciesclf._backend")
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
    p.add_argument("--write-results", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
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


def write_results(results: dict, body: str, title: str, details: list[str]) -> None:
    """Appends a section to RESULTS.md: "## {title} — {date}", the machine / command / build / versions
    lines, the script's own ``details`` lines, then ``body``."""
    m = results["machine"]
    section = [
        "",
        f"## {title} — {results['date']}",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} usable cores ({m['platform']})",
        f"- Command: `{results['command']}`",
        f"- Build: speciesclf {m['speciesclf']} (repo {m['repo_revision']}; _native built {m['native_so_mtime']}), "
        f"{m['compiler']}, SIMD {', '.join(m['simd'] or [])}, codecs {m['codecs']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        *details,
        "",
        body,
        "",
    ]
    new = not RESULTS.exists()
    with open(RESULTS, "a", encoding="utf-8") as f:
        if new:
            f.write(RESULTS_HEADER)
        f.write("\n".join(section))


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
        log(f"[bench] appended a section to {RESULTS}")
