"""Variant building: the heart of the adaptive IR.

Where it sits in the data flow: ``calibrate.pipeline`` hands this module the FP32 model (static
shapes) and NNCF's quantized (and, on request, INT4-compressed) copies of it; this module finds the
routable operators and builds each one (with its bias ``Add``) at each precision:

* ``fp32``: the original operator and constants;
* ``bf16`` / ``fp16``: ``Convert`` of the input and weights to the low type, the operator, and a
  ``Convert`` back (the CPU plugin runs bf16 kernels for this under an f32 hint); in level bodies
  adjacent low-float ops are grown into regions (:func:`calibrate.levels.merge_low_float_regions`);
* ``int8``: NNCF's own ``FakeQuantize`` of the activation, NNCF's int8 weight sub-graph and its
  bias-corrected bias (the CPU plugin runs u8/i8 kernels for this);
* ``int4`` (MatMul only): NNCF ``compress_weights``' 4-bit weight sub-graph, f32 activations.

Two IRs are built from them. :func:`build_adaptive_model` — the *fully routed* IR calibration
measures with — puts every op behind an ``If`` chain whose code comes from per-op state
(``apsq/mode/<i>``, and for INT8 ops ``apsq/limit/<i>``: how far beyond the calibrated INT8 range the
op input may reach, checked in-graph with ``ReduceMax(Abs(x))``, before the input escalates to fp32).
:func:`calibrate.levels.build_package_model` — the package — dispatches on ``apsq/level`` between one
statically compiled body per level of the dial and the fully routed body, built from this module's
``If`` chains (:func:`route_every_op`) and variants. All route codes leave the graph through one extra
output, ``apsq_route``. The weight statistics the sensitivity score reads (:func:`weight_errors`,
:func:`act_range`) sit here too: they are read off the variants' own sub-graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import openvino as ov
from openvino import opset8
from openvino import opset13 as ops
from openvino.op.util import Variable

from apsq_ov.bodies import state_variable
from apsq_ov.errors import CalibrationError
from apsq_ov.package import ROUTE_OUTPUT
from apsq_ov.precision import Precision

ROUTABLE_TYPES = ("Convolution", "GroupConvolution", "MatMul")
_LOW_FLOAT = {Precision.BF16: "bf16", Precision.FP16: "f16"}


def mode_variable_id(index: int) -> str:
    """State variable holding the requested precision code of routed op ``index``."""
    return f"apsq/mode/{index}"


def limit_variable_id(index: int) -> str:
    """State variable holding the range limit (× calibrated INT8 abs-max) of routed op ``index``."""
    return f"apsq/limit/{index}"


def is_constant_subgraph(output: ov.Output) -> bool:
    stack, seen = [output.get_node()], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.get_type_name() in ("Parameter", "ReadValue"):
            return False
        stack.extend(i.get_source_output().get_node() for i in node.inputs())
    return True


@dataclass
class RoutableOp:
    """One routable operator, located in the FP32 model and (if NNCF quantized it) in the INT8 model.

    :param index: position among routed ops in topological order (also the state variable index).
    :param name: the operator's friendly name (the same in both models: NNCF keeps names).
    """

    index: int
    name: str
    type: str
    op: ov.Node
    bias: ov.Node | None
    q_op: ov.Node | None = None
    q_bias: ov.Node | None = None
    act_fq: ov.Node | None = None
    q4_weights: ov.Output | None = None
    """NNCF ``compress_weights`` INT4 weight sub-graph (MatMul only): the weight-only INT4 variant."""

    @property
    def out(self) -> ov.Output:
        """The unit's output in the FP32 model (after its bias, if any)."""
        return (self.bias or self.op).output(0)

    @property
    def int8_absmax(self) -> float | None:
        """Largest magnitude the NNCF activation quantizer represents (its calibrated range)."""
        rng = act_range(self)
        return None if rng is None else max(abs(rng[0]), abs(rng[1]))


def _bias_of(node: ov.Node) -> ov.Node | None:
    targets = list(node.output(0).get_target_inputs())
    if len(targets) != 1:
        return None
    add = targets[0].get_node()
    if add.get_type_name() != "Add":
        return None
    other = add.input(1 - targets[0].get_index()).get_source_output()
    return add if is_constant_subgraph(other) else None


