"""``apsq-ov``: the command line (the only module that imports typer and rich).

Where it sits in the data flow: a thin shell over :mod:`apsq_ov.calibrate` (``calibrate``),
:mod:`apsq_ov.runtime` (``infer``), :mod:`apsq_ov.profiles` (``profile``), :mod:`apsq_ov.report`
(``report``) and :mod:`apsq_ov.demo` (``demo``, the embedded default). Every
:class:`~apsq_ov.errors.ApsqError` becomes one line on stderr and exit code 1; usage errors exit 2.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from apsq_ov.errors import ApsqError, ConfigError, DataError
from apsq_ov.package import Feature, Manifest
from apsq_ov.precision import Precision
from apsq_ov.report import op_rows, plot_score_vs_drop, score_vs_drop

app = typer.Typer(
    help="Adaptive precision scaling for CNN inference on OpenVINO: calibrate a model once, then route "
    "every input, operator by operator, between FP32, BF16/FP16 and INT8 variants.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
# Not a terminal (pipes, CI logs): rich would fold tables to 80 columns; op names need more.
out = Console(width=None if Console().is_terminal else 200)
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Turn ApsqError into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApsqError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _progress(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
        transient=False,
    )


def _phase_callback(progress: Progress) -> Callable[[str, int, int], None]:
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total)
        progress.update(tasks[phase], completed=done, total=total)

    return update


def _parse_max_drop(value: float | None) -> float | None:
    if value is not None and not (0.0 <= value <= 1.0):
        raise typer.BadParameter(f"{value} is outside [0, 1]", param_hint="--max-drop")
    return value


def _parse_precision(value: str | None) -> Precision | None:
    # An unknown name is bad input (exit 1 naming it), like an unknown name in --precisions.
    return None if value is None else Precision.parse(value)


def _load_precision_map(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read precision map {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f'{path}: expected an object {{"op name": "precision", ...}}')
    for v in data.values():
        Precision.parse(v)
    return data


@app.command()
@_user_errors
def calibrate(
    model: Annotated[Path, typer.Argument(help="Model file OpenVINO reads (IR .xml, .onnx, .tflite, .pdmodel).")],
    data: Annotated[Path, typer.Option("--data", help="Calibration .npz (keys = input names, or 'inputs') or .npy.")],
    out_dir: Annotated[
        Path | None, typer.Option("-o", "--output", help="Package directory [default: MODEL stem + .apsq].")
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Target device; selects the shipped profile (CPU: the one measured on a CPU like this "
            "machine's, else CPU; see `apsq-ov profile --list`). The package can be built for a device this "
            "machine lacks (GPU): measurements run on the CPU, costs come from the profile."
        ),
    ] = "CPU",
    profile: Annotated[
        str | None,
        typer.Option(help="Profile JSON file, or a shipped profile name (see `apsq-ov profile --list`)."),
    ] = None,
    precisions: Annotated[
        str | None, typer.Option(help="Variants to build, e.g. fp32,bf16,int8 [default: the profile's].")
    ] = None,
    subset_size: Annotated[int, typer.Option(min=1, help="Calibration samples for NNCF (as nncf.quantize).")] = 300,
    max_drop: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Default policy written into the IR: tolerated loss vs FP32.")
    ] = 0.01,
    sensitivity: Annotated[
        str,
        typer.Option(
            help="Sensitivity metric: qdfd (each op's own quantization error pushed through the network, read "
            "as the output KL), task (the same, read as the task metric against the data's labels: accuracy, "
            "or CER for a CTC output), qnoise (RDFD gradient x local error, cheaper) or fd-gradient (priors)."
        ),
    ] = "qdfd",
    sensitivity_samples: Annotated[
        int, typer.Option(min=1, help="Samples of the scoring split (the sensitivity score is measured on them).")
    ] = 64,
    drop_samples: Annotated[
        int, typer.Option(min=1, help="Samples of the held-out split each isolated drop is measured on.")
    ] = 200,
    seed: Annotated[int, typer.Option(help="Seed for the calibration subset and the FD directions.")] = 0,
    levels: Annotated[
        str | None,
        typer.Option(
            help="Max-drop levels of the dial, e.g. 0,0.005,0.01,0.02,1: one statically compiled body each "
            "(requests pick the largest level <= their max_drop) [default: 0, 1/4, 1/2, 1, 2, 4 x --max-drop, 1]."
        ),
    ] = None,
    latency_budget: Annotated[
        float | None,
        typer.Option(min=0.0, help="Cap (ms) on each level's predicted latency from the profile's cost model."),
    ] = None,
    router: Annotated[
        bool,
        typer.Option(
            help="Fit the per-input router and build the escalation cascade: run the fastest level, re-run "
            "inputs whose in-graph risk exceeds the max-drop's threshold on FP32 (needs int8)."
        ),
    ] = True,
    router_shifts: Annotated[
        str,
        typer.Option(help="Shifted copies of the calibration data the router is also fitted on (comma list; "
                     "noise, dark, contrast, blur, or 'none')."),  # fmt: skip
    ] = "noise,dark,contrast,blur",
    router_features: Annotated[
        str | None,
        typer.Option(help="Features the router may use (comma list of margin, amax_ratio, clip_frac, std_over_step, "
                     "nearzero_frac) [default: all; 'margin' = plain output-margin escalation]."),  # fmt: skip
    ] = None,
    router_hold: Annotated[
        str,
        typer.Option(help="Where each max-drop's escalation threshold must keep the budget: 'clean' (the "
                     "calibration data: the budget means what it says on data like yours) or 'shifts' "
                     "(also on each --router-shifts copy: more escalation, the budget kept under those "
                     "shifts)."),  # fmt: skip
    ] = "clean",
    bias_correction: Annotated[
        str,
        typer.Option(help="NNCF bias correction for the INT8 variants: 'full' (re-estimated on the quantized "
                     "model: slower calibration, INT8 closer to FP32) or 'fast' (NNCF's default)."),  # fmt: skip
    ] = "full",
    activation_ranges: Annotated[
        str,
        typer.Option(help="How NNCF sets the INT8 activation ranges: 'minmax' (NNCF's default), 'histogram' "
                     "(clips rare extremes), or 'auto': quantize with both and keep the INT8 model whose judged "
                     "output is closer to FP32 on held-out calibration data (one more nncf.quantize; the choice "
                     "is in the manifest's calibration.activation_ranges)."),  # fmt: skip
    ] = "auto",
    overflow_fix: Annotated[
        str,
        typer.Option(help="Which weights NNCF quantizes to 7 bits against the saturation of 8-bit dot products "
                     "on pre-VNNI CPUs: 'auto' (every layer's where the device's INT8 hardware can saturate, "
                     "none on VNNI/AMX CPUs and GPUs), 'all', 'first-layer' (NNCF's default) or 'none'."),  # fmt: skip
    ] = "auto",
    class_axis: Annotated[
        int | None,
        typer.Option(help="Axis of the judged output that holds the classes, whose top-1 every drop compares "
                     "(default: the last, as in a classifier or a CTC sequence). E.g. 1 for an (N, C, H, W) "
                     "segmentation or detection map; a one-class axis is read as a binary decision "
                     "(probability > 0.5, or logit > 0)."),  # fmt: skip
    ] = None,
    judged_output: Annotated[
        str | None,
        typer.Option(help="The output every drop, the router and the scores judge: a tensor name or an index "
                     "(default: the first). Give a detector's class scores, not its box regressions: a top-1 "
                     "over box coordinates means nothing."),  # fmt: skip
    ] = None,
    ctc: Annotated[
        bool | None,
        typer.Option("--ctc/--no-ctc", help="Judge a (N, T, classes) output as a CTC path (class 0 the blank): "
                     "every drop, the router's label and --max-drop count the character error rate of the greedy "
                     "decode against FP32's text, not the time steps whose top-1 moved (most are blanks and "
                     "repeats). Default: on where the calibration labels are CTC label rows (N, L)."),  # fmt: skip
    ] = None,
) -> None:
    """Score, build and package an adaptive model: MODEL + --data -> OUT_DIR (model.xml/.bin + apsq.json).

    Per level of the dial, an integer program picks each op's precision (or per-input routing where it
    pays its If cost) from the measured drops and the device profile; ops whose choice never changes are
    compiled statically.
    """
    from apsq_ov.calibrate import CalibrationConfig, SensitivityMetric
    from apsq_ov.calibrate import calibrate as run_calibration
    from apsq_ov.precision import parse_precisions

    config = CalibrationConfig(
        device=device,
        profile=profile,
        precisions=parse_precisions(precisions) if precisions else None,
        subset_size=subset_size,
        max_drop=max_drop,
        sensitivity=SensitivityMetric.parse(sensitivity),
        sensitivity_samples=sensitivity_samples,
        drop_samples=drop_samples,
        seed=seed,
        levels=_parse_levels(levels),
        latency_budget_ms=latency_budget,
        router=router,
        router_shifts=tuple(x.strip() for x in router_shifts.split(",") if x.strip() and x.strip() != "none"),
        router_features=_parse_features(router_features),
        router_hold=router_hold,
        bias_correction=bias_correction,
        activation_ranges=activation_ranges,
        overflow_fix=overflow_fix,
        class_axis=class_axis,
        judged_output=judged_output,
        ctc=ctc,
    )
    target = out_dir or model.with_suffix(".apsq")
    _warn_foreign_profile(device, profile)
    t0 = time.perf_counter()
    with _progress() as progress:
        package = run_calibration(model, data, target, config, progress=_phase_callback(progress))
    m = package.manifest
    table = Table(title=f"apsq-ov package {package.path}")
    for col in ("op", "type", "score", *[f"drop {p.value}" for p in m.precisions if p is not Precision.FP32]):
        table.add_column(col)
    for op in m.ops:
        drops = [f"{op.drops[p]:.3f}" if p in op.drops else "-" for p in m.precisions if p is not Precision.FP32]
        table.add_row(escape(op.name), op.type, f"{op.score:.2e}", *drops)
    out.print(table)
    out.print(f"{len(m.ops)} routable ops, default max-drop {m.default_max_drop}, {time.perf_counter() - t0:.1f} s")
    out.print(f"drops compare {_decision_text(m)} with FP32's (--judged-output, --class-axis, --ctc)")
    if "activation_ranges_nmse" in m.calibration:
        nmse = ", ".join(f"{k} {v:.3g}" for k, v in m.calibration["activation_ranges_nmse"].items())
        out.print(f"INT8 activation ranges: {m.calibration['activation_ranges']} (judged output's NMSE vs FP32 on "
                  f"{m.calibration['activation_ranges_checked_on']} held-out samples: {nmse})")  # fmt: skip
    out.print(_levels_table(m))
    _print_router(m)


def _warn_foreign_profile(device: str, profile: str | None) -> None:
    """Say so when the CPU profile calibration will cost ops with was measured on another CPU, and
    which shipped profile (or `apsq-ov profile`) describes this one."""
    from apsq_ov.profiles import host_mismatch, host_profiles, load_profile

    chosen = load_profile(device, profile)
    why = host_mismatch(chosen)
    if why is None:
        return
    ours = host_profiles()
    fix = (f"--profile {ours[0]} (shipped, measured on this CPU)" if ours
           else "`apsq-ov profile -o FILE` then --profile FILE")  # fmt: skip
    out.print(f"[yellow]warning:[/] profile {escape(chosen.source)} was measured on another CPU ({escape(why)}); "
              f"its per-op costs may not hold here: use {fix}")  # fmt: skip


def _decision_text(m: Manifest) -> str:
    """What a drop counts: top-1 flips over which axis of which output (or binary decisions)."""
    d, name = m.decision, escape(m.judged_output)
    axis = "the last axis" if d.class_axis == -1 else f"axis {d.class_axis}"
    if d.sequence == "ctc":
        return f"the text {name} decodes to (greedy CTC; character error rate)"
    if d.binary is None:
        return f"the top-1 over {axis} of {name}"
    rule = "> 0.5" if d.binary == "probability" else "> 0 (a logit)"
    return f"the binary decision {name} {rule} ({axis} holds one class) at every position"


def _parse_features(text: str | None) -> tuple[Feature, ...] | None:
    if not text:
        return None
    try:
        return tuple(Feature(x.strip()) for x in text.split(",") if x.strip())
    except ValueError as exc:
        names = ", ".join(f.value for f in Feature)
        raise ConfigError(f"--router-features {text!r}: use a comma list of {names}") from exc


def _parse_levels(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"--levels {text!r}: expected comma-separated numbers in [0, 1]") from exc


def _levels_table(m: Manifest) -> Table:
    default = "the cascade" if m.default_level == m.cascade_level else f"level {m.default_level}"
    table = Table(title=f"dial levels (profile {m.profile.name}; default: {default})")
    cols = ("level", "max_drop", "fp32", "bf16/fp16", "int8", "routed per input", "pred. ms", "measured ms",
            "pred. drop", "meas. drop")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for i, lv in enumerate(m.levels):
        static = [c.fast for c in lv.choices.values() if not c.routed]
        count = {p: sum(1 for x in static if x is p) for p in Precision}
        measured = "-" if lv.measured_ms is None else f"{lv.measured_ms:.3f}"
        table.add_row(str(i), f"{lv.max_drop:g}", str(count[Precision.FP32]),
                      str(count[Precision.BF16] + count[Precision.FP16]), str(count[Precision.INT8]),
                      str(len(lv.routed)), f"{lv.predicted_ms:.3f}", measured, f"{lv.predicted_drop:.4f}",
                      "-" if lv.measured_drop is None else f"{lv.measured_drop:.4f}")  # fmt: skip
    return table


def _print_router(m: Manifest) -> None:
    """The router: its terms, held-out AUCs, in-graph cost, and the cascade against the static level per budget."""
    r = m.router
    if r is None:
        out.print(f"router: {m.router_note or 'none'}", highlight=False)
        return
    q, c = r.quality, r.cost

    def auc(v: float | None) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    terms = " + ".join(f"{t.weight:+.3f}·log({t.feature.value}{'' if t.op is None else ' of ' + t.op})"
                       for t in r.terms)  # fmt: skip
    out.print(f"router: risk = {r.bias:+.3f} {terms}", highlight=False)
    shifts = ", ".join(f"{k} {auc(v)}" for k, v in q.get("auc_held_out_by_shift", {}).items())
    out.print(f"  held-out AUC for '{q.get('label')}': {auc(q.get('auc_held_out'))} ({shifts}); "
              f"margin alone {auc(q.get('auc_held_out_margin_only'))}, op features alone "
              f"{auc(q.get('auc_held_out_op_features_only'))}; {q.get('rows_held_out')} held-out rows, "
              f"flip rate {q.get('flip_rate_held_out', 0):.3f}; fitted with shifts {', '.join(r.shifts) or 'none'}",
              highlight=False)  # fmt: skip
    cost = f"{c.get('element_passes', 0):.0f} element passes"
    if "measured_router_ms" in c:
        cost += (f"; measured: fast route {c['measured_fast_ms']:.3f} ms, with the router {c['measured_never_ms']:.3f}"
                 f" ms, always escalating {c['measured_always_ms']:.3f} ms")  # fmt: skip
    out.print(f"  in-graph cost: {cost}", highlight=False)
    table = Table(title=f"escalation cascade: level {r.fast_level}, re-run on level {r.precise_level} when risk > τ; "
                  f"each τ keeps its budget on: {', '.join(r.hold)} (escalated, drop: clean calibration inputs)")
    for col in ("max_drop", "τ", "escalated", "pred. drop", "cascade ms", "static level ms"):
        table.add_column(col, justify="right")
    from apsq_ov.routing import fastest_level, level_ms

    for p in r.points:
        static = level_ms(m.levels[fastest_level(m.levels, p.max_drop)])
        tau = "never" if p.tau >= 3.0e38 else "always" if p.tau <= -3.0e38 else f"{p.tau:.3f}"
        table.add_row(f"{p.max_drop:g}", tau, f"{p.escalation:.3f}", f"{p.predicted_drop:.4f}", f"{p.ms:.3f}",
                      f"{static:.3f}")  # fmt: skip
    out.print(table)


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command()
@_user_errors
def infer(
    package: Annotated[Path, typer.Argument(help="Package directory written by apsq-ov calibrate.")],
    input: Annotated[Path, typer.Option("--input", help="Input .npz (keys = input names, or 'inputs') or .npy.")],
    device: Annotated[str, typer.Option(help="OpenVINO device to run on.")] = "CPU",
    max_drop: Annotated[
        float | None, typer.Option(help="Tolerated quality loss vs FP32 in [0, 1] [default: the package's].")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="Force one precision on every routed op (baselines).")] = None,
    policy: Annotated[
        str,
        typer.Option(help="How --max-drop picks a body: auto (the faster of the static level and the router's "
                     "cascade for that budget), static, or cascade."),  # fmt: skip
    ] = "auto",
    precision_map: Annotated[
        Path | None, typer.Option(help='JSON {"op name": "int8", ...}: pin ops; the rest follow the policy.')
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write outputs, route, route_ops, precisions, latency_ms.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout only.")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="INFERENCE_NUM_THREADS (1 for latency studies).")] = None,
) -> None:
    """Run a package on every sample of --input, routing each sample per operator."""
    from apsq_ov.inputs import load_arrays, match_inputs
    from apsq_ov.runtime import compile_model

    max_drop = _parse_max_drop(max_drop)
    forced = _parse_precision(precision)
    if forced is not None and max_drop is not None:
        raise typer.BadParameter("give --max-drop or --precision, not both", param_hint="--precision")
    pins = _load_precision_map(precision_map)
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    if policy not in ("auto", "static", "cascade"):
        raise typer.BadParameter(f"{policy!r}: use auto, static or cascade", param_hint="--policy")
    # The body this policy runs is compiled on its own (no dispatch If around it).
    compiled = compile_model(package, device, config, standalone={"max_drop": max_drop, "precision": forced,
                                                                  "precision_map": pins, "policy": policy})  # fmt: skip
    samples = match_inputs(load_arrays(input), compiled.inputs, source=str(input), require_finite=False)
    batch = compiled.manifest.batch
    if len(samples) % batch:
        raise DataError(f"{input}: {len(samples)} samples is not a multiple of the package's batch {batch}")
    request = compiled.create_infer_request()
    plan = request.set_policy(max_drop=max_drop, precision=forced, precision_map=pins, policy=policy)  # validates
    outputs: dict[str, list[np.ndarray]] = {n: [] for n in compiled.output_names}
    routes, latency, nonfinite, escalated = [], [], [], []
    n = len(samples) // batch
    with _progress(quiet=json_out) as progress:
        task = progress.add_task("infer", total=n)
        for i in range(n):
            x = samples.sample(i, batch)
            t0 = time.perf_counter()
            res = request.infer(x, max_drop=max_drop, precision=forced, precision_map=pins, policy=policy)
            latency.append((time.perf_counter() - t0) * 1e3)
            for name, value in res.outputs.items():
                outputs[name].append(value)
            routes.append(res.route)
            nonfinite.append(res.nonfinite)
            escalated.append(res.escalated)
            progress.advance(task)
    stacked = {name: np.concatenate(v) for name, v in outputs.items()}
    route = np.stack(routes).astype(np.int8)
    lat = np.asarray(latency)
    summary = _infer_summary(compiled, stacked, route, lat, samples.labels, nonfinite)
    if any(e is not None for e in escalated):
        summary["escalated"] = float(np.mean([bool(e) for e in escalated]))
    summary.update({"package": str(package), "input": str(input), "device": device,
                    "policy": {"max_drop": max_drop, "precision": None if forced is None else forced.value,
                               "precision_map": pins, "policy": policy},
                    "body": _body_name(compiled.manifest, plan.level)})  # fmt: skip
    if output is not None:
        arrays = dict(stacked)
        arrays.update(
            route=route,
            route_ops=np.array(compiled.route_ops),
            precisions=np.array([f"{p.code}:{p.value}" for p in Precision]),
            latency_ms=lat,
            nonfinite=np.asarray(nonfinite, dtype=bool),
        )
        _write_npz_atomic(output, arrays)
        summary["output"] = str(output)
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=1) + "\n")
        return
    _print_infer_summary(summary)


def _body_name(m: Manifest, level: int) -> str:
    if level == m.cascade_level:
        return "cascade"
    return "full" if level == m.full_level else f"level {level}"


def _infer_summary(compiled, outputs, route, lat, labels, nonfinite) -> dict[str, Any]:
    decision = compiled.manifest.decision
    first = decision.pick(list(outputs.values()))  # the output calibration judged
    summary: dict[str, Any] = {
        "samples": int(route.shape[0]),
        "median_latency_ms": float(np.median(lat)),
        "route_ops": compiled.route_ops,
        "nonfinite_inputs": int(np.sum(nonfinite)),
        "nonfinite_indices": [int(i) for i in np.flatnonzero(nonfinite)[:1000]],
    }
    scores = decision.scores(first)  # a one-logit classifier: the decision logit > 0
    if labels is not None and scores.ndim == 2 and len(labels) == len(first):
        summary["accuracy"] = float(np.mean(scores.argmax(axis=1) == labels))
    patterns = collections.Counter(tuple(int(c) for c in r) for r in route)
    names = {p.code: p.value for p in Precision}
    summary["route_patterns"] = [
        {"route": [names[c] for c in pat], "fraction": cnt / route.shape[0]} for pat, cnt in patterns.most_common(5)
    ]
    summary["distinct_routes"] = len(patterns)
    summary["per_op"] = {
        op: {names[int(c)]: float(np.mean(route[:, j] == c)) for c in np.unique(route[:, j])}
        for j, op in enumerate(compiled.route_ops)
    }
    return summary


def _print_infer_summary(s: dict[str, Any]) -> None:
    acc = f", accuracy {s['accuracy']:.4f}" if "accuracy" in s else ""
    esc = f", {s['escalated']:.1%} escalated by the router" if "escalated" in s else ""
    out.print(f"{s['samples']} samples on {s['body']}, median latency {s['median_latency_ms']:.3f} ms{acc}, "
              f"{s['distinct_routes']} distinct routes{esc}")  # fmt: skip
    table = Table(title="most frequent routes (one column per routed op)")
    table.add_column("fraction", justify="right")
    table.add_column("route")
    for pat in s["route_patterns"]:
        table.add_row(f"{pat['fraction']:.3f}", " ".join(pat["route"]))
    out.print(table)
    if s["nonfinite_inputs"]:
        out.print(f"{s['nonfinite_inputs']} inputs held NaN/Inf and ran at fp32 everywhere")
    if "output" in s:
        out.print(f"wrote {s['output']}")


@app.command()
@_user_errors
def report(
    package: Annotated[Path, typer.Argument(help="Package directory.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the per-op table as JSON.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG: sensitivity score vs measured isolated drop.")
    ] = None,
) -> None:
    """Show each routed op: sensitivity components and score, measured isolated drop per precision
    (on the held-out split), variants and its place in the default level; then every level of the dial."""
    from apsq_ov.package import Package

    pkg = Package.load(package)
    m = pkg.manifest
    rt = m.router
    rows = op_rows(m)
    spearman = score_vs_drop(rows)
    if plot is not None:
        plot_score_vs_drop(rows, plot, title=f"{package.name}: {m.sensitivity.get('metric')}")
    if json_out:
        doc = {"package": str(package), "sensitivity": m.sensitivity, "calibration": m.calibration,
               "decision": {"judged": m.judged_output, **m.decision.to_json()},
               "spearman_score_vs_drop": spearman, "ops": rows, "selection": m.selection,
               "default_level": m.default_level, "levels": [lv.to_json() for lv in m.levels],
               "router": None if rt is None else rt.to_json(), "router_note": m.router_note}  # fmt: skip
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return
    lower = [p.value for p in m.precisions if p is not Precision.FP32]
    table = Table(title=f"{package} · {m.sensitivity.get('metric')} · default max-drop {m.default_max_drop}")
    for col in ("#", "op", "type", "depth", "gradient g", "clip", *[f"pred {p}" for p in lower]):
        table.add_column(col)
    for col in ("score", *[f"drop {p}" for p in lower], "variants", "default", "router feature (AUC)"):
        table.add_column(col)
    for r in rows:
        c = r["components"]
        clip = f"{c['clip_mse_ratio']:.1e}" if "clip_mse_ratio" in c else "-"
        preds = [f"{r['predicted'][p]:.2e}" if p in r["predicted"] else "-" for p in lower]
        drops = [f"{r['drops'][p]:.4f}" if p in r["drops"] else "-" for p in lower]
        head = [str(r["index"]), escape(r["name"]), r["type"], str(r["depth"]), f"{c.get('gradient', 0):.3f}", clip]
        feats = ", ".join(f"{f['feature']} ({f['auc_held_out']:.2f})" if f["auc_held_out"] is not None
                          else f["feature"] for f in r["router_features"]) or "-"  # fmt: skip
        table.add_row(*head, *preds, f"{r['score']:.2e}", *drops, ",".join(r["variants"]), r["default_route"], feats)
    out.print(table)
    held = "held-out" if m.calibration.get("drops_held_out") else "NOT held-out (too little data)"
    out.print(f"drop = {m.calibration.get('drop_metric')} on {m.calibration.get('drop_samples')} samples ({held}): "
              f"{_decision_text(m)}")  # fmt: skip
    for p, rho in spearman.items():
        value = "n/a (fewer than 3 ops or all equal)" if rho is None else f"{rho:.3f}"
        out.print(f"Spearman rho(score, drop {p}) = {value}")
    out.print(f"score: {m.sensitivity.get('formula')}", highlight=False)
    out.print(_levels_table(m))
    out.print(f"selection: {m.selection.get('objective')}", highlight=False)
    _print_router(m)
    if plot is not None:
        out.print(f"wrote {plot}")


THROUGHPUT_COLUMNS = {"": "inputs/s", ", in-graph escalation": "in-graph escalation",
                      ", engine": "its graph in OpenVINO's queue"}  # fmt: skip
"""``apsq_ov.bench.throughputs``' row suffixes and the column each goes to."""


