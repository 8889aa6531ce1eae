"""Which code produced a result: normlab's version and the commit of its checkout, for
the provenance of studies and the headers of benchmark tables."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The commit of the checkout normlab runs from (with "-dirty" if it has changes), else None."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0 or not (Path(top.stdout.strip()) / "src" / "normlab").is_dir():
            return None
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def normlab_version() -> str | None:
    try:
        return importlib.metadata.version("normlab")
    except importlib.metadata.PackageNotFoundError:
        return None


def code_line() -> str:
    """"normlab 0.1.0, commit 1a2b3c4d5e6f" (what is known of it), for a table's header."""
    commit = git_commit()
    return f"normlab {normlab_version() or '(not installed)'}" + (f", commit {commit[:12]}" if commit else "")
