"""``normlab study``: run a preset's runs (resuming), then write summary, claims and report.

Runs are independent, so they run side by side in worker processes: on a CPU by
default one per core, one thread each (tiny models use a second thread poorly and a
second core fully); on GPUs one per GPU, or ``runs_per_gpu`` per GPU, each worker pinned
to one GPU. Every run is seeded, so its numbers depend on its settings and on the torch
thread count it trained at (recorded in its result as ``threads``), not on how many
workers ran the study: at the same thread count they are identical. The worker count
sets the thread count, though (``--workers 1``: every thread; N workers: a share each),
and another thread count sums in another order: fp32 rounding, which training amplifies
(a 20-step ``gns`` run ends about 4e-7 relative apart).
Under torchrun (one data-parallel run over the processes) the runs go one after another.

Ctrl-C finishes each running run's current step and saves it; ``summary.json`` holds
every finished run of the plan (those found on disk too) and the runs that failed and
have not run again since; the same command resumes. A run that raises, or whose worker
process dies, is reported failed and the others go on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Collection
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from normlab.provenance import code_record, describe_code
from normlab.studies import cluster
from normlab.studies.claims import judge_all, missing_runs
from normlab.studies.cluster import JobOptions
from normlab.studies.data import ByteCorpus
from normlab.studies.report import error_line as _error_line
from normlab.studies.report import load_metrics, make_plots, write_html, write_markdown
from normlab.studies.spec import RunSpec, Study
from normlab.studies.train import (
    CHECKPOINT,
    Env,
    FolderLock,
    Interrupted,
    RunBusy,
    build_model,
    checkpoint_misfit,
    differing_keys,
    model_config,
    read_result,
    run_config,
    run_differences,
    run_holder,
    run_identity,
    run_one,
    same_run,
    write_atomic,
)

_SEED_SUFFIX = re.compile(r"-s(\d+)$")  # a trained configuration's run name ends in its seed


def _base_name(name: str) -> str:
    """A run's name without its seed suffix: the configuration's."""
    return _SEED_SUFFIX.sub("", name)


def _rescaled(every: int, preset_steps: int, steps: int) -> int:
    """An interval of a run of ``preset_steps`` steps, for ``steps``: the same fraction of
    the run (the expressivity preset's majority runs evaluate 16 times, the others 3; the
    preset's own step count gives back its own interval), 0 (never) kept as 0."""
    if every == 0:
        return 0
    return max(1, round(every * steps / max(preset_steps, 1)))


MAX_SEEDS = 10_000


def apply_overrides(study: Study, *, seeds: int | None = None, steps: int | None = None) -> Study:
    """``seeds``: run every configuration, probes included, with seeds 0..seeds-1 (a speed
    run keeps its one seed); ``steps``: train for that many steps (evaluation, diagnostics
    and checkpoint intervals scaled in proportion, so each happens as often per run as in
    the preset, a warm-up cut to half of them); probes and speed runs keep their steps."""
    runs: list[RunSpec] = list(study.runs)
    if seeds is not None:
        if not 1 <= seeds <= MAX_SEEDS:  # (an enormous count spent minutes and gigabytes listing runs)
            raise ValueError(f"--seeds: expected an integer in [1, {MAX_SEEDS}], got {seeds}")
        bases: dict[str, RunSpec] = {}
        for r in runs:
            bases.setdefault(r.name if r.kind == "speed" else _base_name(r.name), r)
        runs = [r if r.kind == "speed" else replace(r, name=f"{base}-s{s}", seed=s)
                for base, r in bases.items() for s in (range(1) if r.kind == "speed" else range(seeds))]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps: expected >= 1, got {steps}")
        lost = sorted(r.name for r in runs if r.kind == "train" and r.warmup_steps > 0 and steps // 2 == 0)
        if lost:
            # (the warm-up is cut to half the steps: none at all would make a warm-up arm
            # the same run as its no-warm-up arm, and the warm-up claims compare the two)
            raise ValueError(f"--steps {steps} leaves no warm-up to runs that have one ({', '.join(lost[:3])}"
                             f"{', ...' if len(lost) > 3 else ''}); expected --steps >= 2")
        runs = [r if r.kind != "train" else r.with_overrides(
            steps=steps, eval_every=_rescaled(r.eval_every, r.steps, steps),
            diag_every=_rescaled(r.diag_every, r.steps, steps),
            checkpoint_every=_rescaled(r.checkpoint_every, r.steps, steps),
            warmup_steps=min(r.warmup_steps, steps // 2),
            log_every=max(1, min(r.log_every, steps // 10))) for r in runs]
    given = [f"--{flag} {value}" for flag, value in (("seeds", seeds), ("steps", steps)) if value is not None]
    # the preset's description names its own seeds and steps: the report's header says what ran
    description = study.description + (f" Run with {' '.join(given)}, which replace the preset's counts above."
                                       if given else "")
    return replace(study, runs=tuple(runs), description=description)


def _work(r: RunSpec) -> int:
    return r.probe_batches if r.kind in ("probe", "update") else r.steps if r.kind == "train" else 1


def _cost(r: RunSpec) -> float:
    """A rough relative cost, to start the longest runs first."""
    try:
        cfg = model_config(r)
    except (TypeError, ValueError):  # a bad model setting: the run itself reports it, in its turn
        return 0.0
    layers = cfg.n_layers * cfg.d_model ** 0.5
    return layers * (r.steps * r.batch_size * r.seq_len + r.val_bytes if r.kind == "train" else r.batch_size * 64)


def default_workers(env: Env, runs_per_gpu: int = 1) -> int:
    """``--workers auto``: in a single process, one worker per core on a CPU and
    ``runs_per_gpu`` per visible GPU on CUDA; under torchrun (or on another device) one."""
    if env.world > 1:
        return 1
    if env.device.type == "cuda":
        return len(gpu_plan(len(_gpus(env)), runs_per_gpu))
    if env.device.type != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def gpu_plan(n_gpus: int, runs_per_gpu: int = 1, workers: int | None = None) -> list[int]:
    """The GPU (an index into the visible ones) of each worker: worker k gets GPU
    k % n_gpus. ``workers`` None: ``n_gpus * runs_per_gpu`` workers, ``runs_per_gpu`` on
    each GPU; else that many, spread round-robin (``runs_per_gpu`` is then unused)."""
    if n_gpus < 1:
        raise ValueError("--device cuda: no GPU is visible")
    if runs_per_gpu < 1:
        raise ValueError(f"--runs-per-gpu: expected >= 1, got {runs_per_gpu}")
    if workers is None:
        workers = n_gpus * runs_per_gpu
    if workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {workers}")
    return [k % n_gpus for k in range(workers)]


def _gpus(env: Env) -> list[int]:
    """The CUDA device indices runs may use: the one named (``--device cuda:1``), else every visible one."""
    if env.device.index is not None:
        return [env.device.index]
    return list(range(torch.cuda.device_count()))


def _check_workers(env: Env, workers: int | None, runs_per_gpu: int | None, elsewhere: bool) -> None:
    """Refuse worker settings that cannot hold, before anything is loaded or run;
    ``elsewhere``: the runs go to --launcher jobs or none run (--report-only)."""
    if runs_per_gpu is not None:
        if runs_per_gpu < 1:
            raise ValueError(f"--runs-per-gpu: expected >= 1, got {runs_per_gpu}")
        if env.device.type != "cuda":
            raise ValueError(f"--runs-per-gpu places runs on GPUs; the device is {env.device.type} "
                             "(use --device cuda, or --workers on a CPU)")
        if elsewhere:
            raise ValueError("--runs-per-gpu runs on this machine; it cannot combine with --launcher or "
                             "--report-only (--gpus-per-run sizes a job)")
        if env.world > 1:
            raise ValueError("--runs-per-gpu cannot combine with torchrun (one data-parallel run over the "
                             "processes)")
        if workers is not None:
            raise ValueError("--runs-per-gpu and --workers: give one (the workers are the GPUs x --runs-per-gpu, "
                             "or --workers N spread over the GPUs)")
    if elsewhere:
        if workers not in (None, 1):
            raise ValueError("--workers runs on this machine; it cannot combine with --launcher or --report-only")
        if env.world > 1:
            raise ValueError("--launcher and --report-only cannot run under torchrun")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {workers}")
    if workers is not None and workers > 1:
        if env.world > 1:
            raise ValueError("--workers > 1 runs the runs side by side on this machine; it cannot combine with "
                             "torchrun (one data-parallel run over the processes)")
        if env.device.type not in ("cpu", "cuda"):
            raise ValueError(f"--workers > 1 runs on a CPU or CUDA GPUs, not on {env.device.type}")


# ------------------------------------------------------------------ provenance


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + f" ({os.cpu_count()} cores)"


def provenance(env: Env, corpus: ByteCorpus | None, *, workers: int, threads: int) -> dict[str, Any]:
    """What a reader needs to reproduce the study: code, libraries, machine and data."""
    out: dict[str, Any] = {
        **code_record(),
        "python_version": platform.python_version(), "platform": platform.platform(),
        "device": _device_name(env.device), "device_type": env.device.type, "dtype": env.dtype,
        "processes": env.world, "workers": workers, "threads": threads,
        "command": _command_line(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "corpus_source": None, "corpus_sha256": None,
    }
    if corpus is not None:
        out.update(corpus_source=corpus.source, corpus_files=corpus.n_files, train_bytes=int(corpus.train.numel()),
                   val_bytes=int(corpus.val.numel()), val_files_left_out=list(corpus.repeats_left_out),
                   corpus_sha256=corpus.sha256(),
                   unigram_val_loss=corpus.unigram_val_loss())
    return out


# ------------------------------------------------------------------ running


class StudyBusy(RuntimeError):
    """Another ``normlab study`` is running in the study's folder (it holds the folder's
    lock): two writers would interleave their runs' records."""


# the verdicts and the report a finished invocation writes (the plots stay: the report
# that names them is what would be read)
REPORT_FILES = ("claims.json", "claims.md", "index.html")


def _set_aside_stale_report(study_dir: Path, merge_command: str, console: Console) -> None:
    """An invocation stopped part way has rewritten summary.json for its own command; a
    report an earlier command left in the folder no longer matches it (other steps,
    seeds, runs): renamed to ``*.stale.*``, kept, not read, and the user told how to
    write the current one."""
    moved = []
    for name in REPORT_FILES:
        path = study_dir / name
        if path.exists():
            stem, _, ext = name.partition(".")
            path.replace(study_dir / f"{stem}.stale.{ext}")
            moved.append(name)
    if moved:
        console.print(f"{', '.join(moved)} came from an earlier command and no longer match summary.json: "
                      f"renamed *.stale.*; `{escape(merge_command)}` writes them for what has finished")


class StudyInterrupted(Interrupted):
    """Ctrl-C stopped the study: what each running run saved, and how to go on.
    ``runs``: the runs it cut off (they had started again in this invocation)."""

    def __init__(self, message: str, runs: tuple[str, ...] = ()) -> None:
        Exception.__init__(self, message)
        self.run, self.step, self.runs = None, None, tuple(runs)

    def __reduce__(self):
        return (StudyInterrupted, (str(self), self.runs))


def _interrupted(study: Study, runs: list[Interrupted]) -> StudyInterrupted:
    if not runs:
        return StudyInterrupted(f"interrupted before the next runs of {study.name!r} started; the finished runs "
                                "are in summary.json; re-run the same command to resume")
    cut = tuple(i.run for i in runs if i.run is not None)
    saved = [f"{i.run} (step {i.step})" for i in runs if i.step is not None]
    over = [i.run for i in runs if i.step is None]
    parts = ([f"saved {', '.join(saved)}"] if saved else []) + (
        [f"{', '.join(over)} keep{'s' if len(over) == 1 else ''} no checkpoint and "
         f"start{'s' if len(over) == 1 else ''} over"] if over else [])
    return StudyInterrupted(f"interrupted: {'; '.join(parts)}; re-run the same command to resume", cut)


def _stale_runs(study: Study, study_dir: Path, made_by=None) -> dict[str, list[str]]:
    """The study's runs whose folder holds work made with other settings, each with what
    differs (``train.run_differences``): a result, or a checkpoint (or the one a cut-off
    swap left aside), of another fingerprint, made on another corpus, dtype or device
    than ``made_by(spec)`` says (``train.run_identity``), or of another model: a result's
    recorded one, or a checkpoint's tensors (``train.checkpoint_misfit``: checkpoints
    made before the model was recorded say nothing else about it)."""
    stale: dict[str, list[str]] = {}
    for spec in study.runs:
        run_dir = study_dir / spec.name
        want = made_by(spec) if made_by else {"fingerprint": spec.fingerprint()}
        for path in (run_dir / "result.json", run_dir / CHECKPOINT / "state.json",
                     run_dir / (CHECKPOINT + ".old") / "state.json"):
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(found, dict):
                continue
            differs = run_differences(found, want)
            if any(d.startswith("settings:") for d in differs):  # (a model the settings changed: told there)
                differs = [_settings_differ(spec, found) if d.startswith("settings:") else d
                           for d in differs if not d.startswith("model:")]
            if not differs and path.name == "state.json":
                differs = _misfit(spec, path.parent / "model.safetensors")
            if differs:
                stale[spec.name] = differs
                break
    return stale


def _settings_differ(spec: RunSpec, found: dict[str, Any]) -> str:
    """A fingerprint that differs, told by the settings a result records (``config``)
    where they show it ("settings: steps 8, here 4"), else by the fingerprints."""
    try:
        want = json.loads(json.dumps(run_config(spec)))
    except ValueError:
        want = {}
    have = found.get("config") if isinstance(found.get("config"), dict) else {}
    if differs := differing_keys(have, want):
        return f"settings: {differs}"
    return f"settings: fingerprint {found.get('fingerprint')!r}, here {spec.fingerprint()!r}"


def _misfit(spec: RunSpec, weights: Path) -> list[str]:
    """``train.checkpoint_misfit`` for the run's model, built on the meta device (shapes
    alone, nothing allocated); nothing when the file cannot be read or the model not
    built: the run itself finds a damaged checkpoint, or a bad setting, in its turn."""
    try:
        with torch.device("meta"):
            model = build_model(spec)
        why = checkpoint_misfit(model, weights)
    except Exception:  # noqa: BLE001 - see above
        return []
    return [f"model: {why}"] if why else []


def _read_summary(study_dir: Path) -> dict[str, Any]:
    """The folder's summary.json as the last command wrote it; {} when there is none."""
    try:
        summary = json.loads((study_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _submitted_as(entry: Any, identity: dict[str, Any], overwrite: bool) -> bool:
    """Whether a running job (its ``jobs.json`` entry) runs the run ``identity`` describes:
    by the identity it was submitted with (its settings, corpus, dtype, device type),
    else, in records older than that, by its settings' fingerprint. A busy run with no
    record is taken as this one, except under --overwrite (which cannot replace it)."""
    if not isinstance(entry, dict) or not ("identity" in entry or "fingerprint" in entry):
        return not overwrite
    have = entry["identity"] if isinstance(entry.get("identity"), dict) else {"fingerprint": entry["fingerprint"]}
    return same_run(have, identity)


def _failed_before(summary: dict[str, Any], study: Study, made_by) -> dict[str, str]:
    """The runs of ``study`` a summary lists as failed -> their tracebacks (entries it
    cannot read skipped). A failure recorded with the run's identity (``run_identity``)
    counts only for the run ``made_by`` describes now: a run that failed under other
    settings has not run under these."""
    specs = {r.name: r for r in study.runs}
    out = {}
    for entry in summary.get("failed") or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in specs:
            continue
        if isinstance(entry.get("identity"), dict) and not same_run(entry["identity"], made_by(specs[name])):
            continue
        out[name] = str(entry.get("error") or "")
    return out


def _unplanned_runs(study: Study, study_dir: Path) -> list[str]:
    """The finished runs in the study's folder (a run folder with a result) that are not in
    ``study.runs``: runs of seeds beyond ``--seeds``, or of configurations this plan has
    not (another version of the preset). Nothing reads them: the summary, claims and
    report are the plan's."""
    planned = {r.name for r in study.runs}
    try:
        folders = [d for d in study_dir.iterdir() if d.name not in planned and d.is_dir()]
    except OSError:
        return []
    return sorted(d.name for d in folders if read_result(d / "result.json") is not None)


def _unplanned_warning(study: Study, study_dir: Path, unread: list[str]) -> str:
    """Why the finished runs ``unread`` (``_unplanned_runs``) were not read, and how to read them."""
    bases = {_base_name(r.name) for r in study.runs if r.kind != "speed"}
    seeds = [int(m.group(1)) for name in unread if (m := _SEED_SUFFIX.search(name)) and _base_name(name) in bases]
    why = []
    if seeds:
        why.append(f"{len(seeds)} of seeds outside this plan's (--seeds {max(seeds) + 1} or more reads them)")
    if len(seeds) < len(unread):
        why.append(f"{len(unread) - len(seeds)} of configurations this plan does not have (another version of the "
                   "preset)")
    shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
    return (f"{len(unread)} finished run(s) of {study.name!r} in {study_dir} were not read ({shown}): "
            f"{'; '.join(why)}. The summary, claims and report hold the {len(study.runs)} planned run(s) only "
            "(summary.json: provenance.runs_not_read)")


def _default_corpus_note(corpus: ByteCorpus) -> str:
    from normlab.studies import data  # (its stdlib_root: where the default corpus was read)

    return (f"the default corpus (no --data) is this Python's standard library ({data.stdlib_root()}, Python "
            f"{platform.python_version()}; sha256 {corpus.sha256()[:12]}), so runs made with another Python read "
            "other bytes")


def _refuse_stale(study: Study, study_dir: Path, stale: dict[str, list[str]], report_only: bool,
                  corpus: ByteCorpus | None = None) -> None:
    """Raise ValueError naming the runs made with other settings, what differs in each,
    the last command run in the folder, and the ways on. ``corpus``: the default corpus
    (this Python's standard library) when the runs would resume on it: runs made with
    another Python's are told apart from runs of another --data."""
    try:
        made_by = _read_summary(study_dir)["provenance"]["command"]
    except (KeyError, TypeError):
        made_by = None
    names = ", ".join(list(stale)[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
    how = f"; the last command there: `{made_by}`" if made_by else ""
    what = "; ".join(f"{name}: {', '.join(differs)}" for name, differs in list(stale.items())[:5])
    what = f"what differs: {what}" + (f"; and {len(stale) - 5} more run(s)" if len(stale) > 5 else "")
    head = f"{study_dir} holds {len(stale)} run(s) made with other settings ({names}{how})"
    if any(d.startswith("model:") for differs in stale.values() for d in differs):  # (settings alike: _stale_runs)
        what += ("; a model that differs under the same options was made by another version of normlab, which "
                 "resolved it otherwise: no option of this one remakes it (--overwrite replaces such runs, --out "
                 "another folder leaves them)")
    other_corpus = any(d.startswith("corpus:") for differs in stale.values() for d in differs)
    # (the split changed once: runs from before it read other validation bytes, whatever the options)
    split = (". A corpus that differs may also come from a version of normlab that split it otherwise: since "
             "validation leaves out files repeating the training text, runs made before read other validation "
             "bytes, and no option remakes them (--overwrite replaces them, --out another folder leaves them)"
             if other_corpus else "")
    if report_only:
        raise ValueError(f"{head}: give the options they were made with to report them ({what}){split}")
    if corpus is not None and other_corpus:
        raise ValueError(f"{head}: {_default_corpus_note(corpus)} ({what}). To resume them, re-run with the Python "
                         "they were made with, or with --data giving the corpus they were made on if they were made "
                         "with one; --overwrite replaces them, --out another folder leaves them. A corpus given with "
                         f"--data is the same under every Python{split}")
    raise ValueError(f"{head}: re-run with the options they were made with to resume them, --overwrite to replace "
                     f"them, or --out another folder ({what}){split}")


def run_study(study: Study, out: Path, env: Env, *, data: str | None = None, console: Console | None = None,
              workers: int | None = None, keep_weights: bool = True,
              corpus: ByteCorpus | None = None, launcher: str | None = None,
              job_options: JobOptions | None = None, wait: bool = True,
              report_only: bool = False, runs_per_gpu: int | None = None, overwrite: bool = False,
              merge_command: str | None = None) -> tuple[list[dict[str, Any]], Path | None]:
    """Run (or resume) every run of ``study`` under ``out/<study>``, then judge its claims
    and write the report; returns the results and the report's path (None on ranks other
    than 0, and when jobs were submitted without waiting for them).

    ``launcher`` ("local" or "slurm", see ``normlab.studies.cluster``) submits each
    unfinished run as a job; ``wait=False`` returns once they are submitted.
    ``report_only`` runs nothing: it merges the runs that have finished (by anyone) into
    the summary and report, and lists the others as not finished (the runs the last
    summary recorded as failed, and not finished since, stay failed). Finished runs in the
    folder that are not in ``study.runs`` (seeds beyond ``--seeds``, a configuration the
    preset dropped) are not read: a RuntimeWarning names them (provenance ``runs_not_read``).
    A summary written part way (after each run, on Ctrl-C) holds every finished run of
    the plan found on disk, and the last summary's failures of the runs not run since.

    ``workers`` None (auto): one per core on a CPU, ``runs_per_gpu`` (default 1) per
    visible GPU on CUDA. On CUDA worker k runs on GPU k % GPUs (``gpu_plan``).

    The study holds its folder's lock while it runs: a second study on the same folder
    raises ``StudyBusy`` (``report_only`` takes no lock: it only reads the runs). A folder
    whose runs were made with other settings (another ``--steps``, an older preset) is
    refused with ValueError, and nothing in it is touched, unless ``overwrite``: those
    runs then start over. The error names what differs in each run (its settings, corpus,
    dtype, device or model).

    The default corpus (no ``data``, or a ``corpus`` of the standard library) is the
    running Python's standard library, so another Python build reads other bytes. A
    study refuses to resume runs made on another one: the resumed steps would train on
    a second corpus, and the report judges them against this one's baselines. Under
    ``report_only`` such runs are reported, with a warning naming them: each finished
    whole on one corpus, recorded in its result, and a folder copied from another
    machine would otherwise have no report at all; the provenance lists them
    (``runs_on_other_corpora``). Another ``data`` is refused under ``report_only`` too:
    a corpus named on purpose says which runs are meant.

    ``merge_command``: the command that merges the finished runs, shown when jobs go on
    without this process (``wait=False``, or Ctrl-C while waiting); the CLI gives the
    invocation's own options (default ``normlab study NAME --report-only``)."""
    console = console or Console()
    merge_command = merge_command or f"normlab study {study.name} --report-only"
    _check_workers(env, workers, runs_per_gpu, launcher is not None or report_only)
    loaded = None  # --data read before the study's folder is made: a refused one leaves nothing behind
    if data is not None and corpus is None and any(r.task == "lm" for r in study.runs):
        loaded = ByteCorpus.from_path(data)
    study_dir = out / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(study_dir)
    if env.is_main and not report_only:
        holder = lock.acquire()
        if holder is not None:
            raise StudyBusy(f"another normlab study{f' (pid {holder})' if holder else ''} is running in "
                            f"{study_dir}; wait for it to finish, or give another --out")
    try:
        return _run_study(study, study_dir, env, data=data, console=console, workers=workers,
                          keep_weights=keep_weights, corpus=corpus, launcher=launcher, job_options=job_options,
                          wait=wait, report_only=report_only, runs_per_gpu=runs_per_gpu, overwrite=overwrite,
                          merge_command=merge_command, loaded=loaded)
    finally:
        lock.release()


def _run_study(study: Study, study_dir: Path, env: Env, *, data, console, workers, keep_weights, corpus, launcher,
               job_options, wait, report_only, runs_per_gpu, overwrite,
               merge_command, loaded=None) -> tuple[list[dict[str, Any]], Path | None]:
    job_device = cluster.job_device(env.device.type, job_options or JobOptions()) if launcher is not None else None
    corpus_given = corpus is not None  # (a corpus the caller gave: shipped to jobs; --data's, read by them)
    if corpus is None and any(r.task == "lm" for r in study.runs):
        corpus = loaded if loaded is not None else ByteCorpus.from_path(data)
    device_type = None if report_only else job_device or env.device.type  # (--report-only: runs of any device)
    default_corpus = corpus if corpus is not None and corpus.source == "python-stdlib" else None
    any_corpus = report_only and default_corpus is not None  # (see run_study: reported, with a warning)

    identities: dict[str, dict[str, Any]] = {}  # (built once per run: the loops below ask again)

    def made_by(spec: RunSpec) -> dict[str, Any]:  # a run found finished or saved must match it
        if spec.name not in identities:
            identity = run_identity(spec, corpus, env.dtype, device_type)
            if any_corpus:
                identity.pop("corpus_sha256", None)
            identities[spec.name] = identity
        return identities[spec.name]

    stale = _stale_runs(study, study_dir, made_by)
    if stale and (report_only or not overwrite):
        _refuse_stale(study, study_dir, stale, report_only, default_corpus)
    if launcher is not None or report_only:
        workers = 1
    workers = default_workers(env, runs_per_gpu or 1) if workers is None else workers
    workers = min(workers, max(1, len(study.runs)))  # more workers than runs: the spare ones idle
    threads = max(1, torch.get_num_threads() // workers) if workers > 1 else torch.get_num_threads()
    devices = [str(env.device)] * workers
    if env.device.type == "cuda" and workers > 1:
        gpus = _gpus(env)
        devices = [f"cuda:{gpus[i]}" for i in gpu_plan(len(gpus), workers=workers)]
    prov = provenance(env, corpus, workers=workers, threads=threads) if env.is_main else {}
    if prov and env.device.type == "cuda" and workers > 1:
        prov.update(worker_devices=devices, runs_per_gpu=runs_per_gpu)
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}  # run name -> its traceback: the other runs go on
    # a summary written before every run is reached (after each run, or on Ctrl-C) holds
    # what the folder held too: the runs finished on disk (``found``), and the runs the last
    # summary lists as failed that have not run again since (``earlier_failed``; ``rerun``:
    # the runs this invocation started, whose earlier failure it supersedes)
    found: dict[str, dict[str, Any]] = {}
    earlier_failed: dict[str, str] = {}
    rerun: set[str] = set()
    baselines: dict[tuple[int, int], dict[str, float]] = {}

    def with_baselines(spec: RunSpec, result: dict[str, Any]) -> dict[str, Any]:
        if corpus is not None and spec.task == "lm" and "baseline_val_loss" not in result:  # (one of its own)
            key = (spec.seq_len, spec.val_bytes)
            if key not in baselines:
                baselines[key] = corpus.baselines(*key)
            result.update(baselines[key])
        return result

    def scan() -> None:
        """``found``: the runs finished on disk (by an earlier command, or a job) that this
        invocation has not finished or failed."""
        for spec in study.runs:
            if spec.name in results or spec.name in failures:
                continue
            result = _finished_result(spec, study_dir / spec.name, made_by)
            if result is None:
                found.pop(spec.name, None)
            elif spec.name not in found:
                found[spec.name] = with_baselines(spec, result)

    if prov:
        prov["runs"] = len(study.runs)
        if report_only:
            prov["runs_found_finished"] = sum(_finished(spec, study_dir / spec.name, made_by) for spec in study.runs)
        else:
            scan()
            prov["runs_found_finished"] = len(found)
            names = {r.name for r in study.runs}
            earlier_failed.update({name: error for name, error in
                                   _failed_before(_read_summary(study_dir), study, made_by).items()
                                   if name in names and name not in found and name not in stale})
            # (stale: --overwrite replaces it)
        if unread := _unplanned_runs(study, study_dir):
            prov["runs_not_read"] = unread
            warnings.warn(_unplanned_warning(study, study_dir, unread), RuntimeWarning, stacklevel=3)
        if launcher is not None:
            options = job_options or JobOptions()
            prov.update(launcher=launcher, workers=None, threads=options.cpus_per_run, job_device=job_device,
                        job_options={k: v for k, v in vars(options).items() if v is not None})
        if report_only:
            prov.update(report_only=True, workers=None, threads=None)
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not env.is_main,
    )
    unwritable: list[str] = []

    def summary_runs() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """The finished runs and the failed ones, as far as known now (see ``found``)."""
        runs = {**{k: v for k, v in found.items() if k not in failures}, **results}
        failed = dict(failures)
        failed.update({name: text for name, text in earlier_failed.items()
                       if name not in runs and name not in failed and name not in rerun})
        return runs, failed

    def save_summary() -> None:
        """summary.json after each run; a write that fails (a full disk) is told once, and
        the runs go on (the last write, after them all, raises)."""
        if not env.is_main:
            return
        try:
            runs, failed = summary_runs()
            _write_summary(study_dir, study, _ordered(study, runs), prov, failed, made_by)
        except OSError as e:
            if not unwritable:
                console.print(f"[red]could not write {escape(str(study_dir / 'summary.json'))}:[/red] "
                              f"{escape(str(e))}" + ("" if report_only else "; the runs go on"))
            unwritable.append(str(e))

    def fail(spec: RunSpec, error: BaseException) -> None:
        failures[spec.name] = "".join(traceback.format_exception(error)).strip()
        console.print(f"[red]run {escape(spec.name)} failed:[/red] {escape(_error_line(failures[spec.name]))} "
                      "(traceback in summary.json)")
        save_summary()

    def finish(spec: RunSpec, result: dict[str, Any]) -> None:
        results[spec.name] = with_baselines(spec, result)
        save_summary()

    try:
        with progress:
            if report_only:
                _report_finished(study, study_dir, made_by, corpus if any_corpus else None, finish, failures, prov)
            elif launcher is not None:
                pending = [r for r in study.runs if not _finished(r, study_dir / r.name, made_by)]
                # runs an earlier submission's jobs hold (their lock) or will run (queued, or a
                # local job still starting): not submitted twice
                record = cluster.read_jobs(study_dir)
                busy = [r for r in pending if run_holder(study_dir / r.name) is not None
                        or (r.name in record and cluster.job_alive(study_dir, record[r.name]))]
                # ... and those jobs keep the settings they were submitted with
                other = [r.name for r in busy if not _submitted_as(record.get(r.name), made_by(r), overwrite)]
                if other:
                    shown = ", ".join(other[:8]) + (" ..." if len(other) > 8 else "")
                    ids = cluster.job_ids(record, other)
                    raise ValueError(f"{len(other)} run(s) are running in earlier jobs with other settings ({shown}), "
                                     "and a running run cannot be replaced: cancel the jobs"
                                     f"{f' ({ids})' if ids else ''}, then re-run")
                if busy:
                    shown = ", ".join(r.name for r in busy[:8]) + (" ..." if len(busy) > 8 else "")
                    console.print(f"{len(busy)} run(s) still running in earlier jobs, not submitted again: "
                                  + escape(shown))
                    pending = [r for r in pending if r not in busy]
                # a job that reads the corpus itself checks it reads this one (another Python's
                # standard library, on a node with another Python, is another corpus)
                jobs = cluster.submit(pending, study_dir, launcher, job_options or JobOptions(), data=data,
                                      ship_corpus=corpus if corpus_given else None, dtype=env.dtype,
                                      keep_weights=keep_weights, device=env.device.type,
                                      expect_corpus=corpus.sha256() if corpus is not None and not corpus_given
                                      else None, identities={r.name: made_by(r) for r in pending}) if pending else {}
                rerun.update(r.name for r in pending + busy)  # (run again: by this submission's jobs or earlier ones)
                if not wait:
                    console.print(f"submitted {len(jobs)} job(s) ({launcher}; ids in {study_dir / 'jobs.json'}); "
                                  f"`{merge_command}` merges the finished runs", markup=False, highlight=False,
                                  soft_wrap=True)  # (one line: a wrapped command pastes as two)
                    return [], None
                _wait_for_jobs(study, jobs, progress, fail, launcher, merge_command)
                for spec in study.runs:
                    if spec.name not in failures and (
                            result := _finished_result(spec, study_dir / spec.name, made_by)) is not None:
                        finish(spec, result)
                # runs an earlier submission's jobs still run (or took over from this one's)
                prov["not_finished"] = [r.name for r in study.runs if r.name not in results and r.name not in failures]
            elif workers == 1:
                _run_serial(study.runs, study.name, study_dir, env, corpus, progress, finish, keep_weights,
                            fail if env.world == 1 else None)
            else:
                # timings run alone, after the pool, with a worker's thread count: nothing shares the cores
                parallel = tuple(r for r in study.runs if r.kind != "speed")
                timed = tuple(r for r in study.runs if r.kind == "speed")
                _run_parallel(replace(study, runs=parallel), study_dir, corpus, progress, finish, fail,
                              keep_weights, workers, threads, devices=devices, dtype=env.dtype,
                              then=f"; then {len(timed)} timing run{'s' if len(timed) > 1 else ''} alone"
                              if timed else "")
                if timed:
                    before = torch.get_num_threads()
                    torch.set_num_threads(threads)
                    try:
                        _run_serial(timed, "timing", study_dir, env, corpus, progress, finish, keep_weights, fail)
                    finally:
                        torch.set_num_threads(before)
            # runs another process holds (RunBusy: a job of a --launcher submission runs them)
            left = [r.name for r in study.runs if r.name not in results and r.name not in failures]
            if left:
                prov["not_finished"] = left
    except (Interrupted, KeyboardInterrupt) as e:
        # the runs it cut off had started again; what finished meanwhile (a job's run) is read
        rerun.update(getattr(e, "runs", ()))
        if getattr(e, "run", None) is not None:
            rerun.add(e.run)
        if env.is_main and not report_only:
            scan()
        save_summary()
        if env.is_main and not report_only:
            _set_aside_stale_report(study_dir, merge_command, console)
        if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C: the workers stopped at once
            raise StudyInterrupted("interrupted at once: the running runs resume from their last checkpoints "
                                   "(or start over, those with none yet); re-run the same command to resume") from None
        raise
    finished, failed = summary_runs()  # (every run was reached: these are this invocation's, or its jobs')
    ordered = _ordered(study, finished)
    report = None
    if env.is_main:
        prov["wall_s"] = round(time.perf_counter() - started, 1)  # this invocation
        prov["run_time_s"] = round(sum(r.get("wall_s") or 0.0 for r in ordered), 1)  # every run, when it ran
        prov["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            _write_summary(study_dir, study, ordered, prov, failed, made_by)
            if warning := _code_warning(prov):
                warnings.warn(warning, RuntimeWarning, stacklevel=3)
            missing = missing_runs(study.runs, finished, failed)
            rows = judge_all(study.claims, ordered, study.margins, missing)
            write_atomic(study_dir / "claims.json", json.dumps(_json_safe(rows), indent=1))
            report = write_report(study_dir, study, ordered, prov, rows, failed, missing)
        except KeyboardInterrupt:  # the runs are over and saved: only the report is left to write
            raise StudyInterrupted(f"interrupted while writing the report: the runs are finished and saved; "
                                   f"`{merge_command}` writes the claims and the report") from None
    return ordered, report


def _report_finished(study: Study, study_dir: Path, made_by, default_corpus: ByteCorpus | None, finish,
                     failures: dict[str, str], prov: dict[str, Any]) -> None:
    """--report-only: hand every finished run to ``finish``; the runs that raised before
    (the last summary.json's ``failed``) and have not finished since stay failed, with
    their tracebacks, so a report never reads a run that raised as one merely not
    finished; the others are listed as not finished.

    ``default_corpus``: this Python's standard library, when the report reads on the
    default corpus; LM runs finished on another (``made_by`` does not compare the corpus
    then) are reported with a warning, each with its own corpus recorded, their unigram
    baselines their own (recorded with the result; in older results, those the last
    summary.json gave them on that corpus, else this corpus's),
    and the provenance lists them (``runs_on_other_corpora``: corpus sha256 -> runs).
    LM runs of more than one corpus (folders merged from two Pythons) are refused: a
    claim pairs them by seed on one validation set. Runs made with --data are refused:
    by their record (``corpus_default``, which ``made_by`` still compares), or, in
    records older than it, by the last summary's ``corpus_source``."""
    previous = _read_summary(study_dir)
    earlier = {r.get("name"): r for r in previous.get("runs") or [] if isinstance(r, dict)}
    earlier_prov = previous.get("provenance") if isinstance(previous.get("provenance"), dict) else {}
    earlier_source = earlier_prov.get("corpus_source")
    others: dict[str, list[str]] = {}
    here: list[str] = []  # the LM runs made on this corpus
    finished: list[tuple[RunSpec, dict[str, Any]]] = []
    for spec in study.runs:  # (read and checked first: a refusal leaves the summary as it was)
        result = _finished_result(spec, study_dir / spec.name, made_by)
        if result is None:
            continue
        finished.append((spec, result))
        theirs = result.get("corpus_sha256")
        if default_corpus is None or spec.task != "lm" or theirs is None:
            continue
        if theirs == default_corpus.sha256():
            here.append(spec.name)
            continue
        if result.get("corpus_default") is None and earlier_source not in (None, "python-stdlib"):
            # recorded before runs said which corpus they read: the last summary did
            raise ValueError(
                f"{study_dir} holds runs made with --data {earlier_source} ({spec.name} ...): give the same "
                f"--data to report them (the default corpus is this Python's standard library)")
        others.setdefault(theirs, []).append(spec.name)
        before = earlier.get(spec.name) or {}
        if before.get("corpus_sha256") == theirs:
            result.update({k: v for k, v in before.items() if k.startswith("baseline_val_loss")})
    corpora = {**others, **({default_corpus.sha256(): here} if here else {})}
    if len(corpora) > 1:
        # a claim pairs runs by seed on one validation set: runs of two corpora (two Pythons'
        # standard libraries, merged into one folder) read different bytes
        listed = "; ".join(f"{sha[:12]}: {', '.join(runs[:4])}{' ...' if len(runs) > 4 else ''}"
                           for sha, runs in corpora.items())
        raise ValueError(
            f"{study_dir} holds LM runs made on {len(corpora)} corpora ({listed}; this Python's is "
            f"{default_corpus.sha256()[:12]}): a claim pairs runs by seed on one validation set, which runs "
            f"of different corpora do not share. Report each set from a folder of its own (move one set's "
            f"run folders out), or rerun one set with --overwrite")
    done = {spec.name for spec, _ in finished}
    for spec, result in finished:
        finish(spec, result)
    names = {r.name for r in study.runs}
    # (a run another process holds now is running again, whatever an earlier summary said)
    failures.update({name: error for name, error in _failed_before(previous, study, made_by).items()
                     if name in names and name not in done and run_holder(study_dir / name) is None})
    # runs whose --launcher job ended without a result (it raised, SLURM ended it, or a
    # local job was killed) are failed, not "not finished": nothing will finish them
    waiting = [r.name for r in study.runs if r.name not in done and r.name not in failures]
    if waiting and (study_dir / "jobs.json").exists():
        specs = {r.name: r for r in study.runs}
        failures.update(cluster.ended_jobs(  # (a run that finished meanwhile is no ended job's)
            study_dir, waiting,
            lambda name: run_holder(study_dir / name) is not None or (study_dir / name / "result.json").exists(),
            identity=lambda name: made_by(specs[name])))
    prov["not_finished"] = [r.name for r in study.runs if r.name not in done and r.name not in failures]
    if others:
        prov["runs_on_other_corpora"] = others
        n = sum(len(v) for v in others.values())
        shown = ", ".join(run for runs in others.values() for run in runs[:5])
        warnings.warn(f"{n} finished run(s) were made on another corpus ({shown}): "
                      f"{_default_corpus_note(default_corpus)}. They are reported as they were made, each with its own "
                      "corpus recorded (summary.json: provenance.runs_on_other_corpora)", RuntimeWarning, stacklevel=3)


def _command_line() -> str:
    """This invocation, as a shell would take it back: quoted, and ``normlab`` for the
    console script and ``python -m normlab`` alike."""
    prog = Path(sys.argv[0]).name
    return shlex.join(["normlab" if prog in ("__main__.py", "normlab") else prog, *sys.argv[1:]])


def _counts(study: str, done: int, running: int, failed: int, total: int, where: str = "") -> str:
    """The progress view's headline: runs done, running and failed, across workers or jobs."""
    return (f"{study}: {done} done, {running} running, {failed} failed of {total}{where}")


def _wait_for_jobs(study: Study, jobs: dict[str, Any], progress: Progress, fail, launcher: str,
                   merge_command: str) -> None:
    """Wait for ``jobs``, failing the runs whose job raised. SIGTERM and SIGHUP stop the
    waiting as Ctrl-C does (``_stop_signals``; those this process was started with ignored
    stay ignored): SLURM jobs go on; local jobs stop, as a terminal's Ctrl-C stops them
    (their processes are in its process group), and a signal sent to this process alone
    stops them through submitit (``_stop_local_jobs``)."""
    specs = {r.name: r for r in study.runs}
    task = progress.add_task(_counts(study.name, 0, 0, 0, len(jobs), " jobs"), total=max(1, len(jobs)))

    def on_update(done, running, failed, pending) -> None:
        progress.update(task, completed=len(done) + len(failed),
                        description=_counts(study.name, len(done), len(running), len(failed), len(jobs), " jobs"))

    caught: list[int] = []

    def on_signal(signum, frame) -> None:
        caught.append(signum)
        raise KeyboardInterrupt

    previous = ({s: signal.signal(s, on_signal) for s in _stop_signals() if s != signal.SIGINT}
                if _in_main_thread() else {})
    errors: dict[str, BaseException] = {}  # (filled as jobs fail: those that failed before a stop count)
    try:
        cluster.wait(jobs, on_update, errors=errors)
    except KeyboardInterrupt:
        for name, err in errors.items():
            fail(specs[name], err)
        how = signal.Signals(caught[-1]).name if caught else "Ctrl-C"
        if launcher == "local":
            alive = _stop_local_jobs(jobs, signalled=bool(caught))
            if alive:  # (jobs that ignore SIGINT: this process was started with it ignored, a background job)
                shown = ", ".join(alive[:8]) + (" ..." if len(alive) > 8 else "")
                raise StudyInterrupted(
                    f"interrupted ({how}): {len(jobs) - len(alive)} of the {len(jobs)} local job(s) stopped; "
                    f"{len(alive)} go on ({shown}), and `{merge_command}` merges their runs once they finish; "
                    "re-run the same command: each stopped run resumes from its last checkpoint", tuple(jobs)) from None
            raise StudyInterrupted(f"interrupted ({how}): the local jobs stopped too; re-run the same command: "
                                   "each run resumes from its last checkpoint", tuple(jobs)) from None
        raise StudyInterrupted(f"stopped waiting ({how}) for {len(jobs)} job(s), which go on; `{merge_command}` "
                               "merges the finished runs", tuple(jobs)) from None
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
    for name, err in errors.items():
        fail(specs[name], err)


def _stop_local_jobs(jobs: dict[str, Any], signalled: bool, grace_s: float = 2.0, wait_s: float = 5.0) -> list[str]:
    """Stop the local jobs still running after a stop; returns the runs whose job is still
    running after ``wait_s``. A terminal's Ctrl-C reached them already (they share its
    process group): they get ``grace_s`` to end on their own. ``signalled`` (a SIGTERM or
    SIGHUP sent to this process) or a Ctrl-C that did not reach them: submitit cancels
    them (SIGINT to each job, which stops its run as Ctrl-C does: it saves at the end of
    its step, if that step ends within the second submitit then gives it)."""
    def running() -> list[str]:
        out = []
        for name, job in jobs.items():
            try:
                if not job.done():
                    out.append(name)
            except Exception:  # noqa: BLE001 - a job that cannot be asked is left as it is
                pass
        return out

    deadline = time.monotonic() + (0.0 if signalled else grace_s)
    while (alive := running()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name in alive:
        try:
            jobs[name].cancel(check=False)
        except Exception:  # noqa: BLE001 - (see above)
            pass
    deadline = time.monotonic() + wait_s
    while (alive := running()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _finished_result(spec: RunSpec, run_dir: Path, made_by=None) -> dict[str, Any] | None:
    """The run's result, read once, when it is this run's (``made_by``); else None."""
    result = read_result(run_dir / "result.json")
    return result if same_run(result, made_by(spec) if made_by else {"fingerprint": spec.fingerprint()}) else None


def _finished(spec: RunSpec, run_dir: Path, made_by=None) -> bool:
    return _finished_result(spec, run_dir, made_by) is not None


def _ordered(study: Study, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [results[r.name] for r in study.runs if r.name in results]


def _run_serial(runs, title, study_dir, env, corpus, progress, finish, keep_weights, fail=None) -> None:
    """One run after another; ``fail`` (None: raise) records a run that raised.

    SIGTERM and SIGHUP stop it as Ctrl-C does (a run saves at the end of its step), as
    they stop a study with workers; signals this process was started with ignored stay
    ignored (``_stop_signals``). Under torchrun (``env.world > 1``) only SIGINT: the
    launcher's SIGTERM to its ranks stays its "leave now"."""
    stop_signals = None
    previous: dict[int, Any] = {}
    if env.world == 1 and _in_main_thread():
        stop_signals = _stop_signals()
        previous = {s: signal.signal(s, signal.default_int_handler) for s in stop_signals if s != signal.SIGINT}
    try:
        _serial(runs, title, study_dir, env, corpus, progress, finish, keep_weights, fail, stop_signals)
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


def _serial(runs, title, study_dir, env, corpus, progress, finish, keep_weights, fail, stop_signals) -> None:
    overall = progress.add_task(_counts(title, 0, 0, 0, len(runs)), total=sum(_work(r) for r in runs))
    done_before, n_done, n_failed = 0, 0, 0
    for spec in runs:
        progress.update(overall, description=_counts(title, n_done, 1, n_failed, len(runs)))
        task_id = progress.add_task(spec.name, total=_work(spec))

        def on_step(n: int, task_id=task_id, base=done_before) -> None:
            progress.update(task_id, completed=n)
            progress.update(overall, completed=base + n)

        try:
            result = run_one(spec, study_dir / spec.name, env, corpus, on_step=on_step, keep_weights=keep_weights,
                             stop_signals=stop_signals)
        except Interrupted as e:
            if e.result is not None:  # Ctrl-C as the run finished: it counts, and the study stops
                finish(spec, e.result)
            raise
        except KeyboardInterrupt:  # a run with no step loop (a probe, a timing), or a second Ctrl-C
            if spec.kind == "train":
                raise StudyInterrupted(f"interrupted at once in run {spec.name!r}: it resumes from its last "
                                       "checkpoint (or starts over, with none yet); re-run the same command "
                                       "to resume", (spec.name,)) from None
            raise Interrupted(spec.name, None) from None
        except RunBusy as e:  # another process runs it (a job of a --launcher submission): not failed
            result = None
            warnings.warn(f"{e}; left to it (not finished here)", RuntimeWarning, stacklevel=2)
        except Exception as e:
            if fail is None:
                raise
            result = None
            n_failed += 1
            fail(spec, e)
        n_done += result is not None
        done_before += _work(spec)
        progress.update(overall, completed=done_before)
        progress.remove_task(task_id)
        progress.update(overall, description=_counts(title, n_done, 0, n_failed, len(runs)))
        if result is not None:
            finish(spec, result)


# worker-process state, set once by _init_worker
_WORKER: dict[str, Any] = {}


class WorkerDied(RuntimeError):
    """A run's worker process died without a Python error (a signal such as the
    out-of-memory killer's SIGKILL, a crash in native code, ``os._exit``). The run is
    reported failed; the pool is started again for the other runs."""


class _StopFlag:
    """The pool's stop flag: one byte of shared memory, read and written without a lock
    (a worker that dies holding an ``Event``'s lock would block the parent's ``set``)."""

    def __init__(self, ctx: Any) -> None:
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)


_START_ERROR = "__worker_start_error__"  # a progress-queue message: a worker's start-up failed


class WorkerStartFailed(RuntimeError):
    """The worker processes could not start (their initializer raised): every run of the
    pool is reported failed with that error, at once."""


@contextmanager
def _sigint_blocked():
    """SIGINT blocked in this thread (the processes it spawns inherit the mask), then as it
    was: a Ctrl-C meanwhile is delivered when the block ends. A no-op where the platform
    has no signal masks."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _init_worker(threads: int, train: torch.Tensor | None, val: torch.Tensor | None, source: str, n_files: int,
                 queue: Any, stop: Any, slots: Any = None, devices: tuple[str, ...] = ("cpu",),
                 dtype: str = "fp32", running: Any = None, pids: Any = None, retired: Any = None,
                 barrier: Any = None, sha256: str | None = None) -> None:
    try:
        os.setpgrp()  # a terminal's Ctrl-C reaches the parent alone, which tells the workers through ``stop``
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # outside a training run; run_one handles its own
        if hasattr(signal, "pthread_sigmask"):  # spawned with SIGINT blocked (``_sigint_blocked``): a pending one is ignored
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        _watch_parent()
        torch.set_num_threads(threads)
        device = _pin_worker(slots, devices)
        # (the corpus's sha256 as the parent computed it: each run's identity compares it)
        corpus = ByteCorpus(train, val, source, n_files, _sha256=sha256) if train is not None else None
        _WORKER.update(corpus=corpus, queue=queue, stop=stop, device=device, dtype=dtype, running=running,
                       retired=retired, poisoned=False, barrier=barrier)
        if running is not None:
            pids[_WORKER["slot"]] = os.getpid()
            signal.signal(signal.SIGTERM, _on_terminate)
    except BaseException:
        queue.put((_START_ERROR, traceback.format_exc()))  # the parent reports it for the pool's runs
        queue.close()
        queue.join_thread()
        raise


def _started(timeout: float) -> int:
    """A pool's first task for each worker: wait until every worker has started (so no
    worker is still being spawned once runs are handed out, and a start-up failure is
    told apart from a run's)."""
    barrier = _WORKER.get("barrier")
    if barrier is not None:
        barrier.wait(timeout)
    return os.getpid()


def _on_terminate(signum, frame) -> None:
    """The pool ends this worker because another one died: mark its run as cut off, not
    crashed (it resumes from its last checkpoint in the next pool), and exit."""
    running, k = _WORKER["running"], _WORKER.get("slot", 0)
    if running[k] > 0:
        running[k] = -running[k]
    os._exit(128 + signum)


def _watch_parent() -> None:
    """Make this worker notice the death of the study's process: on Linux the kernel
    sends it SIGHUP then (``PR_SET_PDEATHSIG``); elsewhere a daemon thread sends it once
    the worker's parent changes (it was handed to another). A worker runs in its own
    process group, so a killed study's or a closed terminal's signals do not reach it:
    unwatched, it would train on, hold its run's lock against the next study, and then
    wait forever for a run nobody sends.

    SIGHUP, not SIGTERM: SIGTERM is the pool's own "leave now" (``_on_terminate``), and
    when the study's process is killed the kernel may send the signal while the worker's
    parent pid still reads as alive (its other threads are still being torn down)."""
    import multiprocessing as mp
    import threading

    parent = mp.parent_process()
    _WORKER["parent"] = parent.pid if parent is not None else os.getppid()
    signal.signal(signal.SIGHUP, lambda signum, frame: _orphaned())
    if not _parent_death_signal(signal.SIGHUP):
        threading.Thread(target=_poll_parent, daemon=True, name="normlab-parent-watch").start()
    if _parent_gone():  # it died before the watch began
        _orphaned()


def _parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; False where
    that cannot be asked (another system, no libc to call)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(1, int(signum), 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _poll_parent() -> None:
    while not _parent_gone():
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGHUP)  # handled in the main thread, as the kernel's signal would be


def _parent_gone() -> bool:
    parent = _WORKER.get("parent")
    return parent is not None and os.getppid() != parent


def _orphaned() -> None:
    """The study's process died (killed, or its terminal closed): nobody takes this
    worker's results or hands it runs. A run it is running stops at the end of its
    current step and saves (``_worker_run``), and the worker then exits; between runs
    it exits at once. Its run's lock goes with it: the same command resumes the run."""
    _WORKER["orphaned"] = True
    if not _WORKER.get("in_run"):
        os._exit(128 + signal.SIGHUP)


def _pin_worker(slots: Any, devices: tuple[str, ...]) -> torch.device:
    """This worker's device: the k-th worker to start (``slots``, a shared counter) takes
    ``devices[k % len(devices)]``. A GPU becomes the worker's current device too: a
    spawned worker has not touched CUDA yet, and whatever ``run_one`` puts on "cuda"
    without an index lands on its own GPU."""
    k = 0
    if slots is not None:
        with slots.get_lock():
            k, slots.value = slots.value, slots.value + 1
    _WORKER["slot"] = k
    device = torch.device(devices[k % len(devices)])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# a CUDA error after which the process's CUDA context is unusable: every later call fails
# the same way (a kernel's illegal address, a device-side assert, a launch failure)
_STICKY_DEVICE_ERROR = re.compile(r"CUDA error|device-side assert|illegal memory access|unspecified launch failure"
                                  r"|CUBLAS_STATUS_EXECUTION_FAILED")


def _worker_run(spec: RunSpec, run_dir: Path, keep_weights: bool, index: int = -1) -> dict[str, Any] | None:
    """One run in a worker, on the worker's device; None when the study was stopped before
    it began. ``index``: the run's place in the pool's list, kept in the shared ``running``
    array while it runs (so the parent knows which run a dead worker was running).

    A run that fails with a CUDA error that leaves the device unusable to this process
    is reported as any failed run; the worker then retires at its next call (``retired``,
    exit), and the pool is started again, so the later runs get a sound device."""
    queue, stop = _WORKER["queue"], _WORKER["stop"]
    if stop.is_set():
        return None
    running, k = _WORKER.get("running"), _WORKER.get("slot", 0)
    if _WORKER.get("poisoned") and running is not None:
        _WORKER["retired"][k] = 1
        os._exit(75)  # EX_TEMPFAIL: the pool breaks; the parent starts a new one and sends this run again
    last, signalled = [0.0], [False]

    def on_step(n: int) -> None:
        if (stop.is_set() or _WORKER.get("orphaned")) and not signalled[0]:
            signalled[0] = True
            os.kill(os.getpid(), signal.SIGINT)  # run_one saves at the end of this step and stops
        now = time.monotonic()
        if now - last[0] > 0.2 or n == spec.steps:
            last[0] = now
            queue.put((spec.name, n))

    env = Env(device=_WORKER.get("device", torch.device("cpu")), dtype=_WORKER.get("dtype", "fp32"))
    if running is not None:
        running[k] = index + 1
    queue.put((spec.name, 0))  # running: the progress view counts it from now, not from its first step
    _WORKER["in_run"] = True  # (the study's process dying now stops the run at a step's end: _orphaned)
    try:
        return run_one(spec, run_dir, env, _WORKER["corpus"], on_step=on_step, keep_weights=keep_weights)
    except Interrupted as e:
        if e.result is None:
            raise
        return e.result  # stopped as it finished: its result counts (the stop flag holds back the next runs)
    except Exception as e:
        if _STICKY_DEVICE_ERROR.search(str(e)):
            _WORKER["poisoned"] = True
        raise
    finally:
        _WORKER["in_run"] = False
        if running is not None:
            running[k] = 0
        if _WORKER.get("orphaned"):  # what the run computed is saved; nobody waits for the rest
            os._exit(128 + signal.SIGHUP)


# a pool that breaks without naming a run that died (a worker killed between runs, or by
# SIGTERM from outside) is started again this many times before its runs are failed
POOL_RESTARTS = 3
# how long a pool's workers may take to start (import torch, the corpus, CUDA)
WORKER_START_S = 600.0


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is None or exitcode == 0:
        return "died"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}" + (" (often the out-of-memory killer)" if -exitcode == signal.SIGKILL else "")
    return f"exited with code {exitcode}"


def _run_parallel(study, study_dir, corpus, progress, finish, fail, keep_weights, workers, threads,
                  devices=None, dtype="fp32", target=None, then: str = "") -> None:
    """The runs in ``workers`` spawned processes of ``threads`` threads; worker k runs on
    ``devices[k]`` (default: all on the CPU) with autocast ``dtype``. ``target``: what a
    worker calls per run (default ``_worker_run``; tests pass a module-level wrapper).
    ``then``: what runs after the pool, said on the progress line (whose count is the pool's).

    A worker that dies outright breaks the process pool: its run is reported failed
    (``WorkerDied``, with the exit code or signal), the runs the pool cut off resume from
    their checkpoints in a new pool, and the study goes on."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot run in a forked child
    devices = tuple(devices or ["cpu"] * workers)
    specs = {r.name: r for r in study.runs}
    todo = sorted(study.runs, key=_cost, reverse=True)  # longest first: the pool ends together
    gpus = sorted({d for d in devices if d.startswith("cuda")})
    where = (f" on {workers} workers" + (f" ({len(gpus)} GPU{'s' if len(gpus) > 1 else ''})" if gpus else "")
             + then)
    overall = progress.add_task(_counts(study.name, 0, 0, 0, len(study.runs), where),
                                total=sum(_work(r) for r in study.runs))
    n_done, n_failed = [0], [0]
    bars: dict[str, Any] = {}
    completed: dict[str, int] = {}
    # the runs that finished or failed: a progress message that arrives after its run's
    # future (a queue's feeder thread may deliver it late) leaves them be (``_drain``)
    ended: set[str] = set()

    def end(spec: RunSpec, error: BaseException | None = None) -> None:
        """A run is over: its work counts in full (finished or failed, as the serial path
        counts it), its bar goes, and ``error`` (a failure) is reported."""
        ended.add(spec.name)
        completed[spec.name] = _work(spec)
        if spec.name in bars:
            progress.remove_task(bars.pop(spec.name))
        if error is not None:
            n_failed[0] += 1
            fail(spec, error)

    def show(running: int) -> None:
        progress.update(overall, completed=sum(completed.values()),
                        description=_counts(study.name, n_done[0], running, n_failed[0], len(study.runs), where))
    # the pool in use, with its stop flag; each pool has its own flag and progress queue,
    # as a worker that dies holding their lock leaves them unusable
    current: dict[str, Any] = {}
    stopping = [False]

    def on_sigint(signum, frame) -> None:
        if stopping[0]:  # a second Ctrl-C: stop the workers at once
            for proc in list((getattr(current.get("pool"), "_processes", None) or {}).values()):
                try:
                    os.kill(proc.pid, signal.SIGINT)
                except OSError:
                    pass
            raise KeyboardInterrupt
        stopping[0] = True
        if "stop" in current:
            current["stop"].set()

    def one_pool(runs: list[RunSpec]) -> tuple[list[RunSpec], Interrupted | None]:
        """``runs`` on a new pool; returns the runs a broken pool left unfinished (none
        when it did not break) and the interruption, if any."""
        n = min(workers, len(runs))
        queue, stop = ctx.Queue(), _StopFlag(ctx)
        running = ctx.Array("i", n, lock=False)  # worker slot -> 1 + index in ``runs`` while it runs one
        pids = ctx.Array("i", n, lock=False)  # worker slot -> its process id
        retired = ctx.Array("b", n, lock=False)  # worker slot -> 1 once it left after a CUDA error
        barrier = ctx.Barrier(n)  # every worker has started
        pool = ProcessPoolExecutor(
            max_workers=n, mp_context=ctx, initializer=_init_worker,
            initargs=(threads, corpus.train if corpus else None, corpus.val if corpus else None,
                      corpus.source if corpus else "", corpus.n_files if corpus else 0, queue, stop,
                      ctx.Value("i", 0), devices[:n], dtype, running, pids, retired, barrier,
                      corpus.sha256() if corpus else None))
        current.update(pool=pool, stop=stop)
        if stopping[0]:
            stop.set()
        procs = getattr(pool, "_processes", None)  # pid -> Process, for a dead worker's exit code (private)
        interrupted, broken = None, []
        try:
            # every worker started before any run is handed out: a pool that breaks while
            # a worker is still being spawned can leave that worker unterminated
            start_errors: list[str] = []
            try:
                # the workers are spawned here, each a new Python that imports torch before it
                # can leave the terminal's process group (``_init_worker``): they start with
                # SIGINT blocked, so a Ctrl-C meanwhile reaches this process alone (held here
                # until they are spawned), and no worker prints a KeyboardInterrupt of its own
                with _sigint_blocked():
                    starting = [pool.submit(_started, WORKER_START_S) for _ in range(n)]
                while not all(f.done() for f in starting):
                    wait(starting, timeout=0.2, return_when=FIRST_COMPLETED)
                    start_errors += _drain(queue, specs, bars, completed, progress, overall, ended)
                    if stopping[0]:
                        barrier.abort()  # the workers waiting for the others go on, to their end
                        return list(runs), None
                for f in starting:
                    f.result()
            except Exception as e:  # BrokenProcessPool, or the barrier's timeout
                barrier.abort()
                start_errors += _drain(queue, specs, bars, completed, progress, overall, ended)
                if start_errors:
                    for spec in runs:
                        end(spec, WorkerStartFailed(
                            f"run {spec.name}: the worker processes did not start:\n{start_errors[0]}"))
                    show(0)
                    return [], None
                broken_unexplained[0] += 1
                if not stopping[0]:
                    print(f"the worker pool did not start ({type(e).__name__}); starting it again", file=sys.stderr)
                return list(runs), None
            pending: dict[Future, RunSpec] = {
                pool.submit(target or _worker_run, spec, study_dir / spec.name, keep_weights, i): spec
                for i, spec in enumerate(runs)}
            while pending:
                done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(queue, specs, bars, completed, progress, overall, ended)
                for fut in done:
                    spec = pending.pop(fut)
                    if spec.name in bars:
                        progress.remove_task(bars.pop(spec.name))
                    if fut.cancelled():
                        continue
                    try:
                        result = fut.result()
                    except Interrupted as e:
                        interrupted = interrupted or e
                        cut_off.append(e)
                        continue
                    except BrokenProcessPool:
                        broken.append(spec)  # a worker died: sorted out below, once the pool has ended
                        continue
                    except RunBusy as e:  # another process runs it: that one finishes it, not failed
                        warnings.warn(f"{e}; left to it (not finished here)", RuntimeWarning, stacklevel=2)
                        continue
                    except Exception as e:  # the run's error, with the worker's traceback
                        end(spec, e)
                        continue
                    if result is not None:
                        n_done[0] += 1
                        end(spec)
                        finish(spec, result)
                show(len(bars))
                if stopping[0]:  # (the handler sets the pool's flag: the loop leaves its lock alone)
                    for fut in [f for f in pending if f.cancel()]:
                        pending.pop(fut)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if broken:
            # a worker that died still holds its run's index; the pool's SIGTERM made the
            # others mark theirs as cut off (negative)
            dead = sorted((running[k] - 1, pids[k]) for k in range(n) if running[k] > 0)
            for i, pid in dead:
                spec, proc = runs[i], procs.get(pid) if isinstance(procs, dict) else None
                how = _how_it_died(None if proc is None else proc.exitcode)
                end(spec, WorkerDied(f"run {spec.name}: its worker process {how} while running it; "
                                     "the other runs went on in a new pool"))
                broken = [r for r in broken if r.name != spec.name]
            if not dead and not any(retired):
                broken_unexplained[0] += 1
            show(0)
        return sorted(broken, key=_cost, reverse=True), interrupted

    broken_unexplained = [0]
    cut_off: list[Interrupted] = []  # the runs Ctrl-C stopped, as their workers reported them
    # SIGTERM (``kill``, a cancelled CI job) and SIGHUP (the terminal closed) stop the study
    # as Ctrl-C does: the workers save at a step boundary and the study exits interrupted
    previous = {s: signal.signal(s, on_sigint) for s in _stop_signals()} if _in_main_thread() else {}
    interrupted: Interrupted | None = None
    try:
        while todo and interrupted is None and not stopping[0]:
            todo, interrupted = one_pool(todo)
            if todo and broken_unexplained[0] > POOL_RESTARTS:
                for spec in todo:
                    end(spec, WorkerDied(f"run {spec.name}: the worker pool broke {broken_unexplained[0]} times "
                                         "without a run to blame (a worker killed between runs, or from outside)"))
                todo = []
                show(0)
        if stopping[0] or interrupted is not None:
            interrupted = _interrupted(study, cut_off)
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
    if interrupted is not None:
        raise interrupted


def _drain(queue, specs, bars, completed, progress, overall, ended: Collection[str] = ()) -> list[str]:
    """Show the progress the workers reported; returns the start-up errors among it.
    ``ended``: the runs already over (finished or failed), whose late messages (a queue's
    feeder thread can deliver them after the run's future) would bring back a bar that
    nothing removes and undo their counted work: left out."""
    import queue as queue_module

    errors = []
    while True:
        try:
            name, n = queue.get_nowait()
        except queue_module.Empty:
            break
        if name == _START_ERROR:
            errors.append(n)
            continue
        if name in ended:
            continue
        if name not in bars:
            bars[name] = progress.add_task(name, total=_work(specs[name]))
        progress.update(bars[name], completed=n)
        completed[name] = n
    progress.update(overall, completed=sum(completed.values()))
    return errors


def _stop_signals() -> list[int]:
    """The signals that stop a study with workers as Ctrl-C does: SIGINT, SIGTERM and
    SIGHUP, less those this process was started with ignored. ``nohup`` ignores SIGHUP
    so that a command outlives its terminal, and a shell starts a background job with
    SIGINT ignored so that the terminal's Ctrl-C leaves it alone: taking such a signal
    over would stop the study on exactly the event it was started to survive. A signal whose
    handler was installed outside Python (``getsignal`` gives None: an embedding program's)
    is left alone too: Python could not give it back afterwards."""
    wanted = (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
    return [s for s in wanted if s is not None and signal.getsignal(s) not in (signal.SIG_IGN, None)]


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------ outputs


def _json_safe(obj: Any) -> Any:
    """nan/inf -> None, so the files are strict JSON that any tool reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _note_code(results: list[dict[str, Any]], prov: dict[str, Any]) -> None:
    """Name in ``prov`` the runs that code other than this command's made (a report merges
    runs finished earlier, by other code or another torch: their numbers are that code's):
    ``runs_from_other_code`` (code, in words -> runs; a run resumed under several is under
    each of them that differs) and ``runs_without_code_record`` (results written before
    runs recorded it)."""
    here = {k: prov.get(k) for k in code_record()}
    other: dict[str, list[str]] = {}
    unrecorded: list[str] = []
    for r in results:
        records = r.get("code")
        if not isinstance(records, list) or not records:
            unrecorded.append(str(r.get("name")))
            continue
        for record in records:
            if isinstance(record, dict) and record.get("unrecorded"):  # (part of it resumed from an older checkpoint)
                unrecorded.append(str(r.get("name")))
            elif record != here:
                other.setdefault(describe_code(record), []).append(str(r.get("name")))
    for key, value in (("runs_from_other_code", other), ("runs_without_code_record", unrecorded)):
        if value:
            prov[key] = value
        else:
            prov.pop(key, None)


def _code_warning(prov: dict[str, Any]) -> str | None:
    """The warning a report made of other code's runs gives (``_note_code``); None when every run is this code's."""
    other, unrecorded = prov.get("runs_from_other_code") or {}, prov.get("runs_without_code_record") or []
    if not other and not unrecorded:
        return None
    parts = [f"{len(runs)} by {code} ({', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''})"
             for code, runs in other.items()]
    if unrecorded:
        parts.append(f"{len(unrecorded)} with no record of their code ({', '.join(unrecorded[:3])}"
                     f"{' ...' if len(unrecorded) > 3 else ''})")
    return (f"the report reads runs that other code than this command's ({describe_code(code_record())}) made: "
            + "; ".join(parts) + ". Their numbers are that code's (summary.json: provenance.runs_from_other_code, "
            "runs_without_code_record); to run them with this code, remove their folders")


def _write_summary(study_dir: Path, study: Study, results: list[dict[str, Any]], prov: dict[str, Any],
                   failures: dict[str, str] | None = None, made_by=None) -> None:
    """summary.json; each failed run with its identity, so a failure is not carried over
    to the run under other settings (``_failed_before``): the one it was recorded with
    when the failure is the last summary's (the same traceback: carried over, and
    ``made_by`` may be narrower now, as a report on another device's is), else this
    command's (``made_by``)."""
    specs = {r.name: r for r in study.runs}
    before = {e["name"]: e for e in _read_summary(study_dir).get("failed") or []
              if isinstance(e, dict) and isinstance(e.get("name"), str)}

    def failed(name: str, text: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": name, "error": text}
        earlier = before.get(name, {})
        if earlier.get("error") == text and isinstance(earlier.get("identity"), dict):
            entry["identity"] = earlier["identity"]
        elif made_by is not None and name in specs:
            entry["identity"] = made_by(specs[name])
        return entry

    if prov:
        _note_code(results, prov)
    summary = {"study": study.name, "description": study.description, "provenance": prov, "runs": results,
               "failed": [failed(name, text) for name, text in (failures or {}).items()]}
    # (one temporary file per writer: --report-only may run alongside)
    write_atomic(study_dir / "summary.json", json.dumps(_json_safe(summary), indent=1, default=str))


def write_report(study_dir: Path, study: Study, results: list[dict[str, Any]], prov: dict[str, Any],
                 rows: list[dict[str, Any]], failures: dict[str, str] | None = None,
                 missing: list[dict[str, Any]] | None = None) -> Path:
    """The plots, ``claims.md`` and ``index.html`` of ``results`` (each file swapped in
    whole); ``missing``: the planned runs that left no result (``missing_runs``), so that
    a configuration none of whose runs finished still has its row."""
    metrics = {r["name"]: load_metrics(study_dir / r["name"]) for r in results}
    plots = make_plots(study_dir, results, metrics)
    write_markdown(study_dir, study.name, rows, prov, results, failures, missing or ())
    return write_html(study_dir, study.name, study.description, rows, results, plots, prov, failures, missing or ())
