"""Issue 5: the per-input router and its escalation cascade, measured on real models and real data.

For each model, three packages calibrated on the same clean calibration data (the router is fitted on it
and on shifted copies of it, ``CALIBRATION_SHIFTS``: noise σ 0.1, dark ×0.5, contrast ×1.5, blur σ 1 px —
milder than the evaluation shifts below, and never the evaluation images):

* ``fitted``   — the default: terms chosen among the output margin and the in-graph op features;
* ``margin``   — ``--router-features margin``: plain output-margin escalation (the issue's item 4);
* ``features`` — ``--router-features`` op features only: the in-graph activation-statistics router.

Evaluation data: Fashion-MNIST ResNet on the 10,000 real test images, clean, gaussian noise σ 0.2 and
darkening ×0.3 (``apsq_ov.datasets.shift``); EfficientNet-Lite0 on fresh crops of the bundled photos
(``photo_crops(n, seed=1)``; calibration used seed 0), clean, noise and dark applied in pixel space.

Per package and shift it measures, on the deployed graph itself:

* the router's AUC for "the fast route's top-1 differs from FP32's" (risk read from the package IR's
  cascade body, :func:`apsq_ov.calibrate.router.risk_model`), against the margin alone on the same inputs;
* accuracy (labels) / top-1 agreement with FP32, and latency per input (1 thread, LATENCY hint, f32 hint,
  one request per configuration, configurations interleaved in blocks of 50 inputs: median and mean) of:
  plain OpenVINO FP32, BF16 (bf16 hint), plain NNCF INT8; every static level of the package; the
  cascade at every max-drop point; the cascade with τ = never (the fast route + the router: its cost).

Writes ``results/router.json`` and ``results/router.md``.

Usage: ``python benchmarks/router.py [--reuse] [--fmnist-only] [--crops 500]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import apsq_ov
from apsq_ov.bench import Method, hint_not_honoured, measure
from apsq_ov.calibrate import CalibrationConfig, calibrate
from apsq_ov.calibrate.router import as_probabilities, risk_model
from apsq_ov.datasets import load_fashion_mnist, shift
from apsq_ov.package import NEVER, TAU_STATE, Feature
from apsq_ov.runtime import compile_model

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / ".cache" / "router"
sys.path.insert(0, str(HERE))
console = Console()
LATENCY = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
ROUTERS = {
    "fitted": None,
    "margin": (Feature.MARGIN,),
    "features": (Feature.AMAX_RATIO, Feature.CLIP_FRAC, Feature.STD_OVER_STEP, Feature.NEARZERO_FRAC),
}


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)  # fmt: skip


def calibrated(tag: str, model: Path, data: Path, features: tuple[Feature, ...] | None, reuse: bool,
               subset: int) -> apsq_ov.Package:  # fmt: skip
    out = CACHE / f"{tag}.apsq"
    if reuse and (out / "apsq.json").is_file():
        return apsq_ov.Package.load(out)
    config = CalibrationConfig(subset_size=subset, router_features=features)
    t0 = time.perf_counter()
    with console.status(f"calibrating {tag} (router features: {'all' if features is None else 'restricted'})"):
        with contextlib.redirect_stdout(io.StringIO()):
            pkg = calibrate(model, data, out, config)
    console.print(f"{tag}: calibrated in {time.perf_counter() - t0:.0f} s")
    return pkg


def package_configs(pkg: apsq_ov.Package, label: str, with_levels: bool, info: dict[str, dict]) -> list[Method]:
    """The package's static levels (``with_levels``) and cascade points as timed methods; what each one
    is goes into ``info`` (by name)."""
    m = pkg.manifest
    r = m.router
    compiled = compile_model(pkg, "CPU", LATENCY)
    fast = None if m.fast_route_codes is None else np.array(m.fast_route_codes, np.int8)
    configs = []

    def add(name: str, kind: str, policy: dict[str, Any], extra: dict[str, Any], tau: float | None = None) -> None:
        req = compiled.create_infer_request()
        req.set_policy(**policy)
        if tau is not None:  # a threshold no max_drop maps to: written straight into the request state
            state = {s.name: s for s in req.request.query_state()}
            state[TAU_STATE].state = ov.Tensor(np.array(tau, np.float32))
        configs.append(Method(name, kind, req.request, fast_codes=None if kind == "static" else fast))
        info[name] = extra | {"policy": policy}

    if with_levels:
        for k, lv in enumerate(m.levels):
            add(f"apsq static level {k} (max_drop {lv.max_drop:g})", "static",
                {"max_drop": lv.max_drop, "policy": "static"}, {"level": k, "max_drop": lv.max_drop})  # fmt: skip
    if r is None:
        return configs
    add(f"{label} cascade, τ=never (fast route + router)", "router-cost", {"max_drop": 1.0, "policy": "cascade"},
        {"tau": NEVER}, tau=NEVER)  # fmt: skip
    for p in r.points:
        if not -NEVER < p.tau < NEVER:  # the fast route alone, or every input escalated: other rows show those
            continue
        policy = {"max_drop": p.max_drop, "policy": "cascade"}
        add(f"{label} cascade max_drop {p.max_drop:g}", f"cascade-{label}", policy,
            {"max_drop": p.max_drop, "tau": p.tau, "calibration_escalation": p.escalation,
             "calibration_drop": p.predicted_drop})  # fmt: skip
    return configs


def plain_configs(model: ov.Model, q_model: ov.Model) -> list[Method]:
    core = ov.Core()
    out = []
    for name, m, hint in (("OpenVINO FP32", model, "f32"), ("OpenVINO BF16 (bf16 hint)", model, "bf16"),
                          ("NNCF INT8 (nncf.quantize)", q_model, "f32")):  # fmt: skip
        compiled = core.compile_model(m, "CPU", {**LATENCY, "INFERENCE_PRECISION_HINT": hint})
        out.append(Method(name + hint_not_honoured(compiled, hint), "plain", compiled.create_infer_request()))
    return out


def risk_request(pkg: apsq_ov.Package) -> tuple[ov.InferRequest, list[np.ndarray]]:
    rm = risk_model(pkg.read_model())
    n_in = len(pkg.manifest.inputs)
    extra = []
    for p in rm.get_parameters()[n_in:]:
        name = p.get_friendly_name()
        dtype = np.int32 if p.get_element_type() == ov.Type.i32 else np.float32
        extra.append(np.array(1.0 if name == "escalate" else 0, dtype))
    req = ov.Core().compile_model(rm, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    return req, extra


def auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return None if y.min() == y.max() else float(roc_auc_score(y, s))


def _top1(c: Method) -> np.ndarray:
    """Per input (in input order), the top-1 of every position of the first output."""
    return np.stack(c.outputs)[np.argsort(c.index)].argmax(-1).reshape(len(c.outputs), -1)


def margins(outputs: np.ndarray) -> np.ndarray:
    s = np.sort(as_probabilities(outputs), -1)
    return (s[..., -1] - s[..., -2]).reshape(len(s), -1).min(-1)


def evaluate(model_name: str, pkgs: dict[str, apsq_ov.Package], plain_model: ov.Model, q_model: ov.Model,
             data: dict[str, np.ndarray], labels: np.ndarray | None) -> dict[str, Any]:  # fmt: skip
    """All shifts of one model: AUCs and the accuracy/latency table."""
    out: dict[str, Any] = {}
    for shift_name, x in data.items():
        configs = plain_configs(plain_model, q_model)
        info: dict[str, dict] = {}
        for label, pkg in pkgs.items():
            configs += package_configs(pkg, label, with_levels=(label == "fitted"), info=info)
        desc = f"{model_name} {shift_name}: {len(configs)} configurations"
        with _progress() as prog:  # blocks of 50 consecutive inputs per configuration, order rotating
            measure(configs, x, block=50, progress=prog, desc=desc)
        n = len(x)

        ref = _top1(configs[0])
        rows = []
        for c in configs:
            top1 = _top1(c)
            row: dict[str, Any] = {"name": c.name, "kind": c.family, "median_ms": float(np.median(c.ms)),
                                   "mean_ms": float(np.mean(c.ms)), "runs": len(c.ms),
                                   "agreement_fp32": float(np.mean((top1 == ref).all(1)))}  # fmt: skip
            if labels is not None:
                row["accuracy"] = float(np.mean(top1[:, 0] == labels[:n]))
            if c.escalated:
                row["escalated"] = float(np.mean(c.escalated))
            row.update(info.get(c.name, {}))
            rows.append(row)
        # AUCs on the same inputs: the deployed risk of each package vs the flips of its fast route
        aucs: dict[str, Any] = {}
        for label, pkg in pkgs.items():
            m = pkg.manifest
            if m.router is None:
                aucs[label] = {"note": m.router_note}
                continue
            req, extra = risk_request(pkg)
            risk = np.array([float(req.infer([x[i : i + 1], *extra])[0]) for i in range(n)])
            fast = ov.Core().compile_model(pkg.read_model(), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            freq = fast.create_infer_request()
            st = {s.name: s for s in freq.query_state()}
            st["apsq/level"].state = ov.Tensor(np.array(m.router.fast_level, np.int32))
            fast_out = np.stack([np.asarray(freq.infer([x[i : i + 1]])[0])[0] for i in range(n)])
            flip = (fast_out.argmax(-1).reshape(n, -1) != ref.reshape(n, -1)).any(1)
            aucs[label] = {
                "terms": [[t.feature.value, t.op] for t in m.router.terms],
                "flip_rate": float(flip.mean()),
                "auc_router": auc(flip, risk),
                "auc_margin_alone": auc(flip, -margins(fast_out)),
                "calibration_auc_held_out": m.router.quality.get("auc_held_out"),
            }
            aucs[label]["_risk"] = risk
            aucs[label]["_flip"] = flip
        out[shift_name] = {"rows": rows, "auc": aucs, "samples": n}
    # pooled AUC over shifts (the FMNIST bar is "with noise/darkening shifts")
    pooled = {}
    for label in pkgs:
        parts = [out[s]["auc"][label] for s in data if "_risk" in out[s]["auc"][label]]
        if parts:
            flips, risks = (np.concatenate([p[k] for p in parts]) for k in ("_flip", "_risk"))
            pooled[label] = auc(flips, risks)
    for s in data:
        for a in out[s]["auc"].values():
            a.pop("_risk", None)
            a.pop("_flip", None)
    out["pooled_auc"] = pooled
    return out


def fmnist(args: argparse.Namespace) -> dict[str, Any]:
    import nncf

    x_train, y_train = load_fashion_mnist("train")
    pick = np.random.default_rng(0).permutation(len(x_train))[: args.fmnist_calib]
    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / "fmnist_calib.npz"
    np.savez(data, images=x_train[pick], labels=y_train[pick])
    model_path = apsq_ov.embedded_model()
    pkgs = {label: calibrated(f"fmnist_{label}", model_path, data, f, args.reuse, 300) for label, f in ROUTERS.items()}
    model = ov.Core().read_model(model_path)
    model.reshape([1, 1, 28, 28])
    from apsq_ov.calibrate import sample_order

    subset = pick[sample_order(len(pick), 0)[:300]]  # the samples calibrate gave NNCF
    with contextlib.redirect_stdout(io.StringIO()):
        q = nncf.quantize(model.clone(), nncf.Dataset([x_train[i : i + 1] for i in subset]), subset_size=300)
    x_test, y_test = load_fashion_mnist("test")
    x_test, y_test = x_test[: args.fmnist_test], y_test[: args.fmnist_test]
    shifts = {s: shift(x_test, s) for s in ("clean", "noise", "dark")}
    result = evaluate("Fashion-MNIST", pkgs, model, q, shifts, y_test)
    result["packages"] = {k: _package_info(p) for k, p in pkgs.items()}
    return result


def effnet(args: argparse.Namespace) -> dict[str, Any]:
    import nncf
    from real_models import efficientnet_lite0_ir, photo_crops

    model_path = efficientnet_lite0_ir(RESULTS / ".cache")
    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / "effnet_calib.npz"
    calib = photo_crops(300, seed=0)
    np.savez(data, inputs=calib)
    tags = {"fitted": "effnet", "margin": "effnet_margin", "features": "effnet_features"}
    pkgs = {label: calibrated(tags[label], model_path, data, f, args.reuse, 300) for label, f in ROUTERS.items()}
    model = ov.Core().read_model(model_path)
    with contextlib.redirect_stdout(io.StringIO()):
        q = nncf.quantize(model.clone(), nncf.Dataset([c[None] for c in calib]), subset_size=300)
    fresh = photo_crops(args.crops, seed=1)
    # shifts in pixel space: the crops are (p − 127) / 128 of pixels p in [0, 255]
    pixels = fresh * 128.0 + 127.0
    rng = np.random.default_rng(0)
    noisy = np.clip(pixels + rng.normal(0, 0.2 * 255, pixels.shape), 0, 255)
    dark = pixels * 0.3
    shifts = {"clean": fresh, "noise": ((noisy - 127.0) / 128.0).astype(np.float32),
              "dark": ((dark - 127.0) / 128.0).astype(np.float32)}  # fmt: skip
    if args.effnet_clean_only:
        shifts = {"clean": fresh}
    result = evaluate("EfficientNet-Lite0", pkgs, model, q, shifts, None)
    result["packages"] = {k: _package_info(p) for k, p in pkgs.items()}
    return result


def _package_info(pkg: apsq_ov.Package) -> dict[str, Any]:
    m = pkg.manifest
    r = m.router
    return {"path": str(pkg.path), "default_level": m.default_level, "cascade_level": m.cascade_level,
            "router": None if r is None else {"terms": [t.to_json() for t in r.terms], "bias": r.bias,
                                              "quality": r.quality, "cost": r.cost,
                                              "points": [p.to_json() for p in r.points]},
            "router_note": m.router_note,
            "levels": [{"max_drop": lv.max_drop, "measured_ms": lv.measured_ms, "predicted_ms": lv.predicted_ms}
                       for lv in m.levels]}  # fmt: skip


def _row_md(r: dict[str, Any], base: dict[str, float], labels: bool) -> str:
    acc = f"{100 * r['accuracy']:.2f} | " if labels else ""
    esc = f"{100 * r['escalated']:.1f}%" if "escalated" in r else "-"
    return (f"| {r['name']} | {acc}{100 * r['agreement_fp32']:.2f} | {r['median_ms']:.3f} | {r['mean_ms']:.3f} | "
            f"{r['mean_ms'] / base['int8_mean']:.2f}x | {esc} |")  # fmt: skip


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "router.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Router and escalation cascade (issue 5)",
        "",
        f"Machine: {result['machine']}; OpenVINO {result['openvino']}; `python benchmarks/router.py`.",
        "Latency: 1 thread, LATENCY hint, f32 hint (precision in-graph), one request per configuration, "
        "configurations interleaved in blocks of 50 inputs; median and mean over all inputs (a cascade's escalations "
        "show in the mean, not the median). Ratios are against plain NNCF INT8's mean in the same run.",
        "",
    ]
    for model_name, res in result["models"].items():
        labels = model_name.startswith("Fashion")
        lines += [f"## {model_name}", ""]
        shifts = [s for s in res if s not in ("pooled_auc", "packages")]
        lines += [
            "### Router AUC for 'the fast route's top-1 differs from FP32's' (deployed risk, evaluation data)",
            "",
            "| router | terms | " + " | ".join(shifts) + " | pooled | calibration held-out |",
            "|---|---|" + "---|" * len(shifts) + "---|---|",
        ]
        for label in ROUTERS:
            first = res[shifts[0]]["auc"][label]
            if "terms" not in first:
                lines.append(f"| {label} | {first.get('note')} |" + " |" * (len(shifts) + 2))
                continue
            terms = ", ".join(f"{f}{'' if op is None else ' @' + op.split('/')[-1][:18]}" for f, op in first["terms"])
            cells = []
            for s in shifts:
                a = res[s]["auc"][label]
                margin, flips = a["auc_margin_alone"], 100 * a["flip_rate"]
                cells.append(f"{a['auc_router']:.3f} (margin {margin:.3f}; flips {flips:.1f}%)")
            pooled = res["pooled_auc"].get(label)
            cal = first.get("calibration_auc_held_out")
            lines.append(f"| {label} | {terms} | " + " | ".join(cells) + f" | {pooled:.3f} | {cal:.3f} |")
        lines.append("")
        for s in shifts:
            rows = res[s]["rows"]
            int8 = next(r for r in rows if r["name"].startswith("NNCF INT8"))
            base = {"int8_mean": int8["mean_ms"]}
            head = "| configuration | accuracy % | agreement % | median ms | mean ms | mean vs NNCF INT8 | escalated |"
            if not labels:
                head = head.replace(" accuracy % |", "")
            lines += [f"### {s} ({res[s]['samples']} inputs)", "", head, "|---" * (head.count("|") - 1) + "|"]
            lines += [_row_md(r, base, labels) for r in rows]
            lines.append("")
    (RESULTS / "router.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reuse", action="store_true", help="reuse packages calibrated under results/.cache/router")
    ap.add_argument("--fmnist-only", action="store_true")
    ap.add_argument("--effnet-only", action="store_true")
    ap.add_argument("--effnet-clean-only", action="store_true")
    ap.add_argument("--crops", type=int, default=500, help="fresh EfficientNet-Lite0 crops to evaluate on")
    ap.add_argument("--fmnist-calib", type=int, default=1000)
    ap.add_argument("--fmnist-test", type=int, default=10000)
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
                              "openvino": ov.__version__, "args": vars(args), "models": {}}  # fmt: skip
    previous = RESULTS / "router.json"
    if previous.is_file():  # keep the other model's results when running one
        result["models"] = json.loads(previous.read_text()).get("models", {})
    if not args.effnet_only:
        result["models"]["Fashion-MNIST ResNet"] = fmnist(args)
        write(result)
    if not args.fmnist_only:
        result["models"]["EfficientNet-Lite0"] = effnet(args)
        write(result)
    console.print(f"wrote {RESULTS / 'router.json'} and {RESULTS / 'router.md'}")


if __name__ == "__main__":
    main()
