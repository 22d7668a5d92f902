"""Integration on the embedded real model and real data: the Fashion-MNIST ResNet, 10k test images.

Acceptance of the walking skeleton: forced FP32 equals plain OpenVINO FP32; forced INT8 is within
0.2 pt of plain ``nncf.quantize``; max-drop 0 gives FP32 accuracy; max-drop 0.01 runs the selected
level (its static ops never change route); a precision-map pin changes only that op's route.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import nncf
import numpy as np
import openvino as ov
import pytest
from typer.testing import CliRunner

import apsq_ov
from apsq_ov.calibrate.quantize import NO_SATURATION
from apsq_ov.cli import app
from apsq_ov.datasets import load_fashion_mnist, shift
from apsq_ov.package import OpChoice
from apsq_ov.precision import Precision
from apsq_ov.profiler import host_int8_hardware
from apsq_ov.routing import fastest_level

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
runner = CliRunner()


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    x_train, y_train = load_fashion_mnist("train")
    pick = np.random.default_rng(0).permutation(len(x_train))[:300]
    np.savez(root / "calib.npz", images=x_train[pick], labels=y_train[pick])
    x_test, y_test = load_fashion_mnist("test")
    np.savez(root / "test.npz", images=x_test, labels=y_test)
    # NNCF's default activation ranges: with the histogram ones (which `auto` picks here, tested in
    # test_calibrate_auto_ranges) the INT8 route flips 1 of the 200 held-out images and the router has a
    # single cascade point; the bench tests below need several. So do 7-bit weights in every layer (what
    # `auto` gives a pre-VNNI CPU): 1 flip, no cascade point. There the fixture keeps NNCF's first-layer fix.
    fix = "none" if host_int8_hardware() in NO_SATURATION else "first-layer"
    result = runner.invoke(app, ["calibrate", str(apsq_ov.embedded_model()), "--data", str(root / "calib.npz"),
                                 "-o", str(root / "pkg"), "--subset-size", "300",
                                 "--activation-ranges", "minmax", "--overflow-fix", fix])  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"root": root, "pkg": root / "pkg", "x_train": x_train[pick], "x": x_test, "y": y_test}


def infer(fm, name: str, *args: str) -> tuple[dict, dict[str, np.ndarray]]:
    out = fm["root"] / f"{name}.npz"
    result = runner.invoke(app, ["infer", str(fm["pkg"]), "--input", str(fm["root"] / "test.npz"), "--output", str(out),
                                 "--json", *args])  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        return json.loads(result.stdout), {k: z[k] for k in z.files}


def plain(model: ov.Model, x: np.ndarray) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", F32)
    request = compiled.create_infer_request()
    return np.concatenate([request.infer([x[i : i + 1]])[0] for i in range(len(x))])


def test_forced_fp32_equals_plain_openvino_fp32(fm):
    summary, arrays = infer(fm, "fp32", "--precision", "fp32")
    model = ov.Core().read_model(apsq_ov.embedded_model())
    model.reshape([1, 1, 28, 28])
    ref = plain(model, fm["x"])
    assert np.abs(arrays["logits"] - ref).max() <= 1e-5
    assert summary["accuracy"] == pytest.approx(float(np.mean(ref.argmax(1) == fm["y"])), abs=0)
    assert summary["accuracy"] > 0.9  # a real trained model on real data
    assert (arrays["route"] == 0).all()


def test_calibrate_auto_ranges_keeps_the_int8_model_closer_to_fp32(fm):
    """``activation_ranges="auto"`` quantizes with NNCF's min-max and histogram range estimators and keeps
    the model whose output is closer to FP32 (mean per-input NMSE on held-out inputs): re-measured here with
    plain ``nncf.quantize`` on 200 real test images. On this model the histogram ranges' NMSE is several
    times lower, and over all 10,000 test images their top-1 agrees with FP32 at least as often."""
    from apsq_ov.calibrate import CalibrationConfig, calibration_quantize_settings
    from apsq_ov.calibrate.quantize import ACTIVATION_RANGES, quantize
    from apsq_ov.profiles import load_profile

    model = ov.Core().read_model(apsq_ov.embedded_model())
    model.reshape([1, 1, 28, 28])
    calib = [[x[None]] for x in fm["x_train"]]
    check = [[fm["x"][i : i + 1]] for i in range(200)]
    profile = load_profile("CPU")
    q, settings, record = quantize(model, calib, check, 0, CalibrationConfig(), profile, None)
    ref = plain(model, fm["x"])
    nmse, top1 = {}, {}
    for ranges in ACTIVATION_RANGES:
        s = calibration_quantize_settings(CalibrationConfig(), profile, activation_ranges=ranges)
        assert f"{ranges} activation ranges" in s.description
        y = plain(nncf.quantize(model.clone(), nncf.Dataset([c[0] for c in calib]), subset_size=300, **s.kwargs),
                  fm["x"])  # fmt: skip
        nmse[ranges] = float(np.mean(((y - ref) ** 2).sum(1)[:200] / (ref**2).sum(1)[:200]))
        top1[ranges] = float(np.mean(y.argmax(1) == ref.argmax(1)))
        assert record["activation_ranges_nmse"][ranges] == pytest.approx(nmse[ranges], rel=1e-3)
    chosen = record["activation_ranges"]
    assert chosen == min(nmse, key=nmse.get) == "histogram" and nmse["histogram"] < nmse["minmax"] / 3
    assert top1["histogram"] >= top1["minmax"]
    assert f"{chosen} activation ranges" in settings.description
    assert np.abs(plain(q, fm["x"][:200]) - plain(nncf.quantize(
        model.clone(), nncf.Dataset([c[0] for c in calib]), subset_size=300,
        **settings.kwargs), fm["x"][:200])).max() == 0  # fmt: skip
    with pytest.raises(apsq_ov.ConfigError, match="activation ranges must be"):
        CalibrationConfig(activation_ranges="percentile")


def test_forced_int8_matches_plain_nncf_within_0_2_pt(fm):
    """Forced INT8 = ``nncf.quantize`` with the settings calibration used (the manifest names them)."""
    from apsq_ov.calibrate import package_quantize_settings

    summary, _ = infer(fm, "int8", "--precision", "int8")
    model = ov.Core().read_model(apsq_ov.embedded_model())
    model.reshape([1, 1, 28, 28])
    manifest = apsq_ov.Package.load(fm["pkg"]).manifest
    settings = package_quantize_settings(manifest)
    assert manifest.calibration["quantizer"] == settings.description
    q = nncf.quantize(model, nncf.Dataset([x[None] for x in fm["x_train"]]), subset_size=300, **settings.kwargs)
    nncf_acc = float(np.mean(plain(q, fm["x"]).argmax(1) == fm["y"]))
    assert abs(summary["accuracy"] - nncf_acc) <= 0.002, (summary["accuracy"], nncf_acc)
    fix = {"none": nncf.OverflowFix.DISABLE, "first-layer": nncf.OverflowFix.FIRST_LAYER}
    assert settings.kwargs["advanced_parameters"].overflow_fix == fix[manifest.calibration["overflow_fix"]]
    # A package calibrated before the option (no "overflow_fix" recorded) gets the fix its description names.
    old = dataclasses.replace(manifest, calibration={k: v for k, v in manifest.calibration.items()
                                                     if k != "overflow_fix"})  # fmt: skip
    before = package_quantize_settings(old)
    assert before.description == manifest.calibration["quantizer"]
    assert before.kwargs["advanced_parameters"].overflow_fix == (
        nncf.OverflowFix.FIRST_LAYER if "first-layer" in before.description else nncf.OverflowFix.DISABLE)


def test_max_drop_zero_gives_fp32_and_levels_follow_the_selection(fm):
    s0, a0 = infer(fm, "md0", "--max-drop", "0")
    s32, a32 = infer(fm, "fp32b", "--precision", "fp32")
    assert s0["accuracy"] == s32["accuracy"] and (a0["route"] == 0).all()
    s1, a1 = infer(fm, "md01", "--max-drop", "0.01", "--policy", "static")
    assert s1["accuracy"] >= s32["accuracy"] - 0.01
    manifest = apsq_ov.Package.load(fm["pkg"]).manifest
    level = manifest.levels[fastest_level(manifest.levels, 0.01)]  # 0.01's, or a smaller budget's measured faster
    assert level.max_drop <= 0.01 and s1["body"] == f"level {manifest.levels.index(level)}"
    static = [i for i, op in enumerate(manifest.ops) if not level.choices[op.name].routed]
    want = [level.choices[manifest.ops[i].name].fast.code for i in static]
    assert (a1["route"][:, static] == want).all()  # static ops never change
    assert (a1["route"] != 0).any()  # and some op is lowered


def test_fast_route_refinement_keeps_only_free_and_significant_fp32_ops(fm):
    """Calibration on this CPU tries putting the fastest level's boundary ops back at FP32 one at a time
    and keeps them FP32 only where that timed as fast and measurably cut the drop on samples that chose
    nothing; whatever it decided, its record agrees with the levels it left."""
    from apsq_ov.calibrate.ondevice import REFINE_ALPHA, REFINE_TOLERANCE

    m = apsq_ov.Package.load(fm["pkg"]).manifest
    r = m.selection["fast_route_refinement"]
    assert r["measured"] and r["tolerance"] == REFINE_TOLERANCE and r["steps"]
    fastest = m.levels[-1]
    for step in r["steps"]:
        assert len(step["median_ms"]) == len(step["candidates"]) + 1 and set(step["free"]) <= set(step["candidates"])
        for name in step["free"]:  # free: within the tolerance of the fastest level in both halves of the rounds
            k = 1 + step["candidates"].index(name)
            assert all(h[k] <= h[0] * (1 + REFINE_TOLERANCE) for h in step["median_ms_halves"])
        assert step.get("kept") in (None, *step["free"])
    tried = [s["kept"] for s in r["steps"] if "kept" in s]
    kept = r["kept_fp32"]
    if not kept:  # nothing kept: the fastest level still lowers every op it tried
        assert r["reason"] and all(fastest.choices[n].fast is not Precision.FP32 for n in tried)
        return
    assert kept == tried == r["tried"]
    assert r["p_value"] < REFINE_ALPHA and r["test_drop_after"] < r["test_drop_before"]
    assert fastest.measured_drop == pytest.approx(r["drop_after"])
    for level in m.levels:  # FP32 in every level: more budget still never adds precision
        assert all(level.choices[n] == OpChoice(Precision.FP32, Precision.FP32) for n in kept)
    for lo, hi in itertools.pairwise(m.levels):
        assert all(hi.choices[n].fast.rank >= c.fast.rank for n, c in lo.choices.items())


def test_the_cascade_runs_on_the_level_calibration_timed_fastest(fm):
    """Calibration on this CPU times every distinct level graph but FP32's and fits the router on the
    fastest: the last level, unless a smaller budget's graph timed faster by more than the tolerance in
    both halves of the rounds; of the graphs within the tolerance of that winner in both halves, the one
    with the lowest held-out drop. The record agrees with the router it fitted."""
    from apsq_ov.calibrate.ondevice import REFINE_TOLERANCE

    m = apsq_ov.Package.load(fm["pkg"]).manifest
    r = m.selection["fast_route"]
    assert m.router is not None and m.router.fast_level == r["level"] and r["measured"]
    first = {k: next(j for j in range(1, k + 1) if m.levels[j].choices == m.levels[k].choices)
             for k in range(1, len(m.levels))}  # fmt: skip
    halves = r["median_ms_halves"]
    assert set(halves) == {f"{m.levels[j].max_drop:g}" for j in set(first.values())}  # each graph once, no FP32
    name = {j: f"{m.levels[j].max_drop:g}" for j in set(first.values())}
    last = halves[name[first[len(m.levels) - 1]]]
    faster = {j for j in name if all(halves[name[j]][i] < last[i] * (1 - REFINE_TOLERANCE) for i in (0, 1))}
    timing = min(faster, key=lambda j: max(halves[name[j]])) if faster else first[len(m.levels) - 1]
    assert first[r["timing_winner"]] == timing
    bound = [h * (1 + REFINE_TOLERANCE) for h in halves[name[timing]]]
    tied = {j for j in name if all(halves[name[j]][i] <= bound[i] for i in (0, 1))}
    assert {first[k] for k in r["tied"]} == tied
    picked, drops = first[r["level"]], [m.levels[j].measured_drop for j in tied]
    assert picked in tied
    assert picked == timing if None in drops else m.levels[picked].measured_drop == min(drops)  # type: ignore[type-var]
    assert r["level"] == max(k for k, j in first.items() if j == picked)  # of levels sharing the graph, the largest


def test_precision_map_pin_changes_only_that_op(fm, tmp_path):
    _, base = infer(fm, "base", "--precision", "fp32")
    ops = list(base["route_ops"])
    pin = tmp_path / "map.json"
    pin.write_text(json.dumps({ops[3]: "int8"}))
    _, pinned = infer(fm, "pinned", "--precision", "fp32", "--precision-map", str(pin))
    changed = np.flatnonzero((pinned["route"] != base["route"]).any(axis=0))
    assert list(changed) == [3]
    assert (pinned["route"][:, 3] == apsq_ov.Precision.INT8.code).all()


def test_each_level_fits_its_budget_on_its_measured_joint_drop(fm, tmp_path):
    """Every level records the drop measured with all its ops lowered together on the held-out split, and
    it fits the level's budget; re-measured independently through the CLI (the fully routed body, the
    level's precisions as a precision map, on the same held-out images) it is the same drop."""
    from apsq_ov.calibrate import sample_order

    manifest = apsq_ov.Package.load(fm["pkg"]).manifest
    cal = manifest.calibration
    assert cal["drops_held_out"]
    n_score, n_drop = cal["sensitivity_samples"], cal["drop_samples"]
    held = sample_order(len(fm["x_train"]), cal["seed"])[n_score : n_score + n_drop]
    np.savez(tmp_path / "held.npz", images=fm["x_train"][held])

    def top1(name: str, *args: str) -> np.ndarray:
        out = tmp_path / f"{name}.npz"
        result = runner.invoke(app, ["infer", str(fm["pkg"]), "--input", str(tmp_path / "held.npz"), "--output",
                                     str(out), "--precision", "fp32", *args])  # fmt: skip
        assert result.exit_code == 0, result.output
        with np.load(out) as z:
            return z["logits"].argmax(-1)

    reference = top1("fp32")
    checked = 0
    for k, level in enumerate(manifest.levels):
        assert level.measured_drop is not None and level.measured_drop <= level.max_drop + 1e-12, (k, level)
        pin = {n: c.fast.value for n, c in level.choices.items() if c.fast is not apsq_ov.Precision.FP32}
        if not pin:
            assert level.measured_drop == 0.0
            continue
        (tmp_path / f"map{k}.json").write_text(json.dumps(pin))
        again = float(np.mean(top1(f"level{k}", "--precision-map", str(tmp_path / f"map{k}.json")) != reference))
        assert again == pytest.approx(level.measured_drop, abs=1.0 / n_drop), (k, again, level.measured_drop)
        checked += 1
    assert checked >= 1
    assert manifest.levels[-1].predicted_drop > manifest.levels[-1].measured_drop  # the isolated drops overlap


