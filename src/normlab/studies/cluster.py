"""A study's runs as jobs on a cluster, through submitit (the optional ``normlab[cluster]``).

Each run is one job. It writes to its own folder under the study's output folder, which
the jobs and the submitting command share (a cluster's shared file system): its
checkpoint as it trains, its ``result.json`` when done. Nothing else passes between
them, so the command that submitted the jobs, or a later ``normlab study PRESET
--report-only``, merges whatever has finished into one summary and report.

``launcher="slurm"`` submits to SLURM; a job that SLURM preempts or times out is
requeued by submitit and resumes from its run's last checkpoint. ``launcher="local"``
runs the same jobs as local subprocesses through submitit's local executor (all at
once: for a few runs, and for the tests); on one machine ``--workers`` is the better
tool. Why submitit and not Ray: docs/studies.md, "Runs on a cluster".

``check_launch`` refuses launcher settings that cannot hold, before anything runs; the
command calls it first, and ``submit`` again for callers of the API.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.studies.spec import RunSpec
from normlab.studies.train import same_run, write_atomic

LAUNCHERS = ("local", "slurm")


def _submitit():
    try:
        import submitit
    except ImportError as err:
        raise ImportError("normlab study --launcher needs submitit: pip install 'normlab[cluster]'") from err
    return submitit


@dataclass(frozen=True)
class JobOptions:
    """What each run's job asks the cluster for."""

    partition: str | None = None   # SLURM partition
    time_min: int = 60             # wall-time limit per job; a job over it is requeued and resumes
    cpus_per_run: int = 1          # CPU cores (and torch threads) per run
    gpus_per_run: int = 0          # GPUs per run (0: the run trains on the CPU)
    mem_gb: float | None = None    # memory per job
    max_parallel: int | None = None  # SLURM: at most this many of the study's jobs at once


# the command's launcher options, in the order they are checked; the first two go to SLURM only
LAUNCH_OPTIONS = ("--partition", "--max-parallel", "--time-min", "--cpus-per-run", "--gpus-per-run", "--mem-gb",
                  "--wait", "--no-wait")
_SLURM_ONLY = ("--partition", "--max-parallel")


def check_launch(launcher: str | None, options: JobOptions | None = None, *, given: Collection[str] = (),
                 report_only: bool = False) -> None:
    """Refuse launcher settings that cannot hold, before anything is loaded, run or
    submitted: raises ValueError with one line that names the option and what it expects.

    ``launcher`` None: the runs run on this machine (or none run, ``report_only``).
    ``given``: the launcher options the user gave, spelled as their flags
    (``LAUNCH_OPTIONS``); given without the launcher they apply to, they would be ignored,
    so they are refused. ``options``' values are checked whoever gave them."""
    options = options or JobOptions()
    if launcher is not None and launcher not in LAUNCHERS:
        raise ValueError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if launcher is not None and report_only:
        raise ValueError("--report-only runs nothing; it cannot combine with --launcher")
    if launcher is not None:
        try:
            _submitit()
        except ImportError as err:
            raise ValueError(f"--launcher {launcher}: {err}") from None
    for flag in (f for f in LAUNCH_OPTIONS if f in given):
        if flag in _SLURM_ONLY and launcher != "slurm":
            raise ValueError(f"{flag} only applies with --launcher slurm")
        if launcher is None:
            raise ValueError(f"{flag} only applies with --launcher"
                             + (" (--report-only runs nothing)" if report_only else ""))
    if not options.time_min >= 1:
        raise ValueError(f"--time-min: expected >= 1 (minutes), got {options.time_min}")
    if not options.cpus_per_run >= 1:
        raise ValueError(f"--cpus-per-run: expected >= 1, got {options.cpus_per_run}")
    if not options.gpus_per_run >= 0:
        raise ValueError(f"--gpus-per-run: expected >= 0, got {options.gpus_per_run}")
    if options.mem_gb is not None and not options.mem_gb > 0:
        raise ValueError(f"--mem-gb: expected > 0, got {options.mem_gb:g}")
    if options.max_parallel is not None and not options.max_parallel >= 1:
        raise ValueError(f"--max-parallel: expected >= 1, got {options.max_parallel}")
    if launcher == "slurm" and not options.partition:
        raise ValueError("--launcher slurm: expected --partition (the SLURM partition to submit to)")


