"""Every ```python block in README.md and docs/*.md runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(page, code, id=f"{page.name}-{i}")
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


@pytest.mark.parametrize(("page", "code"), BLOCKS)
def test_code_block_runs(page: Path, code: str, tmp_path: Path) -> None:
    if "SPECIESCLF_SHARED" in code and not Path(os.environ.get("SPECIESCLF_SHARED", ROOT.parent / "shared")).is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("shared assets missing under CI")
        pytest.skip("shared assets missing")
    env = dict(os.environ, SPECIESCLF_SHARED=os.environ.get("SPECIESCLF_SHARED", str(ROOT.parent / "shared")),
               SPECIESCLF_HOME=str(tmp_path / "home"))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{page.name} block failed:\n{code}\n{result.stderr}"


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)[:2]
    assert commands == [
        "bash scripts/setup.sh && SPECIESCLF_WEIGHTS=../shared/models speciesclf classify ../shared/images/imagenet-samples",
        "bash scripts/setup.sh && python3 -m pytest -q",
    ]
    assert "python3 -m pytest -q" in (ROOT / ".ci" / "run").read_text()
