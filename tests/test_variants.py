"""Graph structure of the adaptive IR: If chains, state variables, kernels per branch, routing."""

from __future__ import annotations

import dataclasses

import numpy as np
import openvino as ov
import pytest

from apsq_ov.package import Package
from apsq_ov.precision import Precision
from apsq_ov.routing import fastest_level
from apsq_ov.runtime import compile_model
from tests.models import CPU_CAPS, conv_chain_data

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _ifs(model: ov.Model) -> list[ov.Node]:
    return [n for n in model.get_ordered_ops() if n.get_type_name() == "If"]


def _all_ifs(model: ov.Model) -> int:
    count = 0
    for node in _ifs(model):
        count += 1 + _all_ifs(node.get_else_body()) + _all_ifs(node.get_then_body())
    return count


def _body_for(if_node: ov.Node, precision: Precision) -> ov.Model:
    """Walk the If chain to the body that runs ``precision``."""
    node = if_node
    while True:
        if node.get_friendly_name().endswith(f"/apsq_if/{precision.value}"):
            return node.get_then_body()
        inner = _ifs(node.get_else_body())
        if not inner:
            assert precision is Precision.FP32
            return node.get_else_body()
        node = inner[0]


def _runtime_precision(body: ov.Model, op_type: str) -> str:
    compiled = ov.Core().compile_model(body.clone(), "CPU", F32)
    for n in compiled.get_runtime_model().get_ordered_ops():
        info = n.get_rt_info()
        if info["layerType"].astype(str) == op_type:
            return info["runtimePrecision"].astype(str)
    raise AssertionError(f"no {op_type} in the compiled body")


def _bodies(model: ov.Model) -> dict[str, ov.Model]:
    """Every model reachable through If bodies, by name (``apsq/level/<k>``, ``apsq/full`` …)."""
    found: dict[str, ov.Model] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        for node in _ifs(m):
            for body in (node.get_then_body(), node.get_else_body()):
                for r in body.get_results():
                    if r.get_friendly_name().endswith("/route"):  # a level or full body names its route Result
                        found.setdefault(r.get_friendly_name()[: -len("/route")], body)
                stack.append(body)
    return found


def test_dispatch_over_level_bodies_and_one_full_body(tiny_files):
    pkg = tiny_files["package"]
    model = pkg.read_model()
    n_ops = len(pkg.manifest.ops)
    assert n_ops == 3
    bodies = _bodies(model)
    levels = [f"apsq/level/{k}" for k in range(len(pkg.manifest.levels))]
    assert set(levels) | {"apsq/full"} <= set(bodies)
    full = bodies["apsq/full"]
    assert len(_ifs(full)) == n_ops  # one chain per op at the full body's top level
    assert _all_ifs(full) == 2 * n_ops  # fp32/bf16/int8 = two nested Ifs per op
    for k, level in enumerate(pkg.manifest.levels):  # a level body has an If exactly for its routed ops
        assert len(_ifs(bodies[levels[k]])) == len(level.routed)
    assert not _ifs(bodies[levels[0]])  # level 0 (max_drop 0) is the plain FP32 model
    ids = {v.get_info().variable_id for v in model.get_variables()}
    routes_somewhere = any(level.routed for level in pkg.manifest.levels)
    assert ids == {"apsq/level", "apsq/modes", "apsq/limits"} | ({"apsq/escalate"} if routes_somewhere else set())
    assert "apsq_route" in {o.get_any_name() for o in model.outputs}
    assert model.get_rt_info(["apsq", "manifest"]).astype(str).startswith("{")


BF16_KERNELS = {"bf16"} if "BF16" in CPU_CAPS else {"f32"}


@pytest.mark.parametrize(
    ("precision", "expected"),
    [(Precision.FP32, {"f32"}), (Precision.BF16, BF16_KERNELS), (Precision.INT8, {"u8", "i8"})],
    ids=["fp32-branch", "bf16-branch", "int8-branch"],
)
def test_branch_runs_kernels_of_its_precision(tiny_files, precision, expected):
    """Each branch's conv runs kernels of its precision; a CPU that exposes no BF16 (an AVX2-only EPYC)
    runs the BF16 branch's conv on f32 kernels, its Converts still rounding to bf16 (the next test)."""
    full = _bodies(tiny_files["package"].read_model())["apsq/full"]
    conv_if = next(n for n in _ifs(full) if n.get_friendly_name().startswith("conv2/"))
    body = _body_for(conv_if, precision)
    assert _runtime_precision(body, "Convolution").lower() in expected


def test_bf16_branch_rounds_to_bf16_on_every_cpu(tiny_files):
    """The BF16 branch computes BF16's numbers whether or not the CPU has BF16 kernels: its output is
    within bf16's resolution of the FP32 branch's, and not equal to it."""
    full = _bodies(tiny_files["package"].read_model())["apsq/full"]
    conv_if = next(n for n in _ifs(full) if n.get_friendly_name().startswith("conv2/"))
    out = {}
    for p in (Precision.FP32, Precision.BF16):
        body = _body_for(conv_if, p)
        x = [np.random.default_rng(0).standard_normal(tuple(i.get_shape())).astype(np.float32) for i in body.inputs]
        out[p] = ov.Core().compile_model(body.clone(), "CPU", F32)(x)[0]
    err = np.abs(out[Precision.BF16] - out[Precision.FP32])
    assert 0 < err.max() <= 2**-6 * np.abs(out[Precision.FP32]).max(), err.max()


