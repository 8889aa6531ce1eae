"""``normlab study``'s options are checked before anything runs: the launcher's
(``cluster.check_launch``, from the command and from ``cluster.submit``), ``--device``,
and what the command prints (Rich markup in user text is escaped). Nothing here trains:
``run_study`` is replaced by a stand-in that records how it was called."""

import json
import shlex

import pytest
from rich.console import Console
from typer.testing import CliRunner

import normlab.studies.cli as study_cli
from normlab.cli import app
from normlab.studies import cluster, runner
from normlab.studies.cluster import JobOptions, check_launch
from tests.studies.helpers import micro_spec

# ------------------------------------------------------------------ check_launch


@pytest.mark.parametrize("launcher, options, given, report_only, message", [
    ("bogus", {}, set(), False, "--launcher: expected one of local, slurm, got 'bogus'"),
    ("slurm", {}, set(), False, "--launcher slurm: expected --partition (the SLURM partition to submit to)"),
    ("local", {"cpus_per_run": 0}, {"--cpus-per-run"}, False, "--cpus-per-run: expected >= 1, got 0"),
    ("local", {"time_min": 0}, {"--time-min"}, False, "--time-min: expected >= 1 (minutes), got 0"),
    ("local", {"gpus_per_run": -1}, {"--gpus-per-run"}, False, "--gpus-per-run: expected >= 0, got -1"),
    ("local", {"mem_gb": 0.0}, {"--mem-gb"}, False, "--mem-gb: expected > 0, got 0"),
    ("local", {"mem_gb": -2.5}, {"--mem-gb"}, False, "--mem-gb: expected > 0, got -2.5"),
    ("slurm", {"partition": "cpu", "max_parallel": 0}, {"--partition", "--max-parallel"}, False,
     "--max-parallel: expected >= 1, got 0"),
    (None, {"partition": "cpu"}, {"--partition"}, False, "--partition only applies with --launcher slurm"),
    ("local", {"partition": "cpu"}, {"--partition"}, False, "--partition only applies with --launcher slurm"),
    ("local", {"max_parallel": 2}, {"--max-parallel"}, False, "--max-parallel only applies with --launcher slurm"),
    (None, {"time_min": 30}, {"--time-min"}, False, "--time-min only applies with --launcher"),
    (None, {"cpus_per_run": 2}, {"--cpus-per-run"}, False, "--cpus-per-run only applies with --launcher"),
    (None, {"gpus_per_run": 1}, {"--gpus-per-run"}, False, "--gpus-per-run only applies with --launcher"),
    (None, {"mem_gb": 4.0}, {"--mem-gb"}, False, "--mem-gb only applies with --launcher"),
    (None, {}, {"--no-wait"}, False, "--no-wait only applies with --launcher"),
    (None, {}, {"--no-wait"}, True, "--no-wait only applies with --launcher (--report-only runs nothing)"),
    ("local", {}, set(), True, "--report-only runs nothing; it cannot combine with --launcher"),
])
def test_check_launch_refuses_with_one_line_naming_the_option(launcher, options, given, report_only, message):
    with pytest.raises(ValueError) as err:
        check_launch(launcher, JobOptions(**options), given=given, report_only=report_only)
    assert str(err.value) == message and "\n" not in str(err.value)


@pytest.mark.parametrize("launcher, options, given, report_only", [
    (None, None, set(), False),
    (None, JobOptions(), set(), True),
    ("local", JobOptions(), set(), False),
    ("local", JobOptions(time_min=10, cpus_per_run=2, gpus_per_run=1, mem_gb=0.5),
     {"--time-min", "--cpus-per-run", "--gpus-per-run", "--mem-gb", "--no-wait"}, False),
    ("slurm", JobOptions(partition="gpu", max_parallel=4), {"--partition", "--max-parallel", "--wait"}, False),
])
def test_check_launch_accepts_what_holds(launcher, options, given, report_only):
    check_launch(launcher, options, given=given, report_only=report_only)


@pytest.mark.parametrize("launcher, options, message", [
    ("ray", JobOptions(), "--launcher: expected one of local, slurm, got 'ray'"),
    (None, JobOptions(), "--launcher: expected one of local, slurm, got None"),
    ("slurm", JobOptions(), "--launcher slurm: expected --partition"),
    ("local", JobOptions(cpus_per_run=0), "--cpus-per-run: expected >= 1, got 0"),
    ("local", JobOptions(time_min=0), "--time-min: expected >= 1"),
    ("slurm", JobOptions(partition="cpu", max_parallel=0), "--max-parallel: expected >= 1, got 0"),
])
def test_submit_refuses_bad_options_before_submitting(tmp_path, launcher, options, message):
    # an API caller of cluster.submit gets the same checks; nothing is written or submitted
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        cluster.submit([micro_spec("a")], tmp_path, launcher, options, data=None, ship_corpus=None,
                       dtype="fp32", keep_weights=False)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the command


