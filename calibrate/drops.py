"""What a drop is, and how calibration measures it: the quality an op or a mix of ops loses against FP32.

Where it sits in the data flow: phases 5 and 6 of :mod:`.pipeline`. One compiled adaptive model runs every
measurement (lowering an op is a state write, :class:`PinnedRuns`); :func:`isolated_losses` gives each op's
drop alone (the report's ground truth and the budgets' seeds), :func:`joint_losses` a whole mix's, what
the levels and the fast-route refinement are fitted to — on the body the package serves where that is cut
from NNCF's graph (:func:`served_runs`).

A sample's drop is its disagreement with FP32 as the judged output reads (:class:`~apsq_ov.decisions.Decision`):
the fraction of its positions whose top-1 moved, or for a CTC sequence the character error rate of its
decoded text against FP32's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from apsq_ov.async_queue import AdaptiveAsyncInferQueue
from apsq_ov.datasets import ctc_error_rate
from apsq_ov.decisions import CLASSES_LAST, Decision
from apsq_ov.package import NEVER, OpChoice, OpRecord
from apsq_ov.precision import Precision
from apsq_ov.runtime import AdaptiveCompiledModel, AdaptiveInferRequest

from .ondevice import Routes
from .router import as_probabilities

DROP_METRIC = "1 - top-1 agreement with FP32 (argmax over the judged output's class axis: 'decision'), held-out split"
CTC_DROP_METRIC = ("character error rate of the greedy CTC decode against FP32's decoded text (the judged output read "
                   "as a CTC path: 'decision'), mean per line, held-out split")  # fmt: skip


@dataclass(frozen=True)
class Reference:
    """The all-FP32 run every isolated job is compared to, with what :func:`quality_loss` needs of it
    computed once (its probabilities, their Σ p·log p, top-1, energy and task metric), not per job."""

    outputs: list[np.ndarray]
    labels: list[np.ndarray] | None
    probs: list[np.ndarray]
    p_log_p: list[np.ndarray]
    top1: list[np.ndarray]
    """Per sample, the top-1 class index at each position (``argmax(-1)``, batch axis first)."""
    energy: float
    task_value: float | None
    """FP32's task metric when labels exist: accuracy (classifier) or CER (CTC sequence output)."""
    decision: Decision = CLASSES_LAST

    @classmethod
    def of(cls, outputs: list[np.ndarray], labels: list[np.ndarray] | None, decision: Decision = CLASSES_LAST
           ) -> Reference:  # fmt: skip
        probs = [as_probabilities(r) for r in outputs]
        task_value = None
        if labels is not None and all(np.asarray(o).ndim == 2 for o in outputs):
            y = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels])
            task_value = float(np.mean(np.concatenate([top1_of(r) for r in outputs]) == y))
        elif labels is not None and _is_ctc(outputs, labels):
            task_value = ctc_error_rate(outputs, labels)
        return cls(outputs, labels, probs, [np.sum(pr * np.log(pr), axis=-1) for pr in probs],
                   [np.asarray(r).argmax(-1) for r in outputs],
                   sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in outputs),
                   task_value, decision)  # fmt: skip

    def disagreement(self, outputs: list[np.ndarray]) -> np.ndarray:
        """Each sample's disagreement with this reference (:meth:`Decision.disagreement`): what every drop
        averages."""
        d = self.decision
        return np.array([d.disagreement(np.asarray(o).argmax(-1), r) for o, r in zip(outputs, self.top1, strict=True)])


def _is_ctc(outputs: list[np.ndarray], labels: list[np.ndarray]) -> bool:
    return all(np.asarray(o).ndim == 3 and np.ndim(lab) == 2 for o, lab in zip(outputs, labels, strict=True))


