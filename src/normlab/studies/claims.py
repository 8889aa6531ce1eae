"""The published findings a study checks, each a falsifiable statement about the runs.

A ``Claim`` states one half of a paper's claim, the statistic that tests it and the test
(``normlab.studies.stats``): directional, equivalence or non-inferiority, judged against
a margin the preset fixes before the runs. ``judge(claim, results, margin)`` returns one
row per measurement (a claim judged at several learning rates gives several rows), each
with the estimate, its 95% t-interval (over paired seeds where a row compares two
configurations, over seeds where it reads a statistic of one, over timing rounds for a
speed ratio; at cross-fitted best settings the jackknife's, below: the row's "interval"
says which) and the verdict: "agrees", "disagrees" or
"inconclusive" (the interval straddles the margin). A statement that is true by
construction is a "sanity" row, never a verdict; its interval is the min to max.

How runs are read:

* a configuration is compared at **its own best learning rate** (and, for DyT, its best
  alpha0), chosen by cross-fitting: seed s is judged at the setting with the lowest mean
  loss over the *other* seeds, on the *select* half of the fixed validation set (even
  windows), and its loss is read on the *test* half (odd windows). Neither seed s's
  training noise nor its test windows take part in choosing its setting (whether a run
  failed is decided on each half alone: ``failed_on``), so a configuration with more
  settings to pick from gains no selection bias. The seeds' cross-fitted values still
  depend on each other through the choice, so such a row's interval is the
  delete-one-seed jackknife of the whole procedure (``cross_fitted_ci``), not the
  t-interval over the seeds' values;
* a run **failed** when its loss went non-finite or it ended no better than the
  unigram baseline (a model of byte frequencies alone); a failed run counts with the
  baseline's loss, so failures stay in the paired statistics instead of dropping out;
* seeds pair runs: the same seed gives the same data order and (equal shapes) init;
* nothing is left out silently: a seed one side lacks, a unit that is not finite, a
  setting only one side ran, and a planned run that raised or did not finish
  (``missing_runs``) are named in the caveats of the rows that would have read them; a
  row whose lr or depth is chosen from the runs that finished names the planned one it
  moved off (``Planned``), and a planned lr of a per-lr claim with no row gets one;
* a value left out because it is not finite (or not > 0 where the statistic takes its
  log: a probe or a stream that overflowed) is evidence the statistic could not weigh,
  the most extreme of its kind: a row that left one out keeps its verdict only where the
  row judged again with every infinity counted at +-``STAND_IN`` reads the same, else it
  is inconclusive, and it says which (``judge``).
"""

from __future__ import annotations

import contextvars
import json
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from normlab.studies.spec import Margin, RunSpec
from normlab.studies.stats import (
    SIGN_TEST_MIN_N,
    Interval,
    bound_text,
    degenerate,
    jackknife_ci,
    mean_ci,
    paired_ci,
    paired_units,
    sign_test_coverage,
    slope,
    verdict,
)

Result = dict[str, Any]
UNIFORM_BYTE_LOSS = math.log(256)  # the baseline when a result does not carry its own


@dataclass(frozen=True)
class Measurement:
    """One measured statistic: ``suffix`` tells rows of one claim apart (e.g. "@lr=0.003")."""

    suffix: str
    interval: Interval
    detail: str
    setup: str = ""
    caveats: tuple[str, ...] = ()
    undetermined: str | None = None  # why the runs cannot decide this row: it is inconclusive
    # what the row read, so that a planned run that left no result is named where it was
    # needed: the runs (their configurations, any lr, or only ``lr`` for a row judged at
    # one), and for a row with nothing to read the (study, match) selections it needed
    used: tuple[Result, ...] = ()
    lr: float | None = None
    wanted: tuple[tuple[str, tuple], ...] = ()
    planned: Planned | None = None  # where the row's lr or depth was chosen from the runs that finished
    # values the row left out because they are not finite (or not > 0 where their log is
    # taken: an overflowed stream or probe), named: evidence the statistic could not weigh,
    # so the verdict stands only where counting them at +-STAND_IN does not change it (``judge``)
    unweighed: tuple[str, ...] = ()
    # what the interval is over: "paired seeds" (two configurations, paired by seed), "" (a
    # statistic of one configuration per seed: "seeds"; for a sanity row, min to max), or
    # another unit ("interleaved timing rounds", "min to max over the runs")
    over: str = ""


@dataclass(frozen=True)
class Planned:
    """How a row's lr or depth (``field``: "lr" | "n_layers") was chosen from the runs
    that finished, or which norm it reads ("norm", a row per norm), so that a planned one
    they lack is named (``judge`` reads the planned runs that left no result): ``value``,
    the one the row is judged at; ``among``, the selections (``_want``) whose planned
    runs give the planned values; ``rule``: "largest" (the row stands for the largest
    planned value, or for ``prefer`` where that is planned) or "each" (the claim has a
    row per planned value); ``above``: the largest value the finished runs have that the
    row could not be judged at, and why."""

    field: str
    value: float | str
    among: tuple[tuple[str, tuple], ...]
    rule: str = "largest"
    prefer: float | None = None
    above: tuple[float, str] | None = None


@dataclass(frozen=True)
class Claim:
    id: str
    title: str
    papers: tuple[str, ...]
    statement: str          # the paper's claim, in its own terms
    statistic: str          # what is computed from the runs
    test: str               # "directional" | "equivalence" | "noninferiority" | "sanity"
    paper_setup: str        # the paper's setting, for the scope line
    measure: Callable[[list[Result]], list[Measurement]]
    margin: Margin          # the default; a preset may fix another before its runs


# ------------------------------------------------------------------ reading runs


def _tag(r: Result, key: str, default: Any = None) -> Any:
    return r.get("tags", {}).get(key, default)


def runs_of(results: Iterable[Result], study: str, **match: Any) -> list[Result]:
    """Runs of ``study`` (their own, or shared with it through the tag "also") whose
    fields or tags equal ``match``."""
    return [r for r in results if (_tag(r, "study") == study or study in _tag(r, "also", ()))
            and all(r.get(k, _tag(r, k)) == v for k, v in match.items())]


def baseline(r: Result, half: str | None = None) -> float:
    """The unigram baseline's loss on the run's validation set, or on one half of it."""
    value = r.get(f"baseline_val_loss_{half}") if half else None
    value = r.get("baseline_val_loss") if value is None else value
    return UNIFORM_BYTE_LOSS if value is None else value


def failed(r: Result) -> bool:
    """Diverged, non-finite, or no better than byte frequencies alone."""
    loss = r.get("final_val_loss")
    loss = math.nan if loss is None else loss
    return bool(r.get("diverged")) or not math.isfinite(loss) or loss >= baseline(r)


def failed_on(r: Result, half: str) -> bool:
    """``failed``, decided on one half of the validation set alone (its loss against its
    baseline): the select half's for choosing a setting, so that the test windows take no
    part in it, not even as whether a run failed, and the test half's for the value
    judged; a run without half losses is judged on the whole set."""
    loss = r.get(f"final_val_loss_{half}")
    if loss is None or r.get(f"baseline_val_loss_{half}") is None:
        return failed(r)
    return bool(r.get("diverged")) or not math.isfinite(loss) or loss >= baseline(r, half)


def judged_loss(r: Result, half: str = "test") -> float:
    """The final validation loss on one half of the fixed set ("select" | "test");
    a failed run counts with the unigram baseline's loss, failed as that half alone says
    (``failed_on``)."""
    if failed_on(r, half):
        return baseline(r, half)
    value = r.get(f"final_val_loss_{half}")
    return r["final_val_loss"] if value is None or not math.isfinite(value) else value


def _setting(r: Result) -> tuple:
    """What a sweep varies besides the seed: the lr and any swept model option."""
    return (r["lr"], _tag(r, "alpha0"))


def _setting_text(setting: tuple) -> str:
    lr, alpha0 = setting
    return f"lr {lr:g}" + (f", alpha0 {alpha0:g}" if alpha0 is not None else "")


@dataclass(frozen=True)
class Best:
    """A configuration at its best setting.

    ``setting`` is the best over all seeds (what the report shows); ``by_seed`` holds each
    seed's test-half loss at the setting chosen without it (cross-fitting, see the module
    docstring), which is what claims are judged on."""

    setting: tuple
    by_seed: dict[int, float]
    chosen: dict[int, tuple]        # seed -> the setting chosen without it
    sweep: dict[tuple, float]       # setting -> mean select-half loss over seeds
    failures: dict[tuple, int]      # setting -> failed seeds
    seeds: int
    complete: bool                  # every setting of the sweep ran every seed
    metric: str = "test loss"       # what by_seed holds
    gaps: tuple[str, ...] = ()      # what the sweep lacks: a setting without a run, a seed a setting lacks
    lrs: tuple[float, ...] = ()     # the lrs swept (those run, and those the sweep should have had)
    # seed k -> by_seed as the cross-fitting gives it with seed k deleted (each other seed
    # judged at the setting chosen on the rest): the delete-one-seed jackknife's input
    without: dict[int, dict[int, float]] = field(default_factory=dict)
    # (setting, seed) cells that held more than one run: the last is read (runs_of's order)
    duplicates: tuple[str, ...] = ()
    ran: dict[tuple, int] = field(default_factory=dict)  # setting -> seeds run (default: ``seeds``)
    # seeds left out of ``by_seed``: the setting chosen for them on the other seeds has no run of them
    unrun: dict[int, tuple] = field(default_factory=dict)

    def _edges(self) -> tuple[float, ...]:
        lrs = sorted(set(self.lrs) | {s[0] for s in self.sweep})
        return (lrs[0], lrs[-1]) if len(lrs) > 1 else ()

    @property
    def at_edge(self) -> bool:
        return self.setting[0] in self._edges()

    @property
    def edge_seeds(self) -> dict[int, float]:
        """Seeds whose cross-fitted setting sits at the sweep's edge (seed -> its lr): a
        seed is judged at its own choice, whatever the all-seed best."""
        edges = self._edges()
        return {seed: st[0] for seed, st in sorted(self.chosen.items()) if st[0] in edges}

    @property
    def largest_stable_lr(self) -> float | None:
        """The largest lr at which no seed failed (any swept option)."""
        ok = [s[0] for s, n in self.failures.items() if n == 0]
        return max(ok) if ok else None

    @property
    def all_failed(self) -> bool:
        """Every run of the sweep failed (a setting that lacks a seed included)."""
        return all(n >= self.ran.get(st, self.seeds) for st, n in self.failures.items())

    def text(self, name: str) -> str:
        if self.all_failed:
            return f"{name}: every run of the sweep failed (counted at the unigram baseline)"
        edge = " (edge of the sweep)" if self.at_edge else ""
        stable = self.largest_stable_lr
        varied = len(set(self.chosen.values())) > 1
        value = _mean(self.by_seed.values())
        return (f"{name}: best {_setting_text(self.setting)}{edge}"
                + (" (cross-fitted choice differs by seed)" if varied else "")
                + (f", {self.metric} {value:.3f}" if not math.isnan(value) else
                   f", no {self.metric}: no seed has a run at the setting the others chose")
                + "; largest stable lr "
                f"{'none' if stable is None else f'{stable:g}'}")

    def caveats(self, name: str) -> list[str]:
        out = [f"{name}: {d}" for d in self.duplicates]
        if self.all_failed:
            out.append(f"every run of {name} failed: it is compared as the unigram baseline")
            if not self.complete:
                out.append(f"{name}'s sweep is incomplete: " + "; ".join(self.gaps))
            return out
        if self.at_edge:
            out.append(f"{name}'s best lr is at the edge of the sweep: a better one may lie outside it")
        off = {seed: lr for seed, lr in self.edge_seeds.items() if lr != self.setting[0]}
        if off:
            lrs = sorted(set(off.values()))
            out.append(f"{name}'s cross-fitted lr of seed{'s' if len(off) > 1 else ''} {_list(off)} is at the edge "
                       f"of the sweep (lr {_list(f'{x:g}' for x in lrs)}): a better one may lie outside it")
        for seed, st in sorted(self.unrun.items()):
            out.append(f"seed {seed} of {name} left out: the setting chosen for it on the other seeds "
                       f"({_setting_text(st)}) has no run of it")
        if not self.complete:
            out.append(f"{name}'s sweep is incomplete: " + "; ".join(self.gaps))
        return out


def best_setting(runs: list[Result], value: Callable[[Result, str], float] | None = None,
                 metric: str = "test loss", lrs: Iterable[float] = ()) -> Best | None:
    """Each seed's test-half loss at the setting (lr, alpha0) with the lowest mean
    select-half loss over the other seeds; and the best setting over all seeds.
    ``value(run, half)``: what is minimised and judged in place of ``judged_loss``;
    ``lrs``: the sweep the configuration should have run (a configuration compared with
    another runs over the same lrs), so that an lr with no run at all reads as a gap."""
    value = value or judged_loss
    if not runs:
        return None
    cells: dict[tuple, dict[int, Result]] = defaultdict(dict)
    dups: dict[tuple, int] = defaultdict(int)
    for r in runs:
        if r["seed"] in cells[_setting(r)]:
            dups[(_setting(r), r["seed"])] += 1
        cells[_setting(r)][r["seed"]] = r
    seeds = sorted({r["seed"] for r in runs})

    def choose(exclude: Iterable[int]) -> tuple:
        means = {}
        for setting, by_seed in cells.items():
            used = [value(r, "select") for s, r in by_seed.items() if s not in exclude]
            means[setting] = _mean(used) if used else math.inf
        return min(means, key=lambda st: (means[st], st[0]))

    def cross_fit(judged: list[int], deleted: tuple[int, ...] = ()) -> tuple[dict, dict]:
        """Each of ``judged`` at the setting chosen on the others (on itself when it is
        alone), ``deleted`` taking no part: (seed -> setting, seed -> test-half value)."""
        chosen, values = {}, {}
        for seed in judged:
            st = choose((seed, *deleted) if len(judged) > 1 else deleted)
            if seed in cells[st]:
                chosen[seed], values[seed] = st, value(cells[st][seed], "test")
        return chosen, values

    sweep = {st: _mean(value(r, "select") for r in by_seed.values()) for st, by_seed in cells.items()}
    chosen, by_seed = cross_fit(seeds)
    unrun = {seed: choose((seed,) if len(seeds) > 1 else ()) for seed in seeds if seed not in by_seed}
    without = {k: cross_fit([s for s in seeds if s != k], (k,))[1] for k in seeds} if len(seeds) > 1 else {}
    # the grid the configuration should fill: every lr (its own and ``lrs``) with every
    # option it swept, each over every seed
    all_lrs = sorted({st[0] for st in cells} | set(lrs))
    grid = [(lr, option) for lr in all_lrs for option in sorted({st[1] for st in cells}, key=_none_first)]
    gaps = []
    for st in grid:
        lacking = [s for s in seeds if s not in cells.get(st, {})]
        if st not in cells:
            gaps.append(f"no run at {_setting_text(st)}")
        elif lacking:
            gaps.append(f"{_setting_text(st)} lacks seed{'s' if len(lacking) > 1 else ''} {_list(lacking)}")
    return Best(setting=choose(()), by_seed=by_seed, chosen=chosen, sweep=sweep,
                # (failed as the judged values say: on the test half)
                failures={st: sum(failed_on(r, "test") for r in bs.values()) for st, bs in cells.items()},
                seeds=len(seeds), complete=not gaps, metric=metric, gaps=tuple(gaps), lrs=tuple(all_lrs),
                without=without, ran={st: len(bs) for st, bs in cells.items()}, unrun=unrun,
                duplicates=tuple(f"{n + 1} runs at {_setting_text(st)} with seed {seed} (a setting the sweep does "
                                 "not tell apart, such as another warm-up): only the last is read"
                                 for (st, seed), n in sorted(dups.items(), key=lambda kv: (kv[0][0][0], kv[0][1]))))


def cross_fitted_ci(bests: list[Best], unit: Callable[[list[dict[int, float]]], dict[int, float]]) -> Interval:
    """The mean over seeds of ``unit`` (seed -> value, from each Best's seed -> value
    mapping) with the delete-one-seed jackknife's 95% interval (``stats.jackknife_ci``):
    each seed's setting is chosen on the other seeds, so the seeds' units depend on each
    other, which a t-interval over them would miss (its 95% covered 85-91% of the time
    in a simulation of lrs that differ by noise alone)."""
    full = unit([b.by_seed for b in bests])
    # each delete-one mean over the estimate's own seeds: a seed left out of it (its chosen
    # setting has no run) is no unit of the deletions either (its select half still takes
    # part in every choice, as in the estimate's)
    jack = jackknife_ci(full, {k: {s: v for s, v in unit([b.without.get(k, {}) for b in bests]).items() if s in full}
                               for k in full})
    if len(full) == 2:
        # each deletion leaves one seed, which chooses its setting on itself: another
        # procedure than the one measured, and the jackknife then covers less than the
        # t-interval (8.6% against 7.2% missed in the simulation): the wider of the two
        t = mean_ci([full[k] for k in sorted(full)])
        if math.isfinite(t.lo) and not (t.hi - t.lo <= jack.hi - jack.lo):
            return t
    return jack


def _none_first(x: Any) -> tuple:
    return (x is not None, x if x is not None else 0)


def _mostly_failed(best: Best, runs: list[Result]) -> bool:
    """More than half the seeds failed at the settings chosen for them, on the test half,
    whose values are judged (``judged_loss``)."""
    by = {(_setting(r), r["seed"]): r for r in runs}
    fails = sum(failed_on(by[(st, seed)], "test") for seed, st in best.chosen.items())
    return fails * 2 > len(best.chosen)


