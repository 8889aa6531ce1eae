"""Running a study: training loop, checkpoints and resume, Ctrl-C, data parallelism.

Each run writes ``<out>/<study>/<run>/``: ``metrics.jsonl`` (one JSON record per logged
step), ``checkpoint/`` (model, optimizer, scheduler, the running loss window and the
noise-scale EMA, every ``checkpoint_every`` steps and on Ctrl-C) and ``result.json``
once finished. Re-running the same command skips finished runs and resumes unfinished
ones from their checkpoint; because a batch and the step's dropout masks are pure
functions of (seed, step[, rank]), the resumed run's numbers equal an uninterrupted
run's. A result or checkpoint counts as the run's only if made with the same spec and on
the same corpus, dtype and device type (``run_identity``), which both record.

Under ``torchrun`` every rank takes its slice of each global batch (the batch size must
split evenly), the loss is the mean over the global batch's tokens, and DDP averages
the gradients: without dropout the loss curve matches a single-process run with the
same global batch (gloo on CPU, nccl on GPU); with dropout each rank draws its own
masks. Rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from normlab.models.checkpoint import save_model as save_normlab_model
from normlab.norms import sync_batch_statistics
from normlab.provenance import code_record
from normlab.studies.data import (
    VOCAB_SIZE,
    ByteCorpus,
    Majority,
    NumberWords,
    exact_match,
    fixed_windows,
    lm_batch,
)
from normlab.studies.spec import VAL_SEED, RunSpec, read_jsonl

CHECKPOINT = "checkpoint"
WEIGHTS = "model.safetensors"
EVAL_CHUNK = 64  # validation windows per forward pass (faster than larger ones on a CPU)
UNSELECTABLE_SEQUENCES = 8  # validation sequences whose attention inputs are tested for selectability


class Interrupted(Exception):
    """Ctrl-C during a run: its state was saved; re-run the same command to resume.
    ``step`` None: a run that keeps no checkpoint (a probe, a timing) and starts over.
    ``result``: the run's result, when Ctrl-C came in its last step: the run finished
    and wrote it, and the interruption still stops whatever would come next."""

    result: dict[str, Any] | None = None

    def __init__(self, run: str, step: int | None, result: dict[str, Any] | None = None) -> None:
        if result is not None:
            text = f"interrupted in run {run!r} as it finished (step {step}); its result is saved"
        elif step is None:
            text = f"interrupted in run {run!r}, which keeps no checkpoint (a probe or a timing) and starts over"
        else:
            text = f"interrupted in run {run!r} at step {step}; state saved"
        super().__init__(text + "; re-run the same command to resume")
        self.run, self.step, self.result = run, step, result

    def __reduce__(self):  # raised in a worker process, re-raised in the parent
        return (Interrupted, (self.run, self.step, self.result))


class RunBusy(RuntimeError):
    """Another process is running this run (it holds the run folder's lock): a job of an
    earlier submission, or another ``normlab study`` on the same folder."""


LOCK = ".lock"
# how long a run waits for its folder's lock before it is taken as run by another process:
# a probe (``run_holder``, by a launcher or ``--report-only``) holds it for an instant
RUN_LOCK_WAIT_S = 1.0
_NO_LOCKS_TOLD: list[bool] = []  # the warning that locks do not work here, once per process


class FolderLock:
    """An exclusive lock on a folder for as long as this object is held (``flock`` on
    ``<folder>/.lock``, which holds the owner's pid). The kernel releases it when the
    owner exits, however it exits, so a killed run never leaves a stale lock. Where the
    platform has no ``fcntl`` it locks nothing."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> int | None:
        """Take the lock; returns None, or the holder's pid (0 if unknown) when another
        process holds it (still, after trying for ``wait_s`` seconds: a ``run_holder``
        probe holds it for an instant)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux or macOS
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # EWOULDBLOCK / EAGAIN: another process holds it
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                holder = _holder_pid(fd)
                os.close(fd)
                return holder
            except OSError as e:  # no locks on this file system (NFS mounted nolock, Lustre without flock)
                os.close(fd)
                if not _NO_LOCKS_TOLD:
                    import warnings

                    _NO_LOCKS_TOLD.append(True)
                    warnings.warn(f"{self.path.parent}: this file system takes no locks ({e.strerror or e}); "
                                  "nothing stops two processes from writing here at once", RuntimeWarning,
                                  stacklevel=2)
                return None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            # the pid goes with the lock: a finished run's file named a worker that had
            # moved on to another run (or, later, an unrelated process with that pid)
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # (closing releases the flock)
            self._fd = None


def _holder_pid(fd: int) -> int:
    """The pid a lock file holds (0: unknown)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


def run_holder(run_dir: Path) -> int | None:
    """The pid holding the run's lock (0: unknown), or None when no process runs it.
    Probed with a shared lock, taken and dropped at once (the file is not written): a
    run starting meanwhile waits for it (``FolderLock.acquire``'s ``wait_s``)."""
    path = run_dir / LOCK
    if not path.exists():
        return None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_pid(fd)
    except OSError:  # no locks on this file system
        return None
    finally:
        os.close(fd)  # (closing drops a lock taken)
    return None


# ------------------------------------------------------------------ environment


@dataclass(frozen=True)
class Env:
    """Where runs execute: device, autocast dtype and the data-parallel group."""

    device: torch.device
    dtype: str = "fp32"  # "fp32" | "bf16" (autocast)
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def all_sum(self, value: float) -> float:
        """``value`` summed over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item()


def setup_env(device: str | None = None, dtype: str = "fp32") -> Env:
    """Env for this process; initializes torch.distributed when launched by torchrun."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype: expected 'fp32' or 'bf16', got {dtype!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Env(device=dev, dtype=dtype, rank=rank, world=world)


def teardown_env(env: Env) -> None:
    """Leave the process group together: no rank tears it down while another still talks."""
    if env.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------ what a run was made with


def run_identity(spec: RunSpec, corpus: ByteCorpus | None, dtype: str, device_type: str | None) -> dict[str, Any]:
    """What a run's numbers depend on besides its spec: the corpus (an LM's; the other
    tasks draw their own data), the autocast dtype, the device type, and the model as the
    code resolves it (``model_config``: the task's sequence lengths and vocabulary, the
    config's defaults), which can change while the spec, and so its fingerprint, stays
    the same (the seq2seq target length grew to fit the longest number). A run records
    these in its result and checkpoint, and one made with others is not taken as this
    run's (``same_run``). ``device_type`` None: any device (a report read on a machine
    without the GPUs the runs trained on)."""
    out: dict[str, Any] = {"fingerprint": spec.fingerprint(), "dtype": dtype}
    if device_type is not None:
        out["device_type"] = device_type
    if spec.task == "lm" and corpus is not None:
        out["corpus_sha256"] = corpus.sha256()
        # the default corpus (this Python's standard library) or a --data one: a report read
        # on another Python's default corpus takes only the runs made on the default one
        out["corpus_default"] = corpus.source == "python-stdlib"
    try:
        out["model_config"] = json.loads(json.dumps(model_config(spec).to_dict()))  # (as a record reads back)
    except (TypeError, ValueError):  # a bad model setting: the run itself reports it, in its turn
        pass
    return out


# how run_differences names each field of a run's identity
IDENTITY_FIELDS = {"fingerprint": "settings", "corpus_sha256": "corpus", "dtype": "dtype", "device_type": "device",
                   "model_config": "model", "corpus_default": "the default corpus (no --data)"}


def _shown(value: Any) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)  # a sha256: its head


def differing_keys(have: dict[str, Any], want: dict[str, Any], shown: int = 3) -> str:
    """The keys both record with other values, as "steps 8, here 4" (the first ``shown``);
    empty when none differ."""
    keys = [k for k, v in want.items() if k in have and have[k] != v]
    return ", ".join(f"{k} {have[k]!r}, here {want[k]!r}" for k in keys[:shown])


def run_differences(found: Any, identity: dict[str, Any]) -> list[str]:
    """What keeps ``found`` (a result.json or a checkpoint's state.json) from being the
    run ``identity`` (``run_identity``) describes, one phrase per field that differs and
    named as ``IDENTITY_FIELDS`` names it ("dtype: 'fp32', here 'bf16'"); empty when it
    is that run.

    The fingerprint must match; each other field only where ``found`` records it: runs
    written before a field was recorded are taken as they are, as nothing says
    otherwise. The model is compared key by key (a config field added later is missing
    from older records, and takes its default), and in records made before it was
    recorded on its own, with the model settings a result keeps in its ``config``."""
    if not isinstance(found, dict):
        return ["settings: not a run's record"]
    out = []
    for key, want in identity.items():
        label = IDENTITY_FIELDS.get(key, key)
        if key == "model_config":
            have = found.get("model_config")
            if not isinstance(have, dict):
                have = found.get("config") if isinstance(found.get("config"), dict) else {}
            if differs := differing_keys(have, want):
                out.append(f"{label}: {differs}")
        elif (key in found or key == "fingerprint") and found.get(key) != want:
            out.append(f"{label}: {_shown(found.get(key))}, here {_shown(want)}")
    return out


def same_run(found: Any, identity: dict[str, Any]) -> bool:
    """Whether ``found`` (a result.json or a checkpoint's state.json) was made by the run
    ``identity`` (``run_identity``) describes (``run_differences`` finds nothing)."""
    return not run_differences(found, identity)


def checkpoint_misfit(model: nn.Module, weights: Path) -> str | None:
    """What in the weights file ``weights`` (a checkpoint's, as ``save_model`` wrote it)
    does not fit ``model``: a tensor the model lacks or holds in another shape, or one of
    the model's it lacks; None when each fits. Read from the file's header alone, and
    ``model`` may be on the meta device: a run's settings can be checked against its
    checkpoint without building the model in memory.

    A checkpoint made before ``run_identity`` recorded the model says no more than its
    fingerprint, which a model's shape can change without (a task's sequence length);
    loading it would fail part way, with the model half overwritten. Tied weights are
    stored once, under either name: a tensor of the model counts as in the file when
    any name it goes by is."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    own = model.state_dict(keep_vars=True)  # (the tensors themselves: tied names share one)
    for k, shape in shapes.items():
        if k not in own:
            return f"the checkpoint holds {k}, which the model has not"
        if list(own[k].shape) != shape:
            return f"{k} is {shape} in the checkpoint, {list(own[k].shape)} here"
    stored = {id(own[k]) for k in shapes}
    lacking = [k for k, v in own.items() if id(v) not in stored]
    return f"the checkpoint lacks {lacking[0]}" if lacking else None


# ------------------------------------------------------------------ model, data, schedule


def model_config(spec: RunSpec):
    """The run's resolved ``TransformerConfig``: ``spec.model``'s settings over the
    config's own defaults, with the task's vocabulary and sequence length. The one place
    a run's model settings are read (nothing restates the config's defaults)."""
    from normlab.models import TransformerConfig

    if spec.task == "seq2seq":
        numbers = NumberWords()
        seq_len, vocab = max(numbers.src_len, numbers.tgt_len), VOCAB_SIZE
    elif spec.task == "majority":
        seq_len, vocab = spec.seq_len, Majority(**spec.task_options).classes
    else:
        seq_len, vocab = spec.seq_len, VOCAB_SIZE
    return TransformerConfig(**{"vocab_size": vocab, "max_seq_len": seq_len, **spec.model})


def build_model(spec: RunSpec) -> nn.Module:
    """The run's model: a TransformerLM (lm), a Seq2SeqTransformer (seq2seq), or a
    TransformerEncoder whose head over the classes is tied to the token embedding
    (majority, as Brody et al.'s model reads its logits)."""
    from normlab.models import Seq2SeqTransformer, TransformerEncoder, TransformerLM

    cfg = model_config(spec)
    if spec.task == "majority":
        return TransformerEncoder(cfg, n_outputs=cfg.vocab_size)
    return (TransformerLM if spec.task == "lm" else Seq2SeqTransformer)(cfg)


def lr_factor(spec: RunSpec) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then constant, cosine (to 10%) or 1/sqrt decay."""

    def factor(step: int) -> float:
        s = step + 1
        if spec.warmup_steps and s <= spec.warmup_steps:
            return s / spec.warmup_steps
        if spec.schedule == "cosine":
            span = max(1, spec.steps - spec.warmup_steps)
            progress = min(1.0, (s - spec.warmup_steps) / span)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if spec.schedule == "inverse_sqrt":
            return math.sqrt(max(1, spec.warmup_steps) / s)
        return 1.0

    return factor


class Task:
    """The data and loss of a run. Training batches are pure functions of (seed, step);
    the validation data is the same for every run and seed (``fixed_windows`` for the LM,
    a fixed generator seed for seq2seq)."""

    VAL_SEED = VAL_SEED

    def __init__(self, spec: RunSpec, corpus: ByteCorpus | None) -> None:
        self.spec = spec
        self.corpus = corpus
        self.numbers = NumberWords() if spec.task == "seq2seq" else None
        self.majority = Majority(**spec.task_options) if spec.task == "majority" else None
        self._val: dict[int, tuple[Tensor, Tensor]] = {}
        self._majority_val: tuple[Tensor, Tensor] | None = None  # majority's validation batches, made once

    def batch(self, step: int, split: str, env: Env) -> dict[str, Tensor]:
        s = self.spec
        seed = s.seed if split == "train" else self.VAL_SEED
        if self.numbers is not None:
            full = self.numbers.batch(s.batch_size, seed, step, split)
        elif self.majority is not None:
            x, label = self.majority.batch(s.batch_size, s.seq_len, seed, step)
            full = {"x": x, "y": label[:, None].expand_as(x).contiguous()}
        else:
            stream = self.corpus.train if split == "train" else self.corpus.val
            x, y = lm_batch(stream, s.batch_size, s.seq_len, seed, step)
            full = {"x": x, "y": y}
        rows = slice(env.rank, None, env.world) if split == "train" else slice(None)
        return {k: v[rows].to(env.device) for k, v in full.items()}

    def loss_sum(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Token cross-entropy summed over the batch's (non-pad) tokens, and their count.

        Summed, not averaged: across ranks with different token counts the mean is then
        taken over the global batch's tokens (``run_one``)."""
        if self.numbers is None:  # lm and majority: a target at every position
            logits = model(batch["x"])
            target = batch["y"]
            return TF.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum"), target.numel()
        # the target's padding (PAD after EOS; BOS opens every row) stays out of
        # batch-statistics norms, as the source's does
        logits = model(batch["src"], batch["tgt_in"], src_padding_mask=batch["src_padding_mask"],
                       tgt_padding_mask=batch["tgt_in"] == 0)
        target = batch["tgt_out"]
        loss = TF.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=0, reduction="sum")
        return loss, int((target != 0).sum())

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Mean token cross-entropy of one batch on this process, and its token count."""
        total, n = self.loss_sum(model, batch)
        return total / max(n, 1), n

    def val_windows(self, final: bool) -> tuple[Tensor, Tensor]:
        """The fixed validation windows: all ``val_bytes`` at the end of a run, the first
        ``val_bytes_during`` of them during it."""
        size = self.spec.val_bytes if final else self.spec.val_bytes_during
        if size not in self._val:
            self._val[size] = fixed_windows(self.corpus.val, self.spec.seq_len, size)
        return self._val[size]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, env: Env, final: bool = True) -> dict[str, float]:
        """Validation loss (nats/token) on the fixed validation set.

        LM: every window's mean loss; ``val_loss_select`` and ``val_loss_test`` are the
        even and odd windows, so a study can pick a learning rate on one half and judge
        on the other. seq2seq: ``eval_batches`` batches of a fixed seed, and exact match."""
        was_training = model.training
        model.eval()
        try:
            if self.majority is not None:
                return self._evaluate_majority(model, env, final)
            if self.numbers is None:
                return self._evaluate_lm(model, env, final)
            return self._evaluate_seq2seq(model, env)
        finally:
            model.train(was_training)

    def _evaluate_lm(self, model: nn.Module, env: Env, final: bool) -> dict[str, Any]:
        x, y = self.val_windows(final)
        per_window = []
        for i in range(0, x.shape[0], EVAL_CHUNK):
            xb, yb = x[i:i + EVAL_CHUNK].to(env.device), y[i:i + EVAL_CHUNK].to(env.device)
            with env.autocast():
                logits = model(xb)
            loss = TF.cross_entropy(logits.flatten(0, 1).float(), yb.flatten(), reduction="none")
            per_window.append(loss.view(yb.shape).mean(1).double().cpu())
        w = torch.cat(per_window)
        out: dict[str, Any] = {"val_loss": float(w.mean())}
        if w.numel() >= 2:
            out["val_loss_select"], out["val_loss_test"] = float(w[0::2].mean()), float(w[1::2].mean())
        if final and self.spec.unselectable_keys:
            from normlab.studies.probes import unselectable_keys

            out.update(unselectable_keys(model, x[:UNSELECTABLE_SEQUENCES].to(env.device), env))
        return out

    def _evaluate_majority(self, model: nn.Module, env: Env, final: bool) -> dict[str, Any]:
        """Loss and accuracy over every position of ``eval_batches`` batches of a fixed seed
        (``_select``/``_test``: the even and odd sequences); at the end of a run with
        ``unselectable_keys``, the unselectable fraction of each layer's keys on the first
        ``UNSELECTABLE_SEQUENCES`` sequences."""
        from normlab.studies.probes import unselectable_keys

        if self._majority_val is None:  # the same sequences at every evaluation
            batches = [self.batch(i, "val", env) for i in range(self.spec.eval_batches)]
            self._majority_val = (torch.cat([b["x"] for b in batches]), torch.cat([b["y"] for b in batches]))
        x, y = self._majority_val
        with env.autocast():
            logits = model(x).float()
        loss = TF.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1).double()
        correct = (logits.argmax(-1) == y).double().mean(1)
        out: dict[str, Any] = {"val_loss": float(loss.mean()), "val_accuracy": float(correct.mean())}
        if x.shape[0] >= 2:
            out["val_loss_select"], out["val_loss_test"] = float(loss[0::2].mean()), float(loss[1::2].mean())
            out["val_accuracy_select"] = float(correct[0::2].mean())
            out["val_accuracy_test"] = float(correct[1::2].mean())
        if final and self.spec.unselectable_keys:
            out.update(unselectable_keys(model, x[:UNSELECTABLE_SEQUENCES], env))
        return out

    def _evaluate_seq2seq(self, model: nn.Module, env: Env) -> dict[str, float]:
        """The mean over the validation batches' (non-pad) tokens, as the training loss is
        (a mean of the batches' means would weight a token by its batch's length), and the
        exact-match rate over their examples (equal batch sizes)."""
        total, tokens, accs = 0.0, 0, []
        for i in range(self.spec.eval_batches):
            batch = self.batch(i, "val", env)
            with env.autocast():
                loss, n = self.loss_sum(model, batch)
            total, tokens = total + loss.item(), tokens + n
            accs.append(exact_match(greedy_decode(model, batch["src"], batch["src_padding_mask"],
                                                  batch["tgt_out"].shape[1]), batch["tgt_out"]))
        return {"val_loss": total / max(tokens, 1), "val_exact_match": sum(accs) / len(accs)}


@torch.no_grad()
def greedy_decode(model: nn.Module, src: Tensor, src_padding_mask: Tensor, length: int) -> Tensor:
    """Greedy decoding from BOS for ``length`` tokens; after EOS the output is PAD."""
    from normlab.studies.data import BOS, EOS, PAD

    out = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(length):
        logits = model(src, out, src_padding_mask=src_padding_mask)
        nxt = logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        done |= nxt == EOS
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out[:, 1:]


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(run_dir: Path, spec: RunSpec, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, extra: dict[str, Any]) -> None:
    """Write the checkpoint to a temporary folder, then swap it in: the old one is renamed
    aside first and removed last, so a crash or a kill at any point leaves a whole
    checkpoint (``load_checkpoint`` takes the old one back if the swap was cut off)."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": spec.fingerprint(), **extra}))
    final, old = run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# I/O errors that say nothing about a file's contents: reading may succeed next time
