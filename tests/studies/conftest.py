"""The study tests' fixtures: a small corpus, no report where a test does not check it,
and the report's figures kept to read (their helpers are in helpers.py)."""

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


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report's plot functions would save, kept open to read their artists."""
    import matplotlib.pyplot as plt

    from normlab.studies import report

    figs: list = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig) or path)
    yield figs
    for fig in figs:
        plt.close(fig)
