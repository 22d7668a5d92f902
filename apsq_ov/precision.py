"""The shared vocabulary: :class:`Precision` and its mapping to OpenVINO element types.

Every other module speaks in :class:`Precision`; strings are converted once, at the CLI/JSON
boundary, with :meth:`Precision.parse`. The integer :attr:`Precision.code` is what the adaptive
IR's state variables and its ``apsq_route`` output carry.
"""

from __future__ import annotations

from enum import Enum

import openvino as ov

from apsq_ov.errors import UnsupportedPrecisionError


class Precision(str, Enum):
    """A numeric precision a routed operator can run at, most accurate first."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def code(self) -> int:
        """Stable integer code used in the IR (state variables, ``apsq_route`` output)."""
        return _CODES[self]

    @property
    def ov_type(self) -> ov.Type:
        """The OpenVINO element type of this precision's arithmetic."""
        return _OV_TYPES[self]

    @property
    def rank(self) -> int:
        """Accuracy rank: 0 is the most accurate; larger is coarser."""
        return _RANKS[self]

    @classmethod
    def from_code(cls, code: int) -> Precision:
        """Inverse of :attr:`code`.

        :raises UnsupportedPrecisionError: for a code no precision has.
        """
        for p, c in _CODES.items():
            if c == int(code):
                return p
        raise UnsupportedPrecisionError(f"unknown precision code {code}")

    @classmethod
    def parse(cls, name: str | Precision) -> Precision:
        """Convert a user-facing name (``fp32``, ``BF16``, ``f32``, ``i8`` …) to a :class:`Precision`.

        :raises UnsupportedPrecisionError: naming the bad value and the accepted ones.
        """
        if isinstance(name, Precision):
            return name
        key = str(name).strip().lower()
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            accepted = ", ".join(p.value for p in cls)
            raise UnsupportedPrecisionError(f"unknown precision {name!r}; use one of {accepted}") from None

    def __str__(self) -> str:
        return self.value


_CODES = {Precision.FP32: 0, Precision.FP16: 1, Precision.BF16: 2, Precision.INT8: 3, Precision.INT4: 4}
_RANKS = {Precision.FP32: 0, Precision.FP16: 1, Precision.BF16: 1, Precision.INT8: 2, Precision.INT4: 3}
_OV_TYPES = {
    Precision.FP32: ov.Type.f32,
    Precision.FP16: ov.Type.f16,
    Precision.BF16: ov.Type.bf16,
    Precision.INT8: ov.Type.i8,
    Precision.INT4: ov.Type.i4,
}
_ALIASES = {"f32": "fp32", "f16": "fp16", "i8": "int8", "u8": "int8", "i4": "int4", "u4": "int4"}


def parse_precisions(text: str) -> tuple[Precision, ...]:
    """Parse a comma-separated list such as ``"fp32,bf16,int8"``; FP32 is always included first.

    :raises UnsupportedPrecisionError: for an unknown name.
    """
    items = [Precision.parse(t) for t in text.split(",") if t.strip()]
    out = [Precision.FP32] + [p for p in dict.fromkeys(items) if p is not Precision.FP32]
    return tuple(out)
