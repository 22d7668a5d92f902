"""On-device measurement during calibration: what the profile's per-op prices cannot see.

Where it sits in the data flow: phase 6 of :mod:`.pipeline`, after the levels are selected
(:mod:`.selection`) and again once the package IR is built, and only where the package's device is this
machine (:func:`runs_here`). The profile prices each op alone; in a compiled network the device fuses runs
of one precision and pays for the conversions between them, so calibration times real graphs here:

* :func:`check_fastest`: the selected fastest level against uniform mixes (keeps whichever runs fastest);
* :func:`refine_fast_route`: ops of the fast route this device runs as fast at FP32, put back where that
  measurably lowers the disagreement with FP32;
* :func:`fastest_route`: which level the escalation cascade's fast route runs (the level that times fastest);
* :func:`time_bodies`: every level body and the cascade, compiled as ``compile_model`` deploys them, into
  the manifest (a measurement outranks a prediction when the runtime picks a body).

Every timing is 1 thread, LATENCY hint, f32 hint, rounds interleaved over the graphs compared (the
machine drifts; alternate rounds see the same drift).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from apsq_ov.bodies import split_constant_route, standalone_bodies
from apsq_ov.package import LEVEL_STATE, NEVER, TAU_STATE, Level, Manifest, OpChoice, OpRecord
from apsq_ov.precision import Precision
from apsq_ov.profiles import DeviceProfile
from apsq_ov.routing import choose_body

from .levels import builds_from_nncf, level_body
from .selection import OpCost, options

REFINE_TOLERANCE = 0.02
"""How much slower than the fastest level (median, 1 thread, in both halves of an interleaved timing) a fast
route with some ops back at FP32 may run and still count as free (:func:`refine_fast_route`); also how much
faster another mix must time to replace the selected fastest level (:func:`check_fastest`)."""
REFINE_ALPHA = 0.05
"""The one-sided Wilcoxon signed-rank p-value the refined fast route's per-sample gain on the held-out split
must reach (a gain within the noise keeps the fastest level as selected)."""


@dataclass(frozen=True)
class Routes:
    """The models every level body is cut from (:func:`~.levels.level_body`): the FP32 graph, NNCF's INT8
    model (``None``: no INT8 variants), NNCF's INT4-weight model (``None``: no INT4), and the precisions
    each routable op offers."""

    fp32: ov.Model
    int8: ov.Model | None
    int4: ov.Model | None
    variants: dict[str, tuple[Precision, ...]]

    def body(
        self, choices: dict[str, OpChoice], name: str, extra: list[ov.Node]
    ) -> tuple[ov.Model, dict[str, ov.Output]]:
        """The graph of the mix ``choices`` and each routed op's pre-quantization input in it
        (:func:`~.levels.level_body`)."""
        return level_body(self.fp32, self.int8, self.variants, choices, name, extra, self.int4)

    def from_nncf(self, choices: dict[str, OpChoice]) -> bool:
        """Whether the body of ``choices`` is cut from NNCF's INT8 graph (:func:`~.levels.builds_from_nncf`)."""
        return builds_from_nncf(self.fp32, self.int8, self.variants, choices, self.int4)


def time_bodies(model: ov.Model, manifest: Manifest, x: list[np.ndarray], runs: int = 40) -> bool:
    """Time every level body and the cascade at both ends (never / always escalate) on this device as
    ``compile_model`` deploys them — each compiled on its own (:func:`~apsq_ov.bodies.standalone_bodies`,
    a constant route split off), 1 thread, median of ``runs`` interleaved — and record them in the
    manifest (a measurement outranks the profile's prediction when the runtime picks a body). A body that
    only runs through the dispatch is timed there. Timed inside the dispatch instead, each body paid its
    depth in the ``If`` tree: on Fashion-MNIST the cascade (one ``If`` deep) read faster than the level it
    runs (0.180 vs 0.188 ms), so ``auto`` served 0.01–0.4 with it; compiled on their own the level runs
    0.142 ms, the cascade 0.155 ms. :return: whether the default changed."""

    bodies = standalone_bodies(model, manifest)
    setups: list[tuple[ov.Model, dict[str, np.ndarray]]] = []
    for k in range(len(manifest.levels)):
        body = bodies.get(k)
        setups.append((split_constant_route(body)[0], {}) if body is not None
                      else (model, {LEVEL_STATE: np.array(k, np.int32)}))  # fmt: skip
    cascade = manifest.cascade_level
    if cascade is not None:
        for t in (NEVER, -NEVER):
            tau = {TAU_STATE: np.array(t, np.float32)}
            setups.append((bodies[cascade], tau) if cascade in bodies
                          else (model, {LEVEL_STATE: np.array(cascade, np.int32)} | tau))  # fmt: skip
    ms = time_states(setups, x, runs)
    before = manifest.default_level
    levels = manifest.levels
    manifest.levels = [replace(lv, measured_ms=ms[k]) for k, lv in enumerate(levels)]
    if manifest.router is not None:
        never, always = ms[len(levels)], ms[len(levels) + 1]
        r = manifest.router
        r.cost["measured_fast_ms"] = ms[r.fast_level]
        r.cost["measured_never_ms"] = never
        r.cost["measured_always_ms"] = always
        r.cost["measured_router_ms"] = never - ms[r.fast_level]
        r.points = [replace(p, measured_ms=never + p.escalation * (always - never)) for p in r.points]
    return choose_body(manifest, manifest.default_max_drop).level != before


