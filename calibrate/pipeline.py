"""Calibration, end to end: model + data → variants, sensitivity, isolated drops, default policy → package.

Where it sits in the data flow: the entry point of ``calibrate/`` (``apsq-ov calibrate`` and
:func:`apsq_ov.calibrate.calibrate`). Phases, each reported through ``progress``:

1. read the model, check the data against its inputs, reshape to static shapes (If bodies want them);
2. ``nncf.quantize`` a copy of the model (:mod:`.quantize`): the source of every INT8 variant (FakeQuantize
   ranges, int8 weights, bias-corrected biases);
3. build the adaptive IR (:mod:`.variants`) and compile it once: lowering one op is a state write;
4. score every routable op on the *scoring split* (:mod:`.sensitivity`);
5. measure each op's *isolated loss* (only that op lowered, every other op fp32) on a disjoint
   *held-out split*: the ground truth the report compares scores with, and the drops the policy budgets
   (:mod:`.drops`: what a drop is and how it is measured);
6. select the dial's levels (:mod:`.selection`), each fitted to its drop measured with all its ops
   lowered together on the held-out split; where the package's device is this one, time the fastest
   level, put back at FP32 the ops it runs as fast at FP32 where that measurably helps, and time which
   level runs fastest (:mod:`.ondevice`); fit the router on that level, the fast route (:mod:`.router`);
7. plan the default policy at ``max_drop``, write it into the ReadValue initialisers, and write
   the package atomically.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from apsq_ov.decisions import Decision, decide, output_index
from apsq_ov.errors import CalibrationError, ConfigError, ModelError, UnsupportedPrecisionError
from apsq_ov.inputs import Samples, input_specs, load_arrays, match_inputs, static_shapes
from apsq_ov.package import (
    NEVER,
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
from apsq_ov.profiles import DeviceProfile, load_profile
from apsq_ov.routing import check_max_drop, choose_body, level_for
from apsq_ov.runtime import compile_adaptive

from .drops import CTC_DROP_METRIC, DROP_METRIC, isolated_losses, joint_losses
from .levels import build_package_model
from .ondevice import Routes, check_fastest, fastest_route, refine_fast_route, runs_here, time_bodies
from .quantize import (
    ACTIVATION_RANGES,
    RANGE_CHECK_SAMPLES,
    check_overflow_fix,
    nncf_compress_int4,
    outputs_f32,
    quantize,
)
from .router import (
    CALIBRATION_SHIFTS,
    cascade_budgets,
    cascade_points,
    collect_fit_data,
    fill_gaps,
    fit_router,
)
from .selection import OBJECTIVE, OpCost, default_budgets, op_size, select_levels
from .sensitivity import OpQuantInfo, SensitivityMetric, score_ops
from .variants import (
    RoutableOp,
    RouteDefault,
    act_range,
    build_adaptive_model,
    find_routable_ops,
    linear_successors,
    routable_producers,
    weight_errors,
)

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: the CLI turns it into rich progress bars."""

