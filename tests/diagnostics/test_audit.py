"""audit(): every finding kind has a model that triggers it and one that does not."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import normlab
from normlab.cli import app
from normlab.diagnostics import Finding, audit, findings_table, has_warmup
from normlab.diagnostics.audit import example_input_for
from normlab.errors import NormArgumentError
from tests.diagnostics.helpers import hook_count
from tests.diagnostics.torch_models import torch_lm

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


def kinds(findings: list[Finding]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in findings:
        assert f.severity in ("error", "warning", "info") and f.message and f.suggestion
        out.setdefault(f.kind, set()).add(f.module)
    return out


# ------------------------------------------------------------------------ double norm


def test_double_norm_in_default_torch_transformer():
    model = nn.Transformer()  # Post-LN, with encoder.norm and decoder.norm
    found = audit(model)
    assert kinds(found) == {"double-norm": {"encoder.norm", "decoder.norm"}}
    assert "encoder.layers.5.norm2" in [f for f in found if f.module == "encoder.norm"][0].message
    assert hook_count(model) == 0


def test_no_double_norm_in_pre_ln_torch_transformer():
    assert audit(nn.Transformer(norm_first=True)) == []


class _NeedsMask(nn.Module):
    """A Post-LN encoder with a final norm whose forward a made-up input cannot call."""

    def __init__(self, norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16),
                                             enable_nested_tensor=False)

    def forward(self, x, required_mask):
        return self.encoder(x, src_key_padding_mask=required_mask)


def test_double_norm_from_known_structure_without_trace():
    found = kinds(audit(_NeedsMask()))
    assert found["double-norm"] == {"encoder.norm"} and "no-trace" in found
    assert "double-norm" not in kinds(audit(_NeedsMask(norm_first=True)))
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    traced = kinds(audit(_NeedsMask(), example_input=(x, mask)))
    assert traced == {"double-norm": {"encoder.norm"}}


def test_norm_after_residual_add_is_not_double():
    class AddThenNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.LayerNorm(8), nn.LayerNorm(8)

        def forward(self, x):
            return self.b(self.a(x) + x)

    class Back2Back(AddThenNorm):
        def forward(self, x):
            return self.b(self.a(x))

    x = torch.randn(2, 8)
    assert audit(AddThenNorm(), x) == []
    assert kinds(audit(Back2Back(), x)) == {"double-norm": {"b"}}


def test_norm_fed_a_residual_sum_is_not_double():
    """normlab's norm(x, residual) normalizes residual + x: not x, even where x is a norm's output."""
    class OutThenAddNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = normlab.LayerNorm(8), normlab.LayerNorm(8)

        def forward(self, x):
            return self.b(self.a(x), x)[0]

    class Back2Back(OutThenAddNorm):
        def forward(self, x, mask=None):
            return self.b(self.a(x), padding_mask=mask)  # a mask is not a second input

    x = torch.randn(2, 3, 8)
    assert audit(OutThenAddNorm(), x) == []
    assert kinds(audit(Back2Back(), x)) == {"double-norm": {"b"}}
    assert kinds(audit(Back2Back(), (x, torch.zeros(2, 3, dtype=torch.bool)))) == {"double-norm": {"b"}}


def _normlab_lm(placement, **kw):
    from normlab.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2,
                                           placement=placement, **kw))


@pytest.mark.parametrize("placement", ["sandwich", "peri"])
def test_sandwich_and_peri_ln_out_norms_are_not_double(placement):
    """Each ``out`` norm's output reaches the next norm as x of norm(x, residual): a sum."""
    tokens = torch.randint(0, 64, (2, 8))
    model = _normlab_lm(placement)
    assert audit(model, tokens) == []
    # in eval mode too: Peri-LN's embedding norm feeds block 0's input norm and, as the
    # residual stream x_0 = Norm_emb(e), block 0's sum (the trace runs in eval mode either way)
    assert kinds(audit(model.eval(), tokens)) == {}


# ----------------------------------------------------------------- Pre-LN final norm


