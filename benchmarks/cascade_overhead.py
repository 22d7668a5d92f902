"""What the escalation cascade costs when it escalates nothing: the router's nodes and its ``If``.

For the Fashion-MNIST package ``benchmarks/pareto.py`` calibrated (``results/.cache/pareto/fmnist.apsq``),
one process, 1 thread, f32 hint, LATENCY hint, interleaved rounds of 200 test images, median of round
medians and of each half of the rounds (DESIGN.md §5); τ is set so that no input escalates (the path
nearly every input takes):

* the cascade body as the runtime compiles it (:func:`apsq_ov.bodies.standalone_bodies`; τ a
  ReadValue state, as every request carries it);
* the same body with τ folded into a constant (no state: what a deployment serving one budget could
  compile);
* the static level the cascade runs on (its fast route alone, no router);
* that static level with the router's decision taken on the host instead (:func:`host_decision`: the
  margin read off its output in plain Python, the risk compared with τ, the precise level run when it
  escalates): what a runtime could do for a margin-only router, timed with the Python step included.

Writes ``benchmarks/results/cascade_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from openvino import opset13 as ops

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import apsq_ov  # noqa: E402
from apsq_ov.bench import LATENCY, host_cpu  # noqa: E402
from apsq_ov.bodies import split_constant_route, standalone_bodies  # noqa: E402
from apsq_ov.datasets import load_fashion_mnist  # noqa: E402
from apsq_ov.package import EPS, NEVER, TAU_STATE, Feature  # noqa: E402

RESULTS = HERE / "results"


def fold_states(model: ov.Model) -> ov.Model:
    """``model`` with every ReadValue replaced by a constant :data:`~apsq_ov.package.NEVER` (a τ that never
    escalates) and its variables dropped."""
    for node in model.get_ordered_ops():
        if node.get_type_name() == "ReadValue":
            const = ops.constant(np.full(tuple(node.get_output_partial_shape(0).to_shape()), NEVER, np.float32))
            for target in list(node.output(0).get_target_inputs()):
                if target.get_node().get_type_name() != "Assign":
                    target.replace_source_output(const.output(0))
    for sink in list(model.get_sinks()):
        model.remove_sink(sink)
    for var in list(model.get_variables()):
        model.remove_variable(var)
    model.validate_nodes_and_infer_types()
    return model


def host_decision(fast: ov.InferRequest, precise: ov.InferRequest, router: Any, tau: float,
                  decision: Any) -> Callable[[list[np.ndarray]], Any]:
    """One inference of the cascade with a margin-only router decided on the host: the fast level, then
    ``risk = bias + w · log(margin + EPS)`` on its judged output (one position; softmax unless the router
    reads probabilities), and the precise level on the same input where ``risk > tau``; returns the outputs
    and whether it escalated. Plain Python on
    the 10 scores: numpy's softmax and partition cost ~3x more per call at this size."""
    if [t.feature for t in router.terms] != [Feature.MARGIN]:
        raise SystemExit("host_decision: the package's router reads more than the output margin")
    (w,), bias, port = [t.weight for t in router.terms], router.bias, decision.output

    def infer(inputs: list[np.ndarray]) -> Any:
        res = fast.infer(inputs)
        scores = decision.scores(res[port]).reshape(-1).tolist()
        if router.probabilities:
            top = sorted(scores)
            margin = top[-1] - top[-2]
        else:
            peak = max(scores)
            e = sorted(math.exp(v - peak) for v in scores)
            margin = (e[-1] - e[-2]) / sum(e)
        if bias + w * math.log(margin + EPS) > tau:
            return precise.infer(inputs), True
        return res, False

    return infer


