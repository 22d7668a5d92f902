"""Measure a device Precision Profile in place (``apsq-ov profile --device D -o FILE``).

Where it sits: this writes the JSON that :mod:`apsq_ov.profiles` reads (schema version 2) and that
calibration and routing consume. Every op type × precision is a one-op OpenVINO model (the op and its
bias ``Add``, nothing else) with the precision expressed in the graph, exactly as
``calibrate.variants.variant_output`` builds If bodies:

* fp32: the op in f32;
* bf16 / fp16 (low float): ``Convert(x)`` and ``Convert(w)`` to the low type → op → bias ``Add`` in the
  low type → ``Convert`` to f32;
* int8: ``nncf.quantize`` of the fp32 one-op model (FakeQuantize on the activation, int8 weights);
* int4 (MatMul only): ``nncf.compress_weights(INT4_SYM)``, weight-only; recorded only if it works.

Latency (1 thread, ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_PRECISION_HINT=f32``): the precisions of one
point are timed in interleaved rounds (median of ≥ 50 runs each, after warm-up) so machine drift hits
them alike. A one-op model also pays the conversions at its borders (layout ``Reorder`` in and out,
the input ``Convert`` / quantize), which in a network are fused into or shared with neighbouring ops. The
models are compiled with ``PERF_COUNT`` and a point is the median over runs of (wall time × the op's share
of that run's node time): the op's cost inside a network (``benchmarks/profile_check.py`` checks the
resulting ratios against a whole 8-conv model). An op routed alone does pay such conversions (an If
body's ports are plain layout): the routing cost below includes them.

Throughput: ``ov.AsyncInferQueue`` with the device's optimal number of requests under
``PERFORMANCE_HINT=THROUGHPUT`` for a short fixed time (skipped when the time budget runs short).
Energy: RAPL package counters when readable, otherwise an estimate from Horowitz (ISSCC'14, 45 nm)
per-operation energies. Routing: the cost of an opset8 ``If`` around an identity 1×1 convolution between
two static ones (``conv → If{conv | conv} → conv`` minus ``conv → conv → conv``) at two tensor sizes:
the op in the If runs in the blocked layout of a CNN op, so the cost holds the If's copies *and* the
layout conversions on both sides that routing an op forces (a Multiply body, plain layout, would show
only the copies: about a fifth of it here). ``if_base_ms`` is the cost at the small size (copies there
are nearly free) and ``if_per_mb_ms`` the slope to the large one.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset8 as opset8
import openvino.opset13 as ops

from apsq_ov.errors import DeviceError, ProfileError
from apsq_ov.precision import Precision
from apsq_ov.profiles import PROFILE_SCHEMA_VERSION, DeviceProfile
from apsq_ov.runtime import check_device

Progress = Callable[[str, int, int], None]

TOOL = "apsq-ov profile"
MIN_RUNS = 50
_WARMUP_RUNS = 5
_ROUNDS = 5
_MAX_RUNS_PER_ROUND = 4000
_THROUGHPUT_S = 0.3
_LOW_FLOAT_TYPES = {Precision.FP16: "f16", Precision.BF16: "bf16"}
# Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm: (multiply + add) pJ per MAC.
_HOROWITZ_PJ = {
    Precision.FP32: 3.7 + 0.9,
    Precision.FP16: 1.1 + 0.4,
    Precision.BF16: 1.1 + 0.4,
    Precision.INT8: 0.2 + 0.03,
    Precision.INT4: 3.7 + 0.9,  # weight-only: the arithmetic stays on the f32 activation path
}
# Exec-graph node types that convert layout or precision at a one-op model's borders.
_BORDER_TYPES = frozenset({"Reorder", "Convert", "FakeQuantize", "Subgraph", "Transpose"})
_RAPL_ROOT = Path("/sys/class/powercap")


@dataclass(frozen=True)
class OpPoint:
    """One benchmarked size of an op type: its input shape, weight shape and MACs."""

    op_type: str
    shape: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    macs: int

    @property
    def kernel(self) -> int:
        return self.weight_shape[-1] if self.op_type != "MatMul" else 1


def conv(n: int, c: int, h: int, w: int, k: int, out: int) -> OpPoint:
    """A stride-1, same-padded ``k×k`` Convolution from ``c`` to ``out`` channels."""
    return OpPoint(
        "Convolution", f"{n}x{c}x{h}x{w} conv{k}x{k}->{out}", (n, c, h, w), (out, c, k, k), n * out * c * k * k * h * w
    )


def depthwise(n: int, c: int, h: int, w: int, k: int) -> OpPoint:
    """A stride-1, same-padded depthwise ``k×k`` GroupConvolution."""
    return OpPoint(
        "GroupConvolution", f"{n}x{c}x{h}x{w} dw{k}x{k}", (n, c, h, w), (c, 1, 1, k, k), n * c * k * k * h * w
    )


def matmul(lead: tuple[int, ...], k: int, n: int) -> OpPoint:
    """``x[*lead, k] · W[k, n]`` (weights stored ``[n, k]``, ``transpose_b``: the FC layout)."""
    lead_s = "x".join(map(str, lead))
    return OpPoint("MatMul", f"{lead_s}x{k} @ {k}x{n}", (*lead, k), (n, k), math.prod(lead) * k * n)


POINTS: tuple[OpPoint, ...] = (
    conv(1, 24, 32, 32, 3, 24),
    conv(1, 32, 112, 112, 1, 16),
    conv(1, 64, 56, 56, 3, 64),
    conv(1, 128, 28, 28, 3, 128),
    depthwise(1, 24, 32, 32, 3),
    depthwise(1, 672, 14, 14, 5),
    depthwise(1, 32, 112, 112, 3),
    depthwise(1, 144, 56, 56, 3),
    matmul((1, 40), 120, 480),
    matmul((1,), 1280, 1000),
)
QUICK_POINTS: tuple[OpPoint, ...] = (
    conv(1, 64, 56, 56, 3, 64),
    depthwise(1, 144, 56, 56, 3),
    matmul((1,), 1280, 1000),
)
# Routing If: tensors of about 0.05 MB and 1 MB (input + output, f32). Not 1x32x64x64: power-of-two
# planes make the nhwc -> nchw reorder at the If port hit cache-set conflicts (1.5 ms instead of 0.07).
IF_SHAPES: tuple[tuple[int, ...], ...] = ((1, 16, 20, 20), (1, 40, 56, 56))


# -- device identity ----------------------------------------------------------------------------
def _cpu_info() -> tuple[str, set[str]]:
    model, flags = "", set[str]()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


def host_cpu() -> str:
    """This machine's CPU model, as a profile's ``machine`` names it (benchmark runs record it too: the runs of
    one report may come from different machines)."""
    return _cpu_info()[0]


def host_int8_hardware() -> str:
    """This machine's CPU INT8 hardware, as a profile names it (``VNNI``, ``AMX``, ``INT8 without VNNI …``)."""
    return _int8_hardware("CPU", ["INT8"], _cpu_info()[1])


