"""``apsq-ov bench``: every configuration a package offers — and, given the plain model, the static
baselines beside it — on clean and shifted data, in one run: quality × latency and the Pareto front.

Where it sits in the data flow: after calibration, read-only. ``apsq-ov bench PACKAGE --data DATA``
measures what the package alone can run (its FP32 level under the f32 and bf16 hints, its best static
per-op mix at each budget, its escalation cascade at each budget, the adaptive ``auto`` policy, forced
precisions); ``benchmarks/pareto.py`` adds plain OpenVINO FP32 / BF16, NNCF INT8 and NNCF
``quantize_with_accuracy_control`` through :func:`run_suite`.

Protocol (DESIGN.md §5): latency on 1 thread, LATENCY hint, f32 hint (precision in the graph), one
request per method with its policy written beforehand, methods interleaved in blocks of consecutive
inputs (every method sees every input; the order rotates per block), median and mean per input;
throughput with an async queue on all cores (THROUGHPUT hint), the median of interleaved rounds;
quality against the FP32 reference on the *same* (shifted) inputs.

Every model is compiled ``compiles`` times (default 3) and the blocks (and throughput rounds) take
the copies in turn: on this machine one graph compiled four times in one process ran at medians up to
8% apart (each copy's memory lands differently), which is as large as the differences a table of
INT8-class routes has to resolve. The median over inputs then spans every copy.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from apsq_ov.calibrate.router import as_probabilities
from apsq_ov.package import LEVEL_STATE, NEVER, Package
from apsq_ov.profiler import host_cpu  # noqa: F401  (benchmarks record it beside each run)
from apsq_ov.routing import choose_body
from apsq_ov.shifts import CALIBRATION
from apsq_ov.shifts import apply as apply_shift

LATENCY = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
THROUGHPUT = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"}
NEVER_ROW = "apsq cascade, never escalating"
"""The cascade at a budget whose τ never escalates (fast route + router): a static route in effect, so its
rows carry no ``escalated`` and are not adaptive points in :func:`dominance`."""
FAMILIES = ("baseline", "NNCF accuracy control", "apsq forced", "apsq static mix", "apsq cascade", "apsq adaptive")

Task = Callable[[np.ndarray, np.ndarray], float]
"""``task(outputs, indices) -> quality`` for metrics beyond accuracy/agreement (e.g. 1 − CER)."""


def row_key(metric: str) -> str:
    """The field of a result row that holds ``metric`` (a task metric such as ``1 - CER`` is ``task``)."""
    return metric if metric in ("accuracy", "agreement") else "task"


@dataclass
class Method:
    """One configuration under test: a raw OpenVINO request with its state written."""

    name: str
    family: str
    request: ov.InferRequest
    max_drop: float | None = None
    spares: list[ov.InferRequest] = field(default_factory=list)
    """requests on other compiled copies of the same model, taken in turn block by block"""
    fast_codes: np.ndarray | None = None
    outputs: list[np.ndarray] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    escalated: list[bool] = field(default_factory=list)
    routes: list[np.ndarray] = field(default_factory=list)
    """each input's ``apsq_route`` while :func:`measure` runs (read into ``escalated`` after it)"""


def _state(request: ov.InferRequest, values: dict[str, np.ndarray]) -> ov.InferRequest:
    states = {s.name: s for s in request.query_state()}
    for name, value in values.items():
        states[name].state = ov.Tensor(value)
    return request


def hint_not_honoured(compiled: ov.CompiledModel, hint: str) -> str:
    """What to add to a method's name when ``compiled`` does not run the inference precision ``hint`` asked
    for, else "". OpenVINO's CPU plugin drops a bf16 hint without a word on a CPU that exposes no BF16 (an
    AVX2-only EPYC runs it f32: the same outputs and latency as FP32), so a "BF16" row there is FP32's."""
    ran = compiled.get_property("INFERENCE_PRECISION_HINT")
    if ran == getattr(ov.Type, hint):
        return ""
    return f" — runs {ran.get_type_name()}: this CPU exposes no {hint.upper()}"


def plain_method(name: str, family: str, model: ov.Model, hint: str, compiles: int = 1, core: ov.Core | None = None,
                 state: dict[str, np.ndarray] | None = None) -> Method:  # fmt: skip
    """A method running ``model`` as it is under the ``hint`` inference precision, compiled ``compiles`` times
    (its name says so where the device runs another precision: :func:`hint_not_honoured`)."""
    core = core or ov.Core()
    cfg = {**LATENCY, "INFERENCE_PRECISION_HINT": hint}
    compiled = [core.compile_model(model, "CPU", cfg) for _ in range(max(compiles, 1))]
    reqs = [_state(c.create_infer_request(), state or {}) for c in compiled]
    return Method(name + hint_not_honoured(compiled[0], hint), family, reqs[0], spares=reqs[1:])