def _both_failed_note(pairs: list[tuple[str, Best, list[Result]]]) -> str | None:
    if all(_mostly_failed(b, rs) for _, b, rs in pairs):
        return ("most seeds of " + " and ".join(n for n, _, _ in pairs) + " failed at their chosen settings: "
                "the difference is between two baselines")
    return None


def at_setting(runs: list[Result], lr: float) -> dict[int, float]:
    return {r["seed"]: judged_loss(r) for r in runs if r["lr"] == lr}


def _mean(values: Iterable[float]) -> float:
    xs = list(values)
    return sum(xs) / len(xs) if xs else math.nan


# the margin of the claim being measured (``judge`` sets it): the rows' text prints a bound
# near it with the digits that keep it on its side (``stats.bound_text``), as the tables do
_JUDGED_MARGIN: contextvars.ContextVar[float | None] = contextvars.ContextVar("judged_margin", default=None)


def _ci_text(i: Interval, unit: str = "") -> str:
    if i.n == 0 or math.isnan(i.estimate):
        return f"none (n={i.n}: no seed to read)"
    if not math.isfinite(i.lo):
        return f"{i.estimate:+.3f}{unit} (n={i.n}, no interval)"
    m = _JUDGED_MARGIN.get()
    return f"{i.estimate:+.3f}{unit} [{bound_text(i.lo, m)}, {bound_text(i.hi, m)}] (n={i.n})"


def _want(study: str, **match: Any) -> tuple[str, tuple]:
    """A selection of runs (``runs_of``'s arguments) a row with nothing to read needed."""
    return (study, tuple(sorted(match.items())))


def _missing(what: str, *wanted: tuple[str, tuple]) -> list[Measurement]:
    return [Measurement("", Interval(math.nan, math.nan, math.nan, 0), f"not measured: needs {what}",
                        wanted=wanted)]


def _seeds_text(run: int, judged: int | None, word: str) -> str:
    """How many seeds a row stands on: those it judged, out of those run when fewer."""
    if judged is None or judged == run:
        return f"{run} {word}"
    return f"{judged} {word} (of {run} run)"


def _left_out(name: str, seeds: Iterable[int], why: str) -> list[str]:
    """The caveat for seeds a row left out, and why (empty when none)."""
    seeds = sorted(set(seeds))
    return [f"{name}: seed{'s' if len(seeds) > 1 else ''} {_list(seeds)} left out: {why}"] if seeds else []


def run_setup(runs: list[Result], judged: int | None = None, paired: bool = False) -> str:
    """Our side of a claim's scope, from the runs' records; ``judged``: the seeds the row
    stands on (the seeds both sides of a pair ran), when fewer than the runs'."""
    trained = [r for r in runs if r.get("kind") == "train"]
    if not trained:
        probes = [r for r in runs if r.get("kind") == "probe"]
        if not probes:
            return ""
        cfg = probes[0].get("config", {})
        return (f"here: byte-level LM at initialization, d_model {probes[0].get('d_model')}, "
                f"{_list(sorted({r['n_layers'] for r in probes}))} layers, batch {cfg.get('batch_size', '?')} x "
                f"{cfg.get('seq_len', '?')} bytes, {cfg.get('probe_batches', '?')} batches per seed, "
                f"{_seeds_text(len({r['seed'] for r in probes}), judged, 'paired seeds' if paired else 'seeds')}")
    r0 = trained[0]
    cfg = r0.get("config", {})
    params = sorted({r.get("n_params", 0) for r in trained})
    tokens = r0["steps"] * cfg.get("batch_size", 0) * cfg.get("seq_len", 0)
    lrs = sorted({r["lr"] for r in trained})
    size = (f"{params[0] / 1e3:.0f}k" if params[0] == params[-1]
            else f"{params[0] / 1e3:.0f}k-{params[-1] / 1e3:.0f}k")
    warm = sorted({r["warmup_steps"] for r in trained})
    return (f"here: byte-level LM, {size} parameters "
            f"(d_model {r0.get('d_model')}, {_list(sorted({r['n_layers'] for r in trained}))} layers), "
            f"{r0['steps']} steps x {cfg.get('batch_size', '?')} x {cfg.get('seq_len', '?')} bytes "
            f"({tokens / 1e6:.2f}M tokens), Adam{tuple(cfg.get('betas', ()))}, linear warm-up of "
            f"{_list(warm)} steps then a {cfg.get('schedule', 'constant')} lr, lr swept over "
            f"{_list(f'{x:g}' for x in lrs)}, {_seeds_text(len({r['seed'] for r in trained}), judged, 'paired seeds')}")


def _list(items: Iterable[Any]) -> str:
    xs = [str(x) for x in items]
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1] if xs else "-"


def _lrs(*runs: Iterable[Result]) -> list[float]:
    """The lrs any of ``runs`` swept: the sweep every configuration compared should cover."""
    return sorted({r["lr"] for rs in runs for r in rs})


def compare(name_a: str, runs_a: list[Result], name_b: str, runs_b: list[Result], suffix: str = "") -> Measurement:
    """L(a) - L(b), each at its own (cross-fitted) best setting, paired by seed."""
    lrs = _lrs(runs_a, runs_b)
    return compare_best(name_a, best_setting(runs_a, lrs=lrs), runs_a, name_b, best_setting(runs_b, lrs=lrs),
                        runs_b, suffix, lambda n: run_setup(runs_a + runs_b, n))


# what a row at cross-fitted best settings has its interval over (``cross_fitted_ci``)
JACKKNIFE_OVER = "paired seeds, jackknifed"


def best_ci(best: Best) -> Interval:
    """A configuration's mean over seeds at its cross-fitted best setting, with the
    jackknife's interval (``cross_fitted_ci``)."""
    return cross_fitted_ci([best], lambda sides: dict(sides[0]))


def _paired_units(sides: list[dict[int, float]]) -> dict[int, float]:
    """a[seed] - b[seed] over the seeds both sides hold (``cross_fitted_ci``'s unit)."""
    return paired_units(*sides)


def compare_best(name_a: str, ba: Best, runs_a: list[Result], name_b: str, bb: Best, runs_b: list[Result],
                 suffix: str, setup: Callable[[int], str], statistic: str = "L", unit: str = " nats",
                 floor: str = "the unigram baseline") -> Measurement:
    """statistic(a) - statistic(b) from each configuration's ``Best`` (``best_setting``),
    paired by seed; ``floor``: where a failed run is counted; ``setup(n)``: the scope for
    n paired seeds."""
    i = cross_fitted_ci([ba, bb], _paired_units)
    caveats = ba.caveats(name_a) + bb.caveats(name_b) + _pairing_caveats(name_a, ba.by_seed, name_b, bb.by_seed)
    for name, best, runs in ((name_a, ba, runs_a), (name_b, bb, runs_b)):
        if _mostly_failed(best, runs) and not best.all_failed:
            caveats.append(f"most seeds of {name} failed at their chosen setting: counted at {floor}")
    return Measurement(suffix, i, f"{ba.text(name_a)}; {bb.text(name_b)}; {statistic}({name_a}) - "
                       f"{statistic}({name_b}) = {_ci_text(i, unit)}", setup(i.n),
                       tuple(caveats), _both_failed_note([(name_a, ba, runs_a), (name_b, bb, runs_b)]),
                       used=tuple(runs_a) + tuple(runs_b), over=JACKKNIFE_OVER)


# ------------------------------------------------------------------ gradients and activations at init

XIONG_DEPTH = 6  # Xiong et al.'s Fig. 3 model: a 6-layer Transformer (the translation base)


def _pairing_caveats(name_a: str, a: dict, name_b: str, b: dict) -> list[str]:
    """What pairing by seed left out: the seeds one side has and the other lacks."""
    only = [(n, sorted(set(x) - set(y))) for n, x, y in ((name_a, a, b), (name_b, b, a))]
    out = [f"seed{'s' if len(seeds) > 1 else ''} {_list(seeds)} of {n} left out: no pair on the other side"
           for n, seeds in only if seeds]
    if (a or b) and not set(a) & set(b):
        out.append(f"no seed ran on both sides ({name_a}: {_list(sorted(a)) if a else 'none judged'}; "
                   f"{name_b}: {_list(sorted(b)) if b else 'none judged'})")
    return out


def _positive(values: list[float] | None) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def _usable(r: Result) -> bool:
    """A probe whose W2 gradient profile can be read: every layer's norm finite and > 0."""
    return _positive(r.get("grad_norms_by_layer", {}).get("ffn_w2"))


def _all_probes(results: list[Result], placement: str, n_layers: int | None = None) -> list[Result]:
    return [r for r in runs_of(results, "grad-at-init", placement=placement)
            if n_layers is None or r["n_layers"] == n_layers]


def _probes(results: list[Result], placement: str, n_layers: int | None = None) -> list[Result]:
    """Probes with a usable W2 gradient profile (every layer's norm finite and > 0)."""
    return [r for r in _all_probes(results, placement, n_layers) if _usable(r)]


def _at(pairs: Iterable[tuple[int, int]]) -> str:
    """(seed, layers) pairs as text: "seed 1 at 24 layers, seeds 0 and 2 at 6 layers"."""
    by_depth: dict[int, list[int]] = defaultdict(list)
    for seed, n in sorted(set(pairs)):
        by_depth[n].append(seed)
    return ", ".join(f"seed{'s' if len(ss) > 1 else ''} {_list(ss)} at {n} layers"
                     for n, ss in sorted(by_depth.items()))


def _blown(value: Any) -> bool:
    """A value that was recorded (a number, or a profile of numbers) but that the
    statistic cannot weigh: not finite, or not > 0 where its log is taken (a probe or a
    stream that overflowed). A value never recorded (None, empty) is not one."""
    if value is None:
        return False
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return bool(values) and not _positive(values)


def _unweighed(name: str, what: str, runs: Iterable[Result], value: Callable[[Result], Any]) -> tuple[str, ...]:
    """The values of ``runs`` a row left out because they are not finite and positive
    (``_blown``), named by seed and depth, for ``Measurement.unweighed``."""
    blown = [(r["seed"], r["n_layers"]) for r in runs if _blown(value(r))]
    return (f"{name}: {what} of {_at(blown)}",) if blown else ()


def _w2(r: Result) -> Any:
    return r.get("grad_norms_by_layer", {}).get("ffn_w2")


def _unusable_caveat(name: str, runs: list[Result]) -> list[str]:
    """The probes left out for a W2 gradient profile that cannot be read."""
    bad = [(r["seed"], r["n_layers"]) for r in runs if not _usable(r)]
    return [f"{name}: the probe{'s' if len(bad) > 1 else ''} of {_at(bad)} left out: W2 gradient profile not "
            "finite and positive"] if bad else []


def _judged_depth(results: list[Result]) -> int | None:
    depths = sorted({r["n_layers"] for r in runs_of(results, "grad-at-init")})
    if not depths:
        return None
    return XIONG_DEPTH if XIONG_DEPTH in depths else depths[-1]


def _probe_depth(depth: int) -> Planned:
    """``_judged_depth``'s choice, as planned: Xiong et al.'s depth where it was planned,
    else the deepest planned probe."""
    return Planned("n_layers", depth, (_want("grad-at-init"),), prefer=XIONG_DEPTH)


def _log_slope(profile: list[float]) -> float:
    return slope(list(range(1, len(profile) + 1)), [math.log(v) for v in profile])


PLACEMENT_NAMES = {"post": "Post-LN", "pre": "Pre-LN", "deepnorm": "DeepNorm", "peri": "Peri-LN"}


def _grad_slope(placement: str) -> Callable[[list[Result]], list[Measurement]]:
    def measure(results: list[Result]) -> list[Measurement]:
        depth = _judged_depth(results)
        every = _all_probes(results, placement, depth)
        runs = [r for r in every if _usable(r)]
        if not runs or depth is None or depth < 2:
            return _missing(f"{placement} probes of at least 2 layers", _want("grad-at-init", placement=placement))
        slopes = {r["seed"]: _log_slope(r["grad_norms_by_layer"]["ffn_w2"]) for r in runs}
        i = mean_ci(list(slopes.values()))
        growth = math.exp(i.estimate * (depth - 1))
        return [Measurement(f"@L{depth}", i,
                            f"slope of ln|grad W2| per layer, {placement}: {_ci_text(i)}; first -> last layer "
                            f"x{growth:.2f} at the mean slope", run_setup(every, i.n),
                            tuple(_unusable_caveat(PLACEMENT_NAMES.get(placement, placement), every)),
                            used=tuple(every), planned=_probe_depth(depth),
                            unweighed=_unweighed(PLACEMENT_NAMES.get(placement, placement), "the W2 gradient profile",
                                                 every, _w2))]

    return measure


def _last_layer_ratio(results: list[Result]) -> list[Measurement]:
    depth = _judged_depth(results)
    every = {p: _all_probes(results, p, depth) for p in ("post", "pre")}
    post, pre = ([r for r in every[p] if _usable(r)] for p in ("post", "pre"))
    if not post or not pre:
        return _missing("Post-LN and Pre-LN probes", _want("grad-at-init"))
    a = {r["seed"]: math.log(r["grad_norms_by_layer"]["ffn_w2"][-1]) for r in post}
    b = {r["seed"]: math.log(r["grad_norms_by_layer"]["ffn_w2"][-1]) for r in pre}
    i = paired_ci(a, b)
    caveats = (_unusable_caveat("Post-LN", every["post"]) + _unusable_caveat("Pre-LN", every["pre"])
               + _pairing_caveats("Post-LN", a, "Pre-LN", b))
    return [Measurement(f"@L{depth}", i, f"ln(last-layer |grad W2| Post-LN / Pre-LN), paired by seed: "
                        f"{_ci_text(i)} (ratio x{math.exp(i.estimate):.2f})",
                        run_setup(every["post"] + every["pre"], i.n, paired=True), tuple(caveats),
                        used=tuple(every["post"] + every["pre"]), planned=_probe_depth(depth),
                        unweighed=_unweighed("Post-LN", "the W2 gradient profile", every["post"], _w2)
                        + _unweighed("Pre-LN", "the W2 gradient profile", every["pre"], _w2), over="paired seeds")]


def _ratio_growth(results: list[Result]) -> list[Measurement]:
    """Per seed: slope of ln(last-layer |grad W2| Post-LN / Pre-LN) against ln L over depths."""
    every = {p: _all_probes(results, p) for p in ("post", "pre")}
    post, pre = ([r for r in every[p] if _usable(r)] for p in ("post", "pre"))
    ratios: dict[int, dict[int, float]] = defaultdict(dict)
    pre_by = {(r["seed"], r["n_layers"]): r for r in pre}
    post_by = {(r["seed"], r["n_layers"]): r for r in post}
    for key, r in post_by.items():
        other = pre_by.get(key)
        if other:
            ratios[r["seed"]][r["n_layers"]] = math.log(r["grad_norms_by_layer"]["ffn_w2"][-1]
                                                        / other["grad_norms_by_layer"]["ffn_w2"][-1])
    slopes = {s: slope([math.log(n) for n in sorted(c)], [c[n] for n in sorted(c)])
              for s, c in ratios.items() if len(c) >= 2}
    if not slopes:
        return _missing("Post-LN and Pre-LN probes at two or more depths", _want("grad-at-init"))
    i = mean_ci(list(slopes.values()))
    shifted = Interval(i.estimate - 0.5, i.lo - 0.5, i.hi - 0.5, i.n)
    depths = sorted({n for c in ratios.values() for n in c})
    caveats = _unusable_caveat("Post-LN", every["post"]) + _unusable_caveat("Pre-LN", every["pre"])
    for name, mine, other in (("Post-LN", post_by, pre_by), ("Pre-LN", pre_by, post_by)):
        alone = [key for key in mine if key not in other]
        if alone:
            caveats.append(f"{name}: the probe{'s' if len(alone) > 1 else ''} of {_at(alone)} left out: no probe of "
                           "the other placement to pair with")
    seeds = {r["seed"] for r in every["post"] + every["pre"]}
    caveats += _left_out("Post-LN / Pre-LN", seeds - set(slopes), "fewer than two depths with a ratio to fit")
    # contrary evidence, not judged: the same statistic over the depths the init-depth rows
    # fit (both studies' probes from INIT_DEPTH_MIN layers), where those rows read Xiong's
    # per-placement exponents
    post_d, pre_d = (_last_grad_by_depth(results, p)[0] for p in ("post", "pre"))
    wide = {seed: {n: post_d[seed][n] - pre_d[seed][n] for n in post_d[seed] if n in pre_d.get(seed, {})}
            for seed in post_d}
    wide_slopes = _depth_slopes({seed: c for seed, c in wide.items() if len(c) >= 2}, math.log)
    wide_depths = sorted({n for c in wide.values() for n in c})
    if len(wide_slopes) >= 2 and wide_depths != depths:
        w = mean_ci(list(wide_slopes.values()))
        caveats.append(f"over the depths the init-depth rows fit ({_list(wide_depths)}, both studies' probes from "
                       f"{INIT_DEPTH_MIN} layers), not judged here: exponent - 0.5 = "
                       f"{_ci_text(Interval(w.estimate - 0.5, w.lo - 0.5, w.hi - 0.5, w.n))}")
    return [Measurement("", shifted, f"exponent of the last-layer ratio Post-LN / Pre-LN against L over depths "
                        f"{_list(depths)}: {_ci_text(i)}; statistic exponent - 0.5 = {_ci_text(shifted)}",
                        run_setup(every["post"] + every["pre"], i.n, paired=True), tuple(caveats),
                        used=tuple(every["post"] + every["pre"]),
                        unweighed=_unweighed("Post-LN", "the W2 gradient profile", every["post"], _w2)
                        + _unweighed("Pre-LN", "the W2 gradient profile", every["pre"], _w2), over="paired seeds")]


