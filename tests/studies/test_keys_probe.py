"""The causal and per-head unselectable-keys measures (Brody et al. 2023, Sec. 3.2, as a
causal LM's heads see it): ``unselectable(causal=True)`` against exhaustive checks, the
keys ``head_keys`` forms against keys computed by hand, and their flow into the claim rows."""

import itertools
import math

import pytest
import torch

from normlab.models import TransformerConfig, TransformerLM
from normlab.models.attention import apply_rope
from normlab.studies.claims import CLAIMS, judge
from normlab.studies.probes import head_keys, unselectable, unselectable_keys

from .helpers import cpu_env

# ------------------------------------------------------------------ exhaustive references


def _inside(p: torch.Tensor, others: torch.Tensor) -> bool:
    """p in the convex hull of ``others`` (points in general position): by Caratheodory, in
    the simplex of some d + 1 of them, found by trying every such simplex."""
    d = p.shape[0]
    simplices = torch.tensor(list(itertools.combinations(range(len(others)), d + 1)), dtype=torch.long)
    if not len(simplices):
        return False
    corners = others[simplices].transpose(1, 2)  # [C, d, d + 1]
    a = torch.cat([corners, torch.ones(len(simplices), 1, d + 1, dtype=torch.float64)], dim=1)
    lam = torch.linalg.solve(a, torch.cat([p, torch.ones(1, dtype=torch.float64)]).expand(len(simplices), -1))
    return bool((lam >= 0).all(-1).any())


def _exhaustive(points: torch.Tensor, causal: bool) -> torch.Tensor:
    n, t, _ = points.shape
    return torch.tensor([[int(_inside(points[s, i], points[s, [j for j in range(t) if j != i and (j < i or not causal)]]))
                          for i in range(t)] for s in range(n)], dtype=torch.int8)


@pytest.mark.parametrize("d,t", [(2, 12), (3, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_unselectable_agrees_with_an_exhaustive_check(d, t, causal):
    g = torch.Generator().manual_seed(d * 10 + t)
    pts = torch.randn(12, t, d, generator=g, dtype=torch.float64)
    # tol 1e-6: the default 1e-3 (relative to the set's RMS) also counts a vertex that close to the others' hull
    flags = unselectable(pts, causal=causal, tol=1e-6)
    assert torch.equal(flags, _exhaustive(pts, causal))


def test_causal_decides_each_point_against_the_points_before_it():
    # the centre first: inside the hull of the later four, but a vertex of its prefix (itself)
    pts = torch.tensor([[[0.0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [0.1, 0.1], [1, 0]]])
    assert unselectable(pts).tolist() == [[1, 0, 0, 0, 0, 1, 0]]
    # (0.1, 0.1) is inside the hull of the points before it; the last point copies the second,
    # which does not count against it
    assert unselectable(pts, causal=True).tolist() == [[0, 0, 0, 0, 0, 1, 0]]
    # causal: fewer rivals, so never more unselectable points than against the whole set
    g = torch.Generator().manual_seed(3)
    cloud = torch.randn(8, 40, 3, generator=g)
    whole, prefix = unselectable(cloud), unselectable(cloud, causal=True)
    assert (whole >= 0).all() and (prefix >= 0).all()
    assert ((prefix == 1) <= (whole == 1)).all() and (prefix == 1).sum() < (whole == 1).sum()


def test_causal_random_queries_only_certify_vertices_of_the_prefix():
    g = torch.Generator().manual_seed(4)
    pts = torch.randn(10, 10, 3, generator=g, dtype=torch.float64)
    flags = unselectable(pts, causal=True, iters=0)  # own and random queries alone
    truth = _exhaustive(pts, causal=True)
    assert ((flags == 0) <= (truth == 0)).all()  # every certificate is right
    assert (flags == 0).sum() >= 0.9 * (truth == 0).sum()  # and they find most vertices
    assert (flags[:, 0] == 0).all()  # the first point has no rival


@pytest.mark.parametrize("causal", [False, True])
def test_in_the_plane_the_angular_gaps_decide_every_point(causal):
    g = torch.Generator().manual_seed(5)
    pts = torch.randn(6, 20, 2, generator=g, dtype=torch.float64)
    flags = unselectable(pts, causal=causal, queries=0, iters=0, tol=1e-9)  # no random queries, no FISTA
    assert torch.equal(flags, _exhaustive(pts, causal))
    # a point on a segment between two others is inside; with one rival, or copies only, selectable
    line = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [5.0, 5.0], [5.0, 5.0]]])
    assert unselectable(line, causal=causal, queries=0, iters=0).tolist() == [[0, 0, 1, 0, 0]]


# ------------------------------------------------------------------ each head's keys


def _model(**kw) -> TransformerLM:
    torch.manual_seed(0)
    cfg = TransformerConfig(**{"vocab_size": 256, "d_model": 8, "n_heads": 4, "n_layers": 1, "d_ff": 16,
                               "dropout": 0.0, "init": "gpt2", **kw})
    return TransformerLM(cfg).eval()


def _attention_input(model, tokens):
    seen = []
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, a, k: seen.append((a[0], k.get("rope"))),
                                                            with_kwargs=True)
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("kw", [{}, {"qk_norm": "layernorm"}, {"positional": "rope"}])
def test_head_keys_are_the_keys_computed_by_hand(kw):
    model = _model(norm="layernorm", **kw)
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    h, rope = _attention_input(model, tokens)
    attn = model.blocks[0].attn
    w, b = attn.k_proj.weight.detach(), attn.k_proj.bias.detach()
    by_hand = (h @ w.T + b).view(3, 20, 4, 2)  # [B, T, H, head_dim]
    if attn.k_norm is not None:
        by_hand = torch.nn.functional.layer_norm(by_hand, (2,), attn.k_norm.weight, attn.k_norm.bias,
                                                 attn.k_norm.eps)
    by_hand = by_hand.transpose(1, 2)
    if rope is not None:
        by_hand = apply_rope(by_hand, *rope)
    keys, _ = head_keys(attn, h, rope)
    assert keys.shape == (3, 4, 20, 2)
    assert torch.allclose(keys, by_hand, atol=1e-6)
    out = unselectable_keys(model, tokens, cpu_env())
    flags = unselectable(by_hand.flatten(0, 1), causal=True)
    assert out["unselectable_heads_causal_by_layer"] == [pytest.approx(float((flags == 1).double().mean()))]
    assert out["undetermined_heads_causal_by_layer"] == [pytest.approx(float((flags == -1).double().mean()))]