def package_methods(
    pkg: Package, *, bf16_reference: bool = True, forced: bool = True, compiles: int = 1
) -> list[Method]:
    """The methods a package runs: its FP32 level (f32 hint, and bf16 hint as the BF16 baseline), every
    static level, the cascade at every budget that escalates some inputs, and forced precisions (each
    on ``compiles`` compiled copies of the package)."""
    from apsq_ov.bodies import split_constant_route, standalone_bodies
    from apsq_ov.runtime import compile_model

    m = pkg.manifest
    core = ov.Core()
    # Every level and the cascade compiled on its own, as a deployment serving that budget would run it
    # (compile_model's default compiles the default budget's body so): no dispatch If in any timing.
    copies = [compile_model(pkg, "CPU", LATENCY, core=core, standalone="all") for _ in range(max(compiles, 1))]
    out: list[Method] = []

    def add(name: str, family: str, policy: dict[str, Any], max_drop: float | None = None) -> Method:
        reqs = []
        for compiled in copies:
            req = compiled.create_infer_request()
            req.set_policy(**policy)
            reqs.append(req.request)
        method = Method(name, family, reqs[0], max_drop, spares=reqs[1:])
        out.append(method)
        return method

    if bf16_reference:
        ir = pkg.read_model(core)
        fp32_level = standalone_bodies(ir, m, {0}).get(0)
        if fp32_level is not None:  # as compile_model runs it
            fp32_level = split_constant_route(fp32_level)[0]
        out.append(plain_method("package FP32 level, bf16 hint", "baseline", ir if fp32_level is None else fp32_level,
                                "bf16", compiles, core, {LEVEL_STATE: np.array(0, np.int32)} if fp32_level is None
                                else {}))  # fmt: skip
    for prec in m.precisions if forced else ():
        add(f"apsq forced {prec.value} (every op behind an If)", "apsq forced", {"precision": prec})
    for lv in m.levels:
        add(f"apsq static mix {lv.max_drop:g}", "apsq static mix", {"max_drop": lv.max_drop, "policy": "static"},
            lv.max_drop)  # fmt: skip
    if m.router is not None:
        fast = np.array(m.fast_route_codes, np.int8)
        for p in m.router.points:
            if -NEVER < p.tau < NEVER:
                method = add(f"apsq cascade {p.max_drop:g}", "apsq cascade",
                             {"max_drop": p.max_drop, "policy": "cascade"}, p.max_drop)  # fmt: skip
                method.fast_codes = fast
        never = [p for p in m.router.points if p.tau >= NEVER]
        if never:  # the fast route and the router, no escalation: what auto runs where it is the fastest body
            add(NEVER_ROW, "apsq cascade", {"max_drop": never[0].max_drop, "policy": "cascade"}, never[0].max_drop)
    return out


