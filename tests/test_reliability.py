"""Reliability: input validation (Python API and CLI), NaN/Inf routing, package integrity,
interrupted calibration, concurrency without state bleed, routing invariants, determinism."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import apsq_ov
from apsq_ov import async_queue
from apsq_ov.cli import app
from apsq_ov.errors import ConfigError, DataError
from apsq_ov.package import ROUTE_OUTPUT, Package, sha256_file
from tests.models import conv_chain_data

runner = CliRunner()
FP32, BF16, INT8 = apsq_ov.Precision.FP32, apsq_ov.Precision.BF16, apsq_ov.Precision.INT8


@pytest.fixture(scope="module")
def compiled(tiny_files):
    return apsq_ov.compile_model(tiny_files["package"].path)


def cli_error(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


# --- 1. validation matrix (Python API) -------------------------------------------------------------

GOOD = conv_chain_data(1, seed=21)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (GOOD[0], "input x: shape (3, 16, 16) has rank 3, model input x wants rank 4"),
        (conv_chain_data(1, size=8), "input x: shape (1, 3, 8, 8) does not fit model input x [1,3,16,16]"),
        ((GOOD * 255).astype(np.int32), "input x: dtype int32 but model input x is float32"),
        (GOOD.astype(np.complex64), "input x: dtype complex64 is not numeric"),
        ({"images": GOOD}, "no value for model input x"),
        ({"x": GOOD, "y": GOOD}, "keys ['y'] match no model input"),
        (np.zeros((0, 3, 16, 16), np.float32), "input x: empty array (0, 3, 16, 16)"),
        (conv_chain_data(2), "input x: batch 2 but the model runs batch 1"),
        ([GOOD, GOOD], "2 arrays for 1 model inputs"),
    ],
    ids=["rank", "shape", "dtype", "complex", "name", "extra-name", "empty", "batch-too-large", "too-many"],
)
def test_api_rejects_bad_input_naming_it(compiled, inputs, message):
    with pytest.raises(DataError) as info:
        compiled.create_infer_request().infer(inputs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_non_contiguous_and_float64_inputs_give_the_contiguous_result(compiled):
    request = compiled.create_infer_request()
    ref = request.infer(GOOD, max_drop=0.5)
    wide = np.zeros((1, 3, 16, 32), np.float32)
    wide[..., ::2] = GOOD
    view = wide[..., ::2]
    assert not view.flags.c_contiguous
    got = request.infer(view, max_drop=0.5)
    np.testing.assert_array_equal(got["logits"], ref["logits"])
    np.testing.assert_array_equal(got.route, ref.route)
    got64 = request.infer(GOOD.astype(np.float64), max_drop=0.5)
    np.testing.assert_array_equal(got64["logits"], ref["logits"])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_input_routes_to_fp32_and_is_flagged(compiled, value):
    x = GOOD.copy()
    x[0, 1, 2, 3] = value
    request = compiled.create_infer_request()
    res = request.infer(x, precision="int8")
    assert res.nonfinite and (res.route == FP32.code).all()
    clean = request.infer(GOOD, precision="int8")  # the next clean input gets its own policy back
    assert not clean.nonfinite and (clean.route == INT8.code).all()


def test_cli_flags_nonfinite_inputs(tiny_files, tmp_path):
    x = conv_chain_data(4, seed=3)
    x[2, 0, 0, 0] = np.nan
    np.save(tmp_path / "in.npy", x)
    result = runner.invoke(app, ["infer", str(tiny_files["package"].path), "--input", str(tmp_path / "in.npy"),
                                 "--precision", "int8", "--json", "--output", str(tmp_path / "o.npz")])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["nonfinite_inputs"] == 1 and summary["nonfinite_indices"] == [2]
    with np.load(tmp_path / "o.npz") as z:
        assert list(z["nonfinite"]) == [False, False, True, False]
        assert (z["route"][2] == FP32.code).all() and (z["route"][0] == INT8.code).all()


# --- 3. package integrity --------------------------------------------------------------------------


@pytest.fixture
def pkg_copy(tiny_files, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_files["package"].path, dst)
    np.save(tmp_path / "in.npy", conv_chain_data(1))
    return dst


def _edit_manifest(pkg, edit):
    data = json.loads((pkg / "apsq.json").read_text())
    edit(data)
    (pkg / "apsq.json").write_text(json.dumps(data))


def test_tampered_model_xml(pkg_copy):
    xml = (pkg_copy / "model.xml").read_text()
    assert 'name="conv2' in xml
    (pkg_copy / "model.xml").write_text(xml.replace('name="conv2', 'name="convX', 1))
    assert "model.xml: sha256 differs from the manifest" in cli_error(
        "infer", pkg_copy, "--input", pkg_copy.parent / "in.npy"
    )


def test_manifest_from_another_model(pkg_copy, tmp_path, tiny_files):
    other = tmp_path / "other.npz"
    np.savez(other, x=conv_chain_data(8, seed=99))
    from apsq_ov.calibrate import CalibrationConfig, calibrate
    from tests.models import conv_chain, save

    other_pkg = calibrate(save(conv_chain(seed=5), tmp_path / "o.xml"), other, tmp_path / "opkg",
                          CalibrationConfig(subset_size=8, drop_samples=4, sensitivity_samples=4))  # fmt: skip
    shutil.copy(other_pkg.path / "apsq.json", pkg_copy / "apsq.json")
    assert "does not belong to this model.xml/model.bin" in cli_error("report", pkg_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["ops"][0].update(variants=["fp32"]), "invalid manifest at ops/0/variants"),
        (lambda d: d.pop("files"), "invalid manifest at (top level): 'files' is a required property"),
        (lambda d: d.update(default_max_drop=3), "invalid manifest at default_max_drop"),
        (lambda d: d["ops"][1].update(variants=["fp32", "fp64"]), "invalid manifest at ops/1/variants/1"),
    ],
    ids=["one-variant", "no-hashes", "bad-max-drop", "unknown-precision"],
)
def test_manifest_failing_its_schema(pkg_copy, edit, message):
    _edit_manifest(pkg_copy, edit)
    line = cli_error("report", pkg_copy)
    assert message in line and "apsq.json" in line


def test_manifest_not_json(pkg_copy):
    (pkg_copy / "apsq.json").write_text("{ half a manifest")
    assert "apsq.json: not valid JSON" in cli_error("report", pkg_copy)


def test_killed_calibration_leaves_the_existing_package_untouched(tiny_files, tmp_path):
    import apsq_ov.datasets as ds

    x, y = ds.load_fashion_mnist("train")
    np.savez(tmp_path / "calib.npz", images=x[:1000], labels=y[:1000])
    target = tmp_path / "pkg"
    shutil.copytree(tiny_files["package"].path, target)
    before = {p.name: sha256_file(p) for p in target.iterdir()}
    cmd = [sys.executable, "-m", "apsq_ov.cli", "calibrate", str(apsq_ov.embedded_model()), "--data",
           str(tmp_path / "calib.npz"), "-o", str(target), "--drop-samples", "1000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4.0)  # imports + NNCF + sensitivity; the 21,000 drop inferences keep it busy well past this
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "calibration finished before it could be killed: make it longer"
    assert {p.name: sha256_file(p) for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "pkg"]  # nothing half-written beside it
    Package.load(target)


def test_stale_temporary_of_a_dead_calibration_is_removed(tiny_files, tmp_path):
    stale = tmp_path / ".pkg.tmp-999999-abc"  # pid 999999 does not run
    stale.mkdir()
    (stale / "model.xml").write_text("half")
    from apsq_ov.package import write_package

    pkg = tiny_files["package"]
    write_package(tmp_path / "pkg", pkg.read_model(), Package.load(pkg.path).manifest)
    assert not stale.exists() and Package.load(tmp_path / "pkg")


# --- 4. concurrency --------------------------------------------------------------------------------

POLICIES = [{"max_drop": d} for d in (0.0, 0.005, 0.01, 0.05, 0.3, 1.0)] + [
    {"precision": "int8"},
    {"precision": "bf16"},
    {"precision": "fp32", "precision_map": {"conv2": "int8"}},
]


def _pool():
    rng = np.random.default_rng(4)
    pool = conv_chain_data(40, seed=8)
    return pool * rng.choice([0.2, 1.0, 3.0, 10.0], size=(40, 1, 1, 1)).astype(np.float32)  # in and out of range


def _references(compiled, pool):
    refs = {}
    for k, policy in enumerate(POLICIES):
        for i in range(len(pool)):
            res = compiled.create_infer_request().infer(pool[i : i + 1], **policy)  # alone, on a fresh request
            refs[i, k] = (res["logits"].copy(), res.route.copy())
    return refs


def test_async_queue_10000_requests_with_random_policies_match_runs_alone(compiled):
    pool = _pool()
    refs = _references(compiled, pool)
    rng = np.random.default_rng(0)
    jobs = [(int(rng.integers(len(pool))), int(rng.integers(len(POLICIES)))) for _ in range(10_000)]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def done(request, n):
        res = request.get_result()
        results[n] = (res["logits"], res.route)

    queue = apsq_ov.AdaptiveAsyncInferQueue(compiled, 4)
    queue.set_callback(done)
    for n, (i, k) in enumerate(jobs):
        queue.start_async(pool[i : i + 1], n, **POLICIES[k])
    queue.wait_all()
    assert len(results) == len(jobs)
    routes = set()
    for n, (i, k) in enumerate(jobs):
        logits, route = results[n]
        assert np.array_equal(logits, refs[i, k][0]), (n, i, POLICIES[k])
        assert np.array_equal(route, refs[i, k][1]), (n, i, POLICIES[k])
        routes.add(tuple(route))
    assert len(routes) > 3  # the policies really did route differently


@pytest.mark.parametrize("fed", ["copied", "dispatched"])
def test_async_queue_nonfinite_inputs_and_input_forms_match_runs_alone(compiled, fed, monkeypatch):
    """The queue re-runs inputs holding NaN/Inf on the FP32 level, whether it copied an input into the
    request itself and checked it there (``copied``: static input shapes, as calibration makes them) or
    handed it to OpenVINO's ``start_async`` and checks it in the callback's thread (``dispatched``: dynamic
    shapes); inputs given as Fortran-ordered or float64 arrays, lists or dicts are converted first: every
    result, whichever way in, is what the same input gives alone (NaN compared as NaN)."""
    if fed == "dispatched":
        made = async_queue._Pool.__init__

        def dynamic(self, *args):
            made(self, *args)
            self.inputs = [None] * len(self.inputs)

        monkeypatch.setattr(async_queue._Pool, "__init__", dynamic)
    pool = _pool()[:12]
    bad = pool.copy()
    bad[::3, 0, 1, 2] = np.nan
    bad[1::3, 2, 5, 5] = np.inf
    forms = [lambda a: a, lambda a: [a], lambda a: {"x": a}, lambda a: a.astype(np.float64), np.asfortranarray]
    jobs = [(src, i, k, f) for src in (pool, bad) for i in range(len(pool)) for k in range(len(POLICIES))
            for f in range(len(forms))]  # fmt: skip
    results: dict[int, object] = {}
    queue = apsq_ov.AdaptiveAsyncInferQueue(compiled, 4)
    queue.set_callback(lambda request, n: results.__setitem__(n, request.get_result()))
    for n, (src, i, k, f) in enumerate(jobs):
        queue.start_async(forms[f](src[i : i + 1]), n, **POLICIES[k])
    queue.wait_all()
    assert sorted(results) == list(range(len(jobs)))
    assert queue._pools and all((p.inputs[0] is None) == (fed == "dispatched") for p in queue._pools.values())
    flagged = 0
    for n, (src, i, k, _f) in enumerate(jobs):
        want = compiled.create_infer_request().infer(src[i : i + 1], **POLICIES[k])
        got = results[n]
        assert got.nonfinite == want.nonfinite == (not np.isfinite(src[i]).all()), (n, i, POLICIES[k])
        np.testing.assert_array_equal(got["logits"], want["logits"], err_msg=str((n, i, POLICIES[k])))
        np.testing.assert_array_equal(got.route, want.route)
        if got.nonfinite:
            flagged += 1
            assert (got.route == FP32.code).all()
    assert flagged == 8 * len(POLICIES) * len(forms)


def test_wait_all_gives_back_a_request_whose_callback_never_came(compiled):
    """An inference that fails in OpenVINO calls no Python callback, so its request never goes back to the
    idle ones there: ``wait_all`` finds it still marked busy, reports it and makes it usable again."""
    from apsq_ov.errors import DeviceError

    queue = apsq_ov.AdaptiveAsyncInferQueue(compiled, 2)
    got: list[int] = []
    queue.set_callback(lambda request, n: got.append(n))
    queue.start_async(GOOD, 0)
    queue.wait_all()
    (pool,) = queue._pools.values()
    lost = pool.idle.get()
    pool.busy[lost] = True  # what a failed inference leaves behind
    with pytest.raises(DeviceError, match=f"request {lost} ended without its callback"):
        queue.wait_all()
    for n in range(1, 7):
        queue.start_async(GOOD, n)
    queue.wait_all()
    assert sorted(got) == list(range(7)) and pool.idle.qsize() == 2 and not any(pool.busy)


def test_escalation_batch_settings_are_checked(tiny_files, compiled):
    import dataclasses

    path = tiny_files["package"].path
    for bad in (-1, True, 2.5):
        with pytest.raises(ConfigError, match="escalation_batch"):
            apsq_ov.compile_model(path, escalation_batch=bad)
    with pytest.raises(ConfigError, match="escalation_timeout"):
        apsq_ov.AdaptiveAsyncInferQueue(compiled, escalation_timeout=0)
    pkg = Package.load(path)
    no_router = dataclasses.replace(pkg.manifest, router=None)
    from apsq_ov.runtime import compile_adaptive

    with pytest.raises(ConfigError, match="no escalation cascade"):
        compile_adaptive(pkg.read_model(), no_router, escalation_batch=8)
    assert apsq_ov.compile_model(path, escalation_batch=1).escalation is None  # 1 = nothing to batch


def test_threads_sharing_one_compiled_model(compiled):
    pool = _pool()
    refs = _references(compiled, pool)
    failures: list[str] = []

    def worker(seed):
        request = compiled.create_infer_request()
        rng = np.random.default_rng(seed)
        for _ in range(400):
            i, k = int(rng.integers(len(pool))), int(rng.integers(len(POLICIES)))
            res = request.infer(pool[i : i + 1], **POLICIES[k])
            if not (np.array_equal(res["logits"], refs[i, k][0]) and np.array_equal(res.route, refs[i, k][1])):
                failures.append(f"thread {seed}: input {i} policy {POLICIES[k]}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_callback_errors_are_not_lost(compiled):
    queue = apsq_ov.AdaptiveAsyncInferQueue(compiled, 2)

    def boom(request, userdata):
        raise RuntimeError(f"callback failed on {userdata}")

    queue.set_callback(boom)
    queue.start_async(GOOD, "job-1")
    with pytest.raises(RuntimeError, match="callback failed on job-1"):
        queue.wait_all()


# --- 5. routing invariants on the real graph (hypothesis) ------------------------------------------

scales = st.sampled_from([0.05, 0.5, 1.0, 2.0, 8.0])
budgets = st.floats(0.0, 1.0, allow_nan=False)
hyp = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@hyp
@given(seed=st.integers(0, 10_000), scale=scales)
def test_max_drop_zero_routes_every_op_to_fp32(compiled, seed, scale):
    res = compiled.create_infer_request().infer(conv_chain_data(1, seed=seed) * scale, max_drop=0.0)
    assert (res.route == FP32.code).all()


@hyp
@given(seed=st.integers(0, 10_000), scale=scales, a=budgets, b=budgets)
def test_more_budget_never_routes_an_op_more_precisely(compiled, seed, scale, a, b):
    lo, hi = sorted((a, b))
    x = conv_chain_data(1, seed=seed) * scale
    request = compiled.create_infer_request()
    r_lo = [apsq_ov.Precision.from_code(c).rank for c in request.infer(x, max_drop=lo).route]
    r_hi = [apsq_ov.Precision.from_code(c).rank for c in request.infer(x, max_drop=hi).route]
    assert all(h >= lo_ for h, lo_ in zip(r_hi, r_lo, strict=True)), (lo, hi, r_lo, r_hi)


@hyp
@given(
    seed=st.integers(0, 10_000),
    scale=scales,
    budget=budgets,
    pins=st.dictionaries(st.sampled_from(["conv1", "conv2", "fc"]), st.sampled_from(["fp32", "bf16", "int8"])),
)
def test_precision_map_pins_always_win(compiled, seed, scale, budget, pins):
    res = compiled.create_infer_request().infer(conv_chain_data(1, seed=seed) * scale, max_drop=budget,
                                                precision_map=pins)  # fmt: skip
    taken = {op: p.value for op, p in res.route_precisions().items()}
    assert all(taken[op] == p for op, p in pins.items())


# --- 6. determinism --------------------------------------------------------------------------------


def test_same_input_and_budget_give_bitwise_same_output_across_processes(tiny_files, tmp_path):
    np.save(tmp_path / "in.npy", _pool()[:20])
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}.npz"
        subprocess.run([sys.executable, "-m", "apsq_ov.cli", "infer", str(tiny_files["package"].path), "--input",
                        str(tmp_path / "in.npy"), "--max-drop", "0.3", "--output", str(out), "--json"],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": str(k)})  # fmt: skip
        with np.load(out) as z:
            outs.append({key: z[key] for key in ("logits", "route")})
    assert np.array_equal(outs[0]["logits"], outs[1]["logits"])
    assert np.array_equal(outs[0]["route"], outs[1]["route"])
    again = [apsq_ov.compile_model(tiny_files["package"].path)(_pool()[i : i + 1], max_drop=0.3) for i in range(2)]
    assert np.array_equal(again[0]["logits"], outs[0]["logits"][:1])


# --- 1. validation matrix (CLI infer) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": GOOD[0]}, "in.npz[x]: shape (3, 16, 16) has rank 3, model input x wants rank 4"),
        ({"x": conv_chain_data(2, size=8)}, "in.npz[x]: shape (2, 3, 8, 8) does not fit model input x [1,3,16,16]"),
        ({"x": (GOOD * 255).astype(np.uint8)}, "in.npz[x]: dtype uint8 but model input x is float32"),
        ({"pixels": GOOD}, "in.npz: no array for model input 'x'"),
        ({"x": np.zeros((0, 3, 16, 16), np.float32)}, "in.npz[x]: empty array (0, 3, 16, 16)"),
        ({"x": GOOD, "labels": np.zeros(3)}, "in.npz[labels]: (3,) labels for 1 samples"),
    ],
    ids=["rank", "shape", "dtype", "name", "empty", "labels"],
)
def test_cli_infer_rejects_bad_input_naming_it(tiny_files, tmp_path, arrays, message):
    np.savez(tmp_path / "in.npz", **arrays)
    out = tmp_path / "o.npz"
    line = cli_error("infer", tiny_files["package"].path, "--input", tmp_path / "in.npz", "--output", out)
    assert message in line
    assert not out.exists()


def test_cli_infer_accepts_fortran_ordered_arrays(tiny_files, tmp_path):
    x = conv_chain_data(3, seed=12)
    np.save(tmp_path / "c.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    outs = []
    for name in ("c", "f"):
        result = runner.invoke(app, ["infer", str(tiny_files["package"].path), "--input", str(tmp_path / f"{name}.npy"),
                                     "--output", str(tmp_path / f"{name}.npz"), "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / f"{name}.npz") as z:
            outs.append(z["logits"])
    assert np.array_equal(outs[0], outs[1])


def test_standalone_bodies_give_what_the_package_dispatch_gives(tiny_files):
    """``compile_model`` also compiles the bodies policies run as models of their own (no dispatch If:
    each If a body sits below copies its inputs on every pass). One request switching between every
    policy gives the same outputs and routes as through the package's dispatch, and runs each level
    policy on its standalone body (no ``apsq/level`` state there)."""
    from apsq_ov.bodies import standalone_bodies

    pkg = tiny_files["package"]
    alone = apsq_ov.compile_model(pkg.path, standalone="all")
    dispatch = apsq_ov.compile_model(pkg.path, standalone="none")
    m = alone.manifest
    bodies = set(range(len(m.levels))) | ({m.cascade_level} if m.cascade_level is not None else set())
    assert set(alone.standalone) == bodies and dispatch.standalone == {}
    assert set(apsq_ov.compile_model(pkg.path).standalone) == {alone.plan().level}  # default: the default body
    for body in standalone_bodies(pkg.read_model(), m).values():  # only routed ops' and the cascade's Ifs
        assert all("apsq" in n.get_friendly_name() for n in body.get_ordered_ops() if n.get_type_name() == "If")
    # Levels without per-input routed ops are compiled without the (constant) route output; the runtime hands
    # their route out (compared with the dispatch's below). The cascade's route is computed: it keeps it.
    no_route = {k for k, c in alone.standalone.items() if all(ROUTE_OUTPUT not in o.get_names() for o in c.outputs)}
    assert no_route == set(alone.standalone_routes) == {k for k, lv in enumerate(m.levels) if not lv.routed}
    assert no_route and m.cascade_level not in no_route
    pool = _pool()
    a, d = alone.create_infer_request(), dispatch.create_infer_request()
    rng = np.random.default_rng(3)
    ran_alone = set()
    for _ in range(300):
        i, k = int(rng.integers(len(pool))), int(rng.integers(len(POLICIES)))
        got, want = a.infer(pool[i : i + 1], **POLICIES[k]), d.infer(pool[i : i + 1], **POLICIES[k])
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-6, err_msg=str(POLICIES[k]))
        assert np.array_equal(got.route, want.route) and got.escalated == want.escalated, POLICIES[k]
        states = {s.name for s in a.request.query_state()}
        standalone = alone.plan(**POLICIES[k]).level in alone.standalone
        assert ("apsq/level" not in states) == standalone, POLICIES[k]
        ran_alone.add(standalone)
    assert ran_alone == {True, False}  # both kinds of policy ran, on the same request
    with pytest.raises(apsq_ov.ConfigError, match="standalone='some'"):
        apsq_ov.compile_model(pkg.path, standalone="some")


def test_a_request_creates_only_the_graphs_its_policies_run(tiny_files):
    """A new ``AdaptiveInferRequest`` creates no OpenVINO request until a policy runs, then only the requests
    of the graphs its policies run on (no package-IR request for policies served by standalone bodies);
    with no policy set it runs the default one."""
    pkg = tiny_files["package"]
    alone = apsq_ov.compile_model(pkg.path, standalone="all")
    m = alone.manifest
    levels = [lv.max_drop for lv in m.levels]
    req = alone.create_infer_request()
    assert req._bound == {}
    for d in levels:
        req.set_policy(max_drop=d, policy="static")
    assert set(req._bound) == {alone.plan(max_drop=d, policy="static").level for d in levels}
    assert None not in req._bound  # no request of the package IR
    req.set_policy(precision="fp32")  # the fully routed body lives only in the package
    assert None in req._bound
    assert req.request.get_compiled_model() is not None
    fresh = alone.create_infer_request()
    x = _pool()[:1]
    got = fresh.infer(x)  # no policy given: the package's default
    default = alone.plan()
    assert set(fresh._bound) == {default.level} and got.route.shape == (len(m.ops),)
    want = alone.create_infer_request().infer(x, max_drop=m.default_max_drop)
    np.testing.assert_array_equal(got["logits"], want["logits"])
    bare = alone.create_infer_request()
    assert bare.request is bare._bound[default.level].request  # reading .request binds the default policy
