"""Calibration, end to end: model + data → variants, sensitivity, isolated drops, default policy → package.

Where it sits in the data flow: the entry point of ``calibrate/`` (``apsq-ov calibrate`` and
:func:`apsq_ov.calibrate.calibrate`). Phases, each reported through ``progress``:

1. read the model, check the data against its inputs, reshape to static shapes (If bodies want them);
2. ``nncf.quantize`` a copy of the model: the source of every INT8 variant (FakeQuantize ranges,
   int8 weights, bias-corrected biases);
3. build the adaptive IR (:mod:`.variants`) and compile it once: lowering one op is a state write;
4. score every routable op on the *scoring split* (:mod:`.sensitivity`);
5. measure each op's *isolated loss* (only that op lowered, every other op fp32) on a disjoint
   *held-out split*: the ground truth the report compares scores with, and the drops the policy budgets;
6. select the dial's levels (:mod:`.selection`), each fitted to its drop measured with all its ops
   lowered together on the held-out split; where the package's device is this one, time the fastest
   level and put back at FP32 the ops it runs as fast at FP32 where that measurably helps; fit the
   router (:mod:`.router`);
7. plan the default policy at ``max_drop``, write it into the ReadValue initialisers, and write
   the package atomically.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from apsq_ov.datasets import ctc_error_rate
from apsq_ov.decisions import Decision, decide, output_index
from apsq_ov.errors import CalibrationError, ConfigError, ModelError, UnsupportedPrecisionError
from apsq_ov.inputs import Samples, input_specs, load_arrays, match_inputs, static_shapes
from apsq_ov.package import (
    LEVEL_STATE,
    NEVER,
    TAU_STATE,
    Feature,
    Level,
    Manifest,
    OpChoice,
    OpRecord,
    Package,
    Router,
    write_package,
)
from apsq_ov.precision import Precision
from apsq_ov.profiler import host_int8_hardware
from apsq_ov.profiles import DeviceProfile, load_profile
from apsq_ov.routing import check_max_drop, choose_body, level_for
from apsq_ov.runtime import AdaptiveAsyncInferQueue, AdaptiveCompiledModel, AdaptiveInferRequest, compile_adaptive

from .router import (
    CALIBRATION_SHIFTS,
    as_probabilities,
    cascade_budgets,
    cascade_points,
    collect_fit_data,
    fill_gaps,
    fit_router,
)
from .selection import OBJECTIVE, OpCost, default_budgets, op_size, options, select_levels
from .sensitivity import OpQuantInfo, SensitivityMetric, score_ops
from .variants import (
    RoutableOp,
    RouteDefault,
    act_range,
    build_adaptive_model,
    build_package_model,
    find_routable_ops,
    level_body,
    linear_successors,
    routable_producers,
    weight_errors,
)

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: the CLI turns it into rich progress bars."""