def _residual_variance(results: list[Result]) -> list[Measurement]:
    """Per seed, in the deepest Pre-LN probe: the exponent e of RMS_l^2 - RMS_1^2 ~ (l - 1)^e."""
    runs = [r for r in runs_of(results, "grad-at-init", placement="pre")
            if _positive(r.get("activation_rms_by_layer")) and len(r["activation_rms_by_layer"]) >= 4]
    if not runs:
        return _missing("Pre-LN probes of at least 4 layers with activation statistics",
                        _want("grad-at-init", placement="pre"))
    deepest = max(r["n_layers"] for r in runs)
    every = _all_probes(results, "pre", deepest)
    runs = [r for r in runs if r["n_layers"] == deepest]
    exps = {}
    flat: dict[int, list[int]] = {}  # seed -> the blocks (1-based) whose stream is not above block 1's
    for r in runs:
        sq = [v * v for v in r["activation_rms_by_layer"]]
        points = [(math.log(l), math.log(sq[l] - sq[0])) for l in range(1, len(sq)) if sq[l] > sq[0]]
        if len(points) < len(sq) - 1:
            flat[r["seed"]] = [l + 1 for l in range(1, len(sq)) if not sq[l] > sq[0]]
        if len(points) >= 3:
            exps[r["seed"]] = slope([x for x, _ in points], [y for _, y in points])
    if not exps:
        return _missing("Pre-LN probes whose residual stream grows past its first block",
                        _want("grad-at-init", placement="pre"))
    i = mean_ci(list(exps.values()))
    shifted = Interval(i.estimate - 1.0, i.lo - 1.0, i.hi - 1.0, i.n)
    first = _mean(r["activation_rms_by_layer"][0] for r in runs)
    last = _mean(r["activation_rms_by_layer"][-1] for r in runs)
    kept = {r["seed"] for r in runs}
    caveats = (_left_out("Pre-LN", {r["seed"] for r in every} - kept, "residual RMS profile not finite and "
                         "positive")
               + _left_out("Pre-LN", kept - set(exps), "fewer than three blocks whose stream grows past the first "
                           "block's, too few to fit"))
    # a block whose stream is not above block 1's has no log to fit: the fit over the others
    # would read a growth that stalls (or shrinks) there as linear, so the row is not judged
    stalled = {seed: blocks for seed, blocks in flat.items() if seed in exps}
    undetermined = None
    if stalled:
        shown = "; ".join(f"seed {seed}: block{'s' if len(b) > 1 else ''} {_list(b)}" for seed, b in sorted(stalled.items()))
        caveats += [f"blocks whose residual stream is not above block 1's (no log of RMS_l^2 - RMS_1^2 to fit), "
                    f"left out of those seeds' fits: {shown}"]
        undetermined = ("the stream does not grow past block 1's at every block, so the exponent fitted over the "
                        "blocks that do would not describe the whole stack")
    return [Measurement(f"@L{deepest}", shifted,
                        f"residual RMS after block 1 -> {deepest}: {first:.3g} -> {last:.3g} (mean over seeds); "
                        f"exponent e of RMS_l^2 - RMS_1^2 ~ (l - 1)^e: {_ci_text(i)}; statistic e - 1 = "
                        f"{_ci_text(shifted)}", run_setup(every, i.n), tuple(caveats), undetermined, used=tuple(every),
                        planned=Planned("n_layers", deepest, (_want("grad-at-init", placement="pre"),)),
                        # a deeper probe whose stream overflowed moved the row off its depth
                        unweighed=_unweighed("Pre-LN", "the residual RMS profile",
                                             [r for r in runs_of(results, "grad-at-init", placement="pre")
                                              if r["n_layers"] >= deepest], lambda r: r.get("activation_rms_by_layer")))]


def _postln_stream(results: list[Result]) -> list[Measurement]:
    runs = [r for r in runs_of(results, "grad-at-init", placement="post") if r.get("activation_rms_by_layer")]
    if not runs:
        return _missing("Post-LN probes", _want("grad-at-init", placement="post"))
    values = [v for r in runs for v in r["activation_rms_by_layer"]]
    i = Interval(_mean(values), min(values), max(values), len({r["seed"] for r in runs}))
    return [Measurement("", i, f"Post-LN residual RMS after every block, all probes: {min(values):.3f} to "
                        f"{max(values):.3f} (a LayerNorm output: 1 up to eps and gamma = 1 at init)",
                        run_setup(runs), used=tuple(runs), over="min to max over every block of every probe")]


# ------------------------------------------------------------------ warm-up

def _warmup_runs(results: list[Result]) -> dict[tuple[str, bool], list[Result]]:
    runs = runs_of(results, "warmup")
    return {(p, w): [r for r in runs if r["placement"] == p and (r["warmup_steps"] > 0) == w]
            for p in ("post", "pre") for w in (False, True)}


WARMUP_NAMES = {("post", False): "Post-LN without warm-up", ("post", True): "Post-LN with warm-up",
                ("pre", False): "Pre-LN without warm-up", ("pre", True): "Pre-LN with warm-up"}


_WARMUP_KEYS = (("post", False), ("post", True), ("pre", False), ("pre", True))


def _interaction_units(sides: list[dict[int, float]]) -> dict[int, float]:
    """Per seed, [L(post, none) - L(post, warm-up)] - [L(pre, none) - L(pre, warm-up)]
    (``sides`` in ``_WARMUP_KEYS`` order), over the seeds all four hold."""
    post_none, post_warm, pre_none, pre_warm = sides
    seeds = set(post_none) & set(post_warm) & set(pre_none) & set(pre_warm)
    return {s: (post_none[s] - post_warm[s]) - (pre_none[s] - pre_warm[s]) for s in sorted(seeds)}


def _interaction(cells: dict[tuple[str, bool], dict[int, float]]) -> Interval:
    """[L(post, none) - L(post, warm-up)] - [L(pre, none) - L(pre, warm-up)], paired by seed."""
    d = _interaction_units([cells[k] for k in _WARMUP_KEYS])
    return mean_ci([d[s] for s in sorted(d)])


def _interaction_caveats(cells: dict[tuple[str, bool], dict[int, float]], where: str = "") -> list[str]:
    """The seeds the interaction left out: those any of the four configurations lacks."""
    seeds = set.union(*(set(c) for c in cells.values()))
    out = []
    for key, c in cells.items():
        lacking = sorted(seeds - set(c))
        if lacking:
            out.append(f"seed{'s' if len(lacking) > 1 else ''} {_list(lacking)} left out: no result of "
                       f"{WARMUP_NAMES[key]}{where} (the interaction needs all four configurations)")
    return out


def _postln_gain_check(interaction: Interval, gain: Interval, pre_gain: Interval) -> tuple[list[str], str | None]:
    """The claim is that Post-LN needs warm-up: an interaction above 0 can also come from
    warm-up costing Pre-LN while it buys Post-LN nothing. (caveats, why the row is not
    judged): the split of the interaction always; the row is not judged where the
    interaction would agree but Post-LN's own gain from warm-up (L(post, none) -
    L(post, warm-up), paired by seed) is not shown above 0."""
    caveats = [f"the interaction splits into what warm-up buys Post-LN, {_ci_text(gain, ' nats')}, and what it "
               f"buys Pre-LN, {_ci_text(pre_gain, ' nats')}"]
    shown = math.isfinite(gain.lo) and gain.lo > 0
    margin = _JUDGED_MARGIN.get() or 0.0  # (the claim's margin, which ``judge`` sets)
    if math.isfinite(interaction.lo) and interaction.lo > margin and not shown:
        return caveats, ("the interaction is above 0, but what warm-up buys Post-LN itself is not shown to be (its "
                         "interval reaches 0): the claim is that Post-LN needs warm-up, and an interaction that "
                         "rests on what warm-up costs Pre-LN does not show it")
    return caveats, None


def _warmup_text(cells: dict[tuple[str, bool], dict[int, float]]) -> str:
    m = {k: _mean(v.values()) for k, v in cells.items()}
    return (f"test loss Post-LN {m[('post', False)]:.3f} without / {m[('post', True)]:.3f} with warm-up, "
            f"Pre-LN {m[('pre', False)]:.3f} / {m[('pre', True)]:.3f}")


def _one_side_note(failed: list[str], how: str) -> str | None:
    """Why a warm-up interaction cannot be read: the placements (of "post", "pre") that
    ``how`` failed gain nothing from warm-up either way, so the statistic would measure
    the other placement alone, or, with both, nothing but baselines."""
    if not failed:
        return None
    if len(failed) == 2:
        return f"both Post-LN and Pre-LN {how}: the statistic is between baselines"
    other = "pre" if failed[0] == "post" else "post"
    return f"{PLACEMENT_NAMES[failed[0]]} {how}: the statistic would measure {PLACEMENT_NAMES[other]} alone"


def _warmup_each_lr(results: list[Result]) -> list[Measurement]:
    groups = _warmup_runs(results)
    if not all(groups.values()):
        return _missing("Post-LN and Pre-LN runs with and without warm-up", _want("warmup"))
    every = [r for rs in groups.values() for r in rs]
    lrs = sorted(set.intersection(*({r["lr"] for r in rs} for rs in groups.values())))
    if not lrs:
        return _missing("Post-LN and Pre-LN runs with and without warm-up at a shared lr", _want("warmup"))
    out = []
    for lr in lrs:
        cells = {k: at_setting(rs, lr) for k, rs in groups.items()}
        i = _interaction(cells)
        failures = {k: sum(failed_on(r, "test") for r in rs if r["lr"] == lr) for k, rs in groups.items()}
        fails = ", ".join(f"{'Post-LN' if p == 'post' else 'Pre-LN'} {'with' if w else 'without'} warm-up {n}"
                          for (p, w), n in failures.items())
        # a placement failed on every seed with and without warm-up gains nothing either way:
        # the interaction would measure the other placement alone
        note = _one_side_note([p for p in ("post", "pre") if all(failures[(p, w)] == len(cells[(p, w)])
                                                                  for w in (False, True))],
                              "failed on every seed with and without warm-up at this lr")
        split, unshown = _postln_gain_check(i, paired_ci(cells[("post", False)], cells[("post", True)]),
                                            paired_ci(cells[("pre", False)], cells[("pre", True)]))
        out.append(Measurement(f"@lr={lr:g}", i, f"lr {lr:g}: {_warmup_text(cells)}; what warm-up buys Post-LN "
                               f"minus what it buys Pre-LN: {_ci_text(i, ' nats')}; failed runs: {fails}",
                               run_setup(every, i.n), tuple(_interaction_caveats(cells, f" at lr {lr:g}")) + tuple(split),
                               undetermined=note or unshown, used=tuple(r for r in every if r["lr"] == lr), lr=lr,
                               planned=Planned("lr", lr, (_want("warmup"),), rule="each"), over="paired seeds"))
    lonely = sorted({r["lr"] for r in every} - set(lrs))
    if lonely:  # an lr some configuration lacks is not judged: the rows say so
        gaps = "; ".join(f"lr {lr:g}: no run of " + " or ".join(WARMUP_NAMES[k] for k, rs in groups.items()
                                                                if all(r["lr"] != lr for r in rs)) for lr in lonely)
        out = [replace(m, caveats=m.caveats + (f"not judged at an lr one configuration lacks ({gaps})",))
               for m in out]
    return out


def _warmup_best(results: list[Result]) -> list[Measurement]:
    groups = _warmup_runs(results)
    if not all(groups.values()):
        return _missing("Post-LN and Pre-LN runs with and without warm-up", _want("warmup"))
    lrs = _lrs(*groups.values())
    best = {k: best_setting(rs, lrs=lrs) for k, rs in groups.items()}
    cells = {k: b.by_seed for k, b in best.items()}
    i = cross_fitted_ci([best[k] for k in _WARMUP_KEYS], _interaction_units)
    detail = "; ".join(b.text(WARMUP_NAMES[k]) for k, b in best.items())
    caveats = tuple(c for k, b in best.items() for c in b.caveats(WARMUP_NAMES[k])) + tuple(
        _interaction_caveats(cells, " at its chosen lr"))
    # as the per-lr rows: with Post-LN failed on most seeds with and without warm-up, the
    # interaction is what warm-up buys Pre-LN alone
    note = _one_side_note([p for p in ("post", "pre") if all(_mostly_failed(best[(p, w)], groups[(p, w)])
                                                              for w in (False, True))],
                          "failed on most seeds at their chosen lr with and without warm-up")
    every = [r for rs in groups.values() for r in rs]
    split, unshown = _postln_gain_check(i, cross_fitted_ci([best[("post", False)], best[("post", True)]], _paired_units),
                                        cross_fitted_ci([best[("pre", False)], best[("pre", True)]], _paired_units))
    return [Measurement("@best-lr", i, f"each at its own best lr: {detail}; interaction {_ci_text(i, ' nats')}",
                        run_setup(every, i.n), caveats + tuple(split), note or unshown, used=tuple(every),
                        over=JACKKNIFE_OVER)]


def _preln_without_warmup(results: list[Result]) -> list[Measurement]:
    groups = _warmup_runs(results)
    if not groups[("pre", False)] or not groups[("pre", True)]:
        return _missing("Pre-LN runs with and without warm-up", _want("warmup", placement="pre"))
    m = compare("Pre-LN without warm-up", groups[("pre", False)], "Pre-LN with warm-up", groups[("pre", True)],
                "@best-lr")
    return [m]


# ------------------------------------------------------------------ depth and DeepNorm

def _deepest(results: list[Result]) -> tuple[int | None, dict[str, list[Result]]]:
    runs = runs_of(results, "depth")
    depths = sorted({r["n_layers"] for r in runs if r["placement"] == "deepnorm"})
    if not depths:
        return None, {}
    n = depths[-1]
    return n, {p: [r for r in runs if r["placement"] == p and r["n_layers"] == n] for p in ("post", "pre", "deepnorm")}


def _deepest_planned(n: int) -> Planned:
    """``_deepest``'s choice, as planned: the deepest depth DeepNorm was planned at."""
    return Planned("n_layers", n, (_want("depth", placement="deepnorm"),))


def _deepnorm_beats(other: str) -> Callable[[list[Result]], list[Measurement]]:
    def measure(results: list[Result]) -> list[Measurement]:
        n, cells = _deepest(results)
        if n is None or not cells[other] or not cells["deepnorm"]:
            wanted = (_want("depth", placement=p, n_layers=n) if n else _want("depth", placement=p)
                      for p in (other, "deepnorm"))
            return _missing(f"DeepNorm and {other} runs at the same depth", *wanted)
        return [replace(compare(other, cells[other], "deepnorm", cells["deepnorm"], f"@L{n}"),
                        planned=_deepest_planned(n))]

    return measure


# a run that ended less than this many nats under its unigram baseline is named in the
# stability row: it counts as trained, but noise could put it on the other side
NEAR_BASELINE = 0.05


def _deepnorm_stability(results: list[Result]) -> list[Measurement]:
    n, cells = _deepest(results)
    if n is None or not cells["post"] or not cells["deepnorm"]:
        wanted = (_want("depth", placement=p, n_layers=n) if n else _want("depth", placement=p)
                  for p in ("post", "deepnorm"))
        return _missing("DeepNorm and Post-LN runs at the same depth", *wanted)
    # per seed, failures are counted over the settings both placements ran: a run that is
    # missing on one side (it raised, or has not finished) would otherwise count as one
    # that did not fail, and shift the difference
    ran: dict[str, dict[int, dict[tuple, bool]]] = {p: defaultdict(dict) for p in ("post", "deepnorm")}
    for p in ran:
        for r in cells[p]:
            ran[p][r["seed"]][_setting(r)] = failed_on(r, "test")  # (the judged half, as every row's values)
    names = {"post": "Post-LN", "deepnorm": "DeepNorm"}
    units, lone = {}, defaultdict(list)  # lone: (side that lacks it, setting) -> seeds
    counted = {"post": 0, "deepnorm": 0, "both": 0}  # failures over the shared settings, and those settings
    for seed in sorted(set(ran["post"]) | set(ran["deepnorm"])):
        a, b = ran["post"].get(seed, {}), ran["deepnorm"].get(seed, {})
        shared = set(a) & set(b)
        for st in set(a) ^ set(b):
            lone[("post" if st not in a else "deepnorm", st)].append(seed)
        if shared:
            units[seed] = float(sum(a[st] for st in shared) - sum(b[st] for st in shared))
            counted["post"] += sum(a[st] for st in shared)
            counted["deepnorm"] += sum(b[st] for st in shared)
            counted["both"] += len(shared)
    i = mean_ci([units[s] for s in sorted(units)])
    caveats = [f"{names[side]} has no run at {_setting_text(st)} for seed{'s' if len(seeds) > 1 else ''} "
               f"{_list(seeds)}: {names['deepnorm' if side == 'post' else 'post']}'s runs there are left out of the "
               f"count too" for (side, st), seeds in sorted(lone.items(), key=lambda kv: (kv[0][1][0], kv[0][0]))]
    every = sorted({s for p in ran for s in ran[p]})
    caveats += _left_out("Post-LN - DeepNorm", set(every) - set(units), "no setting that both placements ran")
    lrs = sorted({r["lr"] for r in cells["post"] + cells["deepnorm"]})
    counts = {p: f"{sum(failed_on(r, 'test') for r in rs)}/{len(rs)}" for p, rs in cells.items() if rs}
    stable = {p: best_setting(rs).largest_stable_lr for p, rs in cells.items() if rs}
    detail = (f"{n} layers, lrs {_list(f'{x:g}' for x in lrs)}: failed runs " + ", ".join(f"{p} {c}" for p, c in counts.items())
              + "; largest stable lr " + ", ".join(f"{p} {'none' if s is None else f'{s:g}'}" for p, s in stable.items())
              + f"; Post-LN minus DeepNorm failures per seed, over the settings both ran {_ci_text(i)}")
    if units and counted["post"] == counted["deepnorm"] == 0:
        detail += " (no failures at these settings: stability is not tested here)"
    elif units and counted["post"] == counted["deepnorm"] == counted["both"]:
        detail += (" (both placements failed at every setting both ran: stability is not separable at these "
                   "settings)")
    runs = cells["post"] + cells["deepnorm"]
    if not any(r.get("diverged") or not math.isfinite(r.get("final_val_loss") or math.nan) for r in runs):
        caveats.append("no run here diverged (a non-finite loss): every failure counted is a run that ended no "
                       "better than the unigram baseline, which tells training that did not get going from "
                       "instability only in part")
    close = sorted(r["name"] for r in runs
                   if not failed_on(r, "test") and judged_loss(r) > baseline(r, "test") - NEAR_BASELINE)
    if close:
        caveats.append(f"{len(close)} run(s) counted as not failed ended within {NEAR_BASELINE:g} nats under the "
                       f"baseline ({_list(close)}): a count near the line moves with the runs' noise")
    note = None if units else "no seed has a setting that both Post-LN and DeepNorm ran"
    if units and i.n < SIGN_TEST_MIN_N:
        # failure counts are a few integers: a t-interval over few of them is no 95% interval
        # (three seeds of [2, 1, 2] would agree, three of [2, 2, 2] could not be judged),
        # and the distribution-free sign test's interval reaches 95% from SIGN_TEST_MIN_N
        note = (f"the units are failure counts, a few integers, over {i.n} seed(s): a Student-t interval is no "
                f"95% interval for them, and the sign test's interval for their median reaches 95% only from "
                f"{SIGN_TEST_MIN_N} seeds (over {i.n}, at most {sign_test_coverage(i.n):.1%})")
    return [Measurement(f"@L{n}", i, detail, run_setup(runs, i.n), tuple(caveats),
                        note, used=tuple(runs), planned=_deepest_planned(n), over="paired seeds")]


