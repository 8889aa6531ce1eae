"""``normlab study``'s --out: a folder it cannot write to, and --report-only on a folder
without runs (a mistyped --out), are usage errors naming --out, before anything is
written."""

import pytest
from rich.console import Console
from typer.testing import CliRunner

import normlab.studies.cli as study_cli
from normlab.cli import app
from normlab.studies import runner
from normlab.studies.presets import get_study


@pytest.fixture
def study_calls(monkeypatch):
    """``run_study`` replaced by a stand-in that records its calls and runs nothing."""
    calls = []

    def fake_run_study(spec, out, env, **kw):
        calls.append((spec.name, out, kw))
        return [], None

    monkeypatch.setattr(runner, "run_study", fake_run_study)
    monkeypatch.setattr(study_cli, "console", Console(width=2000))
    return calls


def _study(*args):
    return CliRunner().invoke(app, ["study", "quick", "--device", "cpu", *map(str, args)], env={"COLUMNS": "400"})


def test_report_only_on_a_folder_without_runs_is_refused_naming_out(tmp_path):
    # it made the folder and wrote a report of nothing but inconclusive claims, exit 0
    for out in (tmp_path / "typo", tmp_path):
        result = _study("--report-only", "--out", out)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
        assert f"Invalid value for --out: {out} holds no runs of 'quick'" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing written


@pytest.mark.parametrize("made", ["unfinished run", "jobs.json"])
def test_report_only_goes_on_where_a_run_or_a_job_record_is(tmp_path, study_calls, made):
    quick = tmp_path / "quick"
    quick.mkdir()
    if made == "jobs.json":
        (quick / "jobs.json").write_text("{}")
    else:
        (quick / get_study("quick").runs[-1].name).mkdir()  # a run that has not finished
    result = _study("--report-only", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert [(name, out, kw["report_only"]) for name, out, kw in study_calls] == [("quick", tmp_path, True)]


def test_an_out_that_is_not_a_directory_is_a_usage_error(tmp_path, study_calls):
    # it was "error: [Errno 20] Not a directory: '.../quick'" with exit 1, from the first write
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args in (["--out", a_file], ["--out", a_file / "sub"], ["--report-only", "--out", a_file]):
        result = _study(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Invalid value for --out" in result.output and f"inside {a_file}, which is not a directory" \
            in result.output, result.output
        assert "Errno" not in result.output
    assert study_calls == [] and a_file.read_text() == "x"


def test_a_fresh_out_folder_still_runs_the_study(tmp_path, study_calls):
    result = _study("--out", tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert [(name, out) for name, out, _ in study_calls] == [("quick", tmp_path / "new")]
    assert not (tmp_path / "new").exists()  # (the check leaves nothing behind)
