"""The native core under AddressSanitizer: the format, corrupt-file and property tests, instrumented."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc's libasan")
def test_native_core_is_clean_under_asan(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_PRELOAD")}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "asan_check.sh"), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, (run.stdout[-4000:], run.stderr[-8000:])
    assert " passed" in run.stdout and "failed" not in run.stdout