MACS_PER_PASS = 32.0
"""The router's in-graph cost model: one element pass of a reduction ≈ this many MACs of the route."""
DROP_METRIC = "1 - top-1 agreement with FP32 (argmax over the judged output's class axis: 'decision'), held-out split"
ACTIVATION_RANGES = ("minmax", "histogram")
"""NNCF's activation range estimators calibration can use (``RangeEstimatorParametersSet.MINMAX`` — NNCF's
default — and ``.HISTOGRAM``). Which reads closer to FP32 depends on the model, measured on fresh data here
(all-INT8, NNCF's 300-sample subset, full bias correction): EfficientNet-Lite0 top-1 agreement 92.0% → 93.5%
with histogram ranges (2,000 crops, McNemar p = 0.003), PP-OCRv4 rec 1 − CER 96.4% → 95.5%, Fashion-MNIST
accuracy 91.83% → 91.85% (output NMSE 5x lower). The judged output's NMSE on 200 held-out inputs picked the
better one in every draw: hence ``auto``."""
REFINE_TOLERANCE = 0.02
"""How much slower than the fastest level (median, 1 thread, in both halves of an interleaved timing) a fast
route with some ops back at FP32 may run and still count as free (:func:`_refine_fast_route`); also how much
faster another mix must time to replace the selected fastest level (:func:`_check_fastest`)."""
REFINE_ALPHA = 0.05
"""The one-sided Wilcoxon signed-rank p-value the refined fast route's per-sample gain on the held-out split
must reach (a gain within the noise keeps the fastest level as selected)."""
_BUILDABLE = (Precision.FP32, Precision.BF16, Precision.FP16, Precision.INT8, Precision.INT4)


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Options of :func:`calibrate` (``apsq-ov calibrate`` flags).

    :param device: OpenVINO device the package is built for (selects the shipped profile).
    :param profile: path of a profile JSON overriding the shipped one.
    :param precisions: variants to build (fp32 always); ``None`` → the profile's defaults.
    :param subset_size: calibration samples NNCF uses (as ``nncf.quantize``'s ``subset_size``).
    :param max_drop: the package's default policy, written into the IR's ReadValue initialisers.
    :param sensitivity: registered sensitivity metric.
    :param sensitivity_samples: samples the finite-difference estimator runs on.
    :param drop_samples: samples each isolated drop is measured on.
    :param levels: the max-drop levels of the dial (one level body each); ``None`` → 0, ¼, ½, 1, 2, 4 × max_drop, 1.
    :param latency_budget_ms: optional cap on each level's predicted latency (profile cost model).
    :param router: fit the per-input router and build the escalation cascade (needs INT8 variants).
    :param router_shifts: shifted copies of the calibration data the router is also fitted on.
    :param router_budget: in-graph router cost cap, as a fraction of the fast route's latency.
    :param router_features: features the router may use (``None``: all; ``(MARGIN,)`` is plain
        output-margin escalation; the op features alone are the in-graph activation-statistics router).
    :param router_hold: where each budget's τ must hold: ``clean`` (the calibration inputs: the budget
        means what it says on data like the user's) or ``shifts`` (those and every shifted copy in
        ``router_shifts``: a lower τ, more escalation on clean data, the budget kept under those shifts).
    :param bias_correction: NNCF's bias correction for the INT8 variants: ``full`` (``fast_bias_correction=False``:
        slower calibration, a closer INT8 route) or ``fast`` (NNCF's default).
    :param activation_ranges: how NNCF sets the activation quantizers' ranges: ``minmax`` (NNCF's default
        estimator), ``histogram`` (NNCF's histogram estimator, which clips rare extremes), or ``auto``
        (quantize with both, keep the INT8 model whose judged output is closer to FP32 on the held-out split:
        one more ``nncf.quantize``). See :data:`ACTIVATION_RANGES`.
    :param class_axis: the axis of the judged output that holds the classes (``None``: the last), e.g. 1
        for an ``(N, C, H, W)`` segmentation or detection map; a one-class axis is a binary decision
        (:mod:`apsq_ov.decisions`).
    :param judged_output: the output every drop, the router and the scores judge: one of its tensor names,
        or its index (``None``: the first) — a detector's class scores rather than its box regressions.
    """

    device: str = "CPU"
    profile: str | Path | None = None
    precisions: tuple[Precision, ...] | None = None
    subset_size: int = 300
    max_drop: float = 0.01
    sensitivity: SensitivityMetric = SensitivityMetric.QDFD
    sensitivity_samples: int = 64
    drop_samples: int = 200
    seed: int = 0
    levels: tuple[float, ...] | None = None
    latency_budget_ms: float | None = None
    router: bool = True
    router_shifts: tuple[str, ...] = CALIBRATION_SHIFTS
    router_budget: float = 0.05
    router_features: tuple[Feature, ...] | None = None
    router_hold: str = "clean"
    bias_correction: str = "full"
    activation_ranges: str = "auto"
    class_axis: int | None = None
    judged_output: str | None = None

    def __post_init__(self) -> None:
        check_max_drop(self.max_drop)
        for level in self.levels or ():
            check_max_drop(level)
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ConfigError(f"latency budget must be > 0 ms, got {self.latency_budget_ms}")
        for name in self.router_shifts:
            if name not in CALIBRATION_SHIFTS:
                raise ConfigError(f"unknown router shift {name!r}; use {', '.join(CALIBRATION_SHIFTS)}")
        if self.bias_correction not in ("full", "fast"):
            raise ConfigError(f"bias correction must be 'full' or 'fast', got {self.bias_correction!r}")
        if self.activation_ranges not in ("auto", *ACTIVATION_RANGES):
            raise ConfigError(f"activation ranges must be 'auto', {' or '.join(repr(r) for r in ACTIVATION_RANGES)}, "
                              f"got {self.activation_ranges!r}")  # fmt: skip
        if self.router_hold not in ("clean", "shifts"):
            raise ConfigError(f"router hold must be 'clean' or 'shifts', got {self.router_hold!r}")
        if not 0.0 < self.router_budget <= 1.0:
            raise ConfigError(f"router budget must be in (0, 1], got {self.router_budget}")
        for name in ("subset_size", "sensitivity_samples", "drop_samples"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.precisions is not None:
            for p in self.precisions:
                if p not in _BUILDABLE:
                    buildable = ", ".join(b.value for b in _BUILDABLE)
                    raise UnsupportedPrecisionError(f"precision {p} variants are not built (buildable: {buildable})")


def read_model(path: str | Path, core: ov.Core | None = None) -> ov.Model:
    """Read any model ``openvino.Core.read_model`` reads.

    :raises ModelError: naming the file if it is missing or unreadable.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist")
    try:
        return (core or ov.Core()).read_model(p)
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise ModelError(f"{p}: OpenVINO cannot read it ({lines[-1] if lines else 'unknown error'})") from exc


def sample_order(n: int, seed: int) -> np.ndarray:
    """The order calibration visits the ``n`` data batches in: NNCF gets the first ``subset_size``,
    sensitivity and isolated drops the first ``sensitivity_samples`` / ``drop_samples``."""
    return np.random.default_rng(seed).permutation(n)


def _splits(order: np.ndarray, n_score: int, n_drop: int) -> tuple[np.ndarray, np.ndarray]:
    """Scoring split (first ``n_score``) and ground-truth split (the next ``n_drop``, disjoint when
    the data allows; otherwise the last ``n_drop``, overlapping, which the manifest records)."""
    score = order[:n_score]
    if len(order) >= n_score + n_drop:
        return score, order[n_score : n_score + n_drop]
    return score, order[max(len(order) - n_drop, 0) :]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def calibrate(
    model: str | Path,
    data: str | Path,
    out_dir: str | Path,
    config: CalibrationConfig | None = None,
    *,
    progress: Progress | None = None,
) -> Package:
    """Calibrate ``model`` on ``data`` and write the adaptive package to ``out_dir``.

    :param model: IR/ONNX/TFLite/Paddle file. :param data: ``.npz``/``.npy`` per the DATA contract.
    :raises ApsqError: subclasses naming the file/input/op at fault; nothing is written on failure.
    """
    config = config or CalibrationConfig()
    core = ov.Core()
    ov_model = read_model(model, core)
    specs = input_specs(ov_model)
    samples = match_inputs(load_arrays(data), specs, source=str(data), require_finite=True)
    source = {"path": str(model), "name": Path(model).name, "sha256": _sha256(Path(model))}
    adaptive, manifest = calibrate_model(ov_model, samples, config, source=source, progress=progress)
    return write_package(out_dir, adaptive, manifest)


def calibrate_model(
    model: ov.Model,
    samples: Samples,
    config: CalibrationConfig,
    *,
    source: dict,
    progress: Progress | None = None,
) -> tuple[ov.Model, Manifest]:
    """In-memory calibration (``model`` is reshaped and rewritten in place).

    :return: the adaptive model and its manifest (without file hashes: :func:`write_package` adds them).
    """
    profile = load_profile(config.device, config.profile)
    precisions = config.precisions or profile.default_precisions
    specs = input_specs(model)
    batch, shapes = static_shapes(specs, samples)
    try:
        model.reshape({model.inputs[i]: ov.PartialShape(s) for i, s in shapes.items()})
    except RuntimeError as exc:
        raise ModelError(f"cannot reshape the model to the data's shapes {list(shapes.values())}: {exc}") from exc
    specs = input_specs(model)
    n_batches = len(samples) // batch
    order = sample_order(n_batches, config.seed)
    calib_idx = order[: min(config.subset_size, n_batches)]
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}

    def batches(idx: np.ndarray) -> list[list[np.ndarray]]:
        return [samples.sample(int(i), batch) for i in idx]

    decision = _decision(model, batches(order[: min(len(order), 16)]), config.class_axis,
                         config.judged_output)  # before NNCF: fail fast  # fmt: skip
    # Scoring and ground truth use disjoint splits of the calibration data when there is enough
    # of it (the score is judged on data it never saw); both may use more than NNCF's subset.
    sens_idx, drop_idx = _splits(order, config.sensitivity_samples, config.drop_samples)
    q_model, settings, ranges = None, None, None
    if Precision.INT8 in precisions:
        q_model, settings, ranges = _quantize(model, batches(calib_idx), batches(drop_idx[:RANGE_CHECK_SAMPLES]),
                                              decision.output, config, profile, progress)  # fmt: skip
    q4_model = _nncf_compress_int4(model, progress) if Precision.INT4 in precisions else None
    units = find_routable_ops(model, q_model, q4_model)
    if not units:
        raise ModelError("the model has no Convolution, GroupConvolution or MatMul with constant weights to route")
    producers = routable_producers(units)

    variants: dict[str, tuple[Precision, ...]] = {}
    for u in units:
        offered = [
            p
            for p in precisions
            if (p is not Precision.INT8 or u.act_fq is not None)
            and (p is not Precision.INT4 or u.q4_weights is not None)
        ]
        variants[u.name] = tuple(offered)
    infos = {
        u.name: OpQuantInfo(
            type=u.type,
            depth=u.index,
            variants=variants[u.name],
            act_range=act_range(u),
            weight_error=weight_errors(u, variants[u.name]),
        )
        for u in units
    }

    def labels_of(idx: np.ndarray) -> list[np.ndarray] | None:
        if samples.labels is None:
            return None
        return [samples.labels[int(i) * batch : (int(i) + 1) * batch] for i in idx]

    sens_labels = labels_of(sens_idx)
    sens_samples = Samples(tuple(np.concatenate(a) for a in zip(*batches(sens_idx), strict=True)),
                           None if sens_labels is None else np.concatenate(sens_labels))  # fmt: skip
    records = [
        OpRecord(
            index=u.index,
            name=u.name,
            type=u.type,
            depth=u.index,
            variants=variants[u.name],
            sensitivity={"score": 0.0},
            int8_absmax=u.int8_absmax,
        )
        for u in units
    ]
    for rec, u in zip(records, units, strict=True):
        rec.macs, rec.io_bytes = _size(u)
    routed = [r for r in records if len(r.variants) > 1]
    by_name = {r.name for r in routed}
    if not routed:
        raise CalibrationError(f"no op got a variant besides fp32 for precisions {[p.value for p in precisions]}")
    fp32_model = model.clone()  # the probe needs the FP32 graph; the build rewrites `model` in place
    fp32_only = {u.name: RouteDefault(Precision.FP32, math.inf) for u in units}
    model = build_adaptive_model(model, units, variants, fp32_only)
    manifest = Manifest(
        source_model=source,
        profile=profile,
        precisions=tuple(precisions),
        default_max_drop=config.max_drop,
        inputs=specs,
        outputs=[o.get_any_name() if o.get_names() else f"output{i}" for i, o in enumerate(model.outputs[:-1])],
        batch=batch,
        decision=decision,
        ops=routed,
        sensitivity={},
        calibration={
            "samples": int(n_batches * batch),
            "subset_size": int(len(calib_idx) * batch),
            "seed": config.seed,
            "quantizer": settings.description if settings is not None else None,
            "bias_correction": config.bias_correction,
            **(ranges or {}),
            "drop_metric": DROP_METRIC,
            "drop_samples": int(len(drop_idx) * batch),
            "sensitivity_samples": int(len(sens_idx) * batch),
            "drops_held_out": not set(sens_idx.tolist()) & set(drop_idx.tolist()),
        },
    )
    # One compiled adaptive model serves every isolated measurement: lowering one op is a state write.
    # Its requests run in parallel (THROUGHPUT hint: one stream per core), each with its own state.
    device = "CPU" if config.device.startswith(("GPU", "AUTO")) else config.device
    measuring = compile_adaptive(model, manifest, device, {"PERFORMANCE_HINT": "THROUGHPUT"})

    def isolated_on_scoring_split(phase_progress: Callable[[int, int], None] | None) -> dict:
        return isolated_losses(measuring, manifest.ops, batches(sens_idx), sens_labels, phase_progress)

    report = score_ops(
        fp32_model,
        sens_samples,
        infos,
        {u.name: u for u in units},
        metric=config.sensitivity,
        config=f32,
        progress=(lambda d, t: progress("sensitivity", d, t)) if progress else None,
        seed=config.seed,
        isolated=isolated_on_scoring_split,
        output=decision.output,
    )
    for rec in routed:
        s = report.ops[rec.name]
        rec.sensitivity = {
            "components": s.components,
            "score": s.score,
            "predicted": {p.value: v for p, v in s.predicted.items()},
        }
        rec.input_absmax = report.input_absmax.get(rec.name)
    manifest.sensitivity = {
        "metric": report.metric.value,
        "formula": report.formula,
        "estimator": report.estimator,
        "inferences": report.inferences,
        "samples": len(sens_samples),
    }
    labels = labels_of(drop_idx)
    harm: dict[tuple[str, Precision], np.ndarray] = {}
    ground_truth = isolated_losses(
        measuring,
        manifest.ops,
        batches(drop_idx),
        labels,
        (lambda d, t: progress("isolated drops", d, t)) if progress else None,
        per_sample=harm,
    )
    for op in manifest.ops:
        for p, loss in ground_truth[op.name].items():
            op.quality[p] = loss
            op.drops[p] = loss["top1"]
    # Selection: which variant each op runs at each level of the dial, which ops are routed per input.
    unit_by_name = {u.name: u for u in units}
    escalated = _escalations(fp32_model, [u for u in units if u.name in by_name], batches(drop_idx))
    costs = [
        OpCost(
            name=op.name,
            type=op.type,
            macs=op.macs,
            io_bytes=op.io_bytes,
            offered=op.variants,
            harm={p: harm[(op.name, p)] for p in op.variants if p is not Precision.FP32},
            escalated=escalated.get(op.name),
            out_bytes=4.0 * math.prod(unit_by_name[op.name].out.get_shape()),
        )
        for op in manifest.ops
    ]
    budgets = config.levels or tuple(default_budgets(config.max_drop))
    # The isolated drops overlap (the inputs one op flips are mostly the ones every op flips), so their sum
    # overstates a level's drop many times over on some models: each level is fitted to its drop measured
    # with all its ops lowered together on the held-out split.
    losses = joint_losses(measuring, batches(drop_idx))

    def measure(choices: Mapping[str, OpChoice]) -> float:
        return float(np.mean(losses(choices)))

    fit_progress = (lambda d, t: progress("fit levels to measured drops", d, t)) if progress else None
    levels = select_levels(costs, profile, budgets, latency_budget_ms=config.latency_budget_ms,
                           successors=linear_successors([u for u in units if u.name in by_name]), measure=measure,
                           samples=int(len(drop_idx) * batch), progress=fit_progress)  # fmt: skip
    fastest_check = None
    if _runs_here(config.device, profile):
        # The profile prices ops one by one; in a real network the device fuses runs of one precision
        # (an INT8 conv writes u8 straight into the next INT8 op) and pays for quantize/reorder between
        # them. Where the calibration device is the target, time the selected fastest level against
        # uniform mixes and keep the fastest (on BlazeFace here all-INT8 is no faster than all-BF16).
        if progress:
            progress("time the fastest level", 0, 1)
        levels[-1], fastest_check = _check_fastest(
            levels[-1], levels[-2], costs, profile, fp32_model, q_model, q4_model, variants, batches(drop_idx[:1])[0]
        )
        if progress:
            progress("time the fastest level", 1, 1)
    if levels[-1].measured_drop is None:  # the on-device check swapped the fastest level
        levels[-1] = replace(levels[-1], measured_drop=measure(levels[-1].choices))
    refinement = None
    if _runs_here(config.device, profile):
        if progress:
            progress("refine the fast route", 0, 1)
        levels, refinement = _refine_fast_route(levels, manifest.ops, costs, producers, profile, fp32_model, q_model,
                                                q4_model, variants, batches(drop_idx[:1])[0], losses)  # fmt: skip
        if progress:
            progress("refine the fast route", 1, 1)
    manifest.levels = levels
    manifest.default_level = level_for(levels, config.max_drop)
    if not config.router:
        manifest.router_note = "not built (--no-router)"
    elif q_model is None:
        manifest.router_note = "not built: the package has no INT8 variants (the fast route would be the levels')"
    else:
        manifest.router, manifest.router_note = _fit_router(
            levels, costs, units, fp32_model, q_model, q4_model, variants, batches(order), profile, config, progress,
            manifest.decision,
        )
    manifest.selection = {
        "objective": OBJECTIVE,
        "latency_budget_ms": config.latency_budget_ms,
        "levels": [lv.max_drop for lv in levels],
        "escalation_rate": {n: float(np.mean(e)) for n, e in escalated.items()},
        "fastest_level_check": fastest_check,
        "fast_route_refinement": refinement,
    }
    if progress:
        progress("build package IR", 0, 1)
    package_model = _package_ir(fp32_model, q_model, q4_model, variants, manifest, config.max_drop)
    if progress:
        progress("build package IR", 1, 1)
    if _runs_here(config.device, profile):
        if progress:
            progress("time levels and cascade", 0, 1)
        if _time_bodies(package_model, manifest, batches(drop_idx[:1])[0]):  # the default changed: rebuild
            package_model = _package_ir(fp32_model, q_model, q4_model, variants, manifest, config.max_drop)
        if progress:
            progress("time levels and cascade", 1, 1)
    return package_model, manifest