def time_states(setups: list[tuple[ov.Model, dict[str, np.ndarray]]], x: list[np.ndarray], runs: int) -> list[float]:
    """Median ms on ``x`` of each (model, state setup) — one request each, each model compiled once (1
    thread, LATENCY hint, f32 hint); ``runs`` rounds interleaved over the setups after a warm-up."""
    return [float(np.median(t)) for t in time_runs(setups, x, runs)]


def time_runs(
    setups: list[tuple[ov.Model, dict[str, np.ndarray]]],
    x: list[np.ndarray],
    runs: int,
    extra: list[list[np.ndarray]] | None = None,
) -> list[list[float]]:
    """Every round's ms of :func:`time_states`, per setup, in order (``extra``: per setup, inputs fed after
    ``x``)."""
    cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
    core = ov.Core()
    compiled: dict[int, ov.CompiledModel] = {}
    requests = []
    inputs = [x + (extra[k] if extra else []) for k in range(len(setups))]
    for k, (model, setup) in enumerate(setups):
        if id(model) not in compiled:
            compiled[id(model)] = core.compile_model(model, "CPU", cfg)
        req = compiled[id(model)].create_infer_request()
        state = {s.name: s for s in req.query_state()}
        for name, value in setup.items():
            state[name].state = ov.Tensor(value)
        for _ in range(5):
            req.infer(inputs[k])
        requests.append(req)
    times: list[list[float]] = [[] for _ in setups]
    for _ in range(runs):
        for k, req in enumerate(requests):
            t0 = time.perf_counter()
            req.infer(inputs[k])
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def time_mixes(mixes: list[dict[str, OpChoice]], routes: Routes, x: list[np.ndarray], runs: int) -> list[list[float]]:
    """Every round's ms (:func:`time_runs`) of each mix compiled as a model of its own, as the runtime
    deploys a level (:func:`level_body`, its constant route output split off; routed ops at their calibrated
    limits). Timed as levels of one package IR instead, each paid its depth in the ``If`` tree: on PP-OCRv4
    rec every other mix read 2.5-6% slower than the one at the top, whose body ran 8.5 ms alone and 12.0
    ms there."""

    models: list[tuple[ov.Model, dict[str, np.ndarray]]] = []
    extra: list[list[np.ndarray]] = []
    for k, mix in enumerate(mixes):
        routed = any(c.routed for c in mix.values())
        esc = [ops.parameter([], np.float32, name="escalate")] if routed else []
        body, _ = routes.body(mix, f"apsq/mix/{k}", esc)
        models.append((split_constant_route(body)[0], {}))
        extra.append([np.array(1.0, np.float32)] if routed else [])
    return time_runs(models, x, runs, extra)


def runs_here(device: str, profile: DeviceProfile) -> bool:
    """Is the package's target device this machine's (so on-device timing is meaningful)?"""
    base = device.split(".")[0].upper()
    return base in ("CPU", "AUTO") and profile.device.upper() == "CPU"


