"""Probes, from a review: the update probe's response is checked for linearity and runs
in float32 whatever the run's dtype, every rank of a data-parallel run probes the whole
batch, an overflowed stream reads inf, and full's probes run without dropout."""

import math

import pytest
import torch
from torch import nn

from normlab.diagnostics import ActivationMonitor
from normlab.studies import presets
from normlab.studies.claims import judge_all
from normlab.studies.probes import _stream_profile
from normlab.studies.spec import RunSpec
from normlab.studies.train import Env, run_one
from tests.studies.test_study_claims import _update_run

MICRO = presets.MICRO


def _update_spec(name, **kw):
    return RunSpec(name=name, model={**MICRO, "placement": "post", "n_layers": 4}, kind="update", batch_size=4,
                   seq_len=16, probe_batches=2, steps=0, lr=1e-5, tags={"study": "amplification", "group": "post"},
                   **kw)


def test_update_probe_records_its_linearity_and_ignores_autocast(tmp_path, corpus):
    cpu = Env(device=torch.device("cpu"))
    fp32 = run_one(_update_spec("a"), tmp_path / "a", cpu, corpus)
    assert fp32["update_linearity"] == pytest.approx(1.0, abs=0.02)
    assert fp32["output_change_sq_tenth"] * 100 == pytest.approx(fp32["output_change_sq"], rel=0.02)
    bf16 = run_one(_update_spec("b"), tmp_path / "b", Env(device=torch.device("cpu"), dtype="bf16"), corpus)
    assert bf16["output_change_sq"] == fp32["output_change_sq"]  # the probe is float32 whatever --dtype says


@pytest.mark.parametrize("kind", ["probe", "update"])
def test_every_rank_probes_the_whole_batch(tmp_path, corpus, kind):
    spec = RunSpec(name=kind, model={**MICRO, "placement": "pre", "n_layers": 2}, kind=kind, batch_size=4,
                   seq_len=16, probe_batches=2, steps=0, lr=1e-5, tags={"study": "amplification", "group": "pre"})
    one = run_one(spec, tmp_path / "one", Env(device=torch.device("cpu")), corpus)
    rank1 = run_one(spec, tmp_path / "rank1", Env(device=torch.device("cpu"), rank=1, world=2), corpus)
    key = "grad_norms_by_layer" if kind == "probe" else "output_change_sq"
    assert rank1[key] == one[key] and rank1["probe_loss"] == one["probe_loss"]


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_an_overflowed_stream_reads_inf():
    model = _Blocks()
    with torch.no_grad():
        model.blocks[2].bias[0] = math.inf  # one channel of the last block's output overflows
    with ActivationMonitor(model) as mon:
        model(torch.randn(2, 4))
    assert math.isfinite(mon.residual_rms(stat="max_abs")[2])  # the monitor's stats are over finite entries
    assert _stream_profile(mon, "max_abs")[2] == math.inf and math.isfinite(_stream_profile(mon, "max_abs")[1])


def test_rows_name_update_probes_off_the_linear_response():
    runs = [_update_run("post", n, s, math.exp(2.0 * math.log(n) + 0.01 * s)) for s in range(6) for n in (6, 12, 24)]
    for r in runs:
        r["update_linearity"] = 0.9 if (r["n_layers"], r["seed"]) == (24, 1) else 1.0
    (row,) = judge_all(["liu-postln-update-grows"], runs)
    assert any("seed 1 at 24 layers changed F by 0.90-0.90x" in c for c in row["caveats"]), row["caveats"]


def test_full_probes_run_without_dropout_and_a_smaller_update():
    full = presets.PRESETS["full"]() if callable(presets.PRESETS["full"]) else presets.PRESETS["full"]
    probes = [r for r in full.runs if r.kind in ("probe", "update")]
    assert probes and all(r.model["dropout"] == 0.0 for r in probes)
    assert {r.lr for r in probes if r.kind == "update"} == {presets.FULL_UPDATE_LR}
