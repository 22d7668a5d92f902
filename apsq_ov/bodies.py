"""The package IR's bodies as models of their own: graph surgery the runtime and calibration share.

Where it sits in the data flow: between the package (:mod:`apsq_ov.package`, its IR dispatching between
level bodies and the cascade with ``If`` ops on ``apsq/level``) and the runtime (:mod:`apsq_ov.runtime`).
Every ``If`` a body sits below copies that body's inputs on every pass, so :func:`standalone_bodies`
cuts the bodies a policy runs most out of the dispatch (their scalar parameters turned back into state);
:func:`split_constant_route` drops the route output of a body whose route is a constant;
:func:`escalation_graphs` splits the cascade into a fast graph and a batchable precise route. Calibration
times these same graphs (:mod:`apsq_ov.calibrate.ondevice`), so what it measures is what deploys.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import openvino as ov
from openvino import opset13 as ops
from openvino.op.util import Variable, VariableInfo

from apsq_ov.errors import ConfigError
from apsq_ov.package import ESCALATE_STATE, ROUTE_OUTPUT, TAU_STATE, Manifest


def split_constant_route(body: ov.Model) -> tuple[ov.Model, np.ndarray | None]:
    """A standalone body whose route output is a constant (a level without per-input routed ops), without
    that output, and the constant; any other body as it is, and None. The runtime hands such a body's
    route out itself: on this CPU a constant Result cost 4% of Fashion-MNIST's 0.13 ms INT8 inference
    (measured: NNCF INT8 with a constant 10-element output 1.041x, apsq's all-INT8 level 1.043x)."""
    results = body.get_results()
    if not results or ROUTE_OUTPUT not in results[-1].output(0).get_names():
        return body, None
    route = _constant_codes(results[-1].input_value(0))
    if route is None:
        return body, None
    out = ov.Model(results[:-1], body.get_sinks(), body.get_parameters(), body.get_friendly_name())
    out.validate_nodes_and_infer_types()
    return out, route


def _constant_codes(out: ov.Output) -> np.ndarray | None:
    """The value of a route vector built of Constant codes (``Concat`` of ``Unsqueeze``-d scalars, as
    calibration builds it), or None when any code is computed in the graph."""
    node = out.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return np.asarray(node.get_data(), np.int8).reshape(-1)
    if kind in ("Unsqueeze", "Convert"):
        return _constant_codes(node.input_value(0))
    if kind == "Concat":
        parts = [_constant_codes(node.input_value(i)) for i in range(node.get_input_size())]
        return None if any(p is None for p in parts) else np.concatenate(parts)  # type: ignore[arg-type]
    return None


_BODY_MARK = "/route"  # a body's route Result is named "<body name>/route" (body names are not serialized)
_BODY_STATE = {"escalate": ESCALATE_STATE, "tau": TAU_STATE}  # a level body's scalar parameters → their state


def standalone_bodies(model: ov.Model, manifest: Manifest, only: set[int] | None = None) -> dict[int, ov.Model]:
    """The package IR's level bodies and cascade (those in ``only``, default all) as models of their own:
    body index → model.

    Found in the top-level dispatch (the ``If`` tree on ``apsq/level``) by their route Result's name
    (``apsq/level/<k>/route``, ``apsq/cascade/route``). Each is a copy whose scalar parameters
    (``escalate``, ``tau``) become ReadValue/Assign state under the package's variable ids, initialised as
    in the package; its inputs and outputs carry the package's tensor names and order. Bodies whose
    inputs are not the package's own parameters (a package with pre-processing before the dispatch) are
    left out: they only run through the package.
    """
    top_params = model.get_parameters()
    names = {f"apsq/level/{k}{_BODY_MARK}": k for k in range(len(manifest.levels))}
    if manifest.cascade_level is not None:
        names[f"apsq/cascade{_BODY_MARK}"] = manifest.cascade_level
    init = {
        n.get_variable_id(): n.input_value(0).get_node().get_data()
        for n in model.get_ordered_ops()
        if n.get_type_name() == "ReadValue" and n.inputs() and n.input_value(0).get_node().get_type_name() == "Constant"
    }
    found: dict[int, ov.Model] = {}

    def visit(graph: ov.Model, fed_by_top: bool) -> None:
        for node in graph.get_ordered_ops():
            if node.get_type_name() != "If":
                continue
            # The dispatch passes the model inputs straight through: ports fed by the top's parameters.
            direct = fed_by_top and all(
                node.input_value(i).get_node().get_type_name() == "Parameter" for i in range(1, len(top_params) + 1)
            )
            for body in (node.get_then_body(), node.get_else_body()):
                marks = [names[r.get_friendly_name()] for r in body.get_results() if r.get_friendly_name() in names]
                if marks and direct:
                    found.setdefault(marks[0], body)
                elif any(p.get_friendly_name() == "level" for p in body.get_parameters()):
                    visit(body, direct)

    visit(model, True)
    out = {}
    for k, body in found.items():
        if only is None or k in only:
            standalone = _as_model(body, model, init)
            if standalone is not None:
                out[k] = standalone
    return out


ESCALATE_OUTPUT = "apsq_escalate"
"""The fast graph's last output (:func:`escalation_graphs`): whether the router escalates this input."""


def escalation_graphs(model: ov.Model, manifest: Manifest) -> tuple[ov.Model, ov.Model]:
    """The package's escalation cascade split for batched re-runs: ``(fast, precise)``.

    ``fast`` is the standalone cascade (:func:`standalone_bodies`) without its escalation ``If``: the fast
    route's outputs and route, then :data:`ESCALATE_OUTPUT` (risk > τ, τ in its ``apsq/tau`` state).
    ``precise`` is the standalone body of the router's precise level with the first axis of every input
    left free, so several escalated inputs run as one batch.

    :raises ConfigError: for a package without a router, or whose cascade / precise level cannot be served
        on their own or batched on their first axis (naming the input or output at fault).
    """
    router = manifest.router
    if router is None or manifest.cascade_level is None:
        raise ConfigError("escalation_batch: this package has no escalation cascade (calibrate it with --router)")
    bodies = standalone_bodies(model, manifest, {manifest.cascade_level, router.precise_level})
    if manifest.cascade_level not in bodies or router.precise_level not in bodies:
        raise ConfigError("escalation_batch: this package's cascade only runs through its dispatch")
    fast = bodies[manifest.cascade_level]
    node = next((n for n in fast.get_ordered_ops() if n.get_friendly_name() == "apsq/cascade/escalate"), None)
    if node is None:
        raise ConfigError("escalation_batch: the package's cascade has no apsq/cascade/escalate If")
    # The If's else body passes the fast outputs through: else parameter j → else result j → If output.
    fed = {d.body_parameter_index: node.input_value(d.input_index) for d in node.get_input_descriptions(1)}
    kept = {d.output_index: fed[d.body_value_index] for d in node.get_output_descriptions(1)}
    for result in fast.get_results():
        source = result.input_value(0)
        if source.get_node().get_friendly_name() == node.get_friendly_name():  # (one If of that name)
            result.input(0).replace_source_output(kept[source.get_index()])
    flag = ops.result(node.input_value(0))
    flag.set_friendly_name(ESCALATE_OUTPUT)
    flag.output(0).get_tensor().set_names({ESCALATE_OUTPUT})
    fast = ov.Model([*fast.get_results(), flag], fast.get_sinks(), fast.get_parameters(), fast.get_friendly_name())
    fast.validate_nodes_and_infer_types()

    precise = bodies[router.precise_level]
    shapes = {}
    for p in precise.get_parameters():
        ps = p.get_partial_shape()
        if ps.rank.is_dynamic or ps.rank.get_length() == 0 or ps[0].is_dynamic or ps[0].get_length() != manifest.batch:
            raise ConfigError(f"escalation_batch: input {p.get_friendly_name()} ({ps}) has no batch axis of "
                              f"{manifest.batch} first")  # fmt: skip
        ps[0] = -1
        shapes[p.output(0)] = ps
    try:
        precise.reshape(shapes)
    except RuntimeError as exc:
        raise ConfigError(f"escalation_batch: the precise route does not batch on its first axis "
                          f"({str(exc).strip().splitlines()[-1]})") from exc  # fmt: skip
    for out in precise.outputs:
        if ROUTE_OUTPUT in out.get_names():
            continue
        ps = out.get_partial_shape()
        if ps.rank.is_dynamic or ps.rank.get_length() == 0 or ps[0].is_static:
            raise ConfigError(f"escalation_batch: output {out.get_any_name()} ({ps}) does not follow the batch axis")
    return fast, precise


def state_variable(variable_id: str, init: np.generic | np.ndarray) -> tuple[ov.Node, Variable]:
    """A ReadValue of state ``variable_id`` (i32 or f32, ``init``'s shape, initialised to it) and its
    variable; the model also needs the variable's Assign as a sink."""
    info = VariableInfo()
    info.data_shape = ov.PartialShape(list(np.shape(init)))
    info.data_type = ov.Type.i32 if init.dtype == np.int32 else ov.Type.f32
    info.variable_id = variable_id
    var = Variable(info)
    node = ops.read_value(ops.constant(init), var)
    node.set_friendly_name(variable_id)
    return node, var


def _read(output: ov.Output) -> bool:
    """Whether some op computes with ``output`` — following it into If bodies, since the CPU plugin drops an
    If input no body reads (and then rejects a ReadValue whose only consumer was that input)."""
    for target in output.get_target_inputs():
        node = target.get_node()
        if node.get_type_name() != "If":
            return True
        for b, body in enumerate((node.get_then_body(), node.get_else_body())):
            params = body.get_parameters()
            for desc in node.get_input_descriptions(b):
                if desc.input_index == target.get_index() and _read(params[desc.body_parameter_index].output(0)):
                    return True
    return False


def _as_model(body: ov.Model, top: ov.Model, init: Mapping[str, np.ndarray]) -> ov.Model | None:
    """``body`` as a model of its own (see :func:`standalone_bodies`); None for a body with a scalar
    parameter this runtime does not know (a package from another version: it runs through the dispatch)."""
    body = body.clone()
    top_params = top.get_parameters()
    params = body.get_parameters()
    inputs, scalars = params[: len(top_params)], params[len(top_params) :]
    sinks = []
    for p in scalars:
        consumers = list(p.output(0).get_target_inputs())
        if not consumers:  # a tree leaf's level code
            continue
        variable_id = _BODY_STATE.get(p.get_friendly_name())
        if variable_id is None:
            return None
        value = np.asarray(init.get(variable_id, np.float32(1.0)), np.float32).reshape(())
        if _read(p.output(0)):
            source, var = state_variable(variable_id, value)
            sinks.append(ops.assign(source, var))
        else:  # only passed into If bodies that never read it: a constant (no state nobody reads)
            source = ops.constant(value)
        for t in consumers:
            t.replace_source_output(source.output(0))
    for new, old in zip(inputs, top_params, strict=True):
        new.set_friendly_name(old.get_friendly_name())
        new.output(0).get_tensor().set_names(set(old.output(0).get_names()))
    results = body.get_results()
    for r, out in zip(results, top.outputs, strict=True):
        r.output(0).get_tensor().set_names(set(out.get_names()))
    out = ov.Model(results, sinks, inputs, top.get_friendly_name() or "apsq")  # takes the sinks' variables
    out.validate_nodes_and_infer_types()
    return out
