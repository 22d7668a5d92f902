"""The runtime engine: compile an adaptive package and route every input per operator.

Where it sits in the data flow: the last stage. :func:`compile_model` reads a package (or takes
an in-memory adaptive model during calibration), compiles it with the device profile's config,
and returns an :class:`AdaptiveCompiledModel`; its :class:`AdaptiveInferRequest` mirrors
``openvino.InferRequest`` and adds keyword-only ``max_drop=``, ``precision=``, ``precision_map=``.

The policy lives in per-request state (ReadValue/Assign variables), so requests never share it
and changing it costs a few scalar writes, no recompilation. The package IR dispatches between its
bodies with ``If`` ops, and every ``If`` a body sits below copies that body's inputs on every pass
(~3% of EfficientNet-Lite0's INT8 throughput per ``If`` on this CPU); so :func:`compile_model` also
compiles the bodies a policy runs most — by default the one the package's default policy selects —
as models of their own (:func:`~apsq_ov.bodies.standalone_bodies`), and a request whose policy selects such a body
runs it there, its state (τ) in that request's own ReadValue variables. Which branch each op actually took
comes back from the graph itself (the ``apsq_route`` output), because the in-graph range check can
override the requested mode per input; a standalone body whose route is a constant (a level without
per-input routed ops) is compiled without that output and the runtime hands the constant out
(:func:`~apsq_ov.bodies.split_constant_route`: the output cost 4% of a 0.13 ms inference on this CPU).

:func:`compile_model` can also split the escalation cascade in two (``escalation_batch=N``,
:func:`~apsq_ov.bodies.escalation_graphs`): the fast route with the router's decision as an extra output, and the
precise route with a free batch axis. An :class:`AdaptiveAsyncInferQueue` then runs each cascade input
on the fast graph only and re-runs the escalated ones together, N at a time (or whatever has gathered
after ``escalation_timeout`` seconds, as OpenVINO's auto-batching does). Results are those of the
in-graph cascade (same decision, same precise route); an escalated input's callback comes later, when
its batch has run. Meant for devices where an ``If`` is a host round trip (GPU) or batching pays: on
this CPU it measured slower than the in-graph re-runs (EfficientNet-Lite0 at max-drop 0.08: 0.869x vs
0.884x NNCF INT8 async; ``benchmarks/results/throughput.md``).
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from apsq_ov.bodies import escalation_graphs, split_constant_route, standalone_bodies
from apsq_ov.errors import ConfigError, DataError, DeviceError
from apsq_ov.inputs import InputSpec, request_arrays
from apsq_ov.package import (
    LEVEL_STATE,
    LIMITS_STATE,
    MODES_STATE,
    ROUTE_OUTPUT,
    TAU_STATE,
    Manifest,
    Package,
)
from apsq_ov.precision import Precision
from apsq_ov.routing import Route, check_max_drop, choose_body, plan_routes


@dataclass
class AdaptiveResult:
    """Outputs of one inference and the route it took.

    :param outputs: model output name → array (the model's own outputs, not ``apsq_route``).
    :param route: precision code taken by each routed op (``Precision.from_code``), in ``route_ops`` order.
    :param route_ops: names of the routed ops.
    :param nonfinite: the input held NaN/Inf and was run at fp32 everywhere.
    :param escalated: under the escalation cascade, whether the router re-ran this input on the precise
        route (None when the request ran a level or the full body).
    """

    outputs: dict[str, np.ndarray]
    route: np.ndarray
    route_ops: list[str]
    nonfinite: bool = False
    escalated: bool | None = None

    def __getitem__(self, key: str | int) -> np.ndarray:
        if isinstance(key, int):
            return list(self.outputs.values())[key]
        return self.outputs[key]

    def route_precisions(self) -> dict[str, Precision]:
        return {n: Precision.from_code(int(c)) for n, c in zip(self.route_ops, self.route, strict=True)}


@dataclass(frozen=True)
class Plan:
    """What a request runs: ``level`` (index of a level body, the escalation cascade's, or the fully
    routed body's), for the cascade its threshold ``tau``, and for the full body every routed op's mode
    and range limit (by op index)."""

    level: int
    routes: dict[int, Route]
    tau: float | None = None


_FAST = "escalation/fast"  # AdaptiveInferRequest's key for a request of the cascade's fast graph
_FP32_POLICY = (0.0, None, None, "static")  # what an input holding NaN/Inf runs: the fp32 level


def _holds_nonfinite(arrays: Iterable[np.ndarray]) -> bool:
    """Whether any float array holds NaN/Inf (the in-graph range check cannot see NaN: its comparisons are
    false, so such inputs run the FP32 level)."""
    return any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in arrays)


def _policy_key(max_drop: Any, precision: Any, precision_map: Mapping[str, Any] | None, policy: str) -> tuple:
    pm = tuple(sorted((k, str(v)) for k, v in precision_map.items())) if precision_map else ()
    return (max_drop, None if precision is None else str(precision), pm, policy)


class AdaptiveCompiledModel:
    """A compiled adaptive model. Wraps :class:`openvino.CompiledModel` (``.compiled_model``: the package
    IR, every body behind its dispatch) and the bodies compiled on their own (``.standalone``: body index →
    :class:`openvino.CompiledModel`), which requests whose policy selects them run instead."""

    def __init__(self, compiled: ov.CompiledModel, manifest: Manifest, *, device: str,
                 standalone: Mapping[int, ov.CompiledModel] | None = None,
                 escalation: BatchedEscalation | None = None,
                 standalone_routes: Mapping[int, np.ndarray] | None = None) -> None:  # fmt: skip
        self.compiled_model = compiled
        self.manifest = manifest
        self.device = device
        names = [out.get_any_name() if out.get_names() else "" for out in compiled.outputs]
        self._route_index = names.index(ROUTE_OUTPUT)
        found = [n or f"output{i}" for i, n in enumerate(names) if i != self._route_index]
        # The manifest's names are the model's as calibration read them (``output<i>`` where it had none);
        # the IR written to disk may carry generated tensor names for those, so the manifest wins.
        self._output_names = list(manifest.outputs) if len(manifest.outputs) == len(found) else found
        self._output_ports = [i for i in range(len(names)) if i != self._route_index]
        self.standalone = dict(standalone or {})
        self.standalone_routes = {k: np.asarray(r, np.int8).reshape(-1) for k, r in (standalone_routes or {}).items()}
        """standalone body index → its route, for bodies compiled without the route output (a constant:
        :func:`~apsq_ov.bodies.split_constant_route`)"""
        self.escalation = escalation
        checked = list(self.standalone.items()) + ([("precise", escalation.precise)] if escalation else [])
        for level, body in checked:
            body_names = [out.get_any_name() if out.get_names() else "" for out in body.outputs]
            if level in self.standalone_routes:  # the route is the package's last output, and not in the body
                ok = self._route_index == len(names) - 1 and body_names == names[:-1]
            else:
                ok = len(body_names) == len(names) and body_names.index(ROUTE_OUTPUT) == self._route_index
            if not ok:
                raise DeviceError(f"standalone body {level}: its outputs do not match the package's")
        self._plans: dict[tuple, Plan] = {}
        self._outputs = list(zip(self._output_names, self._output_ports, strict=True))
        self._route_ops = manifest.route_ops
        fast = manifest.fast_route_codes
        # get_result compares a cascade's route with the fast route's as bytes (the queue's callback path)
        self._cascade_level = None if fast is None else manifest.cascade_level
        self._fast_bytes = b"" if fast is None else np.array(fast, np.int8).tobytes()

    def compiled_for(self, plan: Plan) -> ov.CompiledModel:
        """The compiled model that runs ``plan``: its body compiled on its own, else the package."""
        return self._graph(plan, defer=False)[1]

    def _route(
        self,
        inputs: Any,
        max_drop: float | None,
        precision: Precision | str | None,
        precision_map: Mapping[str, Precision | str] | None,
        policy: str,
    ) -> tuple[list[np.ndarray], tuple, Plan, bool]:
        """One input's checked arrays, policy key, plan and whether it holds NaN/Inf (then the fp32 level:
        the in-graph range check cannot see NaN, its comparisons are false)."""
        arrays = request_arrays(inputs, self.inputs)
        nonfinite = _holds_nonfinite(arrays)
        args = _FP32_POLICY if nonfinite else (max_drop, precision, precision_map, policy)
        key = _policy_key(*args)
        return arrays, key, self._plan(key, *args), nonfinite

    def _graph(self, plan: Plan, defer: bool) -> tuple[int | str | None, ov.CompiledModel]:
        """Which compiled graph runs ``plan`` (key: standalone body index, :data:`_FAST`, None = the package);
        with ``defer`` a cascade plan runs the fast graph of :attr:`escalation`."""
        if defer and self.escalation is not None and plan.level == self.manifest.cascade_level:
            return _FAST, self.escalation.fast
        if plan.level in self.standalone:
            return plan.level, self.standalone[plan.level]
        return None, self.compiled_model

    @property
    def route_ops(self) -> list[str]:
        return list(self._route_ops)

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    @property
    def inputs(self) -> list[InputSpec]:
        return self.manifest.inputs

    @property
    def full_level(self) -> int:
        """Body index of the fully routed body (pins and forced precisions run there)."""
        return self.manifest.full_level

    def plan(
        self,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
        policy: str = "auto",
    ) -> Plan:
        """The state every request gets for this policy (cached: the hot path pays a dict lookup).

        ``max_drop`` selects a level of the dial — the level body with the largest budget ≤ ``max_drop``
        (static ops, a few per-input routed ones) — or, where the package has a router and it is faster
        for that budget, the escalation cascade at that budget's threshold, or its fast level alone where
        that threshold never escalates (``policy``: ``auto``, ``static``, ``cascade``; see
        :func:`apsq_ov.routing.choose_body`). ``precision`` /
        ``precision_map`` run the fully routed body, where every op follows its own state.
        """
        key = _policy_key(max_drop, precision, precision_map, policy)
        return self._plan(key, max_drop, precision, precision_map, policy)

    def _plan(
        self,
        key: tuple,
        max_drop: float | None,
        precision: Precision | str | None,
        precision_map: Mapping[str, Precision | str] | None,
        policy: str = "auto",
    ) -> Plan:
        plan = self._plans.get(key)
        if plan is None:
            m = self.manifest
            if precision is None and not precision_map and m.levels:
                budget = check_max_drop(m.default_max_drop if max_drop is None else max_drop)
                body = choose_body(m, budget, policy)
                plan = Plan(body.level, {}, body.tau)
            else:
                routes = plan_routes(
                    m.ops,
                    m.profile,
                    max_drop=max_drop,
                    precision=precision,
                    precision_map=precision_map,
                    default_max_drop=m.default_max_drop,
                )
                plan = Plan(self.full_level, {op.index: routes[op.name] for op in m.ops})
            self._plans[key] = plan
        return plan

    def create_infer_request(self) -> AdaptiveInferRequest:
        """A request with its own routing state; its OpenVINO requests are made when a policy first runs."""
        return AdaptiveInferRequest(self)

    def __call__(self, inputs: Any, **policy: Any) -> AdaptiveResult:
        """One-off inference on a fresh request (as ``openvino.CompiledModel.__call__``)."""
        return self.create_infer_request().infer(inputs, **policy)


class _BoundRequest:
    """One :class:`openvino.InferRequest` of one compiled graph (the package or a standalone body), the
    handles of its routing state and the policy last written into it."""

    def __init__(self, model: AdaptiveCompiledModel, request: ov.InferRequest, body: int | str | None) -> None:
        self.request = request
        self.route = model.standalone_routes.get(body) if isinstance(body, int) else None
        """the graph's route when it has no route output (a static standalone body), else None"""
        states = {s.name: s for s in request.query_state()}
        ops_ = model.manifest.ops
        self.level_state = states.get(LEVEL_STATE)  # absent in calibration's measurement IR and standalone bodies
        self.tau_state = states.get(TAU_STATE)  # only in packages with a router (a standalone cascade has it)
        # A package IR holds the per-op state in two vectors; calibration's measurement IR in scalars.
        self.modes_state = states.get(MODES_STATE)
        self.limits_state = states.get(LIMITS_STATE)
        self.order = [op.index for op in ops_]
        self.limited = [op.index for op in ops_ if Precision.INT8 in op.variants and op.int8_absmax is not None]
        self.mode_states = {
            op.index: states[f"apsq/mode/{op.index}"] for op in ops_ if f"apsq/mode/{op.index}" in states
        }
        # Ops without an INT8 variant have no range check, hence no limit state.
        self.limit_states = {op.index: states[f"apsq/limit/{op.index}"] for op in ops_
                             if f"apsq/limit/{op.index}" in states}  # fmt: skip
        self.applied: tuple | None = None

    def write(self, key: tuple, plan: Plan) -> None:
        """Write ``plan``'s routing state (skipped when ``key`` is the policy already written)."""
        if key == self.applied:
            return
        if self.level_state is not None:
            self.level_state.state = ov.Tensor(np.array(plan.level, dtype=np.int32))
        if plan.tau is not None and self.tau_state is not None:
            self.tau_state.state = ov.Tensor(np.array(plan.tau, dtype=np.float32))
        if plan.routes and self.modes_state is not None:
            modes = [plan.routes[i].mode.code for i in self.order]
            self.modes_state.state = ov.Tensor(np.array(modes, dtype=np.int32))
            if self.limits_state is not None:
                limits = [min(plan.routes[i].range_limit, 3.0e38) for i in self.limited]
                self.limits_state.state = ov.Tensor(np.array(limits, dtype=np.float32))
        for index, route in plan.routes.items():
            if index in self.mode_states:
                self.mode_states[index].state = ov.Tensor(np.array(route.mode.code, dtype=np.int32))
            if index in self.limit_states:
                limit = min(route.range_limit, 3.0e38)
                self.limit_states[index].state = ov.Tensor(np.array(limit, dtype=np.float32))
        self.applied = key


class AdaptiveInferRequest:
    """One inference request with its own routing state. Wraps :class:`openvino.InferRequest` (``.request``:
    the one the current policy runs on — the package's, or a standalone body's, created on first use).

    :param request: a request of the package's compiled model, or (with ``body``) of standalone body
        ``body``'s (or of the cascade's fast graph, an :class:`AdaptiveAsyncInferQueue`'s ``"escalation/fast"``);
        default: none yet — the first policy set (or the package's default policy, on first use) creates the
        request of the graph it runs, so no package-IR request is made for policies served by standalone bodies.
    """

    def __init__(self, model: AdaptiveCompiledModel, request: ov.InferRequest | None = None, *,
                 body: int | str | None = None) -> None:  # fmt: skip
        self.model = model
        if request is None and isinstance(body, int):
            request = model.compiled_for(Plan(body, {})).create_infer_request()
        self._bound: dict[int | str | None, _BoundRequest] = {}
        self._active: _BoundRequest | None = None
        if request is not None:
            self._active = self._bound[body] = _BoundRequest(model, request, body)
        self._callback: Callable[[Any], None] | None = None
        self._plan: Plan | None = None
        self._nonfinite = False

    @property
    def request(self) -> ov.InferRequest:
        """The :class:`openvino.InferRequest` the current policy runs on (the default policy's, if none was set)."""
        if self._active is None:
            self.set_policy()
        assert self._active is not None
        return self._active.request

    def set_callback(self, callback: Callable[[Any], None]) -> None:
        """``callback(userdata)`` on completion of :meth:`start_async`, whichever graph ran it."""
        self._callback = callback
        for bound in self._bound.values():
            bound.request.set_callback(callback, None)

    def set_policy(
        self,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
        policy: str = "auto",
    ) -> Plan:
        """Write the routing state for this policy into the request that runs it (skipped when unchanged)."""
        key = _policy_key(max_drop, precision, precision_map, policy)
        return self._bind(key, self.model._plan(key, max_drop, precision, precision_map, policy))

    def _bind(self, key: tuple, plan: Plan) -> Plan:
        model = self.model
        body, compiled = model._graph(plan, defer=False)
        bound = self._bound.get(body)
        if bound is None:
            bound = self._bound[body] = _BoundRequest(model, compiled.create_infer_request(), body)
            if self._callback is not None:
                bound.request.set_callback(self._callback, None)
        bound.write(key, plan)
        self._active = bound
        self._plan = plan
        return plan

    def _arm(self, key: tuple, plan: Plan) -> None:
        """Write ``plan`` into the request this one was made for (a queue's pool: one graph each)."""
        assert self._active is not None
        self._active.write(key, plan)
        self._plan = plan

    def _prepare(
        self,
        inputs: Any,
        max_drop: float | None,
        precision: Precision | str | None,
        precision_map: Mapping[str, Precision | str] | None,
        policy: str = "auto",
    ) -> list[np.ndarray]:
        arrays, key, plan, self._nonfinite = self.model._route(inputs, max_drop, precision, precision_map, policy)
        self._bind(key, plan)
        return arrays

    def infer(
        self,
        inputs: Any,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
        policy: str = "auto",
    ) -> AdaptiveResult:
        """Run one inference with per-op routing.

        :param inputs: as for ``openvino.InferRequest.infer`` (dict keyed by name/index, list, or one array).
        :param max_drop: tolerated quality loss vs FP32 in [0, 1] (default: the package's).
        :param precision: force one precision on every routed op.
        :param precision_map: ``{op name: precision}`` pins.
        :param policy: ``auto`` (default), ``static`` or ``cascade`` (see :meth:`AdaptiveCompiledModel.plan`).
        :return: :class:`AdaptiveResult` with outputs and the route taken.
        :raises DataError: for inputs that do not fit the model (naming the input).
        """
        arrays = self._prepare(inputs, max_drop, precision, precision_map, policy)
        try:
            # Sync: the arrays outlive the call, and get_result copies the outputs out: no copies here.
            self.request.infer(arrays, share_inputs=True, share_outputs=True)
        except RuntimeError as exc:
            raise DataError(f"OpenVINO rejected the input: {str(exc).strip().splitlines()[-1]}") from exc
        return self.get_result()

    def start_async(
        self,
        inputs: Any,
        userdata: Any = None,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
        policy: str = "auto",
    ) -> None:
        """Start an inference (as ``openvino.InferRequest.start_async``); read it with :meth:`get_result`."""
        arrays = self._prepare(inputs, max_drop, precision, precision_map, policy)
        self.request.start_async(arrays, userdata)

    def wait(self) -> None:
        self.request.wait()

    def get_result(self) -> AdaptiveResult:
        """Outputs and route of the last finished inference (copied out of the request)."""
        req, model, plan = self.request, self.model, self._plan  # (a queue's callback: every µs is the device's)
        outputs = {n: req.get_output_tensor(p).data.copy() for n, p in model._outputs}
        fixed = self._active.route if self._active is not None else None  # a static standalone body's
        if fixed is not None:
            route = fixed.copy()
        else:
            route = req.get_output_tensor(model._route_index).data.astype(np.int8).reshape(-1)
        escalated = None
        if plan is not None and plan.level == model._cascade_level:
            escalated = route.tobytes() != model._fast_bytes
        return AdaptiveResult(outputs, route, list(model._route_ops), self._nonfinite, escalated)


class _Pool:
    """The requests of one compiled graph in an :class:`AdaptiveAsyncInferQueue`, and which are idle.

    As ``openvino.AsyncInferQueue`` does, a request's index goes back to the idle ones at the end of its
    callback; here the idle indices are a :class:`queue.SimpleQueue` (C code: taking one that is there
    never releases the GIL), and each request's callback knows its own request, so a start costs no
    second lookup of the idle request and no lock: each index is handed to one producer at a time.
    """

    def __init__(self, owner: AdaptiveAsyncInferQueue, key: int | str | None, compiled: ov.CompiledModel) -> None:
        self.idle: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.requests: list[AdaptiveInferRequest] = []
        self.busy: list[bool] = []  # set by start, cleared by the callback: set after a wait = no callback came
        # Each request's input tensors as arrays (its own memory, static shapes only): start copies an input
        # there itself and checks it for NaN/Inf while it is still in cache.
        self.inputs: list[list[np.ndarray] | None] = []
        static = all(p.get_partial_shape().is_static for p in compiled.inputs)
        for i in range(owner._jobs):
            request = AdaptiveInferRequest(owner.model, compiled.create_infer_request(), body=key)
            request.request.set_callback(functools.partial(owner._done, self, i, request), None)
            self.requests.append(request)
            self.inputs.append([t.data for t in request.request.input_tensors] if static else None)
            self.busy.append(False)
            self.idle.put(i)

    def wait_all(self, reclaim: bool) -> list[BaseException]:
        """Wait for every request; return the errors of inferences that failed. With ``reclaim`` (no start may
        run meanwhile), a request whose inference failed — OpenVINO then calls no callback — is idle again."""
        errors: list[BaseException] = []
        for i, request in enumerate(self.requests):
            failed: BaseException | None = None
            try:
                request.request.wait()
            except RuntimeError as exc:
                failed = exc
            if reclaim and self.busy[i]:
                failed = failed or DeviceError(f"inference on request {i} ended without its callback")
                self.busy[i] = False
                self.idle.put(i)
            if failed is not None:
                errors.append(failed)
        return errors


class AdaptiveAsyncInferQueue:
    """A pool of inference requests with per-input policies (mirrors ``openvino.AsyncInferQueue``).

    Every compiled graph an input's policy runs on (the package, a standalone body, the cascade's fast
    graph) gets ``jobs`` requests when first used; :meth:`start_async` writes the policy given for *this*
    input into the next idle request of that graph and starts it, so requests never share routing state.
    The callback set with :meth:`set_callback` is called as ``cb(request, userdata)`` from OpenVINO's
    thread; ``request`` is an :class:`AdaptiveInferRequest` whose ``get_result()`` there holds that input's
    outputs and route. :meth:`start_async` may be called from several threads, but not from a callback
    (it may wait for an idle request only a callback can free).

    The thread calling :meth:`start_async` is the producer every request waits on, so the queue does
    there only what must precede the start. On a graph with static input shapes (as calibration makes
    them) each input array is copied into the idle request's own input tensor, checked there for NaN/Inf
    while it is still in cache, and the request started without inputs: OpenVINO's per-call input
    dispatch, skipped so, cost Fashion-MNIST's NNCF INT8 a quarter of its async throughput in a plain
    ``AsyncInferQueue``. With dynamic input shapes the arrays go through OpenVINO's ``start_async`` and
    are checked in the callback's thread. An input holding NaN/Inf runs its policy's route first, and is
    re-run on the FP32 level before its callback (the in-graph range check cannot see NaN: its
    comparisons are false). Checking every input in the callback, out of cache, cost ~70 µs per 600 KB
    EfficientNet-Lite0 input: most of the 3–7% by which this queue trailed OpenVINO's on that model.

    On a model compiled with ``escalation_batch`` (:func:`compile_model`), an input whose policy runs the
    escalation cascade runs its fast route only; if the router escalates it, its inputs are kept and
    re-run on the precise route together with other escalated inputs, ``escalation_batch`` at a time, or
    as many as have gathered once the oldest has waited ``escalation_timeout`` seconds (and all of them
    in :meth:`wait_all`). A batch runs alone: the queue starts nothing new and lets the running requests
    finish first, so the precise route has every core and never competes with fast runs for them (or for
    the cache). Its callbacks then come from the queue's own thread, ``request`` being an
    :class:`EscalatedInput` whose ``get_result()`` holds that input's result (``escalated=True``).

    :param jobs: requests per graph (default: twice the compiled model's optimal number — each finished
        request runs Python in OpenVINO's callback thread, and the spare requests keep the device busy
        meanwhile: NNCF INT8 EfficientNet-Lite0 in a plain queue runs 11% faster with 4 requests than with 2).
    :param escalation_timeout: the longest an escalated input waits for its batch to fill, seconds.
    """

    def __init__(self, model: AdaptiveCompiledModel, jobs: int = 0, *, escalation_timeout: float = 1.0) -> None:
        if jobs <= 0:
            jobs = 2 * int(model.compiled_model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        if not escalation_timeout > 0:
            raise ConfigError(f"escalation_timeout={escalation_timeout!r}: use a number of seconds > 0")
        self.model = model
        self._jobs = jobs
        self._pools: dict[int | str | None, _Pool] = {}
        self._lock = threading.Lock()  # a graph's pool is made once
        self._go = threading.Event()  # cleared while an escalation batch runs
        self._go.set()
        self._callback: Callable[[Any, Any], None] | None = None
        self._errors: list[BaseException] = []
        esc = model.escalation
        self._batcher = None if esc is None else _EscalationBatcher(self, model, esc, escalation_timeout)
        specs = model.inputs
        # (max_drop, precision, policy) → policy key, plan, graph key, compiled graph, whether it is the fast graph
        self._slots: dict[tuple, tuple[tuple, Plan, int | str | None, ov.CompiledModel, bool]] = {}
        self._float_inputs = [k for k, spec in enumerate(specs) if spec.dtype.kind == "f"]
        self._fp32_lock = threading.Lock()
        self._fp32: AdaptiveInferRequest | None = None  # re-runs inputs holding NaN/Inf (created on the first)

    def _pool(self, key: int | str | None, compiled: ov.CompiledModel) -> _Pool:
        """The pool of graph ``key``, created on first use (a package IR's requests hold every body's buffers:
        only the graphs inputs actually run on get requests)."""
        pool = self._pools.get(key)
        if pool is None:
            with self._lock:
                pool = self._pools.get(key)
                if pool is None:
                    pool = self._pools[key] = _Pool(self, key, compiled)
        return pool

    def __len__(self) -> int:
        return self._jobs

    def __getitem__(self, i: int) -> AdaptiveInferRequest:
        """Request ``i`` of the package's own pool."""
        return self._pool(None, self.model.compiled_model).requests[i]

    def set_callback(self, callback: Callable[[Any, Any], None]) -> None:
        self._callback = callback

    def _deliver(self, request: Any, userdata: Any) -> None:
        try:
            if self._callback is not None:
                self._callback(request, userdata)
        except BaseException as exc:  # re-raised from wait_all: never lost in OpenVINO's thread
            self._errors.append(exc)

    def _done(
        self, pool: _Pool, i: int, request: AdaptiveInferRequest, userdata: tuple[Any, bool, bool | None]
    ) -> None:
        """Request ``i`` of ``pool`` finished (OpenVINO's callback thread): deliver it, hold it for an
        escalation batch, or re-run it on FP32; then it is idle."""
        data, fast, nonfinite = userdata
        try:
            ov_request = request.request
            if nonfinite is None:  # started from the caller's arrays: not checked yet
                nonfinite = _holds_nonfinite(ov_request.get_input_tensor(k).data for k in self._float_inputs)
            if nonfinite:
                self._run_fp32(ov_request, data)
                return
            batcher = self._batcher
            if fast and batcher is not None and ov_request.get_output_tensor(batcher.flag_port).data.any():
                # Copied out of the request's own input tensors (start_async copied the caller's arrays).
                batcher.put([ov_request.get_input_tensor(k).data.copy() for k in range(len(batcher.inputs))], data)
            else:
                self._deliver(request, data)
        except BaseException as exc:
            self._errors.append(exc)
        finally:
            pool.busy[i] = False
            pool.idle.put(i)

    def start_async(
        self,
        inputs: Any,
        userdata: Any = None,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
        policy: str = "auto",
    ) -> None:
        """Run ``inputs`` on the next idle request of the graph this input's policy runs on."""
        model = self.model
        arrays = request_arrays(inputs, model.inputs)
        slot = None if precision_map else self._slots.get((max_drop, precision, policy))
        if slot is None:
            key = _policy_key(max_drop, precision, precision_map, policy)
            plan = model._plan(key, max_drop, precision, precision_map, policy)
            graph, compiled = model._graph(plan, defer=self._batcher is not None)
            slot = (key, plan, graph, compiled, graph == _FAST)
            if not precision_map:
                self._slots[max_drop, precision, policy] = slot
        key, plan, graph, compiled, fast = slot
        if not self._go.is_set():
            self._go.wait()
        pool = self._pools.get(graph) or self._pool(graph, compiled)
        i = pool.idle.get()
        request = pool.requests[i]
        request._arm(key, plan)
        pool.busy[i] = True
        views = pool.inputs[i]
        try:
            if views is not None and all(
                a.shape == v.shape and a.dtype == v.dtype for a, v in zip(arrays, views, strict=True)
            ):
                for a, v in zip(arrays, views, strict=True):
                    np.copyto(v, a)
                nonfinite = _holds_nonfinite(views[k] for k in self._float_inputs)
                request.request.start_async(None, (userdata, fast, nonfinite))
            else:
                request.request.start_async(arrays, (userdata, fast, None))
        except BaseException:
            pool.busy[i] = False
            pool.idle.put(i)
            raise

    def _run_fp32(self, ov_request: ov.InferRequest, userdata: Any) -> None:
        """Re-run the input ``ov_request`` just ran, which holds NaN/Inf, on the FP32 level and deliver it
        (in the callback's thread: such inputs are rare, and the FP32 graph is another request's)."""
        arrays = [ov_request.get_input_tensor(k).data.copy() for k in range(len(self.model.inputs))]
        with self._fp32_lock:
            if self._fp32 is None:
                self._fp32 = self.model.create_infer_request()
            self._fp32.infer(arrays)  # its own check finds the NaN/Inf: the FP32 policy
            self._deliver(self._fp32, userdata)

    def _pause(self) -> None:
        """Start nothing new and wait until every request is idle (an escalation batch is about to run)."""
        self._go.clear()
        for pool in list(self._pools.values()):
            self._errors.extend(pool.wait_all(reclaim=False))

    def _resume(self) -> None:
        self._go.set()

    def wait_all(self) -> None:
        """Wait for every request and every held escalation; re-raise the first exception a callback (or an
        inference) raised. Not while another thread starts inputs on this queue."""
        for pool in list(self._pools.values()):
            self._errors.extend(pool.wait_all(reclaim=True))
        if self._batcher is not None:
            self._batcher.drain()
        if self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]


class EscalatedInput:
    """What an :class:`AdaptiveAsyncInferQueue` callback gets for an input re-run in an escalation batch."""

    def __init__(self, result: AdaptiveResult) -> None:
        self._result = result

    def get_result(self) -> AdaptiveResult:
        return self._result


@dataclass(frozen=True)
class BatchedEscalation:
    """The escalation cascade split for batched re-runs (:func:`~apsq_ov.bodies.escalation_graphs`), compiled.

    :param fast: the cascade's fast route: the package's outputs, then the router's decision (bool).
    :param precise: the precise route, its inputs' and outputs' first axis free.
    :param batch: escalated inputs re-run together.
    """

    fast: ov.CompiledModel
    precise: ov.CompiledModel
    batch: int


class _EscalationBatcher:
    """Escalated inputs of one queue, re-run on the precise route a batch at a time from a thread of its own
    (started when an input is held, gone after a second with nothing to do), the queue paused meanwhile."""

    def __init__(self, queue: AdaptiveAsyncInferQueue, model: AdaptiveCompiledModel, esc: BatchedEscalation,
                 timeout: float) -> None:  # fmt: skip
        self.queue = queue
        self.model = model
        self.inputs = model.inputs
        self.flag_port = len(esc.fast.outputs) - 1
        self._precise = esc.precise
        self._request: ov.InferRequest | None = None  # created by the first batch
        self._batch, self._timeout = esc.batch, timeout
        self._per_input = model.manifest.batch
        self._cond = threading.Condition()
        self._held: collections.deque[tuple[float, list[np.ndarray], Any]] = collections.deque()
        self._running = False
        self._draining = False
        self._thread: threading.Thread | None = None

    def put(self, arrays: list[np.ndarray], userdata: Any) -> None:
        with self._cond:
            self._held.append((time.monotonic(), arrays, userdata))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="apsq-escalations", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> None:
        """Run whatever is held (partial batches too) and wait until every escalation was delivered."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
            while self._held or self._running:
                self._cond.wait()
            self._draining = False

    def _ready(self) -> bool:
        """Wait (under the lock) until a batch is due; False when idle for a second (the thread ends)."""
        while True:
            now = time.monotonic()
            if self._held and (len(self._held) >= self._batch or self._draining
                               or now - self._held[0][0] >= self._timeout):  # fmt: skip
                self._running = True
                return True
            if self._held:
                self._cond.wait(self._held[0][0] + self._timeout - now)
            elif not self._cond.wait(1.0) and not self._held:
                self._thread = None
                return False

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._ready():
                    return
            results: list[tuple[EscalatedInput, Any]] = []
            self.queue._pause()  # outside our lock: finishing jobs may still hold more escalations here
            try:
                with self._cond:
                    batch = [self._held.popleft() for _ in range(min(self._batch, len(self._held)))]
                results = self._run(batch)
            except BaseException as exc:  # the batch's inputs are lost: the queue's wait_all re-raises
                self.queue._errors.append(exc)
            finally:
                self.queue._resume()  # before the callbacks: they may start more inputs
                for request, userdata in results:
                    self.queue._deliver(request, userdata)
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def _run(self, batch: list[tuple[float, list[np.ndarray], Any]]) -> list[tuple[EscalatedInput, Any]]:
        """Re-run ``batch`` on the precise route as one inference: each input's result and userdata."""
        model, b = self.model, self._per_input
        stacked = [np.concatenate([arrays[k] for _, arrays, _ in batch]) for k in range(len(self.inputs))]
        if self._request is None:
            self._request = self._precise.create_infer_request()
        req = self._request
        req.infer(stacked, share_inputs=True, share_outputs=True)
        outs = {n: req.get_output_tensor(p).data for n, p in model._outputs}
        route = req.get_output_tensor(model._route_index).data.astype(np.int8).reshape(-1)
        results = []
        for j, (_, _, userdata) in enumerate(batch):
            outputs = {n: o[j * b : (j + 1) * b].copy() for n, o in outs.items()}
            result = AdaptiveResult(outputs, route.copy(), model.route_ops, nonfinite=False, escalated=True)
            results.append((EscalatedInput(result), userdata))
        return results


STANDALONE = ("default", "all", "none")
"""What :func:`compile_model` compiles on its own besides the package: the body the package's default
policy runs, every level body and the cascade, or nothing (or, given a policy mapping, the body it runs)."""


def compile_model(
    package: str | Path | Package,
    device_name: str = "CPU",
    config: Mapping[str, Any] | None = None,
    *,
    core: ov.Core | None = None,
    standalone: str | Mapping[str, Any] = "default",
    escalation_batch: int = 0,
) -> AdaptiveCompiledModel:
    """Compile an adaptive package (as ``openvino.Core.compile_model``).

    :param package: a package directory or a loaded :class:`~apsq_ov.package.Package`.
    :param device_name: OpenVINO device (``CPU``, ``GPU``, ``AUTO`` …).
    :param config: extra OpenVINO properties; the profile's ``compile_config`` (f32 hint) comes first.
    :param standalone: which bodies are also compiled as models of their own (:data:`STANDALONE`):
        ``default`` — the one the package's default policy runs (the cascade or a level); ``all`` — every
        level and the cascade (each its own compile: more memory and compile time); ``none``; or a policy
        (``{"max_drop": …, "policy": …}``, as :meth:`AdaptiveCompiledModel.plan` takes) — the body it runs.
        A policy whose body is not among them runs through the package's dispatch, one or more ``If``
        deeper; pinned and forced precisions always do (the fully routed body).
    :param escalation_batch: N > 1 also compiles the escalation cascade split in two
        (:func:`~apsq_ov.bodies.escalation_graphs`, :attr:`AdaptiveCompiledModel.escalation`) so that an
        :class:`AdaptiveAsyncInferQueue` re-runs escalated inputs N at a time (the results are the cascade's,
        an escalated input's arrive later; slower than in-graph re-runs on this CPU, see the module
        docstring). 0 or 1 (default 0): escalations re-run in the graph.
    :raises PackageError: for a missing/corrupt package. :raises DeviceError: for a device not present.
    :raises ConfigError: for an unknown ``standalone``, or an ``escalation_batch`` the package cannot serve.
    """
    pkg = package if isinstance(package, Package) else Package.load(package)
    core = core or ov.Core()
    return compile_adaptive(pkg.read_model(core), pkg.manifest, device_name, config, core=core, standalone=standalone,
                            escalation_batch=escalation_batch)  # fmt: skip


def compile_adaptive(
    model: ov.Model,
    manifest: Manifest,
    device_name: str = "CPU",
    config: Mapping[str, Any] | None = None,
    *,
    core: ov.Core | None = None,
    standalone: str | Mapping[str, Any] = "none",
    escalation_batch: int = 0,
) -> AdaptiveCompiledModel:
    """Compile an in-memory adaptive model with its manifest (used by calibration: ``standalone`` and
    ``escalation_batch`` as in :func:`compile_model`, default none)."""
    if not isinstance(standalone, Mapping) and standalone not in STANDALONE:
        raise ConfigError(f"standalone={standalone!r}: use one of {', '.join(STANDALONE)} or a policy mapping")
    if isinstance(escalation_batch, bool) or not isinstance(escalation_batch, int) or escalation_batch < 0:
        raise ConfigError(f"escalation_batch={escalation_batch!r}: use 0 (off) or the number of inputs per re-run")
    split = escalation_graphs(model, manifest) if escalation_batch > 1 else None
    core = core or ov.Core()
    check_device(core, device_name)
    props = dict(manifest.profile.compile_config)
    props.update(config or {})
    wanted: set[int] = set()
    if manifest.levels and standalone == "all":
        cascade = manifest.cascade_level
        wanted = set(range(len(manifest.levels))) | ({cascade} if cascade is not None else set())
    elif manifest.levels and standalone == "default":
        wanted = {choose_body(manifest, manifest.default_max_drop).level}
    elif manifest.levels and isinstance(standalone, Mapping):
        if standalone.get("precision") is None and not standalone.get("precision_map"):
            budget = standalone.get("max_drop")
            budget = check_max_drop(manifest.default_max_drop if budget is None else budget)
            wanted = {choose_body(manifest, budget, standalone.get("policy", "auto")).level}
    bodies = standalone_bodies(model, manifest, wanted) if wanted else {}
    routes: dict[int, np.ndarray] = {}
    for k, body in list(bodies.items()):
        bodies[k], route = split_constant_route(body)
        if route is not None:
            routes[k] = route
    try:
        compiled = core.compile_model(model, device_name, props)
        separate = {k: core.compile_model(b, device_name, props) for k, b in sorted(bodies.items())}
        # A batch of escalations runs alone (the queue pauses): one stream over every core.
        alone = {k: v for k, v in props.items() if k != "NUM_STREAMS"} | {"PERFORMANCE_HINT": "LATENCY"}
        escalation = None if split is None else BatchedEscalation(
            core.compile_model(split[0], device_name, props), core.compile_model(split[1], device_name, alone),
            escalation_batch)  # fmt: skip
    except RuntimeError as exc:
        raise DeviceError(f"device={device_name}: compile failed ({str(exc).strip().splitlines()[-1]})") from exc
    return AdaptiveCompiledModel(compiled, manifest, device=device_name, standalone=separate, escalation=escalation,
                                 standalone_routes=routes)  # fmt: skip


def check_device(core: ov.Core, device_name: str) -> None:
    """:raises DeviceError: if OpenVINO does not see ``device_name`` on this machine."""
    base = device_name.split(":")[0].split(".")[0]
    if base in ("AUTO", "MULTI", "HETERO"):
        return
    available = core.available_devices
    if device_name not in available and base not in {d.split(".")[0] for d in available}:
        raise DeviceError(
            f"device {device_name} is not available here (OpenVINO sees: {', '.join(available) or 'none'})"
        )
