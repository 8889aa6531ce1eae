"""Fourth review: a checkpoint's missing parameters or buffers are refused unless the
model's init rebuilds a table of them (not a constant, not an init that never writes
it); non-reentrant checkpointing's recompute is told by its saved-tensor hooks; a norm
called inside a reentrant checkpoint and after it is a shared call; audit names the
class it fell back to."""

import json

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from typer.testing import CliRunner

import normlab
from normlab.cli import app
from normlab.diagnostics import per_example_grad_norms

transformers = pytest.importorskip("transformers")


def _drop(path, keep):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    save_file({k: v for k, v in state.items() if keep(k)}, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_norm_parameters_and_running_statistics_are_refused(tmp_path):
    from normlab.integrations.hf import WeightsDoNotFit, load_pretrained

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    _drop(tmp_path / "bert", lambda k: "LayerNorm" not in k)  # ones and zeros are not the saved values
    with pytest.raises(WeightsDoNotFit, match="LayerNorm"):
        load_pretrained(transformers.BertModel, tmp_path / "bert")
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                                layer_type="basic"))
    resnet.train()
    resnet(torch.randn(2, 3, 32, 32))  # the running statistics move off their init
    resnet.save_pretrained(tmp_path / "resnet")
    _drop(tmp_path / "resnet", lambda k: "num_batches_tracked" not in k)  # older checkpoints lack the count
    load_pretrained(transformers.ResNetModel, tmp_path / "resnet")
    _drop(tmp_path / "resnet", lambda k: "running_" not in k)
    with pytest.raises(WeightsDoNotFit, match="running_mean"):
        load_pretrained(transformers.ResNetModel, tmp_path / "resnet")


def test_a_parameter_its_init_never_writes_is_refused(tmp_path):
    from normlab.integrations.hf import WeightsDoNotFit, load_pretrained

    cfg = transformers.CLIPConfig(text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                                               "num_hidden_layers": 1, "num_attention_heads": 2},
                                  vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
                                  projection_dim=8)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path)
    _drop(tmp_path, lambda k: k != "logit_scale")
    with pytest.raises(WeightsDoNotFit, match="logit_scale"):
        load_pretrained(transformers.CLIPModel, tmp_path)


def _reference(norm, f, x):
    out = []
    for b in range(x.shape[0]):
        out.append(float(torch.autograd.grad(f(x[b:b + 1]).sum(), norm.weight)[0].square().sum()))
    return out


def test_non_reentrant_recompute_before_the_norms_gradient():
    # the region's last Linear unpacks (and so recomputes) before the norm's gradient comes
    torch.manual_seed(0)
    region = nn.Sequential(nn.Linear(4, 4), normlab.LayerNorm(4), nn.Linear(4, 4))
    norm = region[1]
    norm.collect_per_example_grad_sq = True
    x = torch.randn(4, 4, requires_grad=True)
    loss = checkpoint(region, x, use_reentrant=False).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    norm.collect_per_example_grad_sq = False
    want = _reference(norm, lambda z: region(z).square().sum(-1), x.detach())
    assert norm.per_example_grad_sq[0].tolist() == pytest.approx(want, rel=1e-4)


def test_a_norm_inside_a_reentrant_checkpoint_and_after_it_is_shared():
    torch.manual_seed(0)
    l1, l2, norm = nn.Linear(6, 6), nn.Linear(6, 6), normlab.LayerNorm(6)

    def f(x):
        return norm(l2(checkpoint(norm, l1(x), use_reentrant=True))).square().sum()

    norm.collect_per_example_grad_sq = True
    f(torch.randn(4, 6)).backward()
    with pytest.raises(RuntimeError, match="ran 2 times"):
        _ = norm.per_example_grad_sq
    norm.collect_per_example_grad_sq = False
    norm.per_example_grad_sq = None
    with per_example_grad_norms(nn.ModuleList([norm])) as rec:
        f(torch.randn(4, 6)).backward()
        with pytest.raises(RuntimeError, match="ran 2 times"):  # the recorder reads the norm's own record
            rec.total()
        with pytest.raises(RuntimeError, match="ran 2 times"):
            _ = rec["0"]


def test_audit_says_which_class_it_fell_back_to(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    _drop(tmp_path, lambda k: k != "lm_head.weight")
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    r = CliRunner().invoke(app, ["audit", str(tmp_path)], env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "audited as LlamaModel" in r.output, r.output


def test_the_recorder_under_nested_checkpoints_and_a_forward_in_a_backward_hook():
    from torch.autograd.graph import save_on_cpu

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), normlab.LayerNorm(4), nn.Linear(4, 4))
    pre, post = nn.Linear(4, 4), nn.Linear(4, 1)

    def run(x, how):
        def region(h):
            if how == "nested":
                return post(checkpoint(inner, h, use_reentrant=False))
            with save_on_cpu():
                return post(inner(h))
        return checkpoint(region, pre(x), use_reentrant=False).square().sum()

    x = torch.randn(3, 4)
    want = _reference(inner[1], lambda z: post(inner(pre(z))).square().sum(-1), x)
    for how in ("nested", "offloaded"):
        with per_example_grad_norms(inner) as rec:
            run(x, how).backward()
            assert rec["1"]["weight"].tolist() == pytest.approx(want, rel=1e-4), how
    # a backward hook that runs a forward of the model under grad (a measurement): a second
    # call of the norm in the step, which a reentrant checkpoint's call cannot be told from,
    # so the read refuses rather than answer with one of the two
    with per_example_grad_norms(inner) as rec:
        y = inner(x)

        def measure(grad):
            with torch.enable_grad():
                torch.autograd.grad(inner(x.detach().requires_grad_()).sum(), inner[0].weight)
        y.register_hook(measure)
        y.square().sum().backward()
        with pytest.raises(RuntimeError, match="ran 2 times"):
            _ = rec["1"]