def _package_ir(
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    q4_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
    manifest: Manifest,
    max_drop: float,
) -> ov.Model:
    """The package IR, its initial state the default policy (the level or cascade point ``max_drop`` picks)."""
    plan = choose_body(manifest, max_drop)
    manifest.default_level = plan.level
    tau = NEVER if plan.tau is None else plan.tau
    return build_package_model(fp32_model, q_model, variants, [lv.choices for lv in manifest.levels],
                               plan.level, q4_model=q4_model, router=manifest.router, tau=tau,
                               decision=manifest.decision)  # fmt: skip


def _time_bodies(model: ov.Model, manifest: Manifest, x: list[np.ndarray], runs: int = 40) -> bool:
    """Time every level body and the cascade at both ends (never / always escalate) on this device as
    ``compile_model`` deploys them — each compiled on its own (:func:`~apsq_ov.runtime.standalone_bodies`,
    a constant route split off), 1 thread, median of ``runs`` interleaved — and record them in the
    manifest (a measurement outranks the profile's prediction when the runtime picks a body). A body that
    only runs through the dispatch is timed there. Timed inside the dispatch instead, each body paid its
    depth in the ``If`` tree: on Fashion-MNIST the cascade (one ``If`` deep) read faster than the level it
    runs (0.180 vs 0.188 ms), so ``auto`` served 0.01–0.4 with it; compiled on their own the level runs
    0.142 ms, the cascade 0.155 ms. :return: whether the default changed."""
    from apsq_ov.runtime import split_constant_route, standalone_bodies

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
    ms = _time_states(setups, x, runs)
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


