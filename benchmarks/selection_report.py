"""What the per-level selection benchmark (``benchmarks/selection.py``) reports: each package level's
op counts per precision, the INT4 package's findings, and the results, written to
``results/selection.json`` and ``results/selection.md`` with the table printed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import apsq_ov
from apsq_ov.precision import Precision

RESULTS = Path(__file__).resolve().parent / "results"
ALL_PRECISIONS = (Precision.FP32, Precision.BF16, Precision.INT8, Precision.INT4)


def level_summary(pkg: apsq_ov.Package) -> list[dict[str, Any]]:
    m = pkg.manifest
    rows = []
    for i, lv in enumerate(m.levels):
        static = {p.value: 0 for p in ALL_PRECISIONS}
        for c in lv.choices.values():
            if not c.routed:
                static[c.fast.value] = static.get(c.fast.value, 0) + 1
        shared = {n: c.shared_with for n, c in lv.choices.items() if c.shared_with}
        int4_ops = {
            n: f"{c.fast.value}→{c.safe.value}" if c.routed else "static int4"
            for n, c in lv.choices.items()
            if Precision.INT4 in (c.fast, c.safe)
        }
        rows.append(
            {
                "index": i,
                "max_drop": lv.max_drop,
                "default": i == m.default_level,
                "static": static,
                "routed": len(lv.routed),
                "shared": len(shared),
                "shared_with": shared,
                "ops_column": f"{static['fp32']}/{static['bf16']}/{static['int8']}/{static['int4']}, "
                f"{len(lv.routed)}, {len(shared)}",
                "all_bf16": all(c.fast is Precision.BF16 and not c.routed for c in lv.choices.values()),
                "int4_ops": int4_ops,
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


def print_levels(title: str, levels: list[dict[str, Any]]) -> None:
    lt = Table(title=title)
    for h in ("level", "max_drop", "ops static fp32/bf16/int8/int4, routed, shared", "predicted ms", "predicted drop"):
        lt.add_column(h)
    for lv in levels:
        lt.add_row(
            f"{lv['index']}{' *' if lv['default'] else ''}",
            f"{lv['max_drop']:g}",
            lv["ops_column"],
            f"{lv['predicted_ms']:.2f}",
            f"{lv['predicted_drop']:.4f}",
        )
    Console(width=200).print(lt)


def int4_findings(pkg4: apsq_ov.Package, pkg: apsq_ov.Package, levels4: list[dict[str, Any]]) -> dict[str, Any]:
    """Which ops got an int4 variant (with their isolated drops), which levels chose int4, and how the int4
    package's levels differ from the first package's (same ops, same data)."""
    m4, m = pkg4.manifest, pkg.manifest
    ops = [
        {
            "name": op.name,
            "type": op.type,
            "variants": [v.value for v in op.variants],
            "isolated_top1_drop": {p.value: v for p, v in op.drops.items()},
            "macs": op.macs,
        }
        for op in m4.ops
        if Precision.INT4 in op.variants
    ]
    diffs = []
    for k, (lv4, lv) in enumerate(zip(m4.levels, m.levels, strict=False)):
        changed = {
            n: f"{lv.choices[n].fast.value}/{lv.choices[n].safe.value} → {c.fast.value}/{c.safe.value}"
            for n, c in lv4.choices.items()
            if n in lv.choices and (c.fast, c.safe) != (lv.choices[n].fast, lv.choices[n].safe)
        }
        diffs.append({"level": k, "max_drop": lv4.max_drop, "changed_ops": changed})
    return {
        "ops_with_int4_variant": ops,
        "levels_choosing_int4": [
            {"index": lv["index"], "max_drop": lv["max_drop"], "ops": lv["int4_ops"]}
            for lv in levels4
            if lv["int4_ops"]
        ],
        "level_differences_vs_main": diffs,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _calib_line(label: str, c: dict[str, Any]) -> str:
    if c.get("reused"):
        return f"- {label}: reused package `{c['reused']}` (not calibrated in this run)."
    phases = ", ".join(f"{p} {v:.1f} s" for p, v in c["phase_seconds"].items())
    gaps = ", ".join(f"{p} {v:.1f} s" for p, v in c.get("unreported_seconds", {}).items() if v >= 0.5)
    return (
        f"- {label}: **{c['wall_seconds']:.1f} s** wall ({c['crops']} crops, precisions "
        f"{'/'.join(c.get('precisions', []))}). Phases: {phases}. Outside the reported phases: {gaps or '—'}. "
        f"CPUs used: this process {_fmt(c.get('own_cpus'), '.2f')}, other processes {_fmt(c.get('other_cpus'), '.2f')}."
    )


def _contention_line(c: dict[str, Any]) -> str:
    other = c.get("other_load_during_timing_cpus")
    return (
        f"CPU sharing: before timing the script waited {c['waited_s']:.0f} s for other processes' load to drop "
        f"(last 3 s window {_fmt(c['other_load_last'], '.0%')} of {c['cpus']} CPUs busy, "
        f"{'quiet' if c['quiet'] else 'NOT quiet: timed anyway'}); during timing all CPUs were "
        f"{_fmt(c['cpu_busy_during_timing'], '.0%')} busy, i.e. other load ≈ {_fmt(other, '.2f')} CPUs besides "
        f"the timed thread (loadavg {c['loadavg_before_timing'][0]:.2f} → {c['loadavg_after_timing'][0]:.2f})."
    )


def _levels_md(levels: list[dict[str, Any]]) -> list[str]:
    head = (
        "level",
        "max_drop",
        "ops static fp32/bf16/int8/int4, routed, shared",
        "predicted ms",
        "measured ms",
        "measured / predicted",
        "predicted drop",
        "top-1 agreement",
        "routed ops (fast→safe ×limit)",
        "shared (op → If of)",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in levels:
        routed = ", ".join(f"`{n}` {v}" for n, v in lv["routed_ops"].items()) or "—"
        shared = ", ".join(f"`{n}` → `{v}`" for n, v in lv["shared_with"].items()) or "—"
        agree = lv.get("top1_agreement")
        lines.append(
            f"| {lv['index']}{' (default)' if lv['default'] else ''} | {lv['max_drop']:g} | {lv['ops_column']} | "
            f"{lv['predicted_ms']:.2f} | {_fmt(lv.get('measured_ms'), '.2f')} | "
            f"{_fmt(lv.get('measured_over_predicted'), '.2f')} | {lv['predicted_drop']:.4f} | "
            f"{'—' if agree is None else f'{100 * agree:.1f}%'} | {routed} | {shared} |"
        )
    return lines


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
        "predicted ms",
    )
    table = Table(title="EfficientNet-Lite0: package levels vs static baselines (1 thread)")
    for h in head:
        table.add_column(h)
    cal, cal4 = result["calibration"], result.get("calibration_int4")
    lines = [
        "# Per-level selection: EfficientNet-Lite0" + (" (QUICK run)" if result["quick"] else ""),
        "",
        "Calibration wall times:",
        "",
        _calib_line("first package (profile default precisions)", cal),
    ]
    if cal4:
        lines.append(_calib_line("int4 package (precisions fp32, bf16, int8, int4)", cal4))
        if cal4.get("drop_samples_note"):
            lines.append(f"  - **Note:** {cal4['drop_samples_note']}.")
        elif not cal4.get("reused"):
            lines.append(f"  - drop_samples {cal4.get('drop_samples')} (same as the first package).")
    lines += [
        "",
        f"Routable ops: {result['routable_ops']}. Default level: {result['default_level']} "
        f"(max_drop {result['default_max_drop']:g}). Profile: {result['profile']['name']}. "
        f"Whole run: {result['total_seconds'] / 60:.1f} min.",
        "",
        f"Latency: {result['latency_protocol']}. Quality: {result['quality_protocol']}.",
        "",
        _contention_line(result["cpu_contention"]),
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
            _fmt(r.get("predicted_ms"), ".2f"),
        )
        lines.append("| " + " | ".join(row) + " |")
        table.add_row(*row)
    if result["all_bf16_row"] != "added":
        lines += ["", f"apsq all-bf16 level equivalent: {result['all_bf16_row']}."]
    lines += ["", "## Levels", "", *_levels_md(result["levels"])]
    if result.get("levels_int4"):
        lines += ["", "## Levels of the int4 package", "", *_levels_md(result["levels_int4"])]
    i4 = result.get("int4", {})
    if i4.get("enabled") and "ops_with_int4_variant" in i4:
        lines += ["", "## INT4 (weight-only MatMul) findings", ""]
        ops = i4["ops_with_int4_variant"]
        if ops:
            for op in ops:
                drops = ", ".join(f"{p} {v:.4f}" for p, v in op["isolated_top1_drop"].items())
                lines.append(
                    f"- `{op['name']}` ({op['type']}, {op['macs'] / 1e6:.2f} MMAC) got an int4 variant; "
                    f"variants {'/'.join(op['variants'])}; isolated top-1 drop: {drops}."
                )
        else:
            lines.append("- No op got an int4 variant.")
        chose = i4["levels_choosing_int4"]
        if chose:
            for lv in chose:
                ops_s = ", ".join(f"`{n}` {v}" for n, v in lv["ops"].items())
                lines.append(f"- Level {lv['index']} (max_drop {lv['max_drop']:g}) chose int4: {ops_s}.")
        else:
            lines.append("- No level chose int4.")
        for d in i4["level_differences_vs_main"]:
            if d["changed_ops"]:
                ch = ", ".join(f"`{n}` {v}" for n, v in d["changed_ops"].items())
                lines.append(f"- Level {d['level']} differs from the first package (fast/safe): {ch}.")
        md1 = i4.get("max_drop_1")
        if md1:
            lines.append(
                f"- max_drop=1: int4 package {md1['int4']['median_ms']:.2f} ms "
                f"({100 * md1['int4']['top1_agreement']:.1f}% agreement) vs first package "
                f"{md1['main']['median_ms']:.2f} ms ({100 * md1['main']['top1_agreement']:.1f}%): "
                f"ratio {md1['int4_over_main']:.3f}."
            )
    lines += ["", "## Checks (automatic)", ""]
    lines += [f"- {c}" for c in result["checks"]] or ["- none flagged"]
    nz = result.get("timing_noise_identical_bodies")
    if nz:
        lines.append(
            f"- Timing noise floor: levels {nz['identical_levels']} have the same choices in both packages (the same "
            f"body compiled twice); their medians differ by {100 * nz['mean_rel_diff']:.1f}% on average, "
            f"{100 * nz['max_rel_diff']:.1f}% at most."
        )
    lines += [
        "",
        "Rows: `apsq max_drop=X` runs the level body for X (static ops, routed ops behind an If with the "
        "in-graph range check; a run of adjacent routed ops that always agree shares one If); `escalate=3e38` "
        "multiplies every routed op's range limit so no input escalates "
        "(routed ops always take their fast variant, the If stays); `precision=...` runs the fully routed "
        "body (every op behind its own If); `apsq+int4` rows are the package calibrated with int4 variants. "
        "Every row is timed as a raw `InferRequest.infer()` after the "
        "state is set, except the API row (`AdaptiveInferRequest.infer(x)`, input checks and output copies "
        "included). Escalated ops / input: routed ops that took their safe variant, mean over the quality set. "
        "Checks flag a level > 3 % slower than a coarser one, measured/predicted latency outside 0.8–1.25, "
        "top-1 disagreement > budget + 2σ, and the separate max_drop=1 request > 5 % off its level row.",
    ]
    (RESULTS / "selection.md").write_text("\n".join(lines) + "\n")
    Console(width=200).print(table)

