"""Tasks for the studies: byte-level language modeling, a synthetic seq2seq task, and majority.

* The default corpus needs no download: the source files of the running Python's
  standard library, read as bytes (vocab 256), split into train/validation by file
  with a hash of the file's relative path (deterministic).
* ``--data PATH``: a text file or a folder of them, read the same way.
* ``NumberWords``: number -> English words, generated from a seed (encoder-decoder).
* ``majority_batch``: sequences of class tokens whose most frequent class is the label
  at every position (Brody et al. 2023), generated from a seed (encoder).

Batches are pure functions of (seed, step): a resumed or data-parallel run sees
exactly the data of an uninterrupted single-process run.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".csv", ".tsv", ".html", ".xml", ".yaml", ".yml", ".toml")
VOCAB_SIZE = 256


class DataError(ValueError):
    """The data the user pointed at cannot be used."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_validation(rel_path: str, val_percent: int) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < val_percent


# a validation file repeats the training text when at least this share of its distinct
# lines of at least ``REPEAT_LINE_CHARS`` characters (stripped) also occur in the training
# files: generated siblings (the standard library's encodings/cp1140.py beside cp037.py,
# byte for byte but for a table), copies, near-copies (bz2.py beside lzma.py). Such a file
# is left out of validation, which would otherwise reward memorizing the training text.
REPEAT_SHARE = 0.5
REPEAT_LINE_CHARS = 24


def _long_lines(blob: bytes) -> set[bytes]:
    return {s for line in blob.splitlines() if len(s := line.strip()) >= REPEAT_LINE_CHARS}


def _short_text_key(blob: bytes) -> bytes | None:
    """For a file without long lines (a word list, a CSV of short rows), which the line
    share cannot judge: a digest of its stripped non-empty lines, so a copy (whitespace
    aside) is found; None for a file without text."""
    text = b"\n".join(s for line in blob.splitlines() if (s := line.strip()))
    return hashlib.sha256(text).digest() if text else None


def _training_text(blobs: list[bytes]) -> tuple[set[bytes], set[bytes]]:
    """What ``_repeats`` compares a validation file with: the training files' long lines,
    and the ``_short_text_key`` of each training file without long lines (each file read once)."""
    lines: set[bytes] = set()
    short: set[bytes] = set()
    for blob in blobs:
        if own := _long_lines(blob):
            lines |= own
        elif (key := _short_text_key(blob)) is not None:
            short.add(key)
    return lines, short


def _repeats(blob: bytes, train_lines: set[bytes], train_short: set[bytes] = frozenset()) -> bool:
    """Whether ``blob`` (a validation file) repeats the training text: ``REPEAT_SHARE`` of
    its distinct long lines occur in the training files, or, for a file without long
    lines, it copies a training file (``_short_text_key``)."""
    lines = _long_lines(blob)
    if not lines:
        return (key := _short_text_key(blob)) is not None and key in train_short
    return len(lines & train_lines) >= REPEAT_SHARE * len(lines)


def _collect_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        f for f in path.rglob("*")
        # (the folders below ``path`` only: a --data folder may itself sit under site-packages)
        if f.is_file() and f.suffix in suffixes and "site-packages" not in (rel := f.relative_to(path).parts)
        and "__pycache__" not in rel
    )