def throughput_table(rates: dict[str, float]) -> Table:
    """``apsq_ov.bench.throughputs``' rates as a table: one row per configuration, budgets that run the same
    body (the same measured rates) in one row, each way of running it in its own column."""
    rows: dict[str, dict[str, float]] = {}
    for name, value in rates.items():
        base, col = name, ""
        for suffix in THROUGHPUT_COLUMNS:
            if suffix and name.endswith(suffix):
                base, col = name[: -len(suffix)], suffix
        rows.setdefault(base, {})[col] = value
    groups: dict[tuple[Any, ...], list[str]] = {}
    for base, values in rows.items():
        adaptive = base.startswith("apsq adaptive ")
        groups.setdefault(("apsq adaptive" if adaptive else base, *sorted(values.items())), []).append(base)
    table = Table(title="async throughput (clean data, all cores; median of interleaved rounds)")
    table.add_column("configuration")
    cols = [c for c in THROUGHPUT_COLUMNS if any(c in v for v in rows.values())]
    for c in cols:
        table.add_column(THROUGHPUT_COLUMNS[c], justify="right")
    for names in groups.values():
        label = names[0] if len(names) == 1 else "apsq adaptive " + " / ".join(n.split()[-1] for n in names)
        values = rows[names[0]]
        table.add_row(escape(label), *(f"{values[c]:.0f}" if c in values else "" for c in cols))
    return table


