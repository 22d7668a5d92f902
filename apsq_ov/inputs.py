"""Reading and checking user data against a model's inputs (the DATA / INPUT contract, DESIGN.md §4).

Where it sits in the data flow: used by calibration (``--data``) and by ``apsq-ov infer``
(``--input``). A ``.npz`` holds one array per model input, keyed by the input's name (or
``inputs`` for a single-input model), each shaped ``(N, *input_shape[1:])``, plus optional
``labels``; a ``.npy`` holds the single input's array.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from apsq_ov.errors import DataError

SINGLE_INPUT_KEY = "inputs"
LABELS_KEY = "labels"


@dataclass(frozen=True)
class InputSpec:
    """What one model input expects.

    :param index: position among the model inputs (unnamed inputs are addressed by it).
    :param names: the input tensor's names (may be empty).
    :param shape: dims, ``None`` where dynamic.
    :param dtype: numpy dtype of the input.
    """

    index: int
    names: tuple[str, ...]
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def label(self) -> str:
        """How messages name this input."""
        return self.names[0] if self.names else f"#{self.index}"

    def to_json(self) -> dict:
        return {"index": self.index, "names": list(self.names), "shape": list(self.shape), "dtype": self.dtype.name}

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        return cls(int(d["index"]), tuple(d["names"]), tuple(d["shape"]), np.dtype(d["dtype"]))


def input_specs(model: ov.Model) -> list[InputSpec]:
    """The :class:`InputSpec` of each input of ``model``."""
    specs = []
    for i, port in enumerate(model.inputs):
        ps = port.get_partial_shape()
        if ps.rank.is_dynamic:
            raise DataError(f"model input {i} has a dynamic rank; apsq-ov needs at least a known rank")
        shape = tuple(d.get_length() if d.is_static else None for d in ps)
        names = tuple(sorted(port.get_names()))
        specs.append(InputSpec(i, names, shape, np.dtype(port.get_element_type().to_dtype())))
    return specs


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Load a ``.npz`` (all arrays) or ``.npy`` (as key ``inputs``) without pickles.

    :raises DataError: naming the file if it is missing, unreadable or of another format.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    try:
        if p.suffix == ".npy":
            return {SINGLE_INPUT_KEY: np.load(p, allow_pickle=False)}
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {p}: {exc}") from exc
    raise DataError(f"{p}: expected a .npz (one array per model input) or a .npy (single input)")


@dataclass(frozen=True)
class Samples:
    """Checked data: one array per model input (same order as the model), and optional labels."""

    arrays: tuple[np.ndarray, ...]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0])

    def sample(self, i: int, batch: int = 1) -> list[np.ndarray]:
        """The model inputs of batch ``i``."""
        return [a[i * batch : (i + 1) * batch] for a in self.arrays]

    def subset(self, idx: np.ndarray | slice) -> Samples:
        return Samples(tuple(a[idx] for a in self.arrays), None if self.labels is None else self.labels[idx])


def match_inputs(
    arrays: Mapping[str, np.ndarray], specs: list[InputSpec], *, source: str, require_finite: bool
) -> Samples:
    """Check ``arrays`` against the model inputs and return them in model order.

    :param source: the file name used in messages.
    :param require_finite: reject NaN/Inf (calibration data must be finite).
    :raises DataError: one line naming the file, the input and what is wrong.
    """
    keys = dict(arrays)
    labels = keys.pop(LABELS_KEY, None)
    out: list[np.ndarray] = []
    for spec in specs:
        key = next((n for n in spec.names if n in keys), None)
        if key is None and len(specs) == 1 and SINGLE_INPUT_KEY in keys:
            key = SINGLE_INPUT_KEY
        if key is None:
            expected = " or ".join(repr(n) for n in spec.names) or f"(unnamed input #{spec.index})"
            hint = f" or {SINGLE_INPUT_KEY!r}" if len(specs) == 1 else ""
            raise DataError(f"{source}: no array for model input {expected}{hint}; found keys {sorted(keys) or 'none'}")
        arr = np.asarray(keys.pop(key))
        out.append(check_array(arr, spec, f"{source}[{key}]", require_finite=require_finite))
    if keys:
        raise DataError(f"{source}: keys {sorted(keys)} match no model input (inputs: {[s.label for s in specs]})")
    n = {a.shape[0] for a in out}
    if len(n) > 1:
        raise DataError(f"{source}: inputs hold different sample counts {sorted(n)}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 0 or labels.shape[0] != out[0].shape[0]:
            raise DataError(f"{source}[labels]: {labels.shape[:1]} labels for {out[0].shape[0]} samples")
    return Samples(tuple(out), labels)


def check_array(
    arr: np.ndarray, spec: InputSpec, where: str, *, require_finite: bool, exact_batch: bool = False
) -> np.ndarray:
    """Check one array against one model input; return it C-contiguous in the input's dtype.

    :param exact_batch: the leading axis must equal the input's static batch (one inference),
        rather than hold any number of samples (a data file).
    :raises DataError: naming ``where`` and the input.
    """
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{where}: dtype {arr.dtype} is not numeric (model input {spec.label} is {spec.dtype})")
    if arr.ndim != len(spec.shape):
        raise DataError(
            f"{where}: shape {arr.shape} has rank {arr.ndim}, model input {spec.label} "
            f"wants rank {len(spec.shape)} {_fmt(spec.shape)}"
        )
    if arr.shape[0] == 0 or arr.size == 0:
        raise DataError(f"{where}: empty array {arr.shape}")
    if exact_batch and spec.shape[0] is not None and arr.shape[0] != spec.shape[0]:
        raise DataError(
            f"{where}: batch {arr.shape[0]} but the model runs batch {spec.shape[0]}; "
            "send the samples one request at a time (or through AsyncInferQueue)"
        )
    for axis, (have, want) in enumerate(zip(arr.shape[1:], spec.shape[1:], strict=True), start=1):
        if want is not None and have != want:
            raise DataError(
                f"{where}: shape {arr.shape} does not fit model input {spec.label} {_fmt(spec.shape)} (axis {axis})"
            )
    want_float = spec.dtype.kind == "f"
    if want_float and arr.dtype.kind not in "f":
        raise DataError(
            f"{where}: dtype {arr.dtype} but model input {spec.label} is {spec.dtype}; "
            "convert (and scale) to float yourself so nothing is guessed"
        )
    if not want_float and arr.dtype.kind == "f":
        raise DataError(f"{where}: dtype {arr.dtype} but model input {spec.label} is {spec.dtype}")
    if require_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))[0])
        raise DataError(f"{where}: sample {bad} holds NaN or Inf")
    return np.ascontiguousarray(arr, dtype=spec.dtype)


def request_arrays(inputs: Any, specs: list[InputSpec]) -> list[np.ndarray]:
    """Checked arrays for one inference, in model input order.

    :param inputs: as ``openvino.InferRequest.infer`` takes them: a dict keyed by input name or
        index (``inputs`` for a single input), a list/tuple in input order, or one array/Tensor.
    :raises DataError: naming the input at fault.
    """
    if len(specs) == 1 and type(inputs) is np.ndarray:
        spec = specs[0]  # the hot path (a queue's producer): one array already as the model takes it
        if inputs.shape == spec.shape and inputs.dtype == spec.dtype and inputs.flags.c_contiguous:
            return [inputs]
    if isinstance(inputs, Mapping):
        given = dict(inputs)
        arrays = []
        for spec in specs:
            keys = [spec.index, *spec.names] + ([SINGLE_INPUT_KEY] if len(specs) == 1 else [])
            key = next((k for k in keys if k in given), None)
            if key is None:
                raise DataError(f"no value for model input {spec.label}; got keys {sorted(map(str, given))}")
            arrays.append(given.pop(key))
        if given:
            raise DataError(f"keys {sorted(map(str, given))} match no model input (inputs: {[s.label for s in specs]})")
    elif isinstance(inputs, np.ndarray | ov.Tensor):
        arrays = [inputs]
    else:
        arrays = list(inputs)
    if len(arrays) != len(specs):
        raise DataError(f"{len(arrays)} arrays for {len(specs)} model inputs ({[s.label for s in specs]})")
    out = []
    for spec, value in zip(specs, arrays, strict=True):
        arr = value.data if isinstance(value, ov.Tensor) else np.asarray(value)
        out.append(check_array(arr, spec, f"input {spec.label}", require_finite=False, exact_batch=True))
    return out


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def static_shapes(specs: list[InputSpec], samples: Samples) -> tuple[int, dict[int, list[int]]]:
    """The batch the model runs at (its static batch, else 1) and each input's static shape.

    :raises DataError: if the sample count is not a multiple of a static batch.
    """
    batch = specs[0].shape[0] or 1
    if len(samples) % batch:
        raise DataError(f"{len(samples)} samples is not a multiple of the model's batch {batch}")
    shapes = {s.index: [batch, *a.shape[1:]] for s, a in zip(specs, samples.arrays, strict=True)}
    return batch, shapes
