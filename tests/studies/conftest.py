"""The study tests' fixtures: a small corpus, and no report where a test does not check
it (their helpers are in helpers.py)."""

import pytest


@pytest.fixture(scope="module")
def corpus():
    from normlab.studies.data import ByteCorpus

    return ByteCorpus.from_path(max_bytes=200_000)


@pytest.fixture
def no_report(monkeypatch):
    """The study's report (its plots take seconds) is not what these tests check."""
    from normlab.studies import runner

    monkeypatch.setattr(runner, "write_report", lambda study_dir, *a, **k: study_dir / "index.html")