def adaptive_rows(pkg: Package, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``auto`` policy at every budget of the dial and of the cascade: it runs exactly one of the
    measured static or cascade configurations, so its rows are copies of those, renamed."""
    m = pkg.manifest
    by_name = {r["name"]: r for r in rows}
    out = []
    for d in m.budgets:
        body = choose_body(m, d)
        point = m.router.point_for(d) if m.router is not None else None
        if body.level == m.cascade_level and point is not None:  # (a τ = never budget runs a level under auto)
            src = f"apsq cascade {point.max_drop:g}"
        else:
            src = f"apsq static mix {m.levels[body.level].max_drop:g}"
        if src in by_name:
            out.append(by_name[src] | {"name": f"apsq adaptive {d:g}", "family": "apsq adaptive", "max_drop": d,
                                       "runs": src})  # fmt: skip
    return out


def measure(methods: Sequence[Method], x: np.ndarray, *, block: int = 25, progress: Any = None,
            desc: str = "measure", output: int = 0, keep_routes: bool = False) -> None:  # fmt: skip
    """Every input through every method, block by block (see the module docstring); each keeps its
    output ``output`` (the one calibration judged: every method has the source model's outputs in order)
    and, with ``keep_routes``, each input's ``apsq_route`` (where its graph has one) in ``routes``."""
    clock = time.perf_counter
    for meth in methods:
        for req in [meth.request, *meth.spares]:
            for i in range(min(5, len(x))):
                req.infer([x[i : i + 1]])
    task = None
    if progress is not None:
        task = progress.add_task(desc, total=len(x))
    for b, start in enumerate(range(0, len(x), block)):
        k = b % len(methods)
        stop = min(start + block, len(x))
        for meth in [*methods[k:], *methods[:k]]:
            reqs = [meth.request, *meth.spares]
            req = reqs[b % len(reqs)]
            for i in range(start, stop):
                t0 = clock()
                res = req.infer([x[i : i + 1]])
                meth.ms.append((clock() - t0) * 1e3)
                meth.outputs.append(np.array(res[output]))
                meth.index.append(i)
                if len(res) > 1:  # every package row keeps its route the same way (copies: cheap, even)
                    meth.routes.append(np.array(res[len(res) - 1]))
        if task is not None:
            progress.advance(task, stop - start)
    # Escalations are read off the routes after the timing: comparing the route between two timed
    # inferences slowed the next one by ~8 µs (7% of a Fashion-MNIST inference, measured), which only
    # the cascade rows paid while a copy of the route costs nothing measurable.
    for meth in methods:
        if meth.fast_codes is not None:
            meth.escalated = [bool((r.reshape(-1) != meth.fast_codes).any()) for r in meth.routes]
        if not keep_routes:
            meth.routes.clear()


def quality(meth: Method, reference: np.ndarray, labels: np.ndarray | None, task: Task | None) -> dict[str, Any]:
    """Quality of one method's outputs (in input order) against the FP32 ``reference`` outputs."""
    order = np.argsort(meth.index)
    y = np.stack(meth.outputs)[order]
    idx = np.asarray(meth.index)[order]
    n = len(y)
    top = y.argmax(-1).reshape(n, -1)
    ref_top = reference.argmax(-1).reshape(n, -1)
    pr = as_probabilities(reference)
    q: dict[str, Any] = {
        "agreement": float(np.mean((top == ref_top).all(1))),
        "kl": float(np.mean(np.sum(pr * (np.log(pr) - np.log(as_probabilities(y))), -1))),
        "median_ms": float(np.median(meth.ms)),
        "mean_ms": float(np.mean(meth.ms)),
        "p90_ms": float(np.percentile(meth.ms, 90)),
    }
    if labels is not None:
        q["accuracy"] = float(np.mean(top[:, 0] == labels[idx]))
    if task is not None:
        q["task"] = task(y, idx)
    if meth.escalated:
        q["escalated"] = float(np.mean(meth.escalated))
    return q


ESCALATION_BATCH = 8
"""Escalated inputs re-run together in the throughput rows served by the cascade (``escalation_batch``)."""
WARMUP_S = 0.2
"""Seconds every throughput configuration runs on each compiled copy, untimed, before its rounds."""


def _queue(compiled: ov.CompiledModel, setup: Callable[[ov.InferRequest], None] | None) -> ov.AsyncInferQueue:
    """An ``AsyncInferQueue`` of twice the optimal number of requests (the number ``AdaptiveAsyncInferQueue``
    takes; on this machine EfficientNet-Lite0's NNCF INT8 ran 11% faster with it than with the optimal
    number) whose callback reads every output, as an application does (the adaptive queue's callback
    reads every result)."""
    jobs = 2 * int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue = ov.AsyncInferQueue(compiled, jobs)
    for req in queue:
        if setup is not None:
            setup(req)
    queue.set_callback(_read_outputs)
    return queue


def _read_outputs(request: ov.InferRequest, _userdata: Any) -> None:
    for tensor in request.output_tensors:
        tensor.data.copy()


def _rate(start: Callable[[np.ndarray], None], wait: Callable[[], None], x: np.ndarray, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(len(x)):
            start(x[i : i + 1])
            n += 1
            if n % 64 == 0 and time.perf_counter() - t0 >= seconds:
                break
    wait()
    return n / (time.perf_counter() - t0)


def _engine_queue(adaptive: Any, max_drop: float) -> ov.AsyncInferQueue:
    """The graph ``max_drop``'s policy runs on, in a plain :func:`_queue` with that policy written into every
    request beforehand: the engine without ``AdaptiveAsyncInferQueue``'s per-input Python."""
    from apsq_ov.runtime import AdaptiveInferRequest

    plan = adaptive.plan(max_drop=max_drop)
    compiled = adaptive.compiled_for(plan)
    body = plan.level if compiled is not adaptive.compiled_model else None

    def setup(req: ov.InferRequest) -> None:
        AdaptiveInferRequest(adaptive, req, body=body).set_policy(max_drop=max_drop)

    return _queue(compiled, setup)


def _queue_rate(queue: ov.AsyncInferQueue, x: np.ndarray, seconds: float) -> float:
    """Inputs per second through a plain queue, each input copied into the next idle request's input tensor
    and that request started without inputs, as :class:`~apsq_ov.async_queue.AdaptiveAsyncInferQueue` feeds its
    requests (``start_async(array)`` runs OpenVINO's Python input dispatch per call: on this machine
    Fashion-MNIST's NNCF INT8 ran 25% slower fed that way)."""
    tensors = [queue[i].get_input_tensor(0).data for i in range(len(queue))]

    def start(xi: np.ndarray) -> None:
        np.copyto(tensors[queue.get_idle_request_id()], xi)  # the request start_async takes next
        queue.start_async()

    return _rate(start, queue.wait_all, x, seconds)


def plain_rate(compiled: ov.CompiledModel, x: np.ndarray, seconds: float) -> float:
    """Inputs per second of ``compiled`` in a plain ``openvino.AsyncInferQueue`` (:func:`_queue`), fed as every
    throughput row here is (:func:`_queue_rate`), after :data:`WARMUP_S` untimed."""
    queue = _queue(compiled, None)
    _queue_rate(queue, x, WARMUP_S)
    return _queue_rate(queue, x, seconds)


def _adaptive_rate(queue: Any, x: np.ndarray, max_drop: float, timing: tuple[list[float], list[float]] | None,
                   seconds: float) -> float:  # fmt: skip
    """Inputs per second through an ``AdaptiveAsyncInferQueue`` at ``max_drop``; with ``timing``, each input's
    time from start to callback goes to ``timing[0]`` (escalated) or ``timing[1]`` (the others), ms."""

    def done(request: Any, started: float) -> None:
        res = request.get_result()
        if timing is not None:
            timing[0 if res.escalated else 1].append(1e3 * (time.perf_counter() - started))

    queue.set_callback(done)
    return _rate(lambda xi: queue.start_async(xi, time.perf_counter(), max_drop=max_drop), queue.wait_all, x, seconds)


def pareto_flags(rows: list[dict[str, Any]], key: str) -> None:
    """Mark each row ``pareto`` (no other row is at least as good in ``key`` and at least as fast in
    median latency, and strictly better in one)."""
    for r in rows:
        r["pareto"] = not any(
            o is not r and o[key] >= r[key] and o["median_ms"] <= r["median_ms"]
            and (o[key] > r[key] or o["median_ms"] < r["median_ms"])
            for o in rows
        )  # fmt: skip


RIVALS = ("NNCF accuracy control", "apsq static mix")
"""The families adaptive routing has to beat (:func:`dominance`)."""


def _dominates(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """``a`` is at least as good in ``key`` and as fast (median), and strictly better in one."""
    no_worse = a[key] >= b[key] and a["median_ms"] <= b["median_ms"]
    return no_worse and (a[key] > b[key] or a["median_ms"] < b["median_ms"])


def dominance(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Adaptive routing vs NNCF accuracy control and the best static mix. The adaptive points are the
    ``auto`` rows that run the cascade (where ``auto`` picks a static level, that row *is* the static
    mix). Holds when no adaptive point is dominated by a rival and one strictly dominates a rival."""
    adaptive = [r for r in rows if r["family"] == "apsq adaptive" and "escalated" in r]
    rivals = [r for r in rows if r["family"] in RIVALS]

    dominated = [(a["name"], b["name"]) for a in adaptive for b in rivals if _dominates(b, a, key)]
    dominating = [(a["name"], b["name"]) for a in adaptive for b in rivals if _dominates(a, b, key)]
    holds = bool(adaptive) and not dominated and bool(dominating)
    return {"adaptive_points": [a["name"] for a in adaptive], "adaptive_dominated_by": dominated,
            "adaptive_dominates": dominating, "holds": holds,
            "margins": [_margin(b, a, key) for a in adaptive for b in rivals if _dominates(b, a, key)],
            "closest": [] if dominating else _closest(adaptive, rivals, key)}  # fmt: skip


def _margin(winner: dict[str, Any], loser: dict[str, Any], key: str) -> dict[str, Any]:
    """By how much ``winner`` beats ``loser``: quality (its units, ×100 = points) and median ms."""
    return {"winner": winner["name"], "loser": loser["name"], "quality": winner[key] - loser[key],
            "ms": loser["median_ms"] - winner["median_ms"]}  # fmt: skip


def _closest(adaptive: list[dict[str, Any]], rivals: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Where no adaptive point dominates a rival, the nearest misses: the adaptive point that lacks the
    least quality to dominate a rival it is already as fast as, and the one that is the least slower than a
    rival it is already as good as (what a point would have to gain to dominate)."""
    out = []
    by_quality = [(b[key] - a[key], a, b) for a in adaptive for b in rivals
                  if a["median_ms"] <= b["median_ms"] and a[key] <= b[key]]  # fmt: skip
    if by_quality:
        gap, a, b = min(by_quality, key=lambda t: t[0])
        out.append({"adaptive": a["name"], "rival": b["name"], "lacks": "quality", "gap": gap,
                    "note": "a tie in both" if gap == 0 and a["median_ms"] == b["median_ms"] else ""})  # fmt: skip
    by_time = [(a["median_ms"] - b["median_ms"], a, b) for a in adaptive for b in rivals
               if a[key] >= b[key] and a["median_ms"] > b["median_ms"]]  # fmt: skip
    if by_time:
        gap, a, b = min(by_time, key=lambda t: t[0] / t[2]["median_ms"])
        out.append({"adaptive": a["name"], "rival": b["name"], "lacks": "latency", "gap": gap,
                    "ratio": a["median_ms"] / b["median_ms"]})  # fmt: skip
    return out


def run_suite(
    model_name: str,
    pkg: Package,
    model: ov.Model | None,
    statics: dict[str, ov.Model],
    x: np.ndarray,
    shifts: Sequence[str],
    *,
    labels: np.ndarray | None,
    metric: str,
    task: Task | None = None,
    progress: Any = None,
    throughput_s: float = 5.0,
    forced_shifts: Sequence[str] | None = None,
    compiles: int = 3,
) -> dict[str, Any]:
    """Measure every method on ``x`` under each shift.

    :param model: the plain model (None: the package's FP32 level stands in as the reference).
    :param statics: name → static model compiled as it is (NNCF INT8, accuracy-control results).
    :param metric: ``accuracy``, ``agreement`` or the name of ``task``'s quality.
    :param forced_shifts: the shifts to measure forced precisions on (``None``: all). Every op behind its
        own If is slow on big models; its quality is the plain precision's.
    :param compiles: compiled copies of every model, taken in turn (see the module docstring).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    core = ov.Core()
    lo, hi = float(x.min()), float(x.max())
    key = row_key(metric)
    result: dict[str, Any] = {"model": model_name, "metric": metric, "samples": int(len(x)), "package": str(pkg.path),
                              "value_range": [lo, hi], "compiles": max(compiles, 1), "shifts": {}}  # fmt: skip
    plain: list[tuple[str, str, ov.Model, str]] = []
    if model is not None:
        plain += [("OpenVINO FP32", "baseline", model, "f32"), ("OpenVINO BF16 (bf16 hint)", "baseline", model, "bf16")]
    for name, sm in statics.items():
        plain.append((name, "NNCF accuracy control" if "accuracy control" in name else "baseline", sm, "f32"))
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=progress, disable=progress is None) as bar:
        for s in shifts:
            xs = apply_shift(x, s, lo, hi, seed=1)
            methods = [plain_method(n, f, m, h, compiles, core) for n, f, m, h in plain]
            forced = forced_shifts is None or s in forced_shifts
            methods += package_methods(pkg, bf16_reference=model is None, forced=forced, compiles=compiles)
            measure(methods, xs, progress=bar, desc=f"{model_name} · {s} · {len(methods)} methods",
                    output=pkg.manifest.decision.output)
            if not pkg.manifest.decision.identity:  # every output as the class scores calibration judged
                for meth in methods:
                    meth.outputs = [pkg.manifest.decision.scores(o) for o in meth.outputs]
            ref = next(m for m in methods if m.name == "OpenVINO FP32" or (m.family == "apsq static mix"
                                                                           and m.max_drop == 0.0))  # fmt: skip
            reference = np.stack(ref.outputs)[np.argsort(ref.index)]
            rows = [{"name": m.name, "family": m.family, "max_drop": m.max_drop} | quality(m, reference, labels, task)
                    for m in methods]  # fmt: skip
            rows += adaptive_rows(pkg, rows)
            pareto_flags(rows, key)
            bound = oracle_bound(pkg, methods, reference, labels, task, key, rows)
            # Every method's outputs and compiled copies go before the next compile (PP-OCRv4: ~1 MB of
            # outputs per input and method: 8 GB a shift).
            del methods, ref, reference
            entry: dict[str, Any] = {"rows": rows, "seen_by_calibration": s in CALIBRATION,
                                     "dominance": dominance(rows, key)}  # fmt: skip
            if bound is not None:
                entry["perfect_router"] = bound
            if s == "clean" and throughput_s > 0:
                waits: dict[str, dict[str, float]] = {}
                entry["throughput"] = throughputs(pkg, plain, xs, throughput_s, compiles=compiles, waits=waits)
                entry["throughput_waits"] = waits
                entry["throughput_feed"] = "copied"  # how queues got their inputs (see write_markdown)
            result["shifts"][s] = entry
    return result


def throughputs(pkg: Package, plain: list[tuple[str, str, ov.Model, str]], x: np.ndarray,
                seconds: float, rounds: int = 6, compiles: int = 3,
                waits: dict[str, dict[str, float]] | None = None) -> dict[str, float]:  # fmt: skip
    """Async throughput (all cores) of the static baselines and of the adaptive policy at each budget: the
    median of ``rounds`` runs of ``seconds / rounds`` each, the configurations interleaved round by round
    (a shared machine's load drifts; each round sees it for every configuration), round ``r`` on compiled
    copy ``r % compiles`` of each model.

    Baselines run in an ``openvino.AsyncInferQueue`` (:func:`_queue`), the adaptive policy in the
    :class:`~apsq_ov.async_queue.AdaptiveAsyncInferQueue` an application uses (its callback reading every
    result); where ``auto`` serves a budget with the cascade, ``apsq adaptive <d>`` batches the escalated
    re-runs (``escalation_batch`` = :data:`ESCALATION_BATCH`, the queue's default timeout) and
    ``apsq adaptive <d>, in-graph escalation`` re-runs each inside the graph; ``apsq adaptive <d>, engine`` is
    the graph that policy runs (in-graph escalation) in a plain :func:`_queue`, the policy written into its
    requests beforehand (what the engine costs without the adaptive queue's Python). ``waits``, if given, gets per
    batched row the median and 95th percentile of the time from ``start_async`` to the callback, escalated
    inputs and the others apart, ms."""
    from apsq_ov.async_queue import AdaptiveAsyncInferQueue
    from apsq_ov.runtime import AdaptiveCompiledModel, compile_model

    core = ov.Core()
    k = max(compiles, 1)
    runs: dict[str, list[Callable[[float], float]]] = {}
    for name, _, m, hint in plain:
        cfg = {**THROUGHPUT, "INFERENCE_PRECISION_HINT": hint}
        compiled = [core.compile_model(m, "CPU", cfg) for _ in range(k)]
        runs[name + hint_not_honoured(compiled[0], hint)] = [functools.partial(_queue_rate, _queue(c, None), x)
                                                             for c in compiled]  # fmt: skip
    plain_names = list(runs)  # as named in the rows (a hint the CPU does not honour says so)
    man = pkg.manifest
    batch = ESCALATION_BATCH if man.router is not None else 0
    copies = [compile_model(pkg, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"}, core=core, standalone="all",
                            escalation_batch=batch) for _ in range(k)]  # fmt: skip
    in_graph = [AdaptiveCompiledModel(c.compiled_model, man, device=c.device, standalone=c.standalone,
                                      standalone_routes=c.standalone_routes) for c in copies]  # fmt: skip
    timings: dict[str, tuple[list[float], list[float]]] = {}
    same: dict[str, str] = {}  # row name → the row that runs the same body and τ
    bodies: dict[Any, str] = {}
    names = []
    for d in man.budgets:
        name = f"apsq adaptive {d:g}"
        key = choose_body(man, d)
        cascade = key.level == man.cascade_level
        suffixes = ["", ", in-graph escalation", ", engine"] if cascade else ["", ", engine"]
        names += [name + x for x in suffixes]
        if key in bodies:
            same |= {name + x: bodies[key] + x for x in suffixes}
            continue
        bodies[key] = name
        timing = timings[name] = ([], [])
        runs[name] = [functools.partial(_adaptive_rate, AdaptiveAsyncInferQueue(c), x, d, timing) for c in copies]
        if cascade:
            runs[f"{name}, in-graph escalation"] = [
                functools.partial(_adaptive_rate, AdaptiveAsyncInferQueue(c), x, d, None) for c in in_graph
            ]
        runs[f"{name}, engine"] = [functools.partial(_queue_rate, _engine_queue(c, d), x) for c in in_graph]
    rates: dict[str, list[float]] = {n: [] for n in runs}
    order = list(runs)
    # Untimed first runs: OpenVINO allocates a request's memory on its first inference, and the adaptive
    # queue creates its requests when an input first needs them — both belong to setup, not to a round.
    for name in order:
        for run in runs[name]:
            run(WARMUP_S)
    for esc, rest in timings.values():
        esc.clear()
        rest.clear()
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            rates[name].append(runs[name][r % k](seconds / rounds))
    out = {n: float(np.median(v)) for n, v in rates.items()}
    out |= {n: out[v] for n, v in same.items()}
    if waits is not None:
        for name, (esc, rest) in timings.items():
            if esc and rest:
                waits[name] = {"escalated_median_ms": float(np.median(esc)),
                               "escalated_p95_ms": float(np.percentile(esc, 95)),
                               "other_median_ms": float(np.median(rest)),
                               "other_p95_ms": float(np.percentile(rest, 95)),
                               "escalated_share": len(esc) / (len(esc) + len(rest))}  # fmt: skip
    return {n: out[n] for n in [*plain_names, *names]}


def oracle_bound(pkg: Package, methods: Sequence[Method], reference: np.ndarray, labels: np.ndarray | None,
                 task: Task | None, key: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:  # fmt: skip
    """What a *perfect* router could reach with this package's static levels: each level as the fast route,
    escalating exactly the inputs whose top-1 (at any position) differs from the precise level's — or, for a
    package that judges a CTC output as text, whose decoded text differs: the event the router is fitted to
    predict — to the precise level (the router's, else FP32). Every method
    saw every input, so each input is timed as the fast level's time + the router's (the never-escalating
    cascade's median over the fastest level's) + the precise level's on the inputs it escalates.

    An upper bound for escalating whole inputs (a real router also misses and over-escalates); ``possible``:
    whether such points could satisfy :func:`dominance` against ``rows``' rivals — some oracle point that
    no rival dominates strictly dominates a rival. None where the package has a single level.
    """
    m = pkg.manifest
    if len(m.levels) < 2:
        return None
    precise_k = m.router.precise_level if m.router is not None else 0
    by_name = {meth.name: meth for meth in methods}
    found = [by_name.get(f"apsq static mix {lv.max_drop:g}") for lv in m.levels]
    level_rows = [r for r in found if r is not None]
    if len(level_rows) != len(found):
        return None
    precise = level_rows[precise_k]
    never = by_name.get(NEVER_ROW)
    fastest = level_rows[m.router.fast_level] if m.router is not None else None
    router_ms = max(0.0, float(np.median(never.ms) - np.median(fastest.ms))) if never and fastest else 0.0

    def ordered(meth: Method) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(meth.index)
        return np.stack(meth.outputs)[order], np.asarray(meth.ms)[order]

    y_p, ms_p = ordered(precise)
    top_p = y_p.argmax(-1)
    out = []
    for k, meth in enumerate(level_rows):
        if k == precise_k:
            continue
        y, ms = ordered(meth)
        esc = np.array([m.decision.disagreement(a, b) > 0 for a, b in zip(y.argmax(-1), top_p, strict=True)])
        bound = Method(f"perfect router from apsq static mix {m.levels[k].max_drop:g}", "perfect-router bound",
                       meth.request, m.levels[k].max_drop)  # fmt: skip
        bound.outputs = list(np.where(esc.reshape((-1,) + (1,) * (y.ndim - 1)), y_p, y))
        bound.index = list(range(len(y)))
        bound.ms = list(ms + router_ms + esc * ms_p)
        bound.escalated = [bool(e) for e in esc]
        out.append({"name": bound.name, "family": bound.family, "max_drop": bound.max_drop}
                   | quality(bound, reference, labels, task))  # fmt: skip
    rivals = [r for r in rows if r["family"] in RIVALS]
    free = [o for o in out if not any(_dominates(r, o, key) for r in rivals)]
    winners = [o["name"] for o in free if any(_dominates(o, r, key) for r in rivals)]
    return {"rows": out, "router_ms": router_ms, "precise": precise.name,
            "differs": "decoded text" if m.decision.sequence == "ctc" else "top-1",
            "undominated": [o["name"] for o in free], "winners": winners, "possible": bool(winners)}  # fmt: skip


# ------------------------------------------------------------------------------------------- reports


def _fmt_q(r: dict[str, Any], key: str) -> str:
    return f"{100 * r[key]:.2f}"


def write_markdown(result: dict[str, Any], path: Path, plots: Path) -> None:
    """``BENCHMARKS.md`` from ``pareto.json`` (one section per model, one table per shift) and the PNGs."""
    lines = ["# Benchmarks: accuracy × latency of every static choice and of adaptive routing", "",
             f"Generated by `python benchmarks/pareto.py` on {result.get('machine')} "
             f"(OpenVINO {result.get('openvino')}).",
             "Latency: 1 thread, LATENCY hint, f32 hint, median over all inputs (mean beside it), methods "
             "interleaved in blocks of 25 inputs; ratios against NNCF INT8 in the same run. Throughput: async "
             "queue, all cores, THROUGHPUT hint, clean data, median of 6 interleaved rounds; every queue twice the "
             "optimal number of requests, each input copied into the idle request's input tensor and the request "
             "started without inputs, its callback reading every result, the adaptive rows through "
             f"`AdaptiveAsyncInferQueue` (escalations re-run {ESCALATION_BATCH} at a time, or in the graph where "
             "marked). Every model compiled "
             + ", ".join(sorted({f"{r.get('compiles', 1)}x" for r in result.get("models", {}).values()}))
             + ", the blocks and rounds taking the copies in turn (one graph compiled twice can run several % "
             "apart). ★ = on the Pareto front of that table. "
             "Shifts marked *seen* are kinds the router was fitted on (milder copies of the calibration data: "
             + ", ".join(f"{k} {v:g}" for k, v in result.get("calibration_shifts", {}).items()) + "); the others "
             "calibration never saw.", ""]  # fmt: skip
    for name, res in result.get("models", {}).items():
        key = row_key(res["metric"])
        lines += [f"## {res['model']} ({res['samples']} inputs; quality = {res['metric']})", "",
                  (f"Run of {res['date']}" + (f" on {res['cpu']}." if "cpu" in res else ".") if "date" in res
                   else "An earlier run (before runs were dated).")
                  + (f" Calibrated on {res['calibrated_on']}." if "calibrated_on" in res else "")
                  + (f" Profile: {res['profile']}." if "profile" in res else ""), ""]
        for s, entry in res["shifts"].items():
            rows = entry["rows"]
            base = next((r for r in rows if r["name"] == "NNCF INT8"), rows[0])
            seen = " (seen by calibration)" if entry["seen_by_calibration"] else ""
            seen = seen or (" (never seen by calibration)" if s != "clean" else "")
            png = plots / f"pareto_{name}_{s}.png"
            plot(rows, key, png, f"{res['model']} · {s}")
            lines += [f"### {s}{seen}", "", f"![{name} {s}]({png.relative_to(path.parent)})", "",
                      f"| method | family | {res['metric']} % | agreement % | KL | median ms | mean ms "
                      "| vs NNCF INT8 | escalated |",
                      "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in sorted(rows, key=lambda r: (FAMILIES.index(r["family"]), r["median_ms"])):
                star = " ★" if r.get("pareto") else ""
                esc = f"{100 * r['escalated']:.1f}%" if "escalated" in r else ""
                lines.append(f"| {r['name']}{star} | {r['family']} | {_fmt_q(r, key)} | {100 * r['agreement']:.2f} | "
                             f"{r['kl']:.4f} | {r['median_ms']:.3f} | {r['mean_ms']:.3f} | "
                             f"{r['median_ms'] / base['median_ms']:.2f}x | {esc} |")  # fmt: skip
            d = entry["dominance"] = dominance(rows, key)
            worst = ", ".join(f"{m['loser']} by {m['winner']} ({100 * m['quality']:+.2f} pt, {m['ms']:+.3f} ms)"
                              for m in d["margins"][:4])  # fmt: skip
            lines += ["", f"Adaptive (the cascade points of `auto`: {len(d['adaptive_points'])}) vs NNCF accuracy "
                      f"control and the best static mix: **{'holds' if d['holds'] else 'does not hold'}** — "
                      f"adaptive points dominated: {len({a for a, _ in d['adaptive_dominated_by']})}"
                      + (f" ({worst}: the rival's lead in {res['metric']}, the adaptive point's extra median)"
                         if worst else "")
                      + f"; rival points an adaptive one strictly dominates: "
                      f"{len({b for _, b in d['adaptive_dominates']})}."]  # fmt: skip
            if not d["adaptive_points"]:
                why = ("at every budget, calibration timed a static level faster than the cascade"
                       if any(r["family"] == "apsq cascade" and "escalated" in r for r in rows)
                       else "the package has no escalation cascade")  # fmt: skip
                lines.append(f"No budget of `auto` runs the cascade on this model ({why}): no adaptive point to "
                             "compare.")  # fmt: skip
            lines += [*closest_lines(d, res["metric"]), ""]
            lines += bound_lines(entry.get("perfect_router"), key)
            if "throughput" in entry:
                tp = entry["throughput"]
                ref = tp.get("NNCF INT8")
                if entry.get("throughput_feed") != "copied":
                    lines += ["Throughput of an earlier run: every queue fed through `start_async(array)` (OpenVINO's "
                              "Python input dispatch per input), the adaptive queue checking NaN/Inf in its "
                              "callback.", ""]  # fmt: skip
                lines += ["| async throughput (clean) | inputs/s | vs NNCF INT8 |", "|---|---|---|"]
                lines += [f"| {k} | {v:.0f} | {v / ref:.2f}x |" if ref else f"| {k} | {v:.0f} | |"
                          for k, v in tp.items()]
                lines += ["", *wait_lines(entry.get("throughput_waits", {})), ""]
    path.write_text("\n".join(lines) + "\n")


def closest_lines(d: dict[str, Any], metric: str) -> list[str]:
    """Markdown: by how much the nearest adaptive points miss dominating a rival (:func:`_closest`)."""
    out = []
    for c in d.get("closest", []):
        if c["lacks"] == "quality":
            what = (f"ties {c['rival']} in both" if c["note"] else
                    f"is no slower than {c['rival']} but {100 * c['gap']:.2f} pt short in {metric}")  # fmt: skip
        else:
            what = (f"is no worse than {c['rival']} in {metric} but {c['gap']:.3f} ms ({c['ratio']:.2f}x) slower "
                    "in median")  # fmt: skip
        out.append(f"Nearest miss: {c['adaptive']} {what}.")
    return [" ".join(out)] if out else []


def bound_lines(bound: dict[str, Any] | None, key: str) -> list[str]:
    """Markdown: the perfect-router bound of one table (:func:`oracle_bound`), in one paragraph."""
    if not bound:
        return []
    rows = bound["rows"]
    fast = min(rows, key=lambda r: (r["median_ms"], -r[key]))
    if bound["possible"]:
        verdict = (f"**would hold** ({len(bound['winners'])} of {len(rows)} starting mixes give a point no rival "
                   "dominates that dominates one)")  # fmt: skip
    elif bound["undominated"]:
        verdict = "**would not hold** (points no rival dominates, but none dominating a rival)"
    else:
        verdict = "**would not hold** (a rival dominates every such point)"
    differs = bound.get("differs", "top-1")  # (older pareto.json: top-1)
    return [f"Perfect-router bound (escalating exactly the inputs whose {differs} differs from {bound['precise']}'s, "
            f"router {bound['router_ms']:.3f} ms; FP32 agreement, not the label, is what a router predicts): "
            f"from the fastest start, apsq static mix {fast['max_drop']:g}, {_fmt_q(fast, key)} at "
            f"{fast['median_ms']:.3f} ms (mean {fast['mean_ms']:.3f}, {100 * fast['escalated']:.1f}% escalated); "
            f"with such points alone dominance {verdict}.", ""]  # fmt: skip


def wait_lines(waits: dict[str, dict[str, float]]) -> list[str]:
    """Markdown: what batching the escalations costs the escalated inputs (start → callback, in the queue)."""
    if not waits:
        return []
    lines = ["| batched escalations: start → callback | escalated | median ms | p95 ms | others: median ms | p95 ms |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for k, w in waits.items():
        cells = [f"{100 * w['escalated_share']:.1f}%"] + [f"{w[c]:.1f}" for c in (
            "escalated_median_ms", "escalated_p95_ms", "other_median_ms", "other_p95_ms")]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict[str, Any]], key: str, path: Path, title: str) -> None:
    """Quality vs median latency, one line per method family (baselines as single points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"apsq static mix": "o", "apsq cascade": "^", "apsq adaptive": "D", "NNCF accuracy control": "v"}
    for fam in FAMILIES:
        mine = [r for r in rows if r["family"] == fam]
        if not mine:
            continue
        if fam in ("baseline", "apsq forced"):
            for r in mine:
                ax.scatter([r["median_ms"]], [100 * r[key]], marker="s" if fam == "baseline" else "x", s=40, c="k")
                ax.annotate(r["name"].replace(" (every op behind an If)", ""), (r["median_ms"], 100 * r[key]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
            continue
        mine.sort(key=lambda r: (r["max_drop"] if r.get("max_drop") is not None else 0.0, r["median_ms"]))
        ax.plot([r["median_ms"] for r in mine], [100 * r[key] for r in mine], marker=markers.get(fam, "o"), ms=5,
                lw=1, alpha=0.8, label=fam + (" (along the dial)" if fam.startswith("apsq") else ""))  # fmt: skip
    front = sorted((r["median_ms"], 100 * r[key]) for r in rows if r.get("pareto"))
    if front:
        xs, ys = [p[0] for p in front], [p[1] for p in front]
        ax.step(xs, ys, where="post", ls="--", c="grey", lw=1, label="Pareto front")
    ax.set_xlabel("median latency per input, ms (1 thread)")
    ax.set_ylabel(f"{key} %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
