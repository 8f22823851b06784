"""Every command and code block in README.md and docs/*.md runs as written, and prints what it shows.

What each fenced block is, and how it is checked:

- ```python: runs (``python3``). A top-level ``print(...)  # shown`` line must print what its comment
  shows: numbers may differ, ``...`` stands for the rest, and an explanation may follow after ``: ``,
  ``; `` or `` (``.
- ```bash: runs (``bash -e -o pipefail``). A ```text block right after it (nothing but blank lines
  between) is its output, compared as below.
- ```text whose lines starting with ``$ `` are commands: each runs, and the lines after it, up to the
  next command, are its output, compared as below. Any other ```text block (a synopsis, an excerpt) and
  an untagged block (a folder layout) are illustrations and are not run.
- ```yaml: must parse (every document of it).

Shown output is compared by shape, not by machine-specific values: a listing of ``key   value`` lines
must name the same keys in the same order; anything else must have the same lines, where every token with
a digit (a count, a time, a version) and every path may differ and a line ``...`` stands for any lines.
Only stdout is compared (progress and logs go to stderr).

Each block runs on its own in a fresh folder, as a reader would run it from the repository root: the
folder's parent holds ``shared`` (the shared assets), so the docs' ``../shared`` paths resolve;
``$SPECIESCLF_SHARED`` points there too and ``$SPECIESCLF_HOME`` is the folder's own. Nothing is fetched
from the network. A block that cannot run here (it starts a server that runs until stopped, or needs a
container engine) is preceded by ``<!-- docs-test: skip (the reason) -->``; the reason is required, and
such exceptions stay few. The README's first two commands are the full setup: their own test below checks
that they are what CI runs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHARED = Path(os.environ.get("SPECIESCLF_SHARED", ROOT.parent / "shared")).resolve()
TIMEOUT_S = 180
KNOWN_LANGUAGES = {"python", "bash", "text", "yaml", ""}
MAX_SKIPS = 6  # exceptions stay few: raise this only with a reason nothing else can meet

# A fence may be indented (a block under a list item); its closing fence has the same indentation.
FENCE = re.compile(r"^([ \t]*)```([\w-]*)[ \t]*\n(.*?)^\1```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->", re.S)
SKIP = re.compile(r"^\s*skip\s*\((.*)\)\s*$", re.S)
SETUP_COMMANDS = 2  # the README's first two ```bash blocks


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence
    language: str
    code: str
    marker: str | None  # the docs-test comment right before the fence
    output: str | None = None  # a ```bash block's shown output (the ```text block right after it)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    blocks: list[Block] = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = None
        if before.endswith("-->"):
            found = list(MARKER.finditer(before))
            if found and found[-1].end() == len(before):
                marker = found[-1][1].strip()
        indent = match[1]
        code = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in match[3].splitlines(keepends=True))
        blocks.append(Block(page, text.count("\n", 0, match.start()) + 1, match[2], code, marker))
    for previous, block in zip(blocks, blocks[1:]):
        # The lines after the previous block's closing fence, up to this block's opening one.
        between = text.splitlines()[previous.line + previous.code.count("\n") + 1 : block.line - 1]
        if previous.language == "bash" and block.language == "text" and not any(line.strip() for line in between):
            previous.output = block.code
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def runnable(block: Block) -> bool:
    if block.language in ("python", "bash", "yaml"):
        return True
    return block.language == "text" and any(line.startswith("$ ") for line in block.code.splitlines())


def setup_commands() -> list[Block]:
    return [b for b in ALL_BLOCKS if b.page.name == "README.md" and b.language == "bash"][:SETUP_COMMANDS]


CHECKED = [b for b in ALL_BLOCKS if runnable(b) and b not in setup_commands()]


# --- comparing shown output ---------------------------------------------------------------------------

FIELD_LINE = re.compile(r"^\S+ {2,}\S")
# A number not glued to a word (so float32 stays float32): a count, a time, a score, a version.
NUMBER = re.compile(r"(?<![A-Za-z_])-?\d+(?:[.,]\d+)*(?:e[-+]?\d+)?")


def tokens(line: str) -> list[str]:
    masked = (NUMBER.sub("#", t) for t in line.split())
    return ["<path>" if "/" in t else t for t in masked]


def shape_problem(shown: str, actual: str) -> str | None:
    """Why ``actual`` does not have the shape of ``shown``, or None."""
    shown_lines = [line for line in shown.rstrip("\n").splitlines()]
    actual_lines = actual.rstrip("\n").splitlines()
    if shown_lines and all(FIELD_LINE.match(line) for line in shown_lines if line.strip()):
        keys = [line.split()[0] for line in shown_lines if line.strip()]
        actual_keys = [line.split()[0] for line in actual_lines if line.strip()]
        if keys != actual_keys:
            return f"the keys shown {keys} are not the keys printed {actual_keys}"
        return None

    def matches(i: int, j: int) -> bool:  # shown_lines[i:] against actual_lines[j:]
        if i == len(shown_lines):
            return j == len(actual_lines)
        if shown_lines[i].strip() == "...":
            return any(matches(i + 1, k) for k in range(j, len(actual_lines) + 1))
        return j < len(actual_lines) and tokens(shown_lines[i]) == tokens(actual_lines[j]) and matches(i + 1, j + 1)

    if matches(0, 0):
        return None
    return "the output shown:\n" + "\n".join(shown_lines) + "\nis not the output printed:\n" + "\n".join(actual_lines)


def print_problem(printed: str, shown: str) -> str | None:
    """Why a print's first line is not what its comment shows (numbers free, '...', explanations), or None."""
    norm = lambda s: " ".join(NUMBER.sub("#", t) for t in s.split())  # noqa: E731
    p, s = norm(printed.splitlines()[0] if printed else ""), norm(shown)
    if s.endswith("..."):
        if p.startswith(s[:-3].rstrip()):
            return None
    elif p == s or (s.startswith(p) and s[len(p) : len(p) + 2] in (": ", "; ", " (")):
        return None
    return f"printed {printed!r}, the comment shows {shown!r}"


