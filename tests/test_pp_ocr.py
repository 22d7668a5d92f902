"""A real pretrained model from DATA.md: PP-OCRv4 text-line recognizer (rapidocr-onnxruntime 1.4.4
wheel, installed --no-deps by the README's test command) on rendered real English text lines."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

import apsq_ov
from apsq_ov.calibrate import CalibrationConfig, SensitivityMetric, calibrate, sample_order
from apsq_ov.datasets import cer, ctc_error_rate, ctc_greedy_decode, ctc_labels, render_text_lines
from apsq_ov.errors import DataError


def _rec_model() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        pytest.fail("rapidocr-onnxruntime==1.4.4 is not installed: run the README's test command")
    return Path(spec.origin).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"


def _charset(onnx: Path) -> list[str]:
    return ov.Core().read_model(onnx).get_rt_info(["framework", "character"]).astype(str).split("\n")


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    """PP-OCRv4 rec calibrated on 24 labelled lines with the task metric (CER against the labels); three
    levels and NNCF's min-max ranges keep it near 3 minutes on a 2-core AVX2 EPYC (Fashion-MNIST's tests cover
    ``auto`` ranges and the full dial)."""
    root = tmp_path_factory.mktemp("ocr")
    onnx = _rec_model()
    lines, texts = render_text_lines(24, seed=1)
    np.savez(root / "calib.npz", inputs=lines, labels=ctc_labels(texts, _charset(onnx)))
    pkg = calibrate(onnx, root / "calib.npz", root / "pkg",
                    CalibrationConfig(subset_size=16, sensitivity_samples=16, drop_samples=6, levels=(0.0, 0.02, 1.0),
                                      activation_ranges="minmax", sensitivity=SensitivityMetric.TASK))  # fmt: skip
    return {"onnx": onnx, "pkg": pkg, "lines": lines, "texts": texts}


def test_pp_ocrv4_rec_calibrates_and_forced_fp32_equals_plain_openvino(ocr):
    onnx, pkg = ocr["onnx"], ocr["pkg"]
    types = {op.type for op in pkg.manifest.ops}
    assert {"Convolution", "GroupConvolution", "MatMul"} <= types
    assert sum(apsq_ov.Precision.INT8 in op.variants for op in pkg.manifest.ops) > 30

    core = ov.Core()
    plain_model = core.read_model(onnx)
    charset = plain_model.get_rt_info(["framework", "character"]).astype(str).split("\n")
    plain_model.reshape([1, 3, 48, 320])
    plain = core.compile_model(plain_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    adaptive = apsq_ov.compile_model(pkg.path)
    request = adaptive.create_infer_request()
    test_lines, texts = render_text_lines(6, seed=2)
    exact = 0
    for i in range(len(test_lines)):
        ref = plain(test_lines[i : i + 1])[0]
        got = request.infer(test_lines[i : i + 1], precision="fp32")
        # Each routed op is compiled inside its own If body, so fusions across op boundaries (and the
        # float summation order) differ slightly from the plain graph: softmax outputs agree to 1e-4.
        assert np.abs(got[0] - ref).max() <= 1e-4
        assert (got[0].argmax(-1) == ref.argmax(-1)).all()
        exact += ctc_greedy_decode(got[0][0], charset) == texts[i]
        forced = request.infer(test_lines[i : i + 1], precision="int8")
        assert (forced.route == np.where([apsq_ov.Precision.INT8 in op.variants for op in pkg.manifest.ops],
                                         apsq_ov.Precision.INT8.code, 0)).all()  # fmt: skip
    assert exact >= 4  # the real model reads real text


def test_the_task_metric_scores_each_op_by_its_cer_increase_on_the_scoring_lines(ocr):
    """The ``task`` score of an op = the CER increase (greedy decode vs the text) when that op alone runs
    INT8 on the scoring split: re-measured here through ``precision_map`` and decoded as text."""
    pkg = ocr["pkg"]
    m = pkg.manifest
    assert m.sensitivity["metric"] == "task" and "CER" in m.sensitivity["formula"]
    cal = m.calibration
    scoring = sample_order(len(ocr["lines"]), cal["seed"])[: cal["sensitivity_samples"]]
    charset = _charset(ocr["onnx"])
    request = apsq_ov.compile_model(pkg.path).create_infer_request()

    def mean_cer(pin: dict[str, str] | None) -> float:
        return float(np.mean([cer(ctc_greedy_decode(request.infer(ocr["lines"][i : i + 1], precision="fp32",
                                                                  precision_map=pin)[0][0], charset), ocr["texts"][i])
                              for i in scoring]))  # fmt: skip

    base = mean_cer(None)
    int8_ops = [op for op in m.ops if apsq_ov.Precision.INT8 in op.variants]
    scores = [op.sensitivity["predicted"]["int8"] for op in int8_ops]
    assert len(set(scores)) > 1, "every op scored the same: the CER did not resolve any op"
    # the highest- and lowest-scored ops and two more, re-measured
    for k in sorted({int(np.argmax(scores)), int(np.argmin(scores)), 0, len(int8_ops) - 1}):
        op = int8_ops[k]
        assert mean_cer({op.name: "int8"}) - base == pytest.approx(op.sensitivity["predicted"]["int8"], abs=1e-9)
        assert op.sensitivity["components"]["task_int8"] == op.sensitivity["predicted"]["int8"]


def test_ctc_labels_round_trip_and_error_rate():
    charset = ["a", "b", "c"]
    labels = ctc_labels(["ab c", "ca"], charset)
    assert labels.tolist() == [[1, 2, 4, 3], [3, 1, -1, -1]]
    # greedy paths over 4 + 1 classes (blank 0): "aa_b c" reads "ab c"; "c_aa" reads "ca"; "cb" one substitution
    eye = np.eye(5, dtype=np.float32)
    path = [[1, 1, 0, 2, 4, 3], [3, 0, 1, 1, 0, 0], [3, 2, 0, 0, 0, 0]]
    outputs = [eye[p][None] for p in path]
    assert [ctc_greedy_decode(o[0], charset) for o in outputs] == ["ab c", "ca", "cb"]
    assert ctc_error_rate(outputs[:2], [labels[:1], labels[1:]]) == 0.0
    assert ctc_error_rate([outputs[2]], [labels[1:]]) == 0.5
    with pytest.raises(DataError, match="'d'"):
        ctc_labels(["bad"], charset)


def test_bench_reads_sequence_labels_as_one_minus_cer(ocr, tmp_path):
    """``apsq-ov bench`` with ``(N, L)`` CTC labels reports 1 − CER; the FP32 rows equal the CER of the
    plain model's greedy decode against the texts."""
    import json

    from rich.console import Console
    from typer.testing import CliRunner

    from apsq_ov.cli import app, print_bench

    lines, texts = render_text_lines(4, seed=3)
    charset = _charset(ocr["onnx"])
    np.savez(tmp_path / "test.npz", inputs=lines, labels=ctc_labels(texts, charset))
    result = CliRunner().invoke(app, ["bench", str(ocr["pkg"].path), "--data", str(tmp_path / "test.npz"),
                                      "--compiles", "1", "--throughput-seconds", "0", "--json",
                                      "--plot", str(tmp_path / "ocr.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["metric"] == "1 - CER"
    plain_model = ov.Core().read_model(ocr["onnx"])
    plain_model.reshape([1, 3, 48, 320])
    plain = ov.Core().compile_model(plain_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expect = 1.0 - np.mean([cer(ctc_greedy_decode(plain(lines[i : i + 1])[0][0], charset), texts[i]) for i in range(4)])
    rows = {r["name"]: r for r in doc["shifts"]["clean"]["rows"]}
    assert rows["apsq forced fp32 (every op behind an If)"]["task"] == pytest.approx(expect, abs=1e-9)
    bound = doc["shifts"]["clean"]["perfect_router"]
    # The bound escalates the lines whose decoded text differs from the precise (FP32) level's: each of its
    # rows then reads that level's text on every line, so its 1 − CER.
    assert bound["differs"] == "decoded text"
    assert all(r["task"] == pytest.approx(rows[bound["precise"]]["task"], abs=1e-12) for r in bound["rows"])
    # The table (as bench prints it, from the same result) and the plot read the same field (a 1 − CER row
    # has no "1 - CER" key); the bound says what it escalates on.
    assert Path(doc["shifts"]["clean"]["plot"]).is_file()
    console = Console(file=io.StringIO(), width=300)
    print_bench(doc, ocr["pkg"].path, console)
    shown = console.file.getvalue()
    assert "perfect-router bound" in shown and "decoded text differs from" in shown and "1 - CER" in shown


def test_ctc_labels_make_every_drop_count_the_decoded_text(ocr):
    """Calibrated with CTC label rows, the package judges its output as text: the decision reads
    ``ctc``, and a mix's drop (:func:`joint_losses`, what the levels and the refinement fit) is each
    line's CER of the greedy decode against FP32's decode — re-measured here through the runtime's
    ``precision_map`` and decoded with the model's charset. Most moved time steps change no text."""
    from apsq_ov.calibrate.drops import CTC_DROP_METRIC, joint_losses
    from apsq_ov.package import OpChoice

    m = ocr["pkg"].manifest
    assert m.decision.sequence == "ctc" and m.calibration["drop_metric"] == CTC_DROP_METRIC
    assert all(op.drops[p] == op.quality[p]["text"] for op in m.ops for p in op.drops)
    model = apsq_ov.compile_model(ocr["pkg"].path)
    lines = ocr["lines"][:8]
    int8 = [op.name for op in m.ops if apsq_ov.Precision.INT8 in op.variants]
    mix = {n: OpChoice(apsq_ov.Precision.INT8, apsq_ov.Precision.INT8) for n in int8}
    got = joint_losses(model, [[lines[i : i + 1]] for i in range(len(lines))])(mix)
    charset = _charset(ocr["onnx"])
    request = model.create_infer_request()

    def read(i: int, pin: dict[str, str] | None) -> np.ndarray:
        return request.infer(lines[i : i + 1], precision="fp32", precision_map=pin)[0][0]

    pin = dict.fromkeys(int8, "int8")
    ref, low = [read(i, None) for i in range(len(lines))], [read(i, pin) for i in range(len(lines))]
    want = [cer(ctc_greedy_decode(lo, charset), ctc_greedy_decode(r, charset)) for lo, r in zip(low, ref, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    moved = [float(np.mean(lo.argmax(-1) != r.argmax(-1))) for lo, r in zip(low, ref, strict=True)]
    assert sum(moved) > sum(want)  # time steps moved that left the text as it was
