"""Hardware-aware precision selection: which variant each op runs at each level of the dial, and
which ops are worth routing per input at all.

Where it sits in the data flow: after the isolated drops are measured (``calibrate.pipeline``),
before the package IR is built (:func:`calibrate.levels.build_package_model`). Inputs: per op its
measured per-sample harm of each lower variant (top-1 disagreement with FP32 when only that op is
lowered, on the held-out split), which held-out inputs leave its calibrated INT8 range, its size
(MACs, bytes an ``If`` copies) and the device profile's cost model.

The problem, per level with drop budget ``B`` (a multiple-choice knapsack, solved exactly as an
integer linear program with :func:`scipy.optimize.milp`, as HAWQ-V3 did for the static case)::

    minimise   Σ_i Σ_o  latency(i, o) · x[i, o]          (expected latency over the calibration inputs)
    subject to Σ_o x[i, o] = 1                          (one option per op)
               Σ_i Σ_o drop(i, o) · x[i, o] ≤ B         (isolated drops assumed additive)
               Σ_i Σ_o latency(i, o) · x[i, o] ≤ L      (only with --latency-budget)
               x[i, o] = 0 for options more precise than the op's option at the previous level
               x binary
    (+ Σ_(a,b) t(a, b) · y[a, b] in the objective, y[a, b] ≥ X_a[p] − X_b[p] for every precision p:
     adjacent ops a → b running different precisions pay one conversion pass over the tensor between them)

The isolated drops do not add up: the inputs one op flips are mostly the low-margin ones every op flips
(on EfficientNet-Lite0 the isolated INT8 top-1 drops of its 50 ops sum to 0.78, the all-INT8 model
disagrees with FP32 on 0.09 of the held-out crops). So each level between 0 and 1 is *fitted*: the ILP is
solved at ``B × s`` and the solution's joint drop measured on the held-out split (every op at its choice
together), bisecting on ``log s`` for the fastest solution whose measured drop is at most ``B`` — beyond
the additive solution with 90% confidence (its Clopper-Pearson upper bound; a mix picked because its drop
measured low on a few hundred samples is optimistic) — (:func:`_fit_level`; ``s`` below 1 where drops compound).

Options of an op: *static* at each precision the profile runs faster than fp32 (and fp32), or
*routed*: INT8 unless the input leaves the calibrated INT8 range, then a safer variant ``s``. A
routed option's latency is ``(1-e)·lat(int8) + e·lat(s) + route_ms`` with ``e`` the fraction of
calibration inputs escalated, its drop ``mean(escalated ? harm_s : harm_int8)`` per sample. An op
whose choice never changes over the calibration inputs (``e`` is 0 or 1) gets no routed option: it
is compiled statically. Precisions the profile shows no gain for are never options (never chosen
for speed). Level budget 0 is FP32 everywhere; budget 1 is each op's fastest variant, static.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from apsq_ov.package import Level, OpChoice
from apsq_ov.precision import Precision
from apsq_ov.profiles import DeviceProfile

from .router import CONFIDENCE, upper_bound

OBJECTIVE = (
    "per level: minimise the sum over ops of expected latency (profile cost model at each op's MACs, plus "
    "route_ms for routed ops, weighted by the calibration inputs' escalation rate) plus one conversion pass "
    "per precision change between adjacent ops, subject to the sum of measured isolated held-out drops <= "
    "the level's max_drop x s (and <= --latency-budget when given); exact ILP (scipy.optimize.milp), s "
    "bisected so the level's joint drop measured on the held-out split is <= max_drop (beyond s = 1: its "
    "90% Clopper-Pearson upper bound); each level "
    "may only lower ops relative to the previous level; the max_drop 1 level is checked by timing on the "
    "target device when it is this machine"
)


SAME_SPEED = 0.05
"""Relative latency difference below which two precisions count as equally fast (profile noise)."""


@dataclass(frozen=True)
class OpCost:
    """What the selection knows about one op."""

    name: str
    type: str
    macs: float
    io_bytes: float
    offered: tuple[Precision, ...]
    harm: Mapping[Precision, np.ndarray]
    """per-sample harm of each lower precision (only this op lowered), on the held-out split"""
    escalated: np.ndarray | None = None
    """per held-out sample: the op input leaves the calibrated INT8 range (None: no INT8 variant)"""
    out_bytes: float = 0.0
    """bytes of the op's output (fp32): what a precision change to the next op converts"""


@dataclass(frozen=True)
class Option:
    choice: OpChoice
    latency_ms: float
    drop: float
    escalation: float = 0.0