def job_device(device_type: str, options: JobOptions) -> str:
    """The device type a job's run trains on: "cuda" when the job gets GPUs
    (``gpus_per_run``), else "cpu". ``device_type`` is the study's (``--device``, or its
    default): a study on CUDA whose jobs get no GPU is refused, as its runs would train on
    CPUs under a GPU's name. A study on a CPU may submit GPU jobs (a login node without
    GPUs submits to a GPU partition)."""
    if options.gpus_per_run > 0:
        return "cuda"
    if device_type == "cuda":
        raise ValueError("--device cuda (given, or the default where CUDA is available): the jobs get no GPU "
                         "(--gpus-per-run 0), so their runs would train on CPUs; give --gpus-per-run N, or "
                         "--device cpu")
    return "cpu"


def run_in_job(spec: RunSpec, run_dir: str, data: str | None, corpus: Any, dtype: str, device: str,
               threads: int, keep_weights: bool, expect_corpus: str | None = None) -> dict[str, Any] | None:
    """One run, inside its job: the same ``run_one`` as every other way of running it,
    resuming from the run's checkpoint when the job is a requeued one.

    ``expect_corpus``: the sha256 of the corpus the submitting command read; a job that
    reads another (the default corpus is its node's Python's standard library, and a
    node may run another Python) refuses with ValueError before it trains: its run
    would be made on other bytes than the study's, and the study would not take it."""
    import platform

    from normlab.studies.data import ByteCorpus, stdlib_root
    from normlab.studies.train import Env, Interrupted, RunBusy, run_one

    torch.set_num_threads(threads)
    if corpus is None and spec.task == "lm":
        corpus = ByteCorpus.from_path(data)
    if expect_corpus is not None and corpus is not None and spec.task == "lm" and corpus.sha256() != expect_corpus:
        where = (f"the default corpus (no --data) is this node's Python's standard library ({stdlib_root()}, "
                 f"Python {platform.python_version()}), not the submitting machine's" if data is None
                 else f"--data {data} reads other bytes here than on the submitting machine")
        raise ValueError(f"run {spec.name}: this job's corpus (sha256 {corpus.sha256()[:12]}) is not the study's "
                         f"({expect_corpus[:12]}): {where}; give --data with a corpus every node reads the same, or "
                         "run the jobs with the submitting machine's Python")
    try:
        return run_one(spec, Path(run_dir), Env(device=torch.device(device), dtype=dtype), corpus,
                       keep_weights=keep_weights)
    except RunBusy as e:  # a job of another submission runs it: that one finishes it
        print(e, flush=True)
        return None
    except Interrupted as e:
        if e.result is None:
            raise
        print(e, flush=True)  # interrupted as it finished: its result is written, and the job's work done
        return e.result


try:  # the optional extra; without it RunJob is a plain callable and ``submit`` says what to install
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - exercised only without the extra
    _Checkpointable = object


class RunJob(_Checkpointable):
    """``run_in_job`` as a submitit job: on preemption or timeout it resubmits itself with
    the same arguments, and the run resumes from its checkpoint."""

    def __call__(self, *args):
        return run_in_job(*args)


def check_slurm_here(launcher: str | None) -> None:
    """``--launcher slurm`` needs SLURM's commands on this machine (a login node)."""
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("--launcher slurm: sbatch is not on this machine's PATH; submit from a SLURM login "
                         "node, or run the jobs here with --launcher local")


