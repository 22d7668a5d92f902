"""Sensitivity Scores: how much each routed operator's precision matters to the model's output.

Where it sits in the data flow: ``calibrate.pipeline`` calls :func:`score_ops` on the FP32 model
and the calibration samples; the scores go to the manifest and order the routing policy.

Metrics form a registry keyed by :class:`SensitivityMetric` (as NNCF does). The first one,
``fd-gradient``, combines three measured or structural terms:

* **g** — gradient magnitude w.r.t. the op's output, estimated by the *random-direction forward
  finite difference* (RDFD): add ``h·u`` to the op output (``u`` a fixed N(0,1) direction, ``h =
  ε·RMS`` of that output over the calibration set, ε = 1e-2) and measure the relative change of
  the model output, ``g = mean_x ‖y(a+h·u) − y(a)‖ / (ε·‖y(a)‖)``. OpenVINO has no autodiff, so
  the perturbation is a graph input added after each op. Cost: ``N·(1 + n_ops)`` inferences.
* **t** — operator-type prior: depthwise/group convolutions hold few weights per channel and
  quantize worst (DESIGN.md §2), MatMuls (classifier heads) next, dense convolutions least.
* **d** — depth prior ``|2·depth/(n−1) − 1|``: 1 at the first and last routed op, 0 mid-network
  (the first conv and the FC head are the ones NNCF practice keeps at higher precision).

``score = 0.6·g/max(g) + 0.25·t + 0.15·d`` ∈ [0, 1]. The formula is stored in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from apsq_ov.errors import ConfigError
from apsq_ov.inputs import Samples

from .variants import find_routable_ops

TYPE_PRIOR = {"GroupConvolution": 1.0, "MatMul": 0.6, "Convolution": 0.5}
WEIGHTS = {"gradient": 0.6, "type": 0.25, "depth": 0.15}
FD_EPSILON = 1e-2


class SensitivityMetric(str, Enum):
    """Registered sensitivity metrics (``apsq-ov calibrate --sensitivity NAME``)."""

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
class OpSensitivity:
    """Score of one op with the components it was computed from."""

    components: dict[str, float]
    score: float


@dataclass(frozen=True)
class SensitivityReport:
    metric: SensitivityMetric
    formula: str
    estimator: str
    inferences: int
    ops: dict[str, OpSensitivity]
    input_absmax: dict[str, float]


def _rdfd_gradient(
    model: ov.Model, samples: Samples, config: dict, progress: Callable[[int, int], None] | None, seed: int
) -> tuple[dict[str, float], dict[str, float], int]:
    """Random-direction forward finite difference of the output w.r.t. each routable op's output."""
    probe = model.clone()
    units = find_routable_ops(probe)
    rng = np.random.default_rng(seed)
    eps_params, rms_outputs, absmax_outputs = [], [], []
    for unit in units:
        out = unit.out
        targets = list(out.get_target_inputs())
        shape = list(out.get_shape())
        eps = ops.parameter([], np.float32, name=f"apsq_eps_{unit.index}")
        noise = ops.constant(rng.standard_normal(shape).astype(np.float32))
        perturbed = ops.add(out, ops.multiply(eps, noise))
        for t in targets:
            t.replace_source_output(perturbed.output(0))
        axes = ops.constant(np.arange(len(shape), dtype=np.int64))
        rms = ops.sqrt(ops.reduce_mean(ops.multiply(out, out), axes, False))
        rms_outputs.append(ops.result(rms))
        x = unit.op.input(0).get_source_output()
        x_axes = ops.constant(np.arange(len(x.get_shape()), dtype=np.int64))
        absmax_outputs.append(ops.result(ops.reduce_max(ops.abs(x), x_axes, False)))
        eps_params.append(eps)
    n_user_outputs = len(probe.outputs)
    probe.add_parameters(eps_params)
    probe.add_results(rms_outputs + absmax_outputs)
    compiled = ov.Core().compile_model(probe, "CPU", config)
    request = compiled.create_infer_request()
    zeros = [np.zeros((), np.float32) for _ in units]
    n = len(samples)

    def run(i: int, eps_values: list[np.ndarray]) -> list[np.ndarray]:
        res = request.infer(samples.sample(i) + eps_values)
        return [res[j] for j in range(len(res))]

    base_y, rms_sum, absmax = [], np.zeros(len(units)), np.zeros(len(units))
    for i in range(n):
        res = run(i, zeros)
        base_y.append(np.concatenate([r.ravel() for r in res[:n_user_outputs]]).astype(np.float64))
        stats = np.array([float(r) for r in res[n_user_outputs:]])
        rms_sum += stats[: len(units)]
        absmax = np.maximum(absmax, stats[len(units) :])
        if progress:
            progress(i + 1, n * (1 + len(units)))
    h = FD_EPSILON * rms_sum / n
    grads: dict[str, float] = {}
    for k, unit in enumerate(units):
        eps_values = list(zeros)
        eps_values[k] = np.array(h[k], np.float32)
        rel = []
        for i in range(n):
            res = run(i, eps_values)
            y = np.concatenate([r.ravel() for r in res[:n_user_outputs]]).astype(np.float64)
            rel.append(np.linalg.norm(y - base_y[i]) / (np.linalg.norm(base_y[i]) + 1e-12) / FD_EPSILON)
            if progress:
                progress(n * (1 + k) + i + 1, n * (1 + len(units)))
        grads[unit.name] = float(np.mean(rel)) if h[k] > 0 else 0.0
    return grads, {u.name: float(a) for u, a in zip(units, absmax, strict=True)}, n * (1 + len(units))


