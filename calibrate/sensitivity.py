"""Sensitivity Scores: how much each routed operator's precision matters to the model's output.

Where it sits in the data flow: ``calibrate.pipeline`` calls :func:`score_ops` on the FP32 model
and the scoring split of the calibration samples; the scores go to the manifest, the report and
the routing policy's tie-breaks. Ground truth (the measured isolated drop of each op) is taken on
a *different* split by the pipeline, so the two can be compared honestly (``apsq-ov report``,
``benchmarks/sensitivity.py``).

Metrics form a registry keyed by :class:`SensitivityMetric` (as NNCF does); both share one probe
pass over the FP32 model (:func:`probe`):

* **g** — gradient magnitude w.r.t. the op's output, estimated by the *random-direction forward
  finite difference* (RDFD): add ``h·u`` to the op output (``u`` a fixed N(0,1) direction,
  ``h = ε·RMS`` of that output, ε = 1e-2) and measure ``‖y(a+h·u) − y(a)‖ / (ε·‖y(a)‖)``, averaged
  over the samples. OpenVINO has no autodiff, so the perturbation is a graph input added after
  each op. Cost: ``N·(1 + n_ops)`` inferences.
* activation statistics of the op input against NNCF's INT8 range (from the same pass): mean
  square, clipping error ``mean((x − clip(x))²)``, fraction of non-zero values.

``qnoise`` (default) — first-order output error of lowering the op alone. The relative noise a
precision adds at the op (activation rounding ``step²/12`` on non-zero values + clipping error,
over the activation power; plus the weights' relative error ``‖W_p − W‖²/‖W‖²`` measured on the
actual variant weights) propagates to the output through ``g``:
``predicted NMSE_p = g² · (r_act,p² + r_w,p²)``. Op type and depth enter through the measured
``g`` and ``r`` (a depthwise conv's per-channel spread shows up as a large weight error, a deep
op's small influence as a small ``g``) and are reported as components; nothing is fitted.
``score`` = predicted NMSE of the op's coarsest variant.

``qnoise`` is cheaper (no isolated runs) but its isotropic RDFD step is scaled by the op output's
RMS, so an op whose output has an outlier channel gets an inflated ``g``. ``qdfd`` (default) has no
such blind spot: it pushes each op's *own* precision error through the network (a forward
difference along the real noise direction) and reads the output KL on the scoring split, through
request state on the compiled adaptive IR (no recompilation).

``task`` — ``qdfd`` read through the task metric instead of the output KL, where the calibration data
has labels: each op alone lowered on the scoring split, the loss = accuracy drop (classifier) or CER
increase (CTC sequence output, labels as class indices). Measured on PP-OCRv4 rec, the output KL ranks
how many positions an op flips (ρ 0.95 on 2,000 fresh lines) but not its CER change (ρ −0.04): some
ops' INT8 error lowers CER. Its cost is qdfd's; it needs a scoring split large enough for the task
metric to resolve single-op changes (hundreds of lines for OCR).

Cost of ``qdfd``/``task`` in inferences: ``N·(1 + Σ_ops lower precisions)`` isolated runs on the N
scoring samples, plus the probe for the report's components (statistics + RDFD) on at most
``PROBE_SAMPLES`` of them: ``min(N, 64)·(2 + n_ops)``.

``fd-gradient`` — the first metric: ``0.6·g/max(g) + 0.25·t + 0.15·d`` with an op-type prior
``t`` and a depth prior ``d = |2·depth/(n−1) − 1|``; kept for comparison.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from apsq_ov.errors import ConfigError
from apsq_ov.inputs import Samples
from apsq_ov.precision import Precision

from .variants import RoutableOp, act_range, find_routable_ops, variant_output

TYPE_PRIOR = {"GroupConvolution": 1.0, "MatMul": 0.6, "Convolution": 0.5}
WEIGHTS = {"gradient": 0.6, "type": 0.25, "depth": 0.15}
FD_EPSILON = 1e-2
PROBE_SAMPLES = 64
"""``qdfd``/``task``: samples the component probe (RDFD gradient, local errors) reads; the losses read all."""
Isolated = Callable[[Callable[[int, int], None] | None], dict[str, dict[Precision, dict[str, float]]]]
"""``isolated(progress)`` → ``{op: {precision: {"top1", "kl", "nmse", ...}}}`` on the scoring split."""
# Relative rounding error of a float with an 8-bit (bf16) or 11-bit (fp16) significand: uniform in ±2^-p.
FLOAT_REL_NOISE2 = {Precision.BF16: (2.0**-8) ** 2 / 3.0, Precision.FP16: (2.0**-11) ** 2 / 3.0}


class SensitivityMetric(str, Enum):
    """Registered sensitivity metrics (``apsq-ov calibrate --sensitivity NAME``)."""

    QDFD = "qdfd"
    TASK = "task"
    QNOISE = "qnoise"
    FD_GRADIENT = "fd-gradient"

    @classmethod
    def parse(cls, name: str | SensitivityMetric) -> SensitivityMetric:
        try:
            return cls(name)
        except ValueError:
            raise ConfigError(
                f"unknown sensitivity metric {name!r}; use one of {', '.join(m.value for m in cls)}"
            ) from None


@dataclass(frozen=True)
class OpQuantInfo:
    """What calibration knows of one op's low-precision variants before any of them runs.

    :param act_range: NNCF's activation quantizer ``(low, high, levels)``, or None without INT8.
    :param weight_error: ``‖W_p − W‖² / ‖W‖²`` per lower precision, measured on the variant weights.
    """

    type: str
    depth: int
    variants: tuple[Precision, ...]
    act_range: tuple[float, float, int] | None = None
    weight_error: dict[Precision, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OpSensitivity:
    """Score of one op with the components it was computed from (``predicted``: per precision)."""

    components: dict[str, float]
    score: float
    predicted: dict[Precision, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SensitivityReport:
    metric: SensitivityMetric
    formula: str
    estimator: str
    inferences: int
    ops: dict[str, OpSensitivity]
    input_absmax: dict[str, float]


@dataclass(frozen=True)
class ProbeStats:
    """Per-op measurements of the probe passes (means over the samples)."""

    gradient: dict[str, float]
    input_absmax: dict[str, float]
    input_msq: dict[str, float]
    clip_mse: dict[str, float]
    nonzero: dict[str, float]
    local_error: dict[str, dict[Precision, float]]
    inferences: int


def _mean_all(x: ov.Output | ov.Node) -> ov.Node:
    rank = len(x.get_output_partial_shape(0) if isinstance(x, ov.Node) else x.get_partial_shape())
    return ops.reduce_mean(x, ops.constant(np.arange(rank, dtype=np.int64)), False)


def _statistics_pass(
    model: ov.Model, samples: Samples, units: dict[str, RoutableOp], variants: dict[str, tuple[Precision, ...]],
    config: dict, progress: Callable[[int, int], None] | None, total: int,
) -> tuple[dict[str, np.ndarray], dict[str, dict[Precision, float]]]:  # fmt: skip
    """One pass: output RMS, input statistics vs the INT8 range, and each variant's local error
    ``mean((y_p − y)²) / mean(y²)`` at the op output, all computed in the graph on the real input."""
    stats_model = model.clone()
    results, layout = [], []
    for unit in find_routable_ops(stats_model):
        main = units[unit.name]
        x, out = unit.op.input(0).get_source_output(), unit.out
        low, high, _ = act_range(main) or (-3.0e38, 3.0e38, 256)
        clipped = ops.subtract(x, ops.clamp(x, low, high))
        outs = [
            _mean_all(ops.multiply(out, out)),
            ops.reduce_max(ops.abs(x), ops.constant(np.arange(len(x.get_shape()), dtype=np.int64)), False),
            _mean_all(ops.multiply(x, x)),
            _mean_all(ops.multiply(clipped, clipped)),
            _mean_all(ops.convert(ops.not_equal(x, np.float32(0.0)), "f32")),
        ]
        lower = [p for p in variants[unit.name] if p is not Precision.FP32]
        for p in lower:
            diff = ops.subtract(variant_output(main, p, x), out)
            outs.append(_mean_all(ops.multiply(diff, diff)))
        results += [ops.result(o) for o in outs]
        layout.append((unit.name, lower))
    stats_model.add_results(results)
    request = ov.Core().compile_model(stats_model, "CPU", config).create_infer_request()
    n_user = len(model.outputs)
    acc = np.zeros(len(results))
    absmax_idx = [sum(5 + len(lower) for _, lower in layout[:k]) + 1 for k in range(len(layout))]
    absmax = np.zeros(len(layout))
    for i in range(len(samples)):
        res = request.infer(samples.sample(i))
        vals = np.array([float(res[n_user + j]) for j in range(len(results))])
        acc += vals
        absmax = np.maximum(absmax, vals[absmax_idx])
        if progress:
            progress(i + 1, total)
    mean = acc / len(samples)
    per_op: dict[str, np.ndarray] = {}
    local: dict[str, dict[Precision, float]] = {}
    k = 0
    for (name, lower), amax in zip(layout, absmax, strict=True):
        base = mean[k : k + 5].copy()
        base[1] = amax
        per_op[name] = base
        local[name] = {p: float(mean[k + 5 + j] / max(base[0], 1e-30)) for j, p in enumerate(lower)}
        k += 5 + len(lower)
    return per_op, local


def probe(
    model: ov.Model,
    samples: Samples,
    units: dict[str, RoutableOp],
    variants: dict[str, tuple[Precision, ...]],
    config: dict,
    progress: Callable[[int, int], None] | None,
    seed: int,
    output: int | None = None,
) -> ProbeStats:
    """Statistics pass + RDFD gradient magnitudes of every routable op of ``model`` (not modified).

    :param units: the routable ops of the calibrated model (with NNCF's INT8 parts), by name.
    :param variants: per op, the precisions whose local error to measure.
    :param output: the model output the RDFD gradient is taken on (the judged one); None: all of them.
    """
    n = len(samples)
    total = n * (2 + len(units))
    per_op, local = _statistics_pass(model, samples, units, variants, config, progress, total)
    rdfd_model = model.clone()
    found = find_routable_ops(rdfd_model)
    rng = np.random.default_rng(seed)
    eps_params = []
    for unit in found:
        out = unit.out
        targets = list(out.get_target_inputs())
        eps = ops.parameter([], np.float32, name=f"apsq_eps_{unit.index}")
        noise = ops.constant(rng.standard_normal(list(out.get_shape())).astype(np.float32))
        perturbed = ops.add(out, ops.multiply(eps, noise))
        for t in targets:
            t.replace_source_output(perturbed.output(0))
        eps_params.append(eps)
    n_user = len(rdfd_model.outputs)
    read = range(n_user) if output is None else [output]
    rdfd_model.add_parameters(eps_params)
    request = ov.Core().compile_model(rdfd_model, "CPU", config).create_infer_request()
    zeros = [np.zeros((), np.float32) for _ in found]

    def run(i: int, eps_values: list[np.ndarray]) -> np.ndarray:
        res = request.infer(samples.sample(i) + eps_values)
        return np.concatenate([np.asarray(res[j]).ravel() for j in read]).astype(np.float64)

    base_y = []
    for i in range(n):
        base_y.append(run(i, zeros))
        if progress:
            progress(n + i + 1, total)
    grads: dict[str, float] = {}
    for k, unit in enumerate(found):
        h = FD_EPSILON * float(np.sqrt(per_op[unit.name][0]))
        eps_values = list(zeros)
        eps_values[k] = np.array(h, np.float32)
        rel = []
        for i in range(n):
            y = run(i, eps_values)
            rel.append(np.linalg.norm(y - base_y[i]) / (np.linalg.norm(base_y[i]) + 1e-12) / FD_EPSILON)
            if progress:
                progress(n * (2 + k) + i + 1, total)
        grads[unit.name] = float(np.mean(rel)) if h > 0 else 0.0
    names = [u.name for u in found]
    return ProbeStats(
        gradient=grads,
        input_absmax={m: float(per_op[m][1]) for m in names},
        input_msq={m: float(per_op[m][2]) for m in names},
        clip_mse={m: float(per_op[m][3]) for m in names},
        nonzero={m: float(per_op[m][4]) for m in names},
        local_error=local,
        inferences=total,
    )


def activation_noise(info: OpQuantInfo, stats: ProbeStats, name: str, precision: Precision) -> float:
    """Analytic relative activation noise power ``r_act²`` that ``precision`` adds at the op input."""
    msq = max(stats.input_msq[name], 1e-30)
    if precision in FLOAT_REL_NOISE2:
        return FLOAT_REL_NOISE2[precision] * stats.nonzero[name]
    if precision is Precision.INT8 and info.act_range is not None:
        low, high, levels = info.act_range
        step = (high - low) / max(levels - 1, 1)
        return (step**2 / 12.0 * stats.nonzero[name] + stats.clip_mse[name]) / msq
    return 0.0


def _context_components(info: OpQuantInfo, stats: ProbeStats, name: str) -> dict[str, float]:
    """What the report shows beside every score: clipping against the INT8 range, type prior, depth."""
    comp = {"type": TYPE_PRIOR.get(info.type, 0.5), "depth": float(info.depth)}
    if info.act_range is not None:
        comp["clip_mse_ratio"] = stats.clip_mse[name] / max(stats.input_msq[name], 1e-30)
    return comp


def _qnoise_metric(
    model: ov.Model,
    samples: Samples,
    infos: dict[str, OpQuantInfo],
    units: dict[str, RoutableOp],
    config: dict,
    progress: Callable[[int, int], None] | None,
    seed: int,
    isolated: Isolated | None = None,
    output: int | None = None,
) -> SensitivityReport:
    stats = probe(model, samples, units, {n: i.variants for n, i in infos.items()}, config, progress, seed, output)
    scored = {}
    for name, info in infos.items():
        g = stats.gradient[name]
        predicted: dict[Precision, float] = {}
        comp = {"gradient": g}
        for p in info.variants:
            if p is Precision.FP32:
                continue
            local = stats.local_error[name][p]
            predicted[p] = g * g * local
            comp[f"local_error_{p.value}"] = local
            comp[f"act_noise_{p.value}"] = activation_noise(info, stats, name, p)
            comp[f"weight_noise_{p.value}"] = info.weight_error.get(p, 0.0)
        comp.update(_context_components(info, stats, name))
        score = predicted[max(predicted, key=lambda p: p.rank)] if predicted else 0.0
        scored[name] = OpSensitivity(comp, float(score), predicted)
    return SensitivityReport(
        metric=SensitivityMetric.QNOISE,
        formula="predicted NMSE_p = g^2 * e_p; e_p = mean((y_p - y)^2) / mean(y^2), the local error of the op's "
        "precision-p variant (NNCF's activation quantizer, int8 weights and corrected bias for int8) at its "
        "output on the real calibration input; g = RDFD gradient magnitude; score = predicted NMSE of the "
        "op's coarsest variant. Diagnostics: analytic activation noise (step^2/12 on non-zeros + clipping "
        "error over mean(x^2)) and weight error ||W_p - W||^2/||W||^2",
        estimator="statistics pass (variant local errors in-graph) + RDFD gradient at the op output",
        inferences=stats.inferences,
        ops=scored,
        input_absmax=stats.input_absmax,
    )


def _fd_gradient_metric(
    model: ov.Model,
    samples: Samples,
    infos: dict[str, OpQuantInfo],
    units: dict[str, RoutableOp],
    config: dict,
    progress: Callable[[int, int], None] | None,
    seed: int,
    isolated: Isolated | None = None,
    output: int | None = None,
) -> SensitivityReport:
    stats = probe(model, samples, units, {n: () for n in infos}, config, progress, seed, output)
    gmax = max(stats.gradient.values()) or 1.0
    n = max(len(infos) - 1, 1)
    scored = {}
    for name, info in infos.items():
        g = stats.gradient[name]
        comp = {
            "gradient": g,
            "gradient_norm": g / gmax,
            "type": TYPE_PRIOR.get(info.type, 0.5),
            "depth": abs(2.0 * info.depth / n - 1.0),
        }
        score = sum(WEIGHTS[k] * comp[k if k != "gradient" else "gradient_norm"] for k in WEIGHTS)
        scored[name] = OpSensitivity(comp, float(score))
    return SensitivityReport(
        metric=SensitivityMetric.FD_GRADIENT,
        formula="score = 0.6*g/max(g) + 0.25*t + 0.15*d; g = mean_x ||y(a+h*u)-y(a)|| / (eps*||y(a)||), "
        "h = eps*RMS(a), eps = 1e-2; t = {GroupConvolution: 1.0, MatMul: 0.6, Convolution: 0.5}; "
        "d = |2*depth/(n-1) - 1|",
        estimator="random-direction forward finite difference (RDFD) at the op output",
        inferences=stats.inferences,
        ops=scored,
        input_absmax=stats.input_absmax,
    )


def _qdfd_metric(
    model: ov.Model,
    samples: Samples,
    infos: dict[str, OpQuantInfo],
    units: dict[str, RoutableOp],
    config: dict,
    progress: Callable[[int, int], None] | None,
    seed: int,
    isolated: Isolated | None = None,
    output: int | None = None,
    reading: str = "kl",
) -> SensitivityReport:
    metric = SensitivityMetric.QDFD if reading == "kl" else SensitivityMetric.TASK
    if isolated is None:
        raise ConfigError(f"the {metric.value} metric needs the compiled adaptive model (run it through calibrate)")
    no_labels = ConfigError(
        "--sensitivity task needs labels in the calibration data: an .npz 'labels' array with a class per "
        "sample (classifier output) or -1-padded class indices per sample (CTC sequence output, blank 0)"
    )
    if reading == "task" and samples.labels is None:
        raise no_labels
    # The probe only feeds the report's components here (gradient, local error, clip ratio, input
    # abs-max): its statistics + RDFD passes cost (2 + ops) inferences a sample, as many as the INT8
    # isolated runs, so it reads at most PROBE_SAMPLES of the split, however many the losses need.
    probed = samples.subset(slice(0, PROBE_SAMPLES))
    stats = probe(model, probed, units, {n: i.variants for n, i in infos.items()}, config, None, seed, output)
    n_stats = stats.inferences
    losses = isolated(progress)
    if reading == "task" and any("task" not in loss for per_op in losses.values() for loss in per_op.values()):
        raise no_labels
    scored = {}
    for name, info in infos.items():
        comp: dict[str, float] = {"gradient": stats.gradient[name]}
        predicted: dict[Precision, float] = {}
        for p, loss in losses.get(name, {}).items():
            predicted[p] = loss[reading]
            comp[f"kl_{p.value}"] = loss["kl"]
            comp[f"nmse_{p.value}"] = loss["nmse"]
            if "task" in loss:
                comp[f"task_{p.value}"] = loss["task"]
            comp[f"local_error_{p.value}"] = stats.local_error[name][p]
            comp[f"weight_noise_{p.value}"] = info.weight_error.get(p, 0.0)
        comp.update(_context_components(info, stats, name))
        score = predicted[max(predicted, key=lambda p: p.rank)] if predicted else 0.0
        scored[name] = OpSensitivity(comp, float(score), predicted)
    n = len(samples)
    n_isolated = n * (1 + sum(len([p for p in i.variants if p is not Precision.FP32]) for i in infos.values()))
    read = (
        "KL(y_fp32 || y)"
        if reading == "kl"
        else "the task metric's loss against the labels (accuracy drop for a classifier, CER increase of the "
        "greedy CTC decode for a sequence output)"
    )
    return SensitivityReport(
        metric=metric,
        formula=f"predicted_p = {read} when the op's output moves by its own precision-p error "
        "(y_p - y): a forward difference of the network output along the op's real quantization-noise "
        "direction (= the op alone lowered, read through request state); score = predicted loss of the "
        "op's coarsest variant. Components: RDFD gradient g, KL, NMSE, local error, weight error, clip ratio",
        estimator="quantization-direction forward difference (QDFD) on the scoring split, no recompilation; "
        f"components from the RDFD probe on its first {min(len(samples), PROBE_SAMPLES)} samples",
        inferences=n_stats + n_isolated,
        ops=scored,
        input_absmax=stats.input_absmax,
    )


SENSITIVITY_METRICS: dict[SensitivityMetric, Callable[..., SensitivityReport]] = {
    SensitivityMetric.QDFD: _qdfd_metric,
    SensitivityMetric.TASK: functools.partial(_qdfd_metric, reading="task"),
    SensitivityMetric.QNOISE: _qnoise_metric,
    SensitivityMetric.FD_GRADIENT: _fd_gradient_metric,
}


def score_ops(
    model: ov.Model,
    samples: Samples,
    infos: dict[str, OpQuantInfo],
    units: dict[str, RoutableOp],
    *,
    metric: SensitivityMetric = SensitivityMetric.QNOISE,
    config: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
    isolated: Isolated | None = None,
    output: int | None = None,
) -> SensitivityReport:
    """Score every routable op of ``model`` (FP32, static shapes, not modified) on ``samples``.

    :param infos: per op name, what is known of its variants (:class:`OpQuantInfo`).
    :param units: per op name, the routable op of the calibrated model (with NNCF's INT8 parts).
    :param progress: called with ``(done, total)`` inferences.
    :param isolated: measures every (op, precision) alone on the scoring split (metrics that need it).
    :param output: the output calibration judges (:class:`apsq_ov.decisions.Decision`): gradients are
        taken on it alone; None: on every output.
    """
    return SENSITIVITY_METRICS[metric](model, samples, infos, units, config or {}, progress, seed, isolated,
                                       output=output)  # fmt: skip


def rank(report: SensitivityReport, names: Sequence[str]) -> list[str]:
    """``names`` from most to least sensitive."""
    return sorted(names, key=lambda n: -report.ops[n].score)
