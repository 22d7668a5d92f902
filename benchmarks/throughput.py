"""Run-to-run spread of async throughput: ``bench``'s throughput measurement repeated on fresh compiles.

One throughput figure per configuration (``benchmarks/pareto.py``) is the median of interleaved rounds
over ``--compiles`` compiled copies; between independent runs on this shared machine the ratio of one
configuration to NNCF INT8 still moved by several percent. This script repeats that whole measurement
``--repeats`` times (every model compiled afresh each time) on the packages and NNCF baselines
``benchmarks/pareto.py`` cached, and reports per configuration the median, min and max of its ratio
to NNCF INT8 (NNCF's defaults) over the runs.

Writes ``results/throughput.json`` and ``results/throughput.md``; a model not in ``--models`` keeps its
section from an earlier run (each section is dated).

Usage: ``python benchmarks/throughput.py [--models effnet,fmnist] [--repeats 3] [--seconds 5]
[--effnet-calibration N]``
(after ``python benchmarks/pareto.py`` has filled ``results/.cache/pareto``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from rich.console import Console

import apsq_ov
from apsq_ov import bench

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / ".cache" / "pareto"
sys.path.insert(0, str(HERE))
console = Console()

from pareto import effnet_tag, package_settings  # noqa: E402


def inputs(name: str) -> tuple[ov.Model, np.ndarray]:
    """The plain model and the clean evaluation inputs ``benchmarks/pareto.py`` measures throughput on."""
    if name == "fmnist":
        from apsq_ov.datasets import load_fashion_mnist

        model = ov.Core().read_model(apsq_ov.embedded_model())
        model.reshape([1, 1, 28, 28])
        return model, load_fashion_mnist("test")[0]
    if name == "effnet":
        from real_models import efficientnet_lite0_ir, photo_crops

        return ov.Core().read_model(efficientnet_lite0_ir(RESULTS / ".cache")), photo_crops(500, seed=1)
    raise SystemExit(f"unknown model {name!r}: use fmnist or effnet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="effnet,fmnist")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput seconds per configuration and run")
    ap.add_argument("--compiles", type=int, default=3)
    ap.add_argument("--effnet-calibration", type=int, default=1000,
                    help="the EfficientNet-Lite0 package and NNCF models pareto.py calibrated on this many crops "
                         "(pareto.py's default)")
    args = ap.parse_args()
    path = RESULTS / "throughput.json"
    out: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    out.setdefault("models", {})
    for name in args.models.split(","):
        model, x = inputs(name)
        tag = effnet_tag(args.effnet_calibration) if name == "effnet" else name
        pkg = apsq_ov.Package.load(CACHE / f"{tag}.apsq")
        core = ov.Core()
        suffix = package_settings(pkg)[1]  # the NNCF model with the settings the package was calibrated with
        plain = [("OpenVINO FP32", "baseline", model, "f32"), ("OpenVINO BF16 (bf16 hint)", "baseline", model, "bf16"),
                 ("NNCF INT8", "baseline", core.read_model(CACHE / "nncf" / f"{tag}_int8.xml"), "f32"),
                 ("NNCF INT8, apsq settings", "baseline",
                  core.read_model(CACHE / "nncf" / f"{tag}_int8_apsq{suffix}.xml"), "f32")]  # fmt: skip
        runs, waits = [], []
        for r in range(args.repeats):
            with console.status(f"{name}: run {r + 1}/{args.repeats}"):
                waits.append({})
                runs.append(bench.throughputs(pkg, plain, x, args.seconds, compiles=args.compiles, waits=waits[-1]))
        out["models"][name] = {"runs": runs, "waits": waits, "served_by": served_by(pkg), "repeats": args.repeats,
                               "seconds": args.seconds, "compiles": args.compiles, "package": tag,
                               "cpu": bench.host_cpu(),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
        console.print(f"{name}: done")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    text = markdown(out)
    (RESULTS / "throughput.md").write_text(text)
    console.print(text)


def served_by(pkg: apsq_ov.Package) -> dict[str, str]:
    """What ``auto`` runs at each budget: the cascade (with the share of calibration inputs it escalated)
    or a static level."""
    from apsq_ov.routing import choose_body

    m = pkg.manifest
    out = {}
    for d in m.budgets:
        body = choose_body(m, d)
        point = m.router.point_for(d) if m.router is not None else None
        if body.level == m.cascade_level and point is not None:
            out[f"apsq adaptive {d:g}"] = f"cascade, {100 * point.escalation:.1f}% of calibration inputs escalated"
        else:
            out[f"apsq adaptive {d:g}"] = f"static level {m.levels[body.level].max_drop:g}"
    return out


def markdown(out: dict[str, Any]) -> str:
    lines = ["# Async throughput, run to run", "",
             "`python benchmarks/throughput.py`: independent runs (number per model below), each every model compiled "
             "afresh, seconds per configuration in 6 interleaved rounds (all cores, "
             "THROUGHPUT hint, clean data; every queue twice the optimal number of requests, each input copied into "
             "the idle request's input tensor and the request started without inputs, its callback reading "
             "every result; the adaptive rows through `AdaptiveAsyncInferQueue`, escalations re-run "
             f"{bench.ESCALATION_BATCH} at a time unless marked in-graph). Ratio to NNCF INT8 (NNCF's defaults) in "
             "the same run: median [min, max] over the runs. Last, the wait of escalated inputs in the last run.",
             ""]  # fmt: skip
    for name, res in out["models"].items():
        runs, served = res["runs"], res.get("served_by", {})
        header = "| configuration | auto runs | inputs/s (median) | vs NNCF INT8: median [min, max] |"
        repeats, compiles, seconds = (res.get(k, out.get(k)) for k in ("repeats", "compiles", "seconds"))
        how = f"{repeats} runs, each compiled {compiles}x afresh, {seconds:g} s per configuration"
        if res.get("package", name) != name:  # e.g. EfficientNet-Lite0 calibrated on more crops
            how += f"; package `{res['package']}.apsq` and its NNCF models"
        on = f" on {res['cpu']}" if "cpu" in res else ""
        lines += [f"## {name}", "", f"Run of {res['date']}{on}: {how}." if "date" in res else f"{how}.", "",
                  header, "|---|---|---|---|"]
        for k in runs[0]:
            v = [run[k] / run["NNCF INT8"] for run in runs]
            rate = float(np.median([run[k] for run in runs]))
            spread = f"{np.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]"
            lines.append(f"| {k} | {served.get(k, '')} | {rate:.0f} | {spread} |")
        lines += ["", *bench.wait_lines(res.get("waits", [{}])[-1]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
