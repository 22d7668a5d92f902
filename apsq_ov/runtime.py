"""The runtime engine: compile an adaptive package and route every input per operator.

Where it sits in the data flow: the last stage. :func:`compile_model` reads a package (or takes
an in-memory adaptive model during calibration), compiles it with the device profile's config,
and returns an :class:`AdaptiveCompiledModel`; its :class:`AdaptiveInferRequest` mirrors
``openvino.InferRequest`` and adds keyword-only ``max_drop=``, ``precision=``, ``precision_map=``.

The policy lives in per-request state (ReadValue/Assign variables), so requests never share it
and changing it costs a few scalar writes, no recompilation. Which branch each op actually took
comes back from the graph itself (the ``apsq_route`` output), because the in-graph range check can
override the requested mode per input.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from apsq_ov.errors import DataError, DeviceError
from apsq_ov.inputs import InputSpec, request_arrays
from apsq_ov.package import LEVEL_STATE, LIMITS_STATE, MODES_STATE, ROUTE_OUTPUT, TAU_STATE, Manifest, Package
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


def _policy_key(max_drop: Any, precision: Any, precision_map: Mapping[str, Any] | None, policy: str) -> tuple:
    pm = tuple(sorted((k, str(v)) for k, v in precision_map.items())) if precision_map else ()
    return (max_drop, None if precision is None else str(precision), pm, policy)


class AdaptiveCompiledModel:
    """A compiled adaptive model. Wraps :class:`openvino.CompiledModel` (``.compiled_model``)."""

    def __init__(self, compiled: ov.CompiledModel, manifest: Manifest, *, device: str) -> None:
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
        self._plans: dict[tuple, Plan] = {}
        fast = manifest.fast_route_codes
        self._fast_codes = None if fast is None else np.array(fast, np.int8)

    @property
    def route_ops(self) -> list[str]:
        return self.manifest.route_ops

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
        for that budget, the escalation cascade at that budget's threshold (``policy``: ``auto``,
        ``static``, ``cascade``; see :func:`apsq_ov.routing.choose_body`). ``precision`` /
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
        return AdaptiveInferRequest(self, self.compiled_model.create_infer_request())

    def __call__(self, inputs: Any, **policy: Any) -> AdaptiveResult:
        """One-off inference on a fresh request (as ``openvino.CompiledModel.__call__``)."""
        return self.create_infer_request().infer(inputs, **policy)


class AdaptiveInferRequest:
    """One inference request with its own routing state. Wraps :class:`openvino.InferRequest` (``.request``)."""

    def __init__(self, model: AdaptiveCompiledModel, request: ov.InferRequest) -> None:
        self.model = model
        self.request = request
        states = {s.name: s for s in request.query_state()}
        ops_ = model.manifest.ops
        self._level_state = states.get(LEVEL_STATE)  # absent in calibration's measurement IR
        self._tau_state = states.get(TAU_STATE)  # only in packages with a router
        # A package IR holds the per-op state in two vectors; calibration's measurement IR in scalars.
        self._modes_state = states.get(MODES_STATE)
        self._limits_state = states.get(LIMITS_STATE)
        self._order = [op.index for op in ops_]
        self._limited = [op.index for op in ops_ if Precision.INT8 in op.variants and op.int8_absmax is not None]
        self._mode_states = {
            op.index: states[f"apsq/mode/{op.index}"] for op in ops_ if f"apsq/mode/{op.index}" in states
        }
        # Ops without an INT8 variant have no range check, hence no limit state.
        self._limit_states = {op.index: states[f"apsq/limit/{op.index}"] for op in ops_
                              if f"apsq/limit/{op.index}" in states}  # fmt: skip
        self._applied: tuple | None = None
        self._plan: Plan | None = None
        self._nonfinite = False

    def set_policy(
        self,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
        policy: str = "auto",
    ) -> Plan:
        """Write the routing state for this policy into the request (skipped when unchanged)."""
        key = _policy_key(max_drop, precision, precision_map, policy)
        plan = self.model._plan(key, max_drop, precision, precision_map, policy)
        if key != self._applied:
            if self._level_state is not None:
                self._level_state.state = ov.Tensor(np.array(plan.level, dtype=np.int32))
            if plan.tau is not None and self._tau_state is not None:
                self._tau_state.state = ov.Tensor(np.array(plan.tau, dtype=np.float32))
            if plan.routes and self._modes_state is not None:
                modes = [plan.routes[i].mode.code for i in self._order]
                self._modes_state.state = ov.Tensor(np.array(modes, dtype=np.int32))
                if self._limits_state is not None:
                    limits = [min(plan.routes[i].range_limit, 3.0e38) for i in self._limited]
                    self._limits_state.state = ov.Tensor(np.array(limits, dtype=np.float32))
            for index, route in plan.routes.items():
                if index in self._mode_states:
                    self._mode_states[index].state = ov.Tensor(np.array(route.mode.code, dtype=np.int32))
                if index in self._limit_states:
                    limit = min(route.range_limit, 3.0e38)
                    self._limit_states[index].state = ov.Tensor(np.array(limit, dtype=np.float32))
            self._applied = key
            self._plan = plan
        return plan

    def _prepare(
        self,
        inputs: Any,
        max_drop: float | None,
        precision: Precision | str | None,
        precision_map: Mapping[str, Precision | str] | None,
        policy: str = "auto",
    ) -> list[np.ndarray]:
        arrays = request_arrays(inputs, self.model.inputs)
        self._nonfinite = any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in arrays)
        if self._nonfinite:  # the range check cannot see NaN (comparisons are false): run the fp32 level
            self.set_policy(max_drop=0.0, policy="static")
        else:
            self.set_policy(max_drop=max_drop, precision=precision, precision_map=precision_map, policy=policy)
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
        req = self.request
        outputs = {
            n: req.get_output_tensor(p).data.copy()
            for n, p in zip(self.model._output_names, self.model._output_ports, strict=True)
        }
        route = req.get_output_tensor(self.model._route_index).data.astype(np.int8).reshape(-1)
        escalated = None
        fast = self.model._fast_codes
        if fast is not None and self._plan is not None and self._plan.level == self.model.manifest.cascade_level:
            escalated = bool((route != fast).any())
        return AdaptiveResult(outputs, route, self.model.route_ops, self._nonfinite, escalated)


class AdaptiveAsyncInferQueue:
    """A pool of :class:`AdaptiveInferRequest` (mirrors ``openvino.AsyncInferQueue``).

    Each job owns its request and so its routing state; :meth:`start_async` waits for an idle job,
    writes the policy given for *this* input into that job's state, and starts it. The callback
    set with :meth:`set_callback` is called as ``cb(request, userdata)`` from OpenVINO's thread;
    ``request.get_result()`` there holds that input's outputs and route.
    """

    def __init__(self, model: AdaptiveCompiledModel, jobs: int = 0) -> None:
        if jobs <= 0:
            jobs = int(model.compiled_model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._requests = [model.create_infer_request() for _ in range(jobs)]
        self._idle = collections.deque(range(jobs))
        self._cond = threading.Condition()
        self._callback: Callable[[AdaptiveInferRequest, Any], None] | None = None
        self._userdata: list[Any] = [None] * jobs
        self._errors: list[BaseException] = []
        for i, request in enumerate(self._requests):
            request.request.set_callback(functools.partial(self._done, i), None)

    def __len__(self) -> int:
        return len(self._requests)

    def __getitem__(self, i: int) -> AdaptiveInferRequest:
        return self._requests[i]

    def set_callback(self, callback: Callable[[AdaptiveInferRequest, Any], None]) -> None:
        self._callback = callback

    def _done(self, i: int, _ov_userdata: Any) -> None:
        try:
            if self._callback is not None:
                self._callback(self._requests[i], self._userdata[i])
        except BaseException as exc:  # re-raised from wait_all: never lost in OpenVINO's thread
            self._errors.append(exc)
        finally:
            with self._cond:
                self._idle.append(i)
                self._cond.notify()

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
        """Run ``inputs`` on the next idle job with this request's own policy."""
        with self._cond:
            while not self._idle:
                self._cond.wait()
            i = self._idle.popleft()
        try:
            self._userdata[i] = userdata
            self._requests[i].start_async(
                inputs, max_drop=max_drop, precision=precision, precision_map=precision_map, policy=policy
            )
        except BaseException:
            with self._cond:
                self._idle.appendleft(i)
                self._cond.notify()
            raise

    def wait_all(self) -> None:
        """Wait for every job; re-raise the first exception a callback raised."""
        with self._cond:
            while len(self._idle) < len(self._requests):
                self._cond.wait()
        if self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]


