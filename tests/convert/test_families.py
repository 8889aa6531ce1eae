"""Every Hugging Face family in normlab's structure table, built tiny from a config:
layernorm_to_rmsnorm and fold_norm_affine convert it exactly (fp32 logits) or refuse it
with a reason specific to it. The table in docs/convert.md is this file's output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm, swap_norms
from normlab.convert.blocks import hf_families
from normlab.norms import RMSNorm
from tests.convert.models import hf_inputs, hf_model, perturb

pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")

# family -> (what layernorm_to_rmsnorm does, the refusal's words if it refuses)
FAMILIES = {
    "gpt2": ("converts", None),
    "gpt_neox": ("converts", None),
    "gpt_neox_sequential": ("converts", None),
    "opt": ("converts", None),
    "opt_project": ("converts", None),
    "opt_post": ("refuses", "Post-LN"),
    "falcon": ("converts", None),
    "falcon_new": ("converts", None),
    "falcon_sequential": ("converts", None),
    "phi": ("converts", None),
    "phi_qk": ("converts", None),
    "llama": ("refuses", "is not a LayerNorm"),
    "mistral": ("refuses", "is not a LayerNorm"),
    "qwen2": ("refuses", "is not a LayerNorm"),
    "qwen3": ("refuses", "is not a LayerNorm"),
    "phi3": ("refuses", "is not a LayerNorm"),
    "gemma": ("refuses", "is not a LayerNorm"),  # an RMSNorm already: (1 + weight), swapped as offset 1
    "cohere": ("converts", None),  # a parallel block; its per-head q/k LayerNorms read a branch and stay
    "olmo2": ("refuses", r"writes the residual stream \(OLMo 2"),  # RMSNorms on the sublayers' outputs
    "bert": ("refuses", "Post-LN"),
    "roberta": ("refuses", "Post-LN"),
    "t5": ("refuses", "is not a LayerNorm"),
    "bloom": ("refuses", "not in normlab's table of Hugging Face models"),
}
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 logits, the conversion's target


def _logits(model, kw):
    with torch.no_grad():
        return model.eval()(**kw).logits


def _model(name):
    torch.manual_seed(0)
    return perturb(hf_model(name), scale=0.05).eval()


def _stream_layernorms(model) -> list[str]:
    from normlab.convert.analysis import analyse

    a = analyse(model)
    return [p for p, m in model.named_modules() if p in a.stream_norms and not isinstance(m, RMSNorm)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_layernorm_to_rmsnorm_converts_exactly_or_refuses_with_the_models_reason(name):
    model = _model(name)
    kw = hf_inputs(name)
    y0 = _logits(model, kw)
    action, words = FAMILIES[name]
    if action == "refuses":
        with pytest.raises(ConversionError, match=words):
            layernorm_to_rmsnorm(model)
        torch.testing.assert_close(_logits(model, kw), y0, atol=0, rtol=0)  # left unchanged
        return
    report = layernorm_to_rmsnorm(model).normlab_report
    torch.testing.assert_close(_logits(model, kw), y0, **TOL)
    assert report.paths("converted") and not _stream_layernorms(model)
    # and then every norm's affine folds into the Linear layers (a zero bias where beta needs one)
    folded = fold_norm_affine(model, add_bias=True).normlab_report
    torch.testing.assert_close(_logits(model, kw), y0, **TOL)
    left = {p: e.detail for e in folded.entries if e.action == "left" for p in [e.path]}
    assert all("query or key heads" in why for why in left.values()), left  # only phi_qk's q/k norms stay
    assert len(folded.paths("folded")) == len(report.paths("converted"))


@pytest.mark.parametrize("name", ["gpt_neox", "opt", "falcon_sequential", "phi", "phi3", "llama"])
def test_fold_norm_affine_alone_folds_every_norm_but_a_tied_heads(name):
    model = _model(name)
    kw = hf_inputs(name)
    y0 = _logits(model, kw)
    report = fold_norm_affine(model, add_bias=True).normlab_report
    torch.testing.assert_close(_logits(model, kw), y0, **TOL)
    norms = [p for p, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    tied = model.config.tie_word_embeddings  # OPT and Falcon tie their head to the embedding
    assert len(report.paths("folded")) == len(norms) - tied
    assert all("(tied weights)" in why for why in report.left.values()) and len(report.left) == tied


def test_without_add_bias_a_beta_with_nowhere_to_go_is_left_with_the_reason():
    model = _model("falcon")  # Falcon's Linear layers have no bias
    report = fold_norm_affine(model).normlab_report
    why = [w for p, w in report.left.items() if p != "transformer.ln_f"]  # ln_f: the tied head
    assert why and all("has no bias to absorb the norm's beta (add_bias=True gives it one)" in w for w in why)
    assert not any(k.endswith(".bias") and "self_attention" in k for k in model.state_dict())


@pytest.mark.parametrize("name", ["gpt_neox", "opt", "falcon", "phi"])
def test_swap_norms_keeps_the_new_families_outputs(name):
    model = _model(name)
    kw = hf_inputs(name)
    y0 = _logits(model, kw)
    report = swap_norms(model).normlab_report
    assert report.paths("swapped")
    torch.testing.assert_close(_logits(model, kw), y0, **TOL)


def test_a_hugging_face_model_is_never_traced():
    model = _model("bloom")
    report = fold_norm_affine(model).normlab_report
    why = {e.detail for e in report.entries if e.action == "left"}
    assert why and all("BloomForCausalLM is not in normlab's table of Hugging Face models" in w for w in why)
    assert "torch.fx" not in " ".join(why)


def test_every_family_in_the_table_is_tested():
    families = set(hf_families())
    tested = {n if n in families else n.rsplit("_", 1)[0] for n in FAMILIES}  # opt_post -> opt
    assert families <= tested, families - tested


# ------------------------------------------------------------------ docs/convert.md

DOCS = Path(__file__).resolve().parents[2] / "docs" / "convert.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def family_table() -> str:
    """The docs' table, from running the transforms on each tiny model."""
    rows = ["| family (tiny config) | layernorm_to_rmsnorm | fold_norm_affine(add_bias=True) |", "|---|---|---|"]
    for name in FAMILIES:
        model = _model(name)
        try:
            conv = layernorm_to_rmsnorm(model).normlab_report
            ln = f"exact: {len(conv.paths('converted'))} LayerNorms -> RMSNorm"
        except ConversionError as err:
            ln = "refused: " + str(err).removeprefix("layernorm_to_rmsnorm: ").split(" (probe:")[0]
        folded = fold_norm_affine(model, add_bias=True).normlab_report
        left = sorted({e.detail.split(" (probe:")[0] for e in folded.entries if e.action == "left"})
        fold = f"{len(folded.paths('folded'))} folded, {len(folded.paths('left'))} left"
        if left:
            fold += ": " + "; ".join(left)
        rows.append(f"| {name} | {ln.replace('|', '/')} | {fold.replace('|', '/')} |")
    return "\n".join(rows)