def test_layernorm_inputs_are_all_selectable_but_their_keys_are_not():
    model = _model(norm="layernorm", n_layers=2)
    out = unselectable_keys(model, torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(2)),
                            cpu_env())
    assert out["unselectable_by_layer"] == [0.0, 0.0] and out["unselectable_causal_by_layer"] == [0.0, 0.0]
    assert all(v > 0.1 for v in out["unselectable_heads_causal_by_layer"])  # 8 -> 2 per head: not injective
    assert all(v == 0.0 for v in out["undetermined_heads_causal_by_layer"])  # the plane decides every key
    assert set(out) == {f"{w}{m}_by_layer" for w in ("unselectable", "undetermined")
                        for m in ("", "_causal", "_heads_causal")}


# ------------------------------------------------------------------ the claim rows


def _run(norm, seed, whole, causal=None, heads=None):
    r = {"name": f"keys-{norm}-s{seed}", "kind": "train", "task": "lm", "placement": "pre", "norm": norm,
         "n_layers": 4, "d_model": 8, "lr": 3e-3, "warmup_steps": 20, "seed": seed, "steps": 400,
         "final_val_loss": 2.9, "final_val_loss_test": 2.9, "diverged": False,
         "tags": {"study": "expressivity", "group": norm},
         "config": {"n_heads": 4, "batch_size": 16, "seq_len": 64},
         "unselectable_by_layer": [whole] * 4, "undetermined_by_layer": [0.0] * 4}
    if causal is not None:
        r.update(unselectable_causal_by_layer=[causal] * 4, undetermined_causal_by_layer=[0.0] * 4,
                 unselectable_heads_causal_by_layer=[heads] * 4, undetermined_heads_causal_by_layer=[0.01] * 4)
    return r


def _runs(with_beside=True):
    noise = (0.0, 0.002, -0.002)
    return ([_run("none", s, 0.05 + noise[s], *((0.004 + noise[s], 0.6 + noise[s]) if with_beside else ()))
             for s in range(3)]
            + [_run(n, s, 0.0, *((0.0, 0.5 + noise[s]) if with_beside else ()))
               for n in ("layernorm", "rmsnorm") for s in range(3)])


def test_the_row_reports_the_causal_and_per_head_fractions_beside_the_judged_one():
    (row,) = judge(CLAIMS["brody-scaling-selects-keys"], _runs())
    assert row["verdict"] == "agrees" and row["estimate"] == pytest.approx(0.05)  # judged on the whole window
    text = row["measured"]
    assert "against their whole sequence (judged): no norm 0.050" in text
    assert "attention inputs against their causal prefix: no norm 0.004, LayerNorm 0.000, difference +0.004" in text
    assert "each head's keys against their causal prefix: no norm 0.600, LayerNorm 0.500, difference +0.100" in text
    assert "at most 0.010 undetermined" in text
    caveats = " | ".join(row["caveats"])
    assert "each head's key map, 8 -> 2, is not injective" in caveats
    assert "inputs' gap is +0.004, within the margin 0.01" in caveats
    assert "LayerNorm's keys themselves are not all selectable: 0.500" in caveats
    sanity = {r["id"]: r for r in judge(CLAIMS["brody-scaled-keys-selectable"], _runs())}
    assert "each head's keys against their causal prefix: 0.500" in sanity["brody-scaled-keys-selectable@layernorm"][
        "measured"]
    assert any("not all selectable" in c for c in sanity["brody-scaled-keys-selectable@rmsnorm"]["caveats"])


def test_runs_without_the_new_measures_say_so():
    (row,) = judge(CLAIMS["brody-scaling-selects-keys"], _runs(with_beside=False))
    assert row["verdict"] == "agrees"
    assert "each head's keys against their causal prefix: not measured by these runs" in row["measured"]
    assert any("missing from 6 of the runs it counts" in c for c in row["caveats"])
    assert not any("contrary evidence" in c for c in row["caveats"])
    assert math.isfinite(row["estimate"])
    # one run without them: named, and the others still report them
    runs = _runs()
    del runs[0]["unselectable_heads_causal_by_layer"], runs[0]["unselectable_causal_by_layer"]
    (row,) = judge(CLAIMS["brody-scaling-selects-keys"], runs)
    assert any("missing from 1 of the runs it counts" in c and "keys-none-s0" in c for c in row["caveats"])
    assert "each head's keys against their causal prefix: no norm 0.600" in row["measured"]
