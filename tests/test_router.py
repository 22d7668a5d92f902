"""The router and its escalation cascade: the in-graph features against numpy, the cascade body on a
real compiled graph (a tiny model built in code), the threshold state, and the fit on real data."""

from __future__ import annotations

import nncf
import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops

from apsq_ov.calibrate.levels import build_package_model
from apsq_ov.calibrate.router import (
    FitData,
    cascade_points,
    feature_output,
    fit_router,
    margin_output,
    shift_calibration,
    thresholds,
)
from apsq_ov.calibrate.variants import act_range, find_routable_ops
from apsq_ov.package import LEVEL_STATE, NEVER, TAU_STATE, Feature, OpChoice, Router, Term
from apsq_ov.precision import Precision
from tests.models import conv_chain, conv_chain_data

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
P3 = (Precision.FP32, Precision.BF16, Precision.INT8)


def _scalar_model(build, shape):
    x = ops.parameter(shape, np.float32, name="x")
    return ov.Core().compile_model(ov.Model([ops.result(build(x.output(0)))], [x]), "CPU", F32)


def test_in_graph_features_match_their_definitions():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 4, 6, 6)) * 2).astype(np.float32)
    lo, hi, levels = -3.0, 3.0, 256
    step = (hi - lo) / 255
    expected = {
        Feature.AMAX_RATIO: np.abs(x).max() / 3.0,
        Feature.CLIP_FRAC: np.mean((x > hi) | (x < lo)),
        Feature.STD_OVER_STEP: x.std() / step,
        Feature.NEARZERO_FRAC: np.mean(np.abs(x) < step / 2),
    }
    for f, want in expected.items():
        got = _scalar_model(lambda v, f=f: feature_output(f, v, lo, hi, levels), x.shape)([x])[0]
        assert float(got) == pytest.approx(float(want), rel=1e-4, abs=1e-6), f.value
    logits = rng.standard_normal((1, 5, 7)).astype(np.float32)  # a sequence: min over positions
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    s = np.sort(p, -1)
    got = _scalar_model(lambda v: margin_output(v, probabilities=False), logits.shape)([logits])[0]
    assert float(got) == pytest.approx(float((s[..., -1] - s[..., -2]).min()), rel=1e-5)


@pytest.fixture(scope="module")
def chain():
    model = conv_chain()
    model.reshape([1, 3, 16, 16])
    data = conv_chain_data(32)
    q = nncf.quantize(model.clone(), nncf.Dataset([x[None] for x in data]), subset_size=32)
    units = {u.name: u for u in find_routable_ops(model, q)}
    return model, q, units, data


def test_cascade_escalates_out_of_range_inputs_and_the_tau_state_moves_the_route(chain):
    """Risk = 10·log(conv2 input abs-max / its INT8 abs-max): inputs whose activations leave the
    calibrated range run the precise (FP32) level, in-range ones stay on INT8; τ is request state."""
    model, q, units, data = chain
    variants = {n: P3 for n in units}
    fp32 = {n: OpChoice(Precision.FP32, Precision.FP32) for n in variants}
    int8 = {n: OpChoice(Precision.INT8, Precision.INT8) for n in variants}
    router = Router(fast_level=1, precise_level=0, terms=[Term(Feature.AMAX_RATIO, "conv2", 10.0)], bias=0.0,
                    probabilities=False, ranges={"conv2": act_range(units["conv2"])})  # fmt: skip
    pm = build_package_model(model, q, variants, [fp32, int8], default_level=2, router=router, tau=0.0)
    compiled = ov.Core().compile_model(pm, "CPU", F32)
    req = compiled.create_infer_request()
    states = {s.name: s for s in req.query_state()}
    x_in, x_out = data[:1] * 0.5, data[:1] * 50.0
    all_int8, all_fp32 = [Precision.INT8.code] * 3, [Precision.FP32.code] * 3
    assert list(req.infer([x_in])["apsq_route"]) == all_int8
    # the IR's initial state is the default policy: the cascade at τ = 0
    assert states[LEVEL_STATE].state.data.reshape(-1).tolist() == [2]
    assert states[TAU_STATE].state.data.reshape(-1).tolist() == [0.0]
    assert list(req.infer([x_out])["apsq_route"]) == all_fp32
    plain = ov.Core().compile_model(model, "CPU", F32)
    np.testing.assert_allclose(req.infer([x_out])[0], plain([x_out])[0], rtol=1e-5)  # really the FP32 body
    nncf_int8 = ov.Core().compile_model(q, "CPU", F32)
    np.testing.assert_allclose(req.infer([x_in])[0], nncf_int8([x_in])[0], rtol=1e-4, atol=1e-5)
    states[TAU_STATE].state = ov.Tensor(np.array(NEVER, np.float32))  # same compiled model, new threshold
    assert list(req.infer([x_out])["apsq_route"]) == all_int8
    states[TAU_STATE].state = ov.Tensor(np.array(-NEVER, np.float32))
    assert list(req.infer([x_in])["apsq_route"]) == all_fp32


