"""How a model's judged output reads as decisions: per-position class scores, the classes on the last axis.

Where it sits in the data flow: between every run of the model and what judges it — calibration's drops
(the levels' top-1 disagreement with FP32), the router's labels and its in-graph margin, the bench's
agreement. The judged output is the first unless calibration is told another (``apsq-ov calibrate
--judged-output NAME``: a detector's class scores, not its box regressions, whose top-1 over box
coordinates means nothing). A classifier ``(N, C)`` or a CTC sequence ``(N, T, C)`` already has its classes last; a
segmentation or detection map ``(N, C, H, W)`` has them on axis 1 (``apsq-ov calibrate --class-axis 1``);
a one-class axis (a sigmoid map, a single logit per anchor) holds a binary decision, read as the two
classes ``(1 − p, p)`` — without that, its top-1 over one class never differs and every drop reads 0.

A CTC sequence output is judged by the text it decodes to (``sequence="ctc"``: calibration sets it when
its labels are CTC label rows, or ``apsq-ov calibrate --ctc``): a sample's disagreement with FP32 is the
character error rate of its greedy decode against FP32's, not the fraction of its time steps whose top-1
moved — most of those are blanks and repeats that decode to the same text (PP-OCRv4 rec: a level that
moved 2.5% of the positions read 0.6 pt worse in CER than FP32 on the bench's lines, one that moved 6.9%
read 0.2 pt better).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov
from openvino import opset13 as ops

from apsq_ov.datasets import cer, ctc_collapse
from apsq_ov.errors import ConfigError

BINARY = ("probability", "logit")
"""How a one-class axis holds its decision: a probability (class 1 where p > 0.5) or a logit (z > 0)."""


@dataclass(frozen=True)
class Decision:
    """Which output is judged (``output``, its index among the model's outputs), where its classes are
    (``class_axis``) and, for a one-class axis, how it holds the binary decision (``binary``: one of
    :data:`BINARY`; None for two or more classes)."""

    class_axis: int = -1
    binary: str | None = None
    output: int = 0
    sequence: str | None = None
    """``ctc``: the scores ``(batch, T, classes)`` are a CTC path, judged by the text it decodes to."""

    @property
    def identity(self) -> bool:
        """The output already is per-position class scores, classes last."""
        return self.class_axis == -1 and self.binary is None

    def scores(self, y: Any) -> np.ndarray:
        """``y`` (one output, batch axis first) as class scores with the classes on the last axis."""
        y = np.asarray(y)
        if self.identity:
            return y
        if self.class_axis not in (-1, y.ndim - 1):
            y = np.moveaxis(y, self.class_axis, -1)
        if self.binary is None:
            return y
        p = y.astype(np.float64)
        if self.binary == "logit":
            p = 0.5 * (1.0 + np.tanh(0.5 * p))  # the logistic function without overflow
        return np.concatenate([1.0 - p, p], axis=-1)

    def graph_scores(self, y: ov.Output) -> ov.Output:
        """:meth:`scores` as graph ops (for the router's in-graph margin)."""
        if self.identity:
            return y
        rank = len(y.get_partial_shape())
        axis = self.class_axis % rank
        if axis != rank - 1:
            order = [a for a in range(rank) if a != axis] + [axis]
            y = ops.transpose(y, ops.constant(np.array(order, np.int64))).output(0)
        if self.binary is None:
            return y
        if y.get_element_type() != ov.Type.f32:
            y = ops.convert(y, "f32").output(0)
        p = ops.sigmoid(y).output(0) if self.binary == "logit" else y
        return ops.concat([ops.subtract(ops.constant(np.float32(1.0)), p).output(0), p], rank - 1).output(0)

    @property
    def drop_key(self) -> str:
        """The entry of calibration's quality loss that is the mean of :meth:`disagreement` (the drop)."""
        return "top1" if self.sequence is None else "text"

    def disagreement(self, top: np.ndarray, reference: np.ndarray) -> float:
        """One sample's disagreement with FP32, from the top-1 class indices of its scores and of FP32's
        (``argmax(-1)`` of :meth:`scores`, batch axis first): the fraction of positions whose top-1 differs;
        for a CTC sequence, the mean over the batch of the character error rate of the decoded text against
        FP32's (its edit distance over FP32's text length; an edit against an empty text counts 1), each line
        at most 1 (a line can lose no more than all of it; the budgets' bounds count samples in [0, 1])."""
        if self.sequence is None:
            return float(np.mean(top != reference))
        rows = zip(np.reshape(top, (-1, np.shape(top)[-1])), np.reshape(reference, (-1, np.shape(reference)[-1])),
                   strict=True)  # fmt: skip
        return float(np.mean([min(cer(ctc_collapse(a), ctc_collapse(b)), 1.0) for a, b in rows]))

    def pick(self, results: Any) -> Any:
        """The judged output of one run's ``results`` (anything indexed by output position)."""
        return results[self.output]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class_axis": self.class_axis, "binary": self.binary, "output": self.output}
        return out | ({"sequence": self.sequence} if self.sequence is not None else {})

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Decision:
        if d is None:
            return cls()
        return cls(int(d["class_axis"]), None if d.get("binary") is None else str(d["binary"]), int(d.get("output", 0)),
                   None if d.get("sequence") is None else str(d["sequence"]))  # fmt: skip


CLASSES_LAST = Decision()
"""The default: the output's last axis holds two or more classes (a classifier, a CTC sequence)."""


def decide(outputs: list[np.ndarray], class_axis: int | None, name: str = "output 0") -> Decision:
    """The :class:`Decision` for a model whose judged output gave ``outputs`` (FP32, calibration samples):
    classes on ``class_axis`` (default: last); a one-class axis is a probability if every value lies in
    [0, 1], else a logit.

    :raises ConfigError: for a ``class_axis`` the output does not have (naming the output and its shape).
    """
    first = np.asarray(outputs[0])
    if first.ndim == 0:  # a scalar output: nothing to take a top-1 over
        return CLASSES_LAST
    if class_axis is None:
        axis = -1
    else:
        axis = int(class_axis)
        if not -first.ndim <= axis < first.ndim or (first.ndim > 1 and axis in (0, -first.ndim)):
            raise ConfigError(f"--class-axis {axis}: {name} has shape {tuple(first.shape)}; use an axis in "
                              f"1..{first.ndim - 1} (0 is the batch) or -1 (the last)")  # fmt: skip
    if axis == first.ndim - 1:
        axis = -1
    if first.shape[axis] != 1:
        return Decision(axis)
    in_unit = all(float(np.min(o)) >= 0.0 and float(np.max(o)) <= 1.0 for o in outputs)
    return Decision(axis, "probability" if in_unit else "logit")


def output_index(names: list[set[str]], judged: str | None) -> int:
    """The index of the output ``judged`` names (one of its tensor names, or its index) among outputs with
    ``names``; 0 for None.

    :raises ConfigError: naming the outputs there are, for a name or index none of them has.
    """
    if judged is None:
        return 0
    for k, found in enumerate(names):
        if judged in found:
            return k
    if judged.lstrip("-").isdigit() and 0 <= int(judged) < len(names):
        return int(judged)
    there = ", ".join(f"{k}: {'/'.join(sorted(n)) or '(unnamed)'}" for k, n in enumerate(names))
    raise ConfigError(f"--judged-output {judged}: the model has no such output (outputs {there})")
