"""The per-input router: in-graph features of the fast route, a fitted logistic risk, and the
escalation cascade (run the fast route; re-run the inputs it is likely to get wrong on the precise one).

Where it sits in the data flow: calibration's last phase, after the levels are selected
(:mod:`.selection`). The *fast route* is the package's fastest level body, the *precise route*
level 0 (plain FP32). Calibration runs the fast route on the calibration data and on shifted copies
of it (:data:`CALIBRATION_SHIFTS`) with every candidate feature as an extra output, labels each input
by the fraction of its output positions whose top-1 differs from FP32's (the levels' drop metric; for a
classifier, whether its top-1 flips), and fits a logistic risk over a few
``(feature, op)`` terms chosen by cross-validated AUC under an in-graph cost cap
(:func:`fit_router`). In the package IR the cascade body computes the same features and risk with
graph ops (weights are constants, :func:`risk_output`) and re-runs the input on the precise route when
the risk exceeds the ``apsq/tau`` state; ``max_drop`` → τ is a table in the manifest, so moving the
threshold is one state write per request, no recompilation.

Why a cascade and not a per-op router before each op: measured here (DESIGN.md §2 and the issue-5
study), activation statistics of single ops predict an INT8 flip with AUC 0.74 on EfficientNet-Lite0
and the signal sits in the last stage, next to the output; the top-2 margin of the fast route's own
output predicts it with 0.84-0.89. Both need the fast pass to have run, so the decision is taken after
it, once per input, for the whole route.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from apsq_ov import shifts
from apsq_ov.decisions import CLASSES_LAST, Decision
from apsq_ov.errors import CalibrationError
from apsq_ov.package import EPS, NEVER, CascadePoint, Feature, Router, Term
from apsq_ov.shifts import CALIBRATION

RISK_NODE = "apsq/cascade/risk"
"""Friendly name of the risk (logit) node in the package IR's cascade body."""

OP_FEATURES = (Feature.AMAX_RATIO, Feature.CLIP_FRAC, Feature.STD_OVER_STEP, Feature.NEARZERO_FRAC)
PASSES = {Feature.AMAX_RATIO: 2, Feature.CLIP_FRAC: 3, Feature.STD_OVER_STEP: 3, Feature.NEARZERO_FRAC: 3}
"""Element passes each op feature costs (abs, compare, convert, multiply, reduce): the cost model."""


def is_probabilities(y: np.ndarray) -> bool:
    """Do the rows of the last axis already hold probabilities (non-negative, summing to 1)?"""
    y = np.asarray(y, dtype=np.float64)
    return bool(y.min() >= 0.0 and np.allclose(y.sum(axis=-1), 1.0, atol=1e-3))


def as_probabilities(y: np.ndarray) -> np.ndarray:
    """Rows of the last axis as probabilities: as they are if they already are, else softmax (clipped
    away from 0 so logs stay finite)."""
    y = np.asarray(y, dtype=np.float64)
    if is_probabilities(y):
        return np.clip(y, 1e-12, 1.0)
    z = np.exp(y - y.max(axis=-1, keepdims=True))
    return np.clip(z / z.sum(axis=-1, keepdims=True), 1e-12, 1.0)  # exp underflows to 0 for far-apart logits


def _axes(x: ov.Output) -> ov.Node:
    return ops.constant(np.arange(len(x.get_partial_shape()), dtype=np.int64))


def _c(value: float) -> ov.Node:
    return ops.constant(np.float32(value))


def feature_output(feature: Feature, x: ov.Output, lo: float, hi: float, levels: int) -> ov.Output:
    """``feature`` of the op input ``x`` as a scalar f32 graph output (see :class:`Feature`)."""
    step = (hi - lo) / max(levels - 1, 1)
    if x.get_element_type() != ov.Type.f32:  # inside a bf16/f16 region of the level body
        x = ops.convert(x, "f32").output(0)
    axes = _axes(x)
    if feature is Feature.AMAX_RATIO:
        amax = ops.reduce_max(ops.abs(x), axes, False)
        return ops.divide(amax, _c(max(abs(lo), abs(hi), 1e-30))).output(0)
    if feature is Feature.CLIP_FRAC:
        clip = ops.logical_or(ops.greater(x, _c(hi)), ops.less(x, _c(lo)))
        return ops.reduce_mean(ops.convert(clip, "f32"), axes, False).output(0)
    if feature is Feature.STD_OVER_STEP:
        mean = ops.reduce_mean(x, axes, False)
        msq = ops.reduce_mean(ops.multiply(x, x), axes, False)
        var = ops.maximum(ops.subtract(msq, ops.multiply(mean, mean)), _c(0.0))
        return ops.divide(ops.sqrt(var), _c(max(step, 1e-30))).output(0)
    if feature is Feature.NEARZERO_FRAC:
        near = ops.less(ops.abs(x), _c(step / 2))
        return ops.reduce_mean(ops.convert(near, "f32"), axes, False).output(0)
    raise CalibrationError(f"feature {feature.value} is not an op-input feature")