@dataclass
class ByteCorpus:
    """Train and validation byte streams (uint8 tensors) and where they came from."""

    train: Tensor
    val: Tensor
    source: str
    n_files: int
    repeats_left_out: tuple[str, ...] = ()  # validation files that repeat the training text
    _unigram_logp: Tensor | None = field(default=None, repr=False, compare=False)
    _sha256: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_path(cls, path: str | Path | None = None, *, val_percent: int = 5,
                  max_bytes: int | None = None) -> ByteCorpus:
        """Read ``path`` (a file or folder; default: the Python standard library) as bytes.

        Files are split into train/validation by a hash of their path relative to
        ``path``; ``max_bytes`` caps each split (files in sorted order). A validation file
        that repeats the training text (``_repeats``: half of its distinct long lines
        occur in the training files read, or, without long lines, it copies one) is left
        out (``repeats_left_out``)."""
        root = stdlib_root() if path is None else Path(path).expanduser()
        if not root.exists():
            raise DataError(f"--data: {str(root)!r} does not exist")
        suffixes = (".py",) if path is None else TEXT_SUFFIXES
        files = _collect_files(root, suffixes)
        if not files:
            raise DataError(f"--data: no text files ({', '.join(suffixes)}) under {str(root)!r}")
        parts: dict[bool, list[bytes]] = {False: [], True: []}
        sizes = {False: 0, True: 0}
        held: list[tuple[str, Path]] = []
        for f in files:  # the training files first: the validation files are checked against them
            rel = f.name if root.is_file() else f.relative_to(root).as_posix()
            if len(files) > 1 and _is_validation(rel, val_percent):
                held.append((rel, f))
            elif max_bytes is None or sizes[False] < max_bytes:
                blob = f.read_bytes()
                parts[False].append(blob)
                sizes[False] += len(blob)
        train_lines, train_short = _training_text(parts[False]) if held else (set(), set())
        left_out = []
        for rel, f in held:
            if max_bytes is not None and sizes[True] >= max_bytes:
                break
            blob = f.read_bytes()
            if _repeats(blob, train_lines, train_short):
                left_out.append(rel)
                continue
            parts[True].append(blob)
            sizes[True] += len(blob)
        del train_lines, train_short
        train = b"\n".join(parts[False])
        val = b"\n".join(parts[True])
        # one file, or a split that left one side empty (every file hashed to the same
        # side, as a folder of two or three files can): hold out the tail of them all
        if len(files) == 1 or len(val) == 0 or len(train) == 0:
            whole = train + val
            cut = int(len(whole) * (1 - val_percent / 100))
            train, val = whole[:cut], whole[cut:]
        if max_bytes is not None:
            train, val = train[:max_bytes], val[:max_bytes]
        if len(train) < 2 or len(val) < 2:
            raise DataError(f"--data: {str(root)!r} holds too little text ({len(train) + len(val)} bytes)")
        return cls(
            train=torch.frombuffer(bytearray(train), dtype=torch.uint8),
            val=torch.frombuffer(bytearray(val), dtype=torch.uint8),
            source="python-stdlib" if path is None else str(root),
            n_files=len(files),
            repeats_left_out=tuple(left_out),
        )

    def sha256(self) -> str:
        """Identifies the bytes a study trained and validated on (both splits, in order).
        Computed once (each LM run records it, and a finished run is checked against it)."""
        if self._sha256 is None:
            h = hashlib.sha256()
            h.update(self.train.numpy().tobytes())
            h.update(b"\x00--validation--\x00")
            h.update(self.val.numpy().tobytes())
            self._sha256 = h.hexdigest()
        return self._sha256

    def unigram_val_loss(self, targets: Tensor | None = None) -> float:
        """Cross-entropy (nats/byte) of ``targets`` (default: the validation bytes) under the
        training bytes' frequencies (add-one smoothed): the loss of a model that learned
        only byte counts."""
        if self._unigram_logp is None:
            counts = torch.bincount(self.train.long(), minlength=VOCAB_SIZE).double() + 1.0
            self._unigram_logp = (counts / counts.sum()).log()
        targets = self.val if targets is None else targets
        # summed over the 256 byte values, their counts exact and the sum correctly rounded
        # (fsum): the same bits at any thread count, where a mean over the bytes is summed
        # in an order the threads decide
        counts = torch.bincount(targets.reshape(-1).long(), minlength=VOCAB_SIZE).double()
        return -math.fsum((counts * self._unigram_logp).tolist()) / float(counts.sum())

    def baselines(self, seq_len: int, val_bytes: int) -> dict[str, float]:
        """The unigram loss on the fixed validation set of a run, and on its two halves."""
        _, y = fixed_windows(self.val, seq_len, val_bytes)
        out = {"baseline_val_loss": self.unigram_val_loss(y)}
        if y.shape[0] >= 2:
            out["baseline_val_loss_select"] = self.unigram_val_loss(y[0::2])
            out["baseline_val_loss_test"] = self.unigram_val_loss(y[1::2])
        return out