@app.command()
@_user_errors
def bench(
    package: Annotated[Path, typer.Argument(help="Package directory.")],
    data: Annotated[Path, typer.Option("--data", help="Test .npz/.npy (optional 'labels': quality = accuracy).")],
    shift: Annotated[
        list[str] | None,
        typer.Option(help="Also measure under this shift (repeatable): brightness, dark, contrast, low_contrast, "
                     "noise, blur, pixelate, salt_pepper. 'clean' is always measured."),  # fmt: skip
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N samples only.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout only.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Write a Pareto PNG per shift: FILE.png, FILE-<shift>.png (quality vs latency).")
    ] = None,
    throughput_seconds: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds of async throughput per method on clean data, in 6 interleaved "
                     "rounds (median reported; 0: skip)."),  # fmt: skip
    ] = 1.0,
    compiles: Annotated[
        int,
        typer.Option(min=1, help="Compile every model this many times and take the copies in turn: one graph "
                     "compiled twice can run several % apart, as much as INT8-class routes differ."),  # fmt: skip
    ] = 3,
) -> None:
    """Measure every configuration the package offers — FP32 level (f32 and bf16 hints), each static
    per-op mix, the cascade and the adaptive policy at each budget, forced precisions — on clean and
    shifted data: quality, median/mean latency (1 thread), async throughput and the Pareto front."""
    from apsq_ov import bench as bench_mod
    from apsq_ov.datasets import ctc_error_rate
    from apsq_ov.inputs import load_arrays, match_inputs
    from apsq_ov.package import Package
    from apsq_ov.shifts import SHIFTS

    shifts = ["clean", *[s for s in (shift or []) if s != "clean"]]
    for s in shifts[1:]:
        if s not in SHIFTS:
            raise typer.BadParameter(f"{s!r}: use one of {', '.join(SHIFTS)}", param_hint="--shift")
    pkg = Package.load(package)
    m = pkg.manifest
    if len(m.inputs) != 1 or m.batch != 1:
        raise ConfigError(f"{package}: bench runs single-input, batch-1 packages (this one: {len(m.inputs)} inputs, "
                          f"batch {m.batch})")  # fmt: skip
    samples = match_inputs(load_arrays(data), m.inputs, source=str(data), require_finite=True)
    x = samples.arrays[0][:limit]
    labels = None if samples.labels is None else np.asarray(samples.labels)[: len(x)]
    metric = "accuracy" if labels is not None else "agreement"
    task = None
    if labels is not None and labels.ndim == 2:  # class indices per position: a CTC sequence output, 1 − CER
        sequences, labels, metric = labels, None, "1 - CER"

        def task(y: np.ndarray, idx: np.ndarray) -> float:
            return 1.0 - ctc_error_rate(list(y), [sequences[i][None] for i in idx])

    result = bench_mod.run_suite(m.source_model.get("name", str(package)), pkg, None, {}, x, shifts, labels=labels,
                                 metric=metric, task=task, progress=None if json_out else out,
                                 throughput_s=throughput_seconds, compiles=compiles)  # fmt: skip
    key = bench_mod.row_key(metric)
    if plot is not None:
        for s, entry in result["shifts"].items():
            target = plot if s == "clean" else plot.with_name(f"{plot.stem}-{s}{plot.suffix or '.png'}")
            bench_mod.plot(entry["rows"], key, target, f"{package.name} · {s}")
            entry["plot"] = str(target)
    if json_out:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    print_bench(result, package)


