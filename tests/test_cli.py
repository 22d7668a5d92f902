"""The CLI through typer's CliRunner: help, happy paths, usage errors (exit 2) and bad input (exit 1)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from apsq_ov.calibrate.quantize import NO_SATURATION
from apsq_ov.cli import app
from apsq_ov.profiler import host_int8_hardware
from tests.models import conv_chain_data

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["calibrate", "infer", "report", "profile", "demo"])
def test_help_teaches_each_command(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_calibrate_then_infer_json_and_output(tiny_files, tmp_path):
    pkg = tmp_path / "pkg"
    result = run("calibrate", tiny_files["model"], "--data", tiny_files["data"], "-o", pkg, "--subset-size", "16",
                 "--drop-samples", "8")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {p.name for p in pkg.iterdir()} == {"model.xml", "model.bin", "apsq.json"}
    cal = json.loads((pkg / "apsq.json").read_text())["calibration"]  # the default --activation-ranges auto
    nmse = cal["activation_ranges_nmse"]
    assert set(nmse) == {"minmax", "histogram"} and cal["activation_ranges"] == min(nmse, key=nmse.get)
    assert f"INT8 activation ranges: {cal['activation_ranges']}" in result.stdout
    assert f"{cal['activation_ranges']} activation ranges" in cal["quantizer"]
    assert cal["overflow_fix"] == ("none" if host_int8_hardware() in NO_SATURATION else "all")  # the default auto
    inp = tmp_path / "in.npy"
    np.save(inp, conv_chain_data(5, seed=11))
    out = tmp_path / "out.npz"
    result = run("infer", pkg, "--input", inp, "--output", out, "--json", "--max-drop", "0.5")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 5 and len(summary["route_ops"]) == 3
    with np.load(out) as z:
        assert z["logits"].shape == (5, 4)
        assert z["route"].shape == (5, 3) and z["route"].dtype == np.int8
        assert list(z["route_ops"]) == ["conv1", "conv2", "fc"]
        assert z["latency_ms"].shape == (5,)
        assert "3:int8" in list(z["precisions"])


def test_report_table_and_json(tiny_files):
    result = run("report", tiny_files["package"].path)
    assert result.exit_code == 0 and "conv2" in result.stdout
    data = json.loads(run("report", tiny_files["package"].path, "--json").stdout)
    assert [op["name"] for op in data["ops"]] == ["conv1", "conv2", "fc"]
    assert all(0.0 <= op["score"] <= 1.0 for op in data["ops"])


def test_profile_shows_shipped_profiles():
    result = run("profile", "--shipped", "--device", "CPU")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["device"]["plugin"] == "CPU"
    listed = run("profile", "--list")
    assert listed.exit_code == 0
    for name in ("CPU", "GPU.gen11", "GPU.gen12-iris-xe", "GPU.core-ultra-arc"):
        assert name in listed.stdout
    assert "device GPU is not available here" in one_line_error(run("profile", "--device", "GPU"))


def test_max_drop_out_of_range_is_a_usage_error(tiny_files, tmp_path):
    np.save(tmp_path / "in.npy", conv_chain_data(1))
    result = run("infer", tiny_files["package"].path, "--input", tmp_path / "in.npy", "--max-drop", "2")
    assert result.exit_code == 2


def test_max_drop_and_precision_together_is_a_usage_error(tiny_files, tmp_path):
    np.save(tmp_path / "in.npy", conv_chain_data(1))
    result = run("infer", tiny_files["package"].path, "--input", tmp_path / "in.npy", "--max-drop", "0.1",
                 "--precision", "int8")  # fmt: skip
    assert result.exit_code == 2


# --- bad input: exit 1, one line naming the culprit, nothing written --------------------------------


def _calibrate(tiny_files, tmp_path, data, *extra):
    out = tmp_path / "pkg"
    result = run("calibrate", tiny_files["model"], "--data", data, "-o", out, *extra)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg")]  # no half-written package
    return result


def test_missing_model_file(tiny_files, tmp_path):
    result = run("calibrate", tmp_path / "nope.xml", "--data", tiny_files["data"], "-o", tmp_path / "pkg")
    assert "nope.xml does not exist" in one_line_error(result)


def test_corrupt_model_file(tiny_files, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model at all")
    result = run("calibrate", bad, "--data", tiny_files["data"], "-o", tmp_path / "pkg")
    assert "bad.onnx: OpenVINO cannot read it" in one_line_error(result)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": conv_chain_data(4)}, "no array for model input 'x'"),
        ({"x": conv_chain_data(4)[:, :2]}, "does not fit model input x"),
        ({"x": conv_chain_data(4)[0]}, "has rank 3, model input x wants rank 4"),
        ({"x": (conv_chain_data(4) * 255).astype(np.uint8)}, "dtype uint8 but model input x is float32"),
        ({"x": np.zeros((0, 3, 16, 16), np.float32)}, "empty array (0, 3, 16, 16)"),
        (
            {"x": np.where(np.arange(4)[:, None, None, None] == 2, np.nan, conv_chain_data(4))},
            "sample 2 holds NaN or Inf",
        ),
        ({"x": conv_chain_data(4), "extra": np.zeros(4)}, "keys ['extra'] match no model input"),
    ],
    ids=["wrong-key", "wrong-shape", "wrong-rank", "wrong-dtype", "empty", "nan", "extra-key"],
)
def test_bad_calibration_data(tiny_files, tmp_path, arrays, message):
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    line = one_line_error(_calibrate(tiny_files, tmp_path, data))
    assert message in line and "bad.npz" in line


def test_unreadable_data_file(tiny_files, tmp_path):
    data = tmp_path / "bad.npz"
    data.write_bytes(b"garbage")
    assert "cannot read" in one_line_error(_calibrate(tiny_files, tmp_path, data))


def test_unknown_precision_in_calibrate(tiny_files, tmp_path):
    line = one_line_error(_calibrate(tiny_files, tmp_path, tiny_files["data"], "--precisions", "fp32,fp64"))
    assert "unknown precision 'fp64'" in line


def test_unknown_precision_in_infer(tiny_files, tmp_path):
    np.save(tmp_path / "in.npy", conv_chain_data(1))
    result = run("infer", tiny_files["package"].path, "--input", tmp_path / "in.npy", "--precision", "fp64")
    assert "unknown precision 'fp64'" in one_line_error(result)


def test_device_not_present(tiny_files, tmp_path):
    np.save(tmp_path / "in.npy", conv_chain_data(1))
    result = run("infer", tiny_files["package"].path, "--input", tmp_path / "in.npy", "--device", "GPU")
    assert "device GPU is not available here" in one_line_error(result)


@pytest.mark.parametrize("profile", [None, "GPU.gen11"])
def test_calibrate_for_a_gpu_this_machine_lacks(tiny_files, tmp_path, profile):
    """A package for an iGPU is built offline from a shipped profile (measurements on the CPU); FP16
    variants come from the GPU profile; Gen11 (no DP4A) gets no INT8; infer --device GPU fails cleanly."""
    extra = ["--profile", profile] if profile else []
    out = tmp_path / "gpu_pkg"
    result = run("calibrate", tiny_files["model"], "--data", tiny_files["data"], "-o", out, "--device", "GPU",
                 "--subset-size", "16", "--drop-samples", "8", "--sensitivity-samples", "8", *extra)  # fmt: skip
    assert result.exit_code == 0, result.output
    m = json.loads((out / "apsq.json").read_text())
    assert m["device"] == "GPU"
    assert "fp16" in m["precisions"] and "bf16" not in m["precisions"]
    assert ("int8" in m["precisions"]) is (profile is None)
    chosen = {c["fast"] for level in m["levels"] for c in level["ops"].values()}
    assert "bf16" not in chosen and (profile is None or "int8" not in chosen)
    np.save(tmp_path / "in.npy", conv_chain_data(1))
    result = run("infer", out, "--input", tmp_path / "in.npy", "--device", "GPU")
    assert "device GPU is not available here" in one_line_error(result)


def test_bad_inference_input(tiny_files, tmp_path):
    np.save(tmp_path / "in.npy", conv_chain_data(2, size=8))
    result = run("infer", tiny_files["package"].path, "--input", tmp_path / "in.npy", "--output", tmp_path / "o.npz")
    assert "in.npy[inputs]: shape (2, 3, 8, 8) does not fit model input x [1,3,16,16]" in one_line_error(result)
    assert not (tmp_path / "o.npz").exists()


def test_precision_map_naming_an_unknown_op(tiny_files, tmp_path):
    np.save(tmp_path / "in.npy", conv_chain_data(1))
    (tmp_path / "map.json").write_text(json.dumps({"conv9": "int8"}))
    result = run(
        "infer", tiny_files["package"].path, "--input", tmp_path / "in.npy", "--precision-map", tmp_path / "map.json"
    )
    assert "op 'conv9'" in one_line_error(result)


@pytest.fixture
def package_copy(tiny_files, tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_files["package"].path, dst)
    np.save(tmp_path / "in.npy", conv_chain_data(1))
    return dst


def test_package_missing_a_file(package_copy):
    (package_copy / "model.bin").unlink()
    result = run("infer", package_copy, "--input", package_copy.parent / "in.npy")
    assert "is missing model.bin" in one_line_error(result)


def test_package_of_another_schema_version(package_copy):
    manifest = json.loads((package_copy / "apsq.json").read_text())
    manifest["schema_version"] = 99
    (package_copy / "apsq.json").write_text(json.dumps(manifest))
    result = run("infer", package_copy, "--input", package_copy.parent / "in.npy")
    assert "schema_version 99" in one_line_error(result)


def test_package_with_a_truncated_weights_file(package_copy):
    blob = (package_copy / "model.bin").read_bytes()
    (package_copy / "model.bin").write_bytes(blob[: len(blob) // 2])
    result = run("report", package_copy)
    assert "model.bin: sha256 differs" in one_line_error(result)


def test_missing_package_directory(tmp_path):
    result = run("report", tmp_path / "nothing")
    assert "is not a directory" in one_line_error(result)


def test_policy_errors_are_one_line(tiny_files, tmp_path):
    inp = tmp_path / "in.npy"
    np.save(inp, conv_chain_data(2, seed=3))
    usage = run("infer", tiny_files["package"].path, "--input", inp, "--policy", "x")
    assert usage.exit_code == 2 and "use auto, static or cascade" in usage.output
    pkg = tmp_path / "norouter"
    result = run("calibrate", tiny_files["model"], "--data", tiny_files["data"], "-o", pkg, "--subset-size", "16",
                 "--drop-samples", "8", "--no-router")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "router: not built (--no-router)" in result.stdout
    msg = one_line_error(run("infer", pkg, "--input", inp, "--policy", "cascade"))
    assert "no router" in msg and "not built (--no-router)" in msg
    static = run("infer", pkg, "--input", inp, "--json")  # auto without a router = the static level
    assert static.exit_code == 0 and json.loads(static.stdout)["body"].startswith("level ")
    bad = one_line_error(run("calibrate", tiny_files["model"], "--data", tiny_files["data"], "-o", tmp_path / "b",
                             "--router-features", "margin,colour"))  # fmt: skip
    assert "--router-features" in bad and "std_over_step" in bad
    hold = one_line_error(run("calibrate", tiny_files["model"], "--data", tiny_files["data"], "-o", tmp_path / "h",
                              "--router-hold", "sometimes"))  # fmt: skip
    assert "router hold" in hold and "'shifts'" in hold and not (tmp_path / "h").exists()
    ranges = one_line_error(run("calibrate", tiny_files["model"], "--data", tiny_files["data"], "-o", tmp_path / "r",
                                "--activation-ranges", "percentile"))  # fmt: skip
    assert "activation ranges" in ranges and "'histogram'" in ranges and not (tmp_path / "r").exists()
    fix = one_line_error(run("calibrate", tiny_files["model"], "--data", tiny_files["data"], "-o", tmp_path / "f",
                             "--overflow-fix", "7bit"))  # fmt: skip
    assert "overflow fix" in fix and "'first-layer'" in fix and "'7bit'" in fix and not (tmp_path / "f").exists()


def test_unnamed_model_output_keeps_the_manifests_name(tmp_path):
    """A model whose output tensor has no name: the manifest calls it ``output0`` and so does ``infer``'s
    npz, though the package IR on disk may carry a generated tensor name for it."""
    from tests.models import conv_chain, save

    model = conv_chain()
    model.outputs[0].get_tensor().set_names(set())
    src = save(model, tmp_path / "m.xml")
    np.savez(tmp_path / "c.npz", x=conv_chain_data(16))
    pkg = tmp_path / "pkg"
    result = run("calibrate", src, "--data", tmp_path / "c.npz", "-o", pkg, "--subset-size", "16",
                 "--drop-samples", "8", "--no-router")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((pkg / "apsq.json").read_text())["outputs"] == ["output0"]
    inp, out = tmp_path / "in.npy", tmp_path / "out.npz"
    np.save(inp, conv_chain_data(3, seed=5))
    assert run("infer", pkg, "--input", inp, "--output", out).exit_code == 0
    with np.load(out) as z:
        assert z["output0"].shape == (3, 4)


def test_demo_runs_the_main_job_end_to_end(tmp_path):
    """``apsq-ov demo`` (the README's first command) on the bundled ResNet and 200 real Fashion-MNIST test
    images: every configuration runs and reads the route it took (a level without routed ops runs a body
    without the route output), the FP32 level reads OpenVINO FP32's accuracy, and the JSON matches the table."""
    result = run("demo", "-o", tmp_path / "demo", "--limit", "200")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert doc["samples"] == 200 and all(name[:40] in result.stdout for name in rows)
    assert all(0.85 < r["accuracy"] <= 1.0 and r["median_ms"] > 0 for r in rows.values())  # a trained model
    fp32 = rows["OpenVINO FP32 (static)"]
    levels = [r for n, r in rows.items() if n.startswith("apsq-ov static level")]
    cascades = [r for n, r in rows.items() if n.startswith("apsq-ov cascade")]
    assert levels and cascades and sum("(runs the default, max-drop 0.01)" in n for n in rows) == 1
    assert rows["apsq-ov static level, max-drop 0"]["accuracy"] == fp32["accuracy"]
    assert all(r["distinct_routes"] == 1 and r["top_route_share"] == 1.0 for r in levels)  # no routed ops
    for r in cascades:  # the fast route, or the fast route and the escalation
        assert r["distinct_routes"] in (1, 2) and 0.0 <= r["escalated"] < 0.5
        assert r["escalated"] == pytest.approx(1.0 - r["top_route_share"] if r["distinct_routes"] == 2 else 0.0)


def test_calibrate_warns_when_the_profile_is_another_cpus(tiny_files, tmp_path):
    data = json.loads(run("profile", "--shipped", "--device", "CPU").stdout)
    data["device"]["identity"]["cpu_model"] = "Other CPU 9000"
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps(data))
    result = run("calibrate", tiny_files["model"], "--data", tiny_files["data"], "-o", tmp_path / "pkg",
                 "--subset-size", "16", "--drop-samples", "8", "--profile", foreign, "--no-router")  # fmt: skip
    assert result.exit_code == 0, result.output
    warning = " ".join(result.stdout.split())  # rich wraps long lines
    assert f"profile {foreign} was measured on another CPU" in warning and "'Other CPU 9000'" in warning
    assert "apsq-ov profile -o FILE" in warning or "(shipped, measured on this CPU)" in warning
