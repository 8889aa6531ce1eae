"""``normlab bench e2e``: a whole TransformerLM's training step and inference forward.

For placements pre and post and norms layernorm and rmsnorm, over a few model sizes,
this measures the median time of

* ``train``: one training step, forward + cross-entropy + backward + ``torch.optim.Adam``
  step (gradients set to None before each forward),
* ``infer``: one forward in eval mode under ``torch.no_grad()``,

for these implementations of the same model (one model and one optimizer per
configuration, so every implementation steps the same parameters):

* ``normlab``: backend "auto": on CUDA the fused Triton kernels where ``auto`` picks
  them (from ``backend.AUTO_TRITON_MIN_ELEMENTS`` elements per call, so none at this
  bench's sizes: the ``backend`` column, resolved on a tensor of the model's activation
  size, says which ran; ``bench kernels`` times the forced kernels), normlab's torch
  path on CPU,
* ``torch``: backend "torch" (normlab's torch path, on CUDA too),
* ``torch norms``: the same model with torch's own LayerNorm/RMSNorm modules,
* with compilation (``--compile``: the default on CUDA, off on CPU):
  ``normlab+compile`` (``torch.compile(model)`` under backend "auto") and
  ``torch norms+compile``, compared with each other (``vs torch norms``).

The implementations are timed side by side (``Timer.median_ms_interleaved``: each round
runs each of them once), and ``ratio_vs_torch`` = the ``torch`` run's median / this
median (> 1: faster). Each time is a whole step as it runs, host time included where
the GPU waits for the host (unlike ``bench kernels``, which times the GPU's work). On the CPU, backends "auto" and "torch" run the same code, so
their ratio shows the noise of the run. Dropout is 0 (as in most LLM pre-training).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table

import normlab
from normlab.backend import resolve
from normlab.bench.common import (
    TableWrites,
    Timer,
    app,
    check_out_dir,
    check_positive,
    device_name,
    load_average,
    out_of_memory,
    pick_device,
    pick_dtype,
    print_table,
    release_memory,
    write_table_csv,
)
from normlab.models import TransformerConfig, TransformerLM
from normlab.norms.base import ResidualNorm
from normlab.provenance import code_line, code_record

PLACEMENTS = ("pre", "post")
NORMS = ("layernorm", "rmsnorm")
STEPS = ("train", "infer")
E2E_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int
    n_heads: int
    batch: int
    seq_len: int
    vocab_size: int


CPU_QUICK = (Size(256, 4, 4, 8, 128, 1024),)
CPU_SIZES = CPU_QUICK + (Size(512, 6, 8, 8, 256, 4096),)
GPU_QUICK = (Size(1024, 12, 16, 8, 1024, 32000),)
GPU_SIZES = GPU_QUICK + (Size(2048, 24, 16, 8, 1024, 32000),)


@dataclass
class Record:
    step: str
    placement: str
    norm: str
    d_model: int
    n_layers: int
    n_heads: int
    batch: int
    seq_len: int
    vocab_size: int
    params: int
    dtype: str
    impl: str
    backend: str        # what normlab's norm ops ran on: "triton" or "torch"
    compiled: bool
    device: str
    median_ms: float
    tokens_per_s: float
    ratio_vs_torch: float
    ratio_vs_torch_norms: float  # the same model with torch's own norm modules, compiled alike / this
    reps: int
    torch_version: str
    load_avg: str       # os.getloadavg() right after this configuration was measured
    # the code that measured it (a CSV or JSON row read on its own names it too)
    normlab_version: str = field(default_factory=lambda: code_record()["normlab_version"] or "")
    git_commit: str = field(default_factory=lambda: code_record()["git_commit"] or "")

    def as_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- workloads


class _TorchLayerNorm(ResidualNorm, torch.nn.LayerNorm):
    """torch.nn.LayerNorm behind the block's norm protocol, with plain torch ops for the
    residual add: the baseline "the same model with torch's norms"."""

    def normalize(self, x, padding_mask=None):
        return torch.nn.LayerNorm.forward(self, x)

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        new = (residual + F.dropout(x, dropout_p, self.training)).to(residual_dtype or x.dtype)
        return self.normalize(new).to(x.dtype), new


class _TorchRMSNorm(ResidualNorm, torch.nn.RMSNorm):
    """torch.nn.RMSNorm behind the block's norm protocol (see ``_TorchLayerNorm``)."""

    def normalize(self, x, padding_mask=None):
        return torch.nn.RMSNorm.forward(self, x)

    add_normalize = _TorchLayerNorm.add_normalize