def _int8_hardware(plugin: str, caps: Sequence[str], flags: set[str]) -> str:
    if "INT8" not in caps:
        return "none"
    if plugin == "CPU":
        if {"amx_int8"} & flags:
            return "AMX"
        if {"avx512_vnni", "avx_vnni"} & flags:
            return "VNNI"
        return "INT8 without VNNI (no vnni flag in /proc/cpuinfo)" if flags else "unknown"
    if plugin == "GPU":
        return "XMX" if "GPU_HW_MATMUL" in caps else "DP4A or none (no XMX reported)"
    return "unknown"


def _prop(core: ov.Core, device: str, name: str, default: Any = "") -> Any:
    try:
        return core.get_property(device, name)
    except (RuntimeError, TypeError):
        return default


def _supported(core: ov.Core, device: str) -> set[str]:
    return set(_prop(core, device, "SUPPORTED_PROPERTIES", {}) or {})


def _config(core: ov.Core, device: str, **props: Any) -> dict[str, Any]:
    """Only the properties this device's plugin accepts (GPU has no INFERENCE_NUM_THREADS)."""
    supported = _supported(core, device)
    return {k: v for k, v in props.items() if not supported or k in supported}


def device_precisions(plugin: str, caps: Sequence[str]) -> list[Precision]:
    """The precisions to measure on a device with OPTIMIZATION_CAPABILITIES ``caps``.

    INT4 is weight-only and for MatMul: measured where the device reports INT4 or its plugin has
    weight-decompression MatMul kernels (CPU, GPU), and kept only if it compiles.
    """
    out = [Precision.FP32]
    out += [
        p for p, cap in ((Precision.FP16, "FP16"), (Precision.BF16, "BF16"), (Precision.INT8, "INT8")) if cap in caps
    ]
    if "INT4" in caps or plugin in ("CPU", "GPU"):
        out.append(Precision.INT4)
    return out


