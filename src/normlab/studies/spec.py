"""What a study is: a declarative list of runs, and the claims its report checks."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

# the generator seed of the validation batches drawn from a generator (majority, seq2seq)
VAL_SEED = 10_000


@dataclass(frozen=True)
class RunSpec:
    """One training run (or, with kind="probe", one measurement at initialization).

    ``model`` holds TransformerConfig fields (vocab and sequence length come from the
    task); ``tags`` label the run for the report (e.g. {"warmup": "none"})."""

    name: str
    model: dict[str, Any]
    task: str = "lm"                 # "lm" (byte-level LM) | "seq2seq" (number -> words) | "majority"
                                     # (the majority class of a sequence, at every position; an encoder)
    kind: str = "train"              # "train" | "probe" (gradients at init, no update) | "update"
                                     # (the output change after one Adam update at init) | "speed"
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "constant"       # after warm-up: "constant" | "cosine" | "inverse_sqrt"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    eval_every: int = 50
    eval_batches: int = 4            # seq2seq: validation batches (a fixed seed, whatever the run's)
    val_bytes: int = 262_144         # LM: the fixed validation set judged at the end of the run
    val_bytes_during: int = 32_768   # LM: its prefix, evaluated every eval_every steps
    log_every: int = 10
    diag_every: int = 25
    checkpoint_every: int = 100
    probe_batches: int = 4
    total_gns: bool = False          # also the whole model's noise scale at each diagnostics step (the gns study)
    unselectable_keys: bool = False  # at the end, the fraction of attention keys no query can rank first
    task_options: dict[str, Any] = field(default_factory=dict)  # majority: {"classes": 20, "margin": 6}
    speed_against: dict[str, Any] = field(default_factory=dict)  # kind="speed": the baseline's model overrides
    speed_rounds: int = 12                                       # kind="speed": interleaved timing rounds
    tags: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.task in ("lm", "seq2seq", "majority"),
             f"task must be 'lm', 'seq2seq' or 'majority', got {self.task!r}"),
            (not self.task_options or self.task == "majority",
             f"task_options are for task 'majority', got {self.task_options!r} for task {self.task!r}"),
            (self.kind in ("train", "probe", "update", "speed"),
             f"kind must be 'train', 'probe', 'update' or 'speed', got {self.kind!r}"),
            (self.schedule in ("constant", "cosine", "inverse_sqrt"),
             f"schedule must be 'constant', 'cosine' or 'inverse_sqrt', got {self.schedule!r}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a finite number > 0, got {self.lr}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (min(self.eval_every, self.diag_every, self.checkpoint_every) >= 0,
             f"eval_every, diag_every and checkpoint_every must be >= 0 (0: never), got {self.eval_every}, "
             f"{self.diag_every} and {self.checkpoint_every}"),
            (self.eval_batches >= 1 and self.probe_batches >= 1,
             f"eval_batches and probe_batches must be >= 1, got {self.eval_batches} and {self.probe_batches}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            # a warm-up past the last step never reaches the lr the run is labelled with
            (self.kind != "train" or self.warmup_steps <= self.steps,
             f"warmup_steps must be <= steps ({self.steps}) for a training run, got {self.warmup_steps}"),
            # a negative max_norm flips every gradient (the run climbs the loss), nan makes
            # them nan (a divergence that is the setting's, not the model's)
            (self.grad_clip is None or (isinstance(self.grad_clip, (int, float)) and not isinstance(self.grad_clip, bool)
                                        and math.isfinite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be None (no clipping) or a finite number > 0, got {self.grad_clip!r}"),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            # a training run of no steps has no loss to report: it would read as a run that
            # neither learned nor diverged
            (self.steps >= 1 or self.kind != "train", f"steps must be >= 1 for a training run, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}"),
            # the LM's final validation set is judged in two halves (even and odd windows of
            # seq_len bytes: one picks the lr, the other is judged), so it needs two windows
            (self.val_bytes >= 2 * self.seq_len,
             f"val_bytes must be >= 2 * seq_len = {2 * self.seq_len} (two validation windows: the select and "
             f"test halves), got {self.val_bytes}"),
            (self.seq_len <= self.val_bytes_during <= self.val_bytes,
             f"val_bytes_during must be in [seq_len, val_bytes] = [{self.seq_len}, {self.val_bytes}] (at least one "
             f"window), got {self.val_bytes_during}"),
            # the majority task's validation sequences are judged in two halves too
            (self.task != "majority" or self.batch_size * self.eval_batches >= 2,
             f"batch_size * eval_batches must be >= 2 for task 'majority' (two validation sequences: the select "
             f"and test halves), got {self.batch_size} * {self.eval_batches}"),
            (self.speed_rounds >= 2, f"speed_rounds must be >= 2, got {self.speed_rounds}"),
            # the majority task's validation batches are its seed VAL_SEED's first steps: a
            # run of that seed would train on them
            (self.task != "majority" or self.seed != VAL_SEED,
             f"seed {VAL_SEED} is the majority task's validation seed (its training batches would be the "
             "validation batches): pick another seed"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"RunSpec {self.name!r}: {message}")
        if self.task == "majority":
            from normlab.studies.data import Majority

            try:
                Majority(**self.task_options).count_range(self.seq_len)
            except (TypeError, ValueError) as e:
                raise ValueError(f"RunSpec {self.name!r}: task_options {self.task_options!r}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.9, 0.98)))
        return cls(**d)

    def fingerprint(self) -> str:
        """Identifies the run's settings: a checkpoint is resumed only by the same spec."""
        d = self.to_dict()
        for key, default in _LATER_FIELDS.items():  # fields added later leave older runs' fingerprints as they were
            if d.get(key) == default:
                d.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, **kw: Any) -> RunSpec:
        d = self.to_dict()
        d.update({k: v for k, v in kw.items() if v is not None})
        return RunSpec.from_dict(d)


_LATER_FIELDS: dict[str, Any] = {"unselectable_keys": False, "task_options": {}}


@dataclass(frozen=True)
class Margin:
    """A claim's margin, fixed in the preset before any run, and why it is that number."""

    value: float
    why: str


@dataclass(frozen=True)
class Study:
    """A named, declarative list of runs; ``claims`` names the published findings
    (keys of ``normlab.studies.claims.CLAIMS``) that its report checks, ``margins`` the
    margin each is judged against (fixed here, before the runs)."""

    name: str
    description: str
    runs: tuple[RunSpec, ...]
    claims: tuple[str, ...] = ()
    margins: dict[str, Margin] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a run's name is its folder: two runs of one name would write over each other's
        # checkpoint and result, and the second would be taken as finished by the first
        seen: dict[str, int] = {}
        for run in self.runs:
            seen[run.name] = seen.get(run.name, 0) + 1
        repeated = [(name, n) for name, n in seen.items() if n > 1]
        if repeated:
            name, n = repeated[0]
            more = f" (and {len(repeated) - 1} more name(s))" if len(repeated) > 1 else ""
            raise ValueError(f"Study {self.name!r}: run name {name!r} is given {n} times{more}; each run "
                             "needs its own name (it names the run's folder)")


def read_jsonl(path: Any) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a run's ``metrics.jsonl``); [] when it is missing.
    A line that is not a JSON object (cut off by a kill mid-write, or damaged) is
    skipped with a warning naming the file and the line: the other records stay usable."""
    import warnings
    from pathlib import Path

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out, bad = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            out.append(record)
        else:
            bad.append(i)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} damaged line(s) (line {', '.join(map(str, bad[:5]))}"
                      f"{', ...' if len(bad) > 5 else ''})", RuntimeWarning, stacklevel=2)
    return out
