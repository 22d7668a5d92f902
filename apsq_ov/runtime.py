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
precise route with a free batch axis (:class:`BatchedEscalation`), for
:class:`~apsq_ov.async_queue.AdaptiveAsyncInferQueue` to re-run the escalated inputs together. Meant for
devices where an ``If`` is a host round trip (GPU) or batching pays: on this CPU it measured slower than
the in-graph re-runs (EfficientNet-Lite0 at max-drop 0.08: 0.869x vs 0.884x NNCF INT8 async;
``benchmarks/results/throughput.md``).
"""

from __future__ import annotations

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
        ``body``'s (or of the cascade's fast graph: an
        :class:`~apsq_ov.async_queue.AdaptiveAsyncInferQueue`'s ``"escalation/fast"``);
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
        :class:`~apsq_ov.async_queue.AdaptiveAsyncInferQueue` re-runs escalated inputs N at a time (the
        results are the cascade's, an escalated input's arrive later; slower than in-graph re-runs on this
        CPU, see the module docstring). 0 or 1 (default 0): escalations re-run in the graph.
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