def margin_output(y: ov.Output, probabilities: bool) -> ov.Output:
    """Top-2 probability margin of ``y`` along its last axis, min over every other position (scalar)."""
    last = len(y.get_partial_shape()) - 1
    if y.get_element_type() != ov.Type.f32:
        y = ops.convert(y, "f32").output(0)
    p = y if probabilities else ops.softmax(y, last).output(0)
    top = ops.topk(p, ops.constant(np.int64(2)), last, "max", "value").output(0)
    axis = ops.constant(np.int64(last))
    first, second = (ops.gather(top, ops.constant(np.int64(i)), axis) for i in (0, 1))
    gap = ops.subtract(first, second)
    return ops.reduce_min(gap, _axes(gap.output(0)), False).output(0)


# ----------------------------------------------------------------------------------------- the graph


def pre_quant_input(op: ov.Node) -> ov.Output:
    """The activation ``op`` quantizes: the input of the FakeQuantize feeding it (through Reshape /
    Squeeze / Unsqueeze / Transpose / Convert), or its plain input 0 when none does."""
    src = op.input(0).get_source_output()
    node = src.get_node()
    while node.get_type_name() in ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Convert"):
        node = node.input(0).get_source_output().get_node()
    if node.get_type_name() == "FakeQuantize":
        return node.input(0).get_source_output()
    return src


def term_values(
    keys: Sequence[tuple[Feature, str | None]],
    inputs: dict[str, ov.Output],
    output: ov.Output,
    ranges: dict[str, tuple[float, float, int]],
    probabilities: bool,
) -> list[ov.Output]:
    """The raw value of each ``(feature, op)`` as a scalar graph output.

    :param inputs: op name → the op's pre-quantization input in the body being built.
    :param output: the body's judged output, read as class scores (for the margin).
    """
    values = []
    for feature, op in keys:
        if feature is Feature.MARGIN:
            values.append(margin_output(output, probabilities))
            continue
        if op not in inputs or op not in ranges:
            raise CalibrationError(f"op={op}: router feature {feature.value} needs the op in the fast route")
        values.append(feature_output(feature, inputs[op], *ranges[op]))
    return values


def risk_output(router: Router, inputs: dict[str, ov.Output], output: ov.Output) -> ov.Output:
    """``bias + Σ weight · log(feature + EPS)`` as graph ops (scalar f32)."""
    values = term_values([t.key for t in router.terms], inputs, output, router.ranges, router.probabilities)
    z: ov.Output = _c(router.bias).output(0)
    for term, v in zip(router.terms, values, strict=True):
        z = ops.add(z, ops.multiply(ops.log(ops.add(v, _c(EPS))), _c(term.weight))).output(0)
    return z


def risk_model(package_model: ov.Model) -> ov.Model:
    """The package IR's cascade body with the router's risk as its only output: inputs are the model's
    inputs, then the body's scalar state parameters (``escalate`` — feed 1.0 —, ``tau``, ``level``).
    It is the deployed graph itself, so evaluating it measures exactly what the cascade decides on.

    :raises CalibrationError: if the IR has no cascade.
    """
    stack = [package_model]
    while stack:
        model = stack.pop()
        for node in model.get_ordered_ops():
            if node.get_friendly_name() == RISK_NODE:
                return ov.Model([ops.result(node.output(0))], model.get_parameters(), "apsq/risk")
            if node.get_type_name() == "If":
                stack += [node.get_then_body(), node.get_else_body()]
    raise CalibrationError("the package IR has no escalation cascade (calibrated without a router?)")


