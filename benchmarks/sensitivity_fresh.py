"""How good is the score once the ground truth is reliable? Each INT8 op's isolated loss on many fresh inputs.

Calibration's held-out splits (400 crops, 160 OCR lines, 20,000 Fashion-MNIST images in the first
``benchmarks/sensitivity.py``) gave per-op ground truths whose own split-half Spearman was low (0.42 /
0.17 / −0.07), which caps any score's ρ; ``benchmarks/sensitivity.py`` now takes its ground truth from
:func:`isolated_losses` here. This script takes a package (e.g. one ``benchmarks/pareto.py``
calibrated) and measures each INT8
op's isolated loss — that op alone at INT8, every other op FP32, through ``AdaptiveAsyncInferQueue``
and ``precision_map`` pins — on many inputs calibration never saw:

* ``effnet``: ``photo_crops(N, seed=123)``; task metric = top-1 disagreement with FP32 (no labels);
* ``fmnist``: the 10,000 test images plus every training image outside the package's 1,000 calibration
  images (69,000 in all); task metric = accuracy drop (labels), also top-1 disagreement with FP32 and
  the increase of the true class' negative log-likelihood;
* ``ocr``: ``render_text_lines(N, seed=123)``; task metric = CER increase, also the fraction of output
  positions whose top-1 flips.

For each metric: Spearman ρ of the package's INT8 score against the measured loss, and the split-half ρ
of the ground truth itself (even vs odd inputs), which bounds what any score can reach.
Merges its figures into ``benchmarks/results/sensitivity_fresh.json`` (one entry per model).

Run: ``python benchmarks/sensitivity_fresh.py benchmarks/results/.cache/pareto/effnet.apsq --model effnet``
(``--inputs N`` to change the count; fmnist takes every fresh image by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console
from rich.progress import Progress
from scipy.special import logsumexp
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apsq_ov  # noqa: E402
from apsq_ov.datasets import cer, ctc_decode_indices, load_fashion_mnist, render_text_lines  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()

# per-input loss of one run against the FP32 run, from what ``Fresh.keep`` kept of both runs' outputs
Loss = Callable[[np.ndarray, np.ndarray], np.ndarray]


def top1_index(y: np.ndarray) -> np.ndarray:
    """The last output axis' argmax: one per image, one per OCR position."""
    return y.argmax(-1)


class Fresh(NamedTuple):
    """Fresh inputs, the losses measured on them, and what of each output the losses need (``keep``)."""

    x: np.ndarray
    losses: dict[str, Loss]
    keep: Callable[[np.ndarray], np.ndarray] = top1_index


