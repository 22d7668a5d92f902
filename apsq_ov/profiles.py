"""Device Precision Profiles: per device, which precisions run natively and what each costs per
operator type and size, every figure with its provenance (``measured`` / ``published`` /
``estimate``). Read by calibration (which variants to build, the per-op cost model of the
selection) and by the routing policy. Shipped profiles live in ``device_profiles/``
(``apsq_ov.device_profiles``); ``apsq-ov profile --device D -o FILE`` measures one
(:mod:`apsq_ov.profiler`). The JSON form is ``apsq_ov/schemas/profile.schema.json``.

Cost model: an op type × precision holds benchmark *points* (MACs, latency). The latency of an op
with ``m`` MACs is interpolated on the per-MAC latency in log-log between the two nearest points
(constant per-MAC latency beyond the ends). One routing ``If`` costs
``if_base_ms + if_per_mb_ms × MB copied`` (the op's input and output).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from apsq_ov.errors import ProfileError
from apsq_ov.precision import Precision

PROFILE_SCHEMA_VERSION = 2
MIN_GAIN = 0.05
"""The latency gain over fp32 below which a precision does not count as faster
(:meth:`DeviceProfile.faster_than_fp32`)."""
_FALLBACK_OP_TYPE = "Convolution"


@dataclass(frozen=True)
class Figure:
    """One number and where it comes from (``provenance["kind"]``: measured / published / estimate)."""

    value: float
    provenance: dict[str, str]

    @property
    def kind(self) -> str:
        return self.provenance["kind"]


@dataclass(frozen=True)
class Point:
    """One benchmarked size of an op type at one precision."""

    shape: str
    macs: float
    latency_ms: Figure
    throughput_fps: Figure | None = None
    energy_mj: Figure | None = None


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """A device's Precision Profile (build it with :meth:`from_json` or :func:`load_profile`).

    :param device: OpenVINO device name (``CPU``, ``GPU``, ``GPU.1`` …).
    :param native_precisions: precisions the device runs natively.
    :param default_precisions: variants calibration builds when the user does not say.
    :param points: ``{op type: {precision: (Point, …)}}`` sorted by MACs.
    :param if_base_ms, if_per_mb_ms: cost of one routing ``If``.
    :param compile_config: OpenVINO properties apsq-ov compiles with on this device.
    """

    device: str
    name: str
    identity: dict[str, str]
    int8_hardware: str
    native_precisions: tuple[Precision, ...]
    default_precisions: tuple[Precision, ...]
    points: dict[str, dict[Precision, tuple[Point, ...]]]
    if_base_ms: Figure
    if_per_mb_ms: Figure
    compile_config: dict[str, str]
    raw: dict[str, Any]
    source: str = ""

    # -- the cost model ------------------------------------------------------------------------
    def _row(self, op_type: str) -> dict[Precision, tuple[Point, ...]]:
        return self.points.get(op_type) or self.points.get(_FALLBACK_OP_TYPE) or next(iter(self.points.values()))

    def typical_macs(self, op_type: str) -> float:
        """Geometric middle of the fp32 points' sizes: the size :meth:`cost` compares at."""
        pts = self._row(op_type)[Precision.FP32]
        return math.sqrt(pts[0].macs * pts[-1].macs)

    def latency_ms(self, op_type: str, precision: Precision, macs: float | None = None) -> float:
        """Predicted latency of one ``op_type`` op with ``macs`` MACs at ``precision``; inf if the
        profile has no figure for that precision."""
        pts = self._row(op_type).get(precision)
        if not pts:
            return math.inf
        m = float(macs) if macs else self.typical_macs(op_type)
        if len(pts) == 1 or m <= pts[0].macs:
            p = pts[0]
            return p.latency_ms.value * m / p.macs
        if m >= pts[-1].macs:
            p = pts[-1]
            return p.latency_ms.value * m / p.macs
        for lo, hi in zip(pts, pts[1:], strict=False):
            if lo.macs <= m <= hi.macs:
                t = (math.log(m) - math.log(lo.macs)) / max(math.log(hi.macs) - math.log(lo.macs), 1e-12)
                per_lo = math.log(lo.latency_ms.value / lo.macs)
                per_hi = math.log(hi.latency_ms.value / hi.macs)
                return m * math.exp(per_lo + t * (per_hi - per_lo))
        raise AssertionError("unreachable: points are sorted")

    def cost(self, op_type: str, precision: Precision, macs: float | None = None) -> float:
        """Latency of ``op_type`` at ``precision`` relative to fp32 (1.0) at the same size; inf if unknown."""
        base = self.latency_ms(op_type, Precision.FP32, macs)
        return self.latency_ms(op_type, precision, macs) / base if base > 0 else math.inf

    def faster_than_fp32(
        self, op_type: str, offered: tuple[Precision, ...], macs: float | None = None
    ) -> list[Precision]:
        """The offered precisions this device runs faster than fp32 for ``op_type`` (at ``macs``), fastest first.
        A precision the profile shows no gain for, or one within :data:`MIN_GAIN` (a measurement's noise: on a
        Xeon with AVX512-FP16 the fp16 conv measured 0.999x fp32), is never in the list: it is never chosen
        for speed, and a measured profile does not make it a default."""
        base = self.latency_ms(op_type, Precision.FP32, macs) * (1.0 - MIN_GAIN)
        faster = [p for p in offered if p is not Precision.FP32 and self.latency_ms(op_type, p, macs) < base]
        return sorted(faster, key=lambda p: (self.latency_ms(op_type, p, macs), p.rank))

    def route_ms(self, copied_bytes: float) -> float:
        """Predicted cost of one routing ``If`` that copies ``copied_bytes`` in and out."""
        return self.if_base_ms.value + self.if_per_mb_ms.value * copied_bytes / 2**20

    @property
    def route_overhead_ms(self) -> float:
        """The If cost at 1 MB copied (a summary figure for tables)."""
        return self.route_ms(2**20)

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The profile exactly as read (it is also what a package manifest embeds)."""
        return json.loads(json.dumps(self.raw))

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> DeviceProfile:
        """Validate ``data`` against the profile schema and build the profile.

        :raises ProfileError: naming the source and the JSON path of the bad field.
        """
        import jsonschema

        where = source or "profile"
        if isinstance(data, dict) and data.get("schema_version") != PROFILE_SCHEMA_VERSION:
            raise ProfileError(
                f"{where}: schema_version {data.get('schema_version')!r}, this apsq-ov reads {PROFILE_SCHEMA_VERSION}"
            )
        validator = jsonschema.Draft202012Validator(_schema())
        errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.path))))
        if errors:
            err = jsonschema.exceptions.best_match(errors) or errors[0]
            path = "/".join(str(p) for p in err.absolute_path) or "(top level)"
            raise ProfileError(f"{where}: field {path}: {_short(err.message)}")
        points: dict[str, dict[Precision, tuple[Point, ...]]] = {}
        for op_type, row in data["op_types"].items():
            points[op_type] = {
                Precision.parse(p): tuple(sorted((_point(x) for x in pts), key=lambda q: q.macs))
                for p, pts in row.items()
            }
        native = tuple(Precision.parse(p) for p in data["native_precisions"])
        default = tuple(Precision.parse(p) for p in data["default_precisions"])
        if Precision.FP32 not in default:
            raise ProfileError(f"{where}: field default_precisions: must include fp32")
        device = data["device"]
        return cls(
            device=str(device["plugin"]),
            name=str(device["name"]),
            identity=dict(device["identity"]),
            int8_hardware=str(device.get("int8_hardware", "unknown")),
            native_precisions=native,
            default_precisions=default,
            points=points,
            if_base_ms=_figure(data["routing"]["if_base_ms"]),
            if_per_mb_ms=_figure(data["routing"]["if_per_mb_ms"]),
            compile_config={str(k): str(v) for k, v in data["compile_config"].items()},
            raw=json.loads(json.dumps(data)),
            source=source,
        )


def _short(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _figure(d: dict[str, Any]) -> Figure:
    return Figure(float(d["value"]), dict(d["provenance"]))


def _point(d: dict[str, Any]) -> Point:
    return Point(
        shape=str(d["shape"]),
        macs=float(d["macs"]),
        latency_ms=_figure(d["latency_ms"]),
        throughput_fps=_figure(d["throughput_fps"]) if "throughput_fps" in d else None,
        energy_mj=_figure(d["energy_mj"]) if "energy_mj" in d else None,
    )


_SCHEMA: dict[str, Any] | None = None
_DEFAULT_PROFILE = {"AUTO": "CPU", "GPU": "GPU.gen12-iris-xe"}
"""Which shipped profile a bare device name uses (``--profile`` picks another, e.g. ``GPU.gen11``); for the
CPU, a shipped profile measured on a CPU like this machine's goes first (:func:`default_profile_name`)."""