def _time_states(setups: list[tuple[ov.Model, dict[str, np.ndarray]]], x: list[np.ndarray], runs: int) -> list[float]:
    """Median ms on ``x`` of each (model, state setup) — one request each, each model compiled once (1
    thread, LATENCY hint, f32 hint); ``runs`` rounds interleaved over the setups after a warm-up."""
    return [float(np.median(t)) for t in _time_runs(setups, x, runs)]


def _time_runs(
    setups: list[tuple[ov.Model, dict[str, np.ndarray]]], x: list[np.ndarray], runs: int,
    extra: list[list[np.ndarray]] | None = None,
) -> list[list[float]]:
    """Every round's ms of :func:`_time_states`, per setup, in order (``extra``: per setup, inputs fed after
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


def _time_mixes(
    mixes: list[dict[str, OpChoice]],
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    q4_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
    x: list[np.ndarray],
    runs: int,
) -> list[list[float]]:
    """Every round's ms (:func:`_time_runs`) of each mix compiled as a model of its own, as the runtime
    deploys a level (:func:`level_body`, its constant route output split off; routed ops at their calibrated
    limits). Timed as levels of one package IR instead, each paid its depth in the ``If`` tree: on PP-OCRv4
    rec every other mix read 2.5-6% slower than the one at the top, whose body ran 8.5 ms alone and 12.0
    ms there."""
    from apsq_ov.runtime import split_constant_route

    models: list[tuple[ov.Model, dict[str, np.ndarray]]] = []
    extra: list[list[np.ndarray]] = []
    for k, mix in enumerate(mixes):
        routed = any(c.routed for c in mix.values())
        esc = [ops.parameter([], np.float32, name="escalate")] if routed else []
        body, _ = level_body(fp32_model, q_model, variants, mix, f"apsq/mix/{k}", esc, q4_model)
        models.append((split_constant_route(body)[0], {}))
        extra.append([np.array(1.0, np.float32)] if routed else [])
    return _time_runs(models, x, runs, extra)


def _fit_router(
    levels: list[Level],
    costs: list[OpCost],
    units: list[RoutableOp],
    fp32_model: ov.Model,
    q_model: ov.Model,
    q4_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
    data: list[list[np.ndarray]],
    profile: DeviceProfile,
    config: CalibrationConfig,
    progress: Progress | None,
    decision: Decision,
) -> tuple[Router | None, str]:
    """Fit the router on the fastest level (the fast route) against level 0 (FP32): every calibration
    sample and its shifted copies, the second half of them held out (AUC, thresholds)."""
    fast_k = len(levels) - 1
    fast = levels[fast_k].choices
    ranges = {}
    for u in units:
        rng = act_range(u)
        if u.name in fast and fast[u.name].fast is Precision.INT8 and rng is not None:
            ranges[u.name] = rng
    extra = [ops.parameter([], np.float32, name="escalate")] if any(c.routed for c in fast.values()) else []
    body, inputs = level_body(fp32_model, q_model, variants, fast, "apsq/probe", extra, q4_model)
    elements = {u.name: int(math.prod(u.op.get_input_shape(0))) for u in units}
    held_out = np.arange(len(data)) >= len(data) // 2
    rows, probabilities = collect_fit_data(
        body, inputs, fp32_model, ranges, elements, data, held_out, config.router_shifts, seed=config.seed,
        progress=(lambda d, t: progress("router data", d, t)) if progress else None, decision=decision,
    )  # fmt: skip
    # In-graph cost cap: one element pass of a reduction costs about as much as MACS_PER_PASS MACs of
    # the route (measured here: 48 on EfficientNet-Lite0, 14 on the Fashion-MNIST ResNet); half the
    # budget is kept for that model's error. Where the device is this one, the cost is then measured.
    macs = sum(c.macs for c in costs)
    cap = 0.5 * config.router_budget * macs / MACS_PER_PASS
    router, note = fit_router(rows, cap_elements=cap, probabilities=probabilities, ranges=ranges,
                              fast_level=fast_k, precise_level=0, shifts=config.router_shifts,
                              allow=config.router_features)  # fmt: skip
    if router is None:
        return None, f"not built: {note}"
    input_bytes = sum(4.0 * a.size for a in data[0])
    router.hold = ["clean", *config.router_shifts] if config.router_hold == "shifts" else ["clean"]
    budgets = fill_gaps(router, rows, cascade_budgets([lv.max_drop for lv in levels]), router.hold)
    router.points = cascade_points(router, rows, budgets, levels[fast_k].predicted_ms,
                                   levels[0].predicted_ms, profile.route_ms(input_bytes), router.hold)  # fmt: skip
    return router, ""


def _runs_here(device: str, profile: DeviceProfile) -> bool:
    """Is the package's target device this machine's (so on-device timing is meaningful)?"""
    base = device.split(".")[0].upper()
    return base in ("CPU", "AUTO") and profile.device.upper() == "CPU"


def _check_fastest(
    level: Level,
    floor: Level,
    costs: list[OpCost],
    profile: DeviceProfile,
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    q4_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
    x: list[np.ndarray],
    runs: int = 60,
) -> tuple[Level, dict]:
    """Time the selected fastest ``level`` against uniform mixes — every op at its coarsest static
    candidate, and every op at each lower precision it offers — never more precise than ``floor`` (the
    previous level), each compiled on its own (:func:`_time_mixes`), median of ``runs`` interleaved, 1 thread;
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
    timed = _time_mixes([unique[n] for n in names], fp32_model, q_model, q4_model, variants, x, runs)
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


