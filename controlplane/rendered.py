"""Files generated from code and committed (alert rules, Grafana dashboards): write them, and tell what a
`--check` finds stale. `owned` names the (directory, glob) places whose files only the generator writes, so a
file it no longer makes is removed on render and reported on check."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path


def _orphans(files: Mapping[str, str], out_dir: Path, owned: Sequence[tuple[str, str]]) -> list[tuple[str, Path]]:
    return [(f"{sub}/{old.name}", old) for sub, pattern in owned for old in sorted((out_dir / sub).glob(pattern))
            if f"{sub}/{old.name}" not in files]


def write(files: Mapping[str, str], out_dir: Path, owned: Sequence[tuple[str, str]]) -> list[Path]:
    """Write every file under out_dir (relative path -> text), then remove owned files no longer generated
    (after: a write that fails leaves the old files in place)."""
    orphans = _orphans(files, out_dir, owned)
    written = []
    for rel, text in files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    for _rel, old in orphans:
        old.unlink()
    return written


def differences(files: Mapping[str, str], out_dir: Path, owned: Sequence[tuple[str, str]]) -> list[str]:
    """What differs between out_dir and a fresh render: one entry per file, with the start of its diff."""
    problems = []
    for rel, text in files.items():
        path = out_dir / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif (old := path.read_text()) != text:
            diff = list(difflib.unified_diff(old.splitlines(), text.splitlines(), f"committed/{rel}",
                                             f"rendered/{rel}", n=0, lineterm=""))
            problems.append(f"{rel}: differs ({len(diff) - 2} diff lines)\n" + "\n".join(diff[2:12]))
    problems += [f"{rel}: no longer generated" for rel, _old in _orphans(files, out_dir, owned)]
    return problems