def _schema() -> dict[str, Any]:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads((resources.files("apsq_ov") / "schemas" / "profile.schema.json").read_text())
    return _SCHEMA


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in ``apsq_ov.device_profiles`` (``CPU``, ``GPU``, ``GPU.gen11`` …)."""
    root = resources.files("apsq_ov.device_profiles")
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def default_profile_name(device: str = "CPU") -> str:
    """The shipped profile a bare device name uses: for ``CPU`` (and ``AUTO``, which runs on it) the first
    shipped CPU profile measured on a CPU like this machine's (:func:`host_profiles`), else ``CPU``
    (then ``apsq-ov calibrate`` warns); ``GPU`` / ``GPU.1`` → ``GPU.gen12-iris-xe``; a shipped name as
    itself."""
    base = device.split(".")[0].upper()
    if device in shipped_profiles() and device != base:
        return device
    name = _DEFAULT_PROFILE.get(base, base)
    if name == "CPU":
        return next(iter(host_profiles()), "CPU")
    return name


def load_profile(device: str = "CPU", path: str | Path | None = None) -> DeviceProfile:
    """Load a profile from ``path`` (a file, or the name of a shipped profile such as ``GPU.gen11``),
    or the shipped one for ``device`` (:func:`default_profile_name`: for ``CPU``, the shipped profile measured
    on a CPU like this one, else ``CPU``; ``GPU.1`` uses ``GPU``'s).

    :raises ProfileError: if the file is missing, not JSON, or malformed (naming the field).
    """
    name = None
    if path is not None and not Path(path).is_file() and str(path) in shipped_profiles():
        name, path = str(path), None
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ProfileError(
                f"cannot read profile {p}: {exc.strerror or exc} (shipped profiles: {', '.join(shipped_profiles())})"
            ) from exc
        source = str(p)
    else:
        name = name or default_profile_name(device)
        res = resources.files("apsq_ov.device_profiles") / f"{name}.json"
        if not res.is_file():
            raise ProfileError(f"no shipped profile for device {device!r}; shipped: {', '.join(shipped_profiles())}")
        text = res.read_text()
        source = f"device_profiles/{name}.json"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    return DeviceProfile.from_json(data, source=source)


def host_mismatch(profile: DeviceProfile) -> str | None:
    """Why a CPU ``profile`` does not describe this machine's CPU — its CPU model or the capabilities
    OpenVINO reports differ (then its costs are another CPU's: on a Xeon with AVX512-FP16 but no AMX,
    BF16 ran slower than FP32, while the EPYC of ``CPU.json`` ran it faster) — or None where it does, or
    where the profile is not a CPU's (a GPU profile describes its device, not this host)."""
    if profile.device.split(".")[0].upper() not in ("CPU", "AUTO") or "cpu_model" not in profile.identity:
        return None
    here = host_identity()
    diffs = [f"{k} {profile.identity.get(k, '?')!r}, this host {v!r}" for k, v in here.items()
             if profile.identity.get(k, "").replace(" ", "") != v.replace(" ", "")]  # fmt: skip
    return "; ".join(diffs) or None


@functools.cache
def host_identity() -> dict[str, str]:
    """What :func:`host_mismatch` compares a CPU profile's identity with: this machine's CPU model and the
    ``OPTIMIZATION_CAPABILITIES`` OpenVINO's CPU plugin reports (read once per process)."""
    import openvino as ov

    from apsq_ov.profiler import host_cpu

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {"cpu_model": host_cpu(), "optimization_capabilities": ", ".join(caps)}


def host_profiles() -> list[str]:
    """The shipped CPU profiles measured on a CPU like this machine's (:func:`host_mismatch` is None)."""
    return [n for n in shipped_profiles() if n.split(".")[0] == "CPU" and host_mismatch(load_profile(path=n)) is None]
