"""Throughput serving of the escalation cascade: the fast route on every input, the escalations batched.

Where it sits in the data flow: beside :mod:`apsq_ov.runtime`, for async serving at one budget. In the
package IR the cascade is one body: the fast route, the router's risk, and ``If(risk > τ, precise
route, fast outputs)`` — one inference per input, which is what latency wants. Under load the
escalations are what throughput pays for: each is a batch-1 run of the precise (FP32) route, whose
weights the fast route's runs have pushed out of the caches since the last one. :class:`EscalationQueue`
runs the same two pieces of the same IR as two compiled models: the fast route with the risk as an
extra output on every input, and the precise route at batch ``batch`` on the inputs whose risk is above
the budget's τ, gathered on the host. The decision (``risk > τ``) and the graphs are the cascade's own;
only where the escalations run changes. The price: an escalated input waits for ``batch − 1`` more
(or for :meth:`EscalationQueue.flush` / :meth:`EscalationQueue.wait_all`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from apsq_ov.errors import ConfigError, DataError, DeviceError, PackageError
from apsq_ov.inputs import request_arrays
from apsq_ov.package import ESCALATE_NODE, RISK_NODE, Package
from apsq_ov.routing import check_max_drop, choose_body

Callback = Callable[[Any, Any], None]


def cascade_parts(model: ov.Model) -> tuple[ov.Model, ov.Model]:
    """The escalation cascade of a package IR as two models (copies; ``model`` is left as it is).

    ``fast``: the cascade body without its ``If`` — inputs, then the body's scalar state parameters except
    τ; outputs: the model's outputs, ``apsq_route``, then the risk. ``precise``: the ``If``'s precise branch
    (the precise level body) — the same inputs and scalars (τ included, unused); outputs: the model's
    outputs, then ``apsq_route``.

    :raises PackageError: if the IR has no cascade (calibrated without a router).
    """
    stack = [model]
    while stack:
        body = stack.pop()
        by_name = {n.get_friendly_name(): n for n in body.get_ordered_ops()}
        escalate, risk = by_name.get(ESCALATE_NODE), by_name.get(RISK_NODE)
        if escalate is not None and risk is not None:
            fast_outs = [escalate.input_value(d.input_index) for d in escalate.get_input_descriptions(1)]
            params = [p for p in body.get_parameters() if p.get_friendly_name() != "tau"]
            fast = ov.Model([*[ov.opset13.result(o) for o in fast_outs], ov.opset13.result(risk.output(0))], params,
                            "apsq/cascade/fast")  # fmt: skip
            return fast.clone(), escalate.get_then_body().clone()
        stack += [b for n in body.get_ordered_ops() if n.get_type_name() == "If"
                  for b in (n.get_then_body(), n.get_else_body())]  # fmt: skip
    raise PackageError("the package IR has no escalation cascade (calibrated without a router?)")


def _scalars(model: ov.Model, n_inputs: int) -> list[np.ndarray]:
    """Values for a cascade piece's trailing scalar parameters: the routed ops' range multiplier
    (``escalate``) 1.0 as in the package's default state; τ (unused by the pieces) 0."""
    return [np.array(1.0 if p.get_friendly_name() == "escalate" else 0.0, np.float32)
            for p in model.get_parameters()[n_inputs:]]  # fmt: skip