def submit(runs: list[RunSpec], study_dir: Path, launcher: str, options: JobOptions, *, data: str | None,
           ship_corpus: Any, dtype: str, keep_weights: bool, device: str = "cpu",
           expect_corpus: str | None = None,
           identities: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Submit one job per run; returns {run name: submitit Job} and records the job ids in
    ``study_dir/jobs.json``, with each run's identity (``identities``: ``run_identity``,
    what a later command compares its own run with) and, for a local job, its process's
    (``process_identity``: a pid alone may be another process's by then). The jobs' files
    go to a folder of their own for this submission, ``study_dir/jobs/<time>-<random>/``
    (``<job id>_0_log.out`` and ``.err``, the result): local job ids are pids, which a
    later submission may be given again. Each job reads the corpus from ``data`` (the
    default corpus when None) unless ``ship_corpus`` hands it one in memory, and checks
    that it is the corpus of sha256 ``expect_corpus`` (``run_in_job``). ``device``: the
    study's device type; the jobs train on ``job_device(device, options)``."""
    if launcher is None:
        raise ValueError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got None")
    check_launch(launcher, options)
    check_slurm_here(launcher)
    device = job_device(torch.device(device).type, options)
    submitit = _submitit()
    # one folder per submission, each job's files in it named by its job id (a %j in the
    # folder itself would be taken literally by submitit's local executor)
    folder = Path("jobs") / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    executor = submitit.AutoExecutor(folder=study_dir / folder, cluster=launcher)
    params: dict[str, Any] = dict(name=f"normlab-{study_dir.name}", timeout_min=options.time_min,
                                  cpus_per_task=options.cpus_per_run, gpus_per_node=options.gpus_per_run)
    if options.mem_gb is not None:
        params["mem_gb"] = options.mem_gb
    if launcher == "slurm":
        params["slurm_partition"] = options.partition
        if options.max_parallel:
            params["slurm_array_parallelism"] = options.max_parallel
    executor.update_parameters(**params)
    jobs: dict[str, Any] = {}
    with executor.batch():
        for spec in runs:
            jobs[spec.name] = executor.submit(
                RunJob(), spec, str(study_dir / spec.name), data, ship_corpus, dtype, device,
                options.cpus_per_run, keep_weights, expect_corpus)
    record = read_jobs(study_dir)
    specs = {spec.name: spec for spec in runs}
    for name, job in jobs.items():
        entry: dict[str, Any] = {"job_id": job.job_id, "launcher": launcher, "folder": folder.as_posix(),
                                 "fingerprint": specs[name].fingerprint()}
        if identities and name in identities:
            entry["identity"] = identities[name]
        if launcher == "local" and (proc := process_identity(job.job_id)) is not None:
            entry["process"] = proc
        record[name] = entry
    # swapped in whole: a kill part way through the write keeps the earlier records (the
    # jobs of an earlier submission, which a re-run must not submit twice)
    write_atomic(study_dir / "jobs.json", json.dumps(record, indent=1))
    return jobs


# the SLURM states of a job that ended without finishing (sacct's names)
_ENDED = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def ended_jobs(study_dir: Path, names: Collection[str], busy: Callable[[str], bool],
               identity: Callable[[str], dict[str, Any]] | None = None) -> dict[str, str]:
    """Of the runs ``names`` (none of them finished), those whose last submitted job
    (``jobs.json``) has ended all the same: run name -> why, for ``--report-only`` to
    report them failed rather than not finished. A run that ``busy`` says a process holds
    (or that finished meanwhile) is never one; nor is one whose job is alive
    (``job_alive``: a requeued SLURM job keeps its old result file), nor one whose job was
    submitted as another run (``identity(name)``: the run's identity now; a job recorded
    with another, other settings, dtype or corpus, is not this run's). A job ended when
    submitit's result file holds an error; when a SLURM job's state is one of ``_ENDED``;
    or, for a local job (a process that may have been killed outright), when its process
    is gone and it left no result."""
    record = read_jobs(study_dir)
    if not any(name in record for name in names):
        return {}
    try:
        submitit = _submitit()
    except ImportError:  # a report read where the cluster extra is not installed: those runs stay not finished
        warnings.warn("submitit is not installed here, so whether the unfinished runs' jobs (jobs.json) have ended "
                      "cannot be read: they are reported as not finished (pip install 'normlab[cluster]' to tell "
                      "the jobs that ended without a result)", RuntimeWarning, stacklevel=3)
        return {}
    out: dict[str, str] = {}
    for name in names:
        entry = record.get(name)
        if not isinstance(entry, dict) or "job_id" not in entry or busy(name):
            continue
        if identity is not None and isinstance(entry.get("identity"), dict) \
                and not same_run(entry["identity"], identity(name)):
            continue  # a job of the run under other settings: its end is not this run's failure
        job_id, launcher, folder = str(entry["job_id"]), entry.get("launcher"), job_folder(study_dir, entry)
        job = (submitit.SlurmJob if launcher == "slurm" else submitit.LocalJob)(folder, job_id)
        state = _slurm_state(job) if launcher == "slurm" else None
        if _alive(job_id, state, entry.get("process")) is not False:  # alive, or unknown here (no sacct)
            continue
        log = folder / f"{job_id}_0_log.err"
        pickled = job.paths.result_pickle
        status, payload = None, None
        if pickled.exists():
            try:
                with open(pickled, "rb") as f:
                    status, payload = pickle.load(f)
            except Exception:  # (a torn file: read as no result)
                pass
        if status == "error" and _interrupted(payload):
            continue  # Ctrl-C (or the job's stop signal) saved the run at a step: it resumes, not failed
        if status == "error":
            out[name] = f"job {job_id} raised:\n{payload}"
        elif state is not None:
            if state.split()[0] in _ENDED:
                out[name] = f"job {job_id} ended {state} without a result (its log: {log})"
        elif status is None:
            out[name] = (f"job {job_id} is not running and left no result: killed, or it crashed outside Python "
                         f"(its log: {log})")
    return out


# the SLURM states of a job that has not ended (queued, running, requeued)
_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
           "SUSPENDED", "RESIZING", "STOPPED", "SIGNALING", "STAGE_OUT")


def _slurm_state(job: Any) -> str:
    try:
        return str(job.state).upper()
    except Exception:  # no sacct here
        return "UNKNOWN"