@pytest.fixture()
def study_calls(monkeypatch):
    """``run_study`` replaced: records its keyword arguments and runs nothing; the
    command's console made wide, so no message wraps."""
    calls = []

    def fake_run_study(spec, out, env, **kw):
        calls.append(kw)
        return [], None

    monkeypatch.setattr(runner, "run_study", fake_run_study)
    monkeypatch.setattr(study_cli, "console", Console(width=2000))
    return calls


def _study(tmp_path, *args):
    return CliRunner().invoke(app, ["study", "quick", "--device", "cpu", "--out", str(tmp_path), *args])


@pytest.mark.parametrize("args, message", [
    (["--launcher", "bogus"], "--launcher: expected one of local, slurm, got 'bogus'"),
    (["--launcher", "slurm"], "--launcher slurm: expected --partition (the SLURM partition to submit to)"),
    (["--launcher", "local", "--cpus-per-run", "0"], "--cpus-per-run: expected >= 1, got 0"),
    (["--launcher", "local", "--time-min", "0"], "--time-min: expected >= 1 (minutes), got 0"),
    (["--launcher", "local", "--gpus-per-run", "-1"], "--gpus-per-run: expected >= 0, got -1"),
    (["--launcher", "local", "--mem-gb", "0"], "--mem-gb: expected > 0, got 0"),
    (["--launcher", "slurm", "--partition", "cpu", "--max-parallel", "0"], "--max-parallel: expected >= 1, got 0"),
    (["--partition", "cpu"], "--partition only applies with --launcher slurm"),
    (["--launcher", "local", "--partition", "cpu"], "--partition only applies with --launcher slurm"),
    (["--launcher", "local", "--max-parallel", "2"], "--max-parallel only applies with --launcher slurm"),
    (["--time-min", "30"], "--time-min only applies with --launcher"),
    (["--cpus-per-run", "2"], "--cpus-per-run only applies with --launcher"),
    (["--gpus-per-run", "1"], "--gpus-per-run only applies with --launcher"),
    (["--mem-gb", "4"], "--mem-gb only applies with --launcher"),
    (["--no-wait"], "--no-wait only applies with --launcher"),
    (["--report-only", "--cpus-per-run", "1"], "--cpus-per-run only applies with --launcher (--report-only runs"),
    (["--report-only", "--launcher", "local"], "--report-only runs nothing; it cannot combine with --launcher"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "--device: expected cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--device", "meta"], "--device: expected cpu, cuda or cuda:N, got 'meta'"),
])
def test_the_command_refuses_bad_options_before_running_anything(tmp_path, study_calls, args, message):
    # before run_study: on a folder whose runs have all finished no job is submitted, so
    # a check left to cluster.submit never runs
    out = _study(tmp_path, *args)
    assert out.exit_code == 2, out.output
    assert f"error: {message}" in out.output and "Traceback" not in out.output
    assert study_calls == [] and list(tmp_path.iterdir()) == []


def test_the_merge_command_repeats_the_options_the_runs_were_made_with(tmp_path, study_calls):
    # `--no-wait` printed `normlab study quick --report-only`, which a report-only run
    # refused (other --steps) or read from another folder (no --out)
    data = tmp_path / "my text.txt"
    data.write_text("some text\n" * 50)
    assert _study(tmp_path, "--launcher", "local", "--no-wait", "--seeds", "1", "--steps", "4",
                  "--data", str(data), "--dtype", "bf16").exit_code == 0
    (tmp_path / "quick" / "jobs.json").parent.mkdir()
    (tmp_path / "quick" / "jobs.json").write_text("{}")  # (--report-only refuses a folder without runs)
    assert _study(tmp_path, "--report-only").exit_code == 0
    given, plain = study_calls
    assert shlex.split(given["merge_command"]) == [
        "normlab", "study", "quick", "--report-only", "--out", str(tmp_path), "--seeds", "1", "--steps", "4",
        "--data", str(data), "--dtype", "bf16"]
    assert plain["merge_command"] == f"normlab study quick --report-only --out {shlex.quote(str(tmp_path))}"


