"""Which of the Pareto bench's dominance verdicts are more than noise (Fashion-MNIST, EfficientNet-Lite0)?

``benchmarks/pareto.py`` calls an adaptive point dominated (or dominating) on any accuracy difference,
however small: on Fashion-MNIST many are 1–30 images of 10,000. This script re-runs, on the same shifted
inputs the bench used (``apsq_ov.shifts.apply``, seed 1), each pair of methods in a dominance
relation of ``results/pareto.json`` (adaptive point vs NNCF accuracy control or a static mix), and
tests the quality difference with an exact McNemar test on the inputs only one of the two gets right
(Fashion-MNIST: the label; EfficientNet-Lite0: FP32's top-1, the bench's agreement).
The latency side is the medians' difference the bench measured (a few µs are within this machine's
noise; the cascade's fixed cost, ~12 µs here, is not). Accuracy is deterministic per graph, so the
per-image results reproduce the bench's accuracies.

Writes ``results/dominance_noise.{json,md}``. Usage: ``python benchmarks/dominance_noise.py
[--models fmnist,effnet]`` (after ``python benchmarks/pareto.py`` for those models).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from rich.console import Console
from scipy.stats import binomtest

import apsq_ov
from apsq_ov.datasets import load_fashion_mnist
from apsq_ov.runtime import compile_model
from apsq_ov.shifts import apply as apply_shift

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pareto import package_settings  # noqa: E402

RESULTS = HERE / "results"
CACHE = RESULTS / ".cache" / "pareto"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
console = Console()


def _predict(source: str, xs: np.ndarray, package: Any, statics: dict[str, ov.CompiledModel]) -> np.ndarray:
    """Top-1 of every input on the method the bench row ``source`` measured: a static mix row is that level's
    body compiled on its own (as the bench runs it), a cascade row the package at that budget's τ."""
    budget = float(source.rsplit(" ", 1)[1]) if source.startswith("apsq ") else None
    if source.startswith("apsq static mix "):
        k = next(i for i, lv in enumerate(package.manifest.levels) if abs(lv.max_drop - budget) < 1e-9)
        graph = package.standalone[k]
    else:
        graph = statics.get(source)
    if graph is not None:
        return np.array([graph(xs[i : i + 1])[0].argmax() for i in range(len(xs))])
    req = package.create_infer_request()
    return np.array([req.infer(xs[i : i + 1], max_drop=budget, policy="cascade")[0].argmax() for i in range(len(xs))])


def _data(key: str, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, ov.CompiledModel | None]:
    """The bench's evaluation inputs, their labels (None: judged against FP32's top-1) and, then, FP32."""
    if key == "fmnist":
        x, y = load_fashion_mnist("test")
        return x[: entry["samples"]], y[: entry["samples"]], None
    from real_models import efficientnet_lite0_ir, photo_crops

    fp32 = ov.Core().compile_model(efficientnet_lite0_ir(RESULTS / ".cache"), "CPU", F32)
    return photo_crops(entry["samples"], seed=1), None, fp32