def test_the_docs_table_is_this_files_output():
    text = DOCS.read_text()
    assert BEGIN in text and END in text
    current = text.split(BEGIN)[1].split(END)[0].strip()
    assert current == family_table(), "regenerate: python -m tests.convert.test_families"


if __name__ == "__main__":  # rewrite the table in docs/convert.md
    text = DOCS.read_text()
    head, rest = text.split(BEGIN)
    DOCS.write_text(head + BEGIN + "\n" + family_table() + "\n" + END + rest.split(END)[1])
    sys.exit(0)


# ------------------------------------------------------------ diagnostics read the table


@pytest.mark.parametrize("name,post", [("opt_post", True), ("opt", False), ("bert", True), ("gpt_neox", False),
                                       ("falcon", False)])
def test_audit_reads_pre_or_post_ln_from_the_structure_table(name, post):
    from normlab.diagnostics import audit
    from normlab.diagnostics.audit import AuditContext
    from normlab.diagnostics.structure import find_block_lists

    model = _model(name)
    ctx = AuditContext(model, None, None, None, find_block_lists(model))
    assert {ctx.placement(stack) for stack, _ in ctx.block_lists} == {"post" if post else "pre"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no warm-up
    deep = [f for f in audit(model, example_input=hf_inputs(name), optimizer=opt)
            if f.kind == "deep-post-ln-no-warmup"]
    assert deep == []  # two layers: under the depth that warrants the warning