def job_alive(study_dir: Path, entry: Any) -> bool | None:
    """Whether the job ``entry`` (a ``jobs.json`` record) has not ended: a local job's
    process (its id is its pid) is alive, a SLURM job is queued or running; None when
    that cannot be told here (no sacct)."""
    if not isinstance(entry, dict) or "job_id" not in entry:
        return False
    job_id = str(entry["job_id"])
    slurm = entry.get("launcher") == "slurm"
    state = _slurm_state(_submitit().SlurmJob(job_folder(study_dir, entry), job_id)) if slurm else None
    return _alive(job_id, state, entry.get("process"))


def job_folder(study_dir: Path, entry: dict[str, Any]) -> Path:
    """Where a job's files are: its submission's folder (``jobs/`` for records older than
    those folders)."""
    folder = entry.get("folder")
    return study_dir / (folder if isinstance(folder, str) and folder.startswith("jobs") else "jobs")


def _alive(job_id: str, slurm_state: str | None, process: str | None = None) -> bool | None:
    """A SLURM job (its state given) is queued or running, None when its state is unknown;
    a local job (no state) has its process alive (its id is its pid; ``process``: the
    ``process_identity`` recorded at submission, which the pid's process must still have)."""
    if slurm_state is None:
        if process is not None:
            return bool(process) and process_identity(job_id) == process and _process_alive(job_id)
        return _process_alive(job_id)
    if slurm_state == "UNKNOWN":
        return None
    return slurm_state.split()[0] in _ACTIVE


def _process_alive(pid: str) -> bool:
    """The process ``pid`` exists and is not a zombie (Linux: /proc; elsewhere signal 0)."""
    try:
        n = int(pid)
    except ValueError:
        return False
    proc = Path(f"/proc/{n}/stat")
    if proc.parent.parent.exists() and Path("/proc/self").exists():
        try:
            return proc.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_identity(pid: str | int) -> str | None:
    """What tells process ``pid`` from a later one given the same pid: this boot's id and
    the process's start time (Linux: /proc); "" when no such process runs, None where
    /proc cannot tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{boot}:{fields[19]}"  # (field 22, the start time; fields[0] is field 3)
    except (OSError, ValueError, IndexError):
        return ""


def job_ids(record: dict[str, Any], names: Collection[str]) -> str:
    """The last job ids a ``read_jobs`` record holds for ``names``, as text ("" for none)."""
    return ", ".join(str(record[n]["job_id"]) for n in names if isinstance(record.get(n), dict)
                     and "job_id" in record[n])


def _interrupted(payload: object) -> bool:
    """A job's error that is normlab's ``Interrupted`` (the run saved its state and stops)."""
    # the traceback's last line is the exception raised (an error while handling an
    # Interrupted, a failed save, chains it: that job failed)
    lines = str(payload).rstrip().splitlines()
    return bool(lines) and lines[-1].startswith(("normlab.studies.train.Interrupted:", "Interrupted:"))


def read_jobs(study_dir: Path) -> dict[str, Any]:
    """``jobs.json``: run name -> its last job (job_id, launcher, fingerprint); {} for none.
    A file that does not hold such an object (torn, or edited) reads as {} with a warning
    naming it; entries that are not objects are left out."""
    path = study_dir / "jobs.json"
    try:
        data = json.loads(path.read_text())
    except OSError:
        return {}
    except ValueError:
        warnings.warn(f"{path} is not JSON (torn, or edited): its job records are not read", RuntimeWarning,
                      stacklevel=2)
        return {}
    if not isinstance(data, dict):
        warnings.warn(f"{path} holds a {type(data).__name__}, not an object of run names: its job records are "
                      "not read", RuntimeWarning, stacklevel=2)
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def wait(jobs: dict[str, Any], on_update, poll_s: float = 1.0,
         errors: dict[str, BaseException] | None = None) -> dict[str, BaseException]:
    """Wait for every job; ``on_update(done, running, failed, pending)`` after each poll
    (run names). Returns the failed runs' errors; ``errors``, when given, is filled with
    them as they come (a caller stopped part way still has those so far)."""
    failed: dict[str, BaseException] = {} if errors is None else errors
    done: set[str] = set()
    while True:
        running, pending = [], []
        for name, job in jobs.items():
            if name in done or name in failed:
                continue
            if job.done():
                try:
                    job.result()
                    done.add(name)
                except Exception as err:  # the job's error, with the run's traceback from its log
                    failed[name] = err
                continue
            (running if job.state.upper() in ("RUNNING", "COMPLETING") else pending).append(name)
        on_update(sorted(done), running, sorted(failed), pending)
        if not running and not pending:
            return failed
        time.sleep(poll_s)
