"""Each placement's declared structure: the slot table in docs/models.md is generated
from it, and the declaration matches what the blocks compute."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from normlab.models import TransformerConfig, TransformerLM
from normlab.models.placement import SLOT_ROLES, get_placement, placement_names

DOCS = Path(__file__).resolve().parents[2] / "docs" / "models.md"
BEGIN, END = "<!-- slots:begin -->", "<!-- slots:end -->"
_WHAT = {"sublayer_input": "feeds F's input projections", "output_projection": "feeds F's output projection",
         "stream_write": "is added to the stream", "stream": "is the new stream"}


def slot_table() -> str:
    rows = ["| placement | attn / cross_attn / ffn slots: reads -> output | final norm reads | embedding norm |",
            "|---|---|---|---|"]
    for name in placement_names():
        p = get_placement(name)()
        subs = []
        for sub in ("attn", "cross_attn", "ffn"):
            if p.parallel and sub == "cross_attn":
                subs.append(f"{sub}: not supported (attention and FFN run side by side)")
                continue
            roles = p.norm_roles(sub)
            parts = [f"`{slot}` {r.reads} -> {_WHAT[r.output]}" for slot, r in roles]
            if p.input_norm_of(sub) != sub:
                parts.insert(0, f"reads {p.input_norm_of(sub)}'s `in` norm (shared)")
            subs.append(f"{sub}: " + (", ".join(parts) or "none"))
        final = {"stream": "the stream", "dual": "the dual stream (added to the output)"}[p.final_norm_reads] \
            if p.final_norm else "no final norm"
        rows.append(f"| `{name}` | {'; '.join(subs)} | {final} | {'yes: the stream starts at it' if p.embedding_norm else 'no'} |")
    return "\n".join(rows)


def test_the_docs_slot_table_is_generated_from_the_declarations():
    text = DOCS.read_text()
    assert text.split(BEGIN)[1].split(END)[0].strip() == slot_table(), \
        "regenerate: python -m tests.models.test_declared_structure"


@pytest.mark.parametrize("name", placement_names())
def test_every_registered_placement_declares_known_slots(name):
    cls = get_placement(name)
    assert all(slot in SLOT_ROLES for sub in ("attn", "cross_attn", "ffn") for slot in cls().norm_slots(sub))
    assert cls.final_norm_reads in ("stream", "dual") and cls().dual_stream == (cls.final_norm_reads == "dual")


@pytest.mark.parametrize("name", ["pre", "post", "sandwich", "subln", "olmo2", "parallel"])
def test_the_declared_roles_are_what_the_block_computes(name):
    """A norm declared to read the stream sees the residual stream itself (the previous
    block's output, or it plus the previous sublayer's branch); one declared to read a
    branch does not."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, d_ff=32,
                                            placement=name, dropout=0.0, max_seq_len=8)).eval()
    seen, block_in = {}, {}

    def normalized(name):  # what the norm normalizes: x, or residual + x in the fused call
        def hook(mod, args, kwargs, out):
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            seen.setdefault(name, args[0] if residual is None else residual + args[0])
        return hook

    def record_input(mod, args):
        block_in.setdefault("x", args[0])

    for n, m in model.blocks[1].norms.items():
        m.register_forward_hook(normalized(n), with_kwargs=True)
    model.blocks[1].register_forward_pre_hook(record_input)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 8)))
    stream = block_in["x"].value
    attn_slots = dict(model.blocks[1].placement.norm_roles("attn"))
    for slot, role in attn_slots.items():
        x = seen[f"attn_{slot}"]
        if role.reads == "stream" and role.output == "sublayer_input":  # the stream as the block received it
            torch.testing.assert_close(x, stream)
        elif role.reads == "branch":
            assert x.shape[-1] in (16, 32) and not torch.allclose(x, stream)


if __name__ == "__main__":  # rewrite the table in docs/models.md
    text = DOCS.read_text()
    head, rest = text.split(BEGIN)
    DOCS.write_text(head + BEGIN + "\n" + slot_table() + "\n" + END + rest.split(END)[1])
    sys.exit(0)
