"""The expressivity study's pieces (Brody et al. 2023): the majority task, the test of
which points no query can rank first, and the runs that measure both."""

import json
import math

import pytest
import torch

from normlab.models import TransformerConfig, TransformerEncoder, TransformerLM
from normlab.studies.data import Majority
from normlab.studies.probes import unselectable, unselectable_keys
from normlab.studies.spec import RunSpec
from normlab.studies.train import run_one

from .helpers import cpu_env, micro_spec, one_thread

# ------------------------------------------------------------------ the majority task


@pytest.mark.parametrize("classes,margin,seq_len", [(20, 6, 50), (2, 1, 7), (5, 3, 16)])
def test_majority_batches_have_a_unique_majority_ahead_by_the_margin(classes, margin, seq_len):
    task = Majority(classes=classes, margin=margin)
    x, y = task.batch(512, seq_len, seed=3, step=7)
    assert x.shape == (512, seq_len) and y.shape == (512,) and x.dtype == y.dtype == torch.long
    counts = torch.nn.functional.one_hot(x, classes).sum(1)
    top2 = counts.topk(2, dim=1).values
    assert torch.equal(counts.argmax(1), y)
    assert int((top2[:, 0] - top2[:, 1]).min()) >= margin
    lo, hi = task.count_range(seq_len)
    assert lo <= int(top2[:, 0].min()) and int(top2[:, 0].max()) <= hi
    assert set(y.tolist()) == set(range(classes))  # every class is a majority somewhere
    # a pure function of (seed, step)
    x2, y2 = task.batch(512, seq_len, seed=3, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, task.batch(512, seq_len, seed=3, step=8)[0])


def test_majority_positions_are_shuffled():
    x, _ = Majority().batch(256, 50, seed=0, step=0)
    sorted_rows = (x[:, 1:] >= x[:, :-1]).all(1)
    assert not sorted_rows.any()


def test_majority_options_are_checked_with_their_names():
    with pytest.raises(ValueError, match="classes"):
        Majority(classes=1)
    with pytest.raises(ValueError, match="margin"):
        Majority(margin=0)
    with pytest.raises(ValueError, match="too short"):
        Majority(classes=20, margin=6).count_range(5)
    with pytest.raises(ValueError, match="task_options"):
        RunSpec(name="m", model={}, task="majority", task_options={"clases": 3})
    with pytest.raises(ValueError, match="task_options"):
        RunSpec(name="m", model={}, task="lm", task_options={"classes": 3})


# ------------------------------------------------------------------ unselectable points