def print_bench(result: dict[str, Any], package: Path, console: Console | None = None) -> None:
    """The tables ``apsq-ov bench`` prints from its ``result`` (as :func:`apsq_ov.bench.run_suite` returns it,
    or read back from ``--json``): per data set the rows by latency, the perfect-router bound, the dominance
    verdict and the throughput."""
    from apsq_ov import bench as bench_mod

    con = console or out
    key = bench_mod.row_key(result["metric"])
    for s, entry in result["shifts"].items():
        table = Table(title=f"{package} · {s} · {result['samples']} inputs · 1 thread · ★ Pareto front")
        for col in ("method", result["metric"], "agreement", "KL", "median ms", "mean ms", "escalated"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in sorted(entry["rows"], key=lambda r: r["median_ms"]):
            table.add_row(escape(r["name"]) + (" ★" if r.get("pareto") else ""), f"{100 * r[key]:.2f}",
                          f"{100 * r['agreement']:.2f}", f"{r['kl']:.4f}", f"{r['median_ms']:.3f}",
                          f"{r['mean_ms']:.3f}", f"{r['escalated']:.1%}" if "escalated" in r else "")  # fmt: skip
        con.print(table)
        bound = entry.get("perfect_router")
        if bound:
            best = max(bound["rows"], key=lambda r: (r[key], -r["median_ms"]))
            con.print(f"perfect-router bound (each static mix as the fast route, escalating exactly the inputs whose "
                      f"{bound.get('differs', 'top-1')} differs from {escape(bound['precise'])}'s): "
                      f"best {100 * best[key]:.2f} at "
                      f"{best['median_ms']:.3f} ms ({escape(best['name'])}); against the static mixes it "
                      + ("could win" if bound["possible"] else "could not win"))  # fmt: skip
        d = entry["dominance"]
        verdict = "holds" if d["holds"] else "does not hold"
        con.print(f"adaptive ({len(d['adaptive_points'])} cascade points of auto) vs the static mixes: {verdict}; "
                  f"adaptive points dominated {len({a for a, _ in d['adaptive_dominated_by']})}, rival points "
                  f"strictly dominated {len({b for _, b in d['adaptive_dominates']})}"
                  + "".join(f". {line}" for line in bench_mod.closest_lines(d, result["metric"])))  # fmt: skip
        if "throughput" in entry:
            con.print(throughput_table(entry["throughput"]))
        if "plot" in entry:
            con.print(f"wrote {entry['plot']}")


@app.command()
@_user_errors
def profile(
    device: Annotated[str, typer.Option(help="OpenVINO device to measure (CPU, GPU, GPU.1 ...).")] = "CPU",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the profile JSON here.")] = None,
    shipped: Annotated[
        bool,
        typer.Option("--shipped", help="Show the shipped profile --device uses (as calibrate picks it) instead of "
                     "measuring."),
    ] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the shipped profiles and exit.")] = False,
    quick: Annotated[bool, typer.Option(help="One point per op type, no throughput (a smoke run).")] = False,
    budget: Annotated[float, typer.Option(min=10.0, help="Wall-time budget of the measurement (s).")] = 150.0,
) -> None:
    """Measure DEVICE's Precision Profile: micro-benchmarks of Convolution, GroupConvolution and MatMul
    at representative sizes in every precision the device exposes, plus the cost of one routing If;
    energy from RAPL where readable, else an estimate (labelled). Use the result with
    `apsq-ov calibrate --profile FILE`. Takes about 2 minutes on a 2-core CPU.
    """
    from apsq_ov.profiles import DeviceProfile, default_profile_name, host_profiles, load_profile, shipped_profiles

    if list_:
        table = Table(title="shipped device profiles")
        for col in ("name", "device", "int8 hardware", "default precisions", "figures", "this CPU"):
            table.add_column(col)
        ours, cpu_default = set(host_profiles()), default_profile_name("CPU")
        for name in shipped_profiles():
            p = load_profile(path=name)
            kinds = sorted({pt.latency_ms.kind for row in p.points.values() for pts in row.values() for pt in pts})
            here = "yes" if name in ours else ("no" if p.device.upper().startswith("CPU") else "")
            here += " (--device CPU uses it)" if name == cpu_default else ""
            table.add_row(name, escape(p.name), p.int8_hardware, ",".join(x.value for x in p.default_precisions),
                          ",".join(kinds), here)  # fmt: skip
        out.print(table)
        return
    if shipped:
        data = load_profile(device).to_json()
    else:
        from apsq_ov.profiler import measure_profile

        with _progress() as progress:
            data = measure_profile(device, progress=_phase_callback(progress), budget_s=budget, quick=quick)
        DeviceProfile.from_json(data, source="measured profile")  # never write what apsq-ov cannot read
    text = json.dumps(data, indent=1)
    if output is not None:
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text + "\n")
            tmp.replace(output)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from exc
        out.print(f"wrote {output}")
        return
    sys.stdout.write(text + "\n")