class EscalationQueue:
    """Async serving of a package's escalation cascade at one budget, escalations batched on the host.

    ``queue.start_async(inputs, userdata)`` runs the fast route; when its risk is above the budget's τ
    (or the input holds NaN/Inf) the input joins the pending escalations, which run on the precise route
    ``batch`` at a time. ``callback(result, userdata)`` is called once per input with its
    :class:`~apsq_ov.runtime.AdaptiveResult` (``escalated`` set), from OpenVINO's threads, in completion
    order. :meth:`wait_all` runs what is pending and waits for everything.

    :param package: a package directory or a loaded :class:`~apsq_ov.package.Package` with a router.
    :param max_drop: the budget (default: the package's); its cascade threshold is used, even where
        ``auto`` would serve the budget with a static level.
    :param batch: escalations per precise-route run (1: no batching).
    :raises PackageError: for a package without a cascade. :raises ConfigError: for a batch the
        precise route cannot be reshaped to. :raises DeviceError: if compiling fails.
    """

    def __init__(
        self,
        package: str | Path | Package,
        max_drop: float | None = None,
        *,
        batch: int = 8,
        device_name: str = "CPU",
        config: Mapping[str, Any] | None = None,
        jobs: int = 0,
        core: ov.Core | None = None,
    ) -> None:
        from apsq_ov.runtime import check_device

        pkg = package if isinstance(package, Package) else Package.load(package)
        m = pkg.manifest
        if m.router is None:
            raise PackageError(f"{pkg.path}: no escalation cascade ({m.router_note or 'calibrated without a router'})")
        if batch < 1:
            raise ConfigError(f"batch must be ≥ 1, got {batch}")
        self.manifest = m
        self.batch = batch
        self.max_drop = check_max_drop(m.default_max_drop if max_drop is None else max_drop)
        tau = choose_body(m, self.max_drop, "cascade").tau
        assert tau is not None, "a cascade body always has its τ"
        self.tau: float = tau
        core = core or ov.Core()
        check_device(core, device_name)
        fast, precise = cascade_parts(pkg.read_model(core))
        n_in = len(m.inputs)
        if batch > 1:
            try:
                precise.reshape({p.output(0): [batch, *p.get_partial_shape()[1:]]
                                 for p in precise.get_parameters()[:n_in]})  # fmt: skip
            except RuntimeError as exc:
                raise ConfigError(f"batch {batch}: the precise route does not reshape to it "
                                  f"({str(exc).strip().splitlines()[-1]}); use batch=1") from exc  # fmt: skip
            for out in precise.outputs[: len(m.outputs)]:
                if out.get_partial_shape()[0] != batch:
                    name = out.get_any_name() if out.get_names() else out.get_index()
                    raise ConfigError(f"batch {batch}: output {name} of the precise route does not carry the "
                                      f"batch (shape {out.get_partial_shape()}); use batch=1")  # fmt: skip
        props = {**m.profile.compile_config, "PERFORMANCE_HINT": "THROUGHPUT", **(config or {})}
        try:
            fast_cm = core.compile_model(fast, device_name, props)
            precise_cm = core.compile_model(precise, device_name, props)
        except RuntimeError as exc:
            raise DeviceError(f"device={device_name}: compile failed ({str(exc).strip().splitlines()[-1]})") from exc
        self._fast_extra = _scalars(fast, n_in)
        self._precise_extra = _scalars(precise, n_in)
        self._n_out = len(m.outputs)
        self._fast = ov.AsyncInferQueue(fast_cm, jobs)
        self._precise = ov.AsyncInferQueue(precise_cm, max(1, jobs // 2) if jobs else 0)
        self._fast.set_callback(self._on_fast)
        self._precise.set_callback(self._on_precise)
        self._pending: list[tuple[list[np.ndarray], Any, bool]] = []
        self._lock = threading.Lock()
        self._callback: Callback | None = None
        self._errors: list[BaseException] = []
        self.escalated = 0
        self.total = 0

    def set_callback(self, callback: Callback) -> None:
        """``callback(result, userdata)`` for every finished input (from OpenVINO's threads)."""
        self._callback = callback

    def _deliver(self, outputs: list[np.ndarray], route: np.ndarray, userdata: Any, escalated: bool,
                 nonfinite: bool) -> None:  # fmt: skip
        from apsq_ov.runtime import AdaptiveResult

        if self._callback is not None:
            named = dict(zip(self.manifest.outputs, outputs, strict=True))
            self._callback(AdaptiveResult(named, route, self.manifest.route_ops, nonfinite, escalated), userdata)

    def _on_fast(self, request: ov.InferRequest, userdata: Any) -> None:
        try:
            user, arrays = userdata
            risk = float(request.get_output_tensor(self._n_out + 1).data.reshape(-1)[0])
            if risk > self.tau:
                with self._lock:
                    self._pending.append((arrays, user, False))
                return
            outs = [request.get_output_tensor(i).data.copy() for i in range(self._n_out)]
            route = request.get_output_tensor(self._n_out).data.astype(np.int8).reshape(-1)
            self._deliver(outs, route, user, False, False)
        except BaseException as exc:  # re-raised from wait_all: never lost in OpenVINO's thread
            self._errors.append(exc)

    def _on_precise(self, request: ov.InferRequest, userdata: Any) -> None:
        try:
            items = userdata
            route = request.get_output_tensor(self._n_out).data.astype(np.int8).reshape(-1)
            outs = [request.get_output_tensor(i).data for i in range(self._n_out)]
            for k, (user, nonfinite) in enumerate(items):
                self._deliver([o[k : k + 1].copy() for o in outs], route, user, True, nonfinite)
        except BaseException as exc:
            self._errors.append(exc)

    def start_async(self, inputs: Any, userdata: Any = None) -> None:
        """Run one input (as ``openvino.AsyncInferQueue.start_async``). An escalated input is read again
        when its batch runs: leave its arrays unchanged until its callback has been called.

        :raises DataError: for inputs that do not fit the model."""
        arrays = request_arrays(inputs, self.manifest.inputs)
        self.total += 1
        if any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in arrays):
            with self._lock:  # the range checks cannot see NaN: the precise route, as the runtime does
                self._pending.append((arrays, userdata, True))
        else:
            try:
                self._fast.start_async([*arrays, *self._fast_extra], (userdata, arrays))
            except RuntimeError as exc:
                raise DataError(f"OpenVINO rejected the input: {str(exc).strip().splitlines()[-1]}") from exc
        self._run_pending(full_only=True)

    def _run_pending(self, full_only: bool) -> None:
        while True:
            with self._lock:
                if not self._pending or (full_only and len(self._pending) < self.batch):
                    return
                take, self._pending = self._pending[: self.batch], self._pending[self.batch :]
            self.escalated += len(take)
            # A partial batch is padded with copies of its last input (their outputs are dropped).
            padded = take + [take[-1]] * (self.batch - len(take))
            stacked = [np.concatenate([a[i] for a, _, _ in padded]) for i in range(len(take[0][0]))]
            self._precise.start_async([*stacked, *self._precise_extra], [(u, nf) for _, u, nf in take])

    def flush(self) -> None:
        """Start the pending escalations now, as a partial batch."""
        self._run_pending(full_only=False)

    def wait_all(self) -> None:
        """Wait for the fast route, run every pending escalation, wait for those; re-raise the first
        exception a callback raised."""
        self._fast.wait_all()
        self.flush()
        self._precise.wait_all()
        if self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]


__all__ = ["EscalationQueue", "cascade_parts"]
