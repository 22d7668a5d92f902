"""What ``apsq-ov report`` shows, as data: one row per routed op of a package's manifest, the Spearman
correlation of the sensitivity score with the measured isolated drops, and the score-vs-drop plot.

Where it sits in the data flow: after calibration, beside :mod:`apsq_ov.package` (it reads only the
manifest). :mod:`apsq_ov.cli` prints the rows as a rich table or JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apsq_ov.errors import ConfigError
from apsq_ov.package import Manifest


def op_rows(m: Manifest) -> list[dict[str, Any]]:
    """One row per op of ``m``: index, name, type, depth, the score's components, the score and its
    per-precision predictions, the measured isolated drops and task-quality losses per precision, the
    variants kept, its route at the default policy (static, routed, or its share of inputs on each side
    of the cascade) and the router's features on it (with their held-out AUC)."""
    rt = m.router
    cascade = rt is not None and m.default_level == m.cascade_level
    point = rt.point_for(m.default_max_drop) if rt is not None else None
    default = m.levels[rt.fast_level if cascade and rt is not None else m.default_level].choices

    def level_route(name: str) -> str:
        c = default[name]
        if cascade and rt is not None and point is not None:  # the share of inputs on each variant
            precise = m.levels[rt.precise_level].choices[name].fast
            if precise is c.fast:
                return f"{c.fast.value} 100%"
            return f"{c.fast.value} {1 - point.escalation:.0%} / {precise.value} {point.escalation:.0%} (cascade)"
        run = f" (shares {c.shared_with}'s If)" if c.shared_with else ""
        return f"{c.fast.value}/{c.safe.value} routed{run}" if c.routed else f"{c.fast.value} static"

    def router_terms(name: str) -> list[dict[str, Any]]:
        return [] if rt is None else [{"feature": t.feature.value, "auc_held_out": t.auc_holdout}
                                     for t in rt.terms if t.op == name]  # fmt: skip

    rows = [
        {
            "index": op.index, "name": op.name, "type": op.type, "depth": op.depth,
            "components": op.sensitivity.get("components", {}), "score": op.score,
            "predicted": op.sensitivity.get("predicted", {}),
            "drops": {p.value: v for p, v in op.drops.items()},
            "quality_loss": {p.value: v for p, v in op.quality.items()},
            "variants": [p.value for p in op.variants],
            "default_route": level_route(op.name),
            "router_features": router_terms(op.name),
            "macs": op.macs,
            "int8_absmax": op.int8_absmax, "input_absmax": op.input_absmax,
        }
        for op in m.ops
    ]  # fmt: skip
    return rows


def score_vs_drop(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per lower precision, Spearman ρ of each op's predicted loss (its score where there is no
    per-precision prediction) against its measured isolated drop; ``None`` when undefined (fewer than
    3 ops, or all values equal)."""
    from scipy.stats import spearmanr

    rho: dict[str, float | None] = {}
    for p in sorted({p for r in rows for p in r["drops"]}):
        pairs = [(r["predicted"].get(p, r["score"]), r["drops"][p]) for r in rows if p in r["drops"]]
        defined = len(pairs) >= 3 and len({d for _, d in pairs}) > 1 and len({a for a, _ in pairs}) > 1
        rho[p] = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic) if defined else None
    return rho


def plot_score_vs_drop(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """A PNG at ``path``: predicted loss vs measured isolated drop, one marker per precision.

    :raises ConfigError: without matplotlib, or when ``path`` cannot be written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for p, marker in (("int8", "o"), ("bf16", "s"), ("fp16", "^")):
        pts = [(r["predicted"].get(p, r["score"]), r["drops"][p]) for r in rows if p in r["drops"]]
        if pts:
            ax.scatter([a for a, _ in pts], [b for _, b in pts], marker=marker, label=p, alpha=0.8)
    ax.set_xscale("symlog", linthresh=1e-6)
    ax.set_xlabel("sensitivity score (predicted loss of the op alone)")
    ax.set_ylabel("measured isolated drop (held-out)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"cannot write plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
