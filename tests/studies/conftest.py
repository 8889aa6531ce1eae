"""The study tests' fixture: a small corpus (their helpers are in helpers.py)."""

import pytest


@pytest.fixture(scope="module")
def corpus():
    from normlab.studies.data import ByteCorpus

    return ByteCorpus.from_path(max_bytes=200_000)