def options(op: OpCost, profile: DeviceProfile) -> list[Option]:
    """Every option the selection may pick for ``op`` (fp32 static first)."""
    lat = {p: profile.latency_ms(op.type, p, op.macs) for p in op.offered}
    # A coarser precision is a candidate only if it is not slower than any more precise one (beyond
    # SAME_SPEED, the profile's noise): on a device without INT8 hardware (Gen11 iGPU) INT8 loses 8-20%
    # to FP16 and is never chosen for speed. Within the noise the ILP decides, pricing precision changes.
    candidates = [Precision.FP32]
    for p in sorted(profile.faster_than_fp32(op.type, op.offered, op.macs), key=lambda q: q.rank):
        if all(lat[p] <= lat[q] * (1.0 + SAME_SPEED) for q in candidates if q.rank < p.rank):
            candidates.append(p)
    drop = {p: (0.0 if p is Precision.FP32 else float(np.mean(op.harm[p]))) for p in candidates}
    out = [Option(OpChoice(p, p), lat[p], drop[p]) for p in candidates]
    if Precision.INT8 in candidates and op.escalated is not None:
        e = float(np.mean(op.escalated))
        if 0.0 < e < 1.0:  # the choice changes across inputs: routing can pay
            for safe in candidates:
                if safe.rank >= Precision.INT8.rank:
                    continue
                harm_safe = np.zeros_like(op.harm[Precision.INT8]) if safe is Precision.FP32 else op.harm[safe]
                d = float(np.mean(np.where(op.escalated, harm_safe, op.harm[Precision.INT8])))
                t = (1 - e) * lat[Precision.INT8] + e * lat[safe] + profile.route_ms(op.io_bytes)
                out.append(Option(OpChoice(Precision.INT8, safe), t, d, e))
    return out


def _not_more_precise(o: OpChoice, floor: OpChoice) -> bool:
    return o.fast.rank >= floor.fast.rank and o.safe.rank >= floor.safe.rank