def test_pre_ln_without_final_norm():
    model = torch_lm("pre", n_layers=2, d_model=16, n_heads=2)
    assert audit(model) == []  # Pre-LN with a final norm: nothing wrong
    model.final_norm = None
    assert kinds(audit(model)) == {"pre-ln-no-final-norm": {"blocks"}}
    assert audit(torch_lm("post", n_layers=2, d_model=16, n_heads=2)) == []
    # torch's encoder: known structure when the forward cannot be traced
    no_norm = _NeedsMask(norm_first=True)
    no_norm.encoder.norm = None
    assert "pre-ln-no-final-norm" in kinds(audit(no_norm))


def test_hf_gpt2_is_clean():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    assert audit(model) == []
    model.transformer.ln_f = nn.Identity()
    assert kinds(audit(model)) == {"pre-ln-no-final-norm": {"transformer.h"}}


@pytest.mark.parametrize("placement,options,qk_norm", [
    ("parallel", None, None), ("parallel", {"shared_norm": False}, "rmsnorm"), ("olmo2", None, "layernorm"),
    ("pre", None, "rmsnorm"),
])
def test_normlab_parallel_olmo2_and_qk_norm_models(placement, options, qk_norm):
    """Clean as built (the QK-norm reads the attention's projections, not another norm:
    no double norm); a parallel stack (Pre-LN family) without its final norm is flagged."""
    from normlab.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, d_ff=32,
                                            placement=placement, placement_options=options, qk_norm=qk_norm))
    tokens = torch.randint(0, 50, (2, 8))
    assert audit(model, example_input=tokens) == []
    assert hook_count(model) == 0
    model.final_norm = None
    found = kinds(audit(model, example_input=tokens))
    assert found == ({} if placement == "olmo2" else {"pre-ln-no-final-norm": {"blocks"}})


@pytest.mark.parametrize("placement", ["pre", "sandwich"])
def test_normlab_lm_is_traced_without_example_input(placement):
    """TransformerLM registers its blocks (Linears) before its embedding: the made-up input
    must still be token ids, so the data-flow checks run."""
    model = _normlab_lm(placement)
    tokens = example_input_for(model)
    assert tokens.dtype == torch.long and tokens.shape == (2, 8) and int(tokens.max()) < 64
    assert audit(model) == []  # no "no-trace" info
    model.final_norm = None  # found only from the trace (normlab's stack is no torch encoder)
    assert kinds(audit(model)) == {"pre-ln-no-final-norm": {"blocks"}}


# -------------------------------------------------------------------------------- eps


def test_eps_underflow_judged_in_the_statistics_dtype():
    """torch forms a half-precision norm's statistics in float32: eps=1e-12 there is no
    division by zero (a constant row gives zeros, not nan); eps=0 is, in every dtype."""
    def model(eps, dtype):
        m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, eps=eps))
        return m.to(dtype)

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert audit(model(1e-12, dtype)) == [], dtype
        assert kinds(audit(model(0.0, dtype)))["eps-underflow"] == {"1"}, dtype
    row = torch.full((2, 8), 3.0, dtype=torch.float16)
    assert torch.equal(model(1e-12, torch.float16)[1](row), torch.zeros_like(row))
    assert model(0.0, torch.float16)[1](row).isnan().all()
    (f,) = [f for f in audit(model(0.0, torch.float16)) if f.kind == "eps-underflow"]
    assert f.severity == "error" and "float32" in f.message


# ------------------------------------------------------------------------- BatchNorm