# -- one-op models ------------------------------------------------------------------------------
def _op(point: OpPoint, x: ov.Output, w: ov.Output) -> ov.Node:
    if point.op_type == "MatMul":
        return ops.matmul(x, w, transpose_a=False, transpose_b=True)
    pad = [point.kernel // 2] * 2
    if point.op_type == "GroupConvolution":
        return ops.group_convolution(x, w, [1, 1], pad, pad, [1, 1])
    return ops.convolution(x, w, [1, 1], pad, pad, [1, 1])


def _bias_shape(point: OpPoint) -> tuple[int, ...]:
    out_ch = point.weight_shape[0]
    return (out_ch,) if point.op_type == "MatMul" else (1, out_ch, 1, 1)


def fp32_model(point: OpPoint, rng: np.random.Generator) -> ov.Model:
    """The op and its bias Add in f32, random weights (timing only)."""
    fan_in = math.prod(point.weight_shape[1:])
    x = ops.parameter(list(point.input_shape), np.float32, name="x")
    w = ops.constant((rng.standard_normal(point.weight_shape) / math.sqrt(fan_in)).astype(np.float32))
    b = ops.constant((0.1 * rng.standard_normal(_bias_shape(point))).astype(np.float32))
    y = ops.add(_op(point, x.output(0), w.output(0)), b)
    return ov.Model([ops.result(y)], [x], f"{point.op_type}/fp32")


def low_float_model(fp32: ov.Model, point: OpPoint, precision: Precision) -> ov.Model:
    """The variants.py low-float form: Convert(x), Convert(w) → op → bias Add in the low type → Convert(f32)."""
    low = _LOW_FLOAT_TYPES[precision]
    add = fp32.get_results()[0].input(0).get_source_output().get_node()
    op_node, bias = add.input(0).get_source_output().get_node(), add.input(1).get_source_output()
    w = op_node.input(1).get_source_output()
    x = ops.parameter(list(point.input_shape), np.float32, name="x")
    y = _op(point, ops.convert(x, low).output(0), ops.convert(w, low).output(0))
    y = ops.convert(ops.add(y, ops.convert(bias, low)), "f32")
    return ov.Model([ops.result(y)], [x], f"{point.op_type}/{precision.value}")


def sample_input(point: OpPoint, rng: np.random.Generator) -> np.ndarray:
    """Non-negative data, like the post-ReLU activations most CNN ops read (NNCF then picks u8)."""
    return np.abs(rng.standard_normal(point.input_shape)).astype(np.float32)


def _nncf_target(plugin: str) -> Any:
    import nncf

    return {"CPU": nncf.TargetDevice.CPU, "GPU": nncf.TargetDevice.GPU}.get(plugin, nncf.TargetDevice.ANY)


def int8_model(fp32: ov.Model, data: np.ndarray, plugin: str) -> ov.Model:
    """``nncf.quantize`` of the one-op model (its progress output silenced)."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.quantize(
            fp32.clone(),
            nncf.Dataset([data]),
            subset_size=1,
            target_device=_nncf_target(plugin),
            advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True),
        )


def int4_model(fp32: ov.Model, point: OpPoint) -> ov.Model | None:
    """Weight-only INT4 (symmetric, group 128 where the reduction dim allows, else per channel); None
    if NNCF left no 4-bit weight in the graph."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    k = point.weight_shape[-1]
    with contextlib.redirect_stdout(io.StringIO()):
        model = nncf.compress_weights(
            fp32.clone(),
            mode=nncf.CompressWeightsMode.INT4_SYM,
            ratio=1.0,
            group_size=128 if k % 128 == 0 else -1,
            all_layers=True,
        )
    four_bit = (ov.Type.i4, ov.Type.u4)
    if not any(
        op.get_type_name() == "Constant" and op.get_output_element_type(0) in four_bit for op in model.get_ops()
    ):
        return None
    return model


def _identity_conv(x: ov.Output, channels: int) -> ov.Output:
    eye = np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1)
    return ops.convolution(x, ops.constant(eye), [1, 1], [0, 0], [0, 0], [1, 1]).output(0)


