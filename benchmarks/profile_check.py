"""Check a measured device profile against a direct OpenVINO run (DESIGN.md section 2).

Runs :func:`apsq_ov.profiler.measure_profile` and, in the same process, the direct reference: one
model of 8 convolutions 64ch 56x56 (conv 3x3 + bias + ReLU each) timed as an FP32 model with the f32
hint, the same model with the bf16 hint, and the NNCF INT8 model with the f32 hint (1 thread,
PERFORMANCE_HINT=LATENCY, interleaved rounds, median of >= 50 runs). Compares the profile's
INT8:BF16:FP32 Convolution latency ratios at 1x64x56x56 with the direct ratios (acceptance: within 15%).
Writes ``benchmarks/results/profile_check.json`` and ``profile_check.md``; with ``--write-shipped`` also
writes the measured profile to ``device_profiles/CPU.json`` (the shipped CPU profile is then this
measurement).

Run: ``python benchmarks/profile_check.py [--device CPU] [--budget 150] [--write-shipped]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from rich.console import Console
from rich.table import Table

from apsq_ov.precision import Precision
from apsq_ov.profiler import conv, measure_profile, time_interleaved
from apsq_ov.profiles import DeviceProfile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "device_profiles"
TOLERANCE = 0.15
POINT = conv(1, 64, 56, 56, 3, 64)
LATENCY = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}


def eight_convs(rng: np.random.Generator) -> ov.Model:
    """8 × (conv 3x3 64→64 + bias + ReLU) on 1x64x56x56, random weights (timing only)."""
    x = ops.parameter([1, 64, 56, 56], np.float32, name="x")
    y = x.output(0)
    for _ in range(8):
        w = ops.constant((rng.standard_normal((64, 64, 3, 3)) / 24.0).astype(np.float32))
        b = ops.constant((0.1 * rng.standard_normal((1, 64, 1, 1))).astype(np.float32))
        y = ops.relu(ops.add(ops.convolution(y, w, [1, 1], [1, 1], [1, 1], [1, 1]), b)).output(0)
    return ov.Model([ops.result(y)], [x], "eight_convs")


def direct_reference(device: str) -> dict[str, float]:
    """Median latency (ms) of the 8-conv model: fp32 (f32 hint), bf16 (bf16 hint), int8 (NNCF, f32 hint)."""
    import nncf

    rng = np.random.default_rng(1)
    model = eight_convs(rng)
    data = [np.abs(rng.standard_normal((1, 64, 56, 56))).astype(np.float32) for _ in range(8)]
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        q = nncf.quantize(model.clone(), nncf.Dataset(data), subset_size=len(data))
    core = ov.Core()
    runs = {
        "fp32": (model, "f32"),
        "bf16": (model, "bf16"),
        "int8": (q, "f32"),
    }
    requests = []
    for m, hint in runs.values():
        req = core.compile_model(m, device, {**LATENCY, "INFERENCE_PRECISION_HINT": hint}).create_infer_request()
        req.set_input_tensor(ov.Tensor(data[0]))
        requests.append(req)
    timings = time_interleaved(requests, min_runs=60, min_time_s=4.0)
    return {name: t.median_ms for name, t in zip(runs, timings, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--budget", type=float, default=150.0, help="measure_profile's time budget (s)")
    parser.add_argument("--write-shipped", action="store_true", help="write the profile to device_profiles/")
    args = parser.parse_args()
    console = Console()

    trace: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with console.status("measuring the profile") as status:

        def progress(phase: str, done: int, total: int) -> None:
            status.update(f"measuring the profile: {phase} {done}/{total} ({time.perf_counter() - t0:.0f} s)")

        data = measure_profile(args.device, progress=progress, budget_s=args.budget, trace=trace)
    wall_s = time.perf_counter() - t0
    profile = DeviceProfile.from_json(data, source="measured")
    with console.status("direct reference: 8 convs 64ch 56x56"):
        direct = direct_reference(args.device)

    prof = {p: profile.latency_ms("Convolution", Precision(p), POINT.macs) for p in ("fp32", "bf16", "int8")}
    raw = {t["precision"]: t["wall_ms"] for t in trace if t.get("shape") == POINT.shape}
    ratio_rows = []
    for num, den in (("int8", "fp32"), ("bf16", "fp32"), ("int8", "bf16")):
        r_prof, r_direct = prof[num] / prof[den], direct[num] / direct[den]
        ratio_rows.append(
            {
                "ratio": f"{num}:{den}",
                "profile": r_prof,
                "profile_one_op_wall": raw[num] / raw[den],
                "direct_8_convs": r_direct,
                "disagreement_pct": 100.0 * abs(r_prof / r_direct - 1.0),
            }
        )
    passed = all(r["disagreement_pct"] <= 100 * TOLERANCE for r in ratio_rows)
    routing = data["routing"]
    if_runs = [t for t in trace if "routing_shape" in t]
    result = {
        "device": args.device,
        "profile_wall_s": wall_s,
        "budget_s": args.budget,
        "point": POINT.shape,
        "profile_latency_ms": prof,
        "profile_one_op_wall_ms": raw,
        "direct_8_convs_ms": direct,
        "ratios": ratio_rows,
        "tolerance_pct": 100 * TOLERANCE,
        "pass": passed,
        "if_base_ms": routing["if_base_ms"]["value"],
        "if_per_mb_ms": routing["if_per_mb_ms"]["value"],
        "if_measurements": if_runs,
        "rapl_readable": any(
            e.get("energy_mj", {}).get("provenance", {}).get("kind") == "measured"
            for row in data["op_types"].values()
            for pts in row.values()
            for e in pts
        ),
        "throughput_measured": any(
            "throughput_fps" in e for row in data["op_types"].values() for pts in row.values() for e in pts
        ),
        "native_precisions": data["native_precisions"],
        "default_precisions": data["default_precisions"],
        "shipped": bool(args.write_shipped),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_check.json").write_text(json.dumps(result, indent=1))
    if args.write_shipped:
        (SHIPPED / f"{args.device.split('.')[0].upper()}.json").write_text(json.dumps(data, indent=1) + "\n")

    lines = [
        f"# Profile check ({args.device}, {POINT.shape})",
        "",
        f"measure_profile wall time: {wall_s:.1f} s (budget {args.budget:.0f} s). "
        f"Direct reference: 8 convs 64ch 56x56 (+bias+ReLU) in one model, 1 thread, median of >= 60 runs, "
        "interleaved; fp32 and int8 (NNCF) with the f32 hint, bf16 with the bf16 hint.",
        "",
        "| ratio | profile | one-op wall (no border split) | direct 8 convs | disagreement |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['ratio']} | {r['profile']:.3f} | {r['profile_one_op_wall']:.3f} | {r['direct_8_convs']:.3f} "
        f"| {r['disagreement_pct']:.1f} % |"
        for r in ratio_rows
    ]
    lines += [
        "",
        f"Acceptance (every ratio within {100 * TOLERANCE:.0f} %): **{'pass' if passed else 'FAIL'}**.",
        "",
        "| latency (ms) | fp32 | bf16 | int8 |",
        "|---|---|---|---|",
        "| profile (per conv) | " + " | ".join(f"{prof[p]:.3f}" for p in ("fp32", "bf16", "int8")) + " |",
        "| one-op model wall | " + " | ".join(f"{raw[p]:.3f}" for p in ("fp32", "bf16", "int8")) + " |",
        "| direct, 8 convs | " + " | ".join(f"{direct[p]:.3f}" for p in ("fp32", "bf16", "int8")) + " |",
        "",
        f"Routing If (conv -> If{{conv | conv}} -> conv minus conv -> conv -> conv, identity 1x1 convs): "
        f"if_base_ms {result['if_base_ms']:.4f}, if_per_mb_ms {result['if_per_mb_ms']:.4f}. "
        + "; ".join(
            f"{t['routing_shape']} ({t['mb']:.3f} MB): {t['with_if_ms']:.4f} ms with If vs "
            f"{t['without_if_ms']:.4f} ms without"
            for t in if_runs
        )
        + ".",
        "",
        f"RAPL readable: {result['rapl_readable']}. Throughput measured: {result['throughput_measured']}. "
        f"native {data['native_precisions']}, default {data['default_precisions']}.",
        "",
    ]
    (RESULTS / "profile_check.md").write_text("\n".join(lines))

    table = Table(title=f"profile vs direct OpenVINO at {POINT.shape} ({wall_s:.0f} s profile)")
    for col in ("ratio", "profile", "one-op wall", "direct 8 convs", "disagreement"):
        table.add_column(col, justify="right")
    for r in ratio_rows:
        table.add_row(
            r["ratio"],
            f"{r['profile']:.3f}",
            f"{r['profile_one_op_wall']:.3f}",
            f"{r['direct_8_convs']:.3f}",
            f"{r['disagreement_pct']:.1f} %",
        )
    console.print(table)
    console.print(
        f"{'pass' if passed else 'FAIL'}; If base {result['if_base_ms']:.4f} ms, per MB "
        f"{result['if_per_mb_ms']:.4f} ms; RAPL {result['rapl_readable']}"
    )


if __name__ == "__main__":
    main()
