"""Per-level selection benchmark: what each level of the max-drop dial costs and how well it agrees with FP32.

EfficientNet-Lite0 (ImageNet) is calibrated once on photo crops; the package IR then holds one statically
compiled body per level of the dial (each op at the precision the ILP chose for that level, a few ops
routed per input behind an ``If`` with an in-graph range check) plus the fully routed body (every op
behind its own ``If``; precision pins and forced precisions run there). In one process this script:

1. calibrates (``apsq_ov.calibrate.calibrate``) on 300 crops (seed 0), default ``max_drop`` 0.01 and
   default levels, 64 sensitivity and 200 drop samples, and records the wall time;
2. summarises the routable ops and, per level, how many ops are static at fp32 / bf16 / int8 / int4, routed,
   and routed inside another op's If (``shared_with``);
3. waits (``--quiet-wait``, up to 180 s) for other processes' CPU load to drop, records the load, then
   times, with 1 thread, ``PERFORMANCE_HINT=LATENCY`` and the f32 hint (DESIGN.md section 5), in
   interleaved rounds on one fixed crop: plain FP32, plain BF16 (bf16 hint), plain NNCF INT8
   (``nncf.quantize`` on the same crops), the package at every level's ``max_drop``, at the default
   level with ``apsq/escalate`` = 3e38 (every routed op forced to its fast variant), at ``max_drop=1``,
   and the fully routed body with ``precision="int8"`` / ``"fp32"``. Every configuration is timed the
   same way: inputs and routing state set once, then the raw ``openvino.InferRequest.infer()``; one
   extra row times ``AdaptiveInferRequest.infer(x)`` (the Python API's own overhead included);
4. measures top-1 agreement with plain FP32 on 500 fresh crops (seed 1) for every configuration, and
   how many routed ops escalated per input (from the graph's ``apsq_route`` output);
5. with ``--with-int4`` (default on) calibrates a second package on the same model and data with
   ``precisions=(fp32, bf16, int8, int4)`` (INT4 weight-only MatMul variants), reports which ops got an int4
   variant and which levels chose it, and times every level of that package in the same interleaved rounds.
   If the projected total would pass ~25 minutes, that calibration's ``drop_samples`` drops to 100 (recorded);
6. if some level is all static bf16, adds an "apsq all-bf16 level equivalent" row (else records the skip),
   and lists checks: a level slower than a coarser one, predicted vs measured latency, disagreement above budget.

Writes ``benchmarks/results/selection.json`` and ``selection.md`` and prints the table.

Run: ``python benchmarks/selection.py [--quick] [--no-with-int4] [--package DIR] [--package-int4 DIR]``
(needs the EfficientNet-Lite0 IR cached in ``benchmarks/results/.cache`` or the wheels named in
``benchmarks/real_models.py``). Packages are written under a fresh ``/tmp/apsq-selection-*`` folder
(named in the JSON) so a later run can reuse them with ``--package`` / ``--package-int4``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from selection_report import ALL_PRECISIONS, int4_findings, level_summary, print_levels, write  # noqa: E402

import apsq_ov  # noqa: E402
from apsq_ov.bench import LATENCY, hint_not_honoured  # noqa: E402
from apsq_ov.calibrate import CalibrationConfig, calibrate  # noqa: E402
from apsq_ov.precision import Precision  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
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
    int4_drop_samples_reduced: int = 100  # the int4 calibration's drop_samples if the run would pass the budget
    time_budget_s: float = 25 * 60


QUICK = Settings(
    calib_crops=96,
    sensitivity_samples=16,
    drop_samples=48,
    quality_crops=60,
    rounds=2,
    runs_per_round=20,
    warmup=5,
    int4_drop_samples_reduced=24,
)
REST_OF_RUN_S = 300.0  # rough cost of everything after the calibrations (NNCF, compiles, timing, quality)


@dataclass
class Config:
    """One measured configuration.

    :param request: the raw OpenVINO request, inputs and routing state already set (timed with ``infer()``).
    :param run: one inference on a crop → (logits, route codes or None), for the quality pass.
    """

    name: str
    kind: str  # "plain" | "level" | "escalate" | "full" | "api" | "bf16-level"
    request: ov.InferRequest
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    routed_ops: int = 0
    note: str = ""
    fast_codes: dict[int, int] = field(default_factory=dict)  # route column → code of its fast variant
    samples_ms: list[float] = field(default_factory=list)
    round_medians_ms: list[float] = field(default_factory=list)
    quality_timed: bool = True
    package: str = ""  # "" (plain) | "main" | "int4"
    level: int | None = None
    predicted_ms: float | None = None


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def run_calibration(
    model: Path,
    data: Path,
    out: Path,
    s: Settings,
    precisions: tuple[Precision, ...] | None = None,
    drop_samples: int | None = None,
) -> tuple[apsq_ov.Package, float, dict]:
    config = CalibrationConfig(
        precisions=precisions,
        subset_size=s.calib_crops,
        sensitivity_samples=s.sensitivity_samples,
        drop_samples=drop_samples or s.drop_samples,
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
        busy0, _ = _cpu_times()
        own0 = _own_cpu_s()
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's own progress bars
            pkg = calibrate(model, data, out, config, progress=progress)
        t1 = time.perf_counter()
        busy1, _ = _cpu_times()
        own1 = _own_cpu_s()
        wall = t1 - t0
    phase_s = {p: round(v["end"] - v["start"], 2) for p, v in phases.items()}
    # Time outside the reported phases: model read, variant build, escalation probe and the ILP selection
    # (between "isolated drops" and "build package IR"), writing the package (after the last phase).
    gaps: dict[str, float] = {}
    prev = t0
    for p, v in phases.items():  # dicts keep insertion order = phase order
        gaps[f"before {p}"] = round(v["start"] - prev, 2)
        prev = v["end"]
    gaps["after last phase (write package)"] = round(t1 - prev, 2)
    return (
        pkg,
        wall,
        {
            "config": {k: str(v) for k, v in vars(config).items()},
            "phase_seconds": phase_s,
            "unreported_seconds": gaps,
            "package_dir": str(out),
            # CPU use during the calibration, in CPUs: this process (all its threads) and everything else.
            "own_cpus": round((own1 - own0) / wall, 2),
            "other_cpus": round(((busy1 - busy0) / _CLK_TCK - (own1 - own0)) / wall, 2) if busy1 > busy0 else None,
        },
    )


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

    return Config(name, "plain", timed, run, note=f"{hint} hint{hint_not_honoured(compiled, hint)}")


def package_configs(
    pkg: apsq_ov.Package, x: np.ndarray, *, tag: str = "main", extras: bool = True
) -> tuple[list[Config], dict[str, Any]]:
    """Configurations of one package: every level; with ``extras`` also escalate=3e38, the all-bf16 level,
    max_drop=1 on a separate request, the fully routed body and the API row. ``tag`` names the package."""
    m = pkg.manifest
    prefix = "apsq" if tag == "main" else "apsq+int4"
    compiled = apsq_ov.compile_model(pkg, "CPU", LATENCY)
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

        return Config(name, kind, timed.request, run, routed, note, fast or {}, package=tag)

    def level_fast(k: int) -> dict[int, int]:
        lv = m.levels[k]
        return {route_col[n]: lv.choices[n].fast.code for n in lv.routed}

    def leveled(c: Config, k: int) -> Config:
        c.level, c.predicted_ms = k, m.levels[k].predicted_ms
        return c

    configs = []
    for k, lv in enumerate(m.levels):
        dflt = " (default)" if k == m.default_level else ""
        configs.append(
            leveled(
                make(
                    f"{prefix} level {k}: max_drop={lv.max_drop:g}{dflt}",
                    "level",
                    {"max_drop": lv.max_drop},
                    len(lv.routed),
                    f"level {k}",
                    level_fast(k),
                ),
                k,
            )
        )
    d = m.default_level
    bf16_levels = [
        k for k, lv in enumerate(m.levels)
        if all(c.fast is Precision.BF16 and not c.routed for c in lv.choices.values())
    ]  # fmt: skip
    info["all_bf16_levels"] = bf16_levels
    if not extras:
        top = compiled.plan(max_drop=1.0).level
        info["max_drop_1_level"] = top
        info["compiled"] = compiled
        return configs, info
    if bf16_levels:
        k = bf16_levels[-1]
        configs.append(
            leveled(
                make(
                    f"apsq all-bf16 level equivalent (level {k}, max_drop={m.levels[k].max_drop:g})",
                    "bf16-level",
                    {"max_drop": m.levels[k].max_drop},
                    0,
                    f"level {k}: every op static bf16",
                ),
                k,
            )
        )
    else:
        most = max(
            range(len(m.levels)), key=lambda k: sum(c.fast is Precision.BF16 for c in m.levels[k].choices.values())
        )
        n_bf16 = sum(c.fast is Precision.BF16 for c in m.levels[most].choices.values())
        info["all_bf16_skipped"] = (
            f"no level is all-bf16 (most bf16: level {most}, {n_bf16} of {len(m.ops)} ops); row skipped"
        )
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
    info["max_drop_1_level"] = top
    configs.append(
        leveled(
            make(
                f"apsq infer(max_drop=1) → level {top} (separate request)",
                "level",
                {"max_drop": 1.0},
                len(m.levels[top].routed),
                f"level {top}",
                level_fast(top),
            ),
            top,
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
    api_cfg.package = tag
    api_x = x

    class _ApiTimed:  # duck-types ov.InferRequest.infer() for the timing loop
        def infer(self) -> None:
            api.infer(api_x)

    api_cfg.request = _ApiTimed()  # type: ignore[assignment]
    configs.append(api_cfg)
    info["compiled"] = compiled
    return configs, info


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat (0, 0 where it is unreadable)."""
    try:
        f = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    idle = f[3] + (f[4] if len(f) > 4 else 0.0)
    return sum(f) - idle, sum(f)


