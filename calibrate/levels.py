"""The package IR: one statically compiled body per level of the dial, the escalation cascade and
the top-level dispatch between them.

Where it sits in the data flow: ``calibrate.pipeline`` calls :func:`build_package_model` once the
selection (``calibrate.selection``) has chosen each level's per-op precisions and, if it pays, the
router (``calibrate.router``) has been fitted. It dispatches on the ``apsq/level`` state between

* one *level body* per level (:func:`level_body`): a copy of the model with every op at the precision
  the selection chose for that level, statically (no ``If``: OpenVINO fuses and compiles it as a plain
  model), except the few ops the level routes per input, each behind an ``If`` (runs of adjacent ones
  sharing one); adjacent low-float ops are grown into regions (:func:`merge_low_float_regions`);
* the *cascade* (with a fitted router): the fast level's body, the router's risk on its features and
  output, and the precise level's body re-run when the risk exceeds ``apsq/tau``;
* the *full body*: every op behind its ``If`` chain (``calibrate.variants``), its state in the
  ``apsq/modes`` / ``apsq/limits`` vectors (precision pins and forced precisions run there).

The per-op variants and ``If`` chains come from :mod:`calibrate.variants`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import openvino as ov
from openvino import opset8
from openvino import opset13 as ops

from apsq_ov.decisions import CLASSES_LAST, Decision
from apsq_ov.package import (
    ESCALATE_STATE,
    LEVEL_STATE,
    LIMITS_STATE,
    MODES_STATE,
    NEVER,
    TAU_STATE,
    OpChoice,
    Router,
)
from apsq_ov.precision import Precision

from .router import RISK_NODE, pre_quant_input, risk_output
from .variants import (
    RoutableOp,
    StateSet,
    add_route_result,
    bias_input,
    escalation_code,
    find_routable_ops,
    if_chain,
    is_constant_subgraph,
    replace_output,
    route_every_op,
    route_vector,
    variant_output,
)


def build_package_model(
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
    levels: Sequence[dict[str, OpChoice]],
    default_level: int,
    q4_model: ov.Model | None = None,
    router: Router | None = None,
    tau: float = NEVER,
    decision: Decision = CLASSES_LAST,
) -> ov.Model:
    """The package IR: one top-level dispatch (a tree of ``If`` on the ``apsq/level`` state) over one
    body per level of the dial plus the fully routed body.

    A *level body* is a copy of the model in which every op runs statically at the precision the
    selection chose for that level (no If, so OpenVINO fuses and compiles it as a plain model),
    except the few ops the selection routes per input. The *full body* (level index
    ``len(levels)``) routes every op from the ``apsq/mode/<i>`` / ``apsq/limit/<i>`` state: precision
    pins and forced precisions run there. Every body returns the model's outputs and ``apsq_route``.
    With a fitted ``router``, one more body (index ``len(levels)``, the full body moves to
    ``len(levels) + 1``) is the escalation cascade (:func:`_cascade_body`), its threshold the
    ``apsq/tau`` state (initial value ``tau``).

    :param fp32_model: the FP32 model (static shapes); it is copied, never modified.
    :param levels: per level, ``{op name: OpChoice}`` for every op with more than one variant.
    :param decision: which output the router's margin reads, and how (as calibration fitted it).
    """
    names = [n for n, v in variants.items() if len(v) > 1]
    base = {u.name: u for u in find_routable_ops(fp32_model, q_model, q4_model)}
    # State a body can read. Only state some body uses exists: an If input no body reads is removed
    # at compile time, and the CPU plugin rejects a ReadValue left with no consumer but its Assign.
    limited = [n for n in names if Precision.INT8 in variants[n] and base[n].int8_absmax is not None]
    escalates = any(level[n].routed for level in levels for n in names)
    inputs = fp32_model.get_parameters()
    n_out = len(fp32_model.outputs)

    def signature() -> list[ov.Node]:
        sig = [ops.parameter([], np.float32, name="escalate")] if escalates else []
        if router is not None:  # every level body takes τ (only the cascade reads it): one tree signature
            sig.append(ops.parameter([], np.float32, name="tau"))
        return sig

    def body(level: dict[str, OpChoice], name: str) -> tuple[ov.Model, dict[str, ov.Output]]:
        return level_body(fp32_model, q_model, variants, level, name, signature(), q4_model)

    bodies = [body(level, f"apsq/level/{k}")[0] for k, level in enumerate(levels)]
    if router is not None:
        fast, feature_inputs = body(levels[router.fast_level], "apsq/cascade/fast")
        precise = body(levels[router.precise_level], "apsq/cascade/precise")[0]
        bodies.append(_cascade_body(router, fast, feature_inputs, precise, decision))
    clone = fp32_model.clone()
    # The full body reads the per-op state from two vectors (one ReadValue each: every state variable
    # costs time on every inference, whichever body runs).
    modes_vec = ops.parameter([len(names)], np.int32, name=MODES_STATE)
    limits_vec = ops.parameter([max(len(limited), 1)], np.float32, name=LIMITS_STATE)
    slot = {n: i for i, n in enumerate(names)}
    lslot = {n: i for i, n in enumerate(limited)}
    axis0 = ops.constant(np.int64(0))
    codes = route_every_op(
        find_routable_ops(clone, q_model, q4_model),
        variants,
        lambda u: ops.gather(modes_vec, ops.constant(np.int64(slot[u.name])), axis0).output(0),
        lambda u: (
            ops.gather(limits_vec, ops.constant(np.int64(lslot[u.name])), axis0).output(0) if u.name in lslot else None
        ),
    )
    full_params = [modes_vec, limits_vec] if limited else [modes_vec]
    full = _body_model(clone, codes, full_params, "apsq/full")

    # The top level: the model's inputs, the state, and the dispatch tree.
    top_inputs = [
        ops.parameter(p.get_partial_shape(), p.get_element_type(), name=p.get_friendly_name()) for p in inputs
    ]
    for new, old in zip(top_inputs, inputs, strict=True):
        new.output(0).get_tensor().set_names(set(old.output(0).get_names()))
    states = StateSet()
    state = states.read

    level_code = state(LEVEL_STATE, np.int32(default_level))
    # Only the full body sees the per-op state: every If port costs time, so the levels' tree carries
    # just the model inputs (and the escalate scalar), and the default level sits one If below the top.
    values = [p.output(0) for p in top_inputs]
    level_extra = [state(ESCALATE_STATE, np.float32(1.0))] if escalates else []
    if router is not None:
        level_extra.append(state(TAU_STATE, np.float32(tau)))
    full_extra = [state(MODES_STATE, np.full(len(names), Precision.FP32.code, np.int32))]
    if limited:
        full_extra.append(state(LIMITS_STATE, np.full(len(limited), 3.0e38, np.float32)))
    # The cascade, then the default level, one If each (they are what runs); the rest in a tree below.
    hot = ([len(bodies) - 1] if router is not None else []) + [default_level]
    outs = _top_dispatch(values, level_extra, full_extra, level_code, bodies, full, hot)
    results = []
    for i, out in enumerate(outs[:n_out]):
        old = fp32_model.outputs[i]
        out.get_tensor().set_names(set(old.get_names()))
        results.append(ops.result(out))
    top = ov.Model(results, top_inputs, fp32_model.get_friendly_name() or "apsq")
    add_route_result(top, outs[n_out])
    states.attach(top)
    top.validate_nodes_and_infer_types()
    return top


def level_body(
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
    level: dict[str, OpChoice],
    name: str,
    extra: list[ov.Node],
    q4_model: ov.Model | None = None,
) -> tuple[ov.Model, dict[str, ov.Output]]:
    """One level body: a copy of the model with each op at its ``level`` choice (routed ones behind an
    If whose range limit is ``extra[0]`` × the op's; ``extra`` become the body's trailing parameters),
    and each routed op's pre-quantization input in it (the router's feature inputs)."""
    names = [n for n, v in variants.items() if len(v) > 1]
    base = {u.name: u for u in find_routable_ops(fp32_model, q_model, q4_model)}
    int8_capable = _int8_capable(base, variants)
    esc = extra
    codes: list[ov.Output] = []
    group_code: dict[str, ov.Output] = {}
    feature_inputs: dict[str, ov.Output] = {}
    at_fp32 = _nncf_fp32_ops(base, q_model, variants, level)
    from_nncf = at_fp32 is not None
    if at_fp32 is not None:
        assert q_model is not None
        clone = q_model.clone()
        units = {u.name: u for u in find_routable_ops(clone)}
        for n in at_fp32:
            _unquantize(units[n], base[n])
    else:
        clone = fp32_model.clone()
        units = {u.name: u for u in find_routable_ops(clone, q_model, q4_model)}
    for n in names:
        unit, choice = units[n], level[n]
        x = unit.op.input(0).get_source_output()
        feature_inputs[n] = pre_quant_input(unit.op)
        if from_nncf and n in int8_capable:
            codes.append(ops.constant(np.int32(level[n].fast.code)).output(0))
            continue
        if choice.shared_with:  # inside the If of its run's first op (built with that op below)
            codes.append(group_code[choice.shared_with])
            continue
        run = _run_of(n, level)
        if choice.routed:
            limit = ops.multiply(esc[0], ops.constant(np.float32(choice.limit))).output(0)
            wanted = ops.constant(np.int32(choice.fast.code)).output(0)
            code = escalation_code(unit, x, limit, wanted, choice.safe)
            if len(run) == 1:
                replace_output(unit, if_chain(x, code, unit, [choice.fast, choice.safe]))
            else:
                _replace_run(fp32_model, q_model, q4_model, [units[m] for m in run], x, code, choice)
            group_code[n] = code
            codes.append(code)
        else:
            if choice.fast is not Precision.FP32:
                replace_output(unit, variant_output(unit, choice.fast, x))
            codes.append(ops.constant(np.int32(choice.fast.code)).output(0))
    merge_low_float_regions(clone)
    return _body_model(clone, codes, esc, name), feature_inputs


def builds_from_nncf(
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
    level: dict[str, OpChoice],
    q4_model: ov.Model | None = None,
) -> bool:
    """Whether :func:`level_body` builds ``level`` from NNCF's INT8 graph rather than from the FP32 model.

    Such a body quantizes more than the per-op variants of the fully routed IR calibration measures with
    (NNCF's FakeQuantizes on residual adds and pools too), so its drop is measured on the body itself
    (``calibrate.drops.joint_losses``): on PP-OCRv4 rec's fastest level the body flipped 7.1% of the
    positions on the calibration lines, the same choices pinned in the fully routed IR 4.3%."""
    base = {u.name: u for u in find_routable_ops(fp32_model, q_model, q4_model)}
    return _nncf_fp32_ops(base, q_model, variants, level) is not None


def _int8_capable(base: dict[str, RoutableOp], variants: dict[str, tuple[Precision, ...]]) -> list[str]:
    return [n for n, v in variants.items() if len(v) > 1 and Precision.INT8 in v and base[n].act_fq is not None]


def _nncf_fp32_ops(
    base: dict[str, RoutableOp],
    q_model: ov.Model | None,
    variants: dict[str, tuple[Precision, ...]],
    level: dict[str, OpChoice],
) -> list[str] | None:
    """The ops put back at FP32 in NNCF's INT8 graph when :func:`level_body` builds ``level`` from it, else
    None (it starts from the FP32 model).

    A level that runs every INT8-capable op statically, most of them in INT8 and the rest in FP32, is NNCF's
    own graph (its FakeQuantizes on residual adds and pools too, so the device keeps whole blocks in u8)
    with those few ops put back at FP32, as ``nncf.quantize(ignored_scope=...)`` leaves them, where each
    can be (:func:`_unquantize`); the other ops get their chosen variant there (with ignored_scope, PP-OCRv4
    rec's stem convs, a mid-chain conv or a MatMul at FP32 timed 0.97-1.03x NNCF's all-INT8 model)."""
    int8_capable = _int8_capable(base, variants)
    int8, fp32 = OpChoice(Precision.INT8, Precision.INT8), OpChoice(Precision.FP32, Precision.FP32)
    at_fp32 = [n for n in int8_capable if level[n] == fp32]
    if q_model is None or not int8_capable or 2 * len(at_fp32) >= len(int8_capable):
        return None
    if not all(level[n] == int8 or n in at_fp32 for n in int8_capable):
        return None
    units = {u.name: u for u in find_routable_ops(q_model)}  # read only: the dry run changes nothing
    return at_fp32 if all(_unquantize(units[n], base[n], dry_run=True) for n in at_fp32) else None


def _run_of(name: str, level: dict[str, OpChoice]) -> list[str]:
    """``name`` and the ops that share its If, in order."""
    return [name] + [m for m, c in level.items() if c.shared_with == name]


def _run_body(
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    q4_model: ov.Model | None,
    run: Sequence[str],
    precision: Precision,
) -> ov.Model:
    """A body holding the whole run (first op's input → last op's output) with every op of it at ``precision``:
    cut from a fresh copy of the model (the Python API cannot clone single nodes)."""
    clone = fp32_model.clone()
    units = {u.name: u for u in find_routable_ops(clone, q_model, q4_model)}
    first, last = units[run[0]], units[run[-1]]
    x = ops.parameter(first.op.get_input_partial_shape(0), first.op.get_input_element_type(0), name="x")
    for name in run:
        unit = units[name]
        src = x.output(0) if unit is first else unit.op.input(0).get_source_output()
        new = variant_output(unit, precision, src)
        if unit is last:
            return ov.Model([ops.result(new)], [x], f"{run[0]}/{precision.value}")
        replace_output(unit, new)
    raise AssertionError("unreachable")


def _replace_run(
    fp32_model: ov.Model,
    q_model: ov.Model | None,
    q4_model: ov.Model | None,
    run: Sequence[RoutableOp],
    x: ov.Output,
    code: ov.Output,
    choice: OpChoice,
) -> None:
    """Replace a run of adjacent ops by one ``If(code == fast, run at fast, run at safe)``."""
    names = [u.name for u in run]
    node = opset8.if_op(ops.equal(code, ops.constant(np.int32(choice.fast.code))).output(0))
    then_body = _run_body(fp32_model, q_model, q4_model, names, choice.fast)
    else_body = _run_body(fp32_model, q_model, q4_model, names, choice.safe)
    node.set_then_body(then_body)
    node.set_else_body(else_body)
    node.set_input(x, then_body.get_parameters()[0], else_body.get_parameters()[0])
    out = node.set_output(then_body.get_results()[0], else_body.get_results()[0])
    node.set_friendly_name(f"{names[0]}/apsq_if/run{len(names)}/{choice.fast.value}")
    replace_output(run[-1], out)


def _unquantize(unit: RoutableOp, fp32: RoutableOp, dry_run: bool = False) -> bool:
    """Put ``unit`` (an op in a copy of NNCF's INT8 graph) back at FP32 in place: its input read before its
    activation FakeQuantize (which stays for its other consumers), its weights and bias ``fp32``'s (the FP32
    model's: not the INT8-rounded, bias-corrected ones). :return: whether it could (with ``dry_run``,
    whether it can): the path from the FakeQuantize to the op must be the op's alone."""
    port = unit.op.input(0)
    node = port.get_source_output().get_node()
    while node.get_type_name() in ("Reshape", "Squeeze", "Unsqueeze"):
        if len(node.output(0).get_target_inputs()) != 1:
            return False
        port = node.input(0)
        node = port.get_source_output().get_node()
    if node.get_type_name() != "FakeQuantize" or (unit.bias is None) != (fp32.bias is None):
        return False
    if dry_run:
        return True
    port.replace_source_output(node.input(0).get_source_output())
    unit.op.input(1).replace_source_output(fp32.op.input(1).get_source_output())
    if unit.bias is not None and fp32.bias is not None:
        for i in unit.bias.inputs():
            if i.get_source_output().get_node() is not unit.op:
                i.replace_source_output(bias_input(fp32.bias, fp32.op))
    return True


_ELEMENTWISE = frozenset(
    {"Clamp", "Relu", "PRelu", "Sigmoid", "Swish", "HSwish", "HSigmoid", "Gelu", "Tanh", "Elu", "Mish",
     "Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum", "SquaredDifference", "Sqrt", "Exp",
     "AvgPool", "MaxPool", "ReduceMean", "ReduceMax", "Concat", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}
)  # fmt: skip
"""Ops a low-float region grows through: their result in bf16/f16 is what the device's own low-precision
mode computes (the CPU plugin runs them in bf16 under a bf16 hint)."""


def merge_low_float_regions(model: ov.Model) -> int:
    """Grow runs of adjacent bf16/f16 ops into regions, in place.

    A static low-float variant is ``Convert(x→bf16) → op → Convert(→f32)``; between two such ops the
    activation functions, residual adds and pools run in f32 and every tensor is converted twice, which
    on memory-bound layers (depthwise, 1×1) costs more than bf16 saves. This pass moves each
    ``Convert(bf16→f32)`` below the elementwise ops it feeds (when all their float inputs are bf16 or
    constant) and cancels ``Convert(→f32) → Convert(→bf16)`` pairs, so a run of bf16 ops converts only
    at its edges, as the device's own bf16 mode does. :return: the number of rewrites.
    """
    low_types = (ov.Type.bf16, ov.Type.f16)
    rewrites = 0
    changed = True
    while changed:
        changed = False
        for up in model.get_ordered_ops():
            if up.get_type_name() != "Convert" or up.get_output_element_type(0) != ov.Type.f32:
                continue
            low = up.get_input_element_type(0)
            if low not in low_types:
                continue
            for target in list(up.output(0).get_target_inputs()):
                node = target.get_node()
                kind = node.get_type_name()
                if kind == "Convert" and node.get_output_element_type(0) == low:
                    for t in list(node.output(0).get_target_inputs()):
                        t.replace_source_output(up.input(0).get_source_output())
                    # Detach the now dead Convert from `up`: a dead node left among `up`'s targets is freed
                    # with its last Python reference and leaves a dangling target (OpenVINO then crashes).
                    node.input(0).replace_source_output(ops.constant(np.float32(0.0)).output(0))
                    changed = True
                elif kind in _ELEMENTWISE and node.get_output_size() == 1 and _lowerable(node, low):
                    _lower(node, low)
                    changed = True
                if changed:
                    rewrites += 1
                    break
            if changed:
                break
    return rewrites


def _lowerable(node: ov.Node, low: ov.Type) -> bool:
    """Every float input is ``Convert(low→f32)`` or a constant, and the output is f32."""
    if node.get_output_element_type(0) != ov.Type.f32:
        return False
    for inp in node.inputs():
        src = inp.get_source_output()
        if inp.get_element_type() != ov.Type.f32:
            continue  # axes, shapes: integer inputs stay as they are
        producer = src.get_node()
        is_up = producer.get_type_name() == "Convert" and producer.input(0).get_element_type() == low
        if not is_up and not is_constant_subgraph(src):
            return False
    return True


def _lower(node: ov.Node, low: ov.Type) -> None:
    consumers = list(node.output(0).get_target_inputs())
    names = node.output(0).get_names()
    for inp in node.inputs():
        if inp.get_element_type() != ov.Type.f32:
            continue
        src = inp.get_source_output()
        producer = src.get_node()
        if producer.get_type_name() == "Convert" and producer.input(0).get_element_type() == low:
            inp.replace_source_output(producer.input(0).get_source_output())
            if not producer.output(0).get_target_inputs():  # dead now: detach it (see merge_low_float_regions)
                producer.input(0).replace_source_output(ops.constant(np.zeros((), low.to_dtype())).output(0))
        else:
            inp.replace_source_output(ops.convert(src, low).output(0))
    node.validate_and_infer_types()
    up = ops.convert(node.output(0), "f32")
    for t in consumers:
        t.replace_source_output(up.output(0))
    if names:
        node.output(0).get_tensor().set_names(set())
        up.output(0).get_tensor().set_names(set(names))


def _body_model(clone: ov.Model, codes: list[ov.Output], extra: list[ov.Node], name: str) -> ov.Model:
    results = list(clone.get_results())
    route = ops.result(route_vector(codes))
    route.set_friendly_name(f"{name}/route")  # names the body in the IR (body names are not serialized)
    results.append(route)
    return ov.Model(results, [*clone.get_parameters(), *extra], name)


def _cascade_body(
    router: Router, fast: ov.Model, feature_inputs: dict[str, ov.Output], precise: ov.Model, decision: Decision
) -> ov.Model:
    """The escalation cascade: the ``fast`` level body, the router's risk on its features and output,
    and ``If(risk > τ, precise level body on the same inputs, the fast outputs)``. ``fast``'s last
    parameter is τ; both bodies take the same parameters."""
    params = fast.get_parameters()
    fast_outs = [r.input_value(0) for r in fast.get_results()]
    risk = risk_output(router, feature_inputs, decision.graph_scores(decision.pick(fast_outs)))
    risk.get_node().set_friendly_name(RISK_NODE)
    node = opset8.if_op(ops.greater(risk, params[-1]).output(0))
    passthrough = [ops.parameter(o.get_partial_shape(), o.get_element_type()) for o in fast_outs]
    keep = ov.Model([ops.result(p) for p in passthrough], passthrough, "apsq/cascade/keep")
    node.set_then_body(precise)
    node.set_else_body(keep)
    for p, q in zip(params, precise.get_parameters(), strict=True):
        node.set_input(p.output(0), q, None)
    for o, q in zip(fast_outs, passthrough, strict=True):
        node.set_input(o, None, q)
    outs = [node.set_output(t, e) for t, e in zip(precise.get_results(), keep.get_results(), strict=True)]
    node.set_friendly_name("apsq/cascade/escalate")
    results = [ops.result(o) for o in outs]
    results[-1].set_friendly_name("apsq/cascade/route")
    return ov.Model(results, params, "apsq/cascade")


def _top_dispatch(
    inputs: list[ov.Output],
    level_extra: list[ov.Output],
    full_extra: list[ov.Output],
    code: ov.Output,
    levels: Sequence[ov.Model],
    full: ov.Model,
    hot: Sequence[int],
) -> list[ov.Output]:
    """``If(code == hot[0], level hot[0], If(code == hot[1], …, If(code == full, full body, tree of the
    other levels)))``.

    Every If a body sits below costs its inputs' copy on each pass (the profile's ``if_per_mb_ms``), so
    the bodies run most — the cascade, the default level — are ``hot``: one If each, in that order.
    Each branch is bound only to what it reads: level bodies to the model ``inputs`` and ``level_extra``
    (the escalate / τ scalars), the full body to the inputs and ``full_extra`` (the per-op state vectors).
    """
    n_inputs = len(inputs)
    n_levels = len(levels)
    rest = [(k, body) for k, body in enumerate(levels) if k not in hot]
    assert rest, "the dial always has levels 0 and 1, and at most the cascade and one level are hot"

    def dispatch(lv: list[ov.Output], fx: list[ov.Output], pc: ov.Output, hot: Sequence[int]) -> list[ov.Output]:
        if not hot:  # If(code ≥ n_levels, full body, balanced tree of the other levels)
            node = opset8.if_op(ops.greater_equal(pc, ops.constant(np.int32(n_levels))).output(0))
            tree = _subtree(lv, rest)
            node.set_then_body(full)
            node.set_else_body(tree)  # both bodies before any input
            fp, rp = full.get_parameters(), tree.get_parameters()
            for i, v in enumerate(lv):
                node.set_input(v, fp[i] if i < n_inputs else None, rp[i])
            for j, v in enumerate(fx):
                node.set_input(v, fp[n_inputs + j], None)
            node.set_input(pc, None, rp[-1])
            return [node.set_output(t, e) for t, e in zip(full.get_results(), tree.get_results(), strict=True)]
        node = opset8.if_op(ops.equal(pc, ops.constant(np.int32(hot[0]))).output(0))
        then_body = levels[hot[0]]
        pl = [ops.parameter(v.get_partial_shape(), v.get_element_type()) for v in lv]
        pf = [ops.parameter(v.get_partial_shape(), v.get_element_type()) for v in fx]
        code_p = ops.parameter([], np.int32, name="level")
        outs = dispatch([p.output(0) for p in pl], [p.output(0) for p in pf], code_p.output(0), hot[1:])
        else_body = ov.Model([ops.result(o) for o in outs], [*pl, *pf, code_p], "apsq/others")
        node.set_then_body(then_body)
        node.set_else_body(else_body)
        tp = then_body.get_parameters()
        for i, v in enumerate(lv):
            node.set_input(v, tp[i], pl[i])
        for j, v in enumerate(fx):
            node.set_input(v, None, pf[j])
        node.set_input(pc, None, code_p)
        return [node.set_output(t, e) for t, e in zip(then_body.get_results(), else_body.get_results(), strict=True)]

    return dispatch([*inputs, *level_extra], full_extra, code, list(dict.fromkeys(hot)))


def _subtree(values: list[ov.Output], bodies: Sequence[tuple[int, ov.Model]]) -> ov.Model:
    """A model over parameters mirroring ``values`` plus the level code that runs ``bodies[code]``:
    the body itself for one level, else a balanced tree of ``If(code < k)``."""
    params = [ops.parameter(v.get_partial_shape(), v.get_element_type()) for v in values]
    level = ops.parameter([], np.int32, name="level")
    if len(bodies) == 1:
        body = bodies[0][1]
        body.add_parameters([level])  # unused: keeps the signature of every subtree the same
        return body
    mid = len(bodies) // 2
    node = opset8.if_op(ops.less(level, ops.constant(np.int32(bodies[mid][0]))).output(0))
    then_body = _subtree(values, bodies[:mid])
    else_body = _subtree(values, bodies[mid:])
    node.set_then_body(then_body)
    node.set_else_body(else_body)
    tp, ep = then_body.get_parameters(), else_body.get_parameters()
    for i, p in enumerate([*params, level]):
        node.set_input(p.output(0), tp[i], ep[i])
    outs = [node.set_output(t, e) for t, e in zip(then_body.get_results(), else_body.get_results(), strict=True)]
    return ov.Model([ops.result(o) for o in outs], [*params, level], "apsq/levels")