def find_routable_ops(
    model: ov.Model, q_model: ov.Model | None = None, q4_model: ov.Model | None = None
) -> list[RoutableOp]:
    """Find Convolution / GroupConvolution / MatMul ops with constant weights and static shapes.

    :param model: the FP32 model (static shapes).
    :param q_model: NNCF's quantized copy; ops whose input 0 it fake-quantizes get an INT8 variant.
    :param q4_model: NNCF's INT4 weight-compressed copy; MatMuls whose weights it put in INT4 get an INT4 variant.
    :return: routable ops in topological order.
    """
    q_by_name = {n.get_friendly_name(): n for n in q_model.get_ordered_ops()} if q_model is not None else {}
    q4_by_name = {n.get_friendly_name(): n for n in q4_model.get_ordered_ops()} if q4_model is not None else {}
    found: list[RoutableOp] = []
    for node in model.get_ordered_ops():
        if node.get_type_name() not in ROUTABLE_TYPES:
            continue
        if not is_constant_subgraph(node.input(1).get_source_output()):
            continue  # activation x activation MatMul (attention scores): nothing to pre-quantize
        if is_constant_subgraph(node.input(0).get_source_output()):
            continue
        if not node.get_output_partial_shape(0).is_static or not node.get_input_partial_shape(0).is_static:
            continue
        bias = _bias_of(node)
        unit = RoutableOp(
            index=len(found), name=node.get_friendly_name(), type=node.get_type_name(), op=node, bias=bias
        )
        q_op = q_by_name.get(unit.name)
        if q_op is not None and q_op.get_type_name() == unit.type:
            src = q_op.input(0).get_source_output().get_node()
            # NNCF quantizes an FC MatMul's input before its Reshape: a per-tensor FakeQuantize commutes with it.
            walked = False
            while src.get_type_name() in _SHAPE_ONLY and is_constant_subgraph(src.input(1).get_source_output()):
                src, walked = src.input(0).get_source_output().get_node(), True
            if src.get_type_name() == "FakeQuantize" and (not walked or _per_tensor(src)):
                unit.q_op, unit.act_fq = q_op, src
                unit.q_bias = q_by_name.get(bias.get_friendly_name()) if bias is not None else None
        q4 = q4_by_name.get(unit.name)
        if unit.type == "MatMul" and q4 is not None and _has_int4_constant(q4.input(1).get_source_output()):
            unit.q4_weights = q4.input(1).get_source_output()
        found.append(unit)
    return found


_SHAPE_ONLY = ("Reshape", "Squeeze", "Unsqueeze")


def _has_int4_constant(output: ov.Output) -> bool:
    stack = [output.get_node()]
    while stack:
        node = stack.pop()
        if node.get_type_name() == "Constant" and node.get_output_element_type(0) in (ov.Type.i4, ov.Type.u4):
            return True
        stack.extend(i.get_source_output().get_node() for i in node.inputs())
    return False


def _per_tensor(fq: ov.Node) -> bool:
    return all(int(np.prod(fq.input(i).get_partial_shape().to_shape())) == 1 for i in range(1, 5))


def linear_successors(units: Sequence[RoutableOp]) -> dict[str, str]:
    """``{A: B}`` for routable ops where A's output (after its bias) reaches B's input 0 through a chain
    of single-consumer ops whose other inputs are constant (activations, scale-shifts): the runs a
    single ``If`` can hold."""
    by_node = {id(u.op): u for u in units}
    out: dict[str, str] = {}
    for u in units:
        port = u.out
        for _ in range(16):
            targets = list(port.get_target_inputs())
            if len(targets) != 1:
                break
            node = targets[0].get_node()
            nxt = by_node.get(id(node))
            if nxt is not None:
                if targets[0].get_index() == 0:
                    out[u.name] = nxt.name
                break
            others = [i for i in node.inputs() if i.get_index() != targets[0].get_index()]
            if node.get_output_size() != 1 or not all(is_constant_subgraph(i.get_source_output()) for i in others):
                break
            port = node.output(0)
    return out