# ------------------------------------------------------------------ norms

def _norm_runs(results: list[Result], name: str) -> list[Result]:
    return [r for r in runs_of(results, "norms", norm=name) if r.get("kind") == "train"]


def _norm_difference(a: str, b: str) -> Callable[[list[Result]], list[Measurement]]:
    """L(a) - L(b) at each one's own best setting, paired by seed."""

    def measure(results: list[Result]) -> list[Measurement]:
        ra, rb = _norm_runs(results, a), _norm_runs(results, b)
        if not ra or not rb:
            return _missing(f"{a} and {b} runs", _want("norms", norm=a), _want("norms", norm=b))
        return [compare(a, ra, b, rb)]

    return measure


def _negated(measure: Callable[[list[Result]], list[Measurement]]) -> Callable[[list[Result]], list[Measurement]]:
    def flipped(results: list[Result]) -> list[Measurement]:
        out = []
        for m in measure(results):
            i = m.interval
            out.append(replace(m, interval=Interval(-i.estimate, -i.hi, -i.lo, i.n),
                               detail=m.detail + " (statistic: the negative, so > 0 favours the claim)"))
        return out

    return flipped


def _rmsnorm_speed(results: list[Result]) -> list[Measurement]:
    runs = [r for r in runs_of(results, "norms") if r.get("kind") == "speed" and r.get("speed_ratios")
            and r["norm"] == "rmsnorm" and r.get("speed_against", {}).get("norm") == "layernorm"]
    if not runs:
        return _missing("a side-by-side speed run (normlab study measures one per norms study)",
                        _want("norms", kind="speed"))
    r = runs[0]
    # a round whose ratio is not finite and > 0 (a corrupt timing) has no log: left out, named
    bad = [k + 1 for k, x in enumerate(r["speed_ratios"]) if not _recorded(x)]
    i = mean_ci([math.log(x) for x in r["speed_ratios"] if _recorded(x)])
    unweighed = (f"the speed ratio{'s' if len(bad) > 1 else ''} of round{'s' if len(bad) > 1 else ''} "
                 f"{_list(bad)}",) if bad else ()
    return [Measurement("", i, f"training step, RMSNorm vs LayerNorm models timed side by side in "
                        f"{len(r['speed_ratios'])} interleaved rounds ({r.get('threads', '?')} thread(s)): "
                        f"{r['tokens_per_s']:,.0f} vs {r['baseline_tokens_per_s']:,.0f} tokens/s (medians); "
                        f"ln(speed ratio) {_ci_text(i)} = x{math.exp(i.estimate):.3f}",
                        f"here: {r.get('n_params', 0) / 1e3:.0f}k-parameter model, {r.get('n_layers')} layers, "
                        f"d_model {r.get('d_model')}, the default backend on this device", used=(r,),
                        unweighed=unweighed, over="interleaved timing rounds")]


# ------------------------------------------------------------------ mechanisms

INIT_DEPTH_MIN = 6  # the depths Xiong et al.'s Theorem 1 is checked over start here (as the issue's 6-48)


def _last_grad_by_depth(results: list[Result], placement: str
                        ) -> tuple[dict[int, dict[int, float]], list[Result], list[tuple[int, int]]]:
    """seed -> {depth: ln(last-layer |grad W2|)} from the probes at init of both studies;
    the probes read, and the (seed, depth) of those left out (no finite, positive profile)."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    runs = [r for r in runs_of(results, "grad-at-init", placement=placement)
            + runs_of(results, "init-depth", placement=placement) if r["n_layers"] >= INIT_DEPTH_MIN]
    bad = []
    for r in runs:
        w2 = r.get("grad_norms_by_layer", {}).get("ffn_w2")
        if _positive(w2):
            out[r["seed"]][r["n_layers"]] = math.log(w2[-1])
        else:
            bad.append((r["seed"], r["n_layers"]))
    return out, runs, bad


def _depth_slopes(by_seed: dict[int, dict[int, float]], x: Callable[[int], float]) -> dict[int, float]:
    """Per seed, the slope of its values against x(depth), over at least two depths."""
    return {s: slope([x(n) for n in sorted(c)], [c[n] for n in sorted(c)]) for s, c in by_seed.items() if len(c) >= 2}


def _depth_caveats(name: str, runs: list[Result], bad: list[tuple[int, int]], slopes: dict[int, float],
                   what: str) -> list[str]:
    """What a fit over depths left out: values that are not finite and positive (named by
    seed and depth; those seeds' slopes are fitted over their other depths), and seeds
    left with fewer than two depths."""
    out = []
    if bad:
        out.append(f"{name}: {what} of {_at(bad)} is not finite and positive: left out, and those seeds' slopes "
                   "are fitted over their other depths")
    out += _left_out(name, {r["seed"] for r in runs} - set(slopes), "fewer than two depths with a usable value")
    return out


def _init_depth(placement: str, theory: float) -> Callable[[list[Result]], list[Measurement]]:
    """Per seed: slope of ln(last-layer |grad W2|) against ln L; the statistic is slope - theory."""

    def measure(results: list[Result]) -> list[Measurement]:
        by_seed, every, bad = _last_grad_by_depth(results, placement)
        slopes = _depth_slopes(by_seed, math.log)
        if not slopes:
            return _missing(f"{placement} probes at two or more depths of at least {INIT_DEPTH_MIN} layers",
                            _want("grad-at-init", placement=placement), _want("init-depth", placement=placement))
        i = mean_ci(list(slopes.values()))
        shifted = Interval(i.estimate - theory, i.lo - theory, i.hi - theory, i.n)
        depths = sorted({n for c in by_seed.values() for n in c})
        runs = [r for r in every if r["n_layers"] in depths]
        means = {n: math.exp(_mean(c[n] for c in by_seed.values() if n in c)) for n in depths}
        return [Measurement("", shifted,
                            f"last-layer |grad W2| at {_list(depths)} layers: "
                            f"{_list(f'{means[n]:.3g}' for n in depths)} (geometric mean over seeds); exponent of L: "
                            f"{_ci_text(i)}; statistic exponent - ({theory:g}) = {_ci_text(shifted)}",
                            run_setup(runs, i.n),
                            tuple(_depth_caveats(PLACEMENT_NAMES.get(placement, placement), every, bad, slopes,
                                                 "the last layer's W2 gradient")), used=tuple(every),
                            unweighed=_unweighed(PLACEMENT_NAMES.get(placement, placement), "the W2 gradient profile",
                                                 every, _w2))]

    return measure


def _update_by_depth(results: list[Result], placement: str
                     ) -> tuple[dict[int, dict[int, float]], list[Result], list[tuple[int, int]]]:
    """seed -> {depth: ln of the output change after one Adam update}; the runs read, and
    the (seed, depth) of those whose change is missing, not finite or not > 0 (a blown-up
    probe: the most amplified, which the caveat must name)."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    runs = runs_of(results, "amplification", placement=placement)
    bad = []
    for r in runs:
        v = r.get("output_change_sq")
        if v is not None and math.isfinite(v) and v > 0:
            out[r["seed"]][r["n_layers"]] = math.log(v)
        else:
            bad.append((r["seed"], r["n_layers"]))
    return out, runs, bad


def _update_setup(results: list[Result], judged: int | None = None, paired: bool = False) -> str:
    runs = runs_of(results, "amplification")
    if not runs:
        return ""
    r0 = runs[0]
    return (f"here: byte-level LM at initialization, d_model {r0.get('d_model')}, "
            f"{_list(sorted({r['n_layers'] for r in runs}))} layers, one Adam step at lr {r0['lr']:g} on "
            f"{r0.get('config', {}).get('probe_batches', '?')} batches, output change on one fixed validation "
            f"batch, {_seeds_text(len({r['seed'] for r in runs}), judged, 'paired seeds' if paired else 'seeds')}")


CHANGE = "the output change"


def _change(r: Result) -> Any:
    return r.get("output_change_sq")


# an update probe's ||dF||^2 further than this from 100x its tenth-step change is off the
# linear response the theorems describe (measured: within 0.7% at 6 layers and 7% for
# Post-LN at 24, d_model 64, lr 1e-5; float32's rounding moves it about 2% at 1e-6)
LINEARITY_TOL = 0.05


def _linearity_caveats(name: str, runs: list[Result]) -> list[str]:
    """The update probes whose output change is not the linear response to the step."""
    off = [r for r in runs if isinstance(r.get("update_linearity"), (int, float))
           and math.isfinite(r["update_linearity"]) and abs(r["update_linearity"] - 1) > LINEARITY_TOL]
    if not off:
        return []
    ratios = [r["update_linearity"] for r in off]
    return [f"{name}: the update probe{'s' if len(off) > 1 else ''} of {_at([(r['seed'], r['n_layers']) for r in off])} "
            f"changed F by {min(ratios):.2f}-{max(ratios):.2f}x 100 times a tenth of the step's change (1 where F "
            f"responds linearly): off the linear response the theorems describe by more than {LINEARITY_TOL:.0%}; "
            "below 1 the step's change is underestimated there, which biases the slope over depth down"]


def _update_exponent(placement: str, x: Callable[[int], float], theory: float, x_text: str
                     ) -> Callable[[list[Result]], list[Measurement]]:
    """Per seed: slope of ln ||dF||^2 against x(N); the statistic is slope - theory."""

    def measure(results: list[Result]) -> list[Measurement]:
        by_seed, every, bad = _update_by_depth(results, placement)
        slopes = _depth_slopes(by_seed, x)
        if not slopes:
            return _missing(f"{placement} update probes at two or more depths",
                            _want("amplification", placement=placement))
        i = mean_ci(list(slopes.values()))
        shifted = Interval(i.estimate - theory, i.lo - theory, i.hi - theory, i.n)
        depths = sorted({n for c in by_seed.values() for n in c})
        means = {n: math.exp(_mean(c[n] for c in by_seed.values() if n in c)) for n in depths}
        return [Measurement("", shifted,
                            f"{placement}: output change ||dF||^2 per coordinate at {_list(depths)} layers: "
                            f"{_list(f'{means[n]:.3g}' for n in depths)} (geometric mean over seeds); slope of "
                            f"ln ||dF||^2 against {x_text}: {_ci_text(i)}; statistic slope - {theory:g} = "
                            f"{_ci_text(shifted)}", _update_setup(results, i.n),
                            tuple(_depth_caveats(placement, every, bad, slopes, CHANGE)
                                  + _linearity_caveats(placement, every)), used=tuple(every),
                            unweighed=_unweighed(placement, CHANGE, every, _change))]

    return measure


def _update_growth_gap(results: list[Result]) -> list[Measurement]:
    """Per seed: slope(Post-LN) - slope(Pre-LN) of ln ||dF||^2 against ln N."""
    (post_by, post_runs, post_bad), (pre_by, pre_runs, pre_bad) = (_update_by_depth(results, p)
                                                                   for p in ("post", "pre"))
    post, pre = _depth_slopes(post_by, math.log), _depth_slopes(pre_by, math.log)
    if not post or not pre:
        return _missing("Post-LN and Pre-LN update probes at two or more depths",
                        _want("amplification", placement="post"), _want("amplification", placement="pre"))
    i = paired_ci(post, pre)
    caveats = (_depth_caveats("Post-LN", post_runs, post_bad, post, CHANGE)
               + _depth_caveats("Pre-LN", pre_runs, pre_bad, pre, CHANGE)
               + _pairing_caveats("Post-LN", post, "Pre-LN", pre)
               + _linearity_caveats("Post-LN", post_runs) + _linearity_caveats("Pre-LN", pre_runs))
    return [Measurement("", i, f"exponent of N in ||dF||^2, Post-LN - Pre-LN, paired by seed: {_ci_text(i)} "
                        f"(Post-LN {_mean(post.values()):.2f}, Pre-LN {_mean(pre.values()):.2f})",
                        _update_setup(results, i.n, paired=True), tuple(caveats), used=tuple(post_runs + pre_runs),
                        unweighed=_unweighed("Post-LN", CHANGE, post_runs, _change)
                        + _unweighed("Pre-LN", CHANGE, pre_runs, _change), over="paired seeds")]


def _last_block(r: Result, stat: str, when: str) -> float | None:
    """ln of ``stat`` ("rms" | "max") of the residual stream after the last block, at the
    first ("init") or latest ("final") diagnostics step of a training run."""
    values = r.get(f"activation_{stat}_by_layer_{when}")
    if not _positive(values):  # (a run that failed later keeps its last finite statistics)
        return None
    return math.log(values[-1])


def _stream(stat: str, *when: str) -> Callable[[Result], list]:
    """A run's recorded ``stat`` profiles at the diagnostics steps ``when`` ("init",
    "final"), one list: what ``_last_block`` reads, for ``_unweighed``."""
    return lambda r: [v for w in when for v in (r.get(f"activation_{stat}_by_layer_{w}") or [])]


def _activation_caveats(runs: list[Result], kept: Iterable[int], name: str) -> list[str]:
    """The seeds of ``runs`` left out of an activation row (no finite statistics: the
    stream blew up before the diagnostics step), and the failed runs kept in."""
    kept = set(kept)
    out = []
    left = sorted({r["seed"] for r in runs} - kept)
    if left:
        out.append(f"{name}: seed{'s' if len(left) > 1 else ''} {_list(left)} left out: no finite activation "
                   "statistics (the stream overflowed)")
    bad = sorted(r["seed"] for r in runs if r["seed"] in kept and failed(r))
    if bad:
        out.append(f"{name}: seed{'s' if len(bad) > 1 else ''} {_list(bad)} failed (diverged, or no better than "
                   "the unigram baseline) and stay in, with their statistics at the last diagnostics step")
    return out


def _activation_runs(results: list[Result], placement: str) -> list[Result]:
    return [r for r in runs_of(results, "activations", placement=placement) if r.get("kind") == "train"]


def _activation_growth(placement: str, stat: str) -> Callable[[list[Result]], list[Measurement]]:
    """Per seed: ln(stat at the last diagnostics step / stat at step 0), last block."""

    def measure(results: list[Result]) -> list[Measurement]:
        runs = _activation_runs(results, placement)
        growth = {r["seed"]: _last_block(r, stat, "final") - _last_block(r, stat, "init") for r in runs
                  if _last_block(r, stat, "final") is not None and _last_block(r, stat, "init") is not None}
        if not growth:
            return _missing(f"{placement} training runs with activation statistics",
                            _want("activations", placement=placement))
        i = mean_ci(list(growth.values()))
        return [Measurement("", i, f"{placement}: ln({stat} of the last block's residual at the last diagnostics "
                            f"step / at step 0): {_ci_text(i)} (x{math.exp(i.estimate):.2f})", run_setup(runs, i.n),
                            tuple(_activation_caveats(runs, growth, placement)), used=tuple(runs),
                            unweighed=_unweighed(placement, f"the {stat} of the residual stream", runs,
                                                 _stream(stat, "init", "final")))]

    return measure


def _activation_gap(stat: str) -> Callable[[list[Result]], list[Measurement]]:
    """Per seed: ln(stat, Pre-LN) - ln(stat, Peri-LN) at the last diagnostics step, last block."""

    def measure(results: list[Result]) -> list[Measurement]:
        pre = {r["seed"]: _last_block(r, stat, "final") for r in _activation_runs(results, "pre")}
        peri = {r["seed"]: _last_block(r, stat, "final") for r in _activation_runs(results, "peri")}
        pre = {k: v for k, v in pre.items() if v is not None}
        peri = {k: v for k, v in peri.items() if v is not None}
        if not pre or not peri:
            return _missing("Pre-LN and Peri-LN training runs with activation statistics",
                            _want("activations", placement="pre"), _want("activations", placement="peri"))
        i = paired_ci(pre, peri)
        runs = _activation_runs(results, "pre") + _activation_runs(results, "peri")
        caveats = (_activation_caveats(_activation_runs(results, "pre"), pre, "Pre-LN")
                   + _activation_caveats(_activation_runs(results, "peri"), peri, "Peri-LN")
                   + _pairing_caveats("Pre-LN", pre, "Peri-LN", peri))
        return [Measurement("", i, f"ln({stat} of the last block's residual) Pre-LN - Peri-LN after training, "
                            f"paired by seed: {_ci_text(i)} (Pre-LN x{math.exp(i.estimate):.2f} Peri-LN's; Pre-LN "
                            f"{math.exp(_mean(pre.values())):.3g}, Peri-LN {math.exp(_mean(peri.values())):.3g})",
                            run_setup(runs, i.n), tuple(caveats), used=tuple(runs),
                            unweighed=_unweighed("Pre-LN", f"the {stat} of the residual stream after training",
                                                 _activation_runs(results, "pre"), _stream(stat, "final"))
                            + _unweighed("Peri-LN", f"the {stat} of the residual stream after training",
                                         _activation_runs(results, "peri"), _stream(stat, "final")),
                            over="paired seeds")]

    return measure


GNS_COVERAGE = ("normlab's per-example gradients cover LayerNorm and RMSNorm (torch's and normlab's, with a "
                "weight); DyT and ScaleNorm have no per-example path yet, and masked BatchNorm and PowerNorm mix "
                "the examples through batch statistics, so their per-example gradients are not separable: models "
                "with those norms get no norm-layer estimate")


def _gns_estimate(r: Result) -> bool:
    """Both noise scales recorded and > 0: a run records one only where its |G|^2
    estimate, summed over the diagnostics steps, came out positive (the unbiased estimate
    from two batch sizes can be negative when the noise swamps the signal)."""
    return all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) and r[k] > 0
               for k in ("gns_norms", "gns_total"))


