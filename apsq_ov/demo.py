"""The embedded default (``apsq-ov demo``): a real model on real data, every precision compared.

Where it sits in the data flow: it drives the whole pipeline — Fashion-MNIST (Debian's
``dataset-fashion-mnist``) → ``.npz`` files → :func:`apsq_ov.calibrate.calibrate` on the bundled
ResNet (``apsq_ov/data/fmnist_resnet.xml``, trained by ``examples/train_fashion_mnist.py``) →
adaptive inference on the test set — and measures, in one process, the static baselines
(OpenVINO FP32, BF16, NNCF INT8) beside apsq-ov at every level of its max-drop dial, and forced to
fp32/int8 through the fully routed body (every op behind its own If: what per-op routing costs).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from apsq_ov import embedded_model
from apsq_ov.bench import Method, hint_not_honoured, measure
from apsq_ov.datasets import load_fashion_mnist
from apsq_ov.package import NEVER

CALIBRATION_SAMPLES = 1000


def _accuracy(meth: Method, labels: np.ndarray) -> float:
    """Top-1 accuracy of one measured configuration (its outputs come back in the order it ran them)."""
    top = np.array([int(np.argmax(y)) for y in meth.outputs])
    return float(np.mean(top == labels[np.asarray(meth.index)]))


class _Phase:
    """:func:`apsq_ov.bench.measure`'s progress (``add_task``/``advance``) onto a phase callback."""

    def __init__(self, callback: Callable[[str, int, int], None] | None) -> None:
        self.callback, self.desc, self.done, self.total = callback, "", 0, 0

    def add_task(self, desc: str, total: int) -> int:
        self.desc, self.done, self.total = desc, 0, total
        if self.callback is not None:
            self.callback(desc, 0, total)
        return 0

    def advance(self, _task: int, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.desc, self.done, self.total)