def _refine_fast_route(
    levels: list[Level],
    records: list[OpRecord],
    costs: list[OpCost],
    producers: Mapping[str, set[str | None]],
    profile: DeviceProfile,
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    q4_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
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
    level (each compiled on its own, :func:`_time_mixes`; 1 thread, ``runs`` rounds interleaved). Of those
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
        mixes = [dict(fast)] + [_keep_fp32(fast, {*kept, n}) for n in candidates]
        times = _time_mixes(mixes, fp32_model, q_model, q4_model, variants, x, runs)
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
        choices = _keep_fp32(lv.choices, keep)
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


def _keep_fp32(choices: Mapping[str, OpChoice], keep: set[str]) -> dict[str, OpChoice]:
    """``choices`` with the ops in ``keep`` static FP32; a run of ops sharing one If that loses an op to
    ``keep`` is split (each op left of it routes in its own If: a shared If needs an unbroken run)."""
    broken = {c.shared_with for n, c in choices.items() if c.shared_with and (n in keep or c.shared_with in keep)}
    fp32 = OpChoice(Precision.FP32, Precision.FP32)
    return {n: fp32 if n in keep else replace(c, shared_with=None) if c.shared_with in broken else c
            for n, c in choices.items()}  # fmt: skip


def _size(unit: RoutableOp) -> tuple[float, float]:
    """MACs of the op and the bytes a routing If copies for it (input and output, fp32)."""
    op = unit.op
    shapes = [list(op.get_input_shape(0)), list(op.get_input_shape(1)), list(op.get_output_shape(0))]
    io = 4.0 * (math.prod(shapes[0]) + math.prod(shapes[2]))
    return op_size(unit.type, *shapes), io


def _escalations(fp32_model: ov.Model, units: list[RoutableOp], data: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per sample and INT8 op: does the op input (FP32 path) leave the calibrated INT8 range? One FP32 pass
    of a copy of the model with each op input's abs-max as an extra output."""
    limits = {u.name: u.int8_absmax for u in units}
    checked = [u for u in units if limits[u.name] is not None]
    if not checked:
        return {}
    probe = fp32_model.clone()
    by_name = {n.get_friendly_name(): n for n in probe.get_ordered_ops()}
    extra = []
    for u in checked:
        x = by_name[u.name].input(0).get_source_output()
        axes = ops.constant(np.arange(len(x.get_partial_shape()), dtype=np.int64))
        extra.append(ops.result(ops.reduce_max(ops.abs(x), axes, False)))
    probe.add_results(extra)
    compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    n_out = len(fp32_model.outputs)
    seen = np.empty((len(data), len(checked)))
    for i, x in enumerate(data):  # one pass per sample reads every op's abs-max
        res = req.infer(x)
        seen[i] = [float(res[n_out + j]) for j in range(len(checked))]
    return {u.name: seen[:, j] > float(limits[u.name] or 0.0) for j, u in enumerate(checked)}


# INT8 hardware on which 8-bit dot products cannot saturate their intermediate buffer (OpenVINO's "Saturation
# (overflow) issue workaround": the problem does not occur on GPUs or on CPUs with VNNI and later).
NO_SATURATION = ("VNNI", "AMX", "DP4A", "XMX")


@dataclass(frozen=True)
class QuantizeSettings:
    """How calibration calls ``nncf.quantize``: its keyword arguments and a one-line description (the
    manifest's ``calibration.quantizer``)."""

    kwargs: dict[str, Any]
    description: str


def quantize_settings(
    profile: DeviceProfile,
    bias_correction: str = "full",
    host_int8_hardware: str | None = None,
    activation_ranges: str = "minmax",
) -> QuantizeSettings:
    """The ``nncf.quantize`` settings for ``profile``'s device.

    NNCF's default overflow fix quantizes the first layer's weights to 7 bits against the saturation of
    pre-VNNI CPUs; where the profile's INT8 hardware cannot saturate (or the device is a GPU) it is off,
    unless ``host_int8_hardware`` (this machine's CPU, when the package targets it) says it can.
    ``full`` bias correction (``fast_bias_correction=False``) re-estimates each bias on the quantized
    model's own activations. Measured on EfficientNet-Lite0 (500 fresh crops, this machine): top-1
    agreement with FP32 83.0% (NNCF's defaults) → 91.6% (both), the same latency (1.00x).
    ``activation_ranges``: one of :data:`ACTIVATION_RANGES` (``auto`` is resolved by :func:`calibrate`).
    """
    import nncf
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if activation_ranges not in ACTIVATION_RANGES:
        raise ConfigError(f"activation ranges must be {' or '.join(repr(r) for r in ACTIVATION_RANGES)} here, "
                          f"got {activation_ranges!r}")  # fmt: skip
    saturates = not profile.device.startswith("GPU") and (
        profile.int8_hardware not in NO_SATURATION
        or (host_int8_hardware is not None and host_int8_hardware not in NO_SATURATION)
    )
    kwargs: dict[str, Any] = {"fast_bias_correction": bias_correction == "fast"}
    advanced: dict[str, Any] = {}
    if not saturates:
        advanced["overflow_fix"] = nncf.OverflowFix.DISABLE
    if activation_ranges == "histogram":
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.HISTOGRAM
    if advanced:
        kwargs["advanced_parameters"] = nncf.AdvancedQuantizationParameters(**advanced)
    hw = host_int8_hardware if saturates and host_int8_hardware is not None else profile.int8_hardware
    fix = f"first-layer overflow fix ({hw} INT8)" if saturates else f"no overflow fix ({hw} INT8)"
    return QuantizeSettings(
        kwargs,
        f"nncf.quantize (preset performance, {bias_correction} bias correction, {activation_ranges} activation "
        f"ranges, {fix})",
    )


def calibration_quantize_settings(
    config: CalibrationConfig | None = None, profile: DeviceProfile | None = None, activation_ranges: str | None = None
) -> QuantizeSettings:
    """The settings :func:`calibrate` gives ``nncf.quantize`` for ``config`` (default: the defaults) and
    its device's profile: where the package targets this machine's CPU, the host's own INT8 hardware
    must not saturate either. What baselines meant to match apsq-ov's INT8 route should use — with the
    activation ranges a package's calibration chose (:func:`package_quantize_settings`).

    :param activation_ranges: overrides ``config.activation_ranges``, which must not be ``auto`` without it.
    """
    config = config or CalibrationConfig(activation_ranges="minmax")
    profile = profile or load_profile(config.device, config.profile)
    host = host_int8_hardware() if _runs_here(config.device, profile) else None
    ranges = activation_ranges or config.activation_ranges
    if ranges == "auto":
        raise ConfigError("activation ranges 'auto' are chosen by calibration: pass the one it chose")
    return quantize_settings(profile, config.bias_correction, host, ranges)


def package_quantize_settings(manifest: Manifest) -> QuantizeSettings:
    """The ``nncf.quantize`` settings ``manifest``'s package was calibrated with (its INT8 route is NNCF's
    model with these): the bias correction and activation ranges it records, its profile's device."""
    cal = manifest.calibration
    config = CalibrationConfig(device=manifest.profile.device, bias_correction=cal.get("bias_correction", "full"),
                               activation_ranges=cal.get("activation_ranges", "minmax"))  # fmt: skip
    return calibration_quantize_settings(config, manifest.profile)


def _nncf_quantize(model: ov.Model, data: list[list[np.ndarray]], progress: Progress | None,
                   settings: QuantizeSettings, phase: str = "nncf.quantize") -> ov.Model:  # fmt: skip
    import nncf  # heavy: imported only when calibrating

    nncf.set_log_level(logging.ERROR)
    if progress:
        progress(phase, 0, 1)
    try:
        q = nncf.quantize(model.clone(), nncf.Dataset(data), subset_size=len(data), **settings.kwargs)
    except Exception as exc:  # NNCF raises many types; translate them all at this boundary
        raise CalibrationError(f"nncf.quantize failed: {type(exc).__name__}: {exc}") from exc
    if progress:
        progress(phase, 1, 1)
    return q


RANGE_CHECK_SAMPLES = 256
"""Held-out samples (at most) on which ``activation_ranges="auto"`` compares the INT8 models."""


def _quantize(
    model: ov.Model,
    calib: list[list[np.ndarray]],
    check: list[list[np.ndarray]],
    output: int,
    config: CalibrationConfig,
    profile: DeviceProfile,
    progress: Progress | None,
) -> tuple[ov.Model, QuantizeSettings, dict[str, Any]]:
    """NNCF's INT8 model, its settings and what the manifest records of the activation ranges. With
    ``auto``, one model per :data:`ACTIVATION_RANGES` entry, kept: the one whose judged output (``output``)
    has the lower mean NMSE against FP32's on ``check`` (the ground-truth split, held out from scoring; NNCF's
    subset includes it when the calibration data is small); ties keep NNCF's default (``minmax``)."""
    if config.activation_ranges != "auto":
        settings = calibration_quantize_settings(config, profile)
        q = _nncf_quantize(model, calib, progress, settings)
        return q, settings, {"activation_ranges": config.activation_ranges}
    ref = _outputs(model, check, output)
    built: dict[str, tuple[ov.Model, QuantizeSettings]] = {}
    nmse: dict[str, float] = {}
    for ranges in ACTIVATION_RANGES:
        settings = calibration_quantize_settings(config, profile, activation_ranges=ranges)
        built[ranges] = _nncf_quantize(model, calib, progress, settings, f"nncf.quantize ({ranges} ranges)"), settings
        got = _outputs(built[ranges][0], check, output)
        nmse[ranges] = float(np.mean([np.sum((g - r) ** 2) / max(float(np.sum(r**2)), 1e-30)
                                      for g, r in zip(got, ref, strict=True)]))  # fmt: skip
    chosen = min(ACTIVATION_RANGES, key=lambda k: nmse[k])  # the first of equals: NNCF's default
    return (*built[chosen], {"activation_ranges": chosen, "activation_ranges_nmse": nmse,
                             "activation_ranges_checked_on": len(check)})  # fmt: skip


def _outputs(model: ov.Model, data: list[list[np.ndarray]], output: int) -> list[np.ndarray]:
    """Output ``output`` of ``model`` (FP32 inference precision) for each item of ``data``."""
    req = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    return [req.infer(x)[output].astype(np.float64) for x in data]


def _nncf_compress_int4(model: ov.Model, progress: Progress | None) -> ov.Model:
    """NNCF's INT4 weight-only compression (symmetric, per output channel) of every MatMul it takes:
    the source of the INT4 variants. NNCF never compresses convolutions to INT4."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    if progress:
        progress("nncf.compress_weights int4", 0, 1)
    try:
        q4 = nncf.compress_weights(
            model.clone(), mode=nncf.CompressWeightsMode.INT4_SYM, ratio=1.0, group_size=-1, all_layers=True
        )
    except Exception as exc:  # NNCF raises many types; translate them all at this boundary
        raise CalibrationError(f"nncf.compress_weights (int4) failed: {type(exc).__name__}: {exc}") from exc
    if progress:
        progress("nncf.compress_weights int4", 1, 1)
    return q4


@dataclass(frozen=True)
class Reference:
    """The all-FP32 run every isolated job is compared to, with what :func:`quality_loss` needs of it
    computed once (its probabilities, their Σ p·log p, top-1, energy and task metric), not per job."""

    outputs: list[np.ndarray]
    labels: list[np.ndarray] | None
    probs: list[np.ndarray]
    p_log_p: list[np.ndarray]
    top1: list[np.ndarray]
    energy: float
    task_value: float | None
    """FP32's task metric when labels exist: accuracy (classifier) or CER (CTC sequence output)."""

    @classmethod
    def of(cls, outputs: list[np.ndarray], labels: list[np.ndarray] | None) -> Reference:
        probs = [as_probabilities(r) for r in outputs]
        task_value = None
        if labels is not None and all(np.asarray(o).ndim == 2 for o in outputs):
            y = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels])
            task_value = float(np.mean(np.concatenate([top1_of(r) for r in outputs]) == y))
        elif labels is not None and _is_ctc(outputs, labels):
            task_value = ctc_error_rate(outputs, labels)
        return cls(outputs, labels, probs, [np.sum(pr * np.log(pr), axis=-1) for pr in probs],
                   [top1_of(r) for r in outputs], sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in outputs),
                   task_value)  # fmt: skip