# --- running ------------------------------------------------------------------------------------------

RECORDING_RUNNER = '''
import builtins, json, sys
shown_at = set(json.loads(sys.argv[3]))
printed = {}
plain_print = builtins.print

def recording_print(*args, sep=" ", end="\\n", file=None, flush=False):
    frame = sys._getframe(1)
    if file is None and frame.f_code.co_filename == "<doc>" and frame.f_lineno in shown_at:
        printed.setdefault(str(frame.f_lineno), (" " if sep is None else sep).join(map(str, args)))
    plain_print(*args, sep=sep, end=end, file=file, flush=flush)

if __name__ == "__main__":
    builtins.print = recording_print
    code = open(sys.argv[1], encoding="utf-8").read()
    try:
        exec(compile(code, "<doc>", "exec"), {"__name__": "__main__"})
    finally:
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            json.dump(printed, f)
'''


def shown_prints(code: str) -> dict[int, str]:
    """{line: shown} of the block's top-level ``print(...)  # shown`` lines."""
    lines = code.splitlines()
    shown = {}
    for node in ast.parse(code).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"):
            continue
        if call.end_lineno != node.lineno:
            continue
        rest = lines[node.lineno - 1][call.end_col_offset :]
        comment = re.match(r"\s*#\s?(.*)$", rest)
        if comment and comment[1].strip():
            shown[node.lineno] = comment[1].strip()
    return shown


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, SPECIESCLF_SHARED=str(SHARED), SPECIESCLF_HOME=str(tmp_path / "home"))
    env.pop("SPECIESCLF_WEIGHTS", None)  # a block that needs the weights says where they are
    return work, env


