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

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from apsq_ov.errors import DataError, DeviceError
from apsq_ov.inputs import InputSpec
from apsq_ov.package import Manifest, Package
from apsq_ov.precision import Precision
from apsq_ov.routing import Route, plan_routes

ROUTE_OUTPUT = "apsq_route"


@dataclass
class AdaptiveResult:
    """Outputs of one inference and the route it took.

    :param outputs: model output name → array (the model's own outputs, not ``apsq_route``).
    :param route: precision code taken by each routed op (``Precision.from_code``), in ``route_ops`` order.
    :param route_ops: names of the routed ops.
    :param nonfinite: the input held NaN/Inf and was run at fp32 everywhere.
    """

    outputs: dict[str, np.ndarray]
    route: np.ndarray
    route_ops: list[str]
    nonfinite: bool = False

    def __getitem__(self, key: str | int) -> np.ndarray:
        if isinstance(key, int):
            return list(self.outputs.values())[key]
        return self.outputs[key]

    def route_precisions(self) -> dict[str, Precision]:
        return {n: Precision.from_code(int(c)) for n, c in zip(self.route_ops, self.route, strict=True)}


def _policy_key(max_drop: Any, precision: Any, precision_map: Mapping[str, Any] | None) -> tuple:
    pm = tuple(sorted((k, str(v)) for k, v in precision_map.items())) if precision_map else ()
    return (max_drop, None if precision is None else str(precision), pm)


class AdaptiveCompiledModel:
    """A compiled adaptive model. Wraps :class:`openvino.CompiledModel` (``.compiled_model``)."""

    def __init__(self, compiled: ov.CompiledModel, manifest: Manifest, *, device: str) -> None:
        self.compiled_model = compiled
        self.manifest = manifest
        self.device = device
        names = [out.get_any_name() if out.get_names() else "" for out in compiled.outputs]
        self._route_index = names.index(ROUTE_OUTPUT)
        self._output_names = [n or f"output{i}" for i, n in enumerate(names) if i != self._route_index]
        self._output_ports = [i for i in range(len(names)) if i != self._route_index]
        self._plans: dict[tuple, dict[int, Route]] = {}

    @property
    def route_ops(self) -> list[str]:
        return self.manifest.route_ops

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    @property
    def inputs(self) -> list[InputSpec]:
        return self.manifest.inputs

    def plan(
        self,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
    ) -> dict[int, Route]:
        """The state every request gets for this policy (cached: the hot path pays a dict lookup)."""
        key = _policy_key(max_drop, precision, precision_map)
        plan = self._plans.get(key)
        if plan is None:
            routes = plan_routes(
                self.manifest.ops,
                self.manifest.profile,
                max_drop=max_drop,
                precision=precision,
                precision_map=precision_map,
                default_max_drop=self.manifest.default_max_drop,
            )
            plan = {op.index: routes[op.name] for op in self.manifest.ops}
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
        self._mode_states = {op.index: states[f"apsq/mode/{op.index}"] for op in model.manifest.ops}
        # Ops without an INT8 variant have no range check, hence no limit state.
        self._limit_states = {op.index: states[f"apsq/limit/{op.index}"] for op in model.manifest.ops
                              if f"apsq/limit/{op.index}" in states}  # fmt: skip
        self._applied: tuple | None = None

    def set_policy(
        self,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
    ) -> dict[int, Route]:
        """Write the routing state for this policy into the request (skipped when unchanged)."""
        key = _policy_key(max_drop, precision, precision_map)
        plan = self.model.plan(max_drop=max_drop, precision=precision, precision_map=precision_map)
        if key != self._applied:
            for index, route in plan.items():
                self._mode_states[index].state = ov.Tensor(np.array(route.mode.code, dtype=np.int32))
                if index in self._limit_states:
                    limit = min(route.range_limit, 3.0e38)
                    self._limit_states[index].state = ov.Tensor(np.array(limit, dtype=np.float32))
            self._applied = key
        return plan

    def infer(
        self,
        inputs: Any,
        *,
        max_drop: float | None = None,
        precision: Precision | str | None = None,
        precision_map: Mapping[str, Precision | str] | None = None,
    ) -> AdaptiveResult:
        """Run one inference with per-op routing.

        :param inputs: as for ``openvino.InferRequest.infer`` (dict keyed by name/index, list, or one array).
        :param max_drop: tolerated quality loss vs FP32 in [0, 1] (default: the package's).
        :param precision: force one precision on every routed op.
        :param precision_map: ``{op name: precision}`` pins.
        :return: :class:`AdaptiveResult` with outputs and the route taken.
        """
        arrays = _as_list(inputs, self.model.inputs)
        nonfinite = any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in arrays)
        if nonfinite:  # the range check cannot see NaN (comparisons are false): route it to fp32 explicitly
            self.set_policy(precision=Precision.FP32)
        else:
            self.set_policy(max_drop=max_drop, precision=precision, precision_map=precision_map)
        try:
            res = self.request.infer(arrays)
        except RuntimeError as exc:
            raise DataError(f"OpenVINO rejected the input: {str(exc).strip().splitlines()[-1]}") from exc
        outputs = {n: res[p].copy() for n, p in zip(self.model._output_names, self.model._output_ports, strict=True)}
        route = np.asarray(res[self.model._route_index]).astype(np.int8).reshape(-1)
        return AdaptiveResult(outputs, route, self.model.route_ops, nonfinite)


def _as_list(inputs: Any, specs: list[InputSpec]) -> list[np.ndarray]:
    if isinstance(inputs, Mapping):
        out = []
        for spec in specs:
            keys = [spec.index, *spec.names] + (["inputs"] if len(specs) == 1 else [])
            key = next((k for k in keys if k in inputs), None)
            if key is None:
                raise DataError(f"no value for model input {spec.label}")
            out.append(np.asarray(inputs[key]))
        return out
    if isinstance(inputs, np.ndarray | ov.Tensor):
        return [np.asarray(inputs.data if isinstance(inputs, ov.Tensor) else inputs)]
    return [np.asarray(a) for a in inputs]


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