def test_thresholds_escalate_the_fewest_inputs_within_each_budget():
    """Risk ranks the 400 inputs; the 12 flips are among the riskiest 40. τ keeps the residual flips'
    upper bound (Clopper-Pearson, 90%) within each budget, and escalates no more than that needs."""
    from apsq_ov.calibrate.router import upper_bound

    n = 400
    risk = np.linspace(1.0, 0.0, n)
    flip = np.zeros(n, bool)
    flip[np.linspace(0, 39, 12).astype(int)] = True
    for d, tau, esc, drop in thresholds(risk, flip, [0.0, 0.01, 0.02, 0.05]):
        kept = risk <= tau
        residual = int(np.sum(flip & kept))
        assert upper_bound(residual, n) <= d or tau == -NEVER
        assert esc == pytest.approx(np.mean(~kept)) and drop == pytest.approx(residual / n)
        if tau < NEVER and tau > -NEVER:  # one step less escalation would break the bound
            looser = risk <= risk[risk > tau].min()
            assert upper_bound(int(np.sum(flip & looser)), n) > d
    d0, tau0, esc0, _ = thresholds(risk, flip, [0.0])[0]
    assert tau0 == -NEVER and esc0 == 1.0  # no τ certifies zero loss: everything escalates
    assert upper_bound(0, 300) == pytest.approx(1 - 0.1 ** (1 / 300), rel=1e-6)
    assert thresholds(risk, flip, [0.1])[0][1] == NEVER  # 12/400 = 3% flips, bound < 10%: never escalate