_TRANSIENT_IO = frozenset(getattr(errno, name) for name in (
    "EIO", "EAGAIN", "EINTR", "ETIMEDOUT", "ENOMEM", "EACCES", "EPERM", "ESTALE", "EBUSY", "EMFILE",
    "ENFILE", "ENOLCK", "ENETDOWN", "ENETUNREACH", "EHOSTUNREACH", "ECONNRESET") if hasattr(errno, name))


def load_checkpoint(run_dir: Path, spec: RunSpec, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, device: torch.device, main: bool = True,
                    identity: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The saved state (and the model, optimizer and scheduler loaded from it); None with
    no checkpoint, one of other settings (``identity``, see ``run_identity``: also one
    made on another corpus, dtype or device; None: the spec's fingerprint alone; also one
    whose tensors do not fit the model, ``checkpoint_misfit``), or a damaged one (a file
    missing, or one that does not parse): the main process (``main``) moves a damaged
    checkpoint aside to ``checkpoint.damaged`` (``.damaged-2``, ... after the first) with a
    warning, and the run starts over. Any other error while reading (out of memory, an I/O
    error) is raised: the checkpoint may be sound."""
    import warnings

    from safetensors.torch import load_file

    ckpt, old = run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")
    if not ckpt.exists() and (old / "state.json").exists():
        old.rename(ckpt)  # a swap cut off between its two renames
    if not (ckpt / "state.json").exists():
        return None
    try:
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("state.json holds no step")
        if not same_run(state, identity or {"fingerprint": spec.fingerprint()}):
            return None  # settings changed: start over
        if checkpoint_misfit(model, ckpt / "model.safetensors") is not None:
            return None  # a model of other settings (made before the model was recorded): start over
        load_file(str(ckpt / "model.safetensors"))  # read whole before any of it goes into the model
        opt = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except OSError as e:
        if e.errno in _TRANSIENT_IO:
            raise  # the disk or the network file system, not the checkpoint
        damage = e  # a missing file, or one the reader cannot parse (torch.load: EINVAL)
    except Exception as e:  # noqa: BLE001 - a file that does not parse (cut short, overwritten)
        if isinstance(e, RuntimeError) and any(m in str(e) for m in ("out of memory", "can't allocate memory")):
            raise  # the CPU allocator's out-of-memory is a plain RuntimeError
        damage = e
    else:
        load_model(model, str(ckpt / "model.safetensors"), device=str(device))
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        return state
    if main:
        aside = run_dir / (CHECKPOINT + ".damaged")
        k = 1
        while aside.exists():  # an earlier damaged one is kept too
            k += 1
            aside = run_dir / f"{CHECKPOINT}.damaged-{k}"
        ckpt.rename(aside)
        warnings.warn(f"run {spec.name}: its checkpoint {ckpt} cannot be read ({type(damage).__name__}: "
                      f"{damage}); moved it to {aside}, and the run starts over", RuntimeWarning, stacklevel=2)
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (what a resumed run has already logged).

    Written to a temporary file beside it and swapped in: a kill mid-write leaves the
    file as it was (the next resume cuts it again), never a file cut short, as its
    records are all there is of the run's curve up to its checkpoint."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


# ------------------------------------------------------------------ one run


def _code_seen(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The code of a run's processes so far (its checkpoint's records), and this one's
    (``provenance.code_record``), each once: a run resumed under other code names both."""
    seen = [r for r in state.get("code", []) if isinstance(r, dict)]
    if state.get("step") and "code" not in state:  # resumed from a checkpoint written before runs recorded it
        seen = [UNRECORDED_CODE]
    return seen + [code_record()] if code_record() not in seen else seen


# the code record of a run's part that a checkpoint without one made (``_code_seen``)
UNRECORDED_CODE = {"unrecorded": True}


def _threads_seen(state: dict[str, Any]) -> list[int]:
    """The torch thread counts of a run's processes so far (its checkpoint's), and this one's."""
    return sorted(set(state.get("threads", [])) | {torch.get_num_threads()})


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 4_099 + rank


class _StepBoundaryInterrupt:
    """Defers Ctrl-C (each of ``signals``; default SIGINT) to the end of the current step,
    so the saved state is a whole step; a second one interrupts at once."""

    def __init__(self, signals: Sequence[int] | None = None) -> None:
        import signal
        import threading

        self._flag = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT,) if signals is None else signals:
                if signal.getsignal(signum) is not None:  # (None: installed outside Python, not to be given back)
                    self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._flag:
            raise KeyboardInterrupt
        self._flag = True

    def requested(self, env: Env) -> bool:
        if env.world == 1:
            return self._flag
        t = torch.tensor([float(self._flag)], device=env.device if env.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(t.item())

    def restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}


