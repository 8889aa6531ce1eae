"""The transforms on normlab's own models, over every placement: exact where they apply,
the documented reasons where they do not."""

import json

import pytest
import torch
from typer.testing import CliRunner

import normlab
from normlab.cli import app
from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm, swap_norms
from normlab.models import (
    Block,
    Seq2SeqTransformer,
    TransformerConfig,
    TransformerEncoder,
    TransformerLM,
    load_model,
    placement_names,
    save_model,
)
from tests.convert.models import perturb

KINDS = ("lm", "encoder", "seq2seq")
POST_LN = "cannot fold: Post-LN: its output is the residual stream"
WRITES_STREAM = "cannot fold: its output is written to the residual stream ("


def _model(kind, seed=0, **kw):
    cfg = TransformerConfig(**{"vocab_size": 40, "d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32,
                               "max_seq_len": 12, "dropout": 0.0, "tie_embeddings": False, **kw})
    torch.manual_seed(seed)
    make = {"lm": TransformerLM, "encoder": TransformerEncoder, "seq2seq": Seq2SeqTransformer}[kind]
    return perturb(make(cfg), scale=0.1, seed=seed).eval()


def _inputs(kind):
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    return (ids, ids.flip(-1)) if kind == "seq2seq" else (ids,)


def _out(model, args):
    with torch.no_grad():
        return model.eval()(*args)


def _norm_paths(model):
    return [p for p, m in model.named_modules() if isinstance(m, (normlab.LayerNorm, normlab.RMSNorm))]


def _expected_fold(path: str, kind: str, placement: str) -> str | None:
    """None: folded; else a substring of the reason it is left."""
    slot = path.rsplit("_", 1)[-1]
    if path.endswith("final_norm"):
        if placement == "resi_dual":
            return "added to the Post-LN stream (ResiDual"
        if path == "encoder.final_norm":
            return None  # into every decoder block's cross-attention k_proj and v_proj
        if kind == "encoder":
            return "its output leaves the model (a model output)"
        return "consumer head has no bias to absorb the norm's beta"
    if path == "embed.norm":
        return WRITES_STREAM + "the embedding norm"
    return {"in": None, "inner": None, "add": POST_LN, "out": WRITES_STREAM + f"{placement} placement"}[slot]


QK_NORM = "cannot fold: QK-norm: it normalizes each query or key head"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", placement_names())
def test_swap_is_a_noop_and_fold_is_exact_or_refused(placement, kind):
    if kind == "seq2seq" and placement == "parallel":
        with pytest.raises(ValueError, match="does not support cross-attention"):
            _model(kind, placement=placement)
        return
    model = _model(kind, placement=placement)
    args = _inputs(kind)
    y0 = _out(model, args)
    params = dict(model.named_parameters())

    swapped = swap_norms(model).normlab_report
    assert swapped.changed == []
    assert set(swapped.left.values()) <= {"already a normlab module"}
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(_out(model, args), y0)

    paths = _norm_paths(model)
    report = fold_norm_affine(model).normlab_report
    torch.testing.assert_close(_out(model, args), y0, atol=1e-5, rtol=1e-5)
    for path in paths:
        why = _expected_fold(path, kind, placement)
        if why is None:
            assert path in report.paths("folded"), report.left.get(path)
            norm = model.get_submodule(path)
            assert norm.weight is None and norm.bias is None
        else:
            assert why in report.left[path], report.left[path]
    if placement == "none":
        assert paths == [] and report.entries == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement,options", [("parallel", {"shared_norm": False}), ("parallel", None),
                                               ("olmo2", None), ("pre", None)])
@pytest.mark.parametrize("qk_norm", ["layernorm", "rmsnorm"])
def test_placement_options_and_qk_norm_swap_and_fold(placement, options, qk_norm, kind):
    """The parallel block's input norms fold (a shared one into q/k/v and w1 at once);
    OLMo 2's output norms and the QK-norms stay, with the reason."""
    if kind == "seq2seq" and placement == "parallel":
        return
    model = _model(kind, placement=placement, placement_options=options, qk_norm=qk_norm)
    args = _inputs(kind)
    y0 = _out(model, args)
    assert swap_norms(model).normlab_report.changed == []
    assert torch.equal(_out(model, args), y0)
    paths = _norm_paths(model)
    report = fold_norm_affine(model).normlab_report
    torch.testing.assert_close(_out(model, args), y0, atol=1e-5, rtol=1e-5)
    qk = [p for p in paths if p.endswith(("q_norm", "k_norm"))]
    assert len(qk) == 2 * sum(len(b.sublayer_names) - 1 for b in model.modules() if isinstance(b, Block))
    for path in paths:
        if path in qk:
            assert report.left[path].startswith(QK_NORM), report.left[path]
            assert model.get_submodule(path).weight is not None
            continue
        why = _expected_fold(path, kind, placement)
        if why is None:
            assert path in report.paths("folded"), report.left.get(path)
        else:
            assert why in report.left[path], report.left[path]
    if placement == "parallel":  # a shared norm folds into both sublayers' input projections
        shared = (options or {}).get("shared_norm", True)
        detail = next(e.detail for e in report.entries if e.path == "blocks.0.norms.attn_in" and e.action == "folded")
        assert "blocks.0.attn.q_proj" in detail and "blocks.0.attn.v_proj" in detail
        assert ("blocks.0.ffn.w1" in detail) == shared
        assert ("blocks.0.norms.ffn_in" in paths) == (not shared)


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_fold_refuses_a_head_tied_to_the_embedding(kind):
    model = _model(kind, tie_embeddings=True, norm="rmsnorm")
    report = fold_norm_affine(model).normlab_report
    final = "decoder.final_norm" if kind == "seq2seq" else "final_norm"
    assert "shares its parameter with embed.tokens.weight (tied weights)" in report.left[final]