class _BNBlock(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = norm

    def forward(self, x):
        h = x + self.attn(x, x, x, need_weights=False)[0]
        return self.norm(h.transpose(1, 2)).transpose(1, 2) if isinstance(self.norm, nn.BatchNorm1d) \
            else self.norm(h)


def test_batchnorm_over_padded_sequences():
    model = nn.Sequential(nn.Embedding(20, 8), _BNBlock(nn.BatchNorm1d(8)))
    before = model[1].norm.running_mean.clone()
    assert kinds(audit(model)) == {"batchnorm-padding": {"1.norm"}}
    assert torch.equal(model[1].norm.running_mean, before)  # the trace left the stats alone
    assert audit(nn.Sequential(nn.Embedding(20, 8), _BNBlock(normlab.MaskedBatchNorm(8)))) == []
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert audit(cnn, torch.randn(2, 3, 8, 8)) == []


# ------------------------------------------------------------------ dead / far weights


def test_dead_and_far_from_init_norm_weights():
    model = torch_lm("pre", n_layers=2, d_model=16, n_heads=2)
    assert audit(model) == []
    with torch.no_grad():
        model.blocks[1].norm2.weight.zero_()
        model.final_norm.weight.mul_(50.0)
        model.blocks[0].norm1.weight.mul_(3.0)  # 2x its init away: fine
    found = audit(model)
    assert kinds(found) == {"dead-norm": {"blocks.1.norm2"}, "norm-far-from-init": {"final_norm"}}
    assert [f.severity for f in found] == ["error", "warning"]
    with torch.no_grad():
        model.blocks[1].norm2.weight.fill_(float("nan"))
    assert kinds(audit(model, example_input=torch.zeros(1, 4, dtype=torch.long)))["dead-norm"] == \
        {"blocks.1.norm2"}


def test_zoo_norm_inits_are_not_flagged():
    for norm in (normlab.ScaleNorm(8), normlab.DyT(8), normlab.RMSNorm(8), normlab.PowerNorm(8)):
        assert audit(nn.Sequential(nn.Linear(8, 8), norm)) == []
    model = nn.Sequential(nn.Linear(8, 8), normlab.ScaleNorm(8))
    with torch.no_grad():
        model[1].g.zero_()
    assert kinds(audit(model)) == {"dead-norm": {"1"}}


# --------------------------------------------------------------- deep Post-LN warm-up


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_deep_post_ln_without_warmup():
    deep_post = torch_lm("post", n_layers=13, d_model=16, n_heads=2)
    opt = _opt(deep_post)
    assert audit(deep_post) == []  # no optimizer given: no opinion
    assert kinds(audit(deep_post, optimizer=opt)) == {"deep-post-ln-no-warmup": {"blocks"}}
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    assert kinds(audit(deep_post, optimizer=opt, scheduler=cosine)) == {"deep-post-ln-no-warmup": {"blocks"}}

    opt = _opt(deep_post)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=100)
    assert audit(deep_post, optimizer=opt, scheduler=warm) == []
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5) and warm.last_epoch == 0  # restored
    opt = _opt(deep_post)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    assert audit(deep_post, scheduler=lam) == []
    assert audit(deep_post, optimizer=torch.optim.RAdam(deep_post.parameters())) == []
    assert audit(torch_lm("post", n_layers=12, d_model=16, n_heads=2), optimizer=opt) == []
    assert audit(torch_lm("pre", n_layers=13, d_model=16, n_heads=2), optimizer=opt) == []


def test_has_warmup_one_cycle():
    opt = _opt(nn.Linear(2, 2))
    assert has_warmup(opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1000))
    opt = _opt(nn.Linear(2, 2))
    assert not has_warmup(opt, torch.optim.lr_scheduler.StepLR(opt, step_size=10))


# -------------------------------------------------------------------------------- CLI


def test_cli_factory_and_hf_config(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "tests.diagnostics.torch_models:small_torch_transformer"])
    assert res.exit_code == 0, res.output
    assert "double-norm" in res.output and "encoder.norm" in res.output
    res = runner.invoke(app, ["audit", "tests.diagnostics.torch_models:zero_eps_lm"])
    assert res.exit_code == 1 and "eps-underflow" in res.output
    res = runner.invoke(app, ["audit", "no_such_module_xyz:make"])
    assert res.exit_code == 2 and "pkg.module:factory" in res.output
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50,
                            n_positions=32).save_pretrained(tmp_path)
    res = runner.invoke(app, ["audit", str(tmp_path)])
    assert res.exit_code == 0 and "no findings" in res.output and "GPT2LMHeadModel" in res.output


