"""The asynchronous side of the runtime: :class:`AdaptiveAsyncInferQueue` (mirrors
``openvino.AsyncInferQueue``) with a per-input policy.

Where it sits in the data flow: beside :mod:`apsq_ov.runtime`, after :func:`~apsq_ov.runtime.compile_model`.
Each input's policy picks the compiled graph it runs on (the package, a standalone body, or the
cascade's fast graph); every such graph gets its own pool of requests, so requests never share routing
state. On a model compiled with ``escalation_batch=N`` (:class:`~apsq_ov.runtime.BatchedEscalation`) the
queue runs each cascade input on the fast graph only and re-runs the escalated ones together, N at a time
(or whatever has gathered after ``escalation_timeout`` seconds, as OpenVINO's auto-batching does); such
an input's callback gets an :class:`EscalatedInput`. Results are those of the in-graph cascade (same
decision, same precise route).
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import openvino as ov

from apsq_ov.errors import ConfigError, DeviceError
from apsq_ov.inputs import request_arrays
from apsq_ov.precision import Precision
from apsq_ov.runtime import (
    _FAST,
    AdaptiveCompiledModel,
    AdaptiveInferRequest,
    AdaptiveResult,
    BatchedEscalation,
    Plan,
    _holds_nonfinite,
    _policy_key,
)


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