def check_fastest(
    level: Level,
    floor: Level,
    costs: list[OpCost],
    profile: DeviceProfile,
    routes: Routes,
    x: list[np.ndarray],
    runs: int = 60,
) -> tuple[Level, dict]:
    """Time the selected fastest ``level`` against uniform mixes — every op at its coarsest static
    candidate, and every op at each lower precision it offers — never more precise than ``floor`` (the
    previous level), each compiled on its own (:func:`time_mixes`), median of ``runs`` interleaved, 1 thread;
    return the fastest (the selected level unless another is faster by more than :data:`REFINE_TOLERANCE`:
    on PP-OCRv4 rec all-INT8 timed 0.02% faster than the selection, which kept its depthwise stem conv FP32
    and reads closer to FP32) and what was measured."""
    candidates: dict[str, dict[str, OpChoice]] = {"selected": dict(level.choices)}
    statics = {op.name: [o.choice.fast for o in options(op, profile) if not o.choice.routed] for op in costs}
    coarsest = {n: max(ps, key=lambda p: p.rank) for n, ps in statics.items()}
    candidates["coarsest"] = {n: OpChoice(p, p) for n, p in coarsest.items()}
    # Uniform mixes over what each op *offers* (not only what the profile predicts faster): a measurement
    # on the device outranks the per-op cost model (on EfficientNet-Lite0 the profile puts two depthwise
    # convs at bf16, yet the all-INT8 graph is the fastest here).
    offered = {op.name: op.offered for op in costs}
    for q in sorted({p for ps in offered.values() for p in ps} - {Precision.FP32}, key=lambda p: p.rank):
        mix = {}
        for n in statics:
            pick = q if q in offered[n] and q.rank >= floor.choices[n].fast.rank else coarsest[n]
            mix[n] = OpChoice(pick, pick)
        candidates[f"every op {q.value} where offered"] = mix
    unique: dict[str, dict[str, OpChoice]] = {}
    for name, mix in candidates.items():
        if mix not in unique.values():
            unique[name] = mix
    if len(unique) == 1:
        return level, {"measured": False, "reason": "no other uniform mix to compare"}
    names = list(unique)
    timed = time_mixes([unique[n] for n in names], routes, x, runs)
    ms = {n: float(np.median(t)) for n, t in zip(names, timed, strict=True)}
    best = min(ms, key=lambda n: ms[n])
    if ms[best] >= ms["selected"] * (1.0 - REFINE_TOLERANCE):  # within the noise: the selection's mix stays
        best = "selected"
    report: dict[str, object] = {"measured": True, "median_ms": ms, "runs": runs, "kept": best,
                                 "tolerance": REFINE_TOLERANCE}  # fmt: skip
    if best == "selected":
        return level, report
    mix = unique[best]
    pred = sum(profile.latency_ms(op.type, mix[op.name].fast, op.macs) for op in costs)
    drop = sum(0.0 if mix[op.name].fast is Precision.FP32 else float(np.mean(op.harm[mix[op.name].fast]))
               for op in costs)  # fmt: skip
    return Level(level.max_drop, mix, pred, drop, f"{level.solver}; measured on this device: {best} was faster"), report