def test_findings_table_prints_brackets_as_text():
    from rich.console import Console

    f = Finding("info", "no-trace", "[a]", "expected tokens of shape [batch, seq_len]", "pass [bold]x[/bold]")
    console = Console(file=io.StringIO(), width=300)
    console.print(findings_table([f]))
    out = console.file.getvalue()
    assert "[batch, seq_len]" in out and "[bold]x[/bold]" in out and "[a]" in out


def _flat(output: str) -> str:
    """CLI output with rich's panel borders and line breaks folded to single spaces."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


def make_none():
    return None


class _RaisesBracketed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        raise ValueError("expected tokens of shape [batch, seq_len]")


def make_untraceable():
    return _RaisesBracketed()


@pytest.mark.parametrize("factory,got", [
    ("os:getcwd", "returned a str"), ("tests.diagnostics.test_audit:make_none", "returned None"),
    ("torch.nn:Linear", "calling 'torch.nn:Linear' failed (TypeError"), ("os:sep", "not callable"),
])
def test_cli_factory_not_returning_a_model(factory, got):
    res = CliRunner().invoke(app, ["audit", factory])
    out = _flat(res.output)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert got in out and "an nn.Module" in out and "Traceback" not in res.output


def test_cli_prints_bracketed_messages():
    res = CliRunner().invoke(app, ["audit", "tests.diagnostics.test_audit:make_untraceable"],
                             env={"COLUMNS": "1000"})  # a table row on one line
    assert res.exit_code == 0, res.output
    assert "no-trace" in res.output and "expected tokens of shape [batch, seq_len]" in res.output


def test_cli_hf_checkpoint_loads_its_weights_and_architecture(tmp_path):
    transformers = pytest.importorskip("transformers")
    runner = CliRunner()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
    model.save_pretrained(tmp_path / "gpt2")
    res = runner.invoke(app, ["audit", str(tmp_path / "gpt2")])
    assert res.exit_code == 1 and "dead-norm" in res.output and "transformer.ln_f" in res.output, res.output
    assert "random weights" not in _flat(res.output)
    cfg.save_pretrained(tmp_path / "config_only")
    res = runner.invoke(app, ["audit", str(tmp_path / "config_only")])
    assert res.exit_code == 0 and "no findings" in res.output, res.output
    assert "random weights" in _flat(res.output)
    # the config file itself was handed to torch.load as weights (an UnpicklingError traceback)
    res = runner.invoke(app, ["audit", str(tmp_path / "config_only" / "config.json")])
    assert res.exit_code == 0 and "no findings" in res.output and "GPT2LMHeadModel" in res.output, res.output
    assert "random weights" in _flat(res.output)
    # a checkpoint's config.json: the checkpoint, its weights included (not random ones)
    res = runner.invoke(app, ["audit", str(tmp_path / "gpt2" / "config.json")])
    assert res.exit_code == 1 and "dead-norm" in res.output and "random weights" not in _flat(res.output), res.output
    (tmp_path / "damaged").mkdir()
    cfg.save_pretrained(tmp_path / "damaged")
    (tmp_path / "damaged" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    res = runner.invoke(app, ["audit", str(tmp_path / "damaged")])
    assert res.exit_code == 2 and "cannot load the weights in" in _flat(res.output), res.output
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32))
    bert.save_pretrained(tmp_path / "bert")
    res = runner.invoke(app, ["audit", str(tmp_path / "bert")])
    assert res.exit_code == 0 and "BertModel" in res.output and "BertLMHeadModel" not in res.output, res.output


# ------------------------------------------------------------- review fixes: audit


def test_norm_output_changed_in_place_is_not_double():
    """h = n1(x); h += fc(x); n2(h): the tensor n2 reads is n1's output object, but it
    now holds a residual sum (its version changed), so n2 normalizes no norm's output."""
    class InPlaceAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.n1, self.n2 = nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8)

        def forward(self, x):
            h = self.n1(x)
            h += self.fc(x)
            return self.n2(h)

    class Back2Back(InPlaceAdd):
        def forward(self, x):
            return self.n2(self.n1(x))

    x = torch.randn(2, 8)
    assert audit(InPlaceAdd(), x) == []
    assert kinds(audit(Back2Back(), x)) == {"double-norm": {"n2"}}