def run_demo(
    out_dir: str | Path,
    *,
    limit: int = 10000,
    threads: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Calibrate the embedded model and compare every configuration on ``limit`` test images.

    :return: ``{"rows": [...], "samples": n, "package": path, "results_file": path}``; also written as JSON.
    """
    import nncf

    from apsq_ov.calibrate import CalibrationConfig, calibrate, package_quantize_settings, sample_order
    from apsq_ov.runtime import compile_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train = load_fashion_mnist("train")
    pick = np.random.default_rng(0).permutation(len(x_train))[:CALIBRATION_SAMPLES]
    np.savez(out / "calibration.npz", images=x_train[pick], labels=y_train[pick])
    x_test, y_test = load_fashion_mnist("test")
    x_test, y_test = x_test[:limit], y_test[:limit]
    np.savez(out / "test.npz", images=x_test, labels=y_test)

    package = calibrate(
        embedded_model(),
        out / "calibration.npz",
        out / "package",
        CalibrationConfig(drop_samples=CALIBRATION_SAMPLES - 100),
        progress=progress,
    )

    core = ov.Core()
    latency_cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    static = core.read_model(embedded_model())
    static.reshape([1, 1, 28, 28])
    m = package.manifest
    config = m.calibration
    same_subset = pick[sample_order(len(pick), config["seed"])[: config["subset_size"]]]  # what NNCF saw in calibrate
    subset = nncf.Dataset([x_train[i : i + 1] for i in same_subset])
    int8 = nncf.quantize(static.clone(), subset, subset_size=len(same_subset))
    # The same, with the settings calibration gave NNCF (apsq-ov's INT8 route is this graph)
    settings = package_quantize_settings(m)
    int8_apsq = nncf.quantize(static.clone(), subset, subset_size=len(same_subset), **settings.kwargs)
    bf16 = core.compile_model(static, "CPU", {**latency_cfg, "INFERENCE_PRECISION_HINT": "bf16"})
    configs: list[tuple[str, Any]] = [
        (
            "OpenVINO FP32 (static)",
            core.compile_model(static, "CPU", {**latency_cfg, "INFERENCE_PRECISION_HINT": "f32"}),
        ),
        ("OpenVINO BF16 (static)" + hint_not_honoured(bf16, "bf16"), bf16),
        ("NNCF INT8 (static, NNCF defaults)",
         core.compile_model(int8, "CPU", {**latency_cfg, "INFERENCE_PRECISION_HINT": "f32"})),
        (f"NNCF INT8 (static; {settings.description[settings.description.index('(') + 1 : -1]})",
         core.compile_model(int8_apsq, "CPU", {**latency_cfg, "INFERENCE_PRECISION_HINT": "f32"})),
    ]  # fmt: skip
    adaptive = compile_model(package, "CPU", latency_cfg, standalone="all")  # each level as deployed
    default = adaptive.plan(max_drop=m.default_max_drop)
    mark = f" (runs the default, max-drop {m.default_max_drop:g})"
    policies: list[tuple[str, dict[str, Any]]] = [
        (f"apsq-ov static level, max-drop {lv.max_drop:g}" + (mark if i == default.level else ""),
         {"max_drop": lv.max_drop, "policy": "static"})
        for i, lv in enumerate(m.levels)
    ]  # fmt: skip
    if m.router is not None:  # the escalation cascade at each budget that escalates some inputs
        policies += [
            (f"apsq-ov cascade, max-drop {p.max_drop:g}"
             + (mark if default.level == m.cascade_level and p.tau == default.tau else ""),
             {"max_drop": p.max_drop, "policy": "cascade"})
            for p in m.router.points if -NEVER < p.tau < NEVER
        ]  # fmt: skip
    policies += [(f"apsq-ov forced {p}, every op routed", {"precision": p}) for p in ("fp32", "int8")]
    # Every configuration on every image, interleaved block by block with a warm-up (bench.measure, the
    # benchmarks' protocol): timed one after another, a configuration could read a passing slow spell of
    # a shared machine as its own cost (seen: NNCF INT8 at 1.4x the same graph's static level).
    methods = [Method(name, "baseline", compiled.create_infer_request()) for name, compiled in configs]
    wrappers = []
    for name, policy in policies:  # the raw OpenVINO request, policy state written once beforehand
        request = adaptive.create_infer_request()
        request.set_policy(**policy)
        wrappers.append(request)
        methods.append(Method(name, "apsq", request.request))
    measure(methods, x_test, progress=_Phase(progress), keep_routes=True)
    rows: list[dict[str, Any]] = []
    for meth in methods[: len(configs)]:
        rows.append({"name": meth.name, "accuracy": _accuracy(meth, y_test), "median_ms": float(np.median(meth.ms))})
    for meth, request, (name, policy) in zip(methods[len(configs) :], wrappers, policies, strict=True):
        # A level without routed ops runs a body without the route output: its route is the body's own.
        routes = [tuple(int(c) for c in r.reshape(-1)) for r in meth.routes] or [
            tuple(int(c) for c in request.get_result().route)
        ] * len(x_test)
        counts = collections.Counter(routes)
        fast = tuple(m.fast_route_codes or ()) if policy.get("policy") == "cascade" else None
        rows.append({
            "name": name,
            "policy": policy,
            "accuracy": _accuracy(meth, y_test),
            "median_ms": float(np.median(meth.ms)),
            "distinct_routes": len(counts),
            "top_route_share": counts.most_common(1)[0][1] / len(routes),
            "route_patterns": [{"route": list(r), "fraction": c / len(routes)} for r, c in counts.most_common(10)],
        } | ({} if fast is None else {"escalated": float(np.mean([r != fast for r in routes]))}))  # fmt: skip
    fp32_ms = rows[0]["median_ms"]
    for row in rows:
        row["ratio_vs_fp32"] = row["median_ms"] / fp32_ms
    result = {
        "model": str(embedded_model()),
        "samples": int(len(x_test)),
        "threads": threads,
        "route_ops": package.manifest.route_ops,
        "rows": rows,
        "package": str(package.path),
        "results_file": str(out / "demo_results.json"),
    }
    (out / "demo_results.json").write_text(json.dumps(result, indent=1))
    return result
