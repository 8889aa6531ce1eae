"""Which code produced a result: normlab's version and the commit of its checkout, for
the provenance of studies and the headers of benchmark tables."""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any


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


def code_record() -> dict[str, Any]:
    """The code this process runs: normlab's version, its checkout's commit and torch's
    version, as a study's run records them (read once per process: the code a process
    imported is what it runs, whatever the checkout holds later). A new dict each call."""
    return dict(_code_record())


@functools.lru_cache(maxsize=1)
def _code_record() -> dict[str, Any]:
    import torch

    return {"normlab_version": normlab_version(), "git_commit": git_commit(), "torch_version": torch.__version__}


def describe_code(record: Any) -> str:
    """A code record (``code_record``) in words: "normlab 0.1.0, commit 1a2b3c4d5e6f, torch 2.13.0"."""
    if not isinstance(record, dict):
        return "unrecorded code"
    commit = record.get("git_commit")
    return (f"normlab {record.get('normlab_version') or '(not installed)'}"
            + (f", commit {_short(str(commit))}" if commit else "")
            + f", torch {record.get('torch_version') or '?'}")


def code_line() -> str:
    """"normlab 0.1.0, commit 1a2b3c4d5e6f" (what is known of it), for a table's header."""
    commit = git_commit()
    return f"normlab {normlab_version() or '(not installed)'}" + (f", commit {_short(commit)}" if commit else "")


def _short(commit: str) -> str:
    """A commit's head, "-dirty" kept (a checkout with changes is not that commit)."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")