class _Stateful(nn.Module):
    """A forward that changes a non-persistent buffer in place, replaces another buffer
    by a new tensor, updates BatchNorm statistics and draws dropout masks."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.drop, self.norm = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.LayerNorm(8)
        self.register_buffer("calls", torch.zeros(()), persistent=False)
        self.register_buffer("last_mean", torch.zeros(8))

    def forward(self, x):
        self.calls += 1
        self.last_mean = x.mean(0).detach()
        return self.norm(self.drop(self.bn(self.lin(x))))


def test_audit_leaves_every_buffer_and_the_global_rng_as_they_were():
    model = _Stateful()
    before = {n: (b, b.clone()) for n, b in model.named_buffers()}
    assert "calls" not in model.state_dict()  # the one state_dict does not restore
    x = torch.randn(4, 8)
    torch.manual_seed(123)
    want = torch.rand(5)
    torch.manual_seed(123)
    assert audit(model, x) == []
    assert torch.equal(torch.rand(5), want)  # no dropout draw taken from the global RNG
    after = dict(model.named_buffers())
    assert sorted(after) == sorted(before)
    for n, (tensor, value) in before.items():
        assert after[n] is tensor and torch.equal(tensor, value), n


def test_audit_refuses_what_is_not_a_model():
    with pytest.raises(NormArgumentError, match="audit: expected model to be a torch.nn.Module, got str"):
        audit("x")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(NormArgumentError, match=r"audit: expected a model with values, got '0\.weight' on the meta"):
        audit(meta)


def _probe_state(opt, sched):
    """Everything of the optimizer and the scheduler a warm-up probe could change."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return repr(groups), repr(sched.state_dict()), opt.state_dict()["state"] == {}


@pytest.mark.filterwarnings("ignore:The verbose parameter is deprecated")
def test_warmup_probe_takes_any_scheduler_and_changes_nothing():
    """ReduceLROnPlateau (step() needs a metric) and a OneCycleLR that ends within the
    probe crashed audit(); the probe now runs on copies, and the caller's scheduler and
    optimizer (lr, OneCycleLR's betas, step counts) are exactly as before."""
    lin = nn.Linear(2, 2)
    opt = _opt(lin)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    state = _probe_state(opt, plateau)
    assert not has_warmup(opt, plateau)  # lowers the lr on plateaus only
    assert _probe_state(opt, plateau) == state
    deep_post = torch_lm("post", n_layers=13, d_model=16, n_heads=2)
    dp_opt = _opt(deep_post)
    found = kinds(audit(deep_post, optimizer=dp_opt, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(dp_opt)))
    assert found == {"deep-post-ln-no-warmup": {"blocks"}}

    for total_steps in (100, 1000):  # 100: ends within the probe (ValueError past its end)
        opt = _opt(lin)
        one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total_steps)
        state = _probe_state(opt, one_cycle)
        assert has_warmup(opt, one_cycle)  # peak at 30% of total_steps
        assert _probe_state(opt, one_cycle) == state
        assert opt.param_groups[0]["betas"] == (0.95, 0.999)  # set by OneCycleLR, not moved by the probe

    opt = _opt(lin)
    # a warm-up whose lr function fails after 5 steps (TypeError): judged on the 5 it gave
    failing = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) if s < 5 else None)
    state = _probe_state(opt, failing)
    assert has_warmup(opt, failing) and _probe_state(opt, failing) == state
    opt = _opt(lin)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    assert not has_warmup(scheduler=cosine) and opt.param_groups[0]["lr"] == 1e-3 and cosine.last_epoch == 0


