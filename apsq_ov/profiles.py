"""Device Precision Profiles: per device, which precisions run natively and what each costs per
operator type. Read by calibration (which variants to build) and by the routing policy (which
variant is the fastest). Shipped profiles live in ``device_profiles/`` (``apsq_ov.device_profiles``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from apsq_ov.errors import ProfileError
from apsq_ov.precision import Precision

PROFILE_SCHEMA_VERSION = 1
_FALLBACK_OP_TYPE = "Convolution"


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """A device's Precision Profile.

    :param device: OpenVINO device name (``CPU``, ``GPU``, ``GPU.1`` …).
    :param native_precisions: precisions the device runs natively.
    :param default_precisions: variants calibration builds when the user does not say.
    :param relative_latency: ``{op type: {precision: latency relative to fp32}}``.
    :param route_overhead_ms: measured or published cost of one routed operator (an ``If``).
    :param compile_config: OpenVINO properties apsq-ov compiles with on this device.
    """

    device: str
    name: str
    provenance: str
    native_precisions: tuple[Precision, ...]
    default_precisions: tuple[Precision, ...]
    relative_latency: dict[str, dict[Precision, float]]
    route_overhead_ms: float
    compile_config: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if Precision.FP32 not in self.default_precisions:
            raise ProfileError(f"profile {self.source or self.device}: default_precisions must include fp32")
        for op_type, row in self.relative_latency.items():
            if Precision.FP32 not in row:
                raise ProfileError(f"profile {self.source or self.device}: op type {op_type} has no fp32 latency")

    def cost(self, op_type: str, precision: Precision) -> float:
        """Latency of ``op_type`` at ``precision`` relative to fp32 (1.0); inf if the profile has no figure."""
        row = self.relative_latency.get(op_type) or self.relative_latency.get(_FALLBACK_OP_TYPE, {})
        return row.get(precision, float("inf"))

    def faster_than_fp32(self, op_type: str, offered: tuple[Precision, ...]) -> list[Precision]:
        """The offered precisions that this device runs faster than fp32 for ``op_type``, fastest first."""
        base = self.cost(op_type, Precision.FP32)
        faster = [p for p in offered if p is not Precision.FP32 and self.cost(op_type, p) < base]
        return sorted(faster, key=lambda p: (self.cost(op_type, p), p.rank))

    def to_json(self) -> dict[str, Any]:
        """The profile as written in a package manifest."""
        return {
            "schema_version": PROFILE_SCHEMA_VERSION,
            "device": self.device,
            "name": self.name,
            "provenance": self.provenance,
            "native_precisions": [p.value for p in self.native_precisions],
            "default_precisions": [p.value for p in self.default_precisions],
            "compile_config": dict(self.compile_config),
            "route_overhead_ms": self.route_overhead_ms,
            "op_types": {
                t: {p.value: {"relative_latency": v} for p, v in row.items()}
                for t, row in self.relative_latency.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "") -> DeviceProfile:
        """Validate and build a profile from its JSON form.

        :raises ProfileError: naming the source and the bad field.
        """
        where = source or "profile"
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: expected a JSON object")
        if data.get("schema_version") != PROFILE_SCHEMA_VERSION:
            raise ProfileError(
                f"{where}: schema_version {data.get('schema_version')!r}, this apsq-ov reads {PROFILE_SCHEMA_VERSION}"
            )
        try:
            rel = {
                str(t): {Precision.parse(p): float(v["relative_latency"]) for p, v in row.items()}
                for t, row in data["op_types"].items()
            }
            return cls(
                device=str(data["device"]),
                name=str(data.get("name", data["device"])),
                provenance=str(data.get("provenance", "")),
                native_precisions=tuple(Precision.parse(p) for p in data["native_precisions"]),
                default_precisions=tuple(Precision.parse(p) for p in data["default_precisions"]),
                relative_latency=rel,
                route_overhead_ms=float(data.get("route_overhead_ms", 0.0)),
                compile_config={str(k): str(v) for k, v in data.get("compile_config", {}).items()},
                source=source,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"{where}: malformed profile ({type(exc).__name__}: {exc})") from exc


def shipped_profiles() -> list[str]:
    """Device names with a profile shipped in ``apsq_ov.device_profiles``."""
    root = resources.files("apsq_ov.device_profiles")
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_profile(device: str = "CPU", path: str | Path | None = None) -> DeviceProfile:
    """Load a profile from ``path``, or the shipped one for ``device`` (``GPU.1`` uses ``GPU``).

    :raises ProfileError: if the file is missing, not JSON, or malformed.
    """
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ProfileError(f"cannot read profile {p}: {exc.strerror or exc}") from exc
        source = str(p)
    else:
        base = device.split(".")[0].upper()
        if base == "AUTO":
            base = "CPU"
        res = resources.files("apsq_ov.device_profiles") / f"{base}.json"
        if not res.is_file():
            raise ProfileError(f"no shipped profile for device {device!r}; shipped: {', '.join(shipped_profiles())}")
        text = res.read_text()
        source = f"device_profiles/{base}.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    return DeviceProfile.from_json(data, source=source)
