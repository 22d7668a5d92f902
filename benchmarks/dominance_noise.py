"""Which of Fashion-MNIST's dominance verdicts are more than noise?

``benchmarks/pareto.py`` calls an adaptive point dominated (or dominating) on any accuracy difference,
however small: on Fashion-MNIST many are 1–30 images of 10,000. This script re-runs, on the same shifted
test images the bench used (``apsq_ov.shifts.apply``, seed 1), each pair of methods in a dominance
relation of ``results/pareto.json`` (adaptive point vs NNCF accuracy control or a static mix), and
tests the accuracy difference with an exact McNemar test on the images only one of the two gets right.
The latency side is the medians' difference the bench measured (a few µs are within this machine's
noise; the cascade's fixed cost, ~12 µs here, is not). Accuracy is deterministic per graph, so the
per-image results reproduce the bench's accuracies.

Writes ``results/dominance_noise.{json,md}``. Usage: ``python benchmarks/dominance_noise.py``
(after ``python benchmarks/pareto.py --models fmnist``).
"""

from __future__ import annotations

import json
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
RESULTS = HERE / "results"
CACHE = RESULTS / ".cache" / "pareto"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
console = Console()


def _policy(source: str) -> dict[str, Any]:
    """The policy of a package row (``apsq cascade D`` / ``apsq static mix D``)."""
    kind, budget = source.rsplit(" ", 1)
    return {"max_drop": float(budget), "policy": "cascade" if kind == "apsq cascade" else "static"}


def _predict(source: str, xs: np.ndarray, package: Any, statics: dict[str, ov.CompiledModel]) -> np.ndarray:
    """Top-1 of every image on the method the bench row ``source`` measured."""
    if source in statics:
        return np.array([statics[source](xs[i : i + 1])[0].argmax() for i in range(len(xs))])
    req, policy = package.create_infer_request(), _policy(source)
    return np.array([req.infer(xs[i : i + 1], **policy)[0].argmax() for i in range(len(xs))])


def main() -> None:
    entry = json.loads((RESULTS / "pareto.json").read_text())["models"]["fmnist"]
    x, y = load_fashion_mnist("test")
    x, y = x[: entry["samples"]], y[: entry["samples"]]
    lo, hi = entry["value_range"]
    package = compile_model(apsq_ov.Package.load(CACHE / "fmnist.apsq"), "CPU", F32, standalone="all")
    core = ov.Core()
    statics = {}
    for name in ("NNCF accuracy control 0.005", "NNCF accuracy control 0.01", "NNCF accuracy control 0.02"):
        m = core.read_model(CACHE / "nncf" / f"fmnist_ac_{name.rsplit(' ', 1)[1]}.xml")
        m.reshape([1, 1, 28, 28])
        statics[name] = core.compile_model(m, "CPU", F32)
    out: dict[str, Any] = {"run_of": entry.get("date"), "shifts": {}}
    for shift, result in entry["shifts"].items():
        rows = {r["name"]: r for r in result["rows"]}
        dom = result["dominance"]
        pairs = [("dominated by", a, b) for a, b in dom["adaptive_dominated_by"]]
        pairs += [("dominates", a, b) for a, b in dom["adaptive_dominates"]]
        xs = apply_shift(x, shift, lo, hi, seed=1)
        right: dict[str, np.ndarray] = {}  # source row → which images it gets right
        tests, seen = [], set()
        with console.status(f"{shift}: {len(pairs)} relations"):
            for relation, a, b in pairs:
                key = (relation, rows[a].get("runs", a), rows[b].get("runs", b))  # an `auto` row runs another
                if key in seen:  # several `auto` budgets run the same cascade point
                    continue
                seen.add(key)
                for source in key[1:]:
                    if source not in right:
                        right[source] = _predict(source, xs, package, statics) == y
                ca, cb = right[key[1]], right[key[2]]
                only_a, only_b = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
                p = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
                gap_us = 1e3 * (rows[a]["median_ms"] - rows[b]["median_ms"])
                tests.append({"relation": relation, "adaptive": a, "rival": b, "runs": key[1],
                              "only_adaptive_right": only_a, "only_rival_right": only_b, "mcnemar_p": float(p),
                              "median_us_adaptive_minus_rival": gap_us})  # fmt: skip
        out["shifts"][shift] = {"holds": dom["holds"], "tests": tests}
        console.print(f"{shift}: {len(tests)} relations tested")
    (RESULTS / "dominance_noise.json").write_text(json.dumps(out, indent=1))
    text = markdown(out)
    (RESULTS / "dominance_noise.md").write_text(text)
    console.print(text)


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Fashion-MNIST: which dominance verdicts are more than noise",
        "",
        f"`python benchmarks/dominance_noise.py` on the Pareto run of {out['run_of']}: every relation the "
        "bench counted (adaptive point vs NNCF accuracy control or a static mix; one line per distinct pair of "
        "graphs), the images only one of the two gets right, the exact McNemar p of that difference, and the "
        "bench's median latency difference.",
        "",
        "| shift | holds | relation | adaptive (runs) | rival | only adaptive right | only rival right | McNemar p "
        "| Δ median µs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shift, s in out["shifts"].items():
        for t in s["tests"]:
            lines.append(f"| {shift} | {'yes' if s['holds'] else 'no'} | {t['relation']} | {t['adaptive']} "
                         f"({t['runs']}) | {t['rival']} | {t['only_adaptive_right']} | {t['only_rival_right']} "
                         f"| {t['mcnemar_p']:.3f} | {t['median_us_adaptive_minus_rival']:+.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