def _decision(
    model: ov.Model, data: list[list[np.ndarray]], class_axis: int | None, judged: str | None = None
) -> Decision:
    """Which output of the FP32 ``model`` is judged (``judged``: a name or index; None: the first) and how it
    reads as class scores (:func:`apsq_ov.decisions.decide`); it runs on ``data`` only for a one-class axis
    (probability or logit?)."""
    k = output_index([set(o.get_names()) for o in model.outputs], judged)
    out = model.outputs[k]
    name = f"output {out.get_any_name()}" if out.get_names() else f"output {k}"
    shape = [d.get_length() if d.is_static else 2 for d in out.get_partial_shape()]
    decision = decide([np.zeros(shape, np.float32)], class_axis, name)  # checks the axis
    if decision.binary is not None:
        decision = decide(_outputs(model, data, k), class_axis, name)
    return replace(decision, output=k)


def _is_ctc(outputs: list[np.ndarray], labels: list[np.ndarray]) -> bool:
    return all(np.asarray(o).ndim == 3 and np.ndim(lab) == 2 for o, lab in zip(outputs, labels, strict=True))


def quality_loss(outputs: list[np.ndarray], reference: Reference) -> dict:
    """Loss of ``outputs`` vs the FP32 ``reference`` (the judged output, one array per sample).

    ``top1``: fraction of positions whose argmax (last axis) differs; ``kl``: mean KL(ref ‖ out) over
    positions; ``nmse``: ``Σ‖out − ref‖² / Σ‖ref‖²``. With labels, ``task``, the task metric's loss: for a
    classifier output ``(batch, classes)`` with a class per sample, ``accuracy`` = FP32 accuracy minus this
    accuracy; for a CTC sequence output ``(batch, T, classes)`` with ``(batch, L)`` label indices (−1 pads;
    blank = class 0), ``cer`` = this character error rate of the greedy decode minus FP32's.
    """
    ref, labels = reference.outputs, reference.labels
    top1 = np.mean([np.mean(top1_of(o) != r) for o, r in zip(outputs, reference.top1, strict=True)])
    kl = np.mean(
        [
            np.mean(plogp - np.sum(pr * np.log(as_probabilities(o)), axis=-1))
            for o, pr, plogp in zip(outputs, reference.probs, reference.p_log_p, strict=True)
        ]
    )
    num = sum(float(np.sum((np.asarray(o, np.float64) - r) ** 2)) for o, r in zip(outputs, ref, strict=True))
    loss = {"top1": float(top1), "kl": float(kl), "nmse": num / max(reference.energy, 1e-30)}
    if reference.task_value is None or labels is None:
        return loss
    if all(np.asarray(o).ndim == 2 for o in outputs):
        y = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels])
        acc = np.mean(np.concatenate([top1_of(o) for o in outputs]) == y)
        loss["accuracy"] = loss["task"] = float(reference.task_value - acc)
    elif _is_ctc(outputs, labels):
        loss["cer"] = loss["task"] = ctc_error_rate(outputs, labels) - reference.task_value
    return loss