def _gns_ratio(results: list[Result]) -> list[Measurement]:
    """Per configuration and seed: ln(B_simple from the norm layers / from every parameter)."""
    trained = [r for r in runs_of(results, "gns") if r.get("kind") == "train"]
    runs = [r for r in trained if not failed(r)]
    if not runs:
        if trained:
            return _missing(f"gns training runs with both estimates that learned: {_failed_text(trained)}. "
                            f"{GNS_COVERAGE}", _want("gns"))
        return _missing(f"gns training runs with both estimates. {GNS_COVERAGE}", _want("gns"))
    rows = []
    for norm in sorted({r["norm"] for r in trained}):
        every = [r for r in trained if r["norm"] == norm]
        mine = [r for r in runs if r["norm"] == norm]
        usable = [r for r in mine if _gns_estimate(r)]
        ratios = {r["seed"]: math.log(r["gns_norms"] / r["gns_total"]) for r in usable}
        i = mean_ci([ratios[s] for s in sorted(ratios)])
        dropped = [r for r in every if failed(r)]
        caveats = [f"{len(dropped)} of {len(every)} {norm} runs left out as failed: {_failed_text(dropped)} (a noise "
                   "scale of a model that did not learn measures nothing)"] if dropped else []
        blank = sorted(r["name"] for r in mine if not _gns_estimate(r))
        if blank:
            caveats.append(f"{len(blank)} of {len(every)} {norm} runs left out with no estimate of one of the noise "
                           f"scales that can be read (none recorded: the run's |G|^2 estimate, summed over the diagnostics steps, "
                           f"was not positive; or one recorded that is not finite and positive): {', '.join(blank)}")
        unweighed = _unweighed(norm, "a noise-scale estimate", mine,
                               lambda r: [v for v in (r.get("gns_norms"), r.get("gns_total")) if v is not None])
        diverged = [(r["seed"], r["n_layers"]) for r in dropped if _unweighable_loss(r)]
        if diverged:  # left out for a loss that is not finite, as the unselectable-keys row's runs
            unweighed += (f"{norm}: the noise scales of {_at(diverged)} (the run diverged: no finite loss)",)
        planned = Planned("norm", norm, (_want("gns", kind="train"),), rule="each")
        if not usable:
            why = (f"no {norm} run that learned has both noise-scale estimates" if mine
                   else f"every {norm} run failed: {_failed_text(every)}")
            rows.append(Measurement(f"@{norm}", i, f"{norm}: no estimate to compare. {GNS_COVERAGE}.",
                                    run_setup(every, 0), tuple(caveats), why, used=tuple(every),
                                    unweighed=unweighed, planned=planned))
            continue
        rows.append(Measurement(
            f"@{norm}", i, f"{norm}: B_simple from the norm layers {_mean(r['gns_norms'] for r in usable):.3g}, "
            f"from every parameter {_mean(r['gns_total'] for r in usable):.3g} (means over seeds); ln(norms / "
            f"total): {_ci_text(i)} (x{math.exp(i.estimate):.2f}). {GNS_COVERAGE}.", run_setup(every, i.n),
            tuple(caveats), used=tuple(every), unweighed=unweighed, planned=planned))
    return rows


def _failed_text(runs: list[Result]) -> str:
    """Why runs are left out as failed: how many diverged, and how many ended no better
    than the unigram baseline (byte frequencies alone)."""
    bad = [r for r in runs if failed(r)]
    diverged = sum(bool(r.get("diverged")) or not math.isfinite(r.get("final_val_loss") or math.nan) for r in bad)
    parts = [f"{len(bad) - diverged} of {len(runs)} ended with a validation loss no better than the unigram "
             "baseline's (train longer: --steps)"] if len(bad) > diverged else []
    if diverged:
        parts.append(f"{diverged} of {len(runs)} diverged")
    return "; ".join(parts)


def judged_error(r: Result, half: str = "test") -> float:
    """1 - the majority run's validation accuracy averaged over its evaluations during
    training, on one half of the fixed validation set (how fast it learned, lower is
    better); a failed run counts at chance (1 - 1/classes)."""
    chance = r.get("chance_accuracy", 0.0)
    if failed_on(r, half):
        return 1.0 - chance
    value = r.get(f"val_accuracy_mean_{half}")
    return 1.0 - chance if value is None or not math.isfinite(value) else 1.0 - value


ERROR_METRIC = "mean test accuracy error"  # what judged_error gives, for Best.metric


def _majority_runs(results: list[Result], norm: str) -> list[Result]:
    return [r for r in runs_of(results, "expressivity", norm=norm, task="majority") if r.get("kind") == "train"]


def _keys_runs(results: list[Result], norm: str) -> list[Result]:
    """The expressivity study's LM runs that test their attention inputs for selectability
    (tagged part "keys"; results without the tag: those that hold the measurement). A run
    that diverged has no measurement and is kept, so the rows name it as diverged rather
    than blame its partner seed for a missing pair."""
    return [r for r in runs_of(results, "expressivity", norm=norm, task="lm")
            if _tag(r, "part") == "keys" or r.get("unselectable_by_layer")]


def _majority_setup(runs: list[Result], judged: int | None = None) -> str:
    if not runs:
        return ""
    r0 = runs[0]
    cfg = r0.get("config", {})
    options = cfg.get("task_options") or {}
    return (f"here: majority of {cfg.get('seq_len', '?')} tokens over {options.get('classes', '?')} classes (ahead by "
            f">= {options.get('margin', '?')}), one Pre-LN encoder layer, d_model {r0.get('d_model')}, "
            f"{cfg.get('n_heads', '?')} head(s), FFN {cfg.get('d_ff', '?')}, no positions, the same norm before "
            f"attention, before the FFN and at the end, {r0['steps']} steps x {cfg.get('batch_size', '?')} "
            f"sequences, lr swept over {_list(f'{x:g}' for x in sorted({r['lr'] for r in runs}))}, "
            f"{_seeds_text(len({r['seed'] for r in runs}), judged, 'paired seeds')}")


def _majority_gap(other: str) -> Callable[[list[Result]], list[Measurement]]:
    """error(other) - error(LayerNorm), each at its own cross-fitted best lr, paired by seed;
    the error is 1 - the accuracy averaged over the run's evaluations."""

    def measure(results: list[Result]) -> list[Measurement]:
        ln, ot = _majority_runs(results, "layernorm"), _majority_runs(results, other)
        if not ln or not ot:
            return _missing(f"majority runs with LayerNorm and {other}",
                            *(_want("expressivity", norm=n, task="majority") for n in ("layernorm", other)))
        lrs = _lrs(ln, ot)
        bl = best_setting(ln, judged_error, ERROR_METRIC, lrs)
        bo = best_setting(ot, judged_error, ERROR_METRIC, lrs)
        m = compare_best(other, bo, ot, "LayerNorm", bl, ln, "", lambda n: _majority_setup(ln + ot, n),
                         statistic="error", unit="", floor="chance")
        final = {n: _mean(r["final_val_accuracy"] for r in rs if r["lr"] == b.setting[0]
                          and math.isfinite(r.get("final_val_accuracy", math.nan)))
                 for n, b, rs in (("layernorm", bl, ln), (other, bo, ot))}
        return [replace(m, detail=f"{m.detail}; mean accuracy over training LayerNorm "
                        f"{1 - _mean(bl.by_seed.values()):.3f}, {other} {1 - _mean(bo.by_seed.values()):.3f}; "
                        f"final accuracy at the best lr LayerNorm {final['layernorm']:.3f}, {other} "
                        f"{final[other]:.3f}")]

    return measure


KEYS_MARGIN = 0.01  # brody-scaling-selects-keys' margin: one key in a hundred
BESIDE = (("unselectable_causal_by_layer", "attention inputs against their causal prefix"),
          ("unselectable_heads_causal_by_layer", "each head's keys against their causal prefix"))


def _unselectable_mean(r: Result, key: str = "unselectable_by_layer") -> float | None:
    """The fraction of a run's attention inputs (``key``: of another of ``unselectable_keys``'
    measures) that are unselectable, averaged over its layers. A run counts unless it
    diverged: the geometry of what attention reads is measured whatever loss the run
    reached (a run no better than the unigram baseline still has keys)."""
    values = r.get(key)
    loss = r.get("final_val_loss")
    ok = not r.get("diverged") and loss is not None and math.isfinite(loss)
    return _mean(values) if values and ok else None


def _unweighable_loss(r: Result) -> bool:
    """A run that diverged or whose recorded final loss is not finite: ``_unselectable_mean``
    leaves it out."""
    loss = r.get("final_val_loss")
    return bool(r.get("diverged")) or (loss is not None and not math.isfinite(loss))


def _head_map(runs: list[Result]) -> str:
    """Each head's key map, d_model -> head_dim, from the runs' configuration."""
    cfg = runs[0].get("config", {}) if runs else {}
    d, h = runs[0].get("d_model") if runs else None, cfg.get("n_heads")
    return f"{d} -> {d // h}" if isinstance(d, int) and isinstance(h, int) and h > 0 else "d_model -> head_dim"


def _beside_keys(every: dict[str, list[Result]]) -> tuple[str, list[str]]:
    """The measures reported beside the judged one (``BESIDE``), no norm against LayerNorm
    paired by seed, and the caveats where they point against the claim."""
    parts, caveats, means, lacking = [], [], {}, set()
    runs = [r for rs in every.values() for r in rs]
    for key, what in BESIDE:
        lacking |= {r["name"] for r in runs if not r.get(key) and _unselectable_mean(r) is not None}
        values = {n: {r["seed"]: v for r in rs if (v := _unselectable_mean(r, key)) is not None}
                  for n, rs in every.items()}
        none, ln = values["none"], values["layernorm"]
        if not none or not ln:
            parts.append(f"{what}: not measured by these runs")
            continue
        i = paired_ci(none, ln)
        undetermined = max((max(r.get(key.replace("unselectable", "undetermined")) or [0.0])
                            for r in runs if r.get(key)), default=0.0)
        means[key] = (_mean(none.values()), _mean(ln.values()), i)
        parts.append(f"{what}: no norm {means[key][0]:.3f}, LayerNorm {means[key][1]:.3f}, difference "
                     f"{_ci_text(i)}, at most {undetermined:.3f} undetermined")
    if lacking:
        caveats.append(f"the measures beside the judged one are missing from {len(lacking)} of the runs it counts "
                       f"(results older than them): {_list(sorted(lacking))}")
    inputs = means.get("unselectable_causal_by_layer")
    if inputs and inputs[2].estimate <= KEYS_MARGIN:
        caveats.append(f"contrary evidence: decided against their causal prefix (key i against keys 0..i, all "
                       f"a query of these LMs compares it with), the attention inputs' gap is "
                       f"{inputs[2].estimate:+.3f}, within the margin {KEYS_MARGIN:g}: the whole-sequence test "
                       f"also counts inputs that are outside the hull of the inputs before them, which a causal "
                       f"query can still rank first")
    heads = means.get("unselectable_heads_causal_by_layer")
    if heads and heads[1] > KEYS_MARGIN:
        caveats.append(f"contrary evidence: LayerNorm's keys themselves are not all selectable: {heads[1]:.3f} of "
                       f"each head's keys against their causal prefix (no norm {heads[0]:.3f}, gap "
                       f"{heads[2].estimate:+.3f}): its scaling puts the attention inputs on a sphere, not the "
                       f"keys, which each head maps to fewer dimensions")
    return "; ".join(parts), caveats


def _unselectable_gap(results: list[Result]) -> list[Measurement]:
    """fraction of unselectable attention inputs without a norm - with LayerNorm, paired by
    seed (Brody et al.'s measurement: each input against its whole sequence); beside it,
    not judged, the inputs and each head's keys against their causal prefix."""
    every = {n: _keys_runs(results, n) for n in ("none", "layernorm")}
    values = {n: {r["seed"]: _unselectable_mean(r) for r in rs} for n, rs in every.items()}
    none, ln = ({k: v for k, v in values[n].items() if v is not None} for n in ("none", "layernorm"))
    if not none or not ln:
        return _missing("LM runs with and without LayerNorm that tested their attention inputs",
                        *(_want("expressivity", norm=n, task="lm") for n in ("none", "layernorm")))
    i = paired_ci(none, ln)
    runs = every["none"] + every["layernorm"]
    undetermined = max((max(r.get("undetermined_by_layer") or [0.0]) for r in runs), default=0.0)
    by_layer = [_mean(v) for v in zip(*(r["unselectable_by_layer"] for r in every["none"]
                                        if _unselectable_mean(r) is not None))]
    caveats = [c for n, name in (("none", "no norm"), ("layernorm", "LayerNorm"))
               for c in _left_out(name, (s for s, v in values[n].items() if v is None),
                                  "diverged (or no finite loss): its attention inputs are not measured")]
    caveats += _pairing_caveats("no norm", none, "LayerNorm", ln)
    caveats.append(f"judged: Brody et al.'s measurement as their code takes it, the attention inputs (d_model "
                   f"vectors, the norm's outputs) each against its whole sequence; not the keys (each head's key "
                   f"map, {_head_map(runs)}, is not injective), and not what a causal query sees (keys 0..i)")
    beside, contrary = _beside_keys(every)
    # a run left out for a loss that is not finite: its keys are evidence the row could not weigh
    unweighed = tuple(f"{name}: the attention inputs of {_at(blown)} (the run diverged: no finite loss)"
                      for n, name in (("none", "no norm"), ("layernorm", "LayerNorm"))
                      if (blown := [(r["seed"], r["n_layers"]) for r in every[n] if _unselectable_mean(r) is None
                                    and _unweighable_loss(r)]))
    return [Measurement("", i, f"unselectable attention inputs against their whole sequence (judged): no norm "
                        f"{_mean(none.values()):.3f} (by layer {', '.join(f'{v:.3f}' for v in by_layer)}), "
                        f"LayerNorm {_mean(ln.values()):.3f} (means over seeds); difference {_ci_text(i)}; at most "
                        f"{undetermined:.3f} of any layer's vectors were left undetermined. Beside it, not judged: "
                        f"{beside}", run_setup(runs, i.n), tuple(caveats + contrary), used=tuple(runs),
                        unweighed=unweighed, over="paired seeds")]


def _scaled_keys(results: list[Result]) -> list[Measurement]:
    """Sanity: the fraction of unselectable attention inputs behind LayerNorm and RMSNorm (0 by
    construction); each head's keys beside it."""
    rows = []
    for norm in ("layernorm", "rmsnorm"):
        runs = _keys_runs(results, norm)
        values = [v for r in runs if (v := _unselectable_mean(r)) is not None]
        if not values:
            continue
        heads = [v for r in runs if (v := _unselectable_mean(r, "unselectable_heads_causal_by_layer")) is not None]
        detail = (f"{norm}: the largest fraction of unselectable attention inputs over {len(values)} runs: "
                  f"{max(values):.4f} (scaling puts the norm's outputs on an ellipsoid, whose points are all "
                  f"vertices: 0 up to the test's tolerance)")
        caveats = ()
        if heads:
            detail += (f"; beside it, each head's keys against their causal prefix: {_mean(heads):.3f} "
                       f"unselectable (mean over {len(heads)} runs)")
            if max(heads) > KEYS_MARGIN:
                caveats = (f"this checks the test on the attention inputs only: {norm}'s keys are not all "
                           f"selectable ({_mean(heads):.3f} of each head's keys are unselectable against their "
                           f"causal prefix): the ellipsoid is the inputs', and each head's key map "
                           f"({_head_map(runs)}) puts some keys inside the others' hull",)
        rows.append(Measurement(f"@{norm}", Interval(max(values), min(values), max(values), len(values)),
                                detail, run_setup(runs), caveats, used=tuple(runs), over="min to max over the runs",
                                planned=Planned("norm", norm, tuple(_want("expressivity", norm=n, task="lm", part="keys")
                                                                    for n in ("layernorm", "rmsnorm")), rule="each")))
    return rows or _missing("LM runs with LayerNorm or RMSNorm that tested their attention inputs",
                            *(_want("expressivity", norm=n, task="lm") for n in ("layernorm", "rmsnorm")))


def _qk_runs(results: list[Result], group: str) -> list[Result]:
    return [r for r in runs_of(results, "qk-norm", group=group) if r.get("kind") == "train"]