def test_router_escalates_risky_inputs_and_more_of_them_under_shift(fm):
    """The fitted router (margin of the INT8 route + cheap op features, fitted on calibration data and
    shifted copies): held-out AUC ≥ 0.9 on calibration data, and on the 10k real test images the
    cascade keeps FP32 accuracy within 0.3 pt while escalating few clean inputs and more noisy ones."""
    manifest = apsq_ov.Package.load(fm["pkg"]).manifest
    assert manifest.router is not None, manifest.router_note
    assert manifest.router.quality["auc_held_out"] >= 0.9
    fp32, _ = infer(fm, "c_fp32", "--precision", "fp32")
    casc, arrays = infer(fm, "c_casc", "--max-drop", "0.01", "--policy", "cascade")
    assert casc["body"] == "cascade"
    assert casc["accuracy"] >= fp32["accuracy"] - 0.003
    fast_codes = [manifest.levels[manifest.router.fast_level].choices[n].fast.code for n in manifest.route_ops]
    escalated = (arrays["route"] != fast_codes).any(axis=1)
    assert (arrays["route"][escalated] == Precision.FP32.code).all()  # escalated inputs ran the FP32 body
    assert 0.0 < escalated.mean() < 0.2 and casc["escalated"] == pytest.approx(escalated.mean())
    noisy = fm["root"] / "noise.npz"
    np.savez(noisy, images=shift(fm["x"], "noise"), labels=fm["y"])
    out = fm["root"] / "c_noise.npz"
    result = runner.invoke(app, ["infer", str(fm["pkg"]), "--input", str(noisy), "--output", str(out), "--json",
                                 "--max-drop", "0.01", "--policy", "cascade"])  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        assert (z["route"] != fast_codes).any(axis=1).mean() > 2 * escalated.mean()