def quality_loss(outputs: list[np.ndarray], reference: Reference, per_sample: np.ndarray | None = None) -> dict:
    """Loss of ``outputs`` vs the FP32 ``reference`` (the judged output, one array per sample).

    ``top1``: fraction of positions whose argmax (last axis) differs; ``kl``: mean KL(ref ‖ out) over
    positions; ``nmse``: ``Σ‖out − ref‖² / Σ‖ref‖²``; for a CTC sequence, ``text``: the mean CER of the
    decoded text against FP32's. The drop the budgets count is ``loss[decision.drop_key]``. With labels,
    ``task``, the task metric's loss: for a classifier output ``(batch, classes)`` with a class per sample,
    ``accuracy`` = FP32 accuracy minus this accuracy; for a CTC sequence output ``(batch, T, classes)`` with
    ``(batch, L)`` label indices (−1 pads; blank = class 0), ``cer`` = this character error rate of the
    greedy decode minus FP32's.

    :param per_sample: ``reference.disagreement(outputs)`` where the caller has it already (a CTC decode's
        edit distances are computed once per job).
    """
    ref, labels = reference.outputs, reference.labels
    top1 = np.mean([np.mean(np.asarray(o).argmax(-1) != r) for o, r in zip(outputs, reference.top1, strict=True)])
    kl = np.mean(
        [
            np.mean(plogp - np.sum(pr * np.log(as_probabilities(o)), axis=-1))
            for o, pr, plogp in zip(outputs, reference.probs, reference.p_log_p, strict=True)
        ]
    )
    num = sum(float(np.sum((np.asarray(o, np.float64) - r) ** 2)) for o, r in zip(outputs, ref, strict=True))
    loss = {"top1": float(top1), "kl": float(kl), "nmse": num / max(reference.energy, 1e-30)}
    if reference.decision.sequence == "ctc":
        loss["text"] = float(np.mean(reference.disagreement(outputs) if per_sample is None else per_sample))
    if reference.task_value is None or labels is None:
        return loss
    if all(np.asarray(o).ndim == 2 for o in outputs):
        y = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels])
        acc = np.mean(np.concatenate([top1_of(o) for o in outputs]) == y)
        loss["accuracy"] = loss["task"] = float(reference.task_value - acc)
    elif _is_ctc(outputs, labels):
        loss["cer"] = loss["task"] = ctc_error_rate(outputs, labels) - reference.task_value
    return loss


def top1_of(output: np.ndarray) -> np.ndarray:
    """Argmax over the last axis (class, or class per position for sequence outputs)."""
    return np.asarray(output).argmax(axis=-1).reshape(-1)


class PinnedRuns:
    """Run ``data`` through ``model`` with some ops pinned to a precision and every other op FP32, by
    writing request state only, on an :class:`AdaptiveAsyncInferQueue` of ``model``'s optimal number of
    requests. Calling it returns the judged output of each sample (read as class scores), in order."""

    def __init__(self, model: AdaptiveCompiledModel, data: list[list[np.ndarray]]) -> None:
        self.data = data
        self._outputs: list[np.ndarray | None] = [None] * len(data)
        self._queue = AdaptiveAsyncInferQueue(model)
        self._queue.set_callback(self._keep)
        self._decision = model.manifest.decision

    def _keep(self, request: AdaptiveInferRequest, i: int) -> None:
        d = self._decision
        self._outputs[i] = d.scores(d.pick(request.get_result()))  # copied out of the request

    def __call__(self, pin: Mapping[str, Precision] | None) -> list[np.ndarray]:
        for i, x in enumerate(self.data):
            self._queue.start_async(x, i, precision=Precision.FP32, precision_map=pin)
        self._queue.wait_all()
        return list(self._outputs)  # type: ignore[arg-type]


def isolated_losses(
    model: AdaptiveCompiledModel,
    ops_: list[OpRecord],
    data: list[list[np.ndarray]],
    labels: list[np.ndarray] | None,
    progress: Callable[[int, int], None] | None,
    per_sample: dict[tuple[str, Precision], np.ndarray] | None = None,
) -> dict[str, dict[Precision, dict[str, float]]]:
    """Loss of every (op, lower precision) with that op alone lowered and every other op fp32
    (:func:`quality_loss` against the all-fp32 route), on :class:`PinnedRuns`.

    :param per_sample: if given, filled with each job's per-sample disagreement with FP32 (the fraction of
        positions whose top-1 differs, or a CTC decode's CER against FP32's: :meth:`Decision.disagreement`).
    """
    jobs = [(op, p) for op in ops_ for p in op.variants if p is not Precision.FP32]
    total = len(data) * (1 + len(jobs))
    runs = PinnedRuns(model, data)
    if progress:
        progress(0, total)  # the phase starts now (a job's progress lands when all its samples have run)
    reference = Reference.of(runs(None), labels, model.manifest.decision)
    if progress:
        progress(len(data), total)
    losses: dict[str, dict[Precision, dict[str, float]]] = {op.name: {} for op in ops_}
    for k, (op, p) in enumerate(jobs):
        lowered = runs({op.name: p})
        if progress:
            progress(len(data) * (k + 2), total)
        each = reference.disagreement(lowered)
        losses[op.name][p] = quality_loss(lowered, reference, each)
        if per_sample is not None:
            per_sample[(op.name, p)] = each
    return losses