def routable_producers(units: Sequence[RoutableOp]) -> dict[str, set[str | None]]:
    """For each routable op, the routable ops whose output reaches its data input (input 0) through ops that
    are not routable (activations, adds, pools, reshapes), ``None`` standing for a model input: whom the op
    exchanges tensors with, so where a precision change puts a quantize/dequantize. Call it before the graph
    is rewritten."""
    by_node = {id(u.op): u for u in units}
    out: dict[str, set[str | None]] = {}
    for u in units:
        found: set[str | None] = set()
        seen: dict[int, ov.Node] = {}  # holds each wrapper: ids of freed ones are reused
        stack = [u.op.input(0).get_source_output().get_node()]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node
            hit = by_node.get(id(node))
            if hit is not None:
                found.add(hit.name)
            elif node.get_type_name() == "Parameter":
                found.add(None)
            elif node.get_type_name() != "Constant":
                stack.extend(i.get_source_output().get_node() for i in node.inputs())
        out[u.name] = found
    return out


def _make_op(template: ov.Node, data: ov.Output, weights: ov.Output) -> ov.Node:
    a = template.get_attributes()
    kind = template.get_type_name()
    if kind == "Convolution":
        return ops.convolution(
            data, weights, a["strides"], a["pads_begin"], a["pads_end"], a["dilations"], a["auto_pad"]
        )
    if kind == "GroupConvolution":
        return ops.group_convolution(
            data, weights, a["strides"], a["pads_begin"], a["pads_end"], a["dilations"], a["auto_pad"]
        )
    if kind == "MatMul":
        return ops.matmul(data, weights, a["transpose_a"], a["transpose_b"])
    raise CalibrationError(f"op={template.get_friendly_name()}: type {kind} is not routable")


def bias_input(add: ov.Node, producer: ov.Node) -> ov.Output:
    for i in add.inputs():
        if i.get_source_output().get_node() is not producer:
            return i.get_source_output()
    raise CalibrationError(f"op={add.get_friendly_name()}: bias Add has no constant input")


def _body(unit: RoutableOp, precision: Precision) -> ov.Model:
    """One If body: the unit at ``precision`` (its weights are shared with the source models)."""
    x = ops.parameter(unit.op.get_input_partial_shape(0), unit.op.get_input_element_type(0), name="x")
    y = variant_output(unit, precision, x.output(0))
    return ov.Model([ops.result(y)], [x], f"{unit.name}/{precision.value}")


def variant_output(unit: RoutableOp, precision: Precision, x: ov.Output) -> ov.Output:
    """The unit (op + bias) at ``precision`` applied to ``x``: an If body's content, or the
    sensitivity probe's local-error branch."""
    w = unit.op.input(1).get_source_output()
    if precision is Precision.FP32:
        y = _make_op(unit.op, x, w).output(0)
        if unit.bias is not None:
            y = ops.add(y, bias_input(unit.bias, unit.op)).output(0)
    elif precision in _LOW_FLOAT:
        low = _LOW_FLOAT[precision]
        y = _make_op(unit.op, ops.convert(x, low).output(0), ops.convert(w, low).output(0)).output(0)
        if unit.bias is not None:
            # Bias in the low type, then one Convert straight to the Result: a Convert followed by an
            # eltwise would be fused by the CPU plugin's LPT pass (FuseConvert) into a body whose output
            # is bf16, which the If then rejects (seen on PP-OCRv4 rec's first MatMul).
            y = ops.add(y, ops.convert(bias_input(unit.bias, unit.op), low)).output(0)
        y = ops.convert(y, "f32").output(0)
    elif precision is Precision.INT8:
        if unit.act_fq is None or unit.q_op is None:
            raise CalibrationError(f"op={unit.name}: NNCF did not quantize this op, no int8 variant")
        fq = unit.act_fq
        xq = ops.fake_quantize(
            x, *(fq.input(i).get_source_output() for i in range(1, 5)), fq.get_attributes()["levels"]
        )
        y = _make_op(unit.q_op, xq.output(0), unit.q_op.input(1).get_source_output()).output(0)
        if unit.bias is not None:
            q_add = unit.q_bias if unit.q_bias is not None else unit.bias
            producer = unit.q_op if unit.q_bias is not None else unit.op
            y = ops.add(y, bias_input(q_add, producer)).output(0)
    elif precision is Precision.INT4:
        if unit.q4_weights is None:
            raise CalibrationError(f"op={unit.name}: NNCF did not compress these weights to INT4, no int4 variant")
        y = _make_op(unit.op, x, unit.q4_weights).output(0)  # weight-only: f32 activations, int4 weights
        if unit.bias is not None:
            y = ops.add(y, bias_input(unit.bias, unit.op)).output(0)
    else:
        raise CalibrationError(f"op={unit.name}: no variant builder for precision {precision}")
    return y