def probe_model(
    body: ov.Model, inputs: dict[str, ov.Output], keys: Sequence[tuple[Feature, str | None]], router_ranges: dict,
    probabilities: bool, decision: Decision = CLASSES_LAST,
) -> ov.Model:
    """``body`` (a level body: outputs + route) with every candidate term's raw value appended as outputs
    (the margin on the judged output read as class scores, ``decision``)."""
    output = decision.graph_scores(decision.pick(body.get_results()).input_value(0))
    values = term_values(keys, inputs, output, router_ranges, probabilities)
    body.add_results([ops.result(v) for v in values])
    body.validate_nodes_and_infer_types()
    return body


# ------------------------------------------------------------------------------------ shifts (fit)


CALIBRATION_SHIFTS = tuple(CALIBRATION)
"""Shifted copies of the calibration data the router is fitted on (:data:`apsq_ov.shifts.CALIBRATION`),
milder than the evaluation's: gaussian noise σ = 0.1 of the input's range, darkening ×0.5 towards its
minimum, contrast ×1.5 about its middle, gaussian blur σ = 1 px; all clipped to the calibration range."""


def shift_calibration(x: np.ndarray, name: str, lo: float, hi: float, seed: int) -> np.ndarray:
    """One shifted copy of a float input batch ``x`` (value range ``[lo, hi]`` from the calibration set)."""
    if name not in CALIBRATION:
        raise CalibrationError(f"unknown calibration shift {name!r}; use {', '.join(CALIBRATION_SHIFTS)}")
    return shifts.apply(x, name, lo, hi, seed=seed, strength=CALIBRATION[name])


# ------------------------------------------------------------------------------------------- fitting


def log_features(raw: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.nan_to_num(raw, nan=0.0, posinf=1e30), 0.0) + EPS)


def _soft(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a soft label ``y`` in [0, 1] as a positive of weight ``y`` and a negative of weight ``1 − y``
    (rows, labels, weights; zero weights dropped): a 0/1 label stays exactly the row it was."""
    y = np.asarray(y, np.float64)
    rows = np.concatenate([np.arange(len(y)), np.arange(len(y))])
    labels = np.concatenate([np.ones(len(y), int), np.zeros(len(y), int)])
    weights = np.concatenate([y, 1.0 - y])
    keep = weights > 0
    return rows[keep], labels[keep], weights[keep]


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for label ``y``; a soft label (a fraction of positions flipped) counts as that
    weight of positive and the rest of negative (for 0/1 labels: the usual AUC)."""
    from sklearn.metrics import roc_auc_score

    rows, labels, weights = _soft(y)
    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(score)[rows], sample_weight=weights))