def compile_model(
    package: str | Path | Package,
    device_name: str = "CPU",
    config: Mapping[str, Any] | None = None,
    *,
    core: ov.Core | None = None,
) -> AdaptiveCompiledModel:
    """Compile an adaptive package (as ``openvino.Core.compile_model``).

    :param package: a package directory or a loaded :class:`~apsq_ov.package.Package`.
    :param device_name: OpenVINO device (``CPU``, ``GPU``, ``AUTO`` …).
    :param config: extra OpenVINO properties; the profile's ``compile_config`` (f32 hint) comes first.
    :raises PackageError: for a missing/corrupt package. :raises DeviceError: for a device not present.
    """
    pkg = package if isinstance(package, Package) else Package.load(package)
    core = core or ov.Core()
    return compile_adaptive(pkg.read_model(core), pkg.manifest, device_name, config, core=core)


def compile_adaptive(
    model: ov.Model,
    manifest: Manifest,
    device_name: str = "CPU",
    config: Mapping[str, Any] | None = None,
    *,
    core: ov.Core | None = None,
) -> AdaptiveCompiledModel:
    """Compile an in-memory adaptive model with its manifest (used by calibration)."""
    core = core or ov.Core()
    check_device(core, device_name)
    props = dict(manifest.profile.compile_config)
    props.update(config or {})
    try:
        compiled = core.compile_model(model, device_name, props)
    except RuntimeError as exc:
        raise DeviceError(f"device={device_name}: compile failed ({str(exc).strip().splitlines()[-1]})") from exc
    return AdaptiveCompiledModel(compiled, manifest, device=device_name)


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