def same_decisions(core: ov.Core, cascade: ov.Model, static: ov.Model, precise: ov.CompiledModel, m: Any,
                   x: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    """Whether the host decision escalates the inputs the in-graph router does, at the escalating budget
    with the most escalations: per input, the in-graph cascade's route against the fast route's."""
    point = max((p for p in m.router.points if -NEVER < p.tau < NEVER), key=lambda p: p.escalation)
    graph = core.compile_model(cascade, "CPU", cfg).create_infer_request()
    for s in graph.query_state():
        if s.name == TAU_STATE:
            s.state = ov.Tensor(np.full(s.state.shape, point.tau, np.float32))
    host = host_decision(core.compile_model(static, "CPU", cfg).create_infer_request(),
                         precise.create_infer_request(), m.router, point.tau, m.decision)  # fmt: skip
    fast = np.array(m.fast_route_codes, np.int8)
    in_graph, on_host = [], []
    for i in range(len(x)):
        res = graph.infer([x[i][None]])
        in_graph.append(bool((np.asarray(res[len(res) - 1]).reshape(-1) != fast).any()))
        on_host.append(host([x[i][None]])[1])
    return {"max_drop": point.max_drop, "tau": point.tau, "inputs": len(x), "escalated_in_graph": sum(in_graph),
            "escalated_on_host": sum(on_host), "same": sum(a == b for a, b in zip(in_graph, on_host, strict=True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, default=RESULTS / ".cache" / "pareto" / "fmnist.apsq")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    pkg = apsq_ov.Package.load(args.package)
    m = pkg.manifest
    if m.router is None or m.cascade_level is None:
        raise SystemExit(f"{args.package}: no escalation cascade (calibrate with --router)")
    core = ov.Core()

    def body(level: int) -> ov.Model:
        return standalone_bodies(pkg.read_model(core), m, {level})[level]

    fast = m.router.fast_level
    static = f"static level {m.levels[fast].max_drop:g} (its fast route)"
    models = {
        "cascade (τ a state)": body(m.cascade_level),
        "cascade (τ folded)": fold_states(body(m.cascade_level)),
        static: split_constant_route(body(fast))[0],
    }
    cfg = {**LATENCY, "INFERENCE_PRECISION_HINT": "f32"}
    reqs: dict[str, Callable[[list[np.ndarray]], Any]] = {}
    for name, model in models.items():
        req = core.compile_model(model, "CPU", cfg).create_infer_request()
        for s in req.query_state():
            if s.name == TAU_STATE:
                s.state = ov.Tensor(np.full(s.state.shape, NEVER, np.float32))
        reqs[name] = req.infer
    # Its own requests (so that none of the rows shares a request's caches), τ never escalating as above.
    host = core.compile_model(models[static], "CPU", cfg).create_infer_request()
    precise = core.compile_model(split_constant_route(body(m.router.precise_level))[0], "CPU", cfg)
    reqs["static level + the router's decision on the host (Python)"] = host_decision(
        host, precise.create_infer_request(), m.router, NEVER, m.decision)
    reqs = {k: reqs[k] for k in [k for k in reqs if k != static] + [static]}  # the baseline last
    x = load_fashion_mnist("test")[0]
    agreement = same_decisions(core, body(m.cascade_level), models[static], precise, m, x[:1000], cfg)
    rounds: dict[str, list[float]] = {k: [] for k in reqs}
    for r in range(args.rounds):
        for name, req in reqs.items():
            t = []
            for j in range(200):
                xi = x[(r * 200 + j) % len(x)][None]
                t0 = time.perf_counter()
                req([xi])
                t.append(time.perf_counter() - t0)
            rounds[name].append(float(np.median(t)) * 1e3)
    base = float(np.median(rounds[static]))
    rows: list[dict[str, Any]] = [
        {"name": k, "median_ms": float(np.median(v)), "halves_ms": [float(np.median(v[h::2])) for h in (0, 1)],
         "vs_static": float(np.median(v)) / base} for k, v in rounds.items()]  # fmt: skip
    out = {"package": str(args.package), "cpu": host_cpu(), "rounds": args.rounds, "images_per_round": 200,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
           "host_decision_check": agreement}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cascade_overhead.json").write_text(json.dumps(out, indent=1))
    lines = ["# What the cascade costs when it escalates nothing", "",
             f"`python benchmarks/cascade_overhead.py`, {out['date']} on {out['cpu']}: {args.package.name}, 1 thread, "
             f"{args.rounds} interleaved rounds of 200 Fashion-MNIST test images, τ set so none escalates.", "",
             "| body | median ms | halves | vs static |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['name']} | {r['median_ms']:.4f} | {r['halves_ms'][0]:.4f} / {r['halves_ms'][1]:.4f} | "
              f"{r['vs_static']:.3f}x |" for r in rows]  # fmt: skip
    a = agreement
    lines += ["", f"The host decision takes the in-graph router's decision on {a['same']} of {a['inputs']} test images "
              f"at budget {a['max_drop']:g} (τ {a['tau']:.4f}; escalated: {a['escalated_in_graph']} in the graph, "
              f"{a['escalated_on_host']} on the host)."]  # fmt: skip
    (RESULTS / "cascade_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