def run_model(key: str) -> dict[str, Any]:
    """Every dominance relation of model ``key``'s Pareto run, re-run per input and tested."""
    entry = json.loads((RESULTS / "pareto.json").read_text())["models"][key]
    x, labels, fp32 = _data(key, entry)
    lo, hi = entry["value_range"]
    pkg = apsq_ov.Package.load(entry["package"])  # the package that run measured (e.g. effnet1000.apsq)
    tag, suffix = Path(entry["package"]).stem, package_settings(pkg)[1]  # the baselines' cache names
    package = compile_model(pkg, "CPU", F32, standalone="all")
    core = ov.Core()
    statics = {}
    for name in ("NNCF accuracy control 0.005", "NNCF accuracy control 0.01", "NNCF accuracy control 0.02"):
        m = core.read_model(CACHE / "nncf" / f"{tag}_ac_{name.rsplit(' ', 1)[1]}{suffix}.xml")
        if key == "fmnist":
            m.reshape([1, 1, 28, 28])
        statics[name] = core.compile_model(m, "CPU", F32)
    out: dict[str, Any] = {"model": entry["model"], "metric": entry["metric"], "run_of": entry.get("date"),
                           "shifts": {}}  # fmt: skip
    for shift, result in entry["shifts"].items():
        rows = {r["name"]: r for r in result["rows"]}
        dom = result["dominance"]
        pairs = [("dominated by", a, b) for a, b in dom["adaptive_dominated_by"]]
        pairs += [("dominates", a, b) for a, b in dom["adaptive_dominates"]]
        xs = apply_shift(x, shift, lo, hi, seed=1)
        y = labels if fp32 is None else np.array([fp32(xs[i : i + 1])[0].argmax() for i in range(len(xs))])
        right: dict[str, np.ndarray] = {}  # source row → which inputs it gets right
        tests, seen = [], set()
        with console.status(f"{key} · {shift}: {len(pairs)} relations"):
            for relation, a, b in pairs:
                pair = (relation, rows[a].get("runs", a), rows[b].get("runs", b))  # an `auto` row runs another
                if pair in seen:  # several `auto` budgets run the same cascade point
                    continue
                seen.add(pair)
                for source in pair[1:]:
                    if source not in right:
                        right[source] = _predict(source, xs, package, statics) == y
                ca, cb = right[pair[1]], right[pair[2]]
                only_a, only_b = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
                p = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
                gap_us = 1e3 * (rows[a]["median_ms"] - rows[b]["median_ms"])
                tests.append({"relation": relation, "adaptive": a, "rival": b, "runs": pair[1],
                              "only_adaptive_right": only_a, "only_rival_right": only_b, "mcnemar_p": float(p),
                              "median_us_adaptive_minus_rival": gap_us})  # fmt: skip
        key_q = "accuracy" if labels is not None else "agreement"
        reproduced = {src: [float(np.mean(r)), rows[src][key_q]] for src, r in right.items()}
        out["shifts"][shift] = {"holds": dom["holds"], "tests": tests, "reproduced": reproduced}
        console.print(f"{key} · {shift}: {len(tests)} relations tested")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fmnist,effnet", help="comma list of fmnist, effnet")
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
        "gets right (Fashion-MNIST: the label; EfficientNet-Lite0: FP32's top-1), the exact McNemar p of that "
        "difference, and the bench's median latency difference. PP-OCRv4 has no relation to test (no adaptive "
        "point dominates or is dominated there).",
        "",
    ]
    for out in done.values():
        lines += [f"## {out.get('model', 'Fashion-MNIST ResNet')} (Pareto run of {out['run_of']})", "",
                  "Per shift: relations where an adaptive point dominates a rival, and how many of those rest on a "
                  "significant quality gain (exact McNemar p < 0.05, the adaptive point right more often); "
                  "relations where one is dominated, and how many on a significant loss.", "",
                  "| shift | holds | dominates | of which significant | dominated by | of which significant |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for shift, s in out["shifts"].items():
            wins = [t for t in s["tests"] if t["relation"] == "dominates"]
            losses = [t for t in s["tests"] if t["relation"] == "dominated by"]
            real_wins = [t for t in wins if t["mcnemar_p"] < 0.05 and t["only_adaptive_right"] > t["only_rival_right"]]
            real_losses = [t for t in losses if t["mcnemar_p"] < 0.05]
            lines.append(f"| {shift} | {'yes' if s['holds'] else 'no'} | {len(wins)} | {len(real_wins)} | "
                         f"{len(losses)} | {len(real_losses)} |")  # fmt: skip
        lines += ["", "| shift | holds | relation | adaptive (runs) | rival | only adaptive right | only rival right "
                  "| McNemar p | Δ median µs |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for shift, s in out["shifts"].items():
            for t in s["tests"]:
                lines.append(f"| {shift} | {'yes' if s['holds'] else 'no'} | {t['relation']} | {t['adaptive']} "
                             f"({t['runs']}) | {t['rival']} | {t['only_adaptive_right']} | {t['only_rival_right']} "
                             f"| {t['mcnemar_p']:.3f} | {t['median_us_adaptive_minus_rival']:+.1f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