def effnet_data(n: int) -> Fresh:
    from real_models import photo_crops

    def top1(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return (out != ref).reshape(len(out)).astype(float)

    return Fresh(photo_crops(n, seed=123), {"top1 (task)": top1})


def fmnist_data(n: int, calibration: np.ndarray | None = None) -> Fresh:
    """:param calibration: the training images calibration saw (default: ``benchmarks/pareto.py``'s 1,000)."""
    x_train, y_train = load_fashion_mnist("train")
    if calibration is None:
        calibration = np.random.default_rng(0).permutation(len(x_train))[:1000]  # as benchmarks/pareto.py
    keep = np.setdiff1d(np.arange(len(x_train)), calibration)
    x_test, y_test = load_fashion_mnist("test")
    x = np.concatenate([x_test, x_train[keep]])[: n or None]
    y = np.concatenate([y_test, y_train[keep]])[: n or None]

    def accuracy(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return (ref.argmax(-1).ravel() == y).astype(float) - (out.argmax(-1).ravel() == y)

    def top1(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return (out.argmax(-1) != ref.argmax(-1)).ravel().astype(float)

    def nll(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Increase of the true class' negative log-likelihood: the labels' loss, continuous where
        accuracy moves by a handful of images."""

        def of(logits: np.ndarray) -> np.ndarray:
            z = logits.reshape(len(y), -1).astype(np.float64)
            return -(z[np.arange(len(y)), y] - logsumexp(z, axis=1))

        return of(out) - of(ref)

    return Fresh(x, {"accuracy (task)": accuracy, "top1": top1, "true-class NLL": nll}, keep=lambda o: o.reshape(-1))


def ocr_data(n: int) -> Fresh:
    from real_models import pp_ocr_rec

    charset = pp_ocr_rec()[1]
    x, texts = render_text_lines(n, seed=123)

    def cers(out: np.ndarray) -> np.ndarray:
        return np.array([cer(ctc_decode_indices(o.ravel(), charset), t) for o, t in zip(out, texts, strict=True)])

    def cer_increase(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return cers(out) - cers(ref)

    def positions(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return (out != ref).reshape(len(out), -1).mean(1)

    return Fresh(x, {"CER (task)": cer_increase, "positions flipped": positions})


DATA = {"effnet": effnet_data, "fmnist": fmnist_data, "ocr": ocr_data}


def isolated_losses(pkg: apsq_ov.Package, fresh: Fresh, label: str) -> dict:
    """Each INT8 op of ``pkg`` alone at INT8 (the rest FP32) on ``fresh.x``: per metric, ρ of the package's
    INT8 score against the mean loss, the ground truth's split-half ρ and range; per op, score and losses."""
    x, losses = fresh.x, fresh.losses
    compiled = apsq_ov.compile_model(pkg.path, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    ops = [op for op in pkg.manifest.ops if apsq_ov.Precision.INT8 in op.variants]

    def run(pin: dict[str, str] | None) -> np.ndarray:
        out: list[np.ndarray | None] = [None] * len(x)
        queue = apsq_ov.AdaptiveAsyncInferQueue(compiled, 0)
        queue.set_callback(lambda request, i: out.__setitem__(i, fresh.keep(request.get_result()[0])))
        for i in range(len(x)):
            queue.start_async(x[i : i + 1], i, precision="fp32", precision_map=pin)
        queue.wait_all()
        return np.stack(out)  # type: ignore[arg-type]

    t0 = time.perf_counter()
    with Progress(console=console) as progress:
        task = progress.add_task(f"{label}: FP32 + {len(ops)} INT8 pins on {len(x)} inputs", total=len(ops) + 1)
        ref = run(None)
        progress.advance(task)
        per_op: list[dict[str, np.ndarray]] = []
        for op in ops:
            out = run({op.name: "int8"})
            per_op.append({k: f(out, ref) for k, f in losses.items()})
            progress.advance(task)
    score = np.array([op.sensitivity["predicted"]["int8"] for op in ops])
    metrics = {}
    for k in losses:
        loss = np.array([p[k] for p in per_op])
        metrics[k] = {
            "rho_score_vs_loss": float(spearmanr(score, loss.mean(1)).statistic),
            "split_half_rho_of_ground_truth": float(spearmanr(loss[:, ::2].mean(1), loss[:, 1::2].mean(1)).statistic),
            "loss_range": [float(loss.mean(1).min()), float(loss.mean(1).max())],
        }
    table = {op.name: {"score": float(sc), **{k: float(p[k].mean()) for k in losses}}
             for op, sc, p in zip(ops, score, per_op, strict=True)}  # fmt: skip
    return {"metric": pkg.manifest.sensitivity["metric"], "inputs": len(x), "int8_ops": len(ops),
            "seconds": time.perf_counter() - t0, "metrics": metrics, "ops": table}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--model", choices=sorted(DATA), required=True)
    parser.add_argument("--inputs", type=int, default=0, help="fresh inputs (default: 2000; fmnist: all 69,000)")
    parser.add_argument("--name", help="key of this entry in the JSON (default: --model)")
    args = parser.parse_args()
    pkg = apsq_ov.Package.load(args.package)
    fresh = DATA[args.model](args.inputs or (0 if args.model == "fmnist" else 2000))
    entry = {"package": str(args.package), **isolated_losses(pkg, fresh, args.model)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "sensitivity_fresh.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if "package" in results:  # the earlier single-model layout
        results = {}
    results[args.name or args.model] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    (RESULTS / "sensitivity_fresh.md").write_text(markdown(results))
    console.print_json(json.dumps(entry))


def markdown(results: dict[str, dict]) -> str:
    """One row per model and metric: ρ of the INT8 score, and the ground truth's own split-half ρ."""
    lines = [
        "| model | score | fresh inputs | INT8 ops | measured loss | ρ score vs isolated loss | "
        "split-half ρ of the loss | loss range (mean per input) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, e in results.items():
        for k, m in e["metrics"].items():
            lo, hi = m["loss_range"]
            lines.append(f"| {model} | {e.get('metric', 'qdfd')} | {e['inputs']:,} | {e['int8_ops']} | {k} | "
                         f"{m['rho_score_vs_loss']:.3f} | {m['split_half_rho_of_ground_truth']:.3f} | "
                         f"{lo:.2e} … {hi:.2e} | {e['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