def needs_shared(block: Block) -> None:
    if ("SPECIESCLF_SHARED" in block.code or "../shared" in block.code) and not SHARED.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail("shared assets missing under CI")
        pytest.skip("shared assets missing")


def run(args: list[str], work: Path, env: dict[str, str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: still running after {TIMEOUT_S} s (a server? mark it with docs-test: skip)")


def failed(block: Block, result: subprocess.CompletedProcess) -> str:
    return (f"{block.where} ({block.language}) exited {result.returncode}:\n{block.code}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}")


@pytest.mark.parametrize("block", CHECKED, ids=[f"{b.page.name}:{b.line}-{b.language}" for b in CHECKED])
def test_doc_block(block: Block, sandbox) -> None:
    if block.marker is not None:
        skip = SKIP.match(block.marker)
        assert skip and skip[1].strip(), f"{block.where}: a docs-test marker is `skip (reason)`, got {block.marker!r}"
        pytest.skip(f"{block.where}: {skip[1].strip()}")
    needs_shared(block)
    work, env = sandbox
    if block.language == "yaml":
        documents = [d for d in yaml.safe_load_all(block.code) if d is not None]
        assert documents, f"{block.where}: no YAML document"
        return
    if block.language == "python":
        shown = shown_prints(block.code)
        (work.parent / "block.py").write_text(block.code, encoding="utf-8")
        (work.parent / "runner.py").write_text(RECORDING_RUNNER, encoding="utf-8")
        printed_file = work.parent / "printed.json"
        result = run([sys.executable, str(work.parent / "runner.py"), str(work.parent / "block.py"), str(printed_file),
                      json.dumps(sorted(shown))], work, env, block.where)
        assert result.returncode == 0, failed(block, result)
        printed = json.loads(printed_file.read_text(encoding="utf-8"))
        problems = [f"line {line}: {print_problem(printed.get(str(line), ''), text)}"
                    for line, text in shown.items() if print_problem(printed.get(str(line), ""), text)]
        assert not problems, f"{block.where}: " + "\n".join(problems)
        return
    if block.language == "bash":
        result = run(["bash", "-e", "-o", "pipefail", "-c", block.code], work, env, block.where)
        assert result.returncode == 0, failed(block, result)
        if block.output is not None:
            problem = shape_problem(block.output, result.stdout)
            assert problem is None, f"{block.where}: {problem}"
        return
    # a ```text block of `$ command` lines and their output
    commands: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    for command, shown in commands:
        result = run(["bash", "-e", "-o", "pipefail", "-c", command], work, env, f"{block.where}: {command}")
        assert result.returncode == 0, failed(block, result)
        if any(line.strip() for line in shown):
            problem = shape_problem("\n".join(shown), result.stdout)
            assert problem is None, f"{block.where}: `{command}`: {problem}"


# --- the pages as a whole -----------------------------------------------------------------------------

def test_every_block_is_of_a_known_kind() -> None:
    unknown = [f"{b.where}: ```{b.language}" for b in ALL_BLOCKS if b.language not in KNOWN_LANGUAGES]
    assert not unknown, f"blocks this test cannot check (use python, bash, text, yaml or none): {unknown}"


def test_markers_are_few_and_sit_on_blocks() -> None:
    placed = {(b.page, b.marker) for b in ALL_BLOCKS if b.marker is not None}
    stray = []
    for page in PAGES:
        for found in MARKER.finditer(page.read_text(encoding="utf-8")):
            if (page, found[1].strip()) not in placed:
                stray.append(f"{page.name}: {found[0]}")
    assert not stray, f"docs-test markers not right before a block: {stray}"
    reasons = [b.marker for b in ALL_BLOCKS if b.marker is not None]
    assert all(SKIP.match(r) and SKIP.match(r)[1].strip() for r in reasons), reasons
    assert len(reasons) <= MAX_SKIPS, f"{len(reasons)} blocks skipped (at most {MAX_SKIPS}): {reasons}"


def test_shown_output_comparison_catches_differences() -> None:
    """The comparison itself: shapes that should pass and fail."""
    listing = "version                  0.1.0\nnative                   True\n"
    assert shape_problem(listing, "version   0.2.7\nnative    False\n") is None
    assert "keys" in shape_problem(listing, "version   0.2.7\nnative    True\nbackend   native\n")
    text = "419/419 images -> array (419, 3, 224, 224) float32 in 640 ms (655 img/s)"
    assert shape_problem(text, "12/12 images -> array (12, 3, 224, 224) float32 in 9 ms (1333 img/s)\n") is None
    assert shape_problem(text, "12/12 images -> array (12, 3, 224, 224) float16 in 9 ms (1333 img/s)\n")
    assert shape_problem("a 1\n...\nz 2", "a 7\nb\nc\nz 3") is None
    assert shape_problem("a 1\n...\nz 2", "a 7\nb\nc\ny 3")
    assert print_problem("goldfish Carassius auratus 0.998 False", "goldfish Carassius auratus 0.997 False") is None
    assert print_problem("None", "None: public") is None
    assert print_problem("None True house finch 0.897 0.027", "None True house finch 0.897 ...") is None
    assert print_problem("house finch 0.897", "None True house finch 0.897 ...")
    assert print_problem("Nonesuch", "None: public")
    assert measured_ratios("done (1.78-1.97x of the 2x asked; floor 2.37x, 2.5x target)") == {"1.78", "1.97", "2.37"}


def test_readme_starts_with_the_two_commands() -> None:
    commands = [b.code.strip() for b in setup_commands()]
    assert commands == [
        "bash scripts/setup.sh && SPECIESCLF_WEIGHTS=../shared/models speciesclf classify ../shared/images/imagenet-samples",
        "bash scripts/setup.sh && python3 -m pytest -q",
    ]
    assert "python3 -m pytest -q" in (ROOT / ".ci" / "run").read_text()


# A measured ratio has two decimals (1.99x, or a range 1.78-1.97x); a target has fewer (the 2x asked).
MEASURED_RATIO = re.compile(r"\b(\d+\.\d\d)(?:-(\d+\.\d\d))?x")


def measured_ratios(text: str) -> set[str]:
    return {number for match in MEASURED_RATIO.findall(text) for number in match if number}


def test_readme_status_figures_are_the_performance_sections() -> None:
    """A measured ratio in the status table is one the performance section gives."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    status = text.split("## What is here", 1)[1].split("\n## ", 1)[0]
    performance = text.split("## Performance", 1)[1].split("\n## ", 1)[0]
    missing = sorted(measured_ratios(status) - measured_ratios(performance))
    assert not missing, f"the status table states {missing}, which the performance section does not give"


def test_page_blocks_finds_shown_output_and_indented_blocks(tmp_path: Path) -> None:
    """A ```text block right after a ```bash block is its output; a block indented under a list item is a
    block too (it runs, or carries a skip marker): no command escapes the test by its indentation."""
    page = tmp_path / "page.md"
    page.write_text(
        "Intro.\n\n```bash\necho hello 1\n```\n\n```text\nhello 7\n```\n\n"
        "* a list item:\n\n  <!-- docs-test: skip (a server) -->\n  ```bash\n  speciesclf serve\n  ```\n\n"
        "```bash\necho alone\n```\n\nProse between.\n\n```text\nnot its output\n```\n",
        encoding="utf-8",
    )
    blocks = page_blocks(page)
    assert [(b.line, b.language) for b in blocks] == [(3, "bash"), (7, "text"), (14, "bash"), (18, "bash"), (24, "text")]
    assert blocks[0].output == "hello 7\n"
    assert shape_problem(blocks[0].output, "hello 2\n") is None and shape_problem(blocks[0].output, "bye 2\n")
    assert blocks[2].code == "speciesclf serve\n" and blocks[2].marker == "skip (a server)"
    assert blocks[3].output is None  # prose between: an illustration, not its output
