"""No file in the repository keeps the markers of a merge conflict left unresolved: in a
docstring or a README they break nothing a test would notice, yet show readers two
versions of the same text."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(rb"^(<{7} |={7}$|>{7} )", re.MULTILINE)
SKIPPED = {".png", ".jpg", ".ico", ".woff", ".woff2", ".db"}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not {".git", ".venv", "site"} & set(p.relative_to(ROOT).parts)
        ]
    return [ROOT / name.decode() for name in out.split(b"\0") if name]


def test_no_file_keeps_the_markers_of_a_merge_conflict() -> None:
    found = []
    for path in tracked_files():
        if path.suffix in SKIPPED or not path.is_file():
            continue
        text = path.read_bytes()
        for match in MARKER.finditer(text):
            line = text.count(b"\n", 0, match.start()) + 1
            found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, f"unresolved merge conflicts at {found}"