def _logistic(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """L2 logistic regression on standardised columns (soft labels as in :func:`_auc`: the fit then models
    the per-position flip rate); weights and bias folded back to raw columns."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = X.mean(0), X.std(0)
    sd[sd < 1e-12] = 1.0
    clf = LogisticRegression(C=1.0, max_iter=2000)
    rows, labels, weights = _soft(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(((X - mu) / sd)[rows], labels, sample_weight=weights)
    w = clf.coef_[0] / sd
    b = float(clf.intercept_[0] - np.sum(clf.coef_[0] * mu / sd))
    return w, b


def _cv_auc(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5) -> float:
    """AUC of out-of-fold logistic risks; folds by source sample (its shifted copies stay together)."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    k = min(folds, n_groups)
    if k < 2 or y.min() == y.max() or not (y > 0).any() or not (y < 1).any():
        return float("nan")
    oof = np.zeros(len(y))
    for fit, test in GroupKFold(n_splits=k).split(X, y, groups):
        if not (y[fit] > 0).any() or not (y[fit] < 1).any():
            oof[test] = 0.0
            continue
        w, b = _logistic(X[fit], y[fit])
        oof[test] = X[test] @ w + b
    return _auc(y, oof)


@dataclass(frozen=True)
class FitData:
    """What the probe measured: one row per (sample, shift)."""

    raw: np.ndarray
    """(rows, candidates) raw feature values"""
    keys: list[tuple[Feature, str | None]]
    flip: np.ndarray
    """fast route top-1 ≠ FP32 top-1 (at any position; a CTC sequence: its decoded text differs)"""
    sample: np.ndarray
    """source calibration sample of each row"""
    shift: np.ndarray
    """shift name of each row (``clean`` for the original)"""
    held_out: np.ndarray
    """row is in the held-out split (by source sample)"""
    elements: dict[str, int]
    """elements of each candidate op's input"""
    weight: np.ndarray | None = None
    """fraction of the output's positions whose top-1 differs, or a CTC decode's CER against FP32's (the
    levels' drop metric, :meth:`Decision.disagreement`); ``None``: ``flip``"""
    label: str | None = None
    """what ``loss`` is, where not :data:`LABEL` / :data:`LABEL_POSITIONS` (a CTC sequence: :data:`LABEL_TEXT`)"""

    @property
    def loss(self) -> np.ndarray:
        """What the router predicts and a budget bounds, per row: the fraction of positions flipped (one
        position: the flip itself), or a CTC decode's CER against FP32's text."""
        return self.flip.astype(np.float64) if self.weight is None else np.asarray(self.weight, np.float64)


def select_terms(
    data: FitData, *, cap_elements: float, max_terms: int = 6, min_gain: float = 0.005,
    allow: Sequence[Feature] | None = None,
) -> list[int]:
    """Greedy forward selection of candidate columns by cross-validated AUC on the fit split, while the
    in-graph cost (Σ elements × passes of the op features) stays within ``cap_elements``."""
    fit = ~data.held_out
    X = log_features(data.raw[fit])
    y, groups = data.loss[fit], data.sample[fit]
    allowed = [j for j, (f, _) in enumerate(data.keys) if allow is None or f in allow]
    # Pre-screen on univariate AUC (sign-free) so the greedy loop stays small.
    uni = {j: abs(np.nan_to_num(_auc(y, X[:, j]), nan=0.5) - 0.5) for j in allowed}
    pool = sorted(allowed, key=lambda j: -np.nan_to_num(uni[j]))[:24]
    chosen: list[int] = []
    best, spent = 0.5, 0.0
    while len(chosen) < max_terms:
        step = None
        for j in pool:
            if j in chosen:
                continue
            f, op = data.keys[j]
            cost = 0.0 if f is Feature.MARGIN else PASSES[f] * data.elements.get(op or "", 0)
            if spent + cost > cap_elements:
                continue
            auc = _cv_auc(X[:, [*chosen, j]], y, groups)
            if not math.isnan(auc) and (step is None or auc > step[0]):
                step = (auc, j, cost)
        if step is None or step[0] < best + min_gain:
            break
        best, spent = step[0], spent + step[2]
        chosen.append(step[1])
    return chosen


LABEL = "fast route top-1 differs from FP32 top-1"
LABEL_POSITIONS = ("fraction of output positions whose fast-route top-1 differs from FP32's (soft label; the levels' "
                   "drop metric)")  # fmt: skip
LABEL_TEXT = "CER of the fast route's greedy CTC decode against FP32's (soft label; the levels' drop metric)"

CONFIDENCE = 0.9
"""A cascade point's τ keeps the disagreement it leaves within max_drop with this one-sided confidence
(Clopper-Pearson upper bound on the calibration inputs): the point estimate on a few hundred inputs is
optimistic exactly where the flips are few."""


def upper_bound(k: float, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound of a rate observed as ``k`` of ``n`` (``k`` may be a sum of
    per-input fractions in [0, 1]: the binomial bound with a fractional count)."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(confidence, k + 1, n - k))


def thresholds(
    risk: np.ndarray, loss: np.ndarray, budgets: Sequence[float], confidence: float = CONFIDENCE
) -> list[tuple[float, float, float, float]]:
    """Per budget, the τ that escalates the fewest inputs while the loss it leaves un-escalated (flips, or
    per input the fraction of positions flipped) stays within the budget (upper bound at ``confidence``):
    ``(budget, tau, escalation, residual drop)`` on these inputs. Where no τ but escalating everything
    qualifies, τ = −NEVER (the precise route for every input)."""
    n = len(risk)
    loss = np.asarray(loss, np.float64)
    order = np.sort(np.unique(risk))[::-1]
    out = []
    for d in budgets:
        tau = -NEVER
        for t in [NEVER, *order]:  # lowering τ escalates more; stop at the first τ within budget
            residual = float(np.sum(loss[risk <= t]))
            if upper_bound(residual, n, confidence) <= d + 1e-12:
                tau = t
                break
        esc = risk > tau
        out.append((float(d), float(tau), float(np.mean(esc)) if n else 0.0, float(np.sum(loss[~esc])) / max(n, 1)))
    return out


def fit_router(
    data: FitData, *, cap_elements: float, probabilities: bool, ranges: dict[str, tuple[float, float, int]],
    fast_level: int, precise_level: int, shifts: Sequence[str], allow: Sequence[Feature] | None = None,
) -> tuple[Router | None, str]:
    """Select terms (among the features in ``allow``; default all), fit the risk on the fit split, and
    measure it on the held-out split.

    :return: the router (τ points still to be set) and a one-line reason when there is none.
    """
    fit, held = ~data.held_out, data.held_out
    if data.flip[fit].sum() < 3 or data.flip[held].sum() < 1:
        return None, f"the fast route flips too few calibration inputs to fit a router ({int(data.flip.sum())})"
    chosen = select_terms(data, cap_elements=cap_elements, allow=allow)
    if not chosen:
        return None, "no feature predicts a flip better than chance on the fit split"
    X = log_features(data.raw)
    y = data.loss
    w, b = _logistic(X[fit][:, chosen], y[fit])
    risk = X[:, chosen] @ w + b
    quality: dict[str, Any] = {
        "label": data.label
        or (LABEL if data.weight is None or np.array_equal(data.loss, data.flip) else LABEL_POSITIONS),
        "rows_fit": int(fit.sum()),
        "rows_held_out": int(held.sum()),
        "flip_rate_fit": float(y[fit].mean()),
        "flip_rate_held_out": float(y[held].mean()),
        "any_position_flip_rate": float(data.flip.mean()),
        "auc_held_out": _auc(y[held], risk[held]),
        "auc_held_out_by_shift": {
            s: _auc(y[held & (data.shift == s)], risk[held & (data.shift == s)]) for s in sorted(set(data.shift))
        },
    }
    # The anchors: the margin alone, and the op features alone (their own greedy selection).
    m = [j for j, (f, _) in enumerate(data.keys) if f is Feature.MARGIN]
    if m:
        quality["auc_held_out_margin_only"] = _auc(y[held], -X[held, m[0]])
    feats_only = select_terms(data, cap_elements=cap_elements, allow=OP_FEATURES)
    if feats_only:
        wf, bf = _logistic(X[fit][:, feats_only], y[fit])
        quality["auc_held_out_op_features_only"] = _auc(y[held], X[held][:, feats_only] @ wf + bf)
        quality["op_features_only_terms"] = [[data.keys[j][0].value, data.keys[j][1]] for j in feats_only]
    terms = []
    for j, wj in zip(chosen, w, strict=True):
        f, op = data.keys[j]
        a = _auc(y[held], X[held, j])
        terms.append(Term(f, op, float(wj), data.elements.get(op or "", 0), None if math.isnan(a) else max(a, 1 - a)))
    used = {t.op for t in terms if t.op is not None}
    router = Router(
        fast_level=fast_level,
        precise_level=precise_level,
        terms=terms,
        bias=b,
        probabilities=probabilities,
        ranges={k: v for k, v in ranges.items() if k in used},
        quality=quality,
        cost={"element_passes": float(sum(PASSES[t.feature] * t.elements for t in terms if t.op is not None)),
              "cap_element_passes": float(cap_elements)},  # fmt: skip
        shifts=list(shifts),
    )
    return router, ""


def held_out_risk(router: Router, data: FitData) -> np.ndarray:
    """The deployed risk of every row (same formula as the graph)."""
    X = log_features(data.raw)
    cols = [data.keys.index(t.key) for t in router.terms]
    return X[:, cols] @ np.array([t.weight for t in router.terms]) + router.bias


# ------------------------------------------------------------------------------------ calibration


def collect_fit_data(
    fast_body: ov.Model,
    feature_inputs: dict[str, ov.Output],
    fp32_model: ov.Model,
    ranges: dict[str, tuple[float, float, int]],
    elements: dict[str, int],
    data: Sequence[list[np.ndarray]],
    held_out: np.ndarray,
    shifts: Sequence[str],
    *,
    seed: int = 0,
    progress: Any = None,
    decision: Decision = CLASSES_LAST,
) -> tuple[FitData, bool]:
    """Run FP32 and the fast route (with every candidate feature as an extra output) on each
    calibration sample and each shifted copy of it (judged outputs read as class scores, ``decision``).

    :param fast_body: the fast level body (its trailing parameters, if any, are scalar f32 state: fed 1.0).
    :param held_out: per sample of ``data``, whether it belongs to the held-out split.
    :return: the rows, and whether the judged output already holds probabilities.
    """
    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": "f32"}
    ref = core.compile_model(fp32_model, "CPU", cfg).create_infer_request()
    n_in = len(fp32_model.inputs)
    def scores(res: Any) -> np.ndarray:
        return decision.scores(decision.pick(res))

    first = [np.asarray(scores(ref.infer(x)), np.float64) for x in data[: min(len(data), 16)]]
    probabilities = all(is_probabilities(o) for o in first)
    keys: list[tuple[Feature, str | None]] = [(Feature.MARGIN, None)]
    keys += [(f, op) for op in ranges for f in OP_FEATURES if op in feature_inputs]
    probe = probe_model(fast_body, feature_inputs, keys, ranges, probabilities, decision)
    fast = core.compile_model(probe, "CPU", cfg).create_infer_request()
    extra = [np.array(1.0, np.float32) for _ in probe.get_parameters()[n_in:]]
    n_out = len(fp32_model.outputs)
    lo = [float(min(np.min(x[i]) for x in data)) for i in range(n_in)]
    hi = [float(max(np.max(x[i]) for x in data)) for i in range(n_in)]
    names = ["clean", *shifts]
    raw, flip, weight, sample, shift, held = [], [], [], [], [], []
    total, done = len(data) * len(names), 0
    for s, x in enumerate(data):
        for k, name in enumerate(names):
            xs = x if name == "clean" else [
                shift_calibration(a, name, lo[i], hi[i], seed + 7919 * s + k) if a.dtype.kind == "f" else a
                for i, a in enumerate(x)
            ]  # fmt: skip
            y_ref = scores(ref.infer(xs))
            out = fast.infer([*xs, *extra])
            y_fast = scores(out)
            raw.append([float(out[n_out + 1 + j]) for j in range(len(keys))])
            loss = decision.disagreement(y_fast.argmax(-1), y_ref.argmax(-1))  # the drop this sample adds
            flip.append(loss > 0.0)
            weight.append(loss)
            sample.append(s)
            shift.append(name)
            held.append(bool(held_out[s]))
            done += 1
            if progress:
                progress(done, total)
    fit_data = FitData(
        raw=np.array(raw, np.float64), keys=keys, flip=np.array(flip), sample=np.array(sample),
        shift=np.array(shift), held_out=np.array(held), elements=dict(elements), weight=np.array(weight),
        label=LABEL_TEXT if decision.sequence == "ctc" else None,
    )  # fmt: skip
    return fit_data, probabilities


BELOW = (0.5, 0.25)
"""Cascade budgets below the dial's smallest non-zero budget, as fractions of it."""

CASCADE_STEPS = 4
"""Cascade budgets per step of the static dial: each pair of neighbouring budgets ``a < b`` (the largest
paired with 1) gets ``a · (b/a)^(k/CASCADE_STEPS)`` for k = 1 … CASCADE_STEPS − 1 (a quarter step of a
dial that doubles: ×1.19). With half steps (×1.41) EfficientNet-Lite0's cascade jumped from 5.4% of the
bench's crops escalated (0.08) to 0.8% (0.113); the quarter steps add 0.095 there (5.0%) — as fine as
its 300 calibration crops let τ move (4.0% of them escalated at 0.095, 0.7% at 0.113)."""


def cascade_budgets(levels: Sequence[float]) -> list[float]:
    """The budgets the cascade gets a τ for: the dial's budgets in (0, 1), :data:`CASCADE_STEPS` − 1
    geometric steps between each neighbouring pair (the largest paired with 1), and :data:`BELOW` × the
    smallest. A cascade point is one number in the manifest (no body of its own), so the cascade's dial
    is finer than the static one — and below the smallest budget, where the static dial's next step is
    the FP32 level, the cascade serves the request at its fast route's cost plus the re-runs (where
    calibration can certify a τ for it; else its τ escalates every input and ``auto`` keeps the FP32 level)."""
    inner = sorted({float(d) for d in levels if 0.0 < d < 1.0})
    edges = [*inner, 1.0] if inner else []
    steps = [a * (b / a) ** (k / CASCADE_STEPS) for a, b in zip(edges, edges[1:], strict=False)
             for k in range(1, CASCADE_STEPS)]  # fmt: skip
    below = [f * inner[0] for f in BELOW] if inner else []
    return sorted({round(d, 6) for d in [*below, *inner, *steps]})


MAX_ESCALATION_STEP = 0.01
"""The most of the clean calibration inputs two neighbouring cascade budgets may escalate apart
(:func:`fill_gaps`). On EfficientNet-Lite0 calibrated on 1,000 crops the quarter steps jumped from 5.3%
escalated (0.0566) to 0.5% (0.0673), and the point between (~2% escalated: BF16's agreement on 1,500
crops at ~0.91x NNCF INT8's throughput) was on no budget: the grid, not the data, was the limit."""

MIN_BUDGET_RATIO = 1.01
"""Budgets closer than this ratio are not split further."""

MAX_FILLED = 8
"""At most this many budgets :func:`fill_gaps` adds (each is one number in the manifest, one row of a bench)."""


def fill_gaps(
    router: Router, data: FitData, budgets: Sequence[float], hold: Sequence[str] = ("clean",)
) -> list[float]:
    """``budgets`` in (0, 1) plus up to :data:`MAX_FILLED` more: the geometric mean of the two neighbours
    whose escalation rates (of the clean calibration inputs) differ the most in ratio — a step from 3% to
    1% before one from 19% to 16%: the low rates are where a cascade is worth running — again and again
    while they differ by more than :data:`MAX_ESCALATION_STEP` and the budgets by more than
    :data:`MIN_BUDGET_RATIO`. Not split: a budget that escalates every input (no τ certifiable: the FP32
    level serves it cheaper), and a step whose residual drop differs by fewer than two clean inputs' worth
    (the risk band it escalates holds no flips to trade: a point inside costs more for the same quality)."""
    inner = sorted({float(d) for d in budgets if 0.0 < d < 1.0})
    pts = {p.max_drop: p for p in cascade_points(router, data, inner, 0.0, 0.0, 0.0, hold)}
    flips = 2.0 / max(int(np.sum(data.shift == "clean")), 1)
    for _ in range(MAX_FILLED):
        ds = sorted(pts)
        gaps = [(1.0 - pts[b].escalation / pts[a].escalation, a, b) for a, b in zip(ds, ds[1:], strict=False)
                if pts[a].tau > -NEVER and b > a * MIN_BUDGET_RATIO
                and pts[a].escalation - pts[b].escalation > MAX_ESCALATION_STEP
                and pts[b].predicted_drop - pts[a].predicted_drop >= flips - 1e-12
                and round(math.sqrt(a * b), 6) not in pts]  # fmt: skip
        if not gaps:
            break
        _, a, b = max(gaps)
        d = round(math.sqrt(a * b), 6)
        pts[d] = cascade_points(router, data, [d], 0.0, 0.0, 0.0, hold)[0]
    return sorted(pts)


def cascade_points(
    router: Router, data: FitData, budgets: Sequence[float], fast_ms: float, precise_ms: float, if_ms: float,
    hold: Sequence[str] = ("clean",),
) -> list[CascadePoint]:
    """τ for each budget in (0, 1) from the deployed risk on the calibration rows (fit and held-out: the
    risk has a handful of weights, so the fit rows are no more optimistic than the bound allows).

    The budget holds on every distribution in ``hold`` (``clean`` and/or shift names of ``data``): τ is
    the lowest of their thresholds, so a shift the router saw escalates enough to keep its flips within
    the budget too. Escalation, residual drop and predicted latency (fast route + escalation rate ×
    (precise route + the If)) are on the clean rows: what a deployment on undistorted data pays."""
    risk = held_out_risk(router, data)
    inner = sorted({float(d) for d in budgets if 0.0 < d < 1.0})
    taus = np.full(len(inner), NEVER)
    for name in dict.fromkeys(["clean", *hold]):
        rows = data.shift == name
        if not rows.any():
            raise ValueError(f"hold: no calibration rows for {name!r} (have {sorted(set(data.shift))})")
        if name in hold:
            got = thresholds(risk[rows], data.loss[rows], inner)
            taus = np.minimum(taus, [t for _, t, _, _ in got])
    clean = data.shift == "clean"
    rc, fc = risk[clean], data.loss[clean]
    points = []
    for d, tau in zip(inner, taus, strict=True):
        esc = rc > tau
        drop = float(np.sum(fc[~esc])) / max(len(rc), 1)
        e = float(np.mean(esc)) if len(rc) else 0.0
        points.append(CascadePoint(d, float(tau), e, drop, fast_ms + e * (precise_ms + if_ms)))
    return points
