"""``normlab study``: run a preset's runs (resuming), then write summary and report."""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from normlab.studies.data import ByteCorpus
from normlab.studies.report import load_metrics, make_plots, write_html
from normlab.studies.spec import RunSpec, Study
from normlab.studies.train import Env, Interrupted, run_one


def apply_overrides(study: Study, *, seeds: int | None = None, steps: int | None = None) -> Study:
    """``seeds``: run every configuration with seeds 0..seeds-1; ``steps``: train for that
    many steps (intervals scaled to match). Probes keep their own settings."""
    runs: list[RunSpec] = list(study.runs)
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds: expected >= 1, got {seeds}")
        bases: dict[str, RunSpec] = {}
        for r in runs:
            bases.setdefault(re.sub(r"-s\d+$", "", r.name), r)
        runs = [replace(r, name=f"{base}-s{s}", seed=s) for base, r in bases.items() for s in range(seeds)]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps: expected >= 1, got {steps}")
        runs = [r if r.kind == "probe" else r.with_overrides(
            steps=steps, eval_every=max(1, steps // 4), diag_every=max(1, steps // 6),
            checkpoint_every=max(1, steps // 2), warmup_steps=min(r.warmup_steps, steps // 2),
            log_every=max(1, min(r.log_every, steps // 10))) for r in runs]
    return replace(study, runs=tuple(runs))


def _work(r: RunSpec) -> int:
    return r.probe_batches if r.kind == "probe" else r.steps


def run_study(study: Study, out: Path, env: Env, *, data: str | None = None,
              console: Console | None = None) -> tuple[list[dict[str, Any]], Path | None]:
    """Run (or resume) every run of ``study`` under ``out/<study>``; returns the results and
    the report's path (None on ranks other than 0)."""
    console = console or Console()
    study_dir = out / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    needs_corpus = any(r.task == "lm" for r in study.runs)
    corpus = ByteCorpus.from_path(data) if needs_corpus else None
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not env.is_main,
    )
    try:
        with progress:
            overall = progress.add_task(f"{study.name}: {len(study.runs)} runs",
                                        total=sum(_work(r) for r in study.runs))
            done_before = 0
            for spec in study.runs:
                task_id = progress.add_task(spec.name, total=_work(spec))

                def on_step(n: int, task_id=task_id, base=done_before) -> None:
                    progress.update(task_id, completed=n)
                    progress.update(overall, completed=base + n)

                result = run_one(spec, study_dir / spec.name, env, corpus, on_step=on_step)
                results.append(result)
                done_before += _work(spec)
                progress.update(task_id, completed=_work(spec))
                progress.update(overall, completed=done_before)
                progress.remove_task(task_id)
                if env.is_main:
                    _write_summary(study_dir, results)
    except Interrupted:
        if env.is_main:
            _write_summary(study_dir, results)
        raise
    report = None
    if env.is_main:
        meta = {"runs": len(results), "device": str(env.device), "dtype": env.dtype, "processes": env.world,
                "torch": torch.__version__, "python": platform.python_version(),
                "data": corpus.source if corpus else "synthetic", "wall time (s)": f"{time.perf_counter() - started:.0f}"}
        report = write_report(study_dir, study, results, meta)
    return results, report


def _write_summary(study_dir: Path, results: list[dict[str, Any]]) -> None:
    (study_dir / "summary.json").write_text(json.dumps(results, indent=1, default=str))


def write_report(study_dir: Path, study: Study, results: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    metrics = {r["name"]: load_metrics(study_dir / r["name"]) for r in results}
    plots = make_plots(study_dir, results, metrics)
    return write_html(study_dir, study.name, study.description, study.claims, results, plots, meta)