def test_route_follows_state(tiny_files):
    compiled = compile_model(tiny_files["package"].path)
    request = compiled.create_infer_request()
    x = conv_chain_data(1, seed=5)
    for p in (Precision.FP32, Precision.BF16, Precision.INT8):
        res = request.infer(x, precision=p)
        assert [Precision.from_code(c) for c in res.route] == [p, p, p]
    res = request.infer(x, precision=Precision.FP32, precision_map={"conv2": "int8"})
    assert [Precision.from_code(c) for c in res.route] == [Precision.FP32, Precision.INT8, Precision.FP32]


def test_each_level_runs_its_selected_precisions(tiny_files):
    """max_drop picks a level; the route reports exactly that level's static choices (in-range input).

    A budget runs the level :func:`fastest_level` names: its own, or a smaller budget's that timed faster at
    calibration (on this tiny model FP32 and INT8 time alike, so which one serves is noise). Without the
    timings each budget runs its own level, so every level body is checked."""
    pkg = tiny_files["package"]
    x = conv_chain_data(1, seed=5) * 0.1  # well inside every calibrated range: routed ops stay fast
    untimed = dataclasses.replace(pkg.manifest, levels=[dataclasses.replace(lv, measured_ms=None)
                                                        for lv in pkg.manifest.levels])  # fmt: skip
    served: set[int] = set()
    for manifest in (pkg.manifest, untimed):
        compiled = compile_model(Package(pkg.path, manifest))
        levels = manifest.levels
        for level in levels:
            k = compiled.plan(max_drop=level.max_drop).level
            assert k == fastest_level(levels, level.max_drop)
            res = compiled(x, max_drop=level.max_drop)
            want = [levels[k].choices[op.name].fast for op in manifest.ops]
            assert list(res.route_precisions().values()) == want
            if manifest is untimed:
                served.add(k)
    assert served == set(range(len(pkg.manifest.levels)))


def test_route_follows_input_statistics_and_limit_state(tiny_files):
    """Inputs beyond the calibrated INT8 range go to fp32; raising the limit state keeps them INT8."""
    pkg = tiny_files["package"]
    compiled = compile_model(pkg.path)
    request = compiled.create_infer_request()
    request.set_policy(precision="fp32")  # the fully routed body
    conv1 = pkg.manifest.ops[0]
    states = {s.name: s for s in request.request.query_state()}
    limit_state, mode_state = states["apsq/limits"], states["apsq/modes"]  # one slot per op (conv1 first)
    modes = np.array([Precision.INT8.code, Precision.FP32.code, Precision.FP32.code], np.int32)
    mode_state.state = ov.Tensor(modes)
    limit_state.state = ov.Tensor(np.array([1.0, 3e38, 3e38], np.float32))
    x_in = conv_chain_data(1, seed=7) * 0.5
    x_out = np.full_like(x_in, 4.0 * conv1.int8_absmax)
    assert x_in.max() < conv1.int8_absmax
    assert request.request.infer([x_in])["apsq_route"][0] == Precision.INT8.code
    assert request.request.infer([x_out])["apsq_route"][0] == Precision.FP32.code
    limit_state.state = ov.Tensor(np.array([10.0, 3e38, 3e38], np.float32))  # no recompilation
    assert request.request.infer([x_out])["apsq_route"][0] == Precision.INT8.code


def test_plain_openvino_runs_the_default_policy(tiny_files):
    core = ov.Core()
    model = core.read_model(tiny_files["package"].model_xml)
    compiled = core.compile_model(model, "CPU", F32)
    res = compiled(conv_chain_data(1, seed=3))
    adaptive = compile_model(tiny_files["package"].path)(conv_chain_data(1, seed=3))
    np.testing.assert_array_equal(res["apsq_route"], adaptive.route)
    np.testing.assert_allclose(res["logits"], adaptive["logits"], rtol=0, atol=0)


def test_forced_fp32_equals_source_model(tiny_files):
    core = ov.Core()
    plain = core.compile_model(core.read_model(tiny_files["model"]), "CPU", F32)
    adaptive = compile_model(tiny_files["package"].path)
    x = conv_chain_data(4, seed=9)
    for i in range(4):
        ref = plain(x[i : i + 1])[0]
        got = adaptive(x[i : i + 1], precision="fp32")["logits"]
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_benchmark_app_runs_the_adaptive_ir(tiny_files):
    """OpenVINO's own benchmark_app (shipped in the openvino wheel) runs the package's IR as is."""
    import shutil
    import subprocess

    tool = shutil.which("benchmark_app")
    assert tool is not None, "benchmark_app ships with the openvino wheel"
    proc = subprocess.run(
        [tool, "-m", str(tiny_files["package"].model_xml), "-d", "CPU", "-niter", "20", "-hint", "latency"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Throughput" in proc.stdout