def if_chain(x: ov.Output, code: ov.Output, unit: RoutableOp, chain: Sequence[Precision]) -> ov.Output:
    """``If(code == c0, body(c0), If(code == c1, body(c1), … body(c_last)))``: ``chain[:-1]`` are tested
    in order, ``chain[-1]`` is the final else."""
    chosen, rest = chain[0], chain[1:]
    node = opset8.if_op(ops.equal(code, ops.constant(np.int32(chosen.code))).output(0))
    then_body = _body(unit, chosen)
    node.set_then_body(then_body)
    if len(rest) == 1:  # two-way: then = chosen, else = the last
        else_body = _body(unit, rest[0])
        node.set_else_body(else_body)
        node.set_input(x, then_body.get_parameters()[0], else_body.get_parameters()[0])
    else:
        ex = ops.parameter(x.get_partial_shape(), x.get_element_type(), name="x")
        ec = ops.parameter([], np.int32, name="code")
        inner = if_chain(ex.output(0), ec.output(0), unit, rest)
        else_body = ov.Model([ops.result(inner)], [ex, ec], f"{unit.name}/else")
        node.set_else_body(else_body)
        tc = ops.parameter([], np.int32, name="code")  # unused in then: If wants each input bound on both sides
        then_body.add_parameters([tc])
        node.set_input(x, then_body.get_parameters()[0], ex)
        node.set_input(code, tc, ec)
    out = node.set_output(then_body.get_results()[0], else_body.get_results()[0])
    node.set_friendly_name(f"{unit.name}/apsq_if/{chosen.value}")
    return out


def replace_output(unit: RoutableOp, new: ov.Output) -> None:
    for target in list(unit.out.get_target_inputs()):
        target.replace_source_output(new)
    for tensor_name in unit.out.get_names():
        new.add_names({tensor_name})


def escalation_code(
    unit: RoutableOp, x: ov.Output, limit: ov.Output, wanted: ov.Output, fallback: Precision
) -> ov.Output:
    """``fallback`` when the op input's abs-max exceeds ``limit ×`` the calibrated INT8 abs-max and
    ``wanted`` is INT8 (INT8 would clip); else ``wanted``."""
    absmax = unit.int8_absmax
    assert absmax is not None
    rank = len(x.get_partial_shape())
    seen = ops.reduce_max(ops.abs(x), ops.constant(np.arange(rank, dtype=np.int64)), False)
    outside = ops.greater(seen, ops.multiply(limit, ops.constant(np.float32(absmax))))
    escalate = ops.logical_and(outside, ops.equal(wanted, ops.constant(np.int32(Precision.INT8.code))))
    return ops.select(escalate, ops.constant(np.int32(fallback.code)), wanted).output(0)


def route_every_op(
    units: Sequence[RoutableOp],
    variants: dict[str, tuple[Precision, ...]],
    mode_of: Callable[[RoutableOp], ov.Output],
    limit_of: Callable[[RoutableOp], ov.Output | None],
) -> list[ov.Output]:
    """Put every unit with more than one variant behind its If chain, its code from ``mode_of`` (and the
    range check against ``limit_of`` for ops with an INT8 variant). :return: the route codes."""
    codes: list[ov.Output] = []
    for unit in units:
        offered = variants[unit.name]
        if len(offered) < 2:
            continue
        x = unit.op.input(0).get_source_output()
        code = mode_of(unit)
        limit = limit_of(unit) if Precision.INT8 in offered and unit.int8_absmax is not None else None
        if limit is not None:
            code = escalation_code(unit, x, limit, code, Precision.FP32)
        lower = [p for p in offered if p is not Precision.FP32]
        replace_output(unit, if_chain(x, code, unit, [*lower, Precision.FP32]))
        codes.append(code)
    return codes