@app.command()
@_user_errors
def demo(
    out_dir: Annotated[Path, typer.Option("-o", "--output", help="Where the package and results go.")] = Path(
        "apsq-demo"
    ),
    limit: Annotated[int, typer.Option(min=1, max=10000, help="Test images to run.")] = 10000,
    threads: Annotated[int, typer.Option(min=1, help="INFERENCE_NUM_THREADS for latency.")] = 1,
) -> None:
    """The embedded default: calibrate the bundled Fashion-MNIST ResNet and compare every precision
    on the real test set (accuracy and median latency, one process, same run)."""
    from apsq_ov.demo import run_demo

    _warn_foreign_profile("CPU", None)
    with _progress() as progress:
        result = run_demo(out_dir, limit=limit, threads=threads, progress=_phase_callback(progress))
    table = Table(title=f"Fashion-MNIST ResNet · {result['samples']} test images · {threads} thread(s), f32 hint")
    for col in ("configuration", "accuracy", "median ms", "vs FP32", "distinct routes", "escalated"):
        table.add_column(col, justify="right" if col != "configuration" else "left")
    for row in result["rows"]:
        table.add_row(row["name"], f"{row['accuracy']:.4f}", f"{row['median_ms']:.3f}", f"{row['ratio_vs_fp32']:.2f}x",
                      str(row.get("distinct_routes", "-")),
                      f"{row['escalated']:.1%}" if "escalated" in row else "-")  # fmt: skip
    out.print(table)
    out.print(f"package: {result['package']}  results: {result['results_file']}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