def test_fit_router_finds_the_margin_on_a_synthetic_signal():
    """The fit picks the column that carries the signal, ignores noise columns, and its held-out AUC
    is measured on rows it never saw."""
    rng = np.random.default_rng(0)
    n = 600
    margin = rng.uniform(0.0, 1.0, n)
    flip = rng.random(n) < np.exp(-8 * margin)  # small margin → likely flip
    noise = rng.uniform(0.5, 2.0, (n, 3))
    raw = np.column_stack([margin, noise])
    keys = [(Feature.MARGIN, None), *[(Feature.STD_OVER_STEP, f"op{i}") for i in range(3)]]
    data = FitData(raw=raw, keys=keys, flip=flip, sample=np.arange(n), shift=np.array(["clean"] * n),
                   held_out=np.arange(n) >= n // 2, elements={"op0": 10, "op1": 10, "op2": 10})  # fmt: skip
    router, reason = fit_router(data, cap_elements=1e9, probabilities=False, ranges={}, fast_level=1,
                                precise_level=0, shifts=[])  # fmt: skip
    assert router is not None, reason
    assert router.terms[0].key == (Feature.MARGIN, None) and router.terms[0].weight < 0
    assert router.quality["auc_held_out"] > 0.75


def test_sequence_outputs_are_labelled_by_the_fraction_of_positions_flipped():
    """A 40-position output (as PP-OCR's) flips *some* position on most inputs. The router's label and
    the budget are the fraction of positions flipped (the levels' drop metric): on 0/1 labels everything
    is as before; on fractions the fit tracks the rate, and a budget the *any position* label could only
    meet by escalating nearly everything holds with few escalations."""
    from apsq_ov.calibrate.router import _auc, _logistic, upper_bound

    rng = np.random.default_rng(3)
    n, positions = 600, 40
    margin = rng.uniform(0.0, 1.0, n)
    rate = 0.01 + 0.3 * np.exp(-6 * margin)  # per-position flip probability: small margin → many flipped
    flipped = rng.binomial(positions, rate)
    weight = flipped / positions
    flip = flipped > 0
    assert flip.mean() > 0.6  # "any position flipped" is the common case
    X = np.log(margin + 1e-6)[:, None]
    w, _ = _logistic(X, weight)
    assert w[0] < 0  # the soft-label fit follows the rate down the margin
    from sklearn.metrics import roc_auc_score

    assert _auc(flip.astype(float), -margin) == pytest.approx(roc_auc_score(flip, -margin))  # 0/1: the usual AUC
    assert 0.5 < _auc(weight, -margin) <= 1.0
    risk = -margin
    ((d, tau, esc, drop),) = thresholds(risk, weight, [0.03])
    kept = risk <= tau
    assert upper_bound(float(weight[kept].sum()), n) <= d and drop == pytest.approx(weight[kept].sum() / n)
    ((_, _, esc_any, _),) = thresholds(risk, flip, [0.03])
    assert esc < 0.5 < esc_any  # the positions budget escalates a minority; "any position" nearly all
    data = FitData(raw=margin[:, None], keys=[(Feature.MARGIN, None)], flip=flip, sample=np.arange(n),
                   shift=np.array(["clean"] * n), held_out=np.arange(n) >= n // 2, elements={},
                   weight=weight)  # fmt: skip
    router, reason = fit_router(data, cap_elements=1e9, probabilities=False, ranges={}, fast_level=1,
                                precise_level=0, shifts=[])  # fmt: skip
    assert router is not None, reason
    assert "fraction of output positions" in router.quality["label"]
    assert router.quality["flip_rate_held_out"] == pytest.approx(weight[n // 2 :].mean())
    (point,) = cascade_points(router, data, [0.03], fast_ms=1.0, precise_ms=2.0, if_ms=0.0)
    assert point.escalation < 0.5


def test_calibration_shifts_stay_in_range_and_change_the_data():
    x = conv_chain_data(2)
    for name in ("noise", "dark", "contrast", "blur"):
        y = shift_calibration(x, name, 0.0, 1.0, seed=0)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert 0.0 <= y.min() and y.max() <= 1.0
        assert not np.allclose(x, y), name


def test_risk_model_extracts_the_deployed_risk(chain):
    from apsq_ov.calibrate.router import risk_model

    model, q, units, data = chain
    variants = {n: P3 for n in units}
    fp32 = {n: OpChoice(Precision.FP32, Precision.FP32) for n in variants}
    int8 = {n: OpChoice(Precision.INT8, Precision.INT8) for n in variants}
    lo, hi, levels = act_range(units["conv2"])
    router = Router(fast_level=1, precise_level=0, terms=[Term(Feature.AMAX_RATIO, "conv2", 2.0)], bias=0.5,
                    probabilities=False, ranges={"conv2": (lo, hi, levels)})  # fmt: skip
    pm = build_package_model(model, q, variants, [fp32, int8], default_level=0, router=router)
    rm = risk_model(pm)
    names = [p.get_friendly_name() for p in rm.get_parameters()]
    compiled = ov.Core().compile_model(rm, "CPU", F32)
    x = data[:1] * 3.0
    extra = [np.array(1.0 if n == "escalate" else 0, np.float32 if n != "level" else np.int32) for n in names[1:]]
    got = float(compiled([x, *extra])[0])
    # the reference: conv1 → relu in numpy-free form: read the conv2 input off a plain FP32 copy of NNCF's graph
    probe = q.clone()
    conv2 = next(n for n in probe.get_ordered_ops() if n.get_friendly_name() == "conv2")
    from apsq_ov.calibrate.router import pre_quant_input

    probe.add_results([ops.result(pre_quant_input(conv2))])
    act = ov.Core().compile_model(probe, "CPU", F32)([x])[1]
    want = 0.5 + 2.0 * np.log(np.abs(act).max() / max(abs(lo), abs(hi)) + 1e-6)
    assert got == pytest.approx(float(want), rel=1e-4)


def test_auto_policy_picks_the_faster_of_level_and_cascade(tiny_files):
    """``choose_body``: a budget's static level unless the cascade point for it is faster (in the mean, and
    for the median input: it escalates fewer than half); ``static`` and ``cascade`` force one; below the
    smallest cascade budget the cascade escalates every input."""
    import dataclasses

    from apsq_ov.errors import ConfigError
    from apsq_ov.package import CascadePoint
    from apsq_ov.routing import Body, choose_body

    m = dataclasses.replace(tiny_files["package"].manifest, router=None, router_note="not built (test)")
    ms = np.linspace(2.0, 1.0, len(m.levels))
    levels = [dataclasses.replace(lv, measured_ms=t) for lv, t in zip(m.levels, ms, strict=True)]
    k = next(i for i, lv in enumerate(levels) if lv.max_drop == 0.01)
    with pytest.raises(ConfigError, match="no router"):
        choose_body(dataclasses.replace(m, levels=levels), 0.01, "cascade")
    points = [CascadePoint(0.005, 0.3, 0.1, 0.004, 1.2), CascadePoint(0.01, 0.7, 0.05, 0.009, 9.0),
              CascadePoint(0.02, NEVER, 0.0, 0.015, 1.0)]  # fmt: skip
    router = Router(fast_level=len(levels) - 1, precise_level=0, terms=[Term(Feature.MARGIN, None, -1.0)], bias=0.0,
                    probabilities=False, ranges={}, points=points)  # fmt: skip
    m = dataclasses.replace(m, levels=levels, router=router)
    cascade = len(levels)
    assert choose_body(m, 0.005).level == cascade and choose_body(m, 0.005).tau == 0.3  # 1.2 ms beats the level
    assert choose_body(m, 0.01).level == k  # the level (measured) beats a 9 ms cascade
    assert choose_body(m, 0.01, "cascade").tau == 0.7 and choose_body(m, 0.005, "static").level != cascade
    # τ = never, faster than the budget's level: the fast route it runs on every input, without the router.
    assert choose_body(m, 0.02) == Body(router.fast_level) and choose_body(m, 0.02, "cascade").tau == NEVER
    # ... only where it wins with the router priced in (its drop is the router's estimate, not the dial's).
    k2 = next(i for i, lv in enumerate(levels) if lv.max_drop == 0.02)
    pricey = [*points[:2], CascadePoint(0.02, NEVER, 0.0, 0.015, 1.0, measured_ms=9.9)]
    assert choose_body(dataclasses.replace(m, router=dataclasses.replace(router, points=pricey)), 0.02) == Body(k2)
    # ... and never where the budget's level is faster than the fast route itself.
    slow_fast = [dataclasses.replace(lv, measured_ms=3.0) if i == router.fast_level else lv
                 for i, lv in enumerate(levels)]  # fmt: skip
    assert choose_body(dataclasses.replace(m, levels=slow_fast), 0.02) == Body(k2)
    # Once the fast route won a τ = never budget it serves the larger ones where it beats their (faster)
    # level, even by less than the router's cost: a larger budget never runs slower.
    k1 = next(i for i, lv in enumerate(levels) if lv.max_drop == 0.01)
    dial = [dataclasses.replace(lv, measured_ms={k1: 2.0, k2: 1.2, router.fast_level: 1.0}.get(i, 9.0))
            for i, lv in enumerate(levels)]  # fmt: skip
    nevers = [points[0], CascadePoint(0.01, NEVER, 0.0, 0.009, 1.5), CascadePoint(0.02, NEVER, 0.0, 0.009, 1.5)]
    m5 = dataclasses.replace(m, levels=dial, router=dataclasses.replace(router, points=nevers))
    assert choose_body(m5, 0.01) == choose_body(m5, 0.02) == Body(router.fast_level)
    # A cascade reading faster than its own fast route is noise: where that route is the budget's level, the
    # level serves it (no router on top).
    noise = [*points[:2], CascadePoint(1.0, NEVER, 0.0, 0.2, 1.0, measured_ms=0.99)]
    m4 = dataclasses.replace(m, router=dataclasses.replace(router, points=noise))
    assert choose_body(m4, 1.0) == Body(router.fast_level) and choose_body(m4, 1.0, "cascade").tau == NEVER
    assert choose_body(m, 0.001, "cascade").tau == -NEVER
    assert m.full_level == cascade + 1
    # Half the inputs or more escalated: a mean below the level's, but the median input runs both routes.
    busy = [CascadePoint(0.005, 0.3, 0.5, 0.004, 1.2), *points[1:]]
    m3 = dataclasses.replace(m, router=dataclasses.replace(router, points=busy))
    assert choose_body(m3, 0.005).level != cascade and choose_body(m3, 0.005, "cascade").tau == 0.3
    busy[0] = CascadePoint(0.005, 0.3, 0.49, 0.004, 1.2)
    assert choose_body(m3, 0.005).level == cascade


def test_a_larger_budget_never_runs_a_slower_level(tiny_files):
    """The dial's levels are the fastest mixes the profile predicts; where the device measured a level
    slower than one of a smaller budget (which fits the larger budget too), ``static`` and ``auto`` run the
    faster, more precise one. Without measurements (a GPU package built here) the level is the budget's."""
    import dataclasses

    from apsq_ov.routing import choose_body, fastest_level, level_for

    m = dataclasses.replace(tiny_files["package"].manifest, router=None, router_note="not built (test)")
    n = len(m.levels)
    assert n >= 3
    ms = list(np.linspace(3.0, 1.0, n))
    ms[n - 2] = ms[n - 3] + 0.5  # the second-fastest budget's level measured slower than the one below it
    levels = [dataclasses.replace(lv, measured_ms=t) for lv, t in zip(m.levels, ms, strict=True)]
    m = dataclasses.replace(m, levels=levels)
    for k, lv in enumerate(levels):
        want = n - 3 if k == n - 2 else k
        assert level_for(levels, lv.max_drop) == k and fastest_level(levels, lv.max_drop) == want
        assert choose_body(m, lv.max_drop, "static").level == want == choose_body(m, lv.max_drop).level
    served = [levels[choose_body(m, lv.max_drop).level].measured_ms for lv in levels]
    assert served == sorted(served, reverse=True)  # non-increasing along the dial
    unmeasured = [dataclasses.replace(lv, measured_ms=None) for lv in levels]
    assert all(fastest_level(unmeasured, lv.max_drop) == k for k, lv in enumerate(unmeasured))


def test_every_level_code_reaches_its_body_and_the_cascade_and_default_sit_one_if_deep(chain):
    """The dispatch: the cascade, then the default level, are one If each below the top (every If a body
    sits under copies its inputs); every other code still reaches its own body through the tree."""
    model, q, units, data = chain
    variants = {n: P3 for n in units}
    fp32 = {n: OpChoice(Precision.FP32, Precision.FP32) for n in variants}
    mid = {**fp32, "conv2": OpChoice(Precision.INT8, Precision.INT8), "fc": OpChoice(Precision.INT8, Precision.INT8)}
    bf16 = {n: OpChoice(Precision.BF16, Precision.BF16) for n in variants}
    int8 = {n: OpChoice(Precision.INT8, Precision.INT8) for n in variants}
    levels = [fp32, mid, bf16, int8]
    router = Router(fast_level=3, precise_level=0, terms=[Term(Feature.AMAX_RATIO, "conv2", 10.0)], bias=0.0,
                    probabilities=False, ranges={"conv2": act_range(units["conv2"])})  # fmt: skip
    pm = build_package_model(model, q, variants, levels, default_level=1, router=router, tau=NEVER)
    top = next(n for n in pm.get_ordered_ops() if n.get_type_name() == "If")
    cascade = {n.get_friendly_name() for n in top.get_then_body().get_ordered_ops()}
    assert "apsq/cascade/escalate" in cascade  # the cascade: one If deep
    second = next(n for n in top.get_else_body().get_ordered_ops() if n.get_type_name() == "If")
    assert not any(n.get_type_name() == "If" for n in second.get_then_body().get_ordered_ops())  # level 1: static
    req = ov.Core().compile_model(pm, "CPU", F32).create_infer_request()
    states = {s.name: s for s in req.query_state()}
    x = data[:1] * 0.5
    F, B, I = Precision.FP32.code, Precision.BF16.code, Precision.INT8.code  # noqa: E741
    expected = {0: [F, F, F], 1: [F, I, I], 2: [B, B, B], 3: [I, I, I], 4: [I, I, I], 5: [F, F, F]}
    assert len(levels) + 2 == len(expected)  # levels, the cascade (τ = never: the fast route), the full body
    for code, route in expected.items():
        states[LEVEL_STATE].state = ov.Tensor(np.array(code, np.int32))
        assert list(req.infer([x])["apsq_route"]) == route, code


def test_cascade_thresholds_hold_the_budget_on_every_distribution_asked():
    """``hold`` with a shift: τ is the lowest of the per-distribution thresholds, so the residual flips
    stay within the budget (upper bound) on the shifted rows too; escalation is reported on clean."""
    from apsq_ov.calibrate.router import cascade_budgets, cascade_points, upper_bound

    rng = np.random.default_rng(0)
    n = 400
    margin = np.concatenate([rng.uniform(0.0, 1.0, n), rng.uniform(0.0, 0.6, n)])  # noise: smaller margins
    flip = rng.random(2 * n) < np.exp(-6 * margin)
    shift = np.array(["clean"] * n + ["noise"] * n)
    data = FitData(raw=margin[:, None], keys=[(Feature.MARGIN, None)], flip=flip, sample=np.tile(np.arange(n), 2),
                   shift=shift, held_out=np.zeros(2 * n, bool), elements={})  # fmt: skip
    router = Router(fast_level=1, precise_level=0, terms=[Term(Feature.MARGIN, None, -1.0)], bias=0.0,
                    probabilities=False, ranges={})  # fmt: skip
    budgets = cascade_budgets([0.0, 0.01, 0.02, 0.04, 1.0])
    assert budgets == pytest.approx([0.0025, 0.005, 0.01, 0.011892, 0.014142, 0.016818, 0.02, 0.023784, 0.028284,
                                     0.033636, 0.04, 0.089443, 0.2, 0.447214])  # 2^(k/4) steps; 0.04 → 1: 25^(k/4)
    clean = cascade_points(router, data, budgets, 1.0, 2.0, 0.0)
    both = cascade_points(router, data, budgets, 1.0, 2.0, 0.0, hold=("clean", "noise"))
    risk = -np.log(margin + 1e-6)
    for c, b in zip(clean, both, strict=True):
        assert b.tau <= c.tau and b.escalation >= c.escalation
        for name in ("clean", "noise"):
            rows = data.shift == name
            residual = int(np.sum(flip[rows] & (risk[rows] <= b.tau)))
            assert upper_bound(residual, n) <= b.max_drop + 1e-12 or b.tau == -NEVER
        assert b.predicted_ms == pytest.approx(1.0 + b.escalation * 2.0)
    assert any(b.tau < c.tau for c, b in zip(clean, both, strict=True))  # the shift really moved τ
    with pytest.raises(ValueError, match="no calibration rows for 'blur'"):
        cascade_points(router, data, budgets, 1.0, 2.0, 0.0, hold=("clean", "blur"))


def test_range_escalations_take_one_fp32_pass_per_sample(chain, monkeypatch):
    """Which samples leave each op's calibrated INT8 range: one FP32 inference per sample reads every op's
    input abs-max (it once ran one inference per sample and op: 50x the work on EfficientNet-Lite0)."""
    from apsq_ov.calibrate.pipeline import _escalations

    model, _, units, data = chain
    calls = []
    infer = ov.InferRequest.infer
    monkeypatch.setattr(ov.InferRequest, "infer", lambda self, *a, **k: calls.append(1) or infer(self, *a, **k))
    batches = [[x[None] * s] for x, s in zip(data[:10], np.linspace(0.5, 3.0, 10), strict=True)]  # some beyond
    got = _escalations(model, list(units.values()), batches)
    assert len(calls) == len(batches) and set(got) == {n for n, u in units.items() if u.int8_absmax is not None}
    assert any(f.any() for f in got.values()) and any((~f).any() for f in got.values())
    monkeypatch.undo()
    for name, flags in got.items():  # each flag: that op's input abs-max beyond its INT8 abs-max, read directly
        probe = model.clone()
        node = next(n for n in probe.get_ordered_ops() if n.get_friendly_name() == name)
        probe.add_outputs([node.input(0).get_source_output()])
        req = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
        amax = np.array([np.abs(req.infer(b)[len(model.outputs)]).max() for b in batches])
        assert np.array_equal(flags, amax > units[name].int8_absmax)



def test_fill_gaps_splits_the_cascades_coarse_steps_where_flips_can_be_traded():
    """The quarter-step grid can jump from several % escalated to a fraction of 1% (EfficientNet-Lite0,
    1,000 crops: 5.3% → 0.5%); ``fill_gaps`` adds budgets between, keeps every budget it was given, and
    leaves alone steps with no flips to trade."""
    from apsq_ov.calibrate.router import MAX_ESCALATION_STEP, MAX_FILLED, cascade_budgets, cascade_points, fill_gaps

    rng = np.random.default_rng(1)
    n = 1000
    margin = rng.uniform(0.0, 1.0, n)
    flip = rng.random(n) < 0.25 * np.exp(-4 * margin)  # ~6% flipped, mostly at small margins
    data = FitData(raw=margin[:, None], keys=[(Feature.MARGIN, None)], flip=flip, sample=np.arange(n),
                   shift=np.array(["clean"] * n), held_out=np.zeros(n, bool), elements={})  # fmt: skip
    router = Router(fast_level=1, precise_level=0, terms=[Term(Feature.MARGIN, None, -1.0)], bias=0.0,
                    probabilities=False, ranges={})  # fmt: skip
    grid = [d for d in cascade_budgets([0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 1.0]) if d < 1.0]
    filled = fill_gaps(router, data, grid)
    added = sorted(set(filled) - set(grid))
    assert set(grid) <= set(filled) and 0 < len(added) <= MAX_FILLED
    pts = {p.max_drop: p for p in cascade_points(router, data, filled, 1.0, 2.0, 0.0)}
    before = cascade_points(router, data, grid, 1.0, 2.0, 0.0)

    def worst(points):  # the largest splittable step, in ratio of escalation rates
        return max(1 - b.escalation / a.escalation for a, b in zip(points, points[1:], strict=False)
                   if a.tau > -NEVER and a.escalation - b.escalation > MAX_ESCALATION_STEP)  # fmt: skip

    assert worst(list(pts.values())) < worst(before)
    for d in added:
        lo, hi = max(x for x in filled if x < d), min(x for x in filled if x > d)
        assert pts[lo].escalation >= pts[d].escalation >= pts[hi].escalation
        assert pts[lo].escalation - pts[hi].escalation > 0  # it splits a real step
    flat = FitData(raw=margin[:, None], keys=data.keys, flip=np.zeros(n, bool), sample=data.sample, shift=data.shift,
                   held_out=data.held_out, elements={})  # fmt: skip
    assert fill_gaps(router, flat, grid) == sorted(grid)  # nothing flips: nothing to trade