def lm_batch(stream: Tensor, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """Random windows of ``seq_len + 1`` bytes -> (inputs, targets), int64 [B, T].

    A pure function of (seed, step), so resuming or splitting a batch across ranks
    reproduces the same data. Windows start at 0 .. numel - seq_len - 2, so the stream's
    last byte is never a target: an off-by-one kept as it is, since widening the range
    would change every batch of every committed study for one byte of the corpus."""
    if stream.numel() <= seq_len + 1:
        raise DataError(f"the corpus ({stream.numel()} bytes) is shorter than seq_len + 1 = {seq_len + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = stream[idx].long()
    return windows[:, :-1], windows[:, 1:]


def fixed_windows(stream: Tensor, seq_len: int, max_bytes: int) -> tuple[Tensor, Tensor]:
    """The validation set: consecutive windows of ``seq_len + 1`` bytes starting every
    ``seq_len`` bytes, each window's last byte the next one's first, as many as fit in
    the first ``max_bytes + 1`` bytes of ``stream`` (or in all of it) -> (inputs,
    targets), int64 [N, T]. The windows read bytes 0 .. N * seq_len: N * seq_len <=
    ``max_bytes`` targets, and one byte more with the first input.

    The same for every run and every seed: it depends on the data and seq_len alone."""
    usable = min(max_bytes, stream.numel() - 1)
    n = usable // seq_len
    if n < 1:
        if max_bytes < seq_len:
            raise DataError(f"a validation set of {max_bytes} bytes holds no window of seq_len = {seq_len} bytes")
        raise DataError(f"the validation split ({stream.numel()} bytes) is shorter than seq_len + 1 = {seq_len + 1}")
    idx = (torch.arange(n) * seq_len)[:, None] + torch.arange(seq_len + 1)
    windows = stream[idx].long()
    return windows[:, :-1], windows[:, 1:]


# ------------------------------------------------------------------ seq2seq task

PAD, BOS, EOS = 0, 2, 3
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 10**9, e.g. 1234 -> 'one thousand two hundred thirty-four'."""
    if not 0 <= n < 10**9:
        raise ValueError(f"number_to_words: expected 0 <= n < 10**9, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for size, word in ((10**6, "million"), (1000, "thousand")):
        if n >= size:
            rest = n % size
            return number_to_words(n // size) + f" {word}" + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=1)
def _group_gains() -> tuple[tuple[int, ...], ...]:
    """For the millions, thousands and units group of a number, what each group value
    0..999 adds to the length of its words: nothing for 0, else the group's words, its
    scale word and the space that joins it to the next."""
    return tuple(tuple([0] + [len(number_to_words(g)) + len(scale) + 1 for g in range(1, 1000)])
                 for scale in (" million", " thousand", ""))


@functools.lru_cache(maxsize=64)
def longest_words(max_value: int) -> int:
    """The length in bytes of the longest ``number_to_words(n)`` for 0 <= n <= max_value.

    A number's words are those of its nonzero groups of three digits, each with its scale
    word, joined by spaces, so each group adds to the length on its own: the longest is
    max_value's groups up to one, a smaller value there, and the longest groups after it
    (or max_value's own groups). Exact for every bound, without listing the numbers."""
    if not 0 <= max_value < 10**9:
        raise ValueError(f"longest_words: expected 0 <= max_value < 10**9, got {max_value}")
    gains = _group_gains()
    groups = (max_value // 10**6, max_value // 1000 % 1000, max_value % 1000)
    best, tight = 0, 0  # tight: what max_value's own groups so far add
    for i, top in enumerate(groups):
        if top > 0:
            best = max(best, tight + max(gains[i][:top]) + sum(max(g) for g in gains[i + 1:]))
        tight += gains[i][top]
    return max(max(best, tight) - 1, len(number_to_words(0)))  # (no space after the last group)


@dataclass(frozen=True)
class NumberWords:
    """Number -> English words as a byte-level transduction: '4052' -> 'four thousand fifty-two'.

    Source: the digits; target: BOS + words + EOS; both padded with PAD (0). ``tgt_len``
    None (the default): long enough for the longest number in range (51 up to 99,999,
    whose longest words take 50 bytes); a length given that some number in range does not
    fit is refused, not found out by the batch that draws that number.

    The numbers are split once, by a fixed hash, into a training pool and a held-out
    validation pool (about 1 in 10): a validation batch draws only numbers no training
    batch draws, so exact match measures the transduction, not memory."""

    max_value: int = 99_999
    src_len: int = 8
    tgt_len: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_value, bool) or not isinstance(self.max_value, int) or not 0 <= self.max_value < 10**9:
            raise ValueError(f"NumberWords: expected max_value to be an int in [0, 10**9), got {self.max_value!r}")
        digits = len(str(self.max_value))
        if self.src_len < digits:
            raise ValueError(f"NumberWords: src_len {self.src_len} is too short for {self.max_value} "
                             f"(expected >= {digits})")
        need = longest_words(self.max_value) + 1  # the target's BOS + words + EOS, shifted by one
        if self.tgt_len is None:
            object.__setattr__(self, "tgt_len", need)
        elif self.tgt_len < need:
            raise ValueError(f"NumberWords: tgt_len {self.tgt_len} is too short for the numbers up to "
                             f"{self.max_value} (expected >= {need}: the longest takes {need - 1} bytes)")
        if self.max_value < 1:  # 0 is always held out, 1 never: a training pool needs 1
            raise ValueError(f"NumberWords: expected max_value large enough to hold out validation numbers "
                             f"(>= 1), got {self.max_value}")

    @functools.cached_property
    def _pools(self) -> dict[str, Tensor]:
        n = torch.arange(self.max_value + 1, dtype=torch.long)
        # Knuth's multiplicative hash, its high bits (the low ones keep n's parity: an odd
        # multiplier modulo 2^32), so the held-out numbers end in every digit
        held_out = ((n * 2_654_435_761 % 2**32) >> 16) % 10 == 0
        return {"train": n[~held_out], "val": n[held_out]}

    def pool(self, split: str) -> Tensor:
        """The numbers a ``split`` ("train" | "val") batch draws from (disjoint)."""
        if split not in ("train", "val"):
            raise ValueError(f"NumberWords: expected split 'train' or 'val', got {split!r}")
        return self._pools[split]

    def batch(self, batch_size: int, seed: int, step: int, split: str = "train") -> dict[str, Tensor]:
        pool = self.pool(split)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        numbers = pool[torch.randint(0, len(pool), (batch_size,), generator=g)].tolist()
        src = torch.full((batch_size, self.src_len), PAD, dtype=torch.long)
        tgt = torch.full((batch_size, self.tgt_len + 1), PAD, dtype=torch.long)
        for i, n in enumerate(numbers):
            digits = str(n).encode()
            words = number_to_words(n).encode()
            if len(digits) > self.src_len or len(words) + 2 > self.tgt_len + 1:
                raise ValueError(f"NumberWords: {n} does not fit src_len/tgt_len")
            src[i, : len(digits)] = torch.tensor(list(digits))
            seq = [BOS, *words, EOS]
            tgt[i, : len(seq)] = torch.tensor(seq)
        return {
            "src": src,
            "src_padding_mask": src == PAD,
            "tgt_in": tgt[:, :-1],
            "tgt_out": tgt[:, 1:],
        }


def exact_match(predicted: Tensor, target: Tensor) -> float:
    """Fraction of rows whose tokens up to and including EOS all match (PAD ignored)."""
    mask = target != PAD
    same = (predicted == target) | ~mask
    return same.all(dim=1).float().mean().item()


# ------------------------------------------------------------------ majority task


@dataclass(frozen=True)
class Majority:
    """The majority task of Brody et al. 2023: a sequence of ``seq_len`` tokens from
    ``classes`` classes, whose most frequent class beats every other by at least
    ``margin`` occurrences; the label, at every position, is that class.

    Rows are drawn as: the majority class m uniformly; its count c uniformly from the
    smallest count that leaves room for the rest (each other class at most c - margin)
    to ``seq_len // 2``; the other seq_len - c tokens spread over the other classes
    uniformly at random under that cap; the positions shuffled."""

    classes: int = 20
    margin: int = 6

    def __post_init__(self) -> None:
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 2:
            raise ValueError(f"Majority: expected classes to be an int >= 2, got {self.classes!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 1:
            raise ValueError(f"Majority: expected margin to be an int >= 1, got {self.margin!r}")

    def count_range(self, seq_len: int) -> tuple[int, int]:
        """The majority class's smallest and largest count in a sequence of ``seq_len``."""
        lo = -(-(seq_len + (self.classes - 1) * self.margin) // self.classes)
        lo = max(lo, self.margin)
        hi = max(lo, seq_len // 2)
        if lo > seq_len:
            raise ValueError(f"Majority: seq_len {seq_len} is too short for {self.classes} classes with "
                             f"margin {self.margin}")
        return lo, hi

    def batch(self, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
        """(tokens [B, T] int64, labels [B] int64): a pure function of (seed, step)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        b, k = batch_size, self.classes
        lo, hi = self.count_range(seq_len)
        order = torch.rand(b, k, generator=g).argsort(dim=1)  # order[:, 0] is the majority class
        top = torch.randint(lo, hi + 1, (b,), generator=g)
        cap = top - self.margin  # each other class at most this often
        rest = seq_len - top
        # spread `rest` tokens over (classes - 1) x cap slots, chosen without replacement
        width = int(cap.max()) if b else 0
        keys = torch.rand(b, k - 1, max(width, 1), generator=g)
        keys = keys.masked_fill(torch.arange(max(width, 1)) >= cap[:, None, None], 2.0)
        rank = keys.flatten(1).argsort(dim=1).argsort(dim=1)
        others = (rank < rest[:, None]).view(b, k - 1, -1).sum(-1)
        counts = torch.zeros(b, k, dtype=torch.long)
        counts.scatter_(1, order, torch.cat([top[:, None], others], dim=1))
        ends = counts.cumsum(1)
        sorted_tokens = torch.searchsorted(ends, torch.arange(seq_len).expand(b, seq_len).contiguous(), right=True)
        shuffle = torch.rand(b, seq_len, generator=g).argsort(dim=1)
        return sorted_tokens.gather(1, shuffle), order[:, 0].clone()
