"""Every ```python block in README.md and docs/*.md runs, one fresh subprocess per page.

A page's blocks run in order in one namespace, so later blocks use earlier names. Directives,
HTML comments that the rendered page does not show:

- `<!-- not-tested: reason -->` right above a block: it is skipped (use sparingly).
- `<!-- file: NAME -->` right above a ```yaml (or any) block: the block is written to NAME
  in the working directory first, so the page shows the file its code loads.
- a comment whose first line is `<!-- test-setup` and whose last is `-->`: the Python
  lines between run (unseen by readers) where the comment stands, e.g. to define the
  `tracker` or `loader` a fragment uses.

The working directory also holds a copy of each non-Markdown file in docs/ (such as
default-policy.yaml). Tracebacks point at the page's own line numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from trainkit_tracking.testing import TrainkitStore

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
PAGE_TIMEOUT = 300

# A fence opens with ``` or ~~~ plus an info string, and closes with the same marker.
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<marker>```+|~~~+)[ \t]*(?P<info>[^\n`]*)$")
_SKIP = re.compile(r"^\s*<!--\s*not-tested:\s*(?P<reason>.*?)\s*-->\s*$")
_FILE = re.compile(r"^\s*<!--\s*file:\s*(?P<name>[\w./-]+)\s*-->\s*$")
_SETUP_OPEN = re.compile(r"^\s*<!--\s*test-setup\s*$")
_SETUP_CLOSE = re.compile(r"^\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the first code line in the page
    source: str
    skip_reason: str | None
    file_name: str | None


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown page, with the HTML comment right above each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if _SETUP_OPEN.match(lines[i]):
            j = i + 1
            while j < len(lines) and not _SETUP_CLOSE.match(lines[j]):
                j += 1
            source = "\n".join(lines[i + 1 : j]) + "\n"
            blocks.append(Block("python", i + 2, source, skip_reason=None, file_name=None))
            i = j + 1
            continue
        opened = _FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        marker = opened["marker"]
        indent = len(opened["indent"])
        lang = (opened["info"].split() or [""])[0].lower()
        # The nearest non-blank line above the fence may carry a directive.
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = _SKIP.match(above)
        file_ = _FILE.match(above)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(marker) and not lines[j].strip().strip(marker[0])
        ):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        blocks.append(
            Block(
                lang=lang,
                line=i + 2,
                source="\n".join(body) + "\n",
                skip_reason=skip["reason"] if skip else None,
                file_name=file_["name"] if file_ else None,
            )
        )
        i = j + 1
    return blocks


def _python_blocks(page: Path) -> list[Block]:
    return [b for b in parse_blocks(page.read_text(encoding="utf-8")) if b.lang in ("python", "py")]


TESTED_PAGES = [p for p in PAGES if any(b.skip_reason is None for b in _python_blocks(p))]

# Runs in the child: each block compiled under the page's path, padded so line numbers
# in a traceback are the page's own.
_RUNNER = """
import json, sys
payload = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__", "__file__": payload["page"]}
for block in payload["blocks"]:
    code = compile("\\n" * (block["line"] - 1) + block["source"], payload["page"], "exec")
    exec(code, namespace)
"""


def test_parse_blocks_reads_fences_and_directives() -> None:
    text = (
        "# T\n\n```python\nx = 1\n```\n\n<!-- not-tested: needs a GPU -->\n"
        "```python\ncuda()\n```\n<!-- file: a.yaml -->\n\n```yaml\nk: v\n```\n"
        "  ```py\n  y = x\n  ```\n\n<!-- test-setup\nz = 2\n-->\n"
    )
    blocks = parse_blocks(text)
    assert [(b.lang, b.line, b.source) for b in blocks] == [
        ("python", 4, "x = 1\n"),
        ("python", 9, "cuda()\n"),
        ("yaml", 14, "k: v\n"),
        ("py", 17, "y = x\n"),
        ("python", 21, "z = 2\n"),
    ]
    assert [b.skip_reason for b in blocks] == [None, "needs a GPU", None, None, None]
    assert blocks[2].file_name == "a.yaml"


def test_some_pages_have_tested_python() -> None:
    # Guards the parser: a regex that silently found nothing would make this suite empty.
    assert len(TESTED_PAGES) >= 5, TESTED_PAGES


@pytest.mark.slow
@pytest.mark.parametrize("page", TESTED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, trainkit_store: TrainkitStore, tmp_path: Path) -> None:
    blocks = parse_blocks(page.read_text(encoding="utf-8"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    for extra in DOCS.iterdir():
        if extra.is_file() and extra.suffix != ".md":
            (workdir / extra.name).write_bytes(extra.read_bytes())
    for block in blocks:
        if block.file_name is not None:
            target = workdir / block.file_name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.source, encoding="utf-8")
    runnable = [
        {"line": b.line, "source": b.source}
        for b in blocks
        if b.lang in ("python", "py") and b.skip_reason is None
    ]
    payload = tmp_path / "blocks.json"
    payload.write_text(json.dumps({"page": str(page), "blocks": runnable}), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(payload)],
        cwd=workdir,
        env=dict(os.environ),  # trainkit_store's store, spool dir and the network guard
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    rel = page.relative_to(ROOT)
    starts = ", ".join(str(b["line"]) for b in runnable)
    assert done.returncode == 0, (
        f"{rel}: its python blocks (starting at lines {starts}) exited {done.returncode}; "
        f"the traceback's line numbers are {rel}'s own.\n"
        f"--- stderr\n{done.stderr[-6000:]}\n--- stdout\n{done.stdout[-2000:]}"
    )


def test_changelog_page_is_a_copy_of_changelog() -> None:
    page = (DOCS / "changelog.md").read_text(encoding="utf-8")
    assert page == (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), (
        "docs/changelog.md differs from CHANGELOG.md: run `cp CHANGELOG.md docs/changelog.md` "
        "(bash .ci/docs.sh does it too)"
    )


def test_every_page_is_in_the_mkdocs_nav() -> None:
    # mkdocs --strict catches this too, but it is not installed in every test venv.
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = {next(iter(item.values())) for item in config["nav"]}
    on_disk = {p.name for p in DOCS.glob("*.md")}
    assert on_disk - in_nav == set(), "pages missing from mkdocs.yml nav"
    assert in_nav - on_disk == set(), "mkdocs.yml nav names pages that do not exist"
