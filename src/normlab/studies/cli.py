"""``normlab study PRESET``: the command behind ``make run``."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # one line each, apart from the results on stdout


def study(
    preset: str = typer.Argument(None, help="Study preset (see --list)."),
    list_presets: bool = typer.Option(False, "--list", help="Describe the presets and exit."),
    out: Path = typer.Option(Path("runs"), help="Output folder; the study writes to OUT/PRESET."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    dtype: str = typer.Option("fp32", help="fp32, or bf16 (autocast)."),
    seeds: int = typer.Option(None, help="Run every configuration with seeds 0..N-1."),
    steps: int = typer.Option(None, help="Training steps per run (overrides the preset; the eval, diagnostics, "
                                         "checkpoint and log intervals scale with it, and a warm-up is cut to at "
                                         "most half of it)."),
    data: Path = typer.Option(None, help="Text file or folder to train on (default: the Python standard library's sources)."),
    workers: str = typer.Option("auto", help="Runs side by side in worker processes: a number, or auto (one per "
                                              "core, one thread each, on a CPU; one per GPU, or --runs-per-gpu, "
                                              "on cuda)."),
    runs_per_gpu: int = typer.Option(None, help="--device cuda: workers per GPU (default 1), each its own run; "
                                                "workers = GPUs x this."),
    keep_weights: bool = typer.Option(True, "--keep-weights/--no-keep-weights",
                                      help="Keep each run's final weights as <run>/model.safetensors."),
    launcher: str = typer.Option(None, help="Run each run as a job: slurm, or local (subprocesses); "
                                            "needs normlab\\[cluster]."),
    # the launcher's options default to None, so that one given without --launcher is refused
    # rather than ignored; JobOptions fills in the defaults the help states
    partition: str = typer.Option(None, help="--launcher slurm: the SLURM partition."),
    time_min: int | None = typer.Option(None, help="--launcher: wall-time limit per job, minutes (a job "
                                                   "over it is requeued and resumes; default 60)."),
    cpus_per_run: int | None = typer.Option(None, help="--launcher: CPU cores (torch threads) per run "
                                                       "(default 1)."),
    gpus_per_run: int | None = typer.Option(None, help="--launcher: GPUs per run (default 0: the runs "
                                                       "train on CPUs)."),
    mem_gb: float = typer.Option(None, help="--launcher: memory per job, GB."),
    max_parallel: int = typer.Option(None, help="--launcher slurm: at most this many jobs at once."),
    wait: bool | None = typer.Option(None, "--wait/--no-wait", help="--launcher: wait for the jobs and "
                                                                    "write the report (the default; "
                                                                    "--no-wait: submit and exit)."),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing: merge the finished runs "
                                                                  "into the summary and report."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace runs in the output folder that were "
                                                              "made with other settings (without it the "
                                                              "study refuses to touch them)."),
) -> None:
    """Reproduce published normalization findings; resumable, writes a report with plots."""
    from normlab.studies.cluster import JobOptions, check_launch, check_slurm_here
    from normlab.studies.data import DataError
    from normlab.studies.presets import get_study, preset_names
    from normlab.studies.runner import StudyBusy, apply_overrides, run_study
    from normlab.studies.train import Interrupted, setup_env, teardown_env

    if list_presets or preset is None:
        table = Table(title="normlab study presets")
        table.add_column("preset")
        table.add_column("runs", justify="right")
        table.add_column("what it reproduces")
        for name in preset_names():
            s = get_study(name)
            table.add_row(name, str(len(s.runs)), escape(s.description))
        console.print(table)
        if preset is None and not list_presets:
            errors.print("[red]error:[/red] expected a study preset (one of the table above), e.g. normlab study quick")
            raise typer.Exit(code=2)
        return
    try:
        n_workers = _parse_workers(workers)
        device = _check_device(device)
        # every launcher option is checked here, before anything runs: a run that has
        # finished submits no job, so the checks in cluster.submit alone would miss it
        chosen = {k: v for k, v in dict(partition=partition, max_parallel=max_parallel, time_min=time_min,
                                         cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                                         mem_gb=mem_gb).items() if v is not None}
        options = JobOptions(**chosen)  # JobOptions' defaults for the others
        given = {"--" + k.replace("_", "-") for k in chosen}
        if wait is not None:
            given.add("--wait" if wait else "--no-wait")
        check_launch(launcher, options, given=given, report_only=report_only)
        check_slurm_here(launcher)
        if report_only:  # options that would change what runs: --report-only runs nothing
            for flag, ignored in (("--overwrite", overwrite), ("--no-keep-weights", not keep_weights),
                                  (f"--workers {workers}", n_workers is not None)):
                if ignored:
                    raise ValueError(f"{flag}: --report-only runs nothing; it cannot combine with {flag.split()[0]}")
        spec = apply_overrides(get_study(preset), seeds=seeds, steps=steps)
        _check_out(out, spec, report_only)
        env = setup_env(device, dtype)
        if launcher is None and not report_only:  # the runs' ops run here: a backend that cannot, refused
            from normlab.bench.common import check_backend

            check_backend(env.device)
        try:
            _, report = run_study(spec, out, env, data=str(data) if data else None, console=console,
                                  workers=n_workers, keep_weights=keep_weights, launcher=launcher,
                                  job_options=options, wait=True if wait is None else wait,
                                  report_only=report_only, runs_per_gpu=runs_per_gpu, overwrite=overwrite,
                                  merge_command=merge_command(preset, out, seeds, steps, data, dtype))
        except Interrupted:
            teardown_env(env)  # every rank stops at the same step
            raise
        # (on other errors this process exits; torchrun ends the others)
        teardown_env(env)
    except StudyBusy as e:  # another command is running this study: nothing wrong with the options
        errors.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(code=1) from None
    except (ValueError, DataError, ImportError) as e:
        errors.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(code=2) from None
    except Interrupted as e:
        errors.print(f"[yellow]{escape(str(e))}[/yellow]")
        raise typer.Exit(code=130) from None
    except OSError as e:  # the output folder: unwritable, or the disk full
        errors.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(code=1) from None
    if report is not None:
        _print_claims(report.parent / "claims.json")
        console.print(f"report: {escape(str(report))}")
        import json

        summary = json.loads((report.parent / "summary.json").read_text())
        missing = summary["provenance"].get("not_finished") or []
        if missing:
            more = f" and {len(missing) - 8} more (summary.json: provenance.not_finished)" if len(missing) > 8 else ""
            console.print(f"[yellow]{len(missing)} run(s) not finished yet[/yellow]: "
                          + escape(", ".join(missing[:8]) + more))
        failed = summary.get("failed", [])
        if failed:
            console.print(f"[red]{len(failed)} run(s) failed[/red] (tracebacks in summary.json): "
                          + escape(", ".join(f["name"] for f in failed)))
            raise typer.Exit(code=1)


def merge_command(preset: str, out: Path, seeds: int | None, steps: int | None, data: Path | None,
                  dtype: str) -> str:
    """The ``--report-only`` command that merges this invocation's runs: its folder and
    the options the runs were made with (what a report-only run must repeat)."""
    parts = ["normlab", "study", preset, "--report-only"]
    if out != Path("runs"):
        parts += ["--out", str(out)]
    if seeds is not None:
        parts += ["--seeds", str(seeds)]
    if steps is not None:
        parts += ["--steps", str(steps)]
    if data is not None:
        parts += ["--data", str(data)]
    if dtype != "fp32":
        parts += ["--dtype", dtype]
    return shlex.join(parts)


def _check_out(out: Path, spec, report_only: bool) -> None:
    """``--out``: a folder the study can write OUT/PRESET in; with ``--report-only`` one
    that holds runs of the preset (a run's folder, finished or not, or the launcher's
    jobs.json): a mistyped folder would otherwise get a report of nothing but
    inconclusive claims. Refused before anything is written."""
    from normlab.bench.common import check_out_dir

    study_dir = out / spec.name
    check_out_dir(study_dir, param_hint="--out")
    if report_only and not ((study_dir / "jobs.json").is_file()
                            or any((study_dir / r.name).is_dir() for r in spec.runs)):
        raise typer.BadParameter(f"{out} holds no runs of {spec.name!r} (no run folder in {study_dir}), nothing to "
                                 "report; expected the --out the runs were made with", param_hint="--out")


def _check_device(text: str | None) -> str | None:
    """``--device``: cpu, cuda or cuda:N (None: run_study's default); refused here, before
    torch would refuse it with a traceback."""
    from normlab.bench.common import is_device_text

    if text is None:
        return None
    if not is_device_text(text):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    return text.strip().lower()


def _parse_workers(text: str | None) -> int | None:
    """``--workers``: a number, or auto (None: run_study picks from the machine)."""
    if text is None or text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--workers: expected a number or auto, got {text!r}") from None


def _print_claims(path: Path) -> None:
    import json

    rows = json.loads(path.read_text())
    if not rows:
        return
    from normlab.studies.report import bound_text, interval_label, judged_margin

    # the claim's name keeps room to be read at 80 columns (a piped log's width): no column
    # rules, and the interval's label on a line of its own below its bounds
    table = Table(title="claims (95% intervals over paired seeds unless the interval says otherwise)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("claim", overflow="fold", min_width=20, ratio=1)
    for col in ("estimate", "interval", "margin", "n", "verdict"):
        table.add_column(col, no_wrap=col != "interval", max_width=18 if col == "interval" else None)
    colors = {"agrees": "green", "disagrees": "red", "inconclusive": "yellow", "sanity": "blue"}
    for r in rows:
        ci, label = r["ci95"], interval_label(r)
        ci_text = ("-" if ci[0] is None or ci[1] is None
                   else f"[{bound_text(ci[0], judged_margin(r))}, {bound_text(ci[1], judged_margin(r))}]")
        if ci_text != "-" and label != "95% CI over paired seeds":
            ci_text += f"\n({label.removeprefix('95% CI ')})"
        est = "-" if r["estimate"] is None else f"{r['estimate']:+.3f}"
        table.add_row(escape(r["id"]), est, ci_text, f"{r['margin']:g}", str(r["n_seeds"]),
                      f"[{colors[r['verdict']]}]{r['verdict']}[/]")
    console.print(table)