def test_the_cascade_compiled_on_its_own_runs_what_the_dispatch_runs(fm):
    """The escalation cascade extracted from the package IR and compiled alone (what ``compile_model``
    serves a cascade policy with): on 2,000 real test images, clean and noisy, the same outputs, the
    same escalations and top-1 as through the package's dispatch. It is a separate compile of the same
    graph, so an INT8 rounding at a quantization step's edge may land differently (1 noisy image in
    1,000 here, same top-1): at most 0.5% of inputs may differ at all."""
    policy = {"max_drop": 0.01, "policy": "cascade"}
    alone = apsq_ov.compile_model(fm["pkg"], standalone=policy)
    dispatch = apsq_ov.compile_model(fm["pkg"], standalone="none")
    assert set(alone.standalone) == {alone.manifest.cascade_level}
    a, d = alone.create_infer_request(), dispatch.create_infer_request()
    x = np.concatenate([fm["x"][:1000], shift(fm["x"][1000:2000], "noise")])
    same_out, same_top1, same_esc, escalated = 0, 0, 0, 0
    for i in range(len(x)):
        got, want = a.infer(x[i : i + 1], **policy), d.infer(x[i : i + 1], **policy)
        same_out += bool(np.allclose(got[0], want[0], rtol=1e-5, atol=1e-6) and np.array_equal(got.route, want.route))
        same_top1 += int(got[0].argmax() == want[0].argmax())
        same_esc += got.escalated == want.escalated
        escalated += bool(got.escalated)
    assert "apsq/level" not in {s.name for s in a.request.query_state()}  # it ran on the standalone body
    assert min(same_out, same_top1, same_esc) >= 0.995 * len(x), (same_out, same_top1, same_esc)
    assert 0 < escalated < len(x)