def test_fold_rmsnorm_lm_folds_the_final_norm_into_an_untied_head():
    model = _model("lm", norm="rmsnorm", positional="rope")
    args = _inputs("lm")
    y0 = _out(model, args)
    report = fold_norm_affine(model).normlab_report
    assert report.left == {} and "final_norm" in report.paths("folded")
    torch.testing.assert_close(_out(model, args), y0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positional", ["learned", "rope"])
@pytest.mark.parametrize("tie", [False, True])
def test_layernorm_to_rmsnorm_pre_ln_lm_is_exact(positional, tie):
    model = _model("lm", positional=positional, tie_embeddings=tie)
    args = _inputs("lm")
    y0 = _out(model, args)
    head = model.head.weight.detach().clone()
    report = layernorm_to_rmsnorm(model, example_inputs=args).normlab_report
    torch.testing.assert_close(_out(model, args), y0, atol=1e-5, rtol=1e-5)
    assert report.paths("converted") == [f"blocks.{i}.norms.{s}_in" for i in (0, 1) for s in ("attn", "ffn")] + [
        "final_norm"]
    centered = ["embed.tokens"] + (["embed.positions"] if positional == "learned" else [])
    assert report.paths("centered")[: len(centered)] == centered
    assert model.embed.tokens.weight.mean(-1).abs().max() < 1e-6
    assert not any(type(m) is normlab.LayerNorm for m in model.modules())
    assert report.paths("untied") == (["embed.tokens"] if tie else [])
    assert model.cfg.tie_embeddings is False and torch.equal(model.head.weight, head)
    # RMSNormWithBias keeps gamma and beta; fold moves those of the block norms into q/k/v and w1
    folded = fold_norm_affine(model).normlab_report
    assert len(folded.paths("folded")) == 4
    torch.testing.assert_close(_out(model, args), y0, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind,placement", [("encoder", "pre"), ("seq2seq", "pre"), ("lm", "subln"),
                                            ("seq2seq", "subln"), ("lm", "parallel"), ("encoder", "parallel")])
def test_layernorm_to_rmsnorm_other_pre_ln_models(kind, placement):
    model = _model(kind, placement=placement, tie_embeddings=True)
    args = _inputs(kind)
    y0 = _out(model, args)
    report = layernorm_to_rmsnorm(model, example_inputs=args).normlab_report
    torch.testing.assert_close(_out(model, args), y0, atol=1e-5, rtol=1e-5)
    inner = [p for p in _norm_paths(model) if p.endswith("_inner")]
    assert sorted(report.left) == sorted(inner)
    assert all(type(model.get_submodule(p)) is normlab.LayerNorm for p in inner)
    for p in inner:
        assert report.left[p] == "reads its sublayer's branch, not the residual stream: stays a LayerNorm"
    assert ("encoder.final_norm" in report.paths("converted")) == (kind == "seq2seq")