def _qk_logits(results: list[Result]) -> list[Measurement]:
    """ln(largest attention logit during training) without - with QK-norm at the sweep's
    largest lr, paired by seed."""
    plain, qk = _qk_runs(results, "no qk-norm"), _qk_runs(results, "qk-norm")
    lrs = sorted({r["lr"] for r in plain} & {r["lr"] for r in qk})
    if not lrs:
        return _missing("qk-norm runs with and without QK-norm at a shared lr",
                        *(_want("qk-norm", group=g) for g in ("no qk-norm", "qk-norm")))

    def logs(runs: list[Result], lr: float) -> dict[int, float]:
        return {r["seed"]: math.log(r["attention_logit_max"]) for r in runs
                if r["lr"] == lr and _recorded(r.get("attention_logit_max"))}

    profile = "; ".join(f"lr {lr:g}: {math.exp(_mean(logs(plain, lr).values())):.3g} vs "
                        f"{math.exp(_mean(logs(qk, lr).values())):.3g}" for lr in lrs
                        if logs(plain, lr) and logs(qk, lr))
    top = lrs[-1]
    a, b = logs(plain, top), logs(qk, top)
    i = paired_ci(a, b)
    failures = {g: sum(failed(r) for r in rs if r["lr"] == top) for g, rs in (("without", plain), ("with", qk))}
    caveats = [c for name, rs, kept in (("no QK-norm", plain, a), ("QK-norm", qk, b))
               for blown in (False, True)
               for c in _left_out(name, {r["seed"] for r in rs if r["lr"] == top and r["seed"] not in kept
                                         and _blown(r.get("attention_logit_max")) == blown},
                                  f"its largest attention logit at lr {top:g} is not finite (named below)" if blown
                                  else f"no attention logit recorded at lr {top:g}")]
    caveats += _pairing_caveats("no QK-norm", a, "QK-norm", b)
    used = tuple(r for r in plain + qk if r["lr"] == top)
    # the sweep's largest lr is where the claim is judged: a larger one that only one side
    # finished moves the row down the sweep
    higher = sorted(lr for lr in {r["lr"] for r in plain + qk} if lr > top)
    above = (higher[-1], "; ".join(f"lr {lr:g} has no run {side} QK-norm" for lr in higher
                                   for side, rs in (("without", plain), ("with", qk))
                                   if all(r["lr"] != lr for r in rs))) if higher else None
    return [Measurement(f"@lr={top:g}", i, f"largest attention logit over training (geometric means over seeds), "
                        f"without vs with QK-norm: {profile}; at lr {top:g} ln(without / with) = {_ci_text(i)} "
                        f"(x{math.exp(i.estimate):.2f}); failed runs at lr {top:g}: {failures['without']} without, "
                        f"{failures['with']} with (their logits up to the last diagnostics step count)",
                        run_setup(plain + qk, i.n), tuple(caveats), used=used, lr=top,
                        planned=Planned("lr", top, tuple(_want("qk-norm", group=g) for g in ("no qk-norm", "qk-norm")),
                                        above=above),
                        unweighed=tuple(u for name, rs in (("no QK-norm", plain), ("QK-norm", qk))
                                        for u in _unweighed(name, f"the largest attention logit at lr {top:g}",
                                                            [r for r in rs if r["lr"] == top],
                                                            lambda r: r.get("attention_logit_max"))),
                        over="paired seeds")]


