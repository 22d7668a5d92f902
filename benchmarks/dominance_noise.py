"""Which of the Pareto bench's dominance verdicts are more than noise (all three models)?

``benchmarks/pareto.py`` calls an adaptive point dominated (or dominating) on any quality difference,
however small: on Fashion-MNIST many are 1–30 images of 10,000. This script re-runs, on the same shifted
inputs the bench used (``apsq_ov.shifts.apply``, seed 1), each pair of methods in a dominance
relation of ``results/pareto.json`` (adaptive point vs NNCF accuracy control or a static mix), and
tests the quality difference per input: an exact McNemar test on the inputs only one of the two gets
right (Fashion-MNIST: the label; EfficientNet-Lite0: FP32's top-1, the bench's agreement), a Wilcoxon
signed-rank test on the per-line CER differences for PP-OCRv4 (1 − CER against the rendered text).
The latency side is the medians' difference the bench measured (a few µs are within this machine's
noise; the cascade's fixed cost, ~12 µs here, is not). Quality is deterministic per graph, so the
per-input results reproduce the bench's figures (``reproduced`` in the JSON: ours, the bench's).

Writes ``results/dominance_noise.{json,md}``. Usage: ``python benchmarks/dominance_noise.py
[--models fmnist,effnet,ocr]`` (after ``python benchmarks/pareto.py`` for those models).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from rich.console import Console
from scipy.stats import binomtest, wilcoxon

import apsq_ov
from apsq_ov.bench import row_key
from apsq_ov.datasets import cer, ctc_greedy_decode, load_fashion_mnist, render_text_lines
from apsq_ov.runtime import compile_model
from apsq_ov.shifts import apply as apply_shift

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pareto import package_settings  # noqa: E402

RESULTS = HERE / "results"
CACHE = RESULTS / ".cache" / "pareto"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
console = Console()


def _outputs(source: str, xs: np.ndarray, package: Any, statics: dict[str, ov.CompiledModel]) -> list[np.ndarray]:
    """The first output for every input on the method the bench row ``source`` measured: a static mix row is
    that level's body compiled on its own (as the bench runs it), a cascade row the package at that budget's τ."""
    budget = float(source.rsplit(" ", 1)[1]) if source.startswith("apsq ") else None
    if source.startswith("apsq static mix "):
        k = next(i for i, lv in enumerate(package.manifest.levels) if abs(lv.max_drop - budget) < 1e-9)
        graph = package.standalone[k]
    else:
        graph = statics.get(source)
    if graph is not None:
        return [graph(xs[i : i + 1])[0] for i in range(len(xs))]
    req = package.create_infer_request()
    return [req.infer(xs[i : i + 1], max_drop=budget, policy="cascade")[0] for i in range(len(xs))]


Judge = Callable[[np.ndarray], Callable[[list[np.ndarray]], np.ndarray]]


def _data(key: str, entry: dict[str, Any]) -> tuple[np.ndarray, Judge, list[int]]:
    """The bench's evaluation inputs, the judge (shifted inputs → outputs → each input's quality: 1/0 right
    for a classifier, 1 − CER for a text line) and the input shape the NNCF baselines are compiled at."""
    samples = entry["samples"]
    if key == "fmnist":
        x, y = load_fashion_mnist("test")
        x, y = x[:samples], y[:samples]
        return x, lambda xs: lambda outs: np.array([o.argmax() for o in outs]) == y, [1, 1, 28, 28]
    if key == "effnet":
        from real_models import efficientnet_lite0_ir, photo_crops

        fp32 = ov.Core().compile_model(efficientnet_lite0_ir(RESULTS / ".cache"), "CPU", F32)

        def judge_crops(xs: np.ndarray) -> Callable[[list[np.ndarray]], np.ndarray]:  # against FP32's top-1
            y = np.array([fp32(xs[i : i + 1])[0].argmax() for i in range(len(xs))])
            return lambda outs: np.array([o.argmax() for o in outs]) == y

        return photo_crops(samples, seed=1), judge_crops, [1, 3, 224, 224]
    from real_models import pp_ocr_rec

    charset = pp_ocr_rec()[1]
    x, texts = render_text_lines(samples, seed=1)

    def judge_lines(xs: np.ndarray) -> Callable[[list[np.ndarray]], np.ndarray]:
        return lambda outs: np.array(
            [1.0 - cer(ctc_greedy_decode(o[0], charset), t) for o, t in zip(outs, texts, strict=True)]
        )

    return x, judge_lines, [1, 3, 48, 320]


def _paired_p(a: np.ndarray, b: np.ndarray, binary: bool) -> float:
    """Two-sided p of the per-input quality difference: exact McNemar (a sign test on the inputs only one of
    the two gets right) for right/wrong, Wilcoxon signed-rank on the per-line differences for 1 − CER."""
    d = a.astype(float) - b.astype(float)
    if not np.any(d):
        return 1.0
    if binary:
        return float(binomtest(int(np.sum(d < 0)), int(np.sum(d != 0)), 0.5).pvalue)
    return float(wilcoxon(d[d != 0]).pvalue)


def run_model(key: str) -> dict[str, Any]:
    """Every dominance relation of model ``key``'s Pareto run, re-run per input and tested."""
    entry = json.loads((RESULTS / "pareto.json").read_text())["models"][key]
    x, judge, shape = _data(key, entry)
    lo, hi = entry["value_range"]
    pkg = apsq_ov.Package.load(entry["package"])  # the package that run measured (e.g. effnet1000.apsq)
    tag, suffix = Path(entry["package"]).stem, package_settings(pkg)[1]  # the baselines' cache names
    package = compile_model(pkg, "CPU", F32, standalone="all")
    core = ov.Core()
    statics = {}
    for name in ("NNCF accuracy control 0.005", "NNCF accuracy control 0.01", "NNCF accuracy control 0.02"):
        m = core.read_model(CACHE / "nncf" / f"{tag}_ac_{name.rsplit(' ', 1)[1]}{suffix}.xml")
        if m.is_dynamic():
            m.reshape(shape)
        statics[name] = core.compile_model(m, "CPU", F32)
    binary = row_key(entry["metric"]) != "task"  # right/wrong per input; a task metric (1 − CER) is graded
    test = "exact McNemar" if binary else "Wilcoxon signed-rank"
    out: dict[str, Any] = {"model": entry["model"], "metric": entry["metric"], "run_of": entry.get("date"),
                           "test": test, "shifts": {}}  # fmt: skip
    for shift, result in entry["shifts"].items():
        rows = {r["name"]: r for r in result["rows"]}
        dom = result["dominance"]
        pairs = [("dominated by", a, b) for a, b in dom["adaptive_dominated_by"]]
        pairs += [("dominates", a, b) for a, b in dom["adaptive_dominates"]]
        xs = apply_shift(x, shift, lo, hi, seed=1)
        score = judge(xs)
        quality: dict[str, np.ndarray] = {}  # source row → each input's quality
        tests, seen = [], set()
        with console.status(f"{key} · {shift}: {len(pairs)} relations"):
            for relation, a, b in pairs:
                pair = (relation, rows[a].get("runs", a), rows[b].get("runs", b))  # an `auto` row runs another
                if pair in seen:  # several `auto` budgets run the same cascade point
                    continue
                seen.add(pair)
                for source in pair[1:]:
                    if source not in quality:
                        quality[source] = score(_outputs(source, xs, package, statics))
                qa, qb = quality[pair[1]], quality[pair[2]]
                gap_us = 1e3 * (rows[a]["median_ms"] - rows[b]["median_ms"])
                tests.append({"relation": relation, "adaptive": a, "rival": b, "runs": pair[1],
                              "only_adaptive_right": int(np.sum(qa > qb)), "only_rival_right": int(np.sum(qb > qa)),
                              "p": _paired_p(qa, qb, binary), "median_us_adaptive_minus_rival": gap_us})  # fmt: skip
        reproduced = {src: [float(np.mean(q)), rows[src][row_key(entry["metric"])]] for src, q in quality.items()}
        out["shifts"][shift] = {"holds": dom["holds"], "tests": tests, "reproduced": reproduced}
        console.print(f"{key} · {shift}: {len(tests)} relations tested")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fmnist,effnet,ocr", help="comma list of fmnist, effnet, ocr")
    args = ap.parse_args()
    path = RESULTS / "dominance_noise.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    if "shifts" in done:  # the earlier Fashion-MNIST-only layout
        done = {"fmnist": done}
    for key in args.models.split(","):
        done[key] = run_model(key.strip())
    path.write_text(json.dumps(done, indent=1))
    text = markdown(done)
    (RESULTS / "dominance_noise.md").write_text(text)
    console.print(text)