def if_models(shape: tuple[int, ...]) -> tuple[ov.Model, ov.Model]:
    """``conv → If(cond){conv | conv} → conv`` and ``conv → conv → conv``, every conv an identity 1×1
    (an identity-like op that runs in the blocked layout CNN ops use); ``cond`` is a boolean input."""
    channels = shape[1]

    def body() -> ov.Model:
        p = ops.parameter(list(shape), np.float32, name="x")
        return ov.Model([ops.result(_identity_conv(p.output(0), channels))], [p], "body")

    x = ops.parameter(list(shape), np.float32, name="x")
    cond = ops.parameter([], ov.Type.boolean, name="cond")
    node = opset8.if_op(cond.output(0))
    then_body, else_body = body(), body()
    node.set_then_body(then_body)
    node.set_else_body(else_body)
    node.set_input(_identity_conv(x.output(0), channels), then_body.get_parameters()[0], else_body.get_parameters()[0])
    routed = node.set_output(then_body.get_results()[0], else_body.get_results()[0])
    with_if = ov.Model([ops.result(_identity_conv(routed, channels))], [x, cond], "routed")
    px = ops.parameter(list(shape), np.float32, name="x")
    y = _identity_conv(_identity_conv(_identity_conv(px.output(0), channels), channels), channels)
    return with_if, ov.Model([ops.result(y)], [px], "static")


# -- timing -------------------------------------------------------------------------------------
class _Rapl:
    """Package energy counters (``intel-rapl:N/energy_uj``), or nothing where they are not readable."""

    def __init__(self) -> None:
        self.domains: list[tuple[Path, float]] = []
        for d in sorted(_RAPL_ROOT.glob("intel-rapl:*")) if _RAPL_ROOT.is_dir() else []:
            if d.name.count(":") != 1:  # package domains only, not their core/uncore subdomains
                continue
            try:
                int((d / "energy_uj").read_text())
                wrap = float((d / "max_energy_range_uj").read_text()) if (d / "max_energy_range_uj").exists() else 0.0
            except (OSError, ValueError):
                continue
            self.domains.append((d / "energy_uj", wrap))

    @property
    def readable(self) -> bool:
        return bool(self.domains)

    def read(self) -> list[float]:
        return [float(p.read_text()) for p, _ in self.domains]

    def delta_uj(self, before: list[float]) -> float:
        total = 0.0
        for (_, wrap), b, a in zip(self.domains, before, self.read(), strict=True):
            total += a - b if a >= b else a + wrap - b
        return total


@dataclass
class _Timing:
    samples: list[float]
    op_samples: list[float]
    energy_uj: float = 0.0

    @property
    def median_ms(self) -> float:
        """Median wall time of one inference."""
        return 1e3 * statistics.median(self.samples)

    @property
    def op_median_ms(self) -> float:
        """Median of (wall time x the op's share of node time) per run; the wall median without counters."""
        return 1e3 * statistics.median(self.op_samples) if self.op_samples else self.median_ms


