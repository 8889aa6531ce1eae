"""A run's logged per-layer gradient norms are the step's gradients before clipping, and
--steps keeps each run's evaluation/diagnostics/checkpoint frequency per run (the
expressivity majority runs' 16 evaluations, which a claim averages over)."""

from __future__ import annotations

import json
import math

import pytest

from normlab.studies.presets import get_study
from normlab.studies.runner import apply_overrides
from normlab.studies.train import run_one
from tests.studies.helpers import cpu_env, micro_spec, one_thread


def _first_row(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def test_per_layer_gradient_norms_are_read_before_clipping(tmp_path, corpus):
    rows = {}
    for clip in (None, 1e-3):
        spec = micro_spec(f"c{clip}", steps=1, diag_every=1, eval_every=0, checkpoint_every=0, grad_clip=clip)
        with one_thread():
            run_one(spec, tmp_path / str(clip), cpu_env(), corpus, keep_weights=False)
        rows[clip] = _first_row(tmp_path / str(clip))
    unclipped, clipped = rows[None], rows[1e-3]
    assert unclipped["grad_norm"] == pytest.approx(clipped["grad_norm"], rel=1e-6)
    assert clipped["grad_norm"] > 1e-2  # the clip scales the update by far
    by_layer = clipped["grad_norms_by_layer"]
    assert by_layer.keys() == unclipped["grad_norms_by_layer"].keys()
    for kind, values in by_layer.items():
        assert values == pytest.approx(unclipped["grad_norms_by_layer"][kind], rel=1e-5), kind
    # the profile's parts are pieces of the (unclipped) total
    assert math.sqrt(sum(v * v for vs in by_layer.values() for v in vs)) <= clipped["grad_norm"] * (1 + 1e-6)


def _intervals(study):
    return {r.name: (r.steps, r.eval_every, r.diag_every, r.checkpoint_every) for r in study.runs
            if r.kind == "train"}


@pytest.mark.parametrize("preset", ["quick", "expressivity", "warmup"])
def test_steps_equal_to_the_presets_own_changes_no_run(preset):
    study = get_study(preset)
    same = {r.steps for r in study.runs if r.kind == "train"}
    assert len(same) == 1 or preset == "quick"
    steps = max(same)
    kept = {n: v for n, v in _intervals(study).items() if v[0] == steps}
    assert kept and {n: v for n, v in _intervals(apply_overrides(study, steps=steps)).items() if n in kept} == kept


def test_steps_keeps_the_majority_runs_sixteen_evaluations():
    study = apply_overrides(get_study("expressivity"), steps=160)
    majority = [r for r in study.runs if r.kind == "train" and r.tags.get("part") == "majority"]
    others = [r for r in study.runs if r.kind == "train" and r.tags.get("part") != "majority"]
    assert majority and {r.eval_every for r in majority} == {10}  # 160 / 16
    assert others and {r.eval_every for r in others} == {53}  # 160 / 3, as before
    # (the preset: 400 steps, diagnostics every 66, checkpoints every 200)
    assert {r.diag_every for r in majority} == {26} and {r.checkpoint_every for r in majority} == {80}


def test_steps_leaves_an_interval_of_never_at_never():
    from normlab.studies.spec import Study

    study = Study("s", "d", (micro_spec(steps=30, eval_every=0, diag_every=0, checkpoint_every=10),))
    (r,) = apply_overrides(study, steps=12).runs
    assert (r.steps, r.eval_every, r.diag_every, r.checkpoint_every) == (12, 0, 0, 4)
