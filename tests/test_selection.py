"""Hardware-aware selection: the ILP per level, which ops get routed, device-aware candidates, and the
package IR's level bodies on a real compiled graph (a tiny model built in code)."""

from __future__ import annotations

import itertools
import json
import math

import nncf
import numpy as np
import openvino as ov
import pytest

from apsq_ov.calibrate.levels import build_package_model
from apsq_ov.calibrate.selection import OpCost, options, select_levels, solve_level
from apsq_ov.calibrate.variants import (
    find_routable_ops,
    linear_successors,
    routable_producers,
)
from apsq_ov.package import ESCALATE_STATE, LEVEL_STATE, OpChoice
from apsq_ov.precision import Precision
from apsq_ov.profiles import DeviceProfile, load_profile
from tests.models import conv_chain, conv_chain_data, two_heads

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
P3 = (Precision.FP32, Precision.BF16, Precision.INT8)


def _op(name: str, rng: np.random.Generator, n: int = 50, escalated: float | None = None, macs: float = 1e8) -> OpCost:
    harm = {Precision.BF16: (rng.random(n) < rng.uniform(0, 0.02)).astype(float),
            Precision.INT8: (rng.random(n) < rng.uniform(0, 0.1)).astype(float)}  # fmt: skip
    esc = None if escalated is None else (np.arange(n) < escalated * n)
    return OpCost(name, "Convolution", macs, 4e5, P3, harm, esc)


def _profile(**routing: float) -> DeviceProfile:
    data = load_profile(path="CPU").to_json()
    for key, value in routing.items():
        data["routing"][key]["value"] = value
    return DeviceProfile.from_json(data)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    profile = _profile(if_base_ms=0.01, if_per_mb_ms=0.1)
    ops_ = [_op(f"op{i}", rng, escalated=rng.choice([0.0, 0.3, 1.0])) for i in range(4)]
    opts = {op.name: options(op, profile) for op in ops_}
    budget = float(rng.uniform(0.01, 0.1))
    level = solve_level(ops_, opts, budget)
    best = min(
        sum(o.latency_ms for o in combo)
        for combo in itertools.product(*(opts[op.name] for op in ops_))
        if sum(o.drop for o in combo) <= budget + 1e-12
    )
    assert level.predicted_ms == pytest.approx(best, rel=1e-9)
    assert level.predicted_drop <= budget + 1e-12


def test_only_ops_whose_choice_changes_across_inputs_get_a_routed_option():
    rng = np.random.default_rng(0)
    profile = load_profile(path="CPU")
    assert not any(o.choice.routed for o in options(_op("a", rng, escalated=0.0), profile))
    assert not any(o.choice.routed for o in options(_op("b", rng, escalated=1.0), profile))
    assert not any(o.choice.routed for o in options(_op("c", rng, escalated=None), profile))
    routed = [o for o in options(_op("d", rng, escalated=0.25), profile) if o.choice.routed]
    assert {o.choice.safe for o in routed} == {Precision.FP32, Precision.BF16}
    assert all(o.escalation == pytest.approx(13 / 50) for o in routed)  # 13 of 50 inputs escalate


def test_routing_is_chosen_when_it_pays_and_not_when_the_if_costs_too_much():
    """An op whose INT8 harm falls exactly on the inputs that leave its range: routing it is free of
    harm and faster than fp32; it is selected when the If is cheap, and not when the If costs more
    than the op itself."""
    n = 40
    escalated = np.arange(n) < 10
    op = OpCost("hostile", "Convolution", 1e8, 4e5, P3,
                {Precision.BF16: np.ones(n), Precision.INT8: escalated.astype(float)}, escalated)  # fmt: skip
    cheap = select_levels([op], _profile(if_base_ms=0.0, if_per_mb_ms=0.0), [0.01])
    assert cheap[1].choices["hostile"] == OpChoice(Precision.INT8, Precision.FP32)
    dear = select_levels([op], _profile(if_base_ms=100.0, if_per_mb_ms=0.0), [0.01])
    assert dear[1].choices["hostile"] == OpChoice(Precision.FP32, Precision.FP32)


def test_levels_are_nested_and_span_fp32_to_fastest():
    rng = np.random.default_rng(3)
    ops_ = [_op(f"op{i}", rng, escalated=0.3) for i in range(8)]
    levels = select_levels(ops_, load_profile(path="CPU"), [0.005, 0.01, 0.02, 0.05])
    assert [lv.max_drop for lv in levels] == [0.0, 0.005, 0.01, 0.02, 0.05, 1.0]
    assert all(c == OpChoice(Precision.FP32, Precision.FP32) for c in levels[0].choices.values())
    assert all(c == OpChoice(Precision.INT8, Precision.INT8) for c in levels[-1].choices.values())
    for lo, hi in itertools.pairwise(levels):
        for name, c in hi.choices.items():
            floor = lo.choices[name]
            assert c.fast.rank >= floor.fast.rank and c.safe.rank >= floor.safe.rank
        assert hi.predicted_ms <= lo.predicted_ms + 1e-12


