"""Tracked files speak of the product, not of how it was made: no work sitting or ticket named by
number ("session 7", "issues 14 and 18", "sessions 3-7") and no first-person diary lines ("I ran ...").
Things are named by their content and date instead ("the pilot of 2026-11-29")."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: A work sitting or ticket named by number, alone or as a range or list ("sessions 3-7", "issue #14").
NUMBERED = re.compile(r"\b(?:sessions?|sittings?|issues?|tickets?)[\s-]+#?\d+", re.IGNORECASE)
#: First-person diary phrasing: "I" and a verb in the past tense of doing the work.
DIARY = re.compile(
    r"\bI (?:did|wrote|ran|re-?ran|paused|stopped|restarted|measured|re-?measured|added|fixed|changed|tried|"
    r"found|moved|kept|chose|started|timed|killed|decided|noticed|replaced|removed|looked|checked|made|used|"
    r"saw|left|set|packaged|trained|copied|deleted)\b"
)
#: Not prose the project writes: the tests (they quote the markers), request data sets, fitted weights
#: and the machine-written unit records of a study.
EXCLUDED = (re.compile(r"^tests/"), re.compile(r"\.(?:jsonl|csv)$"), re.compile(r"^docs/calibration/"),
            re.compile(r"^results/[^/]+/units/"))


def process_markers(text: str) -> list[tuple[int, str]]:
    """(line number, marker) for every work-history marker in ``text``."""
    return [(number, match.group(0)) for number, line in enumerate(text.splitlines(), 1)
            for pattern in (NUMBERED, DIARY) for match in pattern.finditer(line)]


def _tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in names.decode().split("\0"):
        path = ROOT / name
        if not name or any(p.search(name) for p in EXCLUDED) or not path.is_file():
            continue
        head = path.read_bytes()[:8192]
        if b"\0" not in head:  # text, not an image or weights
            files.append(path)
    return files


@pytest.mark.parametrize("text, expected", [
    ("as measured in session 7.", ["session 7"]),
    ("(issues 14 and 18)", ["issues 14"]),
    ("over sessions 3-7", ["sessions 3"]),
    ("the session-7 pilot runs", ["session-7"]),
    ("see issue #39", ["issue #39"]),
    ("13.5 min of which I paused it", ["I paused"]),
    ("I wrote the rule after seed 1", ["I wrote"]),
])
def test_the_markers_are_found(text, expected):
    assert [marker for _, marker in process_markers(text)] == expected


@pytest.mark.parametrize("text", [
    "the pilot of 2026-11-29", "a unit run over several sittings", "issues = _DataIssues()",
    "What should I do if I think ...", "I am sorry, but I cannot help with that.", "5 issues found",
])
def test_product_words_pass(text):
    assert process_markers(text) == []


def test_no_tracked_file_speaks_of_how_it_was_made():
    files = _tracked_text_files()
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files)
    hits = [f"{path.relative_to(ROOT)}:{number}: {marker!r}"
            for path in files
            for number, marker in process_markers(path.read_text(encoding="utf-8", errors="replace"))]
    assert not hits, "work-history markers in tracked files:\n" + "\n".join(hits)
