"""The study command as a user meets it: a failed job's error (not its log's path) in the
reports, --report-only of a launcher's folder without submitit, the claims table at 80
columns, workers spawned with SIGINT blocked, a Ctrl-C while torch loads, the report
header naming --seeds/--steps, and --launcher refused before anything runs without
submitit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from normlab.cli import app
from normlab.studies import cli as study_cli
from normlab.studies import cluster, runner
from normlab.studies.presets import get_study
from normlab.studies.report import write_html, write_markdown
from tests.studies.helpers import micro_spec

JOB_ERROR = ("job 16001 raised:\nsubmitit.core.utils.FailedJobError: Job (task=0) failed during processing with "
             "trace:\n----------------------\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
             "ValueError: TransformerConfig: unknown norm 'nope'\n\n----------------------\nYou can check full logs "
             "with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /runs/jobs/16001_0_log.err\n"
             "  - /runs/jobs/16001_0_log.out")


def test_the_reports_name_a_failed_jobs_error_not_its_log(tmp_path):
    write_markdown(tmp_path, "s", [], {}, [], {"bad": JOB_ERROR})
    md = (tmp_path / "claims.md").read_text()
    assert "- `bad`: ValueError: TransformerConfig: unknown norm 'nope'" in md
    write_html(tmp_path, "s", "d", [], [], {}, {}, {"bad": JOB_ERROR})
    page = (tmp_path / "index.html").read_text()
    assert "unknown norm" in page and "16001_0_log.out</td>" not in page


def test_report_only_of_a_launchers_folder_without_submitit_reports_the_runs_not_finished(tmp_path, monkeypatch):
    def missing():
        raise ImportError("normlab study --launcher needs submitit: pip install 'normlab[cluster]'")

    monkeypatch.setattr(cluster, "_submitit", missing)
    (tmp_path / "jobs.json").write_text(json.dumps({"a": {"job_id": "1", "launcher": "local", "folder": "jobs/x"}}))
    with pytest.warns(RuntimeWarning, match="submitit is not installed here"):
        assert cluster.ended_jobs(tmp_path, ["a"], lambda name: False) == {}
    with pytest.raises(ValueError, match="--launcher local: normlab study --launcher needs submitit"):
        cluster.check_launch("local")
    out = CliRunner().invoke(app, ["study", "quick", "--device", "cpu", "--out", str(tmp_path / "o"),
                                   "--launcher", "local"])
    assert out.exit_code == 2 and "needs submitit" in " ".join(out.output.split())
    assert not (tmp_path / "o").exists()  # refused before the folder is taken


def test_the_claims_table_names_every_claim_at_80_columns(tmp_path, monkeypatch):
    rows = [{"id": "gray-norm-gns-matches-total@layernorm", "ci95": [-0.1234, 0.5678], "estimate": 0.2,
             "margin": 0.693, "n_seeds": 3, "verdict": "inconclusive", "test": "equivalence",
             "interval_kind": "paired seeds, jackknifed", "claim": "gray-norm-gns-matches-total"},
            {"id": "xiong-postln-needs-warmup@lr=0.001", "ci95": [0.01, 0.02], "estimate": 0.015, "margin": 0.0,
             "n_seeds": 5, "verdict": "agrees", "test": "directional", "interval_kind": "paired seeds",
             "claim": "xiong-postln-needs-warmup"}]
    path = tmp_path / "claims.json"
    path.write_text(json.dumps(rows))
    console = Console(width=80, record=True, color_system=None)
    monkeypatch.setattr(study_cli, "console", console)
    study_cli._print_claims(path)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    lines = text.splitlines()
    header = next(line for line in lines if "estimate" in line and "verdict" in line)
    col = header.index("estimate")  # the claim column, folded over lines: read down it
    claims = "".join(line[:col].strip() for line in lines[lines.index(header) + 2:])
    assert claims == "".join(row["id"] for row in rows), claims  # every name whole, never cut
    assert "inconclusive" in text and "agrees" in text and "0.693" in text


def test_processes_spawned_inside_sigint_blocked_start_with_it_blocked():
    probe = [sys.executable, "-c", "import re; print(re.search(r'SigBlk:\\s*(\\w+)', "
             "open('/proc/self/status').read()).group(1))"]
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc here")
    with runner._sigint_blocked():
        inside = int(subprocess.run(probe, capture_output=True, text=True).stdout, 16)
        assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    assert inside & (1 << (signal.SIGINT - 1))
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # as it was after


def test_import_normlab_loads_no_torch_so_the_entry_point_covers_its_import():
    code = ("import sys, normlab; print('torch' in sys.modules); print(normlab.LayerNorm.__module__); "
            "print(normlab.backend.__name__, normlab.ops.__name__, normlab.errors.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(runner.__file__).parents[2])})
    # (and the modules a plain ``import normlab`` used to bind still load on first use)
    assert out.stdout.split() == ["False", "normlab.norms.layer_norm", "normlab.backend", "normlab.ops",
                                  "normlab.errors"], out.stderr


def test_the_report_header_names_the_seeds_and_steps_it_ran_with():
    study = get_study("gns")
    assert "Run with" not in runner.apply_overrides(study).description
    changed = runner.apply_overrides(study, seeds=2, steps=60)
    assert changed.description.startswith(study.description)
    assert changed.description.endswith("Run with --seeds 2 --steps 60, which replace the preset's counts above.")
    assert all(r.steps == 60 for r in changed.runs if r.kind == "train")
    assert micro_spec("x").steps == 8  # (the helper's default, untouched)
