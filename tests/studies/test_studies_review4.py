"""Study settings and data, from a review: settings that silently train a different run
(a negative or nan grad_clip, a warm-up past the last step), validation sets too small
for their select and test halves, a majority run that crashed after training, and
--data folders whose copies or location the data reader missed."""

import math

import pytest

from normlab.studies.data import ByteCorpus, DataError, _is_validation, fixed_windows
from normlab.studies.spec import RunSpec


@pytest.mark.parametrize("clip", [-1.0, 0.0, math.nan, math.inf, True])
def test_grad_clip_must_be_a_finite_positive_number(clip):
    with pytest.raises(ValueError, match="grad_clip must be None"):
        RunSpec(name="x", model={}, grad_clip=clip)


def test_grad_clip_none_and_positive_are_taken():
    assert RunSpec(name="x", model={}, grad_clip=None).grad_clip is None
    assert RunSpec(name="x", model={}, grad_clip=1).grad_clip == 1


def test_a_warm_up_past_the_last_step_is_refused_for_training_runs():
    with pytest.raises(ValueError, match=r"warmup_steps must be <= steps \(100\)"):
        RunSpec(name="x", model={}, steps=100, warmup_steps=400)
    RunSpec(name="x", model={}, steps=100, warmup_steps=100)  # reaches the lr at the last step
    RunSpec(name="x", model={}, kind="probe", steps=0, warmup_steps=400)  # a probe takes no step


def test_the_lm_validation_set_needs_two_windows_for_its_halves():
    with pytest.raises(ValueError, match=r"val_bytes must be >= 2 \* seq_len = 128"):
        RunSpec(name="x", model={}, seq_len=64, val_bytes=100, val_bytes_during=100)
    RunSpec(name="x", model={}, seq_len=64, val_bytes=128, val_bytes_during=64)


def test_val_bytes_during_below_seq_len_is_refused_by_name():
    with pytest.raises(ValueError, match=r"val_bytes_during must be in \[seq_len, val_bytes\] = \[16, 4096\]"):
        RunSpec(name="x", model={}, seq_len=16, val_bytes=4096, val_bytes_during=8)


def test_fixed_windows_names_a_too_small_set_not_the_split():
    with pytest.raises(DataError, match="a validation set of 8 bytes holds no window of seq_len = 16"):
        fixed_windows(__import__("torch").zeros(1000, dtype=__import__("torch").uint8), 16, 8)


def test_a_majority_run_needs_two_validation_sequences():
    with pytest.raises(ValueError, match=r"batch_size \* eval_batches must be >= 2 for task 'majority'"):
        RunSpec(name="x", model={}, task="majority", batch_size=1, eval_batches=1)
    RunSpec(name="x", model={}, task="majority", batch_size=1, eval_batches=2)
    RunSpec(name="x", model={}, task="lm", batch_size=1, eval_batches=1)


def test_a_copied_validation_file_of_short_lines_is_left_out(tmp_path):
    # a CSV of short rows has no line long enough for the line share: a byte copy of a
    # training file used to reach validation
    names = [f"f{i}.csv" for i in range(40)]
    val = [n for n in names if _is_validation(n, 5)]
    train = [n for n in names if n not in val]
    assert val and train
    for i, n in enumerate(train):
        (tmp_path / n).write_text("".join(f"{i},{j},{(i * j) % 97}\n" for j in range(300)))
    copied = train[0]
    (tmp_path / val[0]).write_text("  " + (tmp_path / copied).read_text().replace("\n", " \n"))  # whitespace aside
    for k, n in enumerate(val[1:]):
        (tmp_path / n).write_text("".join(f"v{k},{j},{j * 3}\n" for j in range(300)))
    c = ByteCorpus.from_path(tmp_path)
    assert c.repeats_left_out == (val[0],)
    assert b"0,1,0\n" not in bytes(c.val.tolist())
    if len(val) > 1:
        assert b"v0,1,3" in bytes(c.val.tolist())


def test_a_data_folder_under_site_packages_is_read(tmp_path):
    root = tmp_path / "site-packages" / "docs"
    (root / "__pycache__").mkdir(parents=True)
    (root / "site-packages").mkdir()
    for i in range(10):
        (root / f"a{i}.txt").write_text(f"document {i} " * 200)
    (root / "__pycache__" / "skip.txt").write_text("SKIPPED " * 100)
    (root / "site-packages" / "skip.txt").write_text("SKIPPED " * 100)
    c = ByteCorpus.from_path(root)
    assert c.n_files == 10
    assert b"SKIPPED" not in bytes(c.train.tolist()) + bytes(c.val.tolist())