def test_calibration_times_each_body_as_compile_model_deploys_it(fm, monkeypatch):
    """The level and cascade timings ``auto`` compares are taken on the bodies compiled on their own (what
    ``compile_model`` serves a budget with), not inside the package's dispatch, where each body also paid
    its depth in the ``If`` tree (Fashion-MNIST: the cascade read faster than the level it runs there, and
    ``auto`` served 0.01–0.4 with the cascade, 9% slower compiled on its own). Checked on what is timed,
    not on a clock: every level is a standalone model without the ``apsq/level`` state, a constant route
    split off; the cascade is timed at τ = never and always on its standalone body; the medians land in
    the manifest in that order."""
    from dataclasses import replace

    from apsq_ov.calibrate import ondevice
    from apsq_ov.package import LEVEL_STATE, NEVER, TAU_STATE, Package

    pkg = Package.load(fm["pkg"])
    man = replace(pkg.manifest, levels=list(pkg.manifest.levels))
    seen = []

    def fake(setups, x, runs):
        seen.extend(setups)
        return [float(k + 1) for k in range(len(setups))]

    monkeypatch.setattr(ondevice, "time_states", fake)
    ir = pkg.read_model(ov.Core())
    ondevice.time_bodies(ir, man, [fm["x"][:1]])
    n = len(man.levels)
    assert len(seen) == n + 2
    for model, state in seen[:n]:
        assert model is not ir and state == {}
        assert "apsq_route" not in {name for out in model.outputs for name in out.get_names()}
        assert LEVEL_STATE not in {op.get_variable_id() for op in model.get_ops() if op.get_type_name() == "ReadValue"}
    for (model, state), tau in zip(seen[n:], (NEVER, -NEVER), strict=True):
        assert model is not ir and set(state) == {TAU_STATE} and state[TAU_STATE] == np.float32(tau)
    assert [lv.measured_ms for lv in man.levels] == [float(k + 1) for k in range(n)]
    assert man.router.cost["measured_never_ms"] == n + 1 and man.router.cost["measured_always_ms"] == n + 2