def joint_losses(
    model: AdaptiveCompiledModel, data: list[list[np.ndarray]], routes: Routes | None = None
) -> Callable[[Mapping[str, OpChoice]], np.ndarray]:
    """``losses(choices)``: each sample's disagreement with FP32 (:meth:`Reference.disagreement`: the fraction
    of its positions whose argmax differs, or a CTC decode's CER against FP32's; their mean is
    :func:`quality_loss`'s ``loss[decision.drop_key]``) on ``data`` with every op at its choice together
    (routed ops at their fast variant, which never escalates: an upper bound of what routing loses) — how
    the selection checks a level (:func:`~.selection.select_levels`) and the refinement a fast route; each
    distinct set of choices runs once.

    A mix the package builds from NNCF's INT8 graph (``routes`` given, :func:`~.levels.builds_from_nncf`)
    runs as that body, compiled on its own: it quantizes more than the fully routed IR's per-op variants.
    Any other mix runs on ``model`` with its ops pinned (a state write, no compile)."""
    runs = PinnedRuns(model, data)
    reference = Reference.of(runs(None), None, model.manifest.decision)
    done: dict[frozenset[tuple[str, Precision]], np.ndarray] = {}  # a graph's outputs are deterministic
    served: dict[frozenset[tuple[str, OpChoice]], np.ndarray] = {}

    disagreement = reference.disagreement
    def losses(choices: Mapping[str, OpChoice]) -> np.ndarray:
        pin = {n: c.fast for n, c in choices.items() if c.fast is not Precision.FP32}
        if not pin:
            return np.zeros(len(data))
        if routes is not None and routes.from_nncf(dict(choices)):
            key = frozenset(choices.items())
            if key not in served:
                served[key] = disagreement(served_runs(model, routes, dict(choices), data))
            return served[key]
        pinned = frozenset(pin.items())
        if pinned not in done:
            done[pinned] = disagreement(runs(pin))
        return done[pinned]

    return losses


def served_runs(
    model: AdaptiveCompiledModel, routes: Routes, choices: dict[str, OpChoice], data: list[list[np.ndarray]]
) -> list[np.ndarray]:
    """The judged output of each sample of ``data`` (read as class scores) through the level body of
    ``choices`` compiled on its own, on ``model``'s device with its config, one request per stream as
    :class:`PinnedRuns` runs. Routed ops run their fast variant (the range check off, as when pinned)."""
    routed = any(c.routed for c in choices.values())
    esc = [ops.parameter([], np.float32, name="escalate")] if routed else []
    body, _ = routes.body(choices, "apsq/measure", esc)
    compiled = ov.Core().compile_model(body, model.device, {**model.manifest.profile.compile_config,
                                                           "PERFORMANCE_HINT": "THROUGHPUT"})  # fmt: skip
    decision, n_out = model.manifest.decision, len(body.outputs) - 1  # the body's last output is its route
    outputs: list[np.ndarray | None] = [None] * len(data)

    def keep(request: ov.InferRequest, i: int) -> None:
        outputs[i] = decision.scores(decision.pick([request.get_output_tensor(k).data for k in range(n_out)])).copy()

    queue = ov.AsyncInferQueue(compiled)
    queue.set_callback(keep)
    extra = [np.array(NEVER, np.float32)] if routed else []  # the escalate scale: no input leaves the range
    for i, x in enumerate(data):
        queue.start_async([*x, *extra], i)
    queue.wait_all()
    return outputs  # type: ignore[return-value]