def refine_fast_route(
    levels: list[Level],
    records: list[OpRecord],
    costs: list[OpCost],
    producers: Mapping[str, set[str | None]],
    profile: DeviceProfile,
    routes: Routes,
    x: list[np.ndarray],
    losses: Callable[[Mapping[str, OpChoice]], np.ndarray],
    runs: int = 80,
    width: int = 8,
    steps: int = 6,
) -> tuple[list[Level], dict]:
    """Put back at FP32 the lowered ops of the fastest level that this device runs as fast at FP32, where
    that measurably helps: the profile prices each op alone, but in the compiled network an op at FP32 can
    cost nothing: with NNCF's ``ignored_scope`` (which :func:`level_body` emulates for mostly-INT8 levels)
    PP-OCRv4 rec's stem convs, its second conv alone, or one MatMul at FP32 timed 0.97-1.03x all-INT8.

    Forward greedy, from the fastest level: each step takes the ops on a precision boundary — those that
    take a model input, feed no routable op, or exchange a tensor (``producers``, :func:`routable_producers`)
    with an op at FP32 — the ``width`` of them with the most predicted drop (their sensitivity score's, from
    the scoring split) per profile ms saved. It times each added to the ops kept so far against the fastest
    level (each compiled on its own, :func:`time_mixes`; 1 thread, ``runs`` rounds interleaved). Of those
    within :data:`REFINE_TOLERANCE` of it in both halves of the rounds, it keeps the one that most lowers the
    per-sample disagreement with FP32 on the even samples of the held-out split. The ops kept are then tested
    on the odd samples, which chose nothing: kept if the disagreement is lower there, one-sided Wilcoxon
    signed-rank p < :data:`REFINE_ALPHA`. They stay FP32 in every level (more budget still never adds
    precision), and each changed level's drop is measured again.

    :return: the levels and what was measured (``manifest.selection["fast_route_refinement"]``).
    """
    from scipy.stats import wilcoxon

    fast = levels[-1].choices
    by_name = {c.name: c for c in costs}
    predicted = {r.name: float(r.sensitivity.get("predicted", {}).get(fast[r.name].fast.value, 0.0))
                 for r in records if r.name in fast}  # fmt: skip

    def saved_ms(name: str, p: Precision) -> float:
        c = by_name[name]
        return profile.latency_ms(c.type, Precision.FP32, c.macs) - profile.latency_ms(c.type, p, c.macs)

    consumers: dict[str | None, set[str]] = {}
    for b, sources in producers.items():
        for a in sources:
            consumers.setdefault(a, set()).add(b)

    def boundary(lowered: set[str]) -> list[str]:
        edge = [n for n in lowered
                if any(a is None or a not in lowered for a in producers.get(n, {None}))
                or not consumers.get(n) or any(b not in lowered for b in consumers[n])]  # fmt: skip
        return sorted(edge, key=lambda n: (-predicted.get(n, 0.0) / max(saved_ms(n, fast[n].fast), 1e-6), n))

    base = losses(fast)
    select, test = np.arange(len(base)) % 2 == 0, np.arange(len(base)) % 2 == 1
    kept: list[str] = []
    best = base
    trail: list[dict[str, Any]] = []
    for _ in range(steps):
        lowered = {n for n, c in fast.items() if c.fast is not Precision.FP32} - set(kept)
        candidates = boundary(lowered)[:width]
        if not candidates:
            break
        mixes = [dict(fast)] + [keep_fp32(fast, {*kept, n}) for n in candidates]
        times = time_mixes(mixes, routes, x, runs)
        halves = [[float(np.median(t[h::2])) for t in times] for h in (0, 1)]  # alternate rounds: same drift
        free = [k for k in range(1, len(mixes)) if all(h[k] <= h[0] * (1.0 + REFINE_TOLERANCE) for h in halves)]
        step: dict[str, Any] = {"candidates": candidates, "median_ms": [float(np.median(t)) for t in times],
                                "median_ms_halves": halves, "free": [candidates[k - 1] for k in free]}  # fmt: skip
        trail.append(step)
        if not free:
            break
        measured = {k: losses(mixes[k]) for k in free}
        k = min(free, key=lambda k: (float(np.mean(measured[k][select])), k))
        if np.mean(measured[k][select]) >= np.mean(best[select]):
            step["reason"] = "no free op lowers the disagreement on the selection half"
            break
        kept.append(candidates[k - 1])
        best = measured[k]
        step["kept"] = candidates[k - 1]
    report: dict[str, Any] = {"measured": True, "tolerance": REFINE_TOLERANCE, "runs": runs, "steps": trail,
                              "kept_fp32": [], "alpha": REFINE_ALPHA}  # fmt: skip
    if not kept:
        return levels, report | {"reason": "no op timed as fast at FP32 and lowered the disagreement"}
    gain = (base - best)[test]
    p = float(wilcoxon(gain, alternative="greater").pvalue) if np.any(gain != 0) else 1.0
    report |= {"tried": kept, "drop_before": float(np.mean(base)), "drop_after": float(np.mean(best)),
               "test_drop_before": float(np.mean(base[test])), "test_drop_after": float(np.mean(best[test])),
               "p_value": p}  # fmt: skip
    if not (np.mean(gain) > 0 and p < REFINE_ALPHA):
        return levels, report | {"reason": "the gain on the test half is within the noise"}
    keep = set(kept)
    out = []
    for lv in levels:
        choices = keep_fp32(lv.choices, keep)
        changed = [n for n in kept if lv.choices[n].fast is not Precision.FP32]
        if choices == lv.choices:
            out.append(lv)
            continue
        ms = sum(saved_ms(n, lv.choices[n].fast) for n in changed)
        harm = sum(float(np.mean(by_name[n].harm[lv.choices[n].fast])) for n in changed)
        drop = float(np.mean(best)) if lv is levels[-1] else float(np.mean(losses(choices)))
        out.append(replace(lv, choices=choices, predicted_ms=lv.predicted_ms + ms,
                           predicted_drop=max(lv.predicted_drop - harm, 0.0), measured_drop=drop,
                           solver=f"{lv.solver}; {len(changed)} ops kept FP32 (as fast on this device)"))  # fmt: skip
    return out, report | {"kept_fp32": kept}


