"""The ``normlab`` command line (one Typer app)."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="normlab: normalization for transformers. Norms, placements, studies, benchmarks, audits.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """normlab: normalization for transformers."""
    # a bad $NORMLAB_BACKEND would otherwise surface as a traceback from the first op
    import os

    from normlab.backend import _check_name

    try:
        _check_name(os.environ.get("NORMLAB_BACKEND", "auto"), "NORMLAB_BACKEND")
    except ValueError as err:
        raise typer.BadParameter(str(err).removeprefix("NORMLAB_BACKEND: "),
                                 param_hint="NORMLAB_BACKEND (environment variable)") from err



# the largest demo input of `normlab norms` (256 MiB of float32)
NORMS_DEMO_MAX_ELEMENTS = 1 << 26

@app.command()
def norms(
    hidden: int = typer.Option(256, help="Hidden size of the demo input."),
    rows: int = typer.Option(2048, help="Rows (batch x time) of the demo input."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """List the registered norms and measure each one's defining property and CPU cost."""
    if rows < 16:  # the demo input is [rows // 16, 16, hidden]
        raise typer.BadParameter(f"expected an integer >= 16 (the input is [rows / 16, 16, hidden]), got {rows}",
                                 param_hint="--rows")
    if hidden < 1:
        raise typer.BadParameter(f"expected a positive integer, got {hidden}", param_hint="--hidden")
    if not -(2**63) <= seed < 2**64:  # the range torch.manual_seed takes
        raise typer.BadParameter(f"expected an integer in [-2**63, 2**64 - 1], got {seed}", param_hint="--seed")
    if rows * hidden > NORMS_DEMO_MAX_ELEMENTS:  # a demo: refused before an allocation fails
        raise typer.BadParameter(f"expected rows x hidden up to {NORMS_DEMO_MAX_ELEMENTS:,} elements (a demo input), "
                                 f"got {rows} x {hidden} = {rows * hidden:,}", param_hint="--rows/--hidden")
    import torch

    from normlab.bench.common import check_backend
    from normlab.norms import build_norm, get_norm_entry, norm_names

    check_backend(torch.device("cpu"))  # the demo runs on the CPU
    torch.manual_seed(seed)
    x = torch.randn(rows // 16, 16, hidden) * 2.0 + 3.0  # mean 3, std 2: far from normalized
    table = Table(title=f"normlab norms on x ~ N(3, 2^2), shape {list(x.shape)}, CPU fp32")
    for col in ("name", "equation (paper)", "mean(y)", "rms(y) per row", "fwd+bwd ms"):
        table.add_column(col, overflow="fold")
    for name in norm_names():
        norm = build_norm(name, hidden).train()
        xg = x.clone().requires_grad_(True)
        y = norm(xg)
        y.square().mean().backward()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            norm(xg).square().mean().backward()
            times.append(time.perf_counter() - t0)
        y = y.detach()
        rms = y.square().mean(-1).sqrt()
        table.add_row(
            name, get_norm_entry(name).summary, f"{y.mean():+.3f}",
            f"{rms.mean():.3f} ± {rms.std():.3f}", f"{sorted(times)[2] * 1e3:.2f}",
        )
    console.print(table)


@app.command()
def audit(
    model: str = typer.Argument(..., help="pkg.module:factory, or a local Hugging Face checkpoint (its weights) "
                                          "or config (random weights) dir/name."),
) -> None:
    """Audit a model's normalization: double norms, missing final norm, eps, BatchNorm, dead norms."""
    from normlab.diagnostics.cli import audit_command

    audit_command(model)


# commands whose bodies live with their subsystem
from normlab.bench import app as bench_app  # noqa: E402
from normlab.convert.cli import convert  # noqa: E402
from normlab.studies.cli import study  # noqa: E402

app.command()(study)
app.command()(convert)
app.add_typer(bench_app, name="bench", help="Benchmarks: normlab's kernels against torch and peers.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