def op_share(request: ov.InferRequest) -> float | None:
    """The share of the last inference's node time OpenVINO's per-node counters (``PERF_COUNT``) give to
    the op itself rather than to border conversions (Reorder, Convert, the input quantize); None
    without counters."""
    op = border = 0.0
    for p in request.profiling_info:
        t = p.real_time.total_seconds()
        if p.node_type in _BORDER_TYPES:
            border += t
        else:
            op += t
    return op / (op + border) if op > 0 else None


def time_interleaved(
    requests: Sequence[ov.InferRequest],
    *,
    min_runs: int = MIN_RUNS,
    min_time_s: float = 0.0,
    rounds: int = _ROUNDS,
    rapl: _Rapl | None = None,
    split_border: bool = False,
) -> list[_Timing]:
    """Time ``requests`` (inputs already set) in ``rounds`` interleaved rounds after a warm-up: each gets
    at least ``min_runs`` runs and about ``min_time_s`` seconds in all.

    :param split_border: the requests were compiled with ``PERF_COUNT``: also record, per run, the wall
        time times the op's share of the node time (:func:`op_share`), read outside the timed call.
    """
    for r in requests:
        for _ in range(_WARMUP_RUNS):
            r.infer()
    out = [_Timing([], []) for _ in requests]
    runs_per_round = math.ceil(min_runs / rounds)
    time_per_round = min_time_s / rounds
    clock = time.perf_counter
    for _ in range(rounds):
        for r, timing in zip(requests, out, strict=True):
            before = rapl.read() if rapl and rapl.readable else None
            start, k = clock(), 0
            while k < runs_per_round or (clock() - start < time_per_round and k < _MAX_RUNS_PER_ROUND):
                t0 = clock()
                r.infer()
                wall = clock() - t0
                timing.samples.append(wall)
                share = op_share(r) if split_border else None
                if share is not None:
                    timing.op_samples.append(wall * share)
                k += 1
            if rapl is not None and before is not None:
                timing.energy_uj += rapl.delta_uj(before)
    return out


def throughput_fps(compiled: ov.CompiledModel, data: np.ndarray, duration_s: float = _THROUGHPUT_S) -> float:
    """Inferences per second with an ``AsyncInferQueue`` of the device's optimal size."""
    jobs = int(_prop_compiled(compiled, "OPTIMAL_NUMBER_OF_INFER_REQUESTS", 0)) or 0
    queue = ov.AsyncInferQueue(compiled, jobs)
    tensor = ov.Tensor(data)
    for i in range(len(queue)):
        queue[i].set_input_tensor(tensor)
    for _ in range(len(queue)):
        queue.start_async()
    queue.wait_all()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration_s:
        queue.start_async()
        count += 1
    queue.wait_all()
    return count / (time.perf_counter() - start)


def _prop_compiled(compiled: ov.CompiledModel, name: str, default: Any) -> Any:
    try:
        return compiled.get_property(name)
    except RuntimeError:
        return default


# -- the profile --------------------------------------------------------------------------------
def _fig(value: float, provenance: dict[str, str], digits: int = 5) -> dict[str, Any]:
    return {"value": float(f"{max(value, 0.0):.{digits}g}"), "provenance": provenance}


def _compile(core: ov.Core, model: ov.Model, device: str, config: dict[str, Any], what: str) -> ov.CompiledModel:
    try:
        return core.compile_model(model, device, config)
    except RuntimeError as exc:
        raise DeviceError(f"{what} device={device}: compile failed ({str(exc).strip().splitlines()[-1]})") from exc


