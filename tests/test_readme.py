"""The README's examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_names_every_study_preset():
    from normlab.studies.presets import PRESETS

    (listed,) = re.findall(r"\(`--list`: ([a-z, -]+)\)", README.read_text())
    assert [p.strip() for p in listed.split(",")] == list(PRESETS)