MACS_PER_PASS = 32.0
"""The router's in-graph cost model: one element pass of a reduction ≈ this many MACs of the route."""
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
    :param overflow_fix: which weights are quantized to 7 bits against the saturation of pre-VNNI 8-bit dot
        products (:data:`~.quantize.OVERFLOW_FIXES`): ``auto`` (every layer's where the INT8 hardware can
        saturate, none elsewhere), ``all``, ``first-layer`` (NNCF's default) or ``none``.
    :param class_axis: the axis of the judged output that holds the classes (``None``: the last), e.g. 1
        for an ``(N, C, H, W)`` segmentation or detection map; a one-class axis is a binary decision
        (:mod:`apsq_ov.decisions`).
    :param judged_output: the output every drop, the router and the scores judge: one of its tensor names,
        or its index (``None``: the first) — a detector's class scores rather than its box regressions.
    :param ctc: judge a ``(N, T, classes)`` judged output as a CTC path: every drop is the character error
        rate of its greedy decode against FP32's, not the fraction of time steps whose top-1 moved
        (:mod:`apsq_ov.decisions`). ``None``: where the calibration labels are CTC label rows.
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
    overflow_fix: str = "auto"
    class_axis: int | None = None
    judged_output: str | None = None
    ctc: bool | None = None

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
        check_overflow_fix(self.overflow_fix)
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
    decision = _sequence(decision, model, samples.labels, config.ctc)
    # Scoring and ground truth use disjoint splits of the calibration data when there is enough
    # of it (the score is judged on data it never saw); both may use more than NNCF's subset.
    sens_idx, drop_idx = _splits(order, config.sensitivity_samples, config.drop_samples)
    q_model, settings, ranges = None, None, None
    if Precision.INT8 in precisions:
        q_model, settings, ranges = quantize(model, batches(calib_idx), batches(drop_idx[:RANGE_CHECK_SAMPLES]),
                                              decision.output, config, profile, progress)  # fmt: skip
    q4_model = nncf_compress_int4(model, progress) if Precision.INT4 in precisions else None
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
    routes = Routes(fp32_model, q_model, q4_model, variants)
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
            "overflow_fix": settings.overflow_fix if settings is not None else None,
            **(ranges or {}),
            "drop_metric": CTC_DROP_METRIC if decision.sequence == "ctc" else DROP_METRIC,
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
            op.drops[p] = loss[decision.drop_key]
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
    losses = joint_losses(measuring, batches(drop_idx), routes)

    def measure(choices: Mapping[str, OpChoice]) -> float:
        return float(np.mean(losses(choices)))

    fit_progress = (lambda d, t: progress("fit levels to measured drops", d, t)) if progress else None
    levels = select_levels(costs, profile, budgets, latency_budget_ms=config.latency_budget_ms,
                           successors=linear_successors([u for u in units if u.name in by_name]), measure=measure,
                           samples=int(len(drop_idx) * batch), progress=fit_progress)  # fmt: skip
    fastest_check = None
    if runs_here(config.device, profile):
        # The profile prices ops one by one; in a real network the device fuses runs of one precision
        # (an INT8 conv writes u8 straight into the next INT8 op) and pays for quantize/reorder between
        # them. Where the calibration device is the target, time the selected fastest level against
        # uniform mixes and keep the fastest (on BlazeFace here all-INT8 is no faster than all-BF16).
        if progress:
            progress("time the fastest level", 0, 1)
        levels[-1], fastest_check = check_fastest(levels[-1], levels[-2], costs, profile, routes,
                                                  batches(drop_idx[:1])[0])  # fmt: skip
        if progress:
            progress("time the fastest level", 1, 1)
    if levels[-1].measured_drop is None:  # the on-device check swapped the fastest level
        levels[-1] = replace(levels[-1], measured_drop=measure(levels[-1].choices))
    refinement = None
    if runs_here(config.device, profile):
        if progress:
            progress("refine the fast route", 0, 1)
        levels, refinement = refine_fast_route(levels, manifest.ops, costs, producers, profile, routes,
                                               batches(drop_idx[:1])[0], losses)  # fmt: skip
        if progress:
            progress("refine the fast route", 1, 1)
    manifest.levels = levels
    manifest.default_level = level_for(levels, config.max_drop)
    fast_k, fast_route = len(levels) - 1, None
    if runs_here(config.device, profile) and config.router and q_model is not None:
        if progress:
            progress("time the fast route", 0, 1)
        fast_k, fast_route = fastest_route(levels, routes, batches(drop_idx[:1])[0])
        if progress:
            progress("time the fast route", 1, 1)
    if not config.router:
        manifest.router_note = "not built (--no-router)"
    elif q_model is None:
        manifest.router_note = "not built: the package has no INT8 variants (the fast route would be the levels')"
    else:
        manifest.router, manifest.router_note = _fit_router(
            levels, fast_k, costs, units, routes, batches(order), profile, config, progress,
            manifest.decision,
        )
    manifest.selection = {
        "objective": OBJECTIVE,
        "latency_budget_ms": config.latency_budget_ms,
        "levels": [lv.max_drop for lv in levels],
        "escalation_rate": {n: float(np.mean(e)) for n, e in escalated.items()},
        "fastest_level_check": fastest_check,
        "fast_route_refinement": refinement,
        "fast_route": fast_route,
    }
    if progress:
        progress("build package IR", 0, 1)
    package_model = _package_ir(routes, manifest, config.max_drop)
    if progress:
        progress("build package IR", 1, 1)
    if runs_here(config.device, profile):
        if progress:
            progress("time levels and cascade", 0, 1)
        if time_bodies(package_model, manifest, batches(drop_idx[:1])[0]):  # the default changed: rebuild
            package_model = _package_ir(routes, manifest, config.max_drop)
        if progress:
            progress("time levels and cascade", 1, 1)
    return package_model, manifest


def _package_ir(routes: Routes, manifest: Manifest, max_drop: float) -> ov.Model:
    """The package IR, its initial state the default policy (the level or cascade point ``max_drop`` picks)."""
    plan = choose_body(manifest, max_drop)
    manifest.default_level = plan.level
    tau = NEVER if plan.tau is None else plan.tau
    return build_package_model(routes.fp32, routes.int8, routes.variants, [lv.choices for lv in manifest.levels],
                               plan.level, q4_model=routes.int4, router=manifest.router, tau=tau,
                               decision=manifest.decision)  # fmt: skip


def _fit_router(
    levels: list[Level],
    fast_k: int,
    costs: list[OpCost],
    units: list[RoutableOp],
    routes: Routes,
    data: list[list[np.ndarray]],
    profile: DeviceProfile,
    config: CalibrationConfig,
    progress: Progress | None,
    decision: Decision,
) -> tuple[Router | None, str]:
    """Fit the router on level ``fast_k`` (the fast route: the fastest level, :func:`~.ondevice.fastest_route`)
    against level 0 (FP32): every calibration sample and its shifted copies, the second half of them held
    out (AUC, thresholds)."""
    fast = levels[fast_k].choices
    ranges = {}
    for u in units:
        rng = act_range(u)
        if u.name in fast and fast[u.name].fast is Precision.INT8 and rng is not None:
            ranges[u.name] = rng
    extra = [ops.parameter([], np.float32, name="escalate")] if any(c.routed for c in fast.values()) else []
    body, inputs = routes.body(fast, "apsq/probe", extra)
    elements = {u.name: int(math.prod(u.op.get_input_shape(0))) for u in units}
    held_out = np.arange(len(data)) >= len(data) // 2
    rows, probabilities = collect_fit_data(
        body, inputs, routes.fp32, ranges, elements, data, held_out, config.router_shifts, seed=config.seed,
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
        decision = decide(outputs_f32(model, data, k), class_axis, name)
    return replace(decision, output=k)


def _sequence(decision: Decision, model: ov.Model, labels: np.ndarray | None, ctc: bool | None) -> Decision:
    """``decision`` reading its output as a CTC path where ``ctc`` says so, or (``None``) where the labels
    are CTC label rows ``(N, L)`` of integers for a ``(N, T, classes)`` judged output with its classes last
    (a per-position tagger with ``(N, T)`` labels wants ``--no-ctc``).

    :raises ConfigError: ``ctc`` for a judged output that is not ``(batch, time, classes)``."""
    rank = len(model.outputs[decision.output].get_partial_shape())
    if ctc is None:
        ctc = (labels is not None and np.ndim(labels) == 2 and np.asarray(labels).dtype.kind in "iu" and rank == 3
               and decision.identity)  # fmt: skip
    if not ctc:
        return decision
    if rank != 3 or not decision.identity:
        raise ConfigError(f"--ctc: the judged output (output {decision.output}) must be (batch, time, classes) with "
                          f"the classes last; it has rank {rank}")  # fmt: skip
    return replace(decision, sequence="ctc")


__all__ = ["CalibrationConfig", "calibrate", "calibrate_model", "read_model", "sample_order"]
