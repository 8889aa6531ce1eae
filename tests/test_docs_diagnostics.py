"""docs/diagnostics.md's self-contained examples run as written."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "diagnostics.md"


def _block_under(heading: str) -> str:
    """The first python block of the section ``heading``."""
    section = DOC.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_per_example_grad_norms_example_runs_on_normlabs_model():
    # it read rec["blocks.0.norm1"], a KeyError on normlab's TransformerLM (its norms are
    # blocks.<i>.norms.<site>), with model, loss_fn and batch left undefined
    namespace: dict = {}
    exec(compile(_block_under("Per-example gradient norms of the norm layers"), str(DOC), "exec"), namespace)
    rec, batch = namespace["rec"], namespace["batch"]
    entry = rec["blocks.0.norms.attn_in"]
    assert set(entry) == {"weight", "bias"} and entry["weight"].shape == (batch.shape[0],)
    assert rec.total().shape == (batch.shape[0],)
