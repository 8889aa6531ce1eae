"""Sublayer kinds come from the model-structure table for every family it holds: each
Linear layer inside a block is attention, an FFN input or the FFN output projection by
the table's declaration, not by its name."""

from __future__ import annotations

import pytest
from torch import nn

from normlab.convert.blocks import structure_kinds
from normlab.convert.linear import is_linear_like
from normlab.diagnostics.structure import _table_kind, find_block_lists, iter_param_info
from normlab.models import TransformerConfig, TransformerLM
from tests.convert.models import PreLNLM, hf_model

pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")

FAMILIES = ["gpt2", "gpt_neox", "opt", "falcon", "phi", "phi3", "llama", "qwen3", "gemma", "bert", "roberta", "t5"]


NORMLAB = {"normlab": {}, "normlab-parallel": {"placement": "parallel", "qk_norm": "rmsnorm"},
           "normlab-parallel-two-norms": {"placement": "parallel", "placement_options": {"shared_norm": False}},
           "normlab-olmo2": {"placement": "olmo2", "qk_norm": "layernorm"}}


def _build(name):
    if name in NORMLAB:
        return TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=3, d_ff=32,
                                               **NORMLAB[name]))
    if name == "torch":
        return PreLNLM(layers=3)
    return hf_model(name)


@pytest.mark.parametrize("name", [*NORMLAB, "torch", *FAMILIES])
def test_every_linear_in_a_block_has_its_kind_from_the_table(name):
    model = _build(name)
    table = structure_kinds(model)
    info = {i.name: i for i, _ in iter_param_info(model)}
    lists = find_block_lists(model)
    n_layers = sum(len(c) for _, c in lists if not any(isinstance(m, nn.Embedding) for m in c.modules()))
    w2 = 0
    for path, m in model.named_modules():
        if not is_linear_like(m) or not any(path.startswith(p + ".") for p, _ in lists):
            continue
        kind = _table_kind(path, table)
        assert kind in ("attention", "ffn_w1", "ffn_w2"), (path, kind)
        assert info[f"{path}.weight"].kind == kind
        w2 += kind == "ffn_w2"
    # one FFN output projection per layer (T5: per block's FF sublayer)
    assert w2 == n_layers or name == "t5" and w2 == sum(
        1 for _, m in model.named_modules() if type(m).__name__ == "T5LayerFF")


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "llama", "normlab"])
def test_the_tables_embeddings_and_head(name):
    model = _build(name)
    kinds = {i.name: i.kind for i, _ in iter_param_info(model)}
    head = {"gpt2": "lm_head.weight", "gpt_neox": "lm_head.weight", "llama": "lm_head.weight",
            "normlab": "head.weight"}[name]
    if head in kinds:  # a tied head's weight is the embedding's, listed once
        assert kinds[head] == "head"
    assert any(k == "embedding" for k in kinds.values())


@pytest.mark.parametrize("name", ["normlab-parallel", "normlab-olmo2"])
def test_qk_norms_are_grouped_under_attention(name):
    """QK-norm parameters are norms (their own kind), inside the attention sublayer of the
    table; the table declares them as branch norms (not foldable), never stream norms."""
    from normlab.convert.blocks import block_spec

    model = _build(name)
    table = structure_kinds(model)
    for i in range(3):
        for qk in ("q_norm", "k_norm"):
            assert _table_kind(f"blocks.{i}.attn.{qk}", table) == "attention"
        spec = block_spec(model.blocks[i])
        assert set(spec.inner_norms) >= {"attn.q_norm", "attn.k_norm"}
        assert all(isinstance(spec.inner_norms[f"attn.{qk}"], str) for qk in ("q_norm", "k_norm"))
        assert not any("q_norm" in n or "k_norm" in n for n in (*spec.pre_norms, *spec.writer_norms))
    info = {i.name: i.kind for i, _ in iter_param_info(model)}
    assert info["blocks.0.attn.q_norm.weight"] == "norm"


def test_the_parallel_blocks_shared_norm_feeds_both_sublayers():
    from normlab.convert.blocks import block_spec

    shared = block_spec(_build("normlab-parallel").blocks[0])
    assert {c.path for c in shared.pre_norms["norms.attn_in"]} == {"attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                  "ffn.w1"}
    assert shared.fused_norms == ("norms.attn_in",)
    two = block_spec(_build("normlab-parallel-two-norms").blocks[0])
    assert {c.path for c in two.pre_norms["norms.attn_in"]} == {"attn.q_proj", "attn.k_proj", "attn.v_proj"}
    assert [c.path for c in two.pre_norms["norms.ffn_in"]] == ["ffn.w1"]
    assert two.fused_norms == ("norms.attn_in",)  # the FFN's norm reads the same sum, with no add
    olmo2 = block_spec(_build("normlab-olmo2").blocks[0])
    assert set(olmo2.writer_norms) == {"norms.attn_out", "norms.ffn_out"} and not olmo2.pre_norms
    assert olmo2.writers == ("attn.out_proj", "ffn.w2")