def _recorded(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _sensitivity(losses: list[float]) -> float:
    """The mean over the sweep of L(lr) - the best L of the sweep (Wortsman et al.'s
    E_lr[min(L(lr), L0) - L*], each loss already capped at the unigram baseline: a failed
    run counts there)."""
    return _mean(losses) - min(losses)


def _qk_sensitivity(results: list[Result]) -> list[Measurement]:
    plain, qk = _qk_runs(results, "no qk-norm"), _qk_runs(results, "qk-norm")
    if not plain or not qk:
        return _missing("qk-norm runs with and without QK-norm",
                        *(_want("qk-norm", group=g) for g in ("no qk-norm", "qk-norm")))
    # per seed, over the lrs both sides ran: a mean over two different sweeps (one side's
    # worst lr missing, because it raised or has not finished) would compare unlike things
    loss: dict[str, dict[int, dict[float, float]]] = {"without": defaultdict(dict), "with": defaultdict(dict)}
    fails: dict[str, dict[int, dict[float, bool]]] = {"without": defaultdict(dict), "with": defaultdict(dict)}
    for side, rs in (("without", plain), ("with", qk)):
        for r in rs:
            loss[side][r["seed"]][r["lr"]] = judged_loss(r)
            fails[side][r["seed"]][r["lr"]] = failed_on(r, "test")
    sweep = sorted({r["lr"] for r in plain + qk})
    a, b, short = {}, {}, []
    all_failed: dict[str, list[int]] = defaultdict(list)  # side -> seeds it failed at every shared lr
    lone: dict[tuple[float, str], list[int]] = defaultdict(list)  # (lr, the side without it) -> seeds
    for seed in sorted(set(loss["without"]) | set(loss["with"])):
        x, y = loss["without"].get(seed, {}), loss["with"].get(seed, {})
        shared = sorted(set(x) & set(y))
        for lr in sweep:
            if lr not in shared:
                lone[(lr, "without" if lr not in x else "with")].append(seed)
        if len(shared) < 2:
            short.append(seed)
            continue
        # a side that failed at every lr has every loss at the baseline (the cap): a
        # sensitivity of 0 by the cap, not by stability, so the seed has no defined value
        failed_sides = [side for side in ("without", "with") if all(fails[side][seed][lr] for lr in shared)]
        if failed_sides:
            all_failed[" and ".join(failed_sides)].append(seed)
            continue
        a[seed], b[seed] = _sensitivity([x[lr] for lr in shared]), _sensitivity([y[lr] for lr in shared])
    i = paired_ci(a, b)
    caveats = [f"lr {lr:g} left out for seed{'s' if len(seeds) > 1 else ''} {_list(seeds)}: no run {side} "
               f"QK-norm there; the sensitivity of {'those seeds' if len(seeds) > 1 else 'that seed'} is over the "
               "lrs both sides ran, a narrower sweep than planned" for (lr, side), seeds in sorted(lone.items())]
    caveats += _left_out("without - with QK-norm", short, "fewer than two lrs that both sides ran")
    for sides, seeds in sorted(all_failed.items()):
        caveats += _left_out("without - with QK-norm", seeds,
                             f"the runs {sides} QK-norm failed at every lr: each loss is the unigram baseline "
                             "(the cap), a sensitivity of 0 by the cap, not by stability")
    n_lrs = sorted({len(set(loss["without"][s]) & set(loss["with"][s])) for s in a})
    dropped = sum(len(v) for v in all_failed.values())
    note = None
    if dropped * 2 > dropped + len(a):  # most seeds: the row would stand on the few left
        note = ("most seeds failed at every lr on a side (" + "; ".join(
            f"seed{'s' if len(seeds) > 1 else ''} {_list(seeds)}: {sides} QK-norm"
            for sides, seeds in sorted(all_failed.items())) + "): no sensitivity is defined for them")
    elif not a:
        note = "no seed has two lrs that both sides ran"
    if not a:  # no seed measured: the row is its note (and caveats)
        detail = f"lr sensitivity over the sweep's {len(sweep)} lrs: no seed measured"
    else:
        over = (f"{len(sweep)} lrs" if n_lrs == [len(sweep)]
                else f"the lrs both sides ran ({_list(n_lrs)} of the sweep's {len(sweep)}, by seed)")
        detail = (f"lr sensitivity over {over}: without QK-norm {_mean(a.values()):.3f}, with "
                  f"{_mean(b.values()):.3f} nats; without - with = {_ci_text(i, ' nats')}")
    return [Measurement("", i, detail, run_setup(plain + qk, i.n), tuple(caveats), note,
                        used=tuple(plain + qk), over="paired seeds")]


def _qk_best(results: list[Result]) -> list[Measurement]:
    plain, qk = _qk_runs(results, "no qk-norm"), _qk_runs(results, "qk-norm")
    if not plain or not qk:
        return _missing("qk-norm runs with and without QK-norm",
                        *(_want("qk-norm", group=g) for g in ("no qk-norm", "qk-norm")))
    return [compare("QK-norm", qk, "no QK-norm", plain)]


# ------------------------------------------------------------------ the claims

XIONG = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture (ICML)"
XIONG_SETUP = ("paper: 6-layer Transformer-base translation (IWSLT14 De-En, WMT14 En-De) at initialization "
               "(Fig. 3); the theory for any depth")
XIONG_TRAIN = ("paper: 6-layer Transformer-base translation (IWSLT14 De-En, WMT14 En-De) and 12/24-layer BERT, "
               "trained to convergence, Adam(0.9, 0.98), warm-up then inverse-sqrt decay")
DEEPNET = "Wang et al. 2022, DeepNet: Scaling Transformers to 1,000 Layers"
DEEPNET_SETUP = ("paper: encoder-decoder translation models of 18 to 1,000 layers (d_model 512), WMT-17 "
                 "and OPUS-100, trained to convergence with warm-up and inverse-sqrt decay")
NORMS_NOTE = "every norm at Pre-LN placement, each at its own best lr"
BATCH_STATS_NOTE = ("a setup difference from a causal LM's usual norms, shared with the paper's language-model runs: "
                    "in training, batch normalization (normlab.MaskedBatchNorm) and PowerNorm during its warm-up "
                    "(its first warmup_iters steps, 100 by default) normalize each position with statistics over "
                    "every real position of the batch, so a position's training output depends on later tokens; "
                    "evaluation, on running statistics, is causal")
POWERNORM_NOTE = ("PowerNorm as the paper's Algorithm 2 after the authors' group scaling (each position divided by "
                  "its root mean square over one channel group per attention head: GroupScaling1D of their code, "
                  "described in the paper's appendix); their released code also divides the gradient by the batch's "
                  "psi after warm-up, where Algorithm 2 and normlab divide by the running psi. Its warm-up "
                  "(warmup_iters, 100 steps here, during which it divides by the batch's statistics) is not tied to "
                  "the lr warm-up as the authors' code ties it (8,000 updates on IWSLT): in quick, 100 of its 120 "
                  "training steps use batch statistics, so the running quadratic mean, the method's core, acts for 20")
MARGIN_SIGN = Margin(0.0, "a directional claim: the sign decides; an interval covering 0 is inconclusive")
MARGIN_RMSNORM_SPEED = Margin(round(math.log(1 / 0.93), 4), "the paper's smallest reduction in running time, "
                              "7%: a speed ratio of 1/0.93, ln 0.0726; a smaller gain does not reproduce its claim")
MARGIN_EQUIV = Margin(0.05, "0.05 nats is 2% of a final loss near 2.5 nats/byte, the smallest difference "
                      "we would call a change in quality at this scale; the one noise measurement made before "
                      "the presets were fixed (an unpaired seed SD of 0.012 nats over 3 seeds, LayerNorm, "
                      "d_model 64) is rough, and the paired interval carries the noise itself")

LIU = "Liu et al. 2020, Understanding the Difficulty of Training Transformers (EMNLP)"
LIU_SETUP = ("paper: 6- to 18-layer encoder-decoder translation models (WMT14 En-De, IWSLT14 De-En), the output "
             "change after an update at initialization (Fig. 5; Theorem 2 under simplifying assumptions)")
UPDATE_NOTE = ("DeepNet's bound on the update (Sec. 4) is derived for its encoder-decoder analysis, with its alpha "
               "and beta, under SGD-style assumptions")
PERI = "Kim et al. 2025, Peri-LN: Revisiting Normalization Layer in the Transformer Architecture (ICML)"
PERI_SETUP = ("paper: decoder-only LMs of 400M-3.2B parameters pre-trained on 30B tokens, the hidden states "
              "of each layer tracked through training")
WORTSMAN = ("Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training instabilities "
            "(ICLR 2024)")
DEHGHANI = "Dehghani et al. 2023, Scaling Vision Transformers to 22 Billion Parameters (ICML)"
WORTSMAN_SETUP = ("paper: Pre-LN decoder-only LMs from 9M to 1.2B parameters on C4, AdamW (betas 0.9, 0.95) with "
                  "gradient clipping at 1, independent weight decay 1e-4, a z-loss of 1e-4 and warm-up (5e3 of 1e5 "
                  "steps) then cosine decay, lr swept from 3e-4 to 3e-1 (Wortsman); these runs have Adam (0.9, 0.98) "
                  "without clipping, weight decay or z-loss, which bear on divergence at high lr; ViT models scaled "
                  "towards 22B, where logit growth appeared at about 8B parameters (Dehghani)")
BRODY = "Brody, Alon & Yahav 2023, On the Expressivity Role of LayerNorm in Transformers' Attention (Findings of ACL)"
BRODY_SETUP = ("paper: majority of 50 tokens over 20 classes (ahead by >= 6), one Pre-LN encoder layer, d 8, one "
               "head, FFN 8, no positions, LayerNorm (no affine) or its scaling alone before attention only, batch "
               "6000, Adam lr 1e-3, up to 1000 epochs of 80k sequences; unselectable points counted among the attention "
               "inputs (GPT-2's ln_1 outputs; the block inputs of a BERT without LayerNorm) of models trained with "
               "small hidden sizes (GPT-2 trained 50,000 steps with dropout 0.1), each over a whole passage: SQuAD "
               "passages of 768-1024 tokens for GPT-2 (Tables 1-2), SST-2 sentences of up to 128 tokens (Tables 3-4, "
               "where the BERT without LayerNorm is measured), in the hidden space (not per head, no causal "
               "restriction)")
GRAY = "Gray et al. 2024, Normalization Layer Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in Transformers (NeurIPS)"
GRAY_SETUP = ("paper: GPT-2-style models up to 111M parameters pre-trained on OpenWebText, the noise scale tracked "
              "through training")
def _log_n_slope(lo: int, hi: int) -> float:
    """The log-N law's effective exponent: the slope of ln ln N against ln N from lo to hi layers."""
    return math.log(math.log(hi) / math.log(lo)) / math.log(hi / lo)


LOG_SLOPE = _log_n_slope(6, 24)  # quick's amplification depths, where the margins were fixed
LOG_SLOPE_48 = _log_n_slope(6, 48)  # full's

CLAIMS: dict[str, Claim] = {c.id: c for c in [
    Claim("xiong-postln-grad-grows", "Post-LN's gradients at initialization grow toward the output", (XIONG,),
          "At initialization the gradient norm of the FFN weights W2 grows with the layer index in "
          "Post-LN (Fig. 3; Theorem 1: the last layer's is O(d sqrt(ln d)), independent of L).",
          "slope of ln |grad W2| against layer index, fitted per seed; mean over seeds", "directional",
          XIONG_SETUP, _grad_slope("post"), MARGIN_SIGN),
    Claim("xiong-preln-grad-flat", "Pre-LN's gradients at initialization stay flat across layers", (XIONG,),
          "In Pre-LN the gradient norm of W2 stays about the same across layers (Fig. 3), at "
          "O(d sqrt(ln d / L)) (Theorem 1).",
          "slope of ln |grad W2| against layer index, fitted per seed; mean over seeds", "equivalence",
          XIONG_SETUP, _grad_slope("pre"),
          Margin(0.04, "|slope| < 0.04 per layer is < x1.22 from first to last of 6 layers, the spread of "
                 "Xiong et al.'s Pre-LN curve in Fig. 3")),
    Claim("xiong-last-layer-larger", "Post-LN's last-layer gradient is larger than Pre-LN's", (XIONG,),
          "At initialization the last layer's W2 gradient is larger in Post-LN than in Pre-LN (Theorem 1; "
          "how the factor grows with depth is the next row).",
          "ln(last-layer |grad W2| Post-LN / Pre-LN), paired by seed", "directional", XIONG_SETUP,
          _last_layer_ratio, MARGIN_SIGN),
    Claim("xiong-ratio-grows-sqrt-depth", "Post-LN's last-layer gradient exceeds Pre-LN's by ~sqrt(L)", (XIONG,),
          "Theorem 1: at initialization, with high probability, the last layer's W2 gradient is bounded by "
          "O(d sqrt(ln d)) in Post-LN and by O(d sqrt(ln d / L)) in Pre-LN; the paper reads this as Post-LN's "
          "gradient scale staying the same for any L and Pre-LN's decreasing as L grows. The row tests the "
          "reading that both bounds are tight, so that the ratio grows like sqrt(L): an extension, since upper "
          "bounds alone leave faster decay possible.",
          "e - 0.5, e the slope of ln(last-layer |grad W2| Post-LN / Pre-LN) against ln L over the probe "
          "depths, fitted per seed", "equivalence", XIONG_SETUP, _ratio_growth,
          Margin(0.25, "halfway from the exponent 0.5 of tight bounds to the nearest simple alternatives: 0 (a "
                 "depth-independent ratio) and 1")),
    Claim("preln-stream-variance-linear", "Pre-LN's residual stream variance grows linearly with depth", (XIONG,),
          "Lemma 2: in Pre-LN at initialization (1 + l/2) d <= E||x_l||^2 <= (1 + 3l/2) d: the squared norm "
          "of the residual stream grows linearly in the number of blocks l (its RMS like sqrt(l)).",
          "e - 1, e the exponent of a per-seed fit ln(RMS_l^2 - RMS_1^2) = a + e ln(l - 1) over the blocks "
          "of the deepest Pre-LN probe", "equivalence", XIONG_SETUP, _residual_variance,
          Margin(0.25, "halfway from linear growth (e = 1) to the nearest simple alternatives, e = 0.5 "
                 "and e = 1.5")),
    Claim("postln-stream-normalized", "Post-LN's residual stream is a LayerNorm output", (XIONG,),
          "In Post-LN every block ends with a LayerNorm, so the stream's RMS is 1 at every depth.",
          "Post-LN residual RMS after each block (min to max)", "sanity", XIONG_SETUP, _postln_stream,
          Margin(0.0, "true by construction: shown as a check of the measurement, not judged")),
    Claim("init-depth-post", "Post-LN's last-layer gradient at init does not depend on depth", (XIONG,),
          "Theorem 1: at initialization, with high probability, the gradient of the last layer's W2 is bounded "
          "by O(d sqrt(ln d)) in Post-LN, a bound independent of the number of layers L, which the paper reads "
          "as a gradient scale that stays the same for any L (the row tests that reading: the bound alone "
          "would allow a gradient that shrinks with L).",
          "e, the exponent of L in the last-layer |grad W2| (slope of its log against ln L over the probe depths "
          "from 6 layers, named in the row: 6-48 in quick, to 96 in full), fitted per seed; mean over seeds", "equivalence", XIONG_SETUP, _init_depth("post", 0.0),
          Margin(0.25, "halfway from the exponent 0 of the paper's reading to Pre-LN's -0.5, the alternative the "
                 "theorem sets it against")),
    Claim("init-depth-pre", "Pre-LN's last-layer gradient at init shrinks like 1/sqrt(L)", (XIONG,),
          "Theorem 1: at initialization, with high probability, the gradient of the last layer's W2 is bounded "
          "by O(d sqrt(ln d / L)) in Pre-LN, which the paper reads as a gradient that decreases as L grows; "
          "the row tests that the bound is tight, a gradient shrinking like L^-0.5 (an extension: the bound "
          "alone would allow faster decay).",
          "e + 0.5, e the exponent of L in the last-layer |grad W2| over the probe depths from 6 layers (named in "
          "the row), fitted per seed",
          "equivalence", XIONG_SETUP, _init_depth("pre", -0.5),
          Margin(0.25, "halfway from the exponent -0.5 of a tight bound to the nearest simple alternatives, 0 "
                 "(depth-independent) and -1")),
    Claim("liu-postln-update-grows", "Post-LN amplifies a small update more with depth", (LIU,),
          "The change of a Post-LN model's output after an update at initialization grows with the "
          "number of layers N (Fig. 5; Theorem 2: Var[F(x, W) - F(x, W*)] = O(N)).",
          "slope of ln ||dF||^2 against ln N over the probe depths, fitted per seed; mean over seeds",
          "directional", LIU_SETUP, _update_exponent("post", math.log, 0.0, "ln N"), MARGIN_SIGN),
    Claim("liu-postln-update-linear-in-n", "Post-LN's output change grows like N", (LIU,),
          "Theorem 2: for Post-LN, Var[F(x, W) - F(x, W*)] = O(N): linear in the number of layers.",
          "slope of ln ||dF||^2 against ln N, minus 1, fitted per seed", "equivalence", LIU_SETUP,
          _update_exponent("post", math.log, 1.0, "ln N"),
          Margin(0.3, f"about halfway from the claimed exponent 1 to the log-N law's effective exponent at "
                 f"6-24 layers ({LOG_SLOPE:.2f}; {LOG_SLOPE_48:.2f} at 6-48, where full probes); N^2 would be 1 "
                 "away")),
    Claim("liu-preln-update-slower", "Pre-LN's output change grows more slowly with depth than Post-LN's", (LIU,),
          "Pre-LN's output change after an update grows like log N, Post-LN's like N (Theorem 2): "
          "Pre-LN's grows more slowly with depth.",
          "slope(Post-LN) - slope(Pre-LN) of ln ||dF||^2 against ln N, paired by seed", "directional",
          LIU_SETUP, _update_growth_gap, MARGIN_SIGN),
    Claim("liu-preln-update-log-n", "Pre-LN's output change grows like log N", (LIU,),
          "Theorem 2: for Pre-LN, Var[F(x, W) - F(x, W*)] = O(log N).",
          "slope of ln ||dF||^2 against ln ln N, minus 1, fitted per seed", "equivalence", LIU_SETUP,
          _update_exponent("pre", lambda n: math.log(math.log(n)), 1.0, "ln ln N"),
          Margin(0.7, "halfway from the claimed 1 to linear growth in N, whose slope against ln ln N is "
                 f"{1 / LOG_SLOPE:.2f} at 6-24 layers ({1 / LOG_SLOPE_48:.2f} at 6-48)")),
    Claim("deepnet-update-bounded", "DeepNorm keeps the model update bounded as depth grows", (DEEPNET,),
          "DeepNorm's alpha and beta bound the model update by a constant independent of the depth N "
          "(Sec. 4), where Post-LN's grows with N.",
          "slope of ln ||dF||^2 against ln N for DeepNorm, fitted per seed; mean over seeds", "equivalence",
          DEEPNET_SETUP + "; " + UPDATE_NOTE,
          _update_exponent("deepnorm", math.log, 0.0, "ln N"),
          Margin(0.2, f"half the log-N law's effective exponent at 6-24 layers ({LOG_SLOPE:.2f}; "
                 f"{LOG_SLOPE_48:.2f} at 6-48): a bounded update is told apart from Pre-LN's claimed slow growth")),
    Claim("preln-activations-grow", "Pre-LN's residual stream grows large during training", (PERI,),
          "In Pre-LN the hidden states' magnitude grows during training, up to massive activations, because "
          "every sublayer adds its unnormalized output to the stream (Sec. 3-4, the hidden-state norms by "
          "layer through training).",
          "ln(max |x| of the last block's residual at the last diagnostics step / at step 0), per seed; "
          "mean over seeds", "directional", PERI_SETUP, _activation_growth("pre", "max"), MARGIN_SIGN),
    Claim("peri-bounds-max-activations", "Peri-LN keeps the largest activations smaller than Pre-LN", (PERI,),
          "Normalizing each sublayer's output as well as its input (Peri-LN) keeps the hidden states' "
          "growth moderate where Pre-LN's explodes.",
          "ln(max |x| of the last block's residual) Pre-LN - Peri-LN after training, paired by seed",
          "directional", PERI_SETUP, _activation_gap("max"), MARGIN_SIGN),
    Claim("peri-bounds-rms", "Peri-LN keeps the residual stream's scale smaller than Pre-LN", (PERI,),
          "Peri-LN keeps the variance of the hidden states bounded across layers and training, Pre-LN's "
          "grows.",
          "ln(RMS of the last block's residual) Pre-LN - Peri-LN after training, paired by seed",
          "directional", PERI_SETUP, _activation_gap("rms"), MARGIN_SIGN),
    Claim("gray-norm-gns-matches-total", "The norm layers' per-example gradients give the model's noise scale",
          (GRAY,),
          "The gradient noise scale B_simple estimated from the normalization layers' per-example gradients "
          "alone predicts the whole model's, which then needs no per-example gradients of the other layers.",
          "ln(B_simple from the norm layers' per-example gradients / from every parameter's), each summed over "
          "the diagnostics steps of a run before dividing, per seed; mean over seeds", "equivalence",
          GRAY_SETUP, _gns_ratio,
          Margin(math.log(2), "within a factor of 2: the GNS picks a batch size, and a factor of 2 is the "
                 "step of a batch-size sweep")),
    Claim("brody-projection-majority", "LayerNorm's projection helps attention compute majority", (BRODY,),
          "LayerNorm projects its input onto the hyperplane orthogonal to [1, ..., 1]; a query orthogonal to "
          "that hyperplane's image attends to all keys equally, so attention after LayerNorm computes "
          "functions such as majority without having to learn that query: with projection, a small model "
          "learns majority faster and better than with scaling alone (Sec. 3.1, 4.1, Fig. 2-3).",
          "error(RMSNorm) - error(LayerNorm), error = 1 - validation accuracy averaged over the evaluations "
          "during training, each at its own cross-fitted best lr, paired by seed", "directional",
          BRODY_SETUP, _majority_gap("rmsnorm"), MARGIN_SIGN),
    Claim("brody-norm-majority", "A LayerNorm before narrow attention helps compute majority", (BRODY,),
          "Both components help the attention that follows LayerNorm (Sec. 3), so a small model with LayerNorm "
          "should learn majority faster and better than the same model without it. The paper's majority runs "
          "(Sec. 4.1, Fig. 2-3) compare LayerNorm with projection against its scaling alone (the authors' "
          "scripts for those figures run only these two); a model with no norm at all is this study's "
          "addition, so this row extends the paper's claim rather than repeating one of its runs.",
          "error(no norm) - error(LayerNorm), as above", "directional", BRODY_SETUP, _majority_gap("none"),
          MARGIN_SIGN),
    Claim("brody-scaling-selects-keys", "Without LayerNorm's scaling, some attention inputs are unselectable",
          (BRODY,),
          "A key inside the convex hull of the other keys can never receive the highest attention score; "
          "LayerNorm's scaling puts every attention input on a sphere, so none is unselectable, where without "
          "it a fraction are (Sec. 3.2, 4.2, Tables 1-2). The paper and its code count the attention inputs "
          "(GPT-2's ln_1 outputs) over whole sequences; the sphere is the inputs', not each head's keys, a "
          "non-injective linear map of them.",
          "fraction of attention inputs (the norm's outputs; the stream without a norm) inside the convex hull "
          "of their whole sequence's others, without a norm - with LayerNorm, averaged over layers, paired by "
          "seed; each head's keys and the causal prefix are reported beside it, not judged",
          "directional", BRODY_SETUP, _unselectable_gap,
          Margin(KEYS_MARGIN, "one key in a hundred: fewer would not limit what attention can select in practice")),
    Claim("brody-scaled-keys-selectable", "Attention inputs behind LayerNorm and RMSNorm are all selectable",
          (BRODY,),
          "Scaling every vector to the same norm leaves no attention input inside the hull of the others "
          "(Sec. 3.2); it says nothing of each head's keys.",
          "the largest fraction of unselectable attention inputs over the LM runs with each scaling norm",
          "sanity",
          BRODY_SETUP, _scaled_keys, Margin(0.0, "true by construction: shown as a check of the measurement, "
                                                  "not judged")),
    Claim("wortsman-qk-norm-bounds-logits", "QK-norm stops the attention logits from growing at high lr",
          (WORTSMAN, DEHGHANI),
          "At high learning rates the attention logits grow until the softmax collapses to one-hot and "
          "training diverges (attention logit growth); a LayerNorm on the queries and keys (qk-layernorm) "
          "prevents it (Dehghani et al., QK normalization; Wortsman et al. Sec. 3.1, Fig. 3-4).",
          "ln(largest attention logit at any diagnostics step) without - with QK-norm at the sweep's largest "
          "lr, paired by seed", "directional", WORTSMAN_SETUP, _qk_logits, MARGIN_SIGN),
    Claim("wortsman-qk-norm-lr-sensitivity", "QK-norm makes the loss less sensitive to the learning rate",
          (WORTSMAN,),
          "qk-layernorm reduces LR sensitivity, E_lr[min(L(lr), L0) - L*] over a log-spaced sweep, "
          "so the loss stays good over a wider range of learning rates (Sec. 3.1, Fig. 1-2).",
          "LR sensitivity (mean over the sweep of L(lr) - its best L, losses capped at the unigram baseline) "
          "without - with QK-norm, per seed, paired by seed", "directional", WORTSMAN_SETUP, _qk_sensitivity,
          MARGIN_SIGN),
    Claim("wortsman-qk-norm-keeps-best-loss", "QK-norm costs nothing at the best learning rate", (WORTSMAN,),
          "With qk-layernorm the loss at the optimal learning rate is about the same as without it: the gain "
          "is in stability, not in the best loss (Sec. 3.1, Fig. 1). The row tests the half of this that a "
          "non-inferiority test can: that QK-norm's best-lr loss is no worse than without it by more than the "
          "margin. 'About the same' would also rule out QK-norm being better by more than the margin, which "
          "this test lets pass; a row whose whole interval lies below minus the margin says so in a caveat.",
          "L(QK-norm) - L(no QK-norm), each at its own cross-fitted best lr, paired by seed; non-inferiority: "
          "agrees when the interval lies below the margin", "noninferiority",
          WORTSMAN_SETUP, _qk_best, MARGIN_EQUIV),
    Claim("postln-needs-warmup", "Post-LN needs learning-rate warm-up; Pre-LN does not", (XIONG,),
          "Post-LN needs a learning-rate warm-up stage: without it, it trains much worse or not at all; "
          "Pre-LN trains without warm-up (Sec. 3.2 and 4).",
          "[L(Post-LN, no warm-up) - L(Post-LN, warm-up)] - [same for Pre-LN], paired by seed, at each lr",
          "directional", XIONG_TRAIN, _warmup_each_lr, MARGIN_SIGN),
    Claim("postln-needs-warmup-best-lr", "Post-LN needs warm-up, at each configuration's best lr", (XIONG,),
          "The same claim when every configuration has its own tuned learning rate: warm-up still "
          "buys Post-LN more than it buys Pre-LN.",
          "the warm-up interaction above, each of the four configurations at its own best lr",
          "directional", XIONG_TRAIN, _warmup_best, MARGIN_SIGN),
    Claim("preln-without-warmup", "Dropping warm-up costs Pre-LN nothing", (XIONG,),
          "Pre-LN without the warm-up stage reaches results comparable to the baselines with it (Sec. 4; "
          "the paper's baselines are Post-LN models with warm-up: here the reference is Pre-LN with warm-up). "
          "The row asks whether Pre-LN without warm-up is no worse than with it by more than the margin "
          "(non-inferiority), not whether the two are comparable: being better by more than the margin passes "
          "this test, and a row whose whole interval lies below minus the margin says so in a caveat.",
          "L(Pre-LN, no warm-up) - L(Pre-LN, warm-up), each at its best lr, paired by seed; non-inferiority: "
          "agrees when the interval lies below the margin",
          "noninferiority", XIONG_TRAIN, _preln_without_warmup, MARGIN_EQUIV),
    Claim("deepnorm-beats-postln", "DeepNorm trains deep stacks better than Post-LN", (DEEPNET,),
          "DeepNorm (x_{l+1} = LN(alpha x_l + G(x_l)), weights scaled by beta at init) keeps deep "
          "Post-LN-style models trainable and better than Post-LN at depth.",
          "L(Post-LN) - L(DeepNorm) at the deepest depth, each at its own best lr, paired by seed",
          "directional", DEEPNET_SETUP, _deepnorm_beats("post"), MARGIN_SIGN),
    Claim("deepnorm-beats-preln", "DeepNorm outperforms Pre-LN at depth", (DEEPNET,),
          "DeepNorm combines Post-LN's performance with Pre-LN's stability: deep DeepNet models "
          "outperform Pre-LN models of the same depth.",
          "L(Pre-LN) - L(DeepNorm) at the deepest depth, each at its own best lr, paired by seed",
          "directional", DEEPNET_SETUP, _deepnorm_beats("pre"), MARGIN_SIGN),
    Claim("deepnorm-stability", "DeepNorm is stable where Post-LN is not", (DEEPNET,),
          "DeepNorm bounds the model update, so deep models train stably at learning rates where "
          "Post-LN diverges.",
          "runs that failed to train (diverged, or ended no better than the unigram baseline) over the lr "
          "sweep per seed, Post-LN minus DeepNorm, paired by seed",
          "directional", DEEPNET_SETUP, _deepnorm_stability, MARGIN_SIGN),
    Claim("rmsnorm-matches-layernorm", "RMSNorm matches LayerNorm's quality",
          ("Zhang & Sennrich 2019, Root Mean Square Layer Normalization (NeurIPS)",),
          "Dropping re-centering costs nothing: RMSNorm achieves performance comparable to LayerNorm.",
          "L(RMSNorm) - L(LayerNorm), each at its own best lr, paired by seed", "equivalence",
          "paper: RNN/Transformer translation, reading comprehension, image-caption retrieval, "
          "CIFAR-10; trained to convergence; " + NORMS_NOTE,
          _norm_difference("rmsnorm", "layernorm"), MARGIN_EQUIV),
    Claim("rmsnorm-faster", "RMSNorm is faster than LayerNorm",
          ("Zhang & Sennrich 2019, Root Mean Square Layer Normalization (NeurIPS)",),
          "RMSNorm reduces running time by 7%-64% over LayerNorm across models.",
          "ln(tokens/s of the RMSNorm model / the LayerNorm model) per interleaved timing round, "
          "mean over rounds", "directional",
          "paper: the models above, in their TensorFlow/Theano implementations on GPUs",
          _rmsnorm_speed, MARGIN_RMSNORM_SPEED),
    Claim("dyt-matches-layernorm", "Dynamic Tanh replaces LayerNorm without loss",
          ("Zhu et al. 2025, Transformers without Normalization (CVPR)",),
          "Replacing every norm with DyT(x) = gamma * tanh(alpha x) + beta matches or exceeds the "
          "normalized model, with mostly the default alpha0 and the baseline's hyperparameters.",
          "L(DyT) - L(LayerNorm), DyT at its best (lr, alpha0) and LayerNorm at its best lr, paired by seed",
          "noninferiority",
          "paper: ViT, ConvNeXt, DiT, LLaMA 7B-70B, wav2vec, DNA models; trained to convergence "
          "with tuned recipes; alpha0 tuned for LLMs; " + NORMS_NOTE,
          _norm_difference("dyt", "layernorm"), MARGIN_EQUIV),
    Claim("powernorm-beats-batchnorm", "PowerNorm fixes batch normalization for transformers",
          ("Shen et al. 2020, PowerNorm: Rethinking Batch Normalization in Transformers (ICML)",),
          "Batch statistics fluctuate in NLP batches; PowerNorm (a running quadratic mean, no mean "
          "subtraction) trains clearly better than batch normalization.",
          "L(BatchNorm) - L(PowerNorm), each at its own best lr, paired by seed", "directional",
          "paper: Transformer-base/big translation (IWSLT14, WMT14) and language modeling (PTB, "
          "WikiText-103), trained to convergence; " + NORMS_NOTE + "; " + POWERNORM_NOTE + "; " + BATCH_STATS_NOTE,
          _negated(_norm_difference("powernorm", "batchnorm")), MARGIN_SIGN),
    Claim("powernorm-beats-layernorm", "PowerNorm outperforms LayerNorm",
          ("Shen et al. 2020, PowerNorm: Rethinking Batch Normalization in Transformers (ICML)",),
          "PowerNorm outperforms LayerNorm (e.g. +0.4/+0.6 BLEU on IWSLT14/WMT14, lower perplexity "
          "on PTB and WikiText-103).",
          "L(LayerNorm) - L(PowerNorm), each at its own best lr, paired by seed", "directional",
          "paper: Transformer-base/big translation (IWSLT14, WMT14) and language modeling (PTB, "
          "WikiText-103), trained to convergence; " + NORMS_NOTE + "; " + POWERNORM_NOTE + "; " + BATCH_STATS_NOTE,
          _negated(_norm_difference("powernorm", "layernorm")), MARGIN_SIGN),
]}


def _cell(r: Result) -> str:
    """A run's configuration apart from its seed and its setting (lr, alpha0): the cell a
    planned run would have filled."""
    tags = {k: v for k, v in r.get("tags", {}).items() if k not in ("lr", "alpha0")}
    return json.dumps([r.get(k) for k in ("kind", "task", "placement", "norm", "n_layers", "d_model", "warmup_steps")]
                      + [tags], sort_keys=True, default=str)


def _missing_caveats(m: Measurement, missing: list[Result], results: list[Result] = ()) -> list[str]:
    """The planned runs that left no result and that ``m`` would have read: those of the
    configurations it read (at its lr, for a row judged at one), or of the selections a
    row with nothing to read needed. The planned seeds: those of the runs it read, of the
    missing ones, and of the finished runs of those selections (a row that could use none
    of them still planned their seeds)."""
    if not missing:
        return []
    cells = {_cell(r) for r in m.used}

    def reads(r: Result) -> bool:
        return ((_cell(r) in cells and (m.lr is None or r.get("lr") == m.lr))
                or any(runs_of([r], study, **dict(match)) for study, match in m.wanted))

    hit = [r for r in missing if reads(r)]
    if not hit:
        return []
    planned = ({r["seed"] for r in m.used} | {r["seed"] for r in hit}
               | {r["seed"] for r in results if "seed" in r and reads(r)})
    lacking = {r["seed"] for r in hit}
    return [f"{len(lacking)} of {len(planned)} planned seeds lack a run this row reads ({names_by_why(hit)})"]


def names_by_why(missing: list[Result]) -> str:
    """Missing runs' names, by why they are missing: "raised: a, b; not finished: c"."""
    by_why: dict[str, list[str]] = defaultdict(list)
    for r in missing:
        by_why[r["missing"]].append(r["name"])
    return "; ".join(f"{why}: {', '.join(sorted(ns))}" for why, ns in sorted(by_why.items()))


def _value_text(field: str, value: float | str) -> str:
    return str(value) if field == "norm" else f"lr {value:g}" if field == "lr" else f"{value:g} layers"


def _planned_of(p: Planned, missing: list[Result]) -> list[Result]:
    """The missing runs among ``p``'s selections, with a value of its field."""
    return [r for r in missing if isinstance(r.get(p.field), str if p.field == "norm" else (int, float))
            and any(runs_of([r], study, **dict(match)) for study, match in p.among)]


def _moved_caveats(m: Measurement, missing: list[Result]) -> list[str]:
    """A row whose lr or depth was chosen from the runs that finished, judged away from
    the planned one: which it is, and the planned runs there that left no result."""
    p = m.planned
    if p is None or p.rule != "largest":
        return []
    lacking = [r for r in _planned_of(p, missing) if r[p.field] != p.value]
    values = {r[p.field] for r in lacking} | ({p.above[0]} if p.above else set())
    if p.prefer is not None and (p.value == p.prefer or p.prefer in values):
        target = p.prefer
    else:
        target = max(values | {p.value})
    if target == p.value:
        return []
    lo, hi = sorted((p.value, target))
    named = [r for r in lacking if lo <= r[p.field] <= hi]
    why = [p.above[1]] if p.above and p.above[0] == target else []
    if named:
        at = _list(_value_text(p.field, v) for v in sorted({r[p.field] for r in named}))
        why.append(f"the planned runs at {at} left no result ({names_by_why(named)})")
    return [f"judged at {_value_text(p.field, p.value)}, not at the planned {_value_text(p.field, target)}: "
            + "; ".join(why)]


def _unjudged_rows(ms: list[Measurement], missing: list[Result]) -> list[Measurement]:
    """For a claim with a row per planned value (``Planned.rule`` "each"): a row for each
    planned value with no row, inconclusive, which names the planned runs there that left
    no result."""
    each = [m.planned for m in ms if m.planned is not None and m.planned.rule == "each"]
    if not each:
        return []
    p, judged = each[0], {q.value for q in each}
    out = []
    for value in sorted({r[p.field] for r in _planned_of(p, missing)} - judged):
        text = _value_text(p.field, value)
        if p.field == "norm":  # a row per norm: none of the norm's planned runs left a result
            suffix, detail, undetermined = (f"@{value}", f"{text}: not measured: none of its planned runs finished.",
                                            f"the planned {text} runs left no result")
        else:
            suffix = f"@lr={value:g}" if p.field == "lr" else f"@L{value:g}"
            detail = (f"{text}: not measured: the runs there that finished do not cover every configuration the "
                      "row compares.")
            undetermined = f"planned runs at {text} left no result"
        out.append(Measurement(suffix, Interval(math.nan, math.nan, math.nan, 0), detail,
                               undetermined=undetermined,
                               wanted=tuple((study, tuple(sorted({**dict(match), p.field: value}.items())))
                                            for study, match in p.among),
                               planned=replace(p, value=value)))
    return out


def _equal_units_caveat(i: Interval, unit: str) -> str:
    """Why a row of equal units is judged as it is (``stats.verdict``'s rule)."""
    head = f"every {unit} gave the same value ({i.estimate:+g}): the t-interval has no width"
    if i.n < SIGN_TEST_MIN_N:
        return (f"{head}, and the sign test's distribution-free interval for the median reaches 95% only from "
                f"{SIGN_TEST_MIN_N} {unit}s (over {i.n}, at most {sign_test_coverage(i.n):.1%}): inconclusive")
    return (f"{head}; judged by the sign test's 95% interval for the median, [{i.estimate:+g}, {i.estimate:+g}] "
            f"(coverage {sign_test_coverage(i.n):.1%} over {i.n} {unit}s)")


# an infinite value (an overflow) counted as a finite value beyond any a run records (its
# measurements are float32, finite up to 3.4e38; the square of this one is still a finite
# float64), to see whether leaving it out decides a row (``judge``)
STAND_IN = 1e150


def _with_stand_ins(value: Any, key: str = "") -> Any:
    """``value`` (a result, or one of its fields) with every infinite number replaced by
    +-``STAND_IN``; nan, every other value, and the losses (``key`` naming one: whether
    a run failed is the failure rule's to say, an infinite loss included) as they are."""
    if "loss" in key:
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isinf(value):
        return math.copysign(STAND_IN, float(value))
    if type(value) is dict:
        return {k: _with_stand_ins(v, k if isinstance(k, str) else "") for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_with_stand_ins(v) for v in value)
    return value


def _unweighed_caveat(unweighed: tuple[str, ...], outcome: str, counted: str | None) -> str:
    """What a row that left out values that are not finite (``Measurement.unweighed``)
    reads with them counted at +-``STAND_IN`` (``counted``: that verdict; None where they
    cannot be counted: nan, a value not > 0 under a log, a run that diverged; "moved"
    where, counted, the row is measured elsewhere: another depth or lr), and so whether
    its verdict (``outcome``, on the values that remain) stands."""
    head = ("left out as not finite (or not > 0 where the statistic takes its log): " + "; ".join(unweighed)
            + ". A blown-up value is the most extreme of its kind and may be what decides the claim")
    if counted == "moved":
        return head + f"; counted at +-{STAND_IN:g} they move the row to another depth or lr, so the row is " \
                      f"inconclusive (the values that remain read {outcome})"
    if counted is None:
        return head + f"; it cannot be counted at a stand-in value, so the row is inconclusive (the values that " \
                      f"remain read {outcome})"
    if counted == outcome:
        return head + f"; counted at +-{STAND_IN:g} instead, the row reads the same ({outcome}), so the verdict stands"
    return head + f"; the values that remain read {outcome}, counted at +-{STAND_IN:g} it reads {counted}: " \
                  "inconclusive"


def _beyond_caveat(i: Interval, margin: float) -> str:
    """A non-inferiority row whose whole interval lies beyond the margin on the favourable side."""
    return (f"better by more than the margin: the whole interval [{bound_text(i.lo, margin)}, "
            f"{bound_text(i.hi, margin)}] lies below "
            f"-{margin:g}, more than a claim that the two are about the same; the non-inferiority test asks only "
            f"that it be no worse by more than {margin:g}, so this row does not test 'about the same'")


def missing_runs(specs: Iterable[RunSpec], finished: Iterable[str], raised: Iterable[str] = ()) -> list[Result]:
    """The planned runs (``specs``) that left no result, as records for ``judge_all``: the
    fields claims select runs by (name, kind, task, placement, norm, layers, width, lr,
    warm-up, seed, tags) and ``missing``: "raised" for those in ``raised``, else "not
    finished". A judged row names those it would have read, so a seed that is missing
    shows as missing, not as a smaller n."""
    specs = list(specs)
    planned = {spec.name for spec in specs}
    finished, raised = set(finished), set(raised)
    for name in sorted((finished | raised) - planned):
        raise ValueError(f"missing_runs: not a planned run: {name!r}")
    out = []
    for spec in specs:
        if spec.name in finished:
            continue
        why = "raised" if spec.name in raised else "not finished"
        try:
            from normlab.studies.train import result_fields

            out.append({**result_fields(spec), "missing": why})
        except (TypeError, ValueError):  # settings the model refuses (what the run raised for): as written
            out.append({"name": spec.name, "kind": spec.kind, "task": spec.task,
                        **{k: spec.model.get(k) for k in ("placement", "norm", "n_layers", "d_model")},
                        "lr": spec.lr, "warmup_steps": spec.warmup_steps, "seed": spec.seed, "steps": spec.steps,
                        "tags": spec.tags, "missing": why})
    return out


def _name_unreadable(m: Measurement, results: list[Result]) -> Measurement:
    """A row not measured though the runs it reads finished (every value they hold not
    finite, or not > 0 where its log is taken: a stream or probe that overflowed) names
    them: they are evidence, not absent."""
    if m.interval.n or not m.wanted or m.used:
        return m
    runs = {r.get("name", "?"): r for study, match in m.wanted for r in runs_of(results, study, **dict(match))}
    if not runs:
        return m
    blown = sorted(name for name, r in runs.items() if _non_finite(r))

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:8]) + (f", and {len(xs) - 8} more" if len(xs) > 8 else "")
    if blown:
        return replace(m, detail=m.detail + f"; {len(blown)} run(s) it would read finished with values not finite "
                       f"({names(blown)}): left out as the statistic cannot weigh them, which leaves it nothing")
    return replace(m, detail=m.detail + f"; {len(runs)} run(s) it would read finished ({names(sorted(runs))}) "
                   "with nothing it can weigh: values not > 0 where the statistic takes its log, not recorded, or "
                   "short of what it needs")


