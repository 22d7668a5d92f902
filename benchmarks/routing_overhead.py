"""What static compilation and If sharing save: the same model, the same variants, four IRs.

For the Fashion-MNIST ResNet (bundled) and EfficientNet-Lite0 (``benchmarks/real_models.py``), one
process, 1 thread, f32 hint, interleaved rounds, median of round medians (DESIGN.md §5):

* plain OpenVINO FP32 and NNCF INT8 (the baselines);
* the fully routed body forced to int8 (every op behind its own ``If``: the walking skeleton's IR);
* a level body with every op static INT8 (what static compilation gives);
* a level body with every op INT8 where the ops of ``k`` adjacent linear pairs are routed
  (INT8 unless the input leaves the calibrated range), once with one ``If`` per op and once with each
  pair sharing one ``If`` (what If sharing saves). Inputs are in range, so every routed op runs INT8.

Writes ``benchmarks/results/routing_overhead.{json,md}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import nncf
import numpy as np
import openvino as ov

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from apsq_ov.calibrate.levels import build_package_model  # noqa: E402
from apsq_ov.calibrate.variants import find_routable_ops, linear_successors  # noqa: E402
from apsq_ov.package import LEVEL_STATE, OpChoice  # noqa: E402
from apsq_ov.precision import Precision  # noqa: E402

RESULTS = ROOT / "results"
CFG = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
P = Precision


def _models(name: str) -> tuple[ov.Model, np.ndarray]:
    core = ov.Core()
    if name == "Fashion-MNIST ResNet":
        import apsq_ov
        from apsq_ov.datasets import load_fashion_mnist

        m = core.read_model(apsq_ov.embedded_model())
        m.reshape([1, 1, 28, 28])
        x = load_fashion_mnist("train")[0][:300].astype(np.float32).reshape(-1, 1, 1, 28, 28)
        return m, x
    from benchmarks.real_models import efficientnet_lite0_ir, photo_crops

    m = core.read_model(efficientnet_lite0_ir(RESULTS / ".cache"))
    return m, photo_crops(300)[:, None]


def _timer(compiled: ov.CompiledModel, x: np.ndarray, level: int | None) -> ov.InferRequest:
    req = compiled.create_infer_request()
    if level is not None:
        states = {s.name: s for s in req.query_state()}
        states[LEVEL_STATE].state = ov.Tensor(np.array(level, np.int32))
    for _ in range(20):
        req.infer([x])
    return req


def measure(name: str, pairs_wanted: int, rounds: int, runs: int) -> dict:
    nncf.set_log_level(logging.ERROR)
    model, data = _models(name)
    q = nncf.quantize(model.clone(), nncf.Dataset(list(data)), subset_size=len(data))
    units = find_routable_ops(model, q)
    variants = {u.name: ((P.FP32, P.BF16, P.INT8) if u.act_fq is not None else (P.FP32, P.BF16)) for u in units}
    fast = {u.name: (P.INT8 if u.act_fq is not None else P.BF16) for u in units}
    static = {n: OpChoice(p, p) for n, p in fast.items()}
    succ = linear_successors(units)
    pairs, used = [], set()
    for a, b in succ.items():
        if a in used or b in used or fast[a] is not P.INT8 or fast[b] is not P.INT8:
            continue
        pairs.append((a, b))
        used |= {a, b}
        if len(pairs) == pairs_wanted:
            break
    separate = dict(static)
    shared = dict(static)
    for a, b in pairs:
        separate[a] = separate[b] = OpChoice(P.INT8, P.FP32, 1e30)
        shared[a] = OpChoice(P.INT8, P.FP32, 1e30)
        shared[b] = OpChoice(P.INT8, P.FP32, 1e30, shared_with=a)
    fp32 = {n: OpChoice(P.FP32, P.FP32) for n in variants}
    pm = build_package_model(model, q, variants, [fp32, static, separate, shared], default_level=1)
    core = ov.Core()
    compiled = core.compile_model(pm, "CPU", CFG)
    x = data[0]
    full_req = compiled.create_infer_request()
    st = {s.name: s for s in full_req.query_state()}
    st[LEVEL_STATE].state = ov.Tensor(np.array(4, np.int32))
    routed = [n for n, v in variants.items() if len(v) > 1]
    st["apsq/modes"].state = ov.Tensor(np.array([fast[n].code for n in routed], np.int32))
    for _ in range(20):
        full_req.infer([x])
    reqs = {
        "plain FP32": _timer(core.compile_model(model, "CPU", CFG), x, None),
        "plain NNCF INT8": _timer(core.compile_model(q, "CPU", CFG), x, None),
        "every op behind its own If, forced int8 (full body)": full_req,
        "level body, every op static INT8": _timer(compiled, x, 1),
        f"level body, {2 * len(pairs)} ops routed, one If each": _timer(compiled, x, 2),
        f"level body, {2 * len(pairs)} ops routed, {len(pairs)} shared Ifs": _timer(compiled, x, 3),
    }
    meds: dict[str, list[float]] = {k: [] for k in reqs}
    for r in range(rounds):
        keys = list(reqs)[r % len(reqs) :] + list(reqs)[: r % len(reqs)]
        for k in keys:
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                reqs[k].infer([x])
                ts.append(time.perf_counter() - t0)
            meds[k].append(float(np.median(ts) * 1e3))
    rows = {k: float(np.median(v)) for k, v in meds.items()}
    int8 = rows["plain NNCF INT8"]
    return {
        "model": name,
        "routable_ops": len(routed),
        "pairs": pairs,
        "rows": [{"configuration": k, "median_ms": v, "vs_nncf_int8": v / int8} for k, v in rows.items()],
    }


def main() -> None:
    quick = "--quick" in sys.argv
    out = [
        measure("Fashion-MNIST ResNet", 2, 3 if quick else 5, 300 if quick else 2000),
        measure("EfficientNet-Lite0", 4, 3 if quick else 5, 30 if quick else 150),
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing_overhead.json").write_text(json.dumps(out, indent=1))
    lines = ["# What static compilation and If sharing save", "",
             "1 thread, f32 hint, one process; median of round medians over interleaved rounds.", ""]  # fmt: skip
    for res in out:
        lines += [f"## {res['model']} ({res['routable_ops']} routable ops; shared pairs: {len(res['pairs'])})", "",
                  "| configuration | median ms | vs NNCF INT8 |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['configuration']} | {r['median_ms']:.3f} | {r['vs_nncf_int8']:.2f}x |" for r in res["rows"]]
        lines.append("")
    (RESULTS / "routing_overhead.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