def top1_of(output: np.ndarray) -> np.ndarray:
    """Argmax over the last axis (class, or class per position for sequence outputs)."""
    return np.asarray(output).argmax(axis=-1).reshape(-1)


class PinnedRuns:
    """Run ``data`` through ``model`` with some ops pinned to a precision and every other op FP32, by
    writing request state only, on an :class:`AdaptiveAsyncInferQueue` of ``model``'s optimal number of
    requests. Calling it returns the judged output of each sample (read as class scores), in order."""

    def __init__(self, model: AdaptiveCompiledModel, data: list[list[np.ndarray]]) -> None:
        self.data = data
        self._outputs: list[np.ndarray | None] = [None] * len(data)
        self._queue = AdaptiveAsyncInferQueue(model)
        self._queue.set_callback(self._keep)
        self._decision = model.manifest.decision

    def _keep(self, request: AdaptiveInferRequest, i: int) -> None:
        d = self._decision
        self._outputs[i] = d.scores(d.pick(request.get_result()))  # copied out of the request

    def __call__(self, pin: Mapping[str, Precision] | None) -> list[np.ndarray]:
        for i, x in enumerate(self.data):
            self._queue.start_async(x, i, precision=Precision.FP32, precision_map=pin)
        self._queue.wait_all()
        return list(self._outputs)  # type: ignore[arg-type]