@pytest.mark.parametrize("kw,match", [
    ({"placement": "post"}, "the model has Post-LN blocks"),
    ({"placement": "deepnorm"}, "the model has Post-LN blocks"),
    ({"placement": "resi_dual"}, "the model has Post-LN blocks"),
    ({"placement": "sandwich"}, r"blocks\.0\.norms\.attn_out writes the residual stream \(sandwich placement"),
    ({"placement": "peri"}, "writes the residual stream .* the stream cannot be centered"),
    ({"placement": "olmo2"}, r"blocks\.0\.norms\.attn_out writes the residual stream \(olmo2 placement"),
    ({"embedding_norm": True}, r"embed\.norm writes the residual stream \(the embedding norm"),
    ({"positional": "sinusoidal"}, "fixed sinusoidal position table"),
    ({"norm": "rmsnorm"}, r"blocks\.0\.norms\.attn_in \(RMSNorm\) reads the residual stream and is not a LayerNorm"),
])
def test_layernorm_to_rmsnorm_refusals_leave_the_model_unchanged(kw, match):
    model = _model("lm", tie_embeddings=True, **kw)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match=match):
        layernorm_to_rmsnorm(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.head.weight is model.embed.tokens.weight and model.cfg.tie_embeddings


@pytest.mark.parametrize("options", [None, {"shared_norm": False}])
def test_layernorm_to_rmsnorm_parallel_with_qk_norm(options):
    """The stream's norms become RMSNorms; the LayerNorms on the query and key heads read
    the attention's branch and stay."""
    model = _model("lm", placement="parallel", placement_options=options, qk_norm="layernorm")
    args = _inputs("lm")
    y0 = _out(model, args)
    report = layernorm_to_rmsnorm(model, example_inputs=args).normlab_report
    torch.testing.assert_close(_out(model, args), y0, atol=1e-5, rtol=1e-5)
    slots = ("attn",) if options is None else ("attn", "ffn")
    assert report.paths("converted") == [f"blocks.{i}.norms.{s}_in" for i in (0, 1) for s in slots] + ["final_norm"]
    assert sorted(report.left) == sorted(f"blocks.{i}.attn.{n}" for i in (0, 1) for n in ("q_norm", "k_norm"))
    assert type(model.blocks[0].attn.q_norm) is normlab.LayerNorm


def _with_placement(placement):
    model = _model("lm")
    model.placement = placement
    for block in model.blocks:
        block.placement = placement
    return model


def test_a_new_placement_is_read_from_its_declaration():
    from normlab.models.placement import PreNorm

    class Declared(PreNorm):  # Sandwich-LN's slots under another name
        slots = ("in", "out")

    model = _with_placement(Declared())
    report = fold_norm_affine(model).normlab_report
    assert len(report.paths("folded")) == 4, report.left  # the in-norms; the head has no bias
    assert all("writes the residual stream (" in why or "no bias" in why for why in report.left.values())


def test_cli_round_trip_rms_then_fold(tmp_path):
    model = _model("lm", tie_embeddings=True)
    save_model(model, tmp_path / "lm.safetensors")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "lm.safetensors"), str(tmp_path / "out"),
                                      "-t", "rms", "-t", "fold"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "layernorm_to_rmsnorm: 1 untied, 6 centered, 5 converted, 1 verified" in result.output
    assert "fold_norm_affine: 4 folded, 1 left" in result.output
    assert "reloaded model.safetensors with normlab.models.load_model: outputs equal" in result.output
    back = load_model(tmp_path / "out" / "model.safetensors")
    assert back.cfg.tie_embeddings is False
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_embeddings"] is False
    args = _inputs("lm")
    torch.testing.assert_close(_out(back, args), _out(model, args), atol=2e-5, rtol=2e-5)
    # the written weights are converted: the stream is zero-mean, folded norms are identities
    assert back.embed.tokens.weight.mean(-1).abs().max() < 1e-6
    assert torch.equal(back.blocks[0].norms.attn_in.weight, torch.ones(16))


def test_cli_seq2seq_fold_and_plain_state_dict_with_config(tmp_path):
    s2s = _model("seq2seq", placement="subln")
    save_model(s2s, tmp_path / "s2s.safetensors")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "s2s.safetensors"), str(tmp_path / "o1"),
                                      "-t", "fold"])
    assert result.exit_code == 0, result.output
    args = _inputs("seq2seq")
    torch.testing.assert_close(_out(load_model(tmp_path / "o1" / "model.safetensors"), args), _out(s2s, args),
                               atol=1e-5, rtol=1e-5)

    import safetensors.torch

    lm = _model("lm", norm="rmsnorm")
    safetensors.torch.save_model(lm, str(tmp_path / "plain.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(lm.cfg.to_dict()))
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "plain.safetensors"), str(tmp_path / "o2"),
                                      "-t", "fold", "--config", str(tmp_path / "cfg.json")])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(_out(load_model(tmp_path / "o2" / "model.safetensors"), (args[0],)),
                               _out(lm, (args[0],)), atol=1e-5, rtol=1e-5)


def test_cli_refusals(tmp_path):
    save_model(_model("lm", placement="post"), tmp_path / "post.safetensors")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "post.safetensors"), str(tmp_path / "out"),
                                      "-t", "rms"])
    assert result.exit_code == 1 and "the model has Post-LN blocks" in result.output
    import safetensors.torch

    safetensors.torch.save_model(_model("lm"), str(tmp_path / "plain.safetensors"))
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "plain.safetensors"), str(tmp_path / "out")],
                                env={"COLUMNS": "300"})
    assert result.exit_code != 0 and "has no normlab model metadata" in result.output