_CLK_TCK = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def _own_cpu_s() -> float:
    """CPU seconds this process (every thread) has used."""
    t = os.times()
    return t.user + t.system


def cpu_busy(seconds: float) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (this process sleeps meanwhile, so it is other load)."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else None


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until other processes keep the CPUs < ``threshold`` busy over 3 s."""
    t0 = time.perf_counter()
    seen = []
    with console.status("waiting for the other processes' CPU load to drop before timing"):
        while True:
            busy = cpu_busy(3.0)
            seen.append(busy)
            if busy is None or busy < threshold or time.perf_counter() - t0 > max_wait_s:
                break
    return {
        "waited_s": round(time.perf_counter() - t0, 1),
        "other_load_last": seen[-1],
        "other_load_max_seen": max((v for v in seen if v is not None), default=None),
        "quiet": seen[-1] is not None and seen[-1] < threshold,
        "threshold": threshold,
    }


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


def checks(configs: list[Config], med: dict[str, float], q: dict[str, dict[str, Any]], levels: dict) -> list[str]:
    """Things that look wrong: a level slower than a coarser (smaller max_drop) one by > 3 %, measured vs
    predicted latency off by > 25 %, top-1 disagreement above the level's budget by > 2 sigma, the separate
    max_drop=1 request off its level row by > 5 %."""
    out: list[str] = []
    for tag in ("main", "int4"):
        rows = sorted(
            (c for c in configs if c.package == tag and c.kind == "level" and "separate request" not in c.name),
            key=lambda c: c.level,
        )
        for i, c in enumerate(rows):
            slower_than = [b for b in rows[:i] if med[c.name] > 1.03 * med[b.name]]
            if slower_than:
                b = min(slower_than, key=lambda b: med[b.name])
                out.append(
                    f"[{tag}] level {c.level} ({med[c.name]:.2f} ms) is slower than coarser level {b.level} "
                    f"({med[b.name]:.2f} ms) by {100 * (med[c.name] / med[b.name] - 1):.0f}%"
                )
            if c.predicted_ms:
                r = med[c.name] / c.predicted_ms
                if not 0.8 <= r <= 1.25:
                    out.append(
                        f"[{tag}] level {c.level}: measured {med[c.name]:.2f} ms vs predicted {c.predicted_ms:.2f} ms "
                        f"(measured/predicted {r:.2f})"
                    )
            lv = levels[tag][c.level]
            agree = q.get(c.name, {}).get("top1_agreement")
            n = q.get(c.name, {}).get("n") or 1
            budget = lv["max_drop"]
            if agree is not None and budget < 1:
                dis = 1 - agree
                sigma = math.sqrt(max(budget, 1 / n) * (1 - min(budget, 0.5)) / n)
                if dis > budget + 2 * sigma:
                    out.append(
                        f"[{tag}] level {c.level}: top-1 disagreement {100 * dis:.1f}% on fresh crops > budget "
                        f"{100 * budget:g}% (+2σ = {100 * (budget + 2 * sigma):.1f}%)"
                    )
    lvl = {tag: {c.level: c for c in configs if c.package == tag and c.kind == "level" and "separate" not in c.name}
           for tag in ("main", "int4")}  # fmt: skip
    if 0 in lvl["main"] and med[lvl["main"][0].name] > 1.03 * med["plain FP32"]:
        a = lvl["main"][0]
        out.append(
            f"level 0 (every op static fp32) {med[a.name]:.2f} ms vs plain FP32 {med['plain FP32']:.2f} ms: "
            f"level-body overhead {100 * (med[a.name] / med['plain FP32'] - 1):.0f}%"
        )
    for tag in ("main", "int4"):
        top = max(lvl[tag], default=None)
        if top is not None and med[lvl[tag][top].name] > 1.10 * med["plain NNCF INT8"]:
            a = lvl[tag][top]
            out.append(
                f"[{tag}] top level {top} (max_drop=1, all int8/bf16/int4) {med[a.name]:.2f} ms vs plain NNCF INT8 "
                f"{med['plain NNCF INT8']:.2f} ms (+{100 * (med[a.name] / med['plain NNCF INT8'] - 1):.0f}%)"
            )
    for c in configs:
        if "separate request" in c.name:
            twin = next(
                (
                    b
                    for b in configs
                    if b.package == c.package and b.kind == "level" and b.level == c.level and b is not c
                ),
                None,
            )
            if twin and abs(med[c.name] / med[twin.name] - 1) > 0.05:
                out.append(f"{c.name}: {med[c.name]:.2f} ms vs its level row {med[twin.name]:.2f} ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller calibration, quality set and timing")
    parser.add_argument("--package", type=Path, help="reuse this calibrated package (debugging: no calibration)")
    parser.add_argument(
        "--with-int4",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also calibrate with precisions fp32, bf16, int8, int4 and compare (default: on)",
    )
    parser.add_argument("--package-int4", type=Path, help="reuse this calibrated int4 package")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=180.0,
        help="before timing, wait up to this many seconds for other processes' CPU load to drop (default 180)",
    )
    args = parser.parse_args()
    s = QUICK if args.quick else Settings()
    from real_models import efficientnet_lite0_ir, photo_crops

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="apsq-selection-"))
    console.print(f"work folder (packages kept for --package / --package-int4): {work}")
    model_path = efficientnet_lite0_ir(RESULTS / ".cache")
    with console.status("making photo crops"):
        calib = photo_crops(s.calib_crops, seed=0)
        fresh = photo_crops(s.quality_crops, seed=1)
    np.savez(work / "calib.npz", inputs=calib)

    console.rule(f"calibrate EfficientNet-Lite0 on {s.calib_crops} crops (profile default precisions)")
    if args.package:
        pkg, calib_wall = apsq_ov.Package.load(args.package), float("nan")
        calib_info: dict[str, Any] = {"reused": str(args.package), "phase_seconds": {}, "unreported_seconds": {}}
    else:
        pkg, calib_wall, calib_info = run_calibration(model_path, work / "calib.npz", work / "pkg", s)
    calib_info["precisions"] = [p.value for p in pkg.manifest.precisions]
    console.print(f"calibration wall time: {calib_wall:.1f} s  phases: {calib_info['phase_seconds']}")
    m = pkg.manifest
    levels = level_summary(pkg)
    print_levels(f"{len(m.ops)} routable ops; levels (default = level {m.default_level})", levels)

    pkg4 = None
    calib4: dict[str, Any] = {}
    levels4: list[dict[str, Any]] = []
    if args.with_int4:
        console.rule("second calibration: precisions fp32, bf16, int8, int4")
        if args.package_int4:
            pkg4 = apsq_ov.Package.load(args.package_int4)
            calib4 = {"wall_seconds": float("nan"), "reused": str(args.package_int4), "phase_seconds": {},
                      "unreported_seconds": {}}  # fmt: skip
        else:
            elapsed = time.perf_counter() - t_start
            est = calib_wall if math.isfinite(calib_wall) else 500.0
            projected = elapsed + est + REST_OF_RUN_S
            drop4 = s.drop_samples
            note = None
            if projected > s.time_budget_s:
                drop4 = s.int4_drop_samples_reduced
                note = (
                    f"drop_samples reduced to {drop4} for the int4 package only: projected run "
                    f"{projected / 60:.1f} min (elapsed {elapsed:.0f} s + int4 calibration ≈ {est:.0f} s + rest ≈ "
                    f"{REST_OF_RUN_S:.0f} s) > {s.time_budget_s / 60:.0f} min"
                )
                console.print(f"[yellow]{note}[/yellow]")
            pkg4, wall4, calib4 = run_calibration(
                model_path, work / "calib.npz", work / "pkg_int4", s, precisions=ALL_PRECISIONS, drop_samples=drop4
            )
            calib4 |= {"wall_seconds": wall4, "drop_samples": drop4, "drop_samples_note": note}
            console.print(f"int4 calibration wall time: {wall4:.1f} s  phases: {calib4['phase_seconds']}")
        calib4["precisions"] = [p.value for p in pkg4.manifest.precisions]
        levels4 = level_summary(pkg4)
        print_levels(f"int4 package: levels (default = level {pkg4.manifest.default_level})", levels4)

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
            plain_config(core, "plain BF16 (bf16 hint)", fp32_model, "bf16", x),
            plain_config(core, "plain NNCF INT8", q_model, "f32", x),
        ]
        pkg_configs, info = package_configs(pkg, x)
        configs += pkg_configs
        info4: dict[str, Any] = {}
        if pkg4 is not None:
            cfg4, info4 = package_configs(pkg4, x, tag="int4", extras=False)
            configs += cfg4
    for c in configs:
        console.print(f"  {c.name}  [dim]{c.note}; routed ops {c.routed_ops}[/dim]")
    if "all_bf16_skipped" in info:
        console.print(f"[yellow]apsq all-bf16 level equivalent: {info['all_bf16_skipped']}[/yellow]")

    console.rule("latency")
    quiet = wait_for_quiet(args.quiet_wait)
    console.print(f"CPU load of other processes before timing: {quiet}")
    b0, t0 = _cpu_times()
    load0 = os.getloadavg()
    time_configs(configs, s)
    b1, t1 = _cpu_times()
    busy = (b1 - b0) / (t1 - t0) if t1 > t0 else None
    n_cpu = os.cpu_count() or 1
    contention = {
        **quiet,
        "cpus": n_cpu,
        "cpu_busy_during_timing": busy,
        "other_load_during_timing_cpus": None if busy is None else busy * n_cpu - 1.0,  # minus our 1 thread
        "loadavg_before_timing": load0,
        "loadavg_after_timing": os.getloadavg(),
    }
    console.print(f"CPU busy during timing: {busy}")
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
                "package": c.package,
                "level": c.level,
                "note": c.note,
                "median_ms": med[c.name],
                "predicted_ms": c.predicted_ms,
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

    def level_rows(tag: str) -> dict[int, Config]:
        return {
            c.level: c for c in configs if c.package == tag and c.kind == "level" and "separate request" not in c.name
        }

    for tag, lvs in (("main", levels), ("int4", levels4)):
        lr = level_rows(tag)
        for lv in lvs:
            c = lr.get(lv["index"])
            if c is not None:
                lv["measured_ms"] = med[c.name]
                lv["measured_over_predicted"] = med[c.name] / lv["predicted_ms"] if lv["predicted_ms"] else None
                lv["top1_agreement"] = q.get(c.name, {}).get("top1_agreement")

    int4: dict[str, Any] = {"enabled": bool(args.with_int4)}
    if pkg4 is not None:
        int4 |= int4_findings(pkg4, pkg, levels4)
        a = level_rows("main")[info["max_drop_1_level"]]
        b = level_rows("int4")[info4["max_drop_1_level"]]
        int4["max_drop_1"] = {
            "main": {"configuration": a.name, "median_ms": med[a.name], "top1_agreement": q[a.name]["top1_agreement"]},
            "int4": {"configuration": b.name, "median_ms": med[b.name], "top1_agreement": q[b.name]["top1_agreement"]},
            "int4_over_main": med[b.name] / med[a.name],
        }
    found = checks(configs, med, q, {"main": levels, "int4": levels4})
    noise = None
    if pkg4 is not None:  # same choices in both packages = the same level body compiled twice: timing noise
        same = [
            (a, b)
            for k, a in level_rows("main").items()
            if (b := level_rows("int4").get(k)) is not None
            and {n: (c.fast, c.safe) for n, c in m.levels[k].choices.items()}
            == {n: (c.fast, c.safe) for n, c in pkg4.manifest.levels[k].choices.items()}
        ]
        if same:
            diffs = [abs(med[b.name] / med[a.name] - 1) for a, b in same]
            noise = {"identical_levels": [a.level for a, _ in same], "max_rel_diff": max(diffs),
                     "mean_rel_diff": float(np.mean(diffs))}  # fmt: skip
    result = {
        "model": "EfficientNet-Lite0 (ImageNet-1k), static [1,3,224,224]",
        "quick": bool(args.quick),
        "settings": vars(s),
        "machine": {"cpu": platform.processor() or platform.machine(), "openvino": ov.__version__},
        "profile": {"name": m.profile.name, "source": getattr(m.profile, "source", None)},
        "latency_protocol": "1 thread, PERFORMANCE_HINT=LATENCY, INFERENCE_PRECISION_HINT=f32 (bf16 for plain BF16); "
        f"{s.warmup} warm-up runs, {s.rounds} interleaved rounds × {s.runs_per_round} runs of raw "
        "openvino.InferRequest.infer() on one fixed crop (photo_crops(…, seed=1)[0]), inputs and routing "
        "state set beforehand; median of round medians",
        "quality_protocol": f"top-1 agreement with plain FP32 on photo_crops({s.quality_crops}, seed=1)",
        "work_dir": str(work),
        "calibration": {"wall_seconds": calib_wall, "crops": s.calib_crops, **calib_info},
        "calibration_int4": {"crops": s.calib_crops, **calib4} if pkg4 is not None else None,
        "nncf_quantize_seconds": nncf_s,
        "routable_ops": len(m.ops),
        "route_ops": info["route_ops"],
        "default_level": m.default_level,
        "default_max_drop": m.default_max_drop,
        "escalate_state_present": info["escalate_state"],
        "all_bf16_levels": info["all_bf16_levels"],
        "all_bf16_row": info.get("all_bf16_skipped", "added"),
        "levels": levels,
        "levels_int4": levels4,
        "int4": int4,
        "selection_objective": m.selection.get("objective") if isinstance(m.selection, dict) else None,
        "configurations": rows,
        "checks": found,
        "cpu_contention": contention,
        "timing_noise_identical_bodies": noise,
        "total_seconds": time.perf_counter() - t_start,
    }
    write(result)


if __name__ == "__main__":
    main()