def isolated_losses(
    model: AdaptiveCompiledModel,
    ops_: list[OpRecord],
    data: list[list[np.ndarray]],
    labels: list[np.ndarray] | None,
    progress: Callable[[int, int], None] | None,
    per_sample: dict[tuple[str, Precision], np.ndarray] | None = None,
) -> dict[str, dict[Precision, dict[str, float]]]:
    """Loss of every (op, lower precision) with that op alone lowered and every other op fp32
    (:func:`quality_loss` against the all-fp32 route), on :class:`PinnedRuns`.

    :param per_sample: if given, filled with each job's per-sample top-1 disagreement (fraction of positions).
    """
    jobs = [(op, p) for op in ops_ for p in op.variants if p is not Precision.FP32]
    total = len(data) * (1 + len(jobs))
    runs = PinnedRuns(model, data)
    if progress:
        progress(0, total)  # the phase starts now (a job's progress lands when all its samples have run)
    reference = Reference.of(runs(None), labels)
    if progress:
        progress(len(data), total)
    losses: dict[str, dict[Precision, dict[str, float]]] = {op.name: {} for op in ops_}
    for k, (op, p) in enumerate(jobs):
        lowered = runs({op.name: p})
        if progress:
            progress(len(data) * (k + 2), total)
        losses[op.name][p] = quality_loss(lowered, reference)
        if per_sample is not None:
            per_sample[(op.name, p)] = np.array(
                [np.mean(top1_of(o) != r) for o, r in zip(lowered, reference.top1, strict=True)]
            )
    return losses


def joint_losses(
    model: AdaptiveCompiledModel, data: list[list[np.ndarray]]
) -> Callable[[Mapping[str, OpChoice]], np.ndarray]:
    """``losses(choices)``: each sample's top-1 disagreement with FP32 (the fraction of its positions whose
    argmax differs; their mean is :func:`quality_loss`'s ``top1``) on ``data`` with every op at its choice
    together (routed ops at their fast variant, which never escalates: an upper bound of what routing
    loses) — how the selection checks a level (:func:`select_levels`) and the refinement a fast route; each
    distinct set of lowered ops runs once."""
    runs = PinnedRuns(model, data)
    reference = Reference.of(runs(None), None)
    done: dict[frozenset[tuple[str, Precision]], np.ndarray] = {}  # a graph's outputs are deterministic

    def losses(choices: Mapping[str, OpChoice]) -> np.ndarray:
        pin = {n: c.fast for n, c in choices.items() if c.fast is not Precision.FP32}
        if not pin:
            return np.zeros(len(data))
        key = frozenset(pin.items())
        if key not in done:
            done[key] = np.array([np.mean(top1_of(o) != r) for o, r in zip(runs(pin), reference.top1, strict=True)])
        return done[key]

    return losses


__all__ = ["CalibrationConfig", "calibrate", "calibrate_model", "read_model", "sample_order"]
