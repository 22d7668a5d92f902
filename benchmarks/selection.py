"""Per-level selection benchmark: what each level of the max-drop dial costs and how well it agrees with FP32.

EfficientNet-Lite0 (ImageNet) is calibrated once on photo crops; the package IR then holds one statically
compiled body per level of the dial (each op at the precision the ILP chose for that level, a few ops
routed per input behind an ``If`` with an in-graph range check) plus the fully routed body (every op
behind its own ``If``; precision pins and forced precisions run there). In one process this script:

1. calibrates (``apsq_ov.calibrate.calibrate``) on 300 crops (seed 0), default ``max_drop`` 0.01 and
   default levels, 64 sensitivity and 200 drop samples, and records the wall time;
2. summarises the routable ops and, per level, how many ops are static at fp32 / bf16 / int8 and routed;
3. times, with 1 thread, ``PERFORMANCE_HINT=LATENCY`` and the f32 hint (DESIGN.md section 5), in
   interleaved rounds on one fixed crop: plain FP32, plain BF16 (bf16 hint), plain NNCF INT8
   (``nncf.quantize`` on the same crops), the package at every level's ``max_drop``, at the default
   level with ``apsq/escalate`` = 3e38 (every routed op forced to its fast variant), at ``max_drop=1``,
   and the fully routed body with ``precision="int8"`` / ``"fp32"``. Every configuration is timed the
   same way: inputs and routing state set once, then the raw ``openvino.InferRequest.infer()``; one
   extra row times ``AdaptiveInferRequest.infer(x)`` (the Python API's own overhead included);
4. measures top-1 agreement with plain FP32 on 500 fresh crops (seed 1) for every configuration, and
   how many routed ops escalated per input (from the graph's ``apsq_route`` output).

Writes ``benchmarks/results/selection.json`` and ``selection.md`` and prints the table.

Run: ``python benchmarks/selection.py [--quick]`` (needs the EfficientNet-Lite0 IR cached in
``benchmarks/results/.cache`` or the wheels named in ``benchmarks/real_models.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apsq_ov  # noqa: E402
from apsq_ov.calibrate import CalibrationConfig, calibrate  # noqa: E402
from apsq_ov.precision import Precision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LATENCY = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
F32 = {**LATENCY, "INFERENCE_PRECISION_HINT": "f32"}
ESCALATE_STATE = "apsq/escalate"
NEVER_ESCALATE = 3.0e38
console = Console()


@dataclass
class Settings:
    calib_crops: int = 300
    sensitivity_samples: int = 64
    drop_samples: int = 200
    quality_crops: int = 500
    rounds: int = 3
    runs_per_round: int = 100
    warmup: int = 20


QUICK = Settings(
    calib_crops=96, sensitivity_samples=16, drop_samples=48, quality_crops=60, rounds=2, runs_per_round=20, warmup=5
)


@dataclass
class Config:
    """One measured configuration.

    :param request: the raw OpenVINO request, inputs and routing state already set (timed with ``infer()``).
    :param run: one inference on a crop → (logits, route codes or None), for the quality pass.
    """

    name: str
    kind: str  # "plain" | "level" | "escalate" | "full" | "api"
    request: ov.InferRequest
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    routed_ops: int = 0
    note: str = ""
    fast_codes: dict[int, int] = field(default_factory=dict)  # route column → code of its fast variant
    samples_ms: list[float] = field(default_factory=list)
    round_medians_ms: list[float] = field(default_factory=list)
    quality_timed: bool = True


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def run_calibration(model: Path, data: Path, out: Path, s: Settings) -> tuple[apsq_ov.Package, float, dict]:
    config = CalibrationConfig(
        subset_size=s.calib_crops, sensitivity_samples=s.sensitivity_samples, drop_samples=s.drop_samples
    )
    phases: dict[str, dict[str, float]] = {}
    with _progress() as prog:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if phase not in tasks:
                tasks[phase] = prog.add_task(phase, total=max(total, 1))
                phases[phase] = {"start": now}
            prog.update(tasks[phase], completed=done, total=max(total, 1))
            phases[phase]["end"] = now

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's own progress bars
            pkg = calibrate(model, data, out, config, progress=progress)
        wall = time.perf_counter() - t0
    phase_s = {p: round(v["end"] - v["start"], 2) for p, v in phases.items()}
    return pkg, wall, {"config": {k: str(v) for k, v in vars(config).items()}, "phase_seconds": phase_s}


def level_summary(pkg: apsq_ov.Package) -> list[dict[str, Any]]:
    m = pkg.manifest
    rows = []
    for i, lv in enumerate(m.levels):
        static = {p.value: 0 for p in (Precision.FP32, Precision.BF16, Precision.INT8)}
        for c in lv.choices.values():
            if not c.routed:
                static[c.fast.value] = static.get(c.fast.value, 0) + 1
        rows.append(
            {
                "index": i,
                "max_drop": lv.max_drop,
                "default": i == m.default_level,
                "static": static,
                "routed": len(lv.routed),
                "routed_ops": {
                    n: f"{lv.choices[n].fast.value}→{lv.choices[n].safe.value} ×{lv.choices[n].limit:g}"
                    for n in lv.routed
                },
                "predicted_ms": lv.predicted_ms,
                "predicted_drop": lv.predicted_drop,
                "solver": lv.solver,
            }
        )
    return rows


def nncf_int8(model_path: Path, crops: np.ndarray) -> tuple[ov.Model, float]:
    import nncf

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(model_path)
    model.reshape([1, *crops.shape[1:]])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        q = nncf.quantize(model, nncf.Dataset([c[None] for c in crops]), subset_size=len(crops))
    return q, time.perf_counter() - t0


def plain_config(core: ov.Core, name: str, model: ov.Model | Path, hint: str, x: np.ndarray) -> Config:
    compiled = core.compile_model(model, "CPU", {**LATENCY, "INFERENCE_PRECISION_HINT": hint})
    timed = compiled.create_infer_request()
    timed.set_input_tensor(ov.Tensor(x))
    quality = compiled.create_infer_request()

    def run(crop: np.ndarray) -> tuple[np.ndarray, None]:
        return quality.infer([crop[None]])[0].copy(), None

    return Config(name, "plain", timed, run, note=f"{hint} hint")


def package_configs(pkg: apsq_ov.Package, x: np.ndarray) -> tuple[list[Config], dict[str, Any]]:
    m = pkg.manifest
    compiled = apsq_ov.compile_model(pkg, "CPU", F32)
    route_col = {n: i for i, n in enumerate(compiled.route_ops)}
    info: dict[str, Any] = {"route_ops": len(compiled.route_ops)}

    def make(
        name: str,
        kind: str,
        policy: dict[str, Any],
        routed: int,
        note: str = "",
        fast: dict[int, int] | None = None,
        escalate: float | None = None,
    ) -> Config:
        timed, quality = compiled.create_infer_request(), compiled.create_infer_request()
        for areq in (timed, quality):
            areq.set_policy(**policy)
            if escalate is not None:
                states = {s.name: s for s in areq.request.query_state()}
                if ESCALATE_STATE not in states:
                    raise RuntimeError(f"{ESCALATE_STATE} state is absent (no level routes an op)")
                states[ESCALATE_STATE].state = ov.Tensor(np.array(escalate, dtype=np.float32))
        timed.request.set_input_tensor(ov.Tensor(x))

        def run(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            res = quality.infer(crop[None], **policy)
            return res[0], res.route

        return Config(name, kind, timed.request, run, routed, note, fast or {})

    def level_fast(k: int) -> dict[int, int]:
        lv = m.levels[k]
        return {route_col[n]: lv.choices[n].fast.code for n in lv.routed}

    configs = []
    for k, lv in enumerate(m.levels):
        tag = " (default)" if k == m.default_level else ""
        configs.append(
            make(
                f"apsq level {k}: max_drop={lv.max_drop:g}{tag}",
                "level",
                {"max_drop": lv.max_drop},
                len(lv.routed),
                f"level {k}",
                level_fast(k),
            )
        )
    d = m.default_level
    states = {s.name for s in compiled.create_infer_request().request.query_state()}
    info["escalate_state"] = ESCALATE_STATE in states
    if ESCALATE_STATE in states:
        configs.append(
            make(
                f"apsq level {d}: max_drop={m.levels[d].max_drop:g}, escalate=3e38",
                "escalate",
                {"max_drop": m.levels[d].max_drop},
                len(m.levels[d].routed),
                f"level {d}, every routed op forced fast",
                level_fast(d),
                NEVER_ESCALATE,
            )
        )
    top = compiled.plan(max_drop=1.0).level
    configs.append(
        make(
            f"apsq infer(max_drop=1) → level {top} (separate request)",
            "level",
            {"max_drop": 1.0},
            len(m.levels[top].routed),
            f"level {top}",
            level_fast(top),
        )
    )
    n_ops = len(m.ops)
    configs.append(
        make(
            'apsq precision="int8" (fully routed body)', "full", {"precision": "int8"}, n_ops, "every op behind its If"
        )
    )
    configs.append(
        make(
            'apsq precision="fp32" (fully routed body)', "full", {"precision": "fp32"}, n_ops, "every op behind its If"
        )
    )
    # The Python API's own overhead: AdaptiveInferRequest.infer(x) at the default level, timed as a call.
    api = compiled.create_infer_request()
    api.set_policy(max_drop=m.default_max_drop)
    api_cfg = Config(
        "apsq default level via AdaptiveInferRequest.infer (API overhead incl.)",
        "api",
        api.request,
        lambda crop: (api.infer(crop[None])[0], None),
        len(m.levels[d].routed),
        f"level {d}",
    )
    api_cfg.quality_timed = False
    api_x = x

    class _ApiTimed:  # duck-types ov.InferRequest.infer() for the timing loop
        def infer(self) -> None:
            api.infer(api_x)

    api_cfg.request = _ApiTimed()  # type: ignore[assignment]
    configs.append(api_cfg)
    info["compiled"] = compiled
    return configs, info


def time_configs(configs: list[Config], s: Settings) -> None:
    total = len(configs) * (s.warmup + s.rounds * s.runs_per_round)
    clock = time.perf_counter
    with _progress() as prog:
        task = prog.add_task("latency (1 thread, interleaved rounds)", total=total)
        for c in configs:
            for _ in range(s.warmup):
                c.request.infer()
            prog.advance(task, s.warmup)
        for r in range(s.rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]  # rotate: no fixed position
            for c in order:
                times = []
                for _ in range(s.runs_per_round):
                    t0 = clock()
                    c.request.infer()
                    times.append((clock() - t0) * 1e3)
                c.samples_ms += times
                c.round_medians_ms.append(float(np.median(times)))
                prog.advance(task, s.runs_per_round)


def quality(configs: list[Config], crops: np.ndarray) -> dict[str, dict[str, Any]]:
    ref_cfg = configs[0]
    out: dict[str, dict[str, Any]] = {}
    tops: dict[str, np.ndarray] = {}
    escal: dict[str, list[float]] = {}
    with _progress() as prog:
        task = prog.add_task(f"quality on {len(crops)} fresh crops", total=len(configs) * len(crops))
        for c in configs:
            if c.kind == "api":
                prog.advance(task, len(crops))
                continue
            top, esc = [], []
            for crop in crops:
                y, route = c.run(crop)
                top.append(int(np.argmax(y)))
                if route is not None and c.fast_codes:
                    esc.append(sum(int(route[i]) != f for i, f in c.fast_codes.items()))
                prog.advance(task)
            tops[c.name] = np.array(top)
            escal[c.name] = esc
    ref = tops[ref_cfg.name]
    for name, t in tops.items():
        agree = float(np.mean(t == ref))
        e = escal[name]
        out[name] = {
            "top1_agreement": agree,
            "n": len(t),
            "escalated_ops_per_input": float(np.mean(e)) if e else None,
            "inputs_with_any_escalation": float(np.mean(np.array(e) > 0)) if e else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller calibration, quality set and timing")
    parser.add_argument("--package", type=Path, help="reuse this calibrated package (debugging: no calibration)")
    args = parser.parse_args()
    s = QUICK if args.quick else Settings()
    from real_models import efficientnet_lite0_ir, photo_crops

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="apsq-selection-"))
    model_path = efficientnet_lite0_ir(RESULTS / ".cache")
    with console.status("making photo crops"):
        calib = photo_crops(s.calib_crops, seed=0)
        fresh = photo_crops(s.quality_crops, seed=1)
    np.savez(work / "calib.npz", inputs=calib)

    console.rule(f"calibrate EfficientNet-Lite0 on {s.calib_crops} crops")
    if args.package:
        pkg, calib_wall, calib_info = apsq_ov.Package.load(args.package), float("nan"), {"reused": str(args.package)}
        calib_info["phase_seconds"] = {}
    else:
        pkg, calib_wall, calib_info = run_calibration(model_path, work / "calib.npz", work / "pkg", s)
    console.print(f"calibration wall time: {calib_wall:.1f} s  phases: {calib_info['phase_seconds']}")
    m = pkg.manifest
    levels = level_summary(pkg)
    lt = Table(title=f"{len(m.ops)} routable ops; levels (default = level {m.default_level})")
    for h in (
        "level",
        "max_drop",
        "static fp32",
        "static bf16",
        "static int8",
        "routed",
        "predicted ms",
        "predicted drop",
    ):
        lt.add_column(h)
    for lv in levels:
        lt.add_row(
            f"{lv['index']}{' *' if lv['default'] else ''}",
            f"{lv['max_drop']:g}",
            str(lv["static"]["fp32"]),
            str(lv["static"]["bf16"]),
            str(lv["static"]["int8"]),
            str(lv["routed"]),
            f"{lv['predicted_ms']:.2f}",
            f"{lv['predicted_drop']:.4f}",
        )
    Console(width=200).print(lt)

    console.rule("baselines and package configurations")
    with console.status(f"nncf.quantize on the same {s.calib_crops} crops"):
        q_model, nncf_s = nncf_int8(model_path, calib)
    core = ov.Core()
    x = fresh[0][None]  # the fixed crop every latency is measured on
    fp32_model = core.read_model(model_path)
    fp32_model.reshape([1, *calib.shape[1:]])
    with console.status("compiling"):
        configs = [
            plain_config(core, "plain FP32", fp32_model, "f32", x),
            plain_config(core, "plain BF16", fp32_model, "bf16", x),
            plain_config(core, "plain NNCF INT8", q_model, "f32", x),
        ]
        pkg_configs, info = package_configs(pkg, x)
        configs += pkg_configs
    for c in configs:
        console.print(f"  {c.name}  [dim]{c.note}; routed ops {c.routed_ops}[/dim]")

    console.rule("latency")
    time_configs(configs, s)
    console.rule("quality")
    q = quality(configs, fresh)

    med = {c.name: float(np.median(c.round_medians_ms)) for c in configs}
    fp32_ms, int8_ms = med["plain FP32"], med["plain NNCF INT8"]
    rows = []
    for c in configs:
        qc = q.get(c.name, {})
        rows.append(
            {
                "configuration": c.name,
                "kind": c.kind,
                "note": c.note,
                "median_ms": med[c.name],
                "round_medians_ms": c.round_medians_ms,
                "all_runs_median_ms": float(np.median(c.samples_ms)),
                "p10_ms": float(np.percentile(c.samples_ms, 10)),
                "p90_ms": float(np.percentile(c.samples_ms, 90)),
                "runs": len(c.samples_ms),
                "ratio_vs_nncf_int8": med[c.name] / int8_ms,
                "ratio_vs_fp32": med[c.name] / fp32_ms,
                "top1_agreement": qc.get("top1_agreement"),
                "quality_n": qc.get("n"),
                "routed_ops": c.routed_ops,
                "escalated_ops_per_input": qc.get("escalated_ops_per_input"),
                "inputs_with_any_escalation": qc.get("inputs_with_any_escalation"),
            }
        )
    result = {
        "model": "EfficientNet-Lite0 (ImageNet-1k), static [1,3,224,224]",
        "quick": bool(args.quick),
        "settings": vars(s),
        "machine": {"cpu": platform.processor() or platform.machine(), "openvino": ov.__version__},
        "latency_protocol": "1 thread, PERFORMANCE_HINT=LATENCY, INFERENCE_PRECISION_HINT=f32 (bf16 for plain BF16); "
        f"{s.warmup} warm-up runs, {s.rounds} interleaved rounds × {s.runs_per_round} runs of raw "
        "openvino.InferRequest.infer() on one fixed crop (photo_crops(…, seed=1)[0]), inputs and routing "
        "state set beforehand; median of round medians",
        "quality_protocol": f"top-1 agreement with plain FP32 on photo_crops({s.quality_crops}, seed=1)",
        "calibration": {"wall_seconds": calib_wall, "crops": s.calib_crops, **calib_info},
        "nncf_quantize_seconds": nncf_s,
        "routable_ops": len(m.ops),
        "route_ops": info["route_ops"],
        "default_level": m.default_level,
        "default_max_drop": m.default_max_drop,
        "escalate_state_present": info["escalate_state"],
        "levels": levels,
        "selection_objective": m.selection.get("objective") if isinstance(m.selection, dict) else None,
        "configurations": rows,
        "total_seconds": time.perf_counter() - t_start,
    }
    write(result)


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "selection.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    head = (
        "configuration",
        "median ms",
        "vs NNCF INT8",
        "vs FP32",
        "top-1 agreement",
        "routed ops",
        "escalated ops / input",
    )
    table = Table(title="EfficientNet-Lite0: package levels vs static baselines (1 thread)")
    for h in head:
        table.add_column(h)
    lines = [
        "# Per-level selection: EfficientNet-Lite0" + (" (QUICK run)" if result["quick"] else ""),
        "",
        f"Calibration wall time: {result['calibration']['wall_seconds']:.1f} s "
        f"({result['calibration']['crops']} crops; phases {result['calibration']['phase_seconds']}). "
        f"Routable ops: {result['routable_ops']}. Default level: {result['default_level']} "
        f"(max_drop {result['default_max_drop']:g}).",
        "",
        f"Latency: {result['latency_protocol']}. Quality: {result['quality_protocol']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["configurations"]:
        agree = r["top1_agreement"]
        row = (
            r["configuration"],
            f"{r['median_ms']:.2f}",
            f"{r['ratio_vs_nncf_int8']:.2f}x",
            f"{r['ratio_vs_fp32']:.2f}x",
            f"{agree * 100:.1f}% (n={r['quality_n']})" if agree is not None else "—",
            str(r["routed_ops"]),
            _fmt(r["escalated_ops_per_input"], ".2f"),
        )
        lines.append("| " + " | ".join(row) + " |")
        table.add_row(*row)
    lines += [
        "",
        "## Levels",
        "",
        "| level | max_drop | static fp32 | static bf16 | static int8 | routed | "
        "predicted ms | predicted drop | routed ops (fast→safe ×limit) |",
        "|" + "---|" * 9,
    ]
    for lv in result["levels"]:
        routed = ", ".join(f"`{n}` {v}" for n, v in lv["routed_ops"].items()) or "—"
        lines.append(
            f"| {lv['index']}{' (default)' if lv['default'] else ''} | {lv['max_drop']:g} | {lv['static']['fp32']} | "
            f"{lv['static']['bf16']} | {lv['static']['int8']} | {lv['routed']} | {lv['predicted_ms']:.2f} | "
            f"{lv['predicted_drop']:.4f} | {routed} |"
        )
    lines += [
        "",
        "Rows: `apsq max_drop=X` runs the level body for X (static ops, routed ops behind an If with the "
        "in-graph range check); `escalate=3e38` multiplies every routed op's range limit so no input escalates "
        "(routed ops always take their fast variant, the If stays); `precision=...` runs the fully routed "
        "body (every op behind its own If). Every row is timed as a raw `InferRequest.infer()` after the "
        "state is set, except the API row (`AdaptiveInferRequest.infer(x)`, input checks and output copies "
        "included). Escalated ops / input: routed ops that took their safe variant, mean over the quality set.",
    ]
    (RESULTS / "selection.md").write_text("\n".join(lines) + "\n")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