def test_the_command_fills_in_the_job_defaults_and_passes_overwrite(tmp_path, study_calls, monkeypatch):
    monkeypatch.setattr(cluster.shutil, "which", lambda name: f"/usr/bin/{name}")  # (as on a login node)
    assert _study(tmp_path).exit_code == 0
    assert _study(tmp_path, "--launcher", "local", "--cpus-per-run", "2", "--no-wait").exit_code == 0
    assert _study(tmp_path, "--launcher", "slurm", "--partition", "gpu", "--gpus-per-run", "1", "--time-min", "5",
                  "--mem-gb", "8", "--max-parallel", "3", "--wait", "--overwrite").exit_code == 0
    (tmp_path / "quick" / "jobs.json").parent.mkdir()
    (tmp_path / "quick" / "jobs.json").write_text("{}")  # (--report-only refuses a folder without runs)
    assert _study(tmp_path, "--report-only").exit_code == 0
    plain, local, slurm, report_only = study_calls
    assert plain["launcher"] is None and plain["job_options"] == JobOptions() and plain["wait"] is True
    assert plain["overwrite"] is False and plain["report_only"] is False
    assert local["launcher"] == "local" and local["job_options"] == JobOptions(cpus_per_run=2)
    assert local["wait"] is False and local["overwrite"] is False
    assert slurm["job_options"] == JobOptions(partition="gpu", gpus_per_run=1, time_min=5, mem_gb=8.0,
                                              max_parallel=3)
    assert slurm["wait"] is True and slurm["overwrite"] is True
    assert report_only["report_only"] is True and report_only["launcher"] is None


def test_a_busy_study_is_an_error_with_exit_code_1(tmp_path, study_calls, monkeypatch):
    def busy(*args, **kw):
        raise runner.StudyBusy(f"another normlab study (pid 7) is running in {tmp_path}/[x]/quick")

    monkeypatch.setattr(runner, "run_study", busy)
    out = _study(tmp_path)
    assert out.exit_code == 1, out.output
    assert f"error: another normlab study (pid 7) is running in {tmp_path}/[x]/quick" in out.output
    assert "Traceback" not in out.output


def test_user_text_is_printed_as_written_not_as_rich_markup(tmp_path, study_calls, monkeypatch):
    # an error that quotes a path with brackets: Rich markup would drop "[cluster]" and
    # choke on "[/x]"
    def bad_data(*args, **kw):
        raise ValueError("--data: cannot read /data/[cluster]/a[/x]b")

    monkeypatch.setattr(runner, "run_study", bad_data)
    out = _study(tmp_path)
    assert out.exit_code == 2 and "error: --data: cannot read /data/[cluster]/a[/x]b" in out.output, out.output

    # the report's path, the runs not finished, the failed runs and the claims table
    folder = tmp_path / "out[bold]" / "quick"
    folder.mkdir(parents=True)
    report = folder / "index.html"
    report.write_text("")
    (folder / "claims.json").write_text(json.dumps([{
        "id": "pre[ln] beats post", "estimate": 0.5, "ci95": [0.1, 0.9], "margin": 0.05, "n_seeds": 3,
        "verdict": "agrees"}]))
    (folder / "summary.json").write_text(json.dumps({
        "provenance": {"not_finished": ["run[1]"]}, "failed": [{"name": "run[/2]", "error": "boom"}]}))
    monkeypatch.setattr(runner, "run_study", lambda *args, **kw: ([], report))
    out = _study(tmp_path)
    assert out.exit_code == 1, out.output  # a failed run
    for text in (f"report: {report}", "1 run(s) not finished yet: run[1]", "1 run(s) failed",
                 "run[/2]", "pre[ln] beats post"):
        assert text in out.output, text


def test_the_help_shows_the_extra_and_the_new_flag():
    out = CliRunner().invoke(app, ["study", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    assert "needs normlab[cluster]." in text and "--overwrite" in text
    # the launcher options' defaults are JobOptions', stated in their help
    defaults = JobOptions()
    assert f"default {defaults.time_min})" in text and f"(default {defaults.cpus_per_run})" in text
    assert f"(default {defaults.gpus_per_run}:" in text


# ------------------------------------------------------------------ where the jobs' logs go


def test_job_logs_go_to_the_jobs_folder_with_no_literal_percent_j(tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="submitit not installed (pip install 'normlab[cluster]')")
    # the job prints its arguments instead of training (print pickles by reference)
    monkeypatch.setattr(cluster, "RunJob", lambda: print)
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    specs = {"a": micro_spec("a"), "b": micro_spec("b", seed=1)}
    jobs = cluster.submit(list(specs.values()), study_dir, "local", JobOptions(time_min=2),
                          data=None, ship_corpus=None, dtype="fp32", keep_weights=False)
    record = json.loads((study_dir / "jobs.json").read_text())
    folders = {entry["folder"] for entry in record.values()}
    assert len(folders) == 1  # one folder for the submission, in jobs/
    folder = study_dir / folders.pop()
    assert folder.parent == study_dir / "jobs"
    for name, job in jobs.items():
        assert job.result() is None
        log = job.paths.stdout
        assert log.parent == folder and log.name == f"{job.job_id}_0_log.out"
        assert str(study_dir / name) in log.read_text()
    assert not [p for p in tmp_path.rglob("*") if "%j" in p.name]
    assert {name: {k: e[k] for k in ("job_id", "launcher", "fingerprint")} for name, e in record.items()} == \
        {name: {"job_id": job.job_id, "launcher": "local", "fingerprint": specs[name].fingerprint()}
         for name, job in jobs.items()}
    assert all("process" in e for e in record.values()) or cluster.process_identity(1) is None
