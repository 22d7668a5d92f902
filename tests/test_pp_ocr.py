"""A real pretrained model from DATA.md: PP-OCRv4 text-line recognizer (rapidocr-onnxruntime 1.4.4
wheel, installed --no-deps by the README's test command) on rendered real English text lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

import apsq_ov
from apsq_ov.calibrate import CalibrationConfig, calibrate
from apsq_ov.datasets import ctc_greedy_decode, render_text_lines


def _rec_model() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        pytest.fail("rapidocr-onnxruntime==1.4.4 is not installed: run the README's test command")
    return Path(spec.origin).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"


def test_pp_ocrv4_rec_calibrates_and_forced_fp32_equals_plain_openvino(tmp_path):
    onnx = _rec_model()
    lines, _ = render_text_lines(16, seed=1)
    np.savez(tmp_path / "calib.npz", inputs=lines)
    pkg = calibrate(onnx, tmp_path / "calib.npz", tmp_path / "pkg",
                    CalibrationConfig(subset_size=16, sensitivity_samples=6, drop_samples=6))  # fmt: skip
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