def result_fields(spec: RunSpec, model: nn.Module | None = None) -> dict[str, Any]:
    """The fields a result is selected by (name, kind, task, placement, norm, layers, width,
    init, lr, warm-up, seed, steps, tags); with ``model``, its size and ``run_config`` too."""
    m = model_config(spec)
    out = {
        "name": spec.name, "task": spec.task, "kind": spec.kind,
        "placement": m.placement, "norm": m.norm, "n_layers": m.n_layers, "d_model": m.d_model, "init": m.init,
        "lr": spec.lr, "warmup_steps": spec.warmup_steps, "seed": spec.seed, "steps": spec.steps,
        "tags": spec.tags,
    }
    if model is not None:
        out["n_params"] = sum(p.numel() for p in model.parameters())
        out["config"] = run_config(spec, model)
    return out


def run_config(spec: RunSpec, model: nn.Module | None = None) -> dict[str, Any]:
    """Every setting that defines a run: the model's resolved TransformerConfig and the
    training settings (optimizer, schedule, batch, data). ``model`` None: the config the
    spec resolves to (``model_config``), to compare with a result's without building it."""
    return {
        **(model.cfg if model is not None else model_config(spec)).to_dict(),
        "task": spec.task, "kind": spec.kind, "seed": spec.seed,
        "optimizer": "Adam", "lr": spec.lr, "betas": list(spec.betas), "eps": 1e-8,
        "weight_decay": spec.weight_decay, "grad_clip": spec.grad_clip, "warmup_steps": spec.warmup_steps,
        "schedule": spec.schedule, "steps": spec.steps, "batch_size": spec.batch_size, "seq_len": spec.seq_len,
        "val_bytes": spec.val_bytes, "val_bytes_during": spec.val_bytes_during, "eval_every": spec.eval_every,
        "probe_batches": spec.probe_batches, "task_options": dict(spec.task_options),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, swapped in: a crash or
    a kill never leaves the file cut short (one temporary file per writer)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """A result or a checkpoint's state, written whole (``write_atomic``)."""
    write_atomic(path, json.dumps(obj, indent=1))


def speed_run(spec: RunSpec, env: Env, corpus: ByteCorpus | None) -> dict[str, Any]:
    """Training-step throughput of ``spec.model`` against a baseline (``spec.speed_against``
    applied to it), timed side by side in one process: ``speed_rounds`` interleaved rounds,
    the order alternating, each timing ``steps`` steps of each model on the same batches.

    Returns both models' tokens/s and the per-round ratio (model / baseline)."""
    task = Task(spec, corpus)
    models, optimizers = [], []
    for overrides in ({}, spec.speed_against):
        torch.manual_seed(spec.seed)
        model = build_model(spec.with_overrides(model={**spec.model, **overrides})).to(env.device)
        models.append(model)
        optimizers.append(torch.optim.Adam(model.parameters(), lr=spec.lr, betas=spec.betas, foreach=True))
    batches = [task.batch(i, "train", env) for i in range(max(1, spec.steps))]

    def timed(i: int) -> float:
        model, opt = models[i], optimizers[i]
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        t0 = time.perf_counter()
        for batch in batches:
            with env.autocast():
                loss, _ = task.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        return time.perf_counter() - t0

    timed(0), timed(1)  # warm-up
    seconds: list[tuple[float, float]] = []
    for r in range(spec.speed_rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        t = {i: timed(i) for i in order}
        seconds.append((t[0], t[1]))
    tokens = sum(int(b["x"].numel()) if "x" in b else int(b["tgt_out"].numel()) for b in batches)
    return {
        **result_fields(spec, models[0]),
        "speed_against": spec.speed_against,
        "tokens_per_s": statistics.median(tokens / a for a, _ in seconds),
        "baseline_tokens_per_s": statistics.median(tokens / b for _, b in seconds),
        "speed_ratios": [b / a for a, b in seconds],  # > 1: the model is faster than its baseline
        "threads": torch.get_num_threads(),
        "final_val_loss": math.nan, "diverged": False, "diverged_step": None,
        "fingerprint": spec.fingerprint(),
    }


_ACTIVATION_KEYS = ("activation_rms_by_layer", "activation_max_by_layer")


def run_one(spec: RunSpec, run_dir: Path, env: Env, corpus: ByteCorpus | None,
            on_step: Callable[[int], None] | None = None,
            diagnostics: Any = None, keep_weights: bool = True,
            stop_signals: Sequence[int] | None = None) -> dict[str, Any]:
    """Train (or probe, or time) one run to completion, resuming from its checkpoint if any.

    ``stop_signals`` (default: SIGINT) are the signals that stop training at the end of
    the current step, saved (``Interrupted``); a second one stops it at once.

    ``diagnostics`` (see ``normlab.studies.probes``) measures gradient norms, activation
    statistics and the gradient noise scale every ``diag_every`` steps. ``keep_weights``:
    the trained model is kept as ``<run>/model.safetensors``.

    The run holds its folder's lock while it runs (``FolderLock``): a second process
    asked to run it raises ``RunBusy`` and touches nothing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(run_dir)
    if env.is_main:  # (under torchrun every rank runs this run: rank 0 holds its lock)
        holder = lock.acquire(wait_s=RUN_LOCK_WAIT_S)
        if holder is not None:
            raise RunBusy(f"run {spec.name}: another process{f' (pid {holder})' if holder else ''} is running it "
                          f"in {run_dir} (a job of an earlier submission, or another normlab study on this "
                          "folder); it was left alone")
    try:
        return _run_one(spec, run_dir, env, corpus, on_step, diagnostics, keep_weights, stop_signals)
    finally:
        lock.release()


def read_result(path: Path) -> dict[str, Any] | None:
    """A run's result.json; None when it is missing or damaged (the run runs again)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def _run_one(spec: RunSpec, run_dir: Path, env: Env, corpus: ByteCorpus | None,
             on_step: Callable[[int], None] | None, diagnostics: Any, keep_weights: bool,
             stop_signals: Sequence[int] | None = None) -> dict[str, Any]:
    from normlab.studies import probes

    done = run_dir / "result.json"
    identity = run_identity(spec, corpus, env.dtype, env.device.type)
    result = read_result(done)
    if same_run(result, identity):
        return result
    if spec.kind == "train" and spec.batch_size % env.world:
        raise ValueError(f"RunSpec {spec.name!r}: batch_size {spec.batch_size} does not split evenly "
                         f"over {env.world} processes")
    started = time.perf_counter()
    if spec.kind == "speed":
        result = {**speed_run(spec, env, corpus), **identity, "threads": _threads_seen({}), "code": _code_seen({})}
        if env.is_main:
            _write_json(done, result)
        return result
    torch.manual_seed(spec.seed)
    model = build_model(spec).to(env.device)
    task = Task(spec, corpus)
    diagnostics = diagnostics or probes.Diagnostics(model)
    if spec.kind in ("probe", "update"):
        if spec.task != "lm" and spec.kind == "update":
            raise ValueError(f"RunSpec {spec.name!r}: kind 'update' measures the LM's stack output; got task "
                             f"{spec.task!r}")
        # every rank probes the whole batch (nothing is reduced across ranks: a rank's slice
        # would measure another batch than a single process does); the main rank writes it
        measured = (probes.gradients_at_init if spec.kind == "probe" else probes.output_change_after_update)(
            model, task, dataclasses.replace(env, rank=0, world=1))
        result = {**result_fields(spec, model), **measured, "final_train_loss": measured["probe_loss"],
                  "final_val_loss": math.nan, "diverged": not math.isfinite(measured["probe_loss"]),
                  "diverged_step": None, "tokens_per_s": math.nan, **identity,
                  "wall_s": round(time.perf_counter() - started, 3), "threads": _threads_seen({}), "code": _code_seen({})}
        if env.is_main:
            _write_json(done, result)
        return result

    # foreach: one fused update over all parameters (on CPU a third of a tiny model's step otherwise)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                                 foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec))
    metrics_path = run_dir / "metrics.jsonl"
    state = load_checkpoint(run_dir, spec, model, optimizer, scheduler, env.device, main=env.is_main,
                            identity=identity)
    start = state["step"] if state else 0
    if env.is_main:
        if state:
            _truncate_metrics(metrics_path, start - 1)
        else:  # a new start: what an earlier run of this name left goes, all of it together
            for stale in (done, run_dir / WEIGHTS, metrics_path):
                stale.unlink(missing_ok=True)
    train_model = model
    if env.world > 1:
        # batch statistics (masked BatchNorm, PowerNorm) over the global batch, as one
        # process computes them, not over each rank's slice
        sync_batch_statistics(model)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    def log(record: dict[str, Any]) -> None:
        if env.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    state = state or {}
    recent: list[float] = state.get("recent", [])
    activations: dict[str, dict[str, list[float]]] = state.get("activations", {})
    noise_sums: dict[str, float] = state.get("noise_sums", {})  # total_gns: estimates summed over steps
    logit_max: float | None = state.get("logit_max")
    diagnostics.load_state_dict(state.get("diagnostics", {}))
    diverged_at = None
    train_time, train_tokens = state.get("train_time", 0.0), state.get("train_tokens", 0)
    last_eval: dict[str, float] = {}
    stop = _StepBoundaryInterrupt(stop_signals)
    try:
        for step in range(start, spec.steps):
            model.train()
            # dropout masks, like the data, are a pure function of (seed, step, rank)
            torch.manual_seed(_step_seed(spec.seed, step, env.rank))
            batch = task.batch(step, "train", env)
            diag_now = bool(spec.diag_every) and step % spec.diag_every == 0
            t0 = time.perf_counter()
            with diagnostics.capture(diag_now):
                with env.autocast():
                    loss_sum, n_local = task.loss_sum(train_model, batch)
                n_tokens = int(env.all_sum(n_local))
                # DDP averages gradients over ranks: scaling by world / n_tokens makes the
                # gradient that of the mean over the global batch's tokens
                (loss_sum * (env.world / max(n_tokens, 1))).backward()
            # the per-layer gradient norms are the step's gradients, before clipping scales
            # them (as the logged total grad_norm is)
            measured = diagnostics.collect() if diag_now else {}
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip or float("inf"))
            if diag_now and spec.total_gns and env.world == 1:
                measured.update(probes.total_noise_scale(model, task, batch, env))
                for k in ("gns_g_sq", "gns_trace", "gns_total_g_sq", "gns_total_trace"):
                    if k in measured and math.isfinite(measured[k]):
                        noise_sums[k] = noise_sums.get(k, 0.0) + measured[k]
            loss_value = env.all_sum(loss_sum.item()) / max(n_tokens, 1)
            finite = math.isfinite(loss_value) and math.isfinite(float(grad_norm))
            lr_now = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it for the next)
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            elapsed = time.perf_counter() - t0
            record: dict[str, Any] = {"step": step, "train_loss": loss_value, "lr": lr_now,
                                      "grad_norm": float(grad_norm)}
            record.update(measured)
            # the largest attention logit seen at any diagnostics step: one that overflowed
            # (inf) is kept, the growth the claims must see (nan: a layer the step did not
            # call, or weights already nan, a divergence the run records)
            logits = [v for v in measured.get("attention_logit_max_by_layer", ()) if not math.isnan(v)]
            if logits:
                logit_max = max(logits) if logit_max is None else max(logit_max, *logits)
            if "activation_rms_by_layer" in measured:  # the stream at the first and latest diagnostics step
                activations.setdefault("init", {k: measured[k] for k in _ACTIVATION_KEYS if k in measured})
                activations["final"] = {k: measured[k] for k in _ACTIVATION_KEYS if k in measured}
            if not diag_now:  # throughput counts plain training steps only
                train_time += elapsed
                train_tokens += n_tokens
            if not finite:
                diverged_at = step
                record["diverged"] = True
                log(record)
                break
            recent = (recent + [loss_value])[-10:]
            last_step = step == spec.steps - 1
            if last_step or (spec.eval_every and step % spec.eval_every == 0):
                last_eval = task.evaluate(model, env, final=last_step)
                record.update(last_eval)
            if step % spec.log_every == 0 or last_step or diag_now or "val_loss" in record:
                log(record)
            if on_step:
                on_step(step + 1)
            interrupted = stop.requested(env)
            periodic = spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0
            if env.is_main and (periodic or interrupted) and not last_step:
                save_checkpoint(run_dir, spec, step + 1, model, optimizer, scheduler,
                                {**identity, "train_time": train_time, "train_tokens": train_tokens, "recent": recent,
                                 "diagnostics": diagnostics.state_dict(), "activations": activations,
                                 "noise_sums": noise_sums, "logit_max": logit_max,
                                 "wall_s": state.get("wall_s", 0.0) + time.perf_counter() - started,
                                 "threads": _threads_seen(state), "code": _code_seen(state)})
            if interrupted and not last_step:
                raise Interrupted(spec.name, step + 1)
    except BaseException:
        stop.restore()
        raise
    finally:
        diagnostics.close()

    # Ctrl-C stays deferred until the result is written: one in the last step (its final
    # evaluation, say) or while the result is written still lets the run finish, then
    # stops whatever would come next (the study's next run) as any Ctrl-C does
    try:
        finished = diverged_at is None
        result = {
            **result_fields(spec, model),
            "final_train_loss": sum(recent) / len(recent) if recent else float("nan"),
            "final_val_loss": last_eval.get("val_loss", float("nan")) if finished else float("nan"),
            "final_val_loss_select": last_eval.get("val_loss_select", float("nan")) if finished else float("nan"),
            "final_val_loss_test": last_eval.get("val_loss_test", float("nan")) if finished else float("nan"),
            "diverged": diverged_at is not None,
            "diverged_step": diverged_at,
            "tokens_per_s": train_tokens / train_time if train_time > 0 else float("nan"),
            **identity,
            "wall_s": round(state.get("wall_s", 0.0) + time.perf_counter() - started, 3),  # this process + earlier ones
            # the torch thread counts it trained at: the order of a CPU's sums, so the last bits
            # of the numbers, follow it (two counts: resumed under another)
            "threads": _threads_seen(state),
            # which code made it (a report may merge runs that other code finished)
            "code": _code_seen(state),
        }
        if "val_exact_match" in last_eval:
            result["final_val_exact_match"] = last_eval["val_exact_match"]
        if logit_max is not None:
            result["attention_logit_max"] = logit_max
        for key in last_eval:  # unselectable_keys' measures: unselectable_by_layer, ..._heads_causal_by_layer
            if finished and key.startswith(("unselectable", "undetermined")) and key.endswith("_by_layer"):
                result[key] = last_eval[key]
        if spec.task == "lm" and corpus is not None:
            # the unigram baseline of this run's own validation set, kept with its numbers: a
            # report read on another corpus (another Python's standard library) judges the
            # run against it, not against the reporting machine's
            result.update(corpus.baselines(spec.seq_len, spec.val_bytes))
        if task.majority is not None:  # chance: the uniform guess over the classes
            chance = math.log(task.majority.classes)
            result.update(baseline_val_loss=chance, baseline_val_loss_select=chance, baseline_val_loss_test=chance,
                          chance_accuracy=1.0 / task.majority.classes)
            for key in ("val_accuracy", "val_accuracy_select", "val_accuracy_test"):
                result[f"final_{key}"] = last_eval.get(key, float("nan")) if finished else float("nan")
            if finished and env.is_main:  # how fast it learned: the accuracy averaged over the evaluations
                evals = [m for m in read_jsonl(metrics_path) if "val_accuracy_test" in m]
                for half in ("select", "test"):
                    result[f"val_accuracy_mean_{half}"] = sum(m[f"val_accuracy_{half}"] for m in evals) / len(evals)
        for when, stats in activations.items():  # e.g. activation_max_by_layer_final
            result.update({f"{k}_{when}": v for k, v in stats.items()})
        if noise_sums:  # B_simple over the diagnostics steps: numerators and denominators summed, divided last
            for key, trace, g_sq in (("gns_norms", "gns_trace", "gns_g_sq"),
                                     ("gns_total", "gns_total_trace", "gns_total_g_sq")):
                if noise_sums.get(g_sq, 0.0) > 0:
                    result[key] = noise_sums[trace] / noise_sums[g_sq]
        if env.is_main:
            if keep_weights:
                # with the model's class and config in the metadata: normlab.models.load_model,
                # normlab audit and normlab convert read the file alone
                save_normlab_model(model, run_dir / WEIGHTS)
                result["weights"] = WEIGHTS
            _write_json(done, result)
            for leftover in (CHECKPOINT, CHECKPOINT + ".old"):
                shutil.rmtree(run_dir / leftover, ignore_errors=True)
        interrupted = stop.requested(env)
    finally:
        stop.restore()
    if interrupted:
        raise Interrupted(spec.name, spec.steps if diverged_at is None else diverged_at + 1, result=result)
    return result