def with_torch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose normlab LayerNorm/RMSNorm modules are torch's own, with
    the same parameters."""
    copy = __import__("copy").deepcopy(model)
    swaps = {normlab.LayerNorm: (_TorchLayerNorm, ("normalized_shape", "eps", "elementwise_affine")),
             normlab.RMSNorm: (_TorchRMSNorm, ("normalized_shape", "eps", "elementwise_affine"))}
    for parent in list(copy.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in swaps:
                cls, fields = swaps[type(child)]
                kw = {f: getattr(child, f) for f in fields}
                if cls is _TorchLayerNorm:
                    kw["bias"] = child.bias is not None
                    kw["normalized_shape"] = tuple(kw["normalized_shape"])
                p = next(child.parameters(), None)
                new = cls(**kw, device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
    return copy


@dataclass
class Impl:
    name: str
    backend: str                      # the normlab backend in force while it runs
    forward: Callable                 # the model, or its torch.compile wrapper
    compiled: bool
    model: torch.nn.Module
    opt: torch.optim.Optimizer


def _impls(model: torch.nn.Module, device: torch.device, compile_: bool) -> list[Impl]:
    """normlab (backend auto), its torch backend, and the same model with torch's own
    norms; with ``compile_``, each model compiled too."""
    torch_norms = with_torch_norms(model)

    def opt(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=1e-4)

    model_opt, torch_opt = opt(model), opt(torch_norms)
    impls = [Impl("normlab", "auto", model, False, model, model_opt),
             Impl("torch", "torch", model, False, model, model_opt),
             Impl("torch norms", "torch", torch_norms, False, torch_norms, torch_opt)]
    if compile_:
        impls += [Impl("normlab+compile", "auto", torch.compile(model), True, model, model_opt),
                  Impl("torch norms+compile", "torch", torch.compile(torch_norms), True, torch_norms, torch_opt)]
    return impls


def _step_fn(step: str, impl: Impl, tokens: torch.Tensor, targets: torch.Tensor) -> Callable[[], object]:
    forward, opt = impl.forward, impl.opt

    if step == "train":
        def train() -> None:
            with normlab.set_backend(impl.backend):
                opt.zero_grad(set_to_none=True)
                logits = forward(tokens)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                loss.backward()
                opt.step()
        return train

    def infer() -> None:
        with normlab.set_backend(impl.backend), torch.no_grad():
            forward(tokens)
    return infer


def measure(size: Size, placement: str, norm: str, device: torch.device, dtype: torch.dtype,
            compile_: bool, timer: Timer, name: str) -> list[Record]:
    """Every step x implementation of one model configuration, timed side by side."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=size.vocab_size, d_model=size.d_model, n_heads=size.n_heads,
                            n_layers=size.n_layers, max_seq_len=size.seq_len, norm=norm,
                            placement=placement, dropout=0.0)
    model = TransformerLM(cfg).to(device=device, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(0, size.vocab_size, (size.batch, size.seq_len + 1), generator=g).to(device)
    tokens, targets = data[:, :-1], data[:, 1:]
    impls = _impls(model, device, compile_)
    probe = torch.empty(size.batch * size.seq_len, size.d_model, device=device, dtype=dtype)  # an activation
    records: list[Record] = []
    for step in STEPS:
        for i in impls:
            i.model.train(step == "train")
        times = timer.median_ms_interleaved({i.name: _step_fn(step, i, tokens, targets) for i in impls})
        load = load_average()
        for i in impls:
            with normlab.set_backend(i.backend):
                backend = resolve(probe)
            ms = times[i.name]
            records.append(Record(
                step, placement, norm, size.d_model, size.n_layers, size.n_heads, size.batch,
                size.seq_len, size.vocab_size, params, str(dtype).removeprefix("torch."), i.name,
                backend, i.compiled, name, round(ms, 4),
                round(size.batch * size.seq_len / (ms * 1e-3), 1), round(times["torch"] / ms, 3),
                round(times["torch norms+compile" if i.compiled else "torch norms"] / ms, 3),
                timer.reps, torch.__version__, load,
            ))
    del impls, model
    torch._dynamo.reset()
    release_memory(device)
    return records


def run(device: torch.device, dtype: torch.dtype, sizes: tuple[Size, ...], compile_: bool,
        timer: Timer, skipped: list[str] | None = None, progress: Callable[[str], None] | None = None,
        checkpoint: Callable[[list[Record]], None] | None = None,
        configs: Sequence[tuple[str, str]] | None = None) -> list[Record]:
    """Every (size, placement, norm) configuration (``configs``: these (placement, norm)
    pairs only); ``progress(what)`` after each, and ``checkpoint(records so far)``, so an
    interruption keeps what was measured. A configuration that runs out of memory is
    skipped and the others measured; ``skipped`` gets "size placement norm" for each."""
    name = device_name(device)
    records: list[Record] = []
    pairs = list(configs) if configs is not None else [(p, n) for p in PLACEMENTS for n in NORMS]
    for size in sizes:
        for placement, norm in pairs:
            what = f"d{size.d_model} L{size.n_layers} {size.batch}x{size.seq_len} {placement} {norm}"
            try:
                records += measure(size, placement, norm, device, dtype, compile_, timer, name)
                if checkpoint is not None and records:
                    checkpoint(records)
            except RuntimeError as err:  # (torch.OutOfMemoryError is one)
                if not out_of_memory(err):  # (on the CPU, the allocator's RuntimeError)
                    raise
                torch._dynamo.reset()
                release_memory(device)
                if skipped is not None:
                    skipped.append(what)
            if progress is not None:
                progress(f"e2e {what}")
    return records


# ----------------------------------------------------------------------------- outputs


def write_outputs(records: list[Record], out: Path, stem: str, load_before: str,
                  partial: int | None = None, skipped: Sequence[str] = ()) -> list[Path]:
    """The CSV and markdown of ``records``; ``partial``: the number of configurations the
    run was to measure, when it has not measured them all yet (the markdown says so);
    ``skipped``: the configurations that ran out of memory (named under the title)."""
    md_path = out / f"{stem}.md"
    csv_path = write_table_csv([r.as_json() for r in records], out, stem, partial is not None)
    r0 = records[0]
    lines = [f"# normlab bench e2e: {r0.device}", ""]
    if partial is not None:
        lines += [f"**Partial: the run stopped before measuring all {partial} configurations**; these are the "
                  "rows it measured.", ""]
    if skipped:
        lines += [f"**Skipped, out of memory:** {', '.join(skipped)} (not measured; the other configurations "
                  "were).", ""]
    lines += [
             f"{code_line()}, torch {r0.torch_version}, dtype {r0.dtype}, TransformerLM (GELU FFN 4x, learned "
             "positions, tied embeddings, dropout 0), `torch.optim.Adam`. `train` = forward + "
             "cross-entropy + backward + Adam step; `infer` = eval-mode forward under no_grad. "
             f"Median of {r0.reps} steps per implementation, the implementations timed side by "
             "side (each round runs each once). `vs torch` = the backend-\"torch\" run's time / "
             "this time (> 1: faster); `vs torch norms` = the time of the same model with torch's own "
             "LayerNorm/RMSNorm modules (compiled alike) / this time; `backend` = what normlab's norm "
             "ops ran on.",
             f"Load average (1, 5, 15 min) before the run: {load_before}; at the end: "
             f"{load_average()} (other processes share the device when it is above the core count).",
             "", "| step | placement | norm | d_model | heads | layers | vocab | batch x seq | params (M) | impl "
             "| backend | median ms | tokens/s | vs torch | vs torch norms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.step} | {r.placement} | {r.norm} | {r.d_model} | {r.n_heads} | {r.n_layers} | "
              f"{r.vocab_size} | {r.batch} x {r.seq_len} | {r.params / 1e6:.1f} | {r.impl} | {r.backend} | "
              f"{r.median_ms:.2f} | {r.tokens_per_s:,.0f} | {r.ratio_vs_torch:.2f} | "
              f"{r.ratio_vs_torch_norms:.2f} |" for r in records]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def _parse_configs(text: str | None) -> list[tuple[str, str]] | None:
    """``--configs``: PLACEMENT-NORM pairs (None: all of PLACEMENTS x NORMS)."""
    if text is None:
        return None
    pairs = [tuple(item.strip().split("-", 1)) for item in text.split(",") if item.strip()]
    valid = [f"{p}-{n}" for p in PLACEMENTS for n in NORMS]
    bad = [("-".join(p)) for p in pairs if len(p) != 2 or "-".join(p) not in valid]
    if bad or not pairs:
        raise typer.BadParameter(f"expected comma-separated pairs among {', '.join(valid)}, got {text!r}",
                                 param_hint="--configs")
    return list(dict.fromkeys(pairs))


def heads_for(d_model: int) -> int:
    """Attention heads for a custom ``--d-model``: the largest divisor of ``d_model`` that is at
    most ``max(1, d_model // 64)`` (heads of width 64 where it divides, wider where not)."""
    return next(h for h in range(max(1, d_model // 64), 0, -1) if d_model % h == 0)


@app.command("e2e")
def e2e(
    device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)."),
    dtype: str = typer.Option("fp32", help="Model and activation dtype: fp32 or bf16."),
    quick: bool = typer.Option(False, help="One model size and few steps (CPU: d_model 256, 4 layers)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON record per measurement."),
    out: str = typer.Option("runs/bench", help="Directory for the CSV and MD (committed tables: "
                                               "--out benchmarks/results)."),
    compile_: bool = typer.Option(None, "--compile/--no-compile",
                                  help="Include torch.compile of the model (default: on for CUDA, off for CPU)."),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's)."),
    d_model: int = typer.Option(None, hidden=True, help="One custom size: d_model (heads: the largest divisor "
                                                        "of d_model at most max(1, d_model // 64); vocabulary: "
                                                        "max(64, 4 * d_model), so the LM head keeps its share "
                                                        "of a small model's step; the tables name it)."),
    n_layers: int = typer.Option(None, hidden=True, help="One custom size: layers."),
    tokens: int = typer.Option(None, hidden=True, help="One custom size: sequence length."),
    batch: int = typer.Option(None, hidden=True, help="One custom size: batch."),
    configs: str = typer.Option(None, hidden=True, help="Only these PLACEMENT-NORM pairs, comma-separated "
                                                        "(e.g. pre-layernorm,pre-rmsnorm; default: all four)."),
) -> None:
    """TransformerLM training step and inference forward: normlab vs its torch path and torch.compile."""
    console = Console()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, E2E_DTYPES)
    # (bounds far above any model a machine holds, so that a mistyped size is refused, not
    # left to overflow an index or count divisors and layers for hours)
    for value, hint, most in ((threads, "--threads", 2**31 - 1), (d_model, "--d-model", 2**20),
                              (n_layers, "--n-layers", 4096), (tokens, "--tokens", 2**40), (batch, "--batch", 2**40)):
        check_positive(value, hint, most)
    pairs = _parse_configs(configs)
    check_out_dir(out)
    if threads:
        torch.set_num_threads(threads)
    gpu = dev.type == "cuda"
    sizes = (GPU_QUICK if quick else GPU_SIZES) if gpu else (CPU_QUICK if quick else CPU_SIZES)
    if any(v is not None for v in (d_model, n_layers, tokens, batch)):
        base = sizes[0]
        d = d_model or base.d_model
        sizes = (Size(d, n_layers or base.n_layers, heads_for(d), batch or base.batch,
                      tokens or base.seq_len, base.vocab_size if d_model is None else max(64, 4 * d)),)
    if compile_ is None:
        compile_ = gpu
    # a whole step as it runs: host time the GPU cannot hide counts (hide_host off)
    timer = Timer(dev, warmup=2 if quick else 3, reps=(10 if quick else 30) if not gpu else (20 if quick else 50),
                  hide_host=False)
    load_before = load_average()
    stem, total = f"e2e-{dev.type}-{dtype}", len(sizes) * (len(pairs) if pairs else len(PLACEMENTS) * len(NORMS))
    writes = TableWrites(Path(out) / stem)
    skipped: list[str] = []  # configurations that ran out of memory

    def save(so_far: list[Record]) -> None:  # partial tables survive an interruption
        writes.write(len(so_far), lambda: write_outputs(so_far, Path(out), stem, load_before, partial=total,
                                                         skipped=skipped))

    from rich.progress import Progress
    try:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("bench e2e", total=total)
            records = run(dev, torch_dtype, sizes, compile_, timer, skipped,
                          progress=lambda what: bar.update(task, advance=1, description=what), checkpoint=save,
                          configs=pairs)
    except KeyboardInterrupt:
        raise writes.interrupted() from None
    errors = Console(stderr=True)
    for what in skipped:  # (on stderr: --json prints only records)
        errors.print(f"[yellow]skipped {what}: out of memory")
    if not records:
        errors.print("[red]nothing measured: every configuration ran out of memory; nothing written")
        raise typer.Exit(1)
    try:
        paths = writes.write(len(records), lambda: write_outputs(records, Path(out), stem, load_before,
                                                                  skipped=skipped))
    except KeyboardInterrupt:
        raise writes.interrupted() from None
    if as_json:
        for r in records:
            print(json.dumps(r.as_json()))
        return
    table = Table(title=f"normlab bench e2e: {records[0].device}, {dtype}, torch {torch.__version__}, "
                        f"load {load_average()}",
                  caption=f"skipped, out of memory: {', '.join(skipped)}" if skipped else None)
    for col in ("step", "placement", "norm", "model", "impl", "median ms", "tokens/s", "vs torch",
                "vs torch norms"):
        text = col in ("step", "placement", "norm", "model", "impl")  # (names fold, never cut to "norml…")
        table.add_column(col, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    for r in records:
        table.add_row(r.step, r.placement, r.norm, f"d{r.d_model} L{r.n_layers} V{r.vocab_size} {r.batch}x{r.seq_len}",
                      r.impl,
                      f"{r.median_ms:.2f}", f"{r.tokens_per_s:,.0f}", f"{r.ratio_vs_torch:.2f}",
                      f"{r.ratio_vs_torch_norms:.2f}")
    print_table(console, table)
    console.print("wrote " + ", ".join(str(p) for p in paths))
