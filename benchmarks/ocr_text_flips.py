"""PP-OCRv4 rec: could any router that re-runs lines on FP32 beat the static levels, shift by shift?

The Pareto bench (``benchmarks/pareto.py``) finds no adaptive point on PP-OCRv4 rec and its perfect-router
bound impossible on every shift. That bound escalates the lines whose top-1 differs from FP32's at *any*
of the 40 output positions, which is most lines. What decides CER is the decoded text. This script runs
each static level of the package and FP32 on the bench's 300 lines (``render_text_lines(300, seed=1)``)
under each shift (``apsq_ov.shifts.apply``, seed 1) and reports, per level:

* its 1 − CER and FP32's;
* the share of lines whose top-1 differs at some position, and whose greedy-decoded text differs;
* the 1 − CER of a *text-perfect* router from that level: re-run on FP32 exactly the lines whose text
  would change (it then reads FP32's 1 − CER, at the level's cost plus FP32's on those lines).

Such a router cannot beat a static level where FP32 reads below that level (its points reach FP32's
quality at more than the level's cost), nor where it re-runs half the lines or more (the median line
pays the level and FP32). Quality only, no timing. Writes ``results/ocr_text_flips.{json,md}``.
Usage: ``python benchmarks/ocr_text_flips.py`` (after ``python benchmarks/pareto.py --models ocr``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import apsq_ov
from apsq_ov.bench import LATENCY
from apsq_ov.datasets import cer, ctc_greedy_decode, render_text_lines
from apsq_ov.shifts import apply as apply_shift

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_models import pp_ocr_rec  # noqa: E402

RESULTS = HERE / "results"
PACKAGE = RESULTS / ".cache" / "pareto" / "ocr.apsq"
SHIFTS = ("clean", "brightness", "contrast", "noise", "blur", "dark", "pixelate")
console = Console()


def main() -> None:
    if not PACKAGE.is_dir():
        raise SystemExit(f"no package at {PACKAGE}: run `python benchmarks/pareto.py --models ocr` first")
    onnx, charset = pp_ocr_rec()
    core = ov.Core()
    model = core.read_model(onnx)
    model.reshape([1, 3, 48, 320])
    fp32 = core.compile_model(model, "CPU", LATENCY)
    compiled = apsq_ov.compile_model(PACKAGE, "CPU", LATENCY, standalone="all")
    levels = compiled.manifest.levels
    bodies = [compiled.standalone[k] for k in range(1, len(levels))]  # each level on its own, as the bench runs it
    x, texts = render_text_lines(300, seed=1)
    lo, hi = float(x.min()), float(x.max())
    router = compiled.manifest.router
    fast = levels[router.fast_level if router is not None else len(levels) - 1]  # the cascade's fast route
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "lines": len(x),
                           "fast_route": f"{fast.max_drop:g}", "shifts": {}}  # fmt: skip
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console) as bar:
        for s in SHIFTS:
            xs = apply_shift(x, s, lo, hi, seed=1)
            task = bar.add_task(f"{s}: FP32 and {len(bodies)} levels", total=len(xs))
            y_ref, y_lv = [], [[] for _ in bodies]
            for i in range(len(xs)):
                y_ref.append(fp32(xs[i : i + 1])[0][0])
                for k, body in enumerate(bodies):
                    y_lv[k].append(body(xs[i : i + 1])[0][0])
                bar.advance(task)
            text_ref = [ctc_greedy_decode(y, charset) for y in y_ref]
            cer_ref = np.array([cer(t, gt) for t, gt in zip(text_ref, texts, strict=True)])
            rows = {}
            for k, ys in enumerate(y_lv, start=1):
                text = [ctc_greedy_decode(y, charset) for y in ys]
                c = np.array([cer(t, gt) for t, gt in zip(text, texts, strict=True)])
                differs = np.array([a != b for a, b in zip(text, text_ref, strict=True)])
                position = np.array([(a.argmax(-1) != b.argmax(-1)).any() for a, b in zip(ys, y_ref, strict=True)])
                rows[f"{levels[k].max_drop:g}"] = {
                    "task": 1 - float(c.mean()),
                    "any_position_flips": float(position.mean()),
                    "text_flips": float(differs.mean()),
                    "text_perfect_router": 1 - float(np.where(differs, cer_ref, c).mean()),
                }
            out["shifts"][s] = {"fp32": 1 - float(cer_ref.mean()), "levels": rows}
    (RESULTS / "ocr_text_flips.json").write_text(json.dumps(out, indent=1) + "\n")
    write_markdown(out, RESULTS / "ocr_text_flips.md")
    console.print(f"wrote {RESULTS / 'ocr_text_flips.md'}")


def write_markdown(out: dict[str, Any], path: Path) -> None:
    lines = [
        "# PP-OCRv4 rec: what a router re-running lines on FP32 could reach",
        "",
        f"`python benchmarks/ocr_text_flips.py` ({out['date']}; package `ocr.apsq`, the bench's {out['lines']} "
        "lines): per static level (its body compiled on its own), 1 − CER, the share of lines whose top-1 differs "
        "from FP32's at some position and whose decoded text differs, and the 1 − CER of a router re-running "
        "exactly the lines whose text differs (= FP32's). Verdict: can such a router beat the fastest level (the "
        f"cascade's fast route, level {out.get('fast_route', 'last')})?",
        "",
        "| shift | FP32 | fastest level | lines, any position differs | lines, text differs | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for s, d in out["shifts"].items():
        fast = d["levels"][out.get("fast_route", list(d["levels"])[-1])]
        if d["fp32"] <= fast["task"]:
            verdict = "no: FP32 reads no better than the fastest level"
        elif fast["text_flips"] >= 0.5:
            verdict = "no: the median line would pay the fastest level and FP32"
        else:
            verdict = "only with a router near text-perfect"
        lines.append(
            f"| {s} | {100 * d['fp32']:.2f}% | {100 * fast['task']:.2f}% | {100 * fast['any_position_flips']:.0f}% "
            f"| {100 * fast['text_flips']:.0f}% | {verdict} |"
        )
    lines += [
        "",
        "Every level:",
        "",
        "| shift | level | 1 − CER | any position differs | text differs |",
        "|---|---|---|---|---|",
    ]
    for s, d in out["shifts"].items():
        for name, r in d["levels"].items():
            lines.append(
                f"| {s} | {name} | {100 * r['task']:.2f}% | {100 * r['any_position_flips']:.0f}% "
                f"| {100 * r['text_flips']:.0f}% |"
            )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