def _fd_gradient_metric(
    model: ov.Model,
    samples: Samples,
    op_types: dict[str, str],
    depths: dict[str, int],
    config: dict,
    progress: Callable[[int, int], None] | None,
    seed: int,
) -> SensitivityReport:
    grads, input_absmax, cost = _rdfd_gradient(model, samples, config, progress, seed)
    gmax = max(grads.values()) or 1.0
    n = max(len(depths) - 1, 1)
    scored = {}
    for name, g in grads.items():
        comp = {
            "gradient": g,
            "gradient_norm": g / gmax,
            "type": TYPE_PRIOR.get(op_types[name], 0.5),
            "depth": abs(2.0 * depths[name] / n - 1.0),
        }
        score = (
            WEIGHTS["gradient"] * comp["gradient_norm"]
            + WEIGHTS["type"] * comp["type"]
            + WEIGHTS["depth"] * comp["depth"]
        )
        scored[name] = OpSensitivity(comp, float(score))
    return SensitivityReport(
        metric=SensitivityMetric.FD_GRADIENT,
        formula="score = 0.6*g/max(g) + 0.25*t + 0.15*d; g = mean_x ||y(a+h*u)-y(a)|| / (eps*||y(a)||), "
        "h = eps*RMS(a), eps = 1e-2; t = {GroupConvolution: 1.0, MatMul: 0.6, Convolution: 0.5}; "
        "d = |2*depth/(n-1) - 1|",
        estimator="random-direction forward finite difference (RDFD) at the op output",
        inferences=cost,
        ops=scored,
        input_absmax=input_absmax,
    )


SENSITIVITY_METRICS: dict[SensitivityMetric, Callable[..., SensitivityReport]] = {
    SensitivityMetric.FD_GRADIENT: _fd_gradient_metric,
}


def score_ops(
    model: ov.Model,
    samples: Samples,
    *,
    op_types: dict[str, str],
    depths: dict[str, int],
    metric: SensitivityMetric = SensitivityMetric.FD_GRADIENT,
    config: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
) -> SensitivityReport:
    """Score every routable op of ``model`` (FP32, static shapes) on ``samples``.

    :param op_types: op name → OpenVINO type, :param depths: op name → index among routed ops.
    :param progress: called with ``(done, total)`` inferences.
    """
    return SENSITIVITY_METRICS[metric](model, samples, op_types, depths, config or {}, progress, seed)


def rank(report: SensitivityReport, names: Sequence[str]) -> list[str]:
    """``names`` from most to least sensitive."""
    return sorted(names, key=lambda n: -report.ops[n].score)