def test_gen11_profile_never_selects_int8_for_speed():
    """Gen11 iGPUs have no DP4A: INT8 is slower than FP16 there and is never a candidate."""
    gen11 = load_profile(path="GPU.gen11")
    assert gen11.int8_hardware == "none"
    rng = np.random.default_rng(1)
    offered = (Precision.FP32, Precision.FP16, Precision.INT8)
    ops_ = [OpCost(f"op{i}", t, m, 4e5, offered,
                   {Precision.FP16: np.zeros(50), Precision.INT8: np.zeros(50)},  # INT8 even harmless
                   rng.random(50) < 0.3)
            for i, (t, m) in enumerate([("Convolution", 1e8), ("GroupConvolution", 1e6), ("MatMul", 1e6)])]  # fmt: skip
    for level in select_levels(ops_, gen11, [0.001, 0.01, 0.1]):
        assert all(Precision.INT8 not in (c.fast, c.safe) for c in level.choices.values())
    assert Precision.INT8 not in gen11.default_precisions


def test_dp4a_and_xmx_igpu_profiles_prefer_int8_and_cite_sources():
    assert load_profile("GPU").name == load_profile(path="GPU.gen12-iris-xe").name
    for name in ("GPU.gen12-iris-xe", "GPU.core-ultra-arc"):
        gpu = load_profile(path=name)
        assert gpu.device == "GPU" and gpu.int8_hardware in ("DP4A", "XMX")
        offered = (Precision.FP32, Precision.FP16, Precision.INT8)
        assert gpu.faster_than_fp32("Convolution", offered)[0] is Precision.INT8
        kinds = {pt.latency_ms.kind for row in gpu.points.values() for pts in row.values() for pt in pts}
        assert kinds <= {"published", "estimate"}  # never "measured": there is no iGPU in this workplace
        assert gpu.compile_config["INFERENCE_PRECISION_HINT"] == "f32"


def test_int8_is_not_a_candidate_where_the_profile_shows_bf16_faster():
    """Per op size: where the profile's INT8 point is slower than BF16 (small ops on this CPU, BlazeFace)
    INT8 is never chosen for speed; at sizes where INT8 is faster it is."""
    data = load_profile(path="CPU").to_json()
    prov = {"kind": "estimate", "method": "test"}

    def points(small_ms: float, big_ms: float) -> list[dict]:
        return [{"shape": "small", "macs": 1e5, "latency_ms": {"value": small_ms, "provenance": prov}},
                {"shape": "big", "macs": 1e8, "latency_ms": {"value": big_ms, "provenance": prov}}]  # fmt: skip

    data["op_types"]["GroupConvolution"] = {"fp32": points(0.010, 10.0), "bf16": points(0.006, 5.0),
                                            "int8": points(0.008, 2.5)}  # fmt: skip
    profile = DeviceProfile.from_json(data)
    zeros = {Precision.BF16: np.zeros(10), Precision.INT8: np.zeros(10)}
    small_op = OpCost("dw_small", "GroupConvolution", 1e5, 1e4, P3, zeros, np.zeros(10, bool))
    big_op = OpCost("dw_big", "GroupConvolution", 1e8, 1e6, P3, zeros, np.zeros(10, bool))
    assert Precision.INT8 not in {o.choice.fast for o in options(small_op, profile)}
    levels = select_levels([small_op, big_op], profile, [0.01])
    assert levels[1].choices["dw_small"].fast is Precision.BF16
    assert levels[1].choices["dw_big"].fast is Precision.INT8