def test_batched_escalations_give_the_cascade_results(fm):
    """``compile_model(escalation_batch=8)`` + ``AdaptiveAsyncInferQueue``: cascade inputs run the fast graph,
    the escalated ones are re-run on the precise level 8 at a time. On 2,000 real test images (clean + noisy)
    every input gets one callback with the result the in-graph cascade gives it — the same escalation
    decision, outputs and route (FP32 everywhere for the escalated: level 0 is the precise route); the fast
    graph is a separate compile, so as in the standalone test ≤ 0.5% may differ by an INT8 step. A partial
    batch is delivered after the timeout without ``wait_all``; an input holding NaN runs the FP32 level at
    once; an error in an escalated input's callback comes out of ``wait_all``."""
    import time

    from apsq_ov.async_queue import AdaptiveAsyncInferQueue, EscalatedInput

    policy = {"max_drop": 0.01, "policy": "cascade"}
    compiled = apsq_ov.compile_model(fm["pkg"], standalone=policy, escalation_batch=8)
    assert compiled.escalation is not None and compiled.escalation.batch == 8
    x = np.concatenate([fm["x"][:1000], shift(fm["x"][1000:2000], "noise")])
    ref = compiled.create_infer_request()
    want = [ref.infer(x[i : i + 1], **policy) for i in range(len(x))]
    # Other policies in the same queue, on the other graphs (levels, pins): exactly what they give alone.
    pin = {"precision": "int8", "precision_map": {ref.model.route_ops[0]: "fp32"}}
    others = [{"max_drop": 0.0}, {"max_drop": 1.0}, pin]
    mixed = {i: (i // 3) % len(others) for i in range(0, len(x), 3)}
    alone = {i: ref.infer(x[i : i + 1], **others[k]) for i, k in mixed.items()}
    got: dict[int, tuple] = {}

    def done(request, i):
        assert i not in got
        got[i] = (type(request), request.get_result())

    queue = AdaptiveAsyncInferQueue(compiled, escalation_timeout=0.05)
    queue.set_callback(done)
    for i in range(len(x)):
        queue.start_async(x[i : i + 1], i, **policy)
        if i in mixed:
            queue.start_async(x[i : i + 1], -1 - i, **others[mixed[i]])
    queue.wait_all()
    for i, res in alone.items():
        kind, other = got.pop(-1 - i)
        assert kind is not EscalatedInput and np.array_equal(other.route, res.route), (i, others[mixed[i]])
        assert np.array_equal(other[0], res[0]), (i, others[mixed[i]])
    assert sorted(got) == list(range(len(x)))
    same = top1 = 0
    escalated = [i for i in range(len(x)) if want[i].escalated]
    for i in range(len(x)):
        kind, res = got[i]
        assert (kind is EscalatedInput) == bool(res.escalated)
        same += bool(res.escalated == want[i].escalated and np.array_equal(res.route, want[i].route)
                     and np.allclose(res[0], want[i][0], rtol=1e-4, atol=1e-5))  # fmt: skip
        top1 += int(res[0].argmax() == want[i][0].argmax())
    assert min(same, top1) >= 0.995 * len(x), (same, top1)
    assert 10 <= len(escalated) < len(x) // 5
    assert all((got[i][1].route == Precision.FP32.code).all() for i in escalated if got[i][1].escalated)

    # A partial batch (3 of 8) is re-run once the oldest has waited the timeout.
    late: list[int] = []
    queue.set_callback(lambda request, i: late.append(i))
    for i in escalated[:3]:
        queue.start_async(x[i : i + 1], i, **policy)
    deadline = time.monotonic() + 5.0
    while len(late) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(late) == sorted(escalated[:3])
    queue.wait_all()

    # NaN: the FP32 level, delivered from the request itself (never held).
    bad = x[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    seen: list = []
    queue.set_callback(lambda request, i: seen.append((type(request), request.get_result())))
    queue.start_async(bad, 0, **policy)
    queue.wait_all()
    assert seen[0][0] is not EscalatedInput and seen[0][1].nonfinite and not seen[0][1].escalated

    def boom(request, i):
        raise RuntimeError(f"callback failed on {i}")

    queue.set_callback(boom)
    queue.start_async(x[escalated[0] : escalated[0] + 1], "escalated-1", **policy)
    with pytest.raises(RuntimeError, match="callback failed on escalated-1"):
        queue.wait_all()


def test_report_shows_the_router_and_the_cascade(fm):
    result = runner.invoke(app, ["report", str(fm["pkg"])])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "router: risk =" in text and "held-out AUC" in text and "escalation cascade" in text
    doc = json.loads(runner.invoke(app, ["report", str(fm["pkg"]), "--json"]).stdout)
    assert doc["router"]["quality"]["auc_held_out"] >= 0.9
    assert all("router_features" in op for op in doc["ops"])


def test_bench_rows_for_the_cascade_that_never_escalates(fm):
    """The bench measures the cascade that never escalates once (the router's cost, for the perfect-router
    bound); where a budget's τ never escalates and that cascade, router included, beats the budget's level,
    ``auto`` runs the fast level alone (same outputs, no router) and the adaptive row copies that static mix; budgets
    with a finite τ copy their cascade row; the others their static mix."""
    import dataclasses

    from apsq_ov.bench import NEVER_ROW, adaptive_rows, dominance, package_methods
    from apsq_ov.package import NEVER, Package
    from apsq_ov.routing import choose_body

    pkg = apsq_ov.Package.load(fm["pkg"])
    m = pkg.manifest
    assert m.router is not None and any(p.tau >= NEVER for p in m.router.points)
    names = [meth.name for meth in package_methods(pkg, bf16_reference=False, forced=False)]
    assert names.count(NEVER_ROW) == 1
    # Levels but the fast route priced out of reach: auto runs the cascade wherever it has a point.
    fast = m.router.fast_level
    slow = dataclasses.replace(m, levels=[dataclasses.replace(lv, measured_ms=0.01 if k == fast else 1e9)
                                          for k, lv in enumerate(m.levels)])  # fmt: skip
    rows = [{"name": n, "family": "apsq cascade" if "cascade" in n else "apsq static mix", "accuracy": 0.9,
             "median_ms": 1.0} | ({"escalated": 0.1} if n.startswith("apsq cascade 0") else {})
            for n in names]  # fmt: skip
    got = {r["max_drop"]: r for r in adaptive_rows(Package(pkg.path, slow), rows)}
    fast_row, seen = f"apsq static mix {m.levels[fast].max_drop:g}", set()
    for d in slow.budgets:
        point = slow.router.point_for(d)
        if point is None or point.tau <= -NEVER or point.escalation >= 0.5 or fastest_level(slow.levels, d) == fast:
            continue  # (a τ that escalates every input is the FP32 level plus a fast pass: never measured)
        never = point.tau >= NEVER
        assert choose_body(slow, d).level == (fast if never else slow.cascade_level), d
        assert got[d]["runs"] == (fast_row if never else f"apsq cascade {point.max_drop:g}")
        assert ("escalated" in got[d]) == (not never)
        seen.add(never)
    assert seen == {True, False}  # both kinds of budget were checked
    points = dominance([*rows, *got.values()], "accuracy")["adaptive_points"]
    assert points and all(got[float(p.split()[-1])]["runs"] != NEVER_ROW for p in points)


def test_bench_reads_each_cascade_rows_escalations_after_timing(fm):
    """``bench.measure`` keeps every package row's route and reads the cascade rows' escalations after the
    timing (comparing routes between timed inferences slowed the next one): per input, the escalation the
    runtime reports for the same policy, and none for a static row (300 real test images, half noisy)."""
    from apsq_ov.bench import measure, package_methods

    pkg = apsq_ov.Package.load(fm["pkg"])
    every = package_methods(pkg, bf16_reference=False, forced=False)
    cascades = [m for m in every if m.fast_codes is not None]
    methods = [next(m for m in every if m.family == "apsq static mix"), cascades[0], cascades[-1]]
    assert len(cascades) >= 2
    x = np.concatenate([fm["x"][:150], shift(fm["x"][150:300], "noise")])
    measure(methods, x, block=25)
    request = apsq_ov.compile_model(fm["pkg"]).create_infer_request()
    for meth in methods:
        assert not meth.routes and len(meth.ms) == len(x)
        if meth.fast_codes is None:
            assert meth.escalated == []
            continue
        order = np.argsort(meth.index)
        want = [bool(request.infer(x[i : i + 1], max_drop=meth.max_drop, policy="cascade").escalated)
                for i in range(len(x))]  # fmt: skip
        assert [meth.escalated[j] for j in order] == want and 0 < sum(want) < len(x)


def test_perfect_router_bound_escalates_exactly_the_disagreeing_inputs(fm):
    """``bench.oracle_bound`` on 200 real test images: from each static level, the inputs it escalates are the
    ones whose top-1 differs from the precise level's, so its top-1 is the precise level's everywhere; each
    input's time is the fast level's + the router's + the precise level's if escalated; ``possible`` says
    whether a bound point no rival dominates dominates one."""
    from apsq_ov.bench import measure, oracle_bound, package_methods, quality

    pkg = apsq_ov.Package.load(fm["pkg"])
    m = pkg.manifest
    methods = package_methods(pkg, bf16_reference=False, forced=False, compiles=1)
    x = shift(fm["x"][:200], "noise")
    measure(methods, x, block=25)
    by = {meth.name: meth for meth in methods}
    precise = by[f"apsq static mix {m.levels[m.router.precise_level].max_drop:g}"]
    ref = np.stack(precise.outputs)[np.argsort(precise.index)]
    labels = fm["y"][:200]
    rows = [{"name": n, "family": meth.family, "max_drop": meth.max_drop} | quality(meth, ref, labels, None)
            for n, meth in by.items()]  # fmt: skip
    bound = oracle_bound(pkg, methods, ref, labels, None, "accuracy", rows)
    assert bound is not None and len(bound["rows"]) == len(m.levels) - 1 and bound["router_ms"] >= 0
    fastest = by[f"apsq static mix {m.levels[-1].max_drop:g}"]
    row = next(r for r in bound["rows"] if r["max_drop"] == m.levels[-1].max_drop)
    y = np.stack(fastest.outputs)[np.argsort(fastest.index)]
    differs = y.argmax(-1).reshape(len(y)) != ref.argmax(-1).reshape(len(y))
    assert 0 < differs.sum() and row["escalated"] == pytest.approx(differs.mean())
    for r in bound["rows"]:
        assert r["agreement"] == 1.0  # the precise level's top-1 on every input
    ms = np.asarray(fastest.ms)[np.argsort(fastest.index)] + bound["router_ms"]
    ms += differs * np.asarray(precise.ms)[np.argsort(precise.index)]
    assert row["median_ms"] == pytest.approx(float(np.median(ms))) and row["mean_ms"] == pytest.approx(ms.mean())
    # A rival slower and worse than the bound point is dominated: the bound could hold; a rival faster and
    # better dominates every bound point: it could not.
    slow = {"name": "r", "family": "apsq static mix", "accuracy": 0.0, "median_ms": 1e9}
    assert oracle_bound(pkg, methods, ref, labels, None, "accuracy", [slow])["possible"]
    fast = {"name": "r", "family": "NNCF accuracy control", "accuracy": 1.0, "median_ms": 0.0}
    got = oracle_bound(pkg, methods, ref, labels, None, "accuracy", [slow, fast])
    assert not got["possible"] and got["undominated"] == []
