"""How the judged output reads as decisions (``apsq_ov.decisions``): which output, classes on another axis,
one-class maps."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops

import apsq_ov
from apsq_ov.calibrate import CalibrationConfig, calibrate
from apsq_ov.decisions import Decision, decide
from apsq_ov.errors import ConfigError
from tests.models import conv_chain_data, conv_map, save, two_heads


@pytest.mark.parametrize(("decision", "shape"), [
    (Decision(1), [2, 5, 3, 4]), (Decision(1, "probability"), [2, 1, 3, 4]), (Decision(-1, "logit"), [2, 3, 6, 1]),
    (Decision(2), [2, 3, 5, 4]),
])  # fmt: skip
def test_graph_scores_are_the_numpy_scores(decision, shape):
    """The router's in-graph margin reads the output as calibration's numpy code does (same class order)."""
    rng = np.random.default_rng(0)
    y = rng.uniform(0.0, 1.0, shape).astype(np.float32) if decision.binary == "probability" else \
        rng.standard_normal(shape).astype(np.float32)  # fmt: skip
    p = ops.parameter(shape, np.float32)
    model = ov.Model([ops.result(decision.graph_scores(p.output(0)))], [p])
    got = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(y)[0]
    want = decision.scores(y)
    assert got.shape == want.shape and want.shape[-1] == (2 if decision.binary else shape[decision.class_axis])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if decision.binary:  # class 1 exactly where the decision is positive
        positive = y > (0.5 if decision.binary == "probability" else 0.0)
        assert np.array_equal(want.argmax(-1), np.moveaxis(positive, decision.class_axis, -1)[..., 0])


def test_decide_reads_the_axis_and_the_kind_of_binary_output():
    maps = [np.random.default_rng(k).uniform(0, 1, (1, 1, 8, 8)) for k in range(3)]
    assert decide(maps, 1) == Decision(1, "probability")
    assert decide([m * 6 - 3 for m in maps], 1) == Decision(1, "logit")  # values outside [0, 1]: logits
    assert decide(maps, None) == Decision(-1)  # the last axis (8 classes) unless told
    assert decide(maps, 3) == Decision(-1)
    assert decide([np.zeros((1, 10))], None) == Decision() and Decision().identity
    assert decide([np.zeros(10)], None) == Decision() and decide([np.zeros(())], None) == Decision()  # no batch axis
    for bad in (0, 4, -5):
        with pytest.raises(ConfigError, match=rf"--class-axis {bad}: output 0 has shape \(1, 1, 8, 8\)"):
            decide(maps, bad)


def test_a_single_logit_output_is_judged_as_a_binary_decision(tmp_path):
    """A binary classifier's ``(N, 1)`` logit: its top-1 over one class never differs, so every drop read 0
    and the dial put every op in INT8 at every budget. Read as the decision logit > 0, INT8 flips some."""
    model = save(conv_map(logit=True), tmp_path / "logit.xml")
    np.savez(tmp_path / "calib.npz", x=conv_chain_data(128))
    config = CalibrationConfig(subset_size=32, drop_samples=64, sensitivity_samples=8, levels=(0.0, 1.0))
    pkg = calibrate(model, tmp_path / "calib.npz", tmp_path / "pkg", config)
    m = pkg.manifest
    assert m.decision == Decision(-1, "logit")
    assert apsq_ov.Package.load(pkg.path).manifest.decision == m.decision  # written and read back
    # INT8 flips some decisions: an op's isolated drop (timing-free; the fastest level may get an op back at
    # FP32 from the fast-route refinement, as fast as INT8 on this tiny graph)
    assert any(op.drops[apsq_ov.Precision.INT8] > 0 for op in m.ops), [op.drops for op in m.ops]
    assert m.levels[-1].measured_drop is not None
    # `infer` scores a one-logit classifier by its decision: labels = FP32's decisions, the FP32 level reads 100%
    import json

    from typer.testing import CliRunner

    from apsq_ov.cli import app

    x = conv_chain_data(40, seed=9)
    fp32 = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.savez(tmp_path / "test.npz", x=x, labels=(fp32(x)[0][:, 0] > 0).astype(np.int64))
    result = CliRunner().invoke(app, ["infer", str(pkg.path), "--input", str(tmp_path / "test.npz"), "--max-drop", "0",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == 1.0


def test_a_probability_map_with_classes_on_axis_1(tmp_path):
    """An ``(N, 1, H, W)`` sigmoid map with ``class_axis=1``: each pixel a binary decision; the drops count
    flipped pixels, and the package (router included, where calibration fits one) serves the map."""
    model = save(conv_map(), tmp_path / "map.xml")
    x = conv_chain_data(64)
    np.savez(tmp_path / "calib.npz", x=x)
    pkg = calibrate(model, tmp_path / "calib.npz", tmp_path / "pkg",
                    CalibrationConfig(subset_size=32, drop_samples=32, sensitivity_samples=8, levels=(0.0, 1.0),
                                      class_axis=1))  # fmt: skip
    m = pkg.manifest
    assert m.decision == Decision(1, "probability")
    # Each op's isolated INT8 drop is a fraction of the held-out pixels' decisions (16 x 16 per sample), not
    # of the samples: k / (samples x 256) with k not a multiple of 256. (The fastest level's joint drop is
    # not asserted > 0: on this 2-conv graph FP32 times as fast as INT8, so the fast-route refinement may
    # put an op back at FP32 on a noisy machine — measured here under load: 2 of 4 runs.)
    pixels = m.calibration["drop_samples"] * 16 * 16
    counts = [op.drops[apsq_ov.Precision.INT8] * pixels for op in m.ops]
    assert all(0 < k < 0.5 * pixels and abs(k - round(k)) < 1e-6 for k in counts), counts
    assert any(round(k) % 256 for k in counts), counts
    joint = m.levels[-1].measured_drop * pixels
    assert 0 <= joint < 0.5 * pixels and abs(joint - round(joint)) < 1e-6, joint
    compiled = apsq_ov.compile_model(pkg.path)
    ref = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    policies = [{"max_drop": 0.0}, {"max_drop": 1.0}] + ([{"max_drop": 1.0, "policy": "cascade"}] if m.router else [])
    for policy in policies:
        got = compiled(x[:1], **policy)["prob"]
        assert got.shape == (1, 1, 16, 16)
        if policy == {"max_drop": 0.0}:
            np.testing.assert_allclose(got, ref(x[:1])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="--class-axis 0"):
        calibrate(model, tmp_path / "calib.npz", tmp_path / "bad", CalibrationConfig(class_axis=0))


def test_calibrate_cli_takes_the_class_axis_and_says_what_a_drop_counts(tmp_path):
    from typer.testing import CliRunner

    from apsq_ov.cli import app
    from tests.test_cli import one_line_error

    model = save(conv_map(), tmp_path / "map.xml")
    np.savez(tmp_path / "calib.npz", x=conv_chain_data(64))
    args = ["calibrate", model, "--data", str(tmp_path / "calib.npz"), "--subset-size", "32", "--drop-samples", "32",
            "--sensitivity-samples", "8", "--levels", "0,1", "--no-router"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a"), "--class-axis", "1"])
    assert result.exit_code == 0, result.output
    assert "drops compare the binary decision prob > 0.5 (axis 1 holds one class)" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "drops compare the top-1 over the last axis of prob" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "c"), "--class-axis", "7"])
    assert "--class-axis 7: output prob has shape (1, 1, 16, 16)" in one_line_error(result)  # exit 1, one line
    assert not (tmp_path / "c").exists()


def test_the_judged_output_of_a_two_headed_model(tmp_path):
    """A detector-like model whose first output is a box regression (its argmax never moves) and whose
    second holds the class scores. Judged on the first (the default), every drop reads 0 and the dial
    lowers everything for free; told ``judged_output="scores"`` the drops, the router's margin, the
    package and ``infer``'s accuracy all read the class scores."""
    import json

    from typer.testing import CliRunner

    from apsq_ov.cli import app
    from tests.test_cli import one_line_error

    model = save(two_heads(), tmp_path / "heads.xml")
    np.savez(tmp_path / "calib.npz", x=conv_chain_data(128))
    config = dict(subset_size=32, drop_samples=64, sensitivity_samples=8, levels=(0.0, 1.0))
    first = calibrate(model, tmp_path / "calib.npz", tmp_path / "first", CalibrationConfig(**config)).manifest
    assert first.decision == Decision() and first.levels[-1].measured_drop == 0.0  # box argmax: never flips
    pkg = calibrate(model, tmp_path / "calib.npz", tmp_path / "pkg",
                    CalibrationConfig(**config, judged_output="scores"))  # fmt: skip
    m = pkg.manifest
    assert m.decision == Decision(output=1) and m.outputs == ["boxes", "scores"]
    assert apsq_ov.Package.load(pkg.path).manifest.decision == m.decision  # written and read back
    assert any(op.drops[apsq_ov.Precision.INT8] > 0 for op in m.ops), [op.drops for op in m.ops]  # box head: 0
    assert m.router is not None  # its margin is the class scores' top-1 - top-2 (a box margin is ~100)
    # the scores too: the box head cannot move the class scores (RDFD gradient 0), it can move the boxes
    gradient = {name: {op.name: op.sensitivity["components"]["gradient"] for op in mm.ops} for name, mm in
                (("first", first), ("scores", m))}  # fmt: skip
    assert gradient["scores"]["box_head"] == 0.0 < gradient["first"]["box_head"]
    assert gradient["scores"]["class_head"] > 0.0 == gradient["first"]["class_head"]
    compiled = apsq_ov.compile_model(pkg.path)
    ref = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = conv_chain_data(40, seed=9)
    for policy in ({"max_drop": 0.0}, {"max_drop": 1.0}, {"max_drop": 1.0, "policy": "cascade"}):
        got = compiled(x[:1], **policy)
        assert got["boxes"].shape == (1, 4) and got["scores"].shape == (1, 5)
        if policy == {"max_drop": 0.0}:
            np.testing.assert_allclose(got["scores"], ref(x[:1])[1], rtol=1e-5, atol=1e-6)
    # `infer` scores the judged output: labels = FP32's class decisions, the FP32 level reads 100%
    labels = ref(x)[1].argmax(axis=1)
    assert np.mean(labels == 0) < 0.9  # judging the boxes (argmax 0) would not read 100%
    np.savez(tmp_path / "test.npz", x=x, labels=labels)
    result = CliRunner().invoke(app, ["infer", str(pkg.path), "--input", str(tmp_path / "test.npz"), "--max-drop", "0",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == 1.0
    # `bench` too: its accuracy and agreement are the class scores' (on the boxes the FP32 level would read
    # the share of label 0)
    result = CliRunner().invoke(app, ["bench", str(pkg.path), "--data", str(tmp_path / "test.npz"), "--json",
                                      "--throughput-seconds", "0.1", "--compiles", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["shifts"]["clean"]["rows"]}
    assert rows["apsq static mix 0"]["accuracy"] == 1.0 == rows["apsq forced fp32 (every op behind an If)"]["accuracy"]
    assert rows["apsq static mix 1"]["agreement"] == rows["apsq static mix 1"]["accuracy"]  # labels = FP32's
    # the CLI takes a name or an index, says what it judges, and names the outputs there are
    args = ["calibrate", model, "--data", str(tmp_path / "calib.npz"), "--subset-size", "32", "--drop-samples", "32",
            "--sensitivity-samples", "8", "--levels", "0,1", "--no-router"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a"), "--judged-output", "1"])
    assert result.exit_code == 0, result.output
    assert "drops compare the top-1 over the last axis of scores" in " ".join(result.output.split())
    assert apsq_ov.Package.load(tmp_path / "a").manifest.decision.output == 1
    result = CliRunner().invoke(app, ["report", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["decision"] == {"judged": "scores", "class_axis": -1, "binary": None, "output": 1}
    result = CliRunner().invoke(app, ["report", str(tmp_path / "a")])
    assert result.exit_code == 0 and "the top-1 over the last axis of scores" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b"), "--judged-output", "classes"])
    error = one_line_error(result)  # exit 1, one line
    assert "--judged-output classes: the model has no such output (outputs 0: boxes, 1: scores)" in error
    assert not (tmp_path / "b").exists()


def test_a_ctc_sequence_is_judged_by_the_text_it_decodes_to():
    """A CTC path's disagreement with FP32 is the character error rate of its greedy decode against FP32's:
    moved blanks and repeats that decode to the same text cost nothing; a changed character costs
    1 / FP32's text length; the batch is averaged. Classes keep the fraction of positions flipped."""
    ctc, classes = Decision(sequence="ctc"), Decision()
    ref = np.array([[1, 1, 0, 2, 0, 3]])  # reads 1 2 3
    same_text = np.array([[1, 0, 0, 2, 2, 3]])  # 2 of 6 positions moved, same text
    one_char = np.array([[1, 1, 0, 4, 0, 3]])  # reads 1 4 3
    assert ctc.disagreement(same_text, ref) == 0.0 and classes.disagreement(same_text, ref) == pytest.approx(2 / 6)
    assert ctc.disagreement(one_char, ref) == pytest.approx(1 / 3)
    both = ctc.disagreement(np.concatenate([same_text, one_char]), np.concatenate([ref, ref]))
    assert both == pytest.approx(1 / 6)
    assert ctc.disagreement(np.array([[0, 5, 0]]), np.array([[0, 0, 0]])) == 1.0  # against an empty text
    assert ctc.disagreement(np.array([[1, 0, 5, 6, 7]]), np.array([[1, 1, 0, 0, 0]])) == 1.0  # 3 edits of 1: at most 1
    assert Decision.from_json(ctc.to_json()) == ctc and "sequence" not in classes.to_json()
    assert ctc.drop_key == "text" and classes.drop_key == "top1"


def test_ctc_on_an_output_that_is_no_sequence_is_a_one_line_error(tmp_path):
    """``--ctc`` on a map output (rank 4) fails before NNCF runs, naming the flag and the rank; nothing is
    written."""
    model = save(conv_map(), tmp_path / "map.xml")
    np.savez(tmp_path / "calib.npz", x=conv_chain_data(16))
    with pytest.raises(ConfigError, match="--ctc: .*rank 4"):
        calibrate(model, tmp_path / "calib.npz", tmp_path / "pkg", CalibrationConfig(ctc=True, class_axis=1))
    assert not (tmp_path / "pkg").exists()