def route_vector(codes: Sequence[ov.Output]) -> ov.Output:
    parts = [ops.unsqueeze(c, ops.constant(np.int64(0))).output(0) for c in codes]
    return ops.concat(parts, 0).output(0) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class RouteDefault:
    """Initial state of one routed op: the policy a plain ``core.compile_model`` runs."""

    mode: Precision
    range_limit: float


def build_adaptive_model(
    model: ov.Model,
    units: Sequence[RoutableOp],
    variants: dict[str, tuple[Precision, ...]],
    defaults: dict[str, RouteDefault],
) -> ov.Model:
    """The *fully routed* IR: every unit of ``model`` (rewritten in place) behind its If chain, each
    op's mode and range limit in its own state variable. Calibration measures with it (lowering one
    op is a state write) and it is the package's ``full`` body (pins, forced precisions).

    :param variants: per op name, the precisions to build (fp32 first); ops with only fp32 are left alone.
    :param defaults: per op name, the ReadValue initial values.
    :return: ``model``, now adaptive.
    """
    states = StateSet()
    state = states.read

    codes = route_every_op(
        units,
        variants,
        lambda u: state(mode_variable_id(u.index), np.int32(defaults[u.name].mode.code)),
        lambda u: state(limit_variable_id(u.index), np.float32(min(defaults[u.name].range_limit, 3.0e38))),
    )
    if not codes:
        raise CalibrationError("no operator got more than one variant: nothing to route")
    add_route_result(model, route_vector(codes))
    states.attach(model)
    model.validate_nodes_and_infer_types()
    return model


def add_route_result(model: ov.Model, route: ov.Output) -> None:
    result = ops.result(route)
    result.output(0).get_tensor().set_names({ROUTE_OUTPUT})
    result.set_friendly_name(ROUTE_OUTPUT)
    model.add_results([result])


class StateSet:
    """ReadValue/Assign pairs being added to one model (each ReadValue needs its Assign sink)."""

    def __init__(self) -> None:
        self.variables: list[Variable] = []
        self.sinks: list[ov.Node] = []

    def read(self, variable_id: str, init: np.generic | np.ndarray) -> ov.Output:
        node, var = state_variable(variable_id, init)
        self.variables.append(var)
        self.sinks.append(ops.assign(node, var))
        return node.output(0)

    def attach(self, model: ov.Model) -> None:
        model.add_variables(self.variables)
        model.add_sinks(self.sinks)


def _evaluate(output: ov.Output) -> np.ndarray:
    """Value of a constant sub-graph (weights), by compiling it alone."""
    node = output.get_node()
    if node.get_type_name() == "Constant":
        return np.asarray(node.get_data(), dtype=np.float32)
    probe = ov.Model([ops.result(output)], [], "weights")
    compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled.create_infer_request().infer({})[0], dtype=np.float32)


def _round_to_bf16(w: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def weight_errors(unit: RoutableOp, precisions: Sequence[Precision]) -> dict[Precision, float]:
    """``‖W_p − W‖² / ‖W‖²`` for the weights each lower ``precision`` variant of ``unit`` really uses."""
    w = _evaluate(unit.op.input(1).get_source_output())
    norm = max(float(np.sum(w.astype(np.float64) ** 2)), 1e-30)
    errors: dict[Precision, float] = {}
    for p in precisions:
        if p is Precision.INT8:
            if unit.q_op is None:
                continue
            wp = _evaluate(unit.q_op.input(1).get_source_output())
        elif p is Precision.INT4:
            if unit.q4_weights is None:
                continue
            wp = _evaluate(unit.q4_weights)
        elif p is Precision.BF16:
            wp = _round_to_bf16(w)
        elif p is Precision.FP16:
            wp = w.astype(np.float16).astype(np.float32)
        else:
            continue
        errors[p] = float(np.sum((wp.astype(np.float64) - w) ** 2) / norm)
    return errors


def act_range(unit: RoutableOp) -> tuple[float, float, int] | None:
    """NNCF's activation quantizer range of ``unit`` as ``(low, high, levels)`` (per-tensor extremes)."""
    if unit.act_fq is None:
        return None
    lo = unit.act_fq.input(1).get_source_output().get_node().get_data()
    hi = unit.act_fq.input(2).get_source_output().get_node().get_data()
    return float(np.min(lo)), float(np.max(hi)), int(unit.act_fq.get_attributes()["levels"])
