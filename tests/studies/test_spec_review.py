"""Study settings, from a review: --steps that would leave a warm-up arm without its
warm-up is refused, a run with an unknown model key fails alone (not the whole study's
ordering), and RunSpec refuses intervals and counts the training loop cannot run."""

import math

import pytest

from normlab.studies.presets import get_study
from normlab.studies.runner import _cost, apply_overrides
from normlab.studies.spec import RunSpec


def test_steps_that_remove_the_warm_up_are_refused():
    with pytest.raises(ValueError, match="--steps 1 leaves no warm-up"):
        apply_overrides(get_study("warmup"), steps=1)
    two = apply_overrides(get_study("warmup"), steps=2)
    assert {r.warmup_steps for r in two.runs if r.tags.get("warmup", True)} >= {1}


def test_an_unknown_model_key_does_not_break_the_ordering():
    bad = RunSpec(name="x", model={"bogus": 1})
    assert _cost(bad) == 0.0
    sorted([bad, RunSpec(name="y", model={})], key=_cost)


@pytest.mark.parametrize("kw, what", [({"log_every": 0}, "log_every"), ({"lr": math.inf}, "lr"),
                                      ({"eval_batches": 0}, "eval_batches"), ({"probe_batches": 0}, "probe_batches"),
                                      ({"diag_every": -1}, "diag_every")])
def test_runspec_refuses_what_training_cannot_run(kw, what):
    with pytest.raises(ValueError, match=what):
        RunSpec(name="x", model={}, **kw)