def markdown(done: dict[str, Any]) -> str:
    lines = [
        "# Which dominance verdicts are more than noise",
        "",
        "`python benchmarks/dominance_noise.py`: every relation the Pareto bench counted (adaptive point vs NNCF "
        "accuracy control or a static mix; one line per distinct pair of graphs), the inputs only one of the two "
        "gets right (Fashion-MNIST: the label; EfficientNet-Lite0: FP32's top-1) and the exact McNemar p of that "
        "difference; for PP-OCRv4 the lines on which each reads the lower CER against the rendered text and the "
        "Wilcoxon signed-rank p of the per-line CER differences; and the bench's median latency difference.",
        "",
    ]
    for out in done.values():
        lines += [f"## {out.get('model', 'Fashion-MNIST ResNet')} (Pareto run of {out['run_of']})", "",
                  "Per shift: relations where an adaptive point dominates a rival, and how many of those rest on a "
                  f"significant quality gain ({out.get('test', 'exact McNemar')} p < 0.05, the adaptive point better); "
                  "relations where one is dominated, and how many on a significant loss.", "",
                  "| shift | holds | dominates | of which significant | dominated by | of which significant |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for shift, s in out["shifts"].items():
            wins = [t for t in s["tests"] if t["relation"] == "dominates"]
            losses = [t for t in s["tests"] if t["relation"] == "dominated by"]
            real_wins = [t for t in wins if t["p"] < 0.05 and t["only_adaptive_right"] > t["only_rival_right"]]
            real_losses = [t for t in losses if t["p"] < 0.05]
            lines.append(f"| {shift} | {'yes' if s['holds'] else 'no'} | {len(wins)} | {len(real_wins)} | "
                         f"{len(losses)} | {len(real_losses)} |")  # fmt: skip
        better = "right" if out.get("test", "exact McNemar") == "exact McNemar" else "better"
        lines += ["", f"| shift | holds | relation | adaptive (runs) | rival | only adaptive {better} "
                  f"| only rival {better} | p | Δ median µs |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for shift, s in out["shifts"].items():
            for t in s["tests"]:
                lines.append(f"| {shift} | {'yes' if s['holds'] else 'no'} | {t['relation']} | {t['adaptive']} "
                             f"({t['runs']}) | {t['rival']} | {t['only_adaptive_right']} | {t['only_rival_right']} "
                             f"| {t['p']:.3f} | {t['median_us_adaptive_minus_rival']:+.1f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