def measure_profile(
    device: str = "CPU",
    *,
    progress: Progress | None = None,
    budget_s: float = 150.0,
    quick: bool = False,
    trace: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Measure ``device``'s Precision Profile (schema version 2, see :mod:`apsq_ov.profiles`).

    :param device: OpenVINO device name (``CPU``, ``GPU``, ``GPU.1`` …).
    :param progress: called as ``progress(phase, done, total)``; phases ``build``, ``latency``,
        ``routing``, ``throughput``.
    :param budget_s: wall-time budget; time per point is scaled to it (never below 50 runs) and
        throughput is skipped when what is left would not hold it.
    :param quick: one point per op type and no throughput (tests, smoke runs).
    :param trace: if given, one dict per measured model is appended (raw wall time, the op's share,
        border time), then the routing measurements.
    :return: the profile JSON as a dict (validate with ``DeviceProfile.from_json``).
    :raises DeviceError: if the device is absent or refuses the fp32 models.
    """
    t_start = time.perf_counter()
    report = progress or (lambda phase, done, total: None)
    core = ov.Core()
    check_device(core, device)
    plugin = device.split(".")[0].split(":")[0].upper()
    caps = [str(c) for c in _prop(core, device, "OPTIMIZATION_CAPABILITIES", [])]
    full_name = str(_prop(core, device, "FULL_DEVICE_NAME", device)) or device
    cpu_model, flags = _cpu_info()
    ov_version = ov.get_version().split("-")[0]
    cores = os.cpu_count() or 1
    machine = f"{cpu_model}, {cores} cores, OpenVINO {ov_version}"
    if plugin != "CPU":
        machine = f"{full_name} ({device}) on {machine}"
    measured = {"kind": "measured", "date": datetime.date.today().isoformat(), "machine": machine, "tool": TOOL}
    rapl = _Rapl()
    precisions = device_precisions(plugin, caps)
    points = QUICK_POINTS if quick else POINTS
    rng = np.random.default_rng(0)

    # 1. build every one-op model (NNCF runs here, so the timing phase is not interrupted by it)
    jobs: list[tuple[OpPoint, np.ndarray, dict[Precision, ov.Model]]] = []
    skipped: list[str] = []
    for i, point in enumerate(points):
        report("build", i, len(points))
        fp32 = fp32_model(point, rng)
        data = sample_input(point, rng)
        models = {Precision.FP32: fp32}
        for p in precisions:
            try:
                if p in _LOW_FLOAT_TYPES:
                    models[p] = low_float_model(fp32, point, p)
                elif p is Precision.INT8:
                    models[p] = int8_model(fp32, data, plugin)
                elif p is Precision.INT4 and point.op_type == "MatMul":
                    q = int4_model(fp32, point)
                    if q is not None:
                        models[p] = q
            except Exception as exc:  # NNCF raises many types; a precision that fails to build is not recorded
                skipped.append(f"{point.shape} {p.value}: {type(exc).__name__}")
        jobs.append((point, data, models))
    report("build", len(points), len(points))

    # 2. latency (+ energy): the precisions of one point interleaved
    lat_cfg = _config(core, device, INFERENCE_NUM_THREADS=1, PERFORMANCE_HINT="LATENCY", INFERENCE_PRECISION_HINT="f32")
    perf_cfg = {**lat_cfg, **_config(core, device, PERF_COUNT=True)}
    n_models = sum(len(m) for _, _, m in jobs)
    elapsed = time.perf_counter() - t_start
    per_model_s = 0.3 if quick else max(0.0, min(1.5, 0.55 * (budget_s - elapsed) / max(n_models, 1)))
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    timed: list[tuple[OpPoint, np.ndarray, Precision, ov.Model]] = []
    energy_method = (
        "Horowitz ISSCC'14 45 nm per-MAC energy (multiply + add pJ: fp32 3.7+0.9, fp16/bf16 1.1+0.4, "
        "int8 0.2+0.03; int4 weight-only counted as its f32 activation path) x the op's MACs; "
        "no readable RAPL counter on this machine"
    )
    for i, (point, data, models) in enumerate(jobs):
        report("latency", i, len(jobs))
        requests, order = [], []
        for p, model in models.items():
            try:
                compiled = core.compile_model(model, device, perf_cfg)
            except RuntimeError as exc:
                if p is Precision.FP32:
                    raise DeviceError(
                        f"op={point.op_type} {point.shape} precision=fp32 device={device}: "
                        f"compile failed ({str(exc).strip().splitlines()[-1]})"
                    ) from exc
                skipped.append(f"{point.shape} {p.value}: compile failed")
                continue
            req = compiled.create_infer_request()
            req.set_input_tensor(ov.Tensor(data))
            requests.append(req)
            order.append(p)
            timed.append((point, data, p, model))
        timings = time_interleaved(requests, min_time_s=per_model_s, rapl=rapl, split_border=True)
        for p, t in zip(order, timings, strict=True):
            wall = t.median_ms
            latency = t.op_median_ms
            entry: dict[str, Any] = {"shape": point.shape, "macs": point.macs, "latency_ms": _fig(latency, measured)}
            if rapl.readable and t.energy_uj > 0:
                entry["energy_mj"] = _fig(t.energy_uj / 1e3 / len(t.samples), measured)
            else:
                energy = point.macs * _HOROWITZ_PJ[p] * 1e-9
                entry["energy_mj"] = _fig(energy, {"kind": "estimate", "method": energy_method})
            rows.setdefault(point.op_type, {}).setdefault(p.value, []).append(entry)
            if trace is not None:
                trace.append(
                    {
                        "op_type": point.op_type,
                        "shape": point.shape,
                        "precision": p.value,
                        "macs": point.macs,
                        "wall_ms": wall,
                        "border_ms": wall - latency,
                        "latency_ms": latency,
                        "runs": len(t.samples),
                    }
                )
    report("latency", len(jobs), len(jobs))

    # 3. routing If cost at two tensor sizes
    report("routing", 0, len(IF_SHAPES))
    if_points: list[tuple[float, float]] = []
    for j, shape in enumerate(IF_SHAPES):
        with_if, plain = if_models(shape)
        x = ov.Tensor(np.abs(rng.standard_normal(shape)).astype(np.float32))
        r_if = _compile(core, with_if, device, lat_cfg, "routing If").create_infer_request()
        r_if.set_tensor("x", x)
        r_if.set_tensor("cond", ov.Tensor(np.array(True)))
        r_plain = _compile(core, plain, device, lat_cfg, "routing baseline").create_infer_request()
        r_plain.set_input_tensor(x)
        t_if, t_plain = time_interleaved([r_if, r_plain], min_runs=200, min_time_s=0.3 if quick else 1.5, rounds=8)
        mb = 2 * math.prod(shape) * 4 / 2**20
        if_points.append((mb, t_if.median_ms - t_plain.median_ms))
        if trace is not None:
            trace.append(
                {
                    "routing_shape": "x".join(map(str, shape)),
                    "mb": mb,
                    "with_if_ms": t_if.median_ms,
                    "without_if_ms": t_plain.median_ms,
                }
            )
        report("routing", j + 1, len(IF_SHAPES))
    # A line through (0, cost at the small size) and the large point. Copies at ~0.05 MB are nearly free,
    # and in-cache reorders make small sizes cheaper than a line, so the line through both points would
    # have a negative base. This one is exact at the large size and overstates the small by per_mb x 0.05 MB.
    (_, c0), (mb1, c1) = if_points
    base = max(c0, 0.0)
    per_mb = max((c1 - base) / mb1, 0.0)

    # 4. throughput, if the budget still holds it
    thr_cfg = _config(core, device, PERFORMANCE_HINT="THROUGHPUT", INFERENCE_PRECISION_HINT="f32")
    left = budget_s - (time.perf_counter() - t_start)
    throughput_note = "throughput not measured (quick run)" if quick else ""
    if not quick and left > len(timed) * (_THROUGHPUT_S + 0.15) + 5:
        by_key = {(e["shape"], prec): e for op_rows in rows.values() for prec, es in op_rows.items() for e in es}
        for k, (point, data, p, model) in enumerate(timed):
            report("throughput", k, len(timed))
            compiled = _compile(core, model, device, thr_cfg, f"op={point.op_type} precision={p.value}")
            by_key[(point.shape, p.value)]["throughput_fps"] = _fig(throughput_fps(compiled, data), measured)
        report("throughput", len(timed), len(timed))
        throughput_note = (
            f"throughput_fps: AsyncInferQueue with the optimal number of requests, "
            f"PERFORMANCE_HINT=THROUGHPUT, all cores, {_THROUGHPUT_S} s per model."
        )
    elif not quick:
        throughput_note = "throughput skipped: the time budget would not hold it"

    measured_precs = [p for p in Precision if any(p.value in r for r in rows.values())]
    int8_hw = _int8_hardware(plugin, caps, flags)
    where = f"{device}, {cores} cores" if plugin == "CPU" else device
    measured_list = ", ".join(p.value for p in measured_precs)
    hw = int8_hw if int8_hw.startswith("INT8") else f"INT8 hardware {int8_hw}"  # "INT8 without VNNI (…)" says it
    profile: dict[str, Any] = {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "device": {
            "plugin": device,
            "name": f"{full_name} ({where}; measured {measured_list}; {hw})",
            "identity": {
                "full_device_name": full_name,
                "device_architecture": str(_prop(core, device, "DEVICE_ARCHITECTURE", "")),
                "optimization_capabilities": ", ".join(caps),
                "cpu_model": cpu_model,
                "cpu_cores": str(cores),
                "cpu_isa": ", ".join(
                    sorted(
                        f
                        for f in flags
                        if f.startswith(
                            ("avx512_bf16", "avx512_vnni", "avx_vnni", "amx", "avx512_fp16", "avx512f", "avx2")
                        )
                    )
                ),
                "int8_hardware": int8_hw,
                "openvino": ov.get_version(),
            },
            "int8_hardware": int8_hw,
        },
        "native_precisions": [p.value for p in measured_precs],
        "default_precisions": ["fp32"],
        "compile_config": {"INFERENCE_PRECISION_HINT": "f32"},
        "routing": {"if_base_ms": _fig(base, measured), "if_per_mb_ms": _fig(per_mb, measured)},
        "op_types": rows,
        "notes": " ".join(
            filter(
                None,
                [
                    f"Measured by {TOOL} on {machine} ({device}); {len(points)} sizes per run.",
                    "Each point is a one-op model (op + bias Add) with the precision in the graph (bf16/fp16: Convert "
                    "in and out; int8: nncf.quantize; int4: nncf.compress_weights INT4_SYM, MatMul only, weight-only), "
                    "1 thread, PERFORMANCE_HINT=LATENCY, INFERENCE_PRECISION_HINT=f32, precisions of a point timed in "
                    f"{_ROUNDS} interleaved rounds, median of >= {MIN_RUNS} runs after warm-up.",
                    "latency_ms = the median over runs of (wall time x the op's share of the node time PERF_COUNT "
                    "reports for that run), leaving out the border conversions (Reorder, Convert, input quantize) "
                    "that a network fuses into or shares with neighbouring ops.",
                    "routing: conv -> If{conv | conv} -> conv minus conv -> conv -> conv (identity 1x1 convs, fp32, "
                    "so the cost holds the If's copies and the layout conversions routing forces on both sides), "
                    f"{if_points[0][1]:.4f} ms at {if_points[0][0]:.3g} MB and {if_points[1][1]:.4f} ms at "
                    f"{if_points[1][0]:.3g} MB (MB = input + output bytes / 2**20): if_base_ms is the small-size "
                    "cost, if_per_mb_ms the slope to the large one. A bf16/int8 body also converts/quantizes "
                    "its input, which latency_ms leaves out.",
                    "energy_mj: RAPL package energy over the timed runs / runs."
                    if rapl.readable
                    else "energy_mj: estimate from Horowitz ISSCC'14 (no readable RAPL counter).",
                    throughput_note,
                    f"Not recorded: {'; '.join(skipped)}." if skipped else "",
                ],
            )
        ),
    }
    # default: fp32 plus every precision faster than fp32 for Convolution at the typical size
    try:
        prof = DeviceProfile.from_json(profile, source=f"measured {device}")
    except ProfileError as exc:
        raise ProfileError(f"measured profile for device={device} does not validate: {exc}") from exc
    faster = set(prof.faster_than_fp32("Convolution", prof.native_precisions)) if "Convolution" in rows else set()
    profile["default_precisions"] = ["fp32"] + [p.value for p in measured_precs if p in faster]
    return profile