def test_console_script_imports_a_factory_from_the_working_directory(tmp_path):
    """The ``normlab`` console script has its bin directory first on sys.path, not the
    working directory (``python -m`` has the latter): a module there must still import.
    Run as the console script runs: a launcher file in another directory."""
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    (work / "my_cwd_models.py").write_text(
        "import torch.nn as nn\n\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, eps=0.0))\n")
    launcher = bin_dir / "normlab"
    launcher.write_text("import sys\nfrom normlab.__main__ import main\nsys.exit(main())\n")
    src = Path(normlab.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "200"}
    res = subprocess.run([sys.executable, str(launcher), "audit", "my_cwd_models:make"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr  # the eps=0 norm is an error finding
    assert "eps-underflow" in res.stdout and "cannot import" not in res.stdout + res.stderr


def test_a_check_appended_as_the_docs_say_runs():
    # docs/diagnostics.md: `from normlab.diagnostics.audit import CHECKS` (the package's
    # `audit` is the function, which has no CHECKS)
    from normlab.diagnostics import audit as audit_function
    from normlab.diagnostics.audit import CHECKS, Finding

    def count_norms(ctx):
        n = sum(isinstance(m, nn.LayerNorm) for m in ctx.model.modules())
        return [Finding("info", "norm-count", "", f"{n} LayerNorm(s)", "")]

    CHECKS.append(count_norms)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4))
        found = [f for f in audit_function(model, torch.randn(2, 4)) if f.kind == "norm-count"]
    finally:
        CHECKS.remove(count_norms)
    assert [f.message for f in found] == ["2 LayerNorm(s)"]


def test_an_error_that_is_not_the_weight_files_is_not_called_one(tmp_path, monkeypatch):
    # every exception from from_pretrained was reported as "cannot load the weights"
    transformers = pytest.importorskip("transformers")
    from typer.testing import CliRunner

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", out_of_memory)
    res = CliRunner().invoke(app, ["audit", str(tmp_path / "gpt2")])
    assert isinstance(res.exception, torch.OutOfMemoryError) and "cannot load the weights" not in res.output


def test_an_encoder_decoder_is_traced_with_source_and_target_ids():
    # the made-up token ids alone made T5's forward raise (no decoder_input_ids): the
    # audit ran without its data-flow checks, with an info finding, and exited 0
    from transformers import T5Config, T5ForConditionalGeneration

    from normlab.diagnostics.audit import example_inputs_for, trace_forward
    from normlab.models import Seq2SeqTransformer, TransformerConfig

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                             decoder_start_token_id=0))
    s2s = Seq2SeqTransformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                               max_seq_len=16))
    for model in (t5, s2s):
        assert "no-trace" not in [f.kind for f in audit(model)]
        first = example_inputs_for(model)[0]
        assert isinstance(first, (dict, tuple)) and trace_forward(model, first) is not None


def test_vision_and_speech_models_are_traced_with_their_own_inputs():
    # token ids or a float [2, 8, in_features] made ViT's and Whisper's forwards raise:
    # the data-flow checks did not run (an info finding) and the audit exited 0
    transformers = pytest.importorskip("transformers")

    from normlab.diagnostics.audit import example_inputs_for, trace_forward

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
        patch_size=8, num_channels=2))
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
        patch_size=8))
    whisper = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, num_mel_bins=4, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    for model, key, shape in ((vit, "pixel_values", (2, 2, 16, 16)), (clip, "pixel_values", (2, 3, 16, 16)),
                              (whisper, "input_features", (2, 4, 16))):
        first = example_inputs_for(model)[0]
        assert isinstance(first, dict) and tuple(first[key].shape) == shape
        assert ("decoder_input_ids" in first) == (model is whisper)
        assert trace_forward(model, first) is not None
        assert "no-trace" not in [f.kind for f in audit(model)]
    # a text model keeps its token ids first
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32,
                                                                n_positions=16))
    assert isinstance(example_inputs_for(gpt2)[0], torch.Tensor)


def test_a_config_its_model_class_refuses_is_a_usage_error(tmp_path):
    # Whisper's embedding asserts that pad_token_id lies in the vocabulary: the audit gave
    # a traceback from inside transformers
    transformers = pytest.importorskip("transformers")
    from typer.testing import CliRunner

    transformers.WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64,
                               num_mel_bins=4, max_source_positions=8, max_target_positions=16,
                               pad_token_id=500).save_pretrained(tmp_path / "w")
    res = CliRunner().invoke(app, ["audit", str(tmp_path / "w")])
    assert res.exit_code == 2 and "builds the config" in res.output and "AssertionError" in res.output
    assert "Traceback" not in res.output