def fastest_route(levels: list[Level], routes: Routes, x: list[np.ndarray], runs: int = 40) -> tuple[int, dict]:
    """The level the escalation cascade's fast route runs. The timing winner is the last level (the fastest
    mix the profile predicts, checked by :func:`check_fastest` and refined by :func:`refine_fast_route`)
    unless a level of a smaller budget times faster on this device — by more than :data:`REFINE_TOLERANCE`
    in both halves of the rounds — then the fastest of those. Of the levels timing within the tolerance of
    the winner in both halves (a tie on this device), the one with the lowest ``measured_drop`` runs: the
    cascade escalates what its fast route gets wrong, so a tie goes to the route that gets less wrong.
    Every distinct mix of levels 1.. is compiled on its own (:func:`time_mixes`), ``runs`` rounds
    interleaved, 1 thread.

    On EfficientNet-Lite0 (AVX2 EPYC) the all-INT8 level timed 8.245 ms and the mix 0.16 8.327 ms, 1% apart,
    while dropping 15.1% against 12.8% held-out (82.8% against 85.2% on fresh crops); with the timing alone
    the cascade ran the all-INT8 level and the mix 0.16 dominated it.

    A smaller budget lowers fewer ops, yet its graph can run faster: on PP-OCRv4 rec level 0.08 (21 of 43
    ops INT8, cut from the FP32 model) timed 10.2 ms and flipped 2.5% of the positions, the last level (38
    INT8, cut from NNCF's graph with its FakeQuantizes on adds and pools) 12.1 ms and 5.2%; the cascade,
    fitted on the last level, paid both. :return: the level index and what was measured
    (``manifest.selection["fast_route"]``)."""
    last = len(levels) - 1
    # Each level's first level with the same choices: one graph is timed once.
    first = {k: next(j for j in range(1, k + 1) if levels[j].choices == levels[k].choices) for k in range(1, last + 1)}
    timed = sorted(set(first.values()))
    if len(timed) < 2:
        return last, {"measured": False, "reason": "no other level to compare", "level": last}
    times = time_mixes([dict(levels[j].choices) for j in timed], routes, x, runs)
    halves = {j: [float(np.median(t[h::2])) for h in (0, 1)] for j, t in zip(timed, times, strict=True)}
    ref = halves[first[last]]
    faster = [j for j in timed if all(halves[j][h] < ref[h] * (1.0 - REFINE_TOLERANCE) for h in (0, 1))]
    timing = min(faster, key=lambda j: max(halves[j])) if faster else first[last]
    tied = [j for j in timed if all(halves[j][h] <= halves[timing][h] * (1.0 + REFINE_TOLERANCE) for h in (0, 1))]
    winner = timing
    if all(levels[j].measured_drop is not None for j in tied):  # of a tie, the route that gets less wrong
        winner = min(tied, key=lambda j: (levels[j].measured_drop, j != timing))
    largest = {j: max(k for k, g in first.items() if g == j) for j in timed}  # of levels sharing a graph
    pick = largest[winner]
    report = {"measured": True, "runs": runs, "tolerance": REFINE_TOLERANCE, "level": pick,
              "timing_winner": largest[timing], "tied": [largest[j] for j in tied],
              "median_ms": {f"{levels[j].max_drop:g}": float(np.median(t)) for j, t in zip(timed, times, strict=True)},
              "median_ms_halves": {f"{levels[j].max_drop:g}": halves[j] for j in timed}}  # fmt: skip
    return pick, report


def keep_fp32(choices: Mapping[str, OpChoice], keep: set[str]) -> dict[str, OpChoice]:
    """``choices`` with the ops in ``keep`` static FP32; a run of ops sharing one If that loses an op to
    ``keep`` is split (each op left of it routes in its own If: a shared If needs an unbroken run)."""
    broken = {c.shared_with for n, c in choices.items() if c.shared_with and (n in keep or c.shared_with in keep)}
    fp32 = OpChoice(Precision.FP32, Precision.FP32)
    return {n: fp32 if n in keep else replace(c, shared_with=None) if c.shared_with in broken else c
            for n, c in choices.items()}  # fmt: skip
