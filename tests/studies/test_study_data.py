"""Study tasks: the stdlib corpus, user data, batches as pure functions, number -> words."""

import pytest
import torch

from normlab.studies.data import (
    BOS,
    EOS,
    PAD,
    ByteCorpus,
    DataError,
    NumberWords,
    exact_match,
    fixed_windows,
    lm_batch,
    number_to_words,
)


@pytest.fixture(scope="module")
def stdlib():
    return ByteCorpus.from_path(max_bytes=2_000_000)


def test_stdlib_corpus_is_real_python_split_by_file(stdlib):
    assert stdlib.source == "python-stdlib" and stdlib.n_files > 100
    assert stdlib.train.dtype == torch.uint8 and stdlib.train.numel() == 2_000_000
    assert b"def " in bytes(stdlib.train[:200_000].tolist())
    # deterministic: the same split twice
    again = ByteCorpus.from_path(max_bytes=2_000_000)
    assert torch.equal(again.train, stdlib.train) and torch.equal(again.val, stdlib.val)
    assert 0 < stdlib.val.numel() < stdlib.train.numel()


def test_split_is_by_whole_file(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.txt").write_text(f"<file {i}>" * 20)
    c = ByteCorpus.from_path(tmp_path, val_percent=20)
    train, val = bytes(c.train.tolist()).decode(), bytes(c.val.tolist()).decode()
    in_val = {i for i in range(60) if f"<file {i}>" in val}
    in_train = {i for i in range(60) if f"<file {i}>" in train}
    assert in_val and in_train and not in_val & in_train and in_val | in_train == set(range(60))


def test_a_validation_file_that_repeats_the_training_text_is_left_out(tmp_path):
    # the standard library's generated codecs (encodings/cp1140.py beside cp037.py) put
    # text copied from the training split into a fifth of the 256 KiB validation set
    from normlab.studies.data import _is_validation

    names = [f"f{i}.txt" for i in range(200)]
    val_names = [n for n in names if _is_validation(n, 20)]
    train_names = [n for n in names if not _is_validation(n, 20)]
    table = [f"    0x{i:04x}: 0x{(i * 7919) % 65536:04x},  # entry number {i}" for i in range(64)]
    (tmp_path / train_names[0]).write_text("\n".join(["# codec A"] + table))
    # a generated sibling: the same table but for a few rows -> left out
    sibling = table[:]
    sibling[3] = "    0x0003: 0xffff,  # a row of its own, number 3"
    (tmp_path / val_names[0]).write_text("\n".join(["# codec B"] + sibling))
    # a file with its own text, sharing a few boilerplate lines with training -> kept
    own = [f"value_{i} = compute_something_else({i}, {i * i})" for i in range(40)] + table[:5]
    (tmp_path / val_names[1]).write_text("\n".join(own))
    for n in train_names[1:20]:
        (tmp_path / n).write_text(f"training text of {n}, long enough to count as a line\n" * 3)
    c = ByteCorpus.from_path(tmp_path, val_percent=20)
    val = bytes(c.val.tolist()).decode()
    assert c.repeats_left_out == (val_names[0],)
    assert "codec B" not in val and "compute_something_else(39" in val
    # the default corpus: its generated codecs are not validation text
    stdlib_full = ByteCorpus.from_path()
    assert {"encodings/cp1140.py", "encodings/cp1252.py"} <= set(stdlib_full.repeats_left_out)
    assert b"Python Character Mapping Codec cp1252" not in bytes(stdlib_full.val.tolist())


def test_lm_batches_are_pure_functions_of_seed_and_step(stdlib):
    x1, y1 = lm_batch(stdlib.train, 4, 32, seed=1, step=7)
    x2, y2 = lm_batch(stdlib.train, 4, 32, seed=1, step=7)
    x3, _ = lm_batch(stdlib.train, 4, 32, seed=1, step=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    assert x1.dtype == torch.long and x1.max() < 256


def test_user_data_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("lorem ipsum " * 200)
    c = ByteCorpus.from_path(tmp_path)
    assert c.n_files == 2 and c.train.numel() + c.val.numel() >= 4800
    single = ByteCorpus.from_path(tmp_path / "a.txt")
    assert single.n_files == 1 and single.val.numel() > 0
    assert bytes(single.train[:11].tolist()) == b"hello world"


def test_user_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ByteCorpus.from_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        ByteCorpus.from_path(tmp_path / "empty")
    (tmp_path / "tiny.txt").write_text("x")
    with pytest.raises(DataError, match="too little text"):
        ByteCorpus.from_path(tmp_path / "tiny.txt")
    with pytest.raises(DataError, match="shorter than seq_len"):
        lm_batch(torch.zeros(10, dtype=torch.uint8), 2, 64, 0, 0)


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (13, "thirteen"), (40, "forty"), (42, "forty-two"), (100, "one hundred"),
    (4052, "four thousand fifty-two"), (1_000_000, "one million"),
    (99_999, "ninety-nine thousand nine hundred ninety-nine"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_number_words_batches():
    task = NumberWords()
    b = task.batch(8, seed=3, step=0)
    assert torch.equal(b["src"], task.batch(8, seed=3, step=0)["src"])
    for i in range(8):
        digits = bytes(t for t in b["src"][i].tolist() if t != PAD).decode()
        seq = b["tgt_in"][i].tolist()
        assert seq[0] == BOS
        words = bytes(t for t in b["tgt_out"][i].tolist() if t not in (PAD, EOS)).decode()
        assert words == number_to_words(int(digits))
        assert EOS in b["tgt_out"][i].tolist()
    assert torch.equal(b["src_padding_mask"], b["src"] == PAD)


def test_exact_match_ignores_padding():
    target = torch.tensor([[5, 6, EOS, PAD], [5, 6, EOS, PAD]])
    pred = torch.tensor([[5, 6, EOS, 9], [5, 7, EOS, PAD]])
    assert exact_match(pred, target) == 0.5


def test_number_words_validation_numbers_are_held_out():
    # both splits drew from all of 0..99,999: over 2,000 steps of 16, 18 of 64 validation
    # numbers had been trained on, so exact match partly measured memory
    task = NumberWords()
    train_pool, val_pool = set(task.pool("train").tolist()), set(task.pool("val").tolist())
    assert not train_pool & val_pool and len(train_pool) + len(val_pool) == task.max_value + 1
    assert 0.08 < len(val_pool) / (task.max_value + 1) < 0.12
    # every last digit is held out about as often (the hash's low bits kept n's parity:
    # the held-out numbers were all even, so no word for an odd unit was ever judged)
    last = torch.bincount(task.pool("val") % 10, minlength=10).double()
    assert (last / last.mean() - 1).abs().max() < 0.05

    def drawn(split, seed, steps):
        out = set()
        for step in range(steps):
            src = task.batch(16, seed, step, split)["src"]
            out |= {int(bytes(t for t in row.tolist() if t != PAD)) for row in src}
        return out

    assert drawn("val", 10_000, 4) <= val_pool
    assert not drawn("train", 0, 300) & val_pool
    with pytest.raises(ValueError, match="split 'train' or 'val'"):
        task.batch(2, 0, 0, "test")
    with pytest.raises(ValueError, match="large enough to hold out"):
        NumberWords(max_value=0)


def test_the_majority_tasks_validation_seed_is_refused_for_training():
    # its training batches would have been the validation batches, step for step
    from normlab.studies.spec import VAL_SEED, RunSpec

    with pytest.raises(ValueError, match=f"seed {VAL_SEED} is the majority task's validation seed"):
        RunSpec(name="m", model={}, task="majority", seed=VAL_SEED, seq_len=32)
    assert RunSpec(name="lm", model={}, seed=VAL_SEED).seed == VAL_SEED  # the LM's validation is its own bytes


def test_the_unigram_baseline_is_the_same_bits_at_any_thread_count():
    import math

    g = torch.Generator().manual_seed(0)
    # (a validation set big enough for torch to split a sum over threads)
    corpus = ByteCorpus(torch.randint(0, 256, (50_000,), generator=g, dtype=torch.uint8),
                        torch.randint(0, 256, (300_000,), generator=g, dtype=torch.uint8), "test", 1)
    threads = torch.get_num_threads()
    try:
        seen = set()
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            corpus._unigram_logp = None
            seen.add(corpus.baselines(128, 262_144)["baseline_val_loss"])
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1
    # the cross-entropy of the targets under the training bytes' add-one frequencies
    counts = torch.bincount(corpus.train.long(), minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    _, y = fixed_windows(corpus.val, 128, 262_144)
    want = -math.fsum(logp[y.reshape(-1).long()].tolist()) / y.numel()
    assert math.isclose(seen.pop(), want, rel_tol=1e-13)