def solve_level(
    ops: Sequence[OpCost],
    opts: Mapping[str, list[Option]],
    budget: float,
    *,
    latency_budget_ms: float | None = None,
    floor: Mapping[str, OpChoice] | None = None,
    transitions: Mapping[tuple[str, str], float] | None = None,
    static_only: bool = False,
) -> Level:
    """The cheapest options whose summed drop fits ``budget`` (see the module docstring).

    :param transitions: ``{(a, b): ms}`` for adjacent ops: the cost of converting the tensor between
        them when they run at different precisions (paid once per precision change).
    :param static_only: no routed options (the max_drop 1 level).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    allowed = {
        op.name: [
            o
            for o in opts[op.name]
            if (floor is None or _not_more_precise(o.choice, floor[op.name])) and not (static_only and o.choice.routed)
        ]
        for op in ops
    }
    flat = [(op.name, o) for op in ops for o in allowed[op.name]]
    pairs = [(pair, ms) for pair, ms in (transitions or {}).items() if pair[0] in allowed and pair[1] in allowed]
    n, m = len(flat), len(pairs)
    lat = np.concatenate([[o.latency_ms for _, o in flat], [ms for _, ms in pairs]])
    drop = np.concatenate([[o.drop for _, o in flat], np.zeros(m)])
    one = np.zeros((len(ops), n + m))
    col = 0
    for i, op in enumerate(ops):
        k = len(allowed[op.name])
        one[i, col : col + k] = 1.0
        col += k
    cons = [LinearConstraint(one, 1.0, 1.0)]
    # y[a,b] >= X_a[p] - X_b[p] for every precision p: y is 1 exactly when a and b run different precisions.
    rows = []
    for j, ((a, b), _) in enumerate(pairs):
        for p in {o.choice.fast for _, o in flat}:
            row = np.zeros(n + m)
            row[n + j] = 1.0
            for i, (name, o) in enumerate(flat):
                if o.choice.fast is p and name == a:
                    row[i] -= 1.0
                elif o.choice.fast is p and name == b:
                    row[i] += 1.0
            rows.append(row)
    if rows:
        cons.append(LinearConstraint(np.array(rows), 0.0, np.inf))
    bounds = Bounds(0, 1)
    integrality = np.concatenate([np.ones(n), np.zeros(m)])

    def run(objective: np.ndarray, extra: list[LinearConstraint]) -> np.ndarray | None:
        res = milp(objective, constraints=cons + extra, integrality=integrality, bounds=bounds)
        return None if res.x is None else np.round(res.x[:n]).astype(bool)

    lat_cons = [LinearConstraint(lat[None, :], -np.inf, latency_budget_ms)] if latency_budget_ms else []
    drop_cons = [] if math.isinf(budget) else [LinearConstraint(drop[None, :], -np.inf, budget + 1e-12)]
    x = run(lat, [*drop_cons, *lat_cons])
    solver = "milp: min latency s.t. drop <= max_drop" + (" and latency <= budget" if lat_cons else "")
    if x is None and lat_cons:
        x = run(drop, lat_cons)
        solver = "milp: min drop s.t. latency <= budget (max_drop not reachable within the latency budget)"
    if x is None:  # the floor alone exceeds the budget: stay at the floor (more budget never adds precision)
        x = np.array([o.choice == floor[name] if floor else o.choice.fast is Precision.FP32 for name, o in flat])
        solver = "infeasible: previous level kept"
    chosen = {name: o for (name, o), take in zip(flat, x, strict=True) if take}
    changes = sum(ms for (a, b), ms in pairs if chosen[a].choice.fast is not chosen[b].choice.fast)
    return Level(
        max_drop=min(budget, 1.0),
        choices={name: o.choice for name, o in chosen.items()},
        predicted_ms=float(sum(o.latency_ms for o in chosen.values()) + changes),
        predicted_drop=float(sum(o.drop for o in chosen.values())),
        solver=solver,
    )


def share_runs(level: Level, ops: Sequence[OpCost], successors: Mapping[str, str], profile: DeviceProfile) -> Level:
    """Let runs of adjacent routed ops that always agree share one If: B joins A's If when B directly
    follows A (:func:`calibrate.variants.linear_successors`), both route the same variants, and the
    calibration inputs escalate at A exactly when they escalate at B. Each joined op saves its If."""
    by_name = {op.name: op for op in ops}
    choices = dict(level.choices)
    saved, shared = 0.0, 0
    for a, b in successors.items():
        ca, cb = choices.get(a), choices.get(b)
        if ca is None or cb is None or not (ca.routed and cb.routed) or (ca.fast, ca.safe) != (cb.fast, cb.safe):
            continue
        ea, eb = by_name[a].escalated, by_name[b].escalated
        if ea is None or eb is None or not np.array_equal(ea, eb):
            continue
        head = ca.shared_with or a
        choices[b] = OpChoice(cb.fast, cb.safe, cb.limit, shared_with=head)
        saved += profile.route_ms(by_name[b].io_bytes)
        shared += 1
    if not shared:
        return level
    solver = level.solver + "; runs share Ifs"
    return replace(level, choices=choices, predicted_ms=level.predicted_ms - saved, solver=solver)


JointDrop = Callable[[Mapping[str, OpChoice]], float]
"""``measure(choices) -> drop``: the top-1 disagreement with FP32 of a whole level (every op at its
choice together) on the held-out split — what the additive sum of isolated drops only estimates."""

FIT_STEPS = 5
"""Bisection steps (on the log of the budget scale) per level when fitting levels to the measured drop."""


def _fit_level(
    budget: float,
    solve: Callable[[float], Level],
    measure: JointDrop,
    ceiling: float,
    floor: Level,
    steps: int = FIT_STEPS,
    fallback: Level | None = None,
    samples: int = 0,
) -> Level:
    """The fastest level whose *measured* joint drop fits ``budget``: solve the ILP at ``budget × s`` and
    measure the result, bisecting on ``log s`` — upwards from the additive ``s = 1`` while it fits (isolated
    top-1 drops overlap: on EfficientNet-Lite0 their sum over the all-INT8 level is 0.78 while that level
    disagrees with FP32 on 0.09 of the held-out crops), downwards if even ``s = 1`` does not (drops that
    compound). ``ceiling`` is the additive drop of the fastest level (no larger budget changes the
    solution); ``floor`` the previous level (its measured drop fits a smaller budget): kept when no
    solution's measured drop fits, unless a ``fallback`` is given (the latency budget's own choice).

    What "fits" means: up to the additive solution (``s ≤ 1``) the measured drop is at most ``budget``;
    a level beyond it (``s > 1``) is picked *because* its drop measured low on the held-out split, so it
    must fit with confidence: the one-sided Clopper-Pearson upper bound of its drop over ``samples``
    held-out samples at ``CONFIDENCE`` (as the cascade's thresholds) is at most ``budget``."""
    seen: dict[frozenset, float] = {}

    def drop_of(level: Level) -> float:
        key = frozenset(level.choices.items())
        if key not in seen:
            seen[key] = float(measure(level.choices))
        return seen[key]

    def fits(level: Level, s: float) -> bool:
        drop = drop_of(level)
        if s > 1.0 and samples > 0:
            drop = upper_bound(drop * samples, samples, CONFIDENCE)
        return drop <= budget + 1e-12

    best: tuple[Level, float] | None = None

    def consider(level: Level, s: float) -> bool:
        nonlocal best
        if not fits(level, s):
            return False
        if best is None or level.predicted_ms < best[0].predicted_ms:
            best = (level, s)
        return True

    s_max = max(ceiling / budget, 1.0) * 1.01
    if consider(solve(budget * s_max), s_max):  # the fastest static mix already fits
        lo = hi = math.log(s_max)
    elif consider(solve(budget), 1.0):
        lo, hi = 0.0, math.log(s_max)
    else:
        lo, hi = math.log(1e-3), 0.0
    for _ in range(steps if hi > lo else 0):
        mid = 0.5 * (lo + hi)
        if consider(solve(budget * math.exp(mid)), math.exp(mid)):
            lo = mid
        else:
            hi = mid
    if best is None and fallback is not None:
        chosen, how = fallback, "no solution's measured drop fits"
    elif best is None:
        chosen, how = floor, "the previous level kept (no solution's measured drop fits)"
    else:
        chosen, how = best[0], f"budget x{best[1]:.3g} for the ILP so the measured joint drop fits"
    known = floor.measured_drop if chosen is floor else None  # the floor was measured as its own level
    return Level(budget, chosen.choices, chosen.predicted_ms, chosen.predicted_drop, f"{chosen.solver}; {how}",
                 measured_drop=drop_of(chosen) if known is None else known)  # fmt: skip


def select_levels(
    ops: Sequence[OpCost],
    profile: DeviceProfile,
    budgets: Sequence[float],
    *,
    latency_budget_ms: float | None = None,
    successors: Mapping[str, str] | None = None,
    measure: JointDrop | None = None,
    samples: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Level]:
    """One :class:`Level` per budget (sorted ascending; 0 and 1 always included); adjacent routed ops
    that always agree share an If (``successors``, see :func:`share_runs`).

    With ``measure``, each level between 0 and 1 is fitted to its joint drop measured on ``samples``
    held-out samples (:func:`_fit_level`) instead of trusting the isolated drops to add up; every level
    records ``measured_drop``."""
    opts = {op.name: options(op, profile) for op in ops}
    by_name = {op.name: op for op in ops}
    # A precision change between adjacent ops costs one conversion pass over the tensor between them
    # (estimated with the profile's per-MB copy cost, which is measured around an If: a layout reorder).
    transitions = {
        (a, b): profile.if_per_mb_ms.value * by_name[a].out_bytes / 2**20
        for a, b in (successors or {}).items()
        if a in by_name and b in by_name
    }
    levels: list[Level] = []
    all_budgets = sorted({0.0, 1.0, *(float(x) for x in budgets)})
    for k, b in enumerate(all_budgets):
        if b == 0.0:
            fp32 = {op.name: opts[op.name][0] for op in ops}
            levels.append(_fixed(0.0, fp32, "max_drop 0: fp32 everywhere"))
            if measure is not None:
                levels[-1] = replace(levels[-1], measured_drop=0.0)
        else:
            unlimited = b >= 1.0
            floor = levels[-1]

            def solve(budget: float, floor: Level = floor, static_only: bool = unlimited) -> Level:
                return solve_level(ops, opts, budget, latency_budget_ms=latency_budget_ms, floor=floor.choices,
                                   transitions=transitions, static_only=static_only)  # fmt: skip

            if unlimited:
                level = solve(math.inf)
                level = Level(1.0, level.choices, level.predicted_ms, level.predicted_drop,
                              "max_drop 1: the fastest static variants per the profile (min latency incl. "
                              "precision changes, no drop limit)",
                              measured_drop=None if measure is None else float(measure(level.choices)))  # fmt: skip
            elif measure is not None:
                ceiling = solve(math.inf, static_only=False).predicted_drop
                # Under --latency-budget the ILP trades drop for latency when both cannot hold: keep that.
                fallback = solve(b) if latency_budget_ms else None
                level = _fit_level(b, solve, measure, ceiling, floor, fallback=fallback, samples=samples)
            else:
                level = solve(b)
            levels.append(level)
        if progress:
            progress(k + 1, len(all_budgets))
    return [share_runs(lv, ops, successors or {}, profile) for lv in levels]


def _fixed(budget: float, chosen: Mapping[str, Option], solver: str) -> Level:
    return Level(
        max_drop=budget,
        choices={n: o.choice for n, o in chosen.items()},
        predicted_ms=float(sum(o.latency_ms for o in chosen.values())),
        predicted_drop=float(sum(o.drop for o in chosen.values())),
        solver=solver,
    )


def default_budgets(max_drop: float) -> list[float]:
    """The dial's levels when the user does not give ``--levels``: 0, ¼·, ½·, 1·, 2·, 4·max_drop, 1."""
    return sorted({0.0, 1.0, *(min(1.0, f * max_drop) for f in (0.25, 0.5, 1.0, 2.0, 4.0) if max_drop > 0)})


def op_size(op_type: str, in_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int]) -> float:
    """Multiply-accumulates of one Convolution / GroupConvolution / MatMul."""
    out = float(math.prod(out_shape))
    if op_type == "Convolution":
        return out * math.prod(w_shape[1:])
    if op_type == "GroupConvolution":
        return out * math.prod(w_shape[2:])
    return out * float(in_shape[-1])  # MatMul: each output element is a K-long dot product