def test_malformed_profile_field_is_named(tmp_path):
    data = load_profile(path="CPU").to_json()
    data["op_types"]["Convolution"]["int8"][0]["latency_ms"]["provenance"] = {"kind": "measured"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(Exception, match=r"bad.json: field op_types/Convolution/int8/0/latency_ms/provenance"):
        load_profile(path=bad)


def test_a_mostly_int8_level_is_nncfs_graph_with_its_fp32_ops_unquantized():
    """A static level with most ops INT8 and the rest FP32 is built from NNCF's INT8 graph (whose
    FakeQuantizes on adds and pools keep blocks in u8) with those ops put back at FP32, as NNCF's own
    ``ignored_scope`` leaves them: its output matches that model's to within INT8 noise, and the FP32 op
    reads its input unquantized, with the FP32 model's weights."""
    from apsq_ov.calibrate.levels import level_body

    model = conv_chain()
    model.reshape([1, 3, 16, 16])
    data = conv_chain_data(32)
    ds = nncf.Dataset([x[None] for x in data])
    q = nncf.quantize(model.clone(), ds, subset_size=32)
    ignored = nncf.quantize(model.clone(), ds, subset_size=32, ignored_scope=nncf.IgnoredScope(names=["conv2"]))
    variants = {u.name: P3 for u in find_routable_ops(model, q)}
    int8, fp32 = OpChoice(Precision.INT8, Precision.INT8), OpChoice(Precision.FP32, Precision.FP32)
    body, _ = level_body(model, q, variants, {"conv1": int8, "conv2": fp32, "fc": int8}, "mix", [])
    conv2 = next(n for n in body.get_ordered_ops() if n.get_friendly_name() == "conv2")
    assert conv2.input(0).get_source_output().get_node().get_type_name() != "FakeQuantize"
    want = next(u for u in find_routable_ops(model) if u.name == "conv2").op.input(1).get_source_output()
    np.testing.assert_array_equal(conv2.input(1).get_source_output().get_node().get_data(), want.get_node().get_data())
    fqs = {n.get_friendly_name() for n in body.get_ordered_ops() if n.get_type_name() == "FakeQuantize"}
    nncf_fqs = {n.get_friendly_name() for n in q.get_ordered_ops() if n.get_type_name() == "FakeQuantize"}
    assert fqs and fqs <= nncf_fqs  # NNCF's own quantizers (conv1 and fc stay INT8), none added
    core = ov.Core()
    x = conv_chain_data(8, seed=5)
    ours = core.compile_model(body, "CPU", F32)
    theirs = core.compile_model(ignored, "CPU", F32)
    all_int8 = core.compile_model(q, "CPU", F32)
    for xi in x:
        y, ref, y8 = ours([xi[None]])[0], theirs([xi[None]])[0], all_int8([xi[None]])[0]
        assert np.abs(y - ref).max() <= 0.25 * np.abs(y8 - ref).max() + 1e-6, (y, ref, y8)


def test_level_body_routes_per_input_and_escalate_state_overrides():
    """A level body with conv2 routed (INT8 unless its input leaves the calibrated range) and the other
    ops static: in-range inputs take INT8, out-of-range ones fp32, and escalate=inf keeps INT8."""
    model = conv_chain()
    model.reshape([1, 3, 16, 16])
    data = conv_chain_data(32)
    q = nncf.quantize(model.clone(), nncf.Dataset([x[None] for x in data]), subset_size=32)
    variants = {u.name: P3 for u in find_routable_ops(model, q)}
    static = OpChoice(Precision.INT8, Precision.INT8)
    level = {"conv1": OpChoice(Precision.FP32, Precision.FP32), "conv2": OpChoice(Precision.INT8, Precision.FP32),
             "fc": static}  # fmt: skip
    fp32 = {n: OpChoice(Precision.FP32, Precision.FP32) for n in variants}
    pm = build_package_model(model, q, variants, [fp32, level], default_level=1)
    compiled = ov.Core().compile_model(pm, "CPU", F32)
    req = compiled.create_infer_request()
    states = {s.name: s for s in req.query_state()}
    x_in = data[:1] * 0.5
    x_out = data[:1] * 50.0
    assert list(req.infer([x_in])["apsq_route"]) == [Precision.FP32.code, Precision.INT8.code, Precision.INT8.code]
    assert list(req.infer([x_out])["apsq_route"]) == [Precision.FP32.code, Precision.FP32.code, Precision.INT8.code]
    states[ESCALATE_STATE].state = ov.Tensor(np.array(3.0e38, np.float32))
    assert req.infer([x_out])["apsq_route"][1] == Precision.INT8.code
    states[LEVEL_STATE].state = ov.Tensor(np.array(0, np.int32))  # level 0: plain fp32, no If
    plain = ov.Core().compile_model(model, "CPU", F32)
    np.testing.assert_array_equal(req.infer([x_out])[0], plain([x_out])[0])


def test_int4_weight_only_variant_for_matmuls_only(tmp_path):
    """``--precisions ...,int4``: NNCF compress_weights gives MatMuls (never convolutions) an INT4
    weight-only variant; pinning it changes only that op's route and its weights really are 4-bit."""
    from apsq_ov.calibrate import CalibrationConfig, calibrate
    from apsq_ov.runtime import compile_model
    from tests.models import save

    model = save(conv_chain(channels=32), tmp_path / "m.xml")
    np.savez(tmp_path / "c.npz", x=conv_chain_data(32))
    config = CalibrationConfig(subset_size=16, drop_samples=8, sensitivity_samples=8,
                               precisions=(*P3, Precision.INT4))  # fmt: skip
    pkg = calibrate(model, tmp_path / "c.npz", tmp_path / "pkg", config)
    offered = {op.name: op.variants for op in pkg.manifest.ops}
    assert Precision.INT4 in offered["fc"]
    assert Precision.INT4 not in offered["conv1"] and Precision.INT4 not in offered["conv2"]
    assert Precision.INT4 in pkg.manifest.op("fc").drops
    compiled = compile_model(pkg.path)
    x = conv_chain_data(1, seed=4)
    base = compiled(x, precision="fp32")
    pinned = compiled(x, precision="fp32", precision_map={"fc": "int4"})
    assert [Precision.from_code(c) for c in pinned.route] == [Precision.FP32, Precision.FP32, Precision.INT4]
    err = np.abs(pinned["logits"] - base["logits"]).max() / np.abs(base["logits"]).max()
    assert 1e-4 < err < 0.5  # a real 4-bit weight error, not a copy of fp32 and not garbage
    assert _has_int4(pkg.read_model())  # the IR holds the 4-bit weights


def _has_int4(model: ov.Model) -> bool:
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Constant" and node.get_output_element_type(0) in (ov.Type.i4, ov.Type.u4):
            return True
        if node.get_type_name() == "If" and (_has_int4(node.get_then_body()) or _has_int4(node.get_else_body())):
            return True
    return False


def test_adjacent_routed_ops_that_always_agree_share_one_if():
    """conv1 -> relu -> conv2 is a linear run; routed together with identical escalations, they share
    one If whose body holds both ops (and the route reports both from the shared decision)."""
    model = conv_chain()
    model.reshape([1, 3, 16, 16])
    data = conv_chain_data(32)
    q = nncf.quantize(model.clone(), nncf.Dataset([x[None] for x in data]), subset_size=32)
    units = find_routable_ops(model, q)
    assert linear_successors(units) == {"conv1": "conv2", "conv2": "fc"}
    n = 20
    esc = np.arange(n) < 5
    harm = {Precision.BF16: np.ones(n), Precision.INT8: esc.astype(float)}  # escalate to fp32, not bf16
    costs = [OpCost(u.name, u.type, 1e8, 1e3, P3, harm, esc) for u in units if u.name != "fc"]
    costs.append(OpCost("fc", "MatMul", 1e3, 1e2, P3, {Precision.BF16: np.zeros(n), Precision.INT8: np.zeros(n)},
                        np.zeros(n, bool)))  # fmt: skip
    levels = select_levels(costs, _profile(if_base_ms=0.0, if_per_mb_ms=0.0), [0.01],
                           successors=linear_successors(units))  # fmt: skip
    level = levels[1].choices
    assert level["conv1"].routed and level["conv2"].shared_with == "conv1"
    variants = {u.name: P3 for u in units}
    pm = build_package_model(model, q, variants, [lv.choices for lv in levels], default_level=1)
    compiled = ov.Core().compile_model(pm, "CPU", F32)
    req = compiled.create_infer_request()
    body = next(b for b in _level_bodies(pm) if b[0] == "apsq/level/1")[1]
    ifs = [n for n in body.get_ordered_ops() if n.get_type_name() == "If"]
    assert len(ifs) == 1 and "run2" in ifs[0].get_friendly_name()
    assert sum(n.get_type_name() == "Convolution" for n in ifs[0].get_then_body().get_ordered_ops()) == 2
    x_in, x_out = data[:1] * 0.5, data[:1] * 50.0
    assert list(req.infer([x_in])["apsq_route"])[:2] == [Precision.INT8.code] * 2
    assert list(req.infer([x_out])["apsq_route"])[:2] == [Precision.FP32.code] * 2
    got = req.infer([x_out])[0].copy()
    # the same route through the fully routed body (conv1, conv2 fp32; fc int8) gives the same logits
    states = {s.name: s for s in req.query_state()}
    states[LEVEL_STATE].state = ov.Tensor(np.array(len(levels), np.int32))
    states["apsq/modes"].state = ov.Tensor(np.array([0, 0, Precision.INT8.code], np.int32))
    np.testing.assert_allclose(req.infer([x_out])[0], got, rtol=0, atol=1e-4)


def _level_bodies(model: ov.Model) -> list[tuple[str, ov.Model]]:
    found, stack = [], [model]
    while stack:
        m = stack.pop()
        for node in m.get_ordered_ops():
            if node.get_type_name() == "If":
                for body in (node.get_then_body(), node.get_else_body()):
                    for r in body.get_results():
                        if r.get_friendly_name().endswith("/route"):
                            found.append((r.get_friendly_name()[: -len("/route")], body))
                    stack.append(body)
    return found


def test_precision_changes_between_neighbours_are_priced():
    """A depthwise op where int8 is a little faster than bf16, between two convs that run fastest in bf16:
    alone it would take int8, but the two precision changes around it cost more than it saves, so the
    fastest level keeps the run in one precision."""
    data = load_profile(path="CPU").to_json()
    prov = {"kind": "estimate", "method": "test"}

    def points(ms: float) -> list[dict]:
        return [{"shape": "s", "macs": 1e6, "latency_ms": {"value": ms, "provenance": prov}}]

    data["op_types"]["GroupConvolution"] = {"fp32": points(1.0), "bf16": points(0.50), "int8": points(0.45)}
    data["op_types"]["Convolution"] = {"fp32": points(1.0), "bf16": points(0.30), "int8": points(0.40)}
    data["routing"]["if_per_mb_ms"]["value"] = 1.0  # 1 ms per MB converted
    profile = DeviceProfile.from_json(data)
    zeros = {Precision.BF16: np.zeros(10), Precision.INT8: np.zeros(10)}

    def op(name: str, kind: str) -> OpCost:
        return OpCost(name, kind, 1e6, 2e5, P3, zeros, None, out_bytes=2**20)

    chain = [op("pw1", "Convolution"), op("dw", "GroupConvolution"), op("pw2", "Convolution")]
    unlinked = select_levels(chain, profile, [])[-1].choices
    assert [unlinked[n].fast for n in ("pw1", "dw", "pw2")] == [Precision.BF16, Precision.INT8, Precision.BF16]
    linked = select_levels(chain, profile, [], successors={"pw1": "dw", "dw": "pw2"})[-1]
    assert [linked.choices[n].fast for n in ("pw1", "dw", "pw2")] == [Precision.BF16] * 3
    assert linked.predicted_ms == pytest.approx(0.3 + 0.5 + 0.3)


def _union_and_sum(ops_: list[OpCost]):
    """Joint drops of two kinds for a level's choices: the flips overlap (a sample is lost when any lowered
    op flips it: far below the sum when the same samples flip everywhere), or they compound (3x the sum)."""
    by = {op.name: op for op in ops_}

    def flips(choices):
        lowered = [by[n].harm[c.fast] for n, c in choices.items() if c.fast is not Precision.FP32]
        return lowered

    def union(choices):
        f = flips(choices)
        return float(np.mean(np.max(f, axis=0))) if f else 0.0

    def compound(choices):
        return min(1.0, 3.0 * sum(float(np.mean(h)) for h in flips(choices)))

    return union, compound


def test_a_mix_cut_from_nncfs_graph_is_measured_on_that_body(tiny_files, monkeypatch):
    """Calibration's joint drop of a mostly-INT8 mix runs the body the package would serve (NNCF's graph,
    compiled on its own), not the mix pinned in the fully routed IR: its scores are that body's, compiled
    here independently, and differ from the pinned IR's; a mix built from the FP32 model is measured pinned."""
    import apsq_ov
    from apsq_ov.calibrate import drops
    from apsq_ov.calibrate.drops import PinnedRuns, joint_losses, served_runs, top1_of
    from apsq_ov.calibrate.levels import builds_from_nncf, level_body
    from apsq_ov.calibrate.ondevice import Routes

    compiled = apsq_ov.compile_model(tiny_files["package"], "CPU", F32)  # its full body: the pinned IR
    model = conv_chain()
    model.reshape([1, 3, 16, 16])
    q = nncf.quantize(model.clone(), nncf.Dataset([x[None] for x in conv_chain_data(32)]), subset_size=32)
    variants = {u.name: (Precision.FP32, Precision.INT8) for u in find_routable_ops(model, q)}
    routes = Routes(model, q, None, variants)
    int8, fp32 = OpChoice(Precision.INT8, Precision.INT8), OpChoice(Precision.FP32, Precision.FP32)
    nncf_mix = {"conv1": int8, "conv2": fp32, "fc": int8}
    fp32_mix = {"conv1": int8, "conv2": fp32, "fc": fp32}
    assert routes.from_nncf(nncf_mix) and builds_from_nncf(model, q, variants, nncf_mix)
    assert not routes.from_nncf(fp32_mix)  # two of three at FP32: cut from the FP32 model
    data = [[x[None]] for x in conv_chain_data(24, seed=3)]
    body, _ = level_body(model, q, variants, nncf_mix, "alone", [])
    alone = ov.Core().compile_model(body, "CPU", F32)
    want = [alone(x)[0] for x in data]
    got = served_runs(compiled, routes, nncf_mix, data)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    runs = PinnedRuns(compiled, data)
    pinned = runs({"conv1": Precision.INT8, "fc": Precision.INT8})
    assert max(float(np.abs(g - p).max()) for g, p in zip(got, pinned, strict=True)) > 1e-3  # another graph
    reference = [top1_of(r) for r in runs(None)]
    calls = []

    def spy(*args):  # the real function, counted
        calls.append(args[2])
        return served_runs(*args)

    monkeypatch.setattr(drops, "served_runs", spy)
    losses = joint_losses(compiled, data, routes)
    served_drop = [np.mean(top1_of(g) != r) for g, r in zip(got, reference, strict=True)]
    np.testing.assert_array_equal(losses(nncf_mix), served_drop)
    np.testing.assert_array_equal(losses(dict(nncf_mix)), served_drop)
    assert calls == [nncf_mix]  # the body ran once, and only for the mix cut from NNCF's graph
    pinned_drop = [np.mean(top1_of(p) != r) for p, r in zip(runs({"conv1": Precision.INT8}), reference, strict=True)]
    np.testing.assert_array_equal(losses(fp32_mix), pinned_drop)
    joint_losses(compiled, data)(nncf_mix)  # without routes: pinned
    assert calls == [nncf_mix]


def test_levels_are_fitted_to_the_measured_joint_drop():
    """Eight ops that all flip the same low-margin samples: the isolated drops sum to many times the joint
    drop, so the additive levels keep ops FP32 for nothing. Fitted levels are faster and their measured
    drop still fits each budget; where drops compound (3x the sum), fitted levels stay within budget too."""
    rng = np.random.default_rng(7)
    n = 200
    fragile = rng.random(n) < 0.06  # the samples every op flips
    ops_ = []
    for i in range(8):
        harm = {Precision.BF16: (fragile & (rng.random(n) < 0.3)).astype(float),
                Precision.INT8: (fragile & (rng.random(n) < 0.6)).astype(float)}  # fmt: skip
        ops_.append(OpCost(f"op{i}", "Convolution", 1e8 * (i + 1), 4e5, P3, harm, None))
    union, compound = _union_and_sum(ops_)
    budgets = [0.01, 0.02, 0.04]
    profile = load_profile(path="CPU")
    additive = select_levels(ops_, profile, budgets)
    calls = []
    fitted = select_levels(ops_, profile, budgets, measure=lambda c: calls.append(1) or union(c),
                           progress=lambda d, t: None)  # fmt: skip
    assert [lv.max_drop for lv in fitted] == [0.0, *budgets, 1.0]
    for a, f in zip(additive[1:-1], fitted[1:-1], strict=True):
        assert f.measured_drop == pytest.approx(union(f.choices))
        assert f.measured_drop <= f.max_drop + 1e-12  # the budget holds on the measured drop
        assert f.predicted_ms <= a.predicted_ms + 1e-12  # never slower than the additive level
    assert any(f.predicted_ms < a.predicted_ms - 1e-9 for a, f in zip(additive[1:-1], fitted[1:-1], strict=True))
    assert any(f.predicted_drop > f.max_drop for f in fitted[1:-1])  # the sum of isolated drops overstates
    assert len(calls) <= len(budgets) * 7  # a handful of measurements per level
    for lo, hi in itertools.pairwise(fitted):  # still nested
        for name, c in hi.choices.items():
            assert c.fast.rank >= lo.choices[name].fast.rank
    for lv in select_levels(ops_, profile, budgets, measure=compound)[1:-1]:
        assert lv.measured_drop <= lv.max_drop + 1e-12
        assert compound(lv.choices) <= lv.max_drop + 1e-12
    # Under a latency budget that only the fastest mixes meet, every level keeps to it (the ILP trades
    # drop for latency there, as without the fit) and still records its measured drop.
    cap = fitted[-1].predicted_ms * 1.02
    for lv in select_levels(ops_, profile, budgets, latency_budget_ms=cap, measure=union)[1:]:
        assert lv.predicted_ms <= cap + 1e-9 and lv.measured_drop == pytest.approx(union(lv.choices))
    # With the held-out sample count, a level beyond the additive solution must fit with 90% confidence.
    from apsq_ov.calibrate.router import upper_bound

    bounded = select_levels(ops_, profile, budgets, measure=union, samples=n)
    for a, f in zip(additive[1:-1], bounded[1:-1], strict=True):
        beyond = any(c.fast.rank > a.choices[name].fast.rank for name, c in f.choices.items())
        assert not beyond or upper_bound(f.measured_drop * n, n) <= f.max_drop + 1e-12, f
    assert any(f.predicted_ms > g.predicted_ms + 1e-9 for f, g in zip(bounded[1:-1], fitted[1:-1], strict=True))


def test_routable_producers_see_through_pools_and_branches():
    """Whom each routable op takes its data from (``None``: a model input), through any non-routable ops:
    both heads of a two-headed model read conv2 through its relu and pooling, where the linear runs
    (single-consumer chains) stop at conv2's branch."""
    model = two_heads()
    model.reshape([1, 3, 16, 16])
    units = find_routable_ops(model, None)
    assert routable_producers(units) == {"conv1": {None}, "conv2": {"conv1"}, "box_head": {"conv2"},
                                         "class_head": {"conv2"}}  # fmt: skip
    assert linear_successors(units) == {"conv1": "conv2"}


def test_keep_fp32_pins_the_ops_and_splits_a_run_it_breaks():
    """The fast-route refinement puts ops back at FP32 in every level: a run of routed ops sharing one If
    (an unbroken chain, :func:`share_runs`) that loses a member is split, each op left routing in its own If;
    runs it does not touch keep sharing."""
    from apsq_ov.calibrate.ondevice import keep_fp32

    routed = OpChoice(Precision.INT8, Precision.FP32)
    def joins(head: str) -> OpChoice:
        return OpChoice(Precision.INT8, Precision.FP32, shared_with=head)

    choices = {"a": routed, "b": joins("a"), "c": joins("a"), "d": routed, "e": joins("d"),
               "f": OpChoice(Precision.INT8, Precision.INT8)}  # fmt: skip
    out = keep_fp32(choices, {"b", "f"})
    assert out["b"] == out["f"] == OpChoice(Precision.FP32, Precision.FP32)
    assert out["a"] == routed and out["c"] == routed  # the run a-b-c is broken: c routes on its own
    assert out["d"] == choices["d"] and out["e"] == choices["e"]  # d-e untouched
    assert keep_fp32(choices, {"a"})["b"].shared_with is None  # its head gone, b routes on its own
    assert keep_fp32(choices, set()) == choices


def test_refinement_keeps_an_op_that_helps_and_pins_it_fp32_in_every_level(monkeypatch):
    """The fast-route refinement's decision and bookkeeping on a real compiled graph, with the quality
    measure given: only conv1 at FP32 removes the disagreement. The greedy keeps conv1 (a boundary op: it
    reads the model input), the samples that chose nothing confirm it, and conv1 becomes FP32 in every
    level with the fastest level's drop re-measured; a measure that no op changes keeps the levels as they
    were. Timing is real but its gate is opened (a tiny graph's timing says nothing here: on CI a 2-round
    median of one candidate ran more than 11x the fastest level's, and a 10x tolerance dropped conv1)."""
    from apsq_ov.calibrate import ondevice
    from apsq_ov.package import Level, OpRecord

    model = conv_chain()
    model.reshape([1, 3, 16, 16])
    data = conv_chain_data(32)
    q = nncf.quantize(model.clone(), nncf.Dataset([x[None] for x in data]), subset_size=32)
    units = find_routable_ops(model, q)
    two = (Precision.FP32, Precision.INT8)
    variants = {u.name: two for u in units}
    int8, fp32 = OpChoice(Precision.INT8, Precision.INT8), OpChoice(Precision.FP32, Precision.FP32)
    levels = [Level(0.0, {u.name: fp32 for u in units}, 1.0, 0.0, "fp32"),
              Level(0.1, {"conv1": int8, "conv2": fp32, "fc": int8}, 0.8, 0.05, "mix"),
              Level(1.0, {u.name: int8 for u in units}, 0.5, 0.1, "fastest", measured_drop=1.0)]  # fmt: skip
    costs = [OpCost(u.name, u.type, 1e6, 1e3, two, {Precision.INT8: np.full(40, 0.5)}) for u in units]
    records = [OpRecord(index=u.index, name=u.name, type=u.type, depth=u.index, variants=two,
                        sensitivity={"predicted": {"int8": 0.01}}) for u in units]  # fmt: skip
    monkeypatch.setattr(ondevice, "REFINE_TOLERANCE", math.inf)

    def refine(losses):
        routes = ondevice.Routes(model, q, None, variants)
        return ondevice.refine_fast_route(levels, records, costs, routable_producers(units), load_profile(path="CPU"),
                                          routes, [data[:1]], losses, runs=4)  # fmt: skip

    out, report = refine(lambda c: np.full(40, 0.0 if c["conv1"].fast is Precision.FP32 else 1.0))
    assert report["kept_fp32"] == ["conv1"] and report["p_value"] < ondevice.REFINE_ALPHA, report
    assert all(lv.choices["conv1"] == fp32 for lv in out)
    assert out[-1].choices["conv2"] == out[-1].choices["fc"] == int8 and out[-1].measured_drop == 0.0
    assert out[0] is levels[0]  # conv1 was FP32 there already: unchanged
    assert out[1].choices == {"conv1": fp32, "conv2": fp32, "fc": int8} and out[1].measured_drop == 0.0  # re-measured
    assert out[-1].predicted_drop == 0.0  # 0.1 less conv1's isolated 0.5, floored at 0
    same, report = refine(lambda c: np.ones(40))
    assert same == levels and report["kept_fp32"] == [] and report["reason"]


_INT8, _FP32 = OpChoice(Precision.INT8, Precision.INT8), OpChoice(Precision.FP32, Precision.FP32)
_NONE, _SOME, _EVERY = {"a": _FP32, "b": _FP32}, {"a": _INT8, "b": _FP32}, {"a": _INT8, "b": _INT8}


def _scripted_fast_route(monkeypatch, rounds: dict[str, list[float]]):
    """:func:`~apsq_ov.calibrate.ondevice.fastest_route` with :func:`time_mixes` (which times real graphs)
    replaced by ``rounds`` keyed "none" / "some" / "every" by mix: the decision alone. :return: ``pick(dial,
    drops)`` (levels at max-drops 0, 0.01, … ; ``drops`` their measured drops, default unmeasured) and the
    list of mixes each call timed."""
    from apsq_ov.calibrate import ondevice
    from apsq_ov.package import Level

    timed: list[list[dict]] = []

    def scripted(mixes, routes, x, runs):
        timed.append(mixes)
        return [rounds["some" if m == _SOME else "every" if m == _EVERY else "none"] for m in mixes]

    monkeypatch.setattr(ondevice, "time_mixes", scripted)

    def pick(dial: tuple, drops: tuple | None = None) -> tuple[int, dict]:
        budgets = (0.0, 0.01, 0.1)[: len(dial) - 1] + (1.0,)
        levels = [Level(d, c, 1.0, d, "x", measured_drop=m)
                  for d, c, m in zip(budgets, dial, drops or (None,) * len(dial), strict=True)]  # fmt: skip
        return ondevice.fastest_route(levels, None, [], runs=40)  # type: ignore[arg-type]

    return pick, timed


def test_the_fast_route_is_the_level_that_times_fastest(monkeypatch):
    """Which level the cascade's fast route runs, with the timings given: the last level unless a smaller
    budget's graph is faster by more than the tolerance in both halves of the rounds; a graph shared by
    several levels is timed once and runs as the largest of them; the FP32 level is never a candidate."""
    none, some, every = _NONE, _SOME, _EVERY
    rounds: dict[str, list[float]] = {}
    pick4, timed = _scripted_fast_route(monkeypatch, rounds)

    def pick(*dial: dict) -> tuple[int, dict]:
        return pick4(dial)

    rounds |= {"none": [0.1] * 40, "some": [1.0] * 40, "every": [1.2] * 40}
    k, report = pick(none, some, every, every)
    assert k == 1 and report["level"] == 1 and report["measured"]
    assert timed[-1] == [some, every]  # FP32 never timed; levels 0.1 and 1 share one graph, timed once
    assert report["median_ms"] == {"0.01": 1.0, "0.1": 1.2}
    rounds["some"] = [1.0, 1.2] * 20  # faster in the even rounds only: drift, not the graph
    assert pick(none, some, every, every)[0] == 3
    rounds["some"] = [1.19] * 40  # within the tolerance of the last level
    assert pick(none, some, every, every)[0] == 3
    rounds |= {"some": [1.2] * 40, "every": [1.0] * 40}  # the last level's graph is the fastest
    assert pick(none, some, every, every)[0] == 3
    assert pick(none, every, every, some)[0] == 2  # a smaller budget's shared graph: its largest level
    calls = len(timed)
    k, report = pick(none, every, every, every)
    assert k == 3 and not report["measured"] and len(timed) == calls  # one graph: nothing to time


def test_a_timing_tie_goes_to_the_fast_route_that_drops_less(monkeypatch):
    """Levels timing within the tolerance of the timing winner in both halves are a tie on this device; of
    them the cascade's fast route is the one with the lowest measured drop (EfficientNet-Lite0: the all-INT8
    level 1% faster than the mix 0.16 but 15.1% against 12.8% held-out drop). Faster by more than the
    tolerance still wins, and with a drop unmeasured the timing alone decides."""
    rounds = {"none": [9.0] * 40}
    dial_of_3, _ = _scripted_fast_route(monkeypatch, rounds)

    def pick(drops: tuple) -> tuple[int, dict]:  # levels 0, 0.01 (some INT8), 1 (all INT8)
        return dial_of_3((_NONE, _SOME, _EVERY), drops)

    rounds |= {"some": [8.327] * 40, "every": [8.245] * 40}
    k, report = pick((0.0, 0.128, 0.151))
    assert k == 1 and report["timing_winner"] == 2 and report["tied"] == [1, 2]
    assert pick((0.0, 0.151, 0.128))[0] == 2  # the faster one also drops less
    assert pick((0.0, 0.151, 0.151))[0] == 2  # equal drops: the timing winner
    assert pick((0.0, 0.128, None))[0] == 2  # a drop unknown: the timing alone
    rounds["some"] = [8.5] * 40  # 3.1% slower: no tie
    k, report = pick((0.0, 0.128, 0.151))
    assert k == 2 and report["tied"] == [2]
    rounds |= {"some": [8.245] * 40, "every": [8.5] * 40}  # the smaller budget faster by > tolerance
    assert pick((0.0, 0.151, 0.128))[0] == 1