def _non_finite(value: Any, key: str = "") -> bool:
    """A result (or one of its fields) holding a number that is not finite, its losses
    aside (whether a run failed is the failure rule's to say)."""
    if "loss" in key:
        return False
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return not math.isfinite(value)
    if type(value) is dict:
        return any(_non_finite(v, k if isinstance(k, str) else "") for k, v in value.items())
    if type(value) in (list, tuple):
        return any(_non_finite(v) for v in value)
    return False


def judge(claim: Claim, results: list[Result], margin: Margin | None = None,
          missing: Iterable[Result] = ()) -> list[dict[str, Any]]:
    """The claims.json rows of ``claim`` on ``results``, judged against ``margin``
    (default: the claim's own); ``missing``: the planned runs that left no result
    (``missing_runs``), named in the rows that would have read them."""
    margin = margin or claim.margin
    missing = list(missing)
    for r in missing:
        if not r.get("missing") or "name" not in r or "seed" not in r:
            raise ValueError(f"judge: a missing run needs its name, seed and why it is missing (missing_runs "
                             f"builds them), got {r!r}")
    token = _JUDGED_MARGIN.set(None if claim.test == "sanity" else margin.value)
    try:
        return _judge_rows(claim, margin, results, missing)
    finally:
        _JUDGED_MARGIN.reset(token)


def _judge_rows(claim: Claim, margin: Margin, results: list[Result], missing: list[Result]) -> list[dict[str, Any]]:
    """``judge``'s rows (``_JUDGED_MARGIN`` set to the claim's margin)."""
    rows = []
    measured = claim.measure(results)
    counted: dict[str, Measurement] | None = None  # the measurements with infinite values at +-STAND_IN
    unjudged = _unjudged_rows(measured, missing)
    if unjudged:  # in order of the planned values
        measured = sorted(measured + unjudged, key=lambda m: (m.planned is None, m.planned.value if m.planned else 0))
    for m in measured:
        m = replace(m, caveats=m.caveats + tuple(_missing_caveats(m, missing, results))
                    + tuple(_moved_caveats(m, missing)))
        m = _name_unreadable(m, results)
        overridden = None  # why the row is inconclusive whatever its interval says
        if claim.test == "sanity":
            outcome = "sanity"
            ci = m.interval.ci95  # (None for a bound that was not measured)
            kind = m.over or "min to max"
            interval = f"{kind} (not a confidence interval)"
        else:
            outcome = "inconclusive" if m.undetermined else verdict(claim.test, m.interval, margin.value)
            if m.unweighed:  # values left out as not finite: the verdict stands only if they do not decide it
                if counted is None:
                    counted = {x.suffix: x for x in claim.measure([_with_stand_ins(r) for r in results])}
                alt = counted.get(m.suffix)
                alt_outcome = ("moved" if alt is None else None if alt.unweighed
                               else "inconclusive" if alt.undetermined
                               else verdict(claim.test, alt.interval, margin.value))
                m = replace(m, caveats=m.caveats + (_unweighed_caveat(m.unweighed, outcome, alt_outcome),))
                if alt_outcome != outcome:
                    overridden, outcome = "values left out as not finite would decide it (its caveat)", "inconclusive"
            if outcome == "inconclusive" and verdict(claim.test, m.interval, margin.value) != "inconclusive":
                overridden = m.undetermined or overridden
            else:
                overridden = None
            if claim.test == "equivalence" and outcome == "agrees" and (m.interval.lo > 0 or m.interval.hi < 0):
                m = replace(m, caveats=m.caveats + (
                    f"the interval excludes 0, the claim's own value: within the margin of {margin.value:g}, "
                    "not at the value",))
            if claim.test == "noninferiority" and outcome == "agrees" and m.interval.hi < -margin.value:
                m = replace(m, caveats=m.caveats + (_beyond_caveat(m.interval, margin.value),))
            timing = claim.id == "rmsnorm-faster"
            if degenerate(m.interval):
                m = replace(m, caveats=m.caveats + (_equal_units_caveat(m.interval, "round" if timing else "seed"),))
            ci = m.interval.ci95
            kind = m.over or "seeds"
            interval = (f"95% Student-t over {kind}" if kind != JACKKNIFE_OVER
                        else f"95% delete-one-seed jackknife (t, n - 1 df) over {kind.split(',')[0]}" if m.interval.n != 2
                        # (two seeds: the wider of the jackknife's and the t-interval, ``cross_fitted_ci``)
                        else f"95%, the wider of the delete-one-seed jackknife and Student-t intervals over "
                             f"{kind.split(',')[0]} (two seeds)")
        rows.append({
            "id": claim.id + m.suffix,
            "claim": claim.id,
            "title": claim.title,
            "papers": list(claim.papers),
            "statement": claim.statement,
            "statistic": claim.statistic,
            "test": claim.test,
            "margin": margin.value,
            "margin_why": margin.why,
            "estimate": m.interval.estimate if math.isfinite(m.interval.estimate) else None,
            "ci95": ci,
            "n_seeds": m.interval.n,
            "interval": interval,
            "interval_kind": "min to max" if claim.test == "sanity" else kind,
            "verdict": outcome,
            # an interval wholly on one side of the margin, read inconclusive all the same: why
            "inconclusive_why": overridden,
            "scope": "; ".join(x for x in (m.setup, claim.paper_setup) if x),
            "measured": m.detail + ((". " if not m.detail.rstrip().endswith(".") else " ")
                                    + f"Inconclusive by construction: {m.undetermined}." if m.undetermined else ""),
            "caveats": list(m.caveats),
        })
    return rows


def judge_all(claim_ids: Iterable[str], results: list[Result], margins: dict[str, Margin] | None = None,
              missing: Iterable[Result] = ()) -> list[dict[str, Any]]:
    """Every row of every named claim, in order; ``missing`` as for ``judge``."""
    margins = margins or {}
    claim_ids, missing = list(claim_ids), list(missing)
    unknown = [cid for cid in claim_ids if cid not in CLAIMS]
    if unknown:
        raise ValueError(f"judge_all: unknown claim(s) {', '.join(map(repr, unknown))}; known: {', '.join(CLAIMS)}")
    return [row for cid in claim_ids for row in judge(CLAIMS[cid], results, margins.get(cid), missing)]