def _hull_vertices_2d(points):
    """Indices of the strict vertices of a 2-D point set (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, points.tolist())))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    hull = set(lower[:-1] + upper[:-1])
    return {i for i, p in enumerate(points.tolist()) if tuple(p) in hull}


def test_points_inside_the_hull_are_unselectable_and_copies_do_not_count():
    square = torch.tensor([[[0.0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5], [0.5, 0.5], [0.5, 0.0]]])
    assert unselectable(square).tolist() == [[0, 0, 0, 0, 1, 1, 1]]  # the edge midpoint is not a vertex
    twins = torch.tensor([[[1.0, 2.0], [1.0, 2.0]]])
    assert unselectable(twins).tolist() == [[0, 0]]  # only copies: ranked first with them
    assert unselectable(torch.zeros(0, 5, 3)).shape == (0, 5)


def test_unselectable_agrees_with_an_exact_convex_hull_in_2d():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(20, 30, 2, generator=g, dtype=torch.float64)
    flags = unselectable(pts)
    assert (flags >= 0).all()
    for n in range(pts.shape[0]):
        vertices = _hull_vertices_2d(pts[n])
        assert {i for i in range(30) if flags[n, i] == 0} == vertices


def test_points_on_an_ellipsoid_are_all_selectable_in_8d():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(16, 64, 8, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    h = u * w + b
    assert (unselectable(h, candidates=(h - b) / w**2) == 0).all()
    # a Gaussian cloud has interior points
    cloud = torch.randn(16, 64, 8, generator=g)
    assert (unselectable(cloud) == 1).float().mean() > 0.01


def test_unselectable_marks_what_it_cannot_decide():
    a = torch.linspace(0, 2 * math.pi, 200)[:-1]
    circle = torch.stack([a.cos(), a.sin()], -1)[None]
    flags = unselectable(circle, queries=0, iters=0)  # no random queries, no iterations
    assert (flags == 0).all()  # the direction from the mean decides every point of a circle
    inner = torch.cat([circle, 0.99 * circle[:, :1]], dim=1)
    flags = unselectable(inner, queries=0, iters=1)
    assert flags[0, -1] in (-1, 1) and (flags[0, :-1] >= 0).all()
    assert unselectable(inner)[0, -1] == 1
    with pytest.raises(ValueError, match=r"\[N, T, d\]"):
        unselectable(torch.zeros(3, 2))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_a_scaling_norms_attention_inputs_are_all_selectable(norm):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=256, d_model=8, n_heads=2, n_layers=2, d_ff=16, dropout=0.0, norm=norm,
                            init="gpt2")
    model = TransformerLM(cfg)
    with torch.no_grad():  # an affine the norm's outputs go through
        for m in model.modules():
            if type(m).__name__ in ("LayerNorm", "RMSNorm"):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_()
    out = unselectable_keys(model, torch.randint(0, 256, (4, 32)), cpu_env())
    assert out["unselectable_by_layer"] == [0.0, 0.0] and out["undetermined_by_layer"] == [0.0, 0.0]


def test_without_a_norm_the_attention_inputs_are_the_stream_and_some_are_unselectable():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=256, d_model=4, n_heads=1, n_layers=1, d_ff=16, dropout=0.0, norm="none")
    model = TransformerLM(cfg)
    tokens = torch.randint(0, 256, (2, 40))
    seen = []
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = unselectable_keys(model, tokens, cpu_env())
    handle.remove()
    assert torch.equal(seen[0], model.embed(tokens))  # the first block's attention reads the embeddings
    assert len(out["unselectable_by_layer"]) == 1
    direct = unselectable(seen[0].float())
    assert out["unselectable_by_layer"][0] == pytest.approx(float((direct == 1).double().mean()))
    assert out["unselectable_by_layer"][0] > 0
    with pytest.raises(ValueError, match="Blocks"):
        unselectable_keys(torch.nn.Linear(2, 2), tokens, cpu_env())


# ------------------------------------------------------------------ the runs


def test_without_positions_an_encoder_sees_a_bag_of_tokens():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=20, d_model=8, n_heads=1, n_layers=1, d_ff=8, dropout=0.0,
                            positional="none", max_seq_len=50)
    model = TransformerEncoder(cfg, n_outputs=20).eval()
    tokens = torch.randint(0, 20, (3, 50))
    perm = torch.randperm(50)
    assert torch.allclose(model(tokens)[:, perm], model(tokens[:, perm]), atol=1e-6)


def test_a_majority_run_reports_accuracy_against_chance(tmp_path):
    spec = micro_spec("maj", task="majority", task_options={"classes": 5, "margin": 2}, seq_len=12, steps=6,
                      eval_every=2, model={"d_model": 8, "n_heads": 1, "d_ff": 8, "n_layers": 1, "dropout": 0.0,
                                           "positional": "none", "placement": "pre"},
                      tags={"study": "expressivity", "group": "layernorm"})
    with one_thread():
        result = run_one(spec, tmp_path / "maj", cpu_env(), None, keep_weights=False)
    assert result["chance_accuracy"] == pytest.approx(0.2)
    assert result["baseline_val_loss"] == pytest.approx(math.log(5))
    assert 0.0 <= result["final_val_accuracy"] <= 1.0 and 0.0 <= result["val_accuracy_mean_test"] <= 1.0
    assert result["config"]["vocab_size"] == 5 and result["config"]["positional"] == "none"
    assert "unselectable_by_layer" not in result
    # the mean over the evaluations is the mean of what the metrics logged
    logged = [json.loads(line) for line in (tmp_path / "maj" / "metrics.jsonl").read_text().splitlines()]
    accs = [m["val_accuracy_test"] for m in logged if "val_accuracy_test" in m]
    assert len(accs) == 4 and result["val_accuracy_mean_test"] == pytest.approx(sum(accs) / len(accs))


def test_an_lm_run_with_unselectable_keys_reports_them_by_layer(tmp_path, corpus):
    spec = micro_spec("keys", unselectable_keys=True, tags={"study": "expressivity", "group": "none"},
                      model={"d_model": 8, "n_heads": 2, "d_ff": 16, "n_layers": 2, "dropout": 0.0,
                             "placement": "pre", "norm": "none"})
    with one_thread():
        result = run_one(spec, tmp_path / "keys", cpu_env(), corpus, keep_weights=False)
    for measure in ("", "_causal", "_heads_causal"):  # the judged one, and the two beside it
        assert len(result[f"unselectable{measure}_by_layer"]) == 2 and len(result[f"undetermined{measure}_by_layer"]) == 2
        assert all(0.0 <= v <= 1.0 for v in result[f"unselectable{measure}_by_layer"])


def test_old_runs_keep_their_fingerprints():
    spec = micro_spec("old")
    d = spec.to_dict()
    assert "unselectable_keys" in d and "task_options" in d
    assert spec.fingerprint() == micro_spec("old", unselectable_keys=False, task_options={}).fingerprint()
    assert spec.fingerprint() != micro_spec("old", unselectable_keys=True).fingerprint()
