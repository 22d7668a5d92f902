"""The routing policy (pure Python): from ``max_drop`` / ``precision`` / ``precision_map`` to the
state each routed op's ``If`` chain reads.

Where it sits in the data flow: a package's per-level choices are made at calibration
(``calibrate/selection.py``) and a plain ``max_drop`` request only picks a level
(:func:`level_for`). :func:`plan_routes` serves the fully routed body — ``precision`` / ``precision_map``
requests, and calibration's own measurement IR — and the runtime writes its result into the request's
per-op state.

Per op the state is a *mode* (the precision asked for) and a *range limit*: the graph escalates
an input to fp32 at that op when the op input's abs-max exceeds ``range_limit ×`` the calibrated
INT8 range (i.e. when INT8 would clip). The policy for ``0 < max_drop < 1`` is a greedy knapsack:

* each op climbs a ladder of the variants the device profile says are faster than fp32
  (fp32 → bf16 → int8 on CPU); each rung is a step costing the added *measured isolated drop*
  (``drops`` in the manifest) and saving the profile's latency difference;
* steps are taken in increasing order of added drop per unit of saved latency (ties: lower
  sensitivity score first) and the policy is the longest prefix whose summed drop fits the
  budget, assuming isolated drops add up (a first model; the Pareto work measures it). Being a
  prefix, a larger ``max_drop`` never routes any op to a more precise variant;
* lowered INT8 ops keep ``range_limit = 1.0`` so inputs outside the calibrated range go to fp32.

``max_drop = 0`` routes every op to fp32; ``max_drop = 1`` routes every op to its fastest variant
with no range check; ``precision`` forces one precision everywhere (ops without that variant stay
fp32) with no range check; ``precision_map`` pins win over everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from apsq_ov.errors import ConfigError, UnsupportedPrecisionError
from apsq_ov.package import NEVER, CascadePoint, Level, Manifest, OpRecord
from apsq_ov.precision import Precision
from apsq_ov.profiles import DeviceProfile

NO_LIMIT = math.inf


@dataclass(frozen=True)
class Route:
    """The state of one routed op."""

    mode: Precision
    range_limit: float


def check_max_drop(max_drop: float) -> float:
    """:raises ConfigError: unless 0 ≤ max_drop ≤ 1."""
    value = float(max_drop)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ConfigError(f"max_drop {max_drop} is outside [0, 1]")
    return value


def plan_routes(
    ops: Sequence[OpRecord],
    profile: DeviceProfile,
    *,
    max_drop: float | None = None,
    precision: Precision | str | None = None,
    precision_map: Mapping[str, Precision | str] | None = None,
    default_max_drop: float = 0.01,
) -> dict[str, Route]:
    """Decide every routed op's mode and range limit.

    :param max_drop: tolerated quality loss vs FP32 in [0, 1]; ignored when ``precision`` is given.
    :param precision: force this precision on every routed op that has it.
    :param precision_map: ``{op name: precision}`` pins.
    :return: op name → :class:`Route`.
    :raises ConfigError: for max_drop outside [0, 1] or an op name the package does not route.
    :raises UnsupportedPrecisionError: for a precision the package/op does not offer.
    """
    if precision is not None and max_drop is not None:
        raise ConfigError("give either max_drop or precision, not both")
    routes: dict[str, Route] = {}
    if precision is not None:
        forced = Precision.parse(precision)
        if not any(forced in op.variants for op in ops):
            offered = sorted({p.value for op in ops for p in op.variants})
            raise UnsupportedPrecisionError(
                f"precision {forced} is not in this package (it offers {', '.join(offered)})"
            )
        for op in ops:
            routes[op.name] = Route(forced if forced in op.variants else Precision.FP32, NO_LIMIT)
    else:
        budget = check_max_drop(default_max_drop if max_drop is None else max_drop)
        routes = _budget_routes(ops, profile, budget)
    if precision_map:
        by_name = {op.name: op for op in ops}
        for name, p in precision_map.items():
            if name not in by_name:
                raise ConfigError(f"precision map names op {name!r}, which this package does not route")
            pinned = Precision.parse(p)
            if pinned not in by_name[name].variants:
                has = ", ".join(v.value for v in by_name[name].variants)
                raise UnsupportedPrecisionError(f"op {name!r} has no {pinned} variant (it has {has})")
            routes[name] = Route(pinned, NO_LIMIT)
    return routes


def _budget_routes(ops: Sequence[OpRecord], profile: DeviceProfile, budget: float) -> dict[str, Route]:
    routes = {op.name: Route(Precision.FP32, NO_LIMIT) for op in ops}
    if budget == 0.0:
        return routes
    if budget >= 1.0:
        for op in ops:
            faster = profile.faster_than_fp32(op.type, op.variants)
            if faster:
                routes[op.name] = Route(faster[0], NO_LIMIT)
        return routes
    # One "step" per (op, next faster variant), e.g. fp32→bf16 then bf16→int8. Steps are taken in
    # increasing order of added drop per saved latency, an op's steps in their own order, and the
    # policy is the longest prefix whose summed drop fits: a prefix, so more budget never routes
    # an op more precisely.
    steps: list[tuple[float, float, int, OpRecord, Precision, float]] = []
    for op in ops:
        ladder = list(reversed(profile.faster_than_fp32(op.type, op.variants)))  # slowest lower variant first
        prev_p, prev_key = Precision.FP32, 0.0
        for p in ladder:
            added = max(0.0, _drop(op, p) - _drop(op, prev_p))
            gain = profile.cost(op.type, prev_p) - profile.cost(op.type, p)
            key = max(prev_key, added / max(gain, 1e-9))
            steps.append((key, op.score, len(steps), op, p, added))
            prev_p, prev_key = p, key
    spent = 0.0
    for _, _, _, op, p, added in sorted(steps, key=lambda s: s[:3]):
        if spent + added > budget:
            break
        spent += added
        routes[op.name] = Route(p, 1.0 if p is Precision.INT8 else NO_LIMIT)
    return routes


def _drop(op: OpRecord, precision: Precision) -> float:
    """Measured isolated drop; without a measurement, the sensitivity score stands in (pessimistic)."""
    if precision is Precision.FP32:
        return 0.0
    return max(0.0, op.drops.get(precision, op.score))


def level_for(levels: Sequence[Level], max_drop: float) -> int:
    """Index of the level with the largest budget ≤ ``max_drop``."""
    best = 0
    for i, level in enumerate(levels):
        if level.max_drop <= max_drop + 1e-12:
            best = i
    return best


def fastest_level(levels: Sequence[Level], max_drop: float) -> int:
    """The level a ``max_drop`` request runs: the one with the largest budget ≤ ``max_drop``, unless a level
    of a smaller budget (which fits ``max_drop`` too) measured faster on the device at calibration — then
    the fastest of those. A larger budget never runs a slower level: the dial's levels are each the
    fastest mix *the profile predicts* for their budget, and the device disagrees at times
    (EfficientNet-Lite0 here: level 0.16, 12 ops BF16 inside INT8 chains, 5.63 ms; level 0.08 5.42 ms)."""
    k = level_for(levels, max_drop)
    ms = {j: t for j in range(k, -1, -1) if (t := levels[j].measured_ms) is not None}
    return min(ms, key=ms.__getitem__) if k in ms else k  # a tie keeps the larger budget's level


POLICIES = ("auto", "static", "cascade")
"""How a ``max_drop`` request picks its body: ``static`` the level (:func:`fastest_level`); ``cascade`` the router's
escalation cascade (fast route, re-run risky inputs on the precise route); ``auto`` whichever of the two
is faster for that budget (measured on the device at calibration where it could be, else predicted)."""


@dataclass(frozen=True)
class Body:
    """The body a ``max_drop`` request runs: ``level`` (a level index, or the cascade's) and, for the
    cascade, its escalation threshold ``tau``."""

    level: int
    tau: float | None = None


def level_ms(level: Level) -> float:
    return level.predicted_ms if level.measured_ms is None else level.measured_ms


def choose_body(manifest: Manifest, max_drop: float, policy: str = "auto") -> Body:
    """The level or cascade point serving ``max_drop`` under ``policy`` (see :data:`POLICIES`).

    :raises ConfigError: for an unknown policy, or ``cascade`` on a package without a router.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
    k = fastest_level(manifest.levels, max_drop)
    router = manifest.router
    if policy == "static":
        return Body(k)
    if router is None:
        if policy == "cascade":
            raise ConfigError(f"this package has no router ({manifest.router_note or 'not built'}); use static")
        return Body(k)
    point = router.point_for(max_drop)
    if policy == "cascade":  # below the smallest budget: escalate every input
        return Body(len(manifest.levels), -NEVER if point is None else point.tau)
    if point is None:
        return Body(k)
    # The cascade serves the budget where calibration timed it faster than the level (each body compiled on
    # its own, as deployed). ``point.ms`` is the cascade's mean; where it escalates half the inputs or more,
    # the median input runs fast route + precise route, slower than any level (EfficientNet-Lite0 at 0.01:
    # 51% escalated, mean 8.5 ms < level 8.8 ms, median 12.5 ms): the level serves it, faster for most
    # inputs. Every input runs the fast route first, so the cascade costs at least that level: a reading
    # below it is timing noise (EfficientNet-Lite0 at budget 1: τ = never 4.19 ms, its fast route 4.21 ms).
    levels, fast_ms = manifest.levels, level_ms(manifest.levels[router.fast_level])

    def beats_level(p: CascadePoint) -> bool:
        return max(p.ms, fast_ms) < level_ms(levels[fastest_level(levels, p.max_drop)]) and p.escalation < 0.5

    if point.tau >= NEVER:
        # No input escalates, so the fast level alone gives the cascade's outputs without the router
        # (EfficientNet-Lite0's budgets 0.13–1: 0.949x NNCF INT8 throughput through the cascade, the fast
        # level ~0.98x). Whether the fast route may serve is still decided with the router priced in: its
        # drop is the router's held-out estimate, not the dial's, so it must win by more than timing noise
        # (PP-OCRv4 at 0.08: fast level 7.17 ms, level 0.08 7.20 ms, 94.6% vs 95.9% 1 − CER on the bench's
        # lines). Once it won at a budget it serves every larger one where it is faster than the level, so
        # a larger budget never runs slower.
        won = any(beats_level(p) for p in router.points if p.tau >= NEVER and p.max_drop <= max_drop)
        return Body(router.fast_level) if won and fast_ms < level_ms(levels[k]) else Body(k)
    if beats_level(point):
        return Body(len(levels), point.tau)
    return Body(k)
