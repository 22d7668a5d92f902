"""The package artifact: ``model.xml``/``model.bin`` (the adaptive IR) + ``apsq.json`` (the manifest).

Where it sits in the data flow: written once by calibration (:func:`write_package`), read by the
runtime, ``infer`` and ``report`` (:meth:`Package.load`). The manifest also lives in the IR's
``rt_info`` (key ``apsq/manifest``) so the IR alone says how it was built.

The write is atomic: everything goes to a temporary sibling directory that is renamed onto
``OUT_DIR`` at the end, so a failed or killed calibration leaves any existing package untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import openvino as ov

from apsq_ov.decisions import Decision
from apsq_ov.errors import PackageError
from apsq_ov.inputs import InputSpec
from apsq_ov.precision import Precision
from apsq_ov.profiles import DeviceProfile

SCHEMA_VERSION = 2
MANIFEST = "apsq.json"
MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"
RT_INFO_KEY = ["apsq", "manifest"]
ROUTE_OUTPUT = "apsq_route"
LEVEL_STATE = "apsq/level"
MODES_STATE = "apsq/modes"
"""Package IR state read by the fully routed body: each routed op's precision code, in manifest order."""
LIMITS_STATE = "apsq/limits"
"""Package IR state: range limit of each op with an INT8 variant (manifest order, those ops only)."""
"""State variable holding the index of the body a request runs (a level of the dial, or the full body)."""
"""The adaptive IR's extra output: the precision code each routed op took, in manifest order."""


@dataclass(kw_only=True)
class OpRecord:
    """Everything calibration learned about one routed operator.

    :param index: position among routed ops; also its column in ``apsq_route`` and its state variables.
    :param depth: topological index among routable ops.
    :param variants: precisions built for it, fp32 first.
    :param sensitivity: ``{"components": {...}, "score": s}``.
    :param drops: measured top-1 disagreement with FP32 when only this op runs at that precision
        (on the ground-truth split); what the routing policy budgets.
    :param quality: the same isolated run in every metric (``top1``, ``kl``, ``nmse``, ``accuracy``).
    :param int8_absmax: the calibrated INT8 activation range (abs-max) the in-graph check compares to.
    :param input_absmax: abs-max of the op input (FP32) over the samples the sensitivity probe read (reported only).
    """

    index: int
    name: str
    type: str
    depth: int
    variants: tuple[Precision, ...]
    sensitivity: dict[str, Any]
    drops: dict[Precision, float] = field(default_factory=dict)
    quality: dict[Precision, dict[str, float]] = field(default_factory=dict)
    int8_absmax: float | None = None
    input_absmax: float | None = None
    macs: float = 0.0
    io_bytes: float = 0.0

    @property
    def score(self) -> float:
        return float(self.sensitivity["score"])

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "type": self.type,
            "depth": self.depth,
            "variants": [p.value for p in self.variants],
            "sensitivity": self.sensitivity,
            "drops": {p.value: v for p, v in self.drops.items()},
            "quality_loss": {p.value: dict(v) for p, v in self.quality.items()},
            "thresholds": {"int8_absmax": self.int8_absmax},
            "calibration": {"input_absmax": self.input_absmax},
            "cost": {"macs": self.macs, "io_bytes": self.io_bytes},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OpRecord:
        return cls(
            index=int(d["index"]),
            name=str(d["name"]),
            type=str(d["type"]),
            depth=int(d["depth"]),
            variants=tuple(Precision.parse(p) for p in d["variants"]),
            sensitivity=dict(d["sensitivity"]),
            drops={Precision.parse(p): float(v) for p, v in d.get("drops", {}).items()},
            quality={Precision.parse(p): dict(v) for p, v in d.get("quality_loss", {}).items()},
            int8_absmax=d.get("thresholds", {}).get("int8_absmax"),
            input_absmax=d.get("calibration", {}).get("input_absmax"),
            macs=float(d.get("cost", {}).get("macs", 0.0)),
            io_bytes=float(d.get("cost", {}).get("io_bytes", 0.0)),
        )


@dataclass(frozen=True)
class OpChoice:
    """One op's place in a level body: static at ``fast`` when ``safe is fast``; else routed per input,
    ``fast`` (INT8) unless the op input leaves the calibrated INT8 range (× ``limit``), then ``safe``."""

    fast: Precision
    safe: Precision
    limit: float = 1.0
    shared_with: str | None = None
    """routed inside the If of this (upstream, adjacent) op: a run of ops that always agree shares one If"""

    @property
    def routed(self) -> bool:
        return self.fast is not self.safe


@dataclass(frozen=True)
class Level:
    """One level of the dial: the body a request with ``max_drop ≥ max_drop`` (and below the next level) runs."""

    max_drop: float
    choices: dict[str, OpChoice]
    predicted_ms: float
    predicted_drop: float
    solver: str
    measured_ms: float | None = None
    """median latency of this level body on the target device, where calibration could time it"""
    measured_drop: float | None = None
    """top-1 disagreement with FP32 of this level (every op at its choice together, routed ops at their
    fast variant) on calibration's held-out split; ``predicted_drop`` is the sum of the ops' isolated drops"""

    @property
    def routed(self) -> list[str]:
        return [n for n, c in self.choices.items() if c.routed]

    def to_json(self) -> dict:
        return {
            "max_drop": self.max_drop,
            "predicted_ms": self.predicted_ms,
            "predicted_drop": self.predicted_drop,
            "solver": self.solver,
            "measured_ms": self.measured_ms,
            "measured_drop": self.measured_drop,
            "routed": self.routed,
            "ops": {
                n: {"fast": c.fast.value, "safe": c.safe.value, "limit": c.limit}
                | ({"shared_with": c.shared_with} if c.shared_with else {})
                for n, c in self.choices.items()
            },
        }

    @classmethod
    def from_json(cls, d: dict) -> Level:
        return cls(
            max_drop=float(d["max_drop"]),
            choices={
                n: OpChoice(
                    Precision.parse(c["fast"]),
                    Precision.parse(c["safe"]),
                    float(c.get("limit", 1.0)),
                    c.get("shared_with"),
                )
                for n, c in d["ops"].items()
            },
            predicted_ms=float(d["predicted_ms"]),
            predicted_drop=float(d["predicted_drop"]),
            solver=str(d.get("solver", "")),
            measured_ms=None if d.get("measured_ms") is None else float(d["measured_ms"]),
            measured_drop=None if d.get("measured_drop") is None else float(d["measured_drop"]),
        )


ESCALATE_STATE = "apsq/escalate"
"""State variable multiplying every level body's range limits (1.0; inf = never escalate)."""
TAU_STATE = "apsq/tau"
"""State variable: the cascade escalates an input when its risk (logit) exceeds this."""
NEVER = 3.0e38
"""τ that never escalates (the state is f32)."""
EPS = 1e-6
"""Every feature enters the risk as ``log(value + EPS)``: spreads and margins act multiplicatively."""


class Feature(str, Enum):
    """What the router can measure, with OpenVINO reductions over the whole tensor.

    Range and spread are measured against the op's calibrated INT8 quantizer ``[lo, hi]`` (NNCF's
    FakeQuantize), on the op's input before quantization.
    """

    MARGIN = "margin"
    """top-1 minus top-2 probability of the fast route's judged output (min over positions): how close
    the answer is to flipping. Probabilities are the output itself when it already sums to 1, else softmax."""
    AMAX_RATIO = "amax_ratio"
    """max |x| / max(|lo|, |hi|): > 1 means INT8 clips this input."""
    CLIP_FRAC = "clip_frac"
    """fraction of elements outside [lo, hi]."""
    STD_OVER_STEP = "std_over_step"
    """std(x) / INT8 step ((hi − lo) / (levels − 1)): how many quantization steps the signal spans."""
    NEARZERO_FRAC = "nearzero_frac"
    """fraction of elements with |x| < step / 2, which INT8 rounds to the zero code: the entropy proxy
    (a histogram entropy needs one compare per bin per element; this one compare is tied to the INT8
    grid, which is what decides the information INT8 destroys)."""



@dataclass(frozen=True)
class Term:
    """One input of the risk: ``weight · log(feature + EPS)``; ``op`` is None for :attr:`Feature.MARGIN`."""

    feature: Feature
    op: str | None
    weight: float
    elements: int = 0
    auc_holdout: float | None = None
    """this term alone, held-out split (sign-free: max(AUC, 1 − AUC))"""

    @property
    def key(self) -> tuple[Feature, str | None]:
        return (self.feature, self.op)

    def to_json(self) -> dict[str, Any]:
        return {"feature": self.feature.value, "op": self.op, "weight": self.weight, "elements": self.elements,
                "auc_holdout": self.auc_holdout}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Term:
        auc = d.get("auc_holdout")
        return cls(Feature(d["feature"]), d.get("op"), float(d["weight"]), int(d.get("elements", 0)),
                   None if auc is None else float(auc))  # fmt: skip


@dataclass(frozen=True)
class CascadePoint:
    """The cascade at one max-drop budget: escalate when risk > ``tau``."""

    max_drop: float
    tau: float
    escalation: float
    """fraction of clean held-out calibration inputs escalated"""
    predicted_drop: float
    """fraction of clean held-out inputs whose top-1 still differs from FP32 (flips not escalated)"""
    predicted_ms: float
    measured_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop, "tau": self.tau, "escalation": self.escalation,
                "predicted_drop": self.predicted_drop, "predicted_ms": self.predicted_ms,
                "measured_ms": self.measured_ms}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CascadePoint:
        m = d.get("measured_ms")
        return cls(float(d["max_drop"]), float(d["tau"]), float(d["escalation"]), float(d["predicted_drop"]),
                   float(d["predicted_ms"]), None if m is None else float(m))  # fmt: skip

    @property
    def ms(self) -> float:
        return self.predicted_ms if self.measured_ms is None else self.measured_ms


@dataclass
class Router:
    """The fitted router and the cascade it drives (the manifest's ``router``)."""

    fast_level: int
    precise_level: int
    terms: list[Term]
    bias: float
    probabilities: bool
    ranges: dict[str, tuple[float, float, int]]
    """per featured op, its INT8 quantizer ``(lo, hi, levels)``"""
    points: list[CascadePoint] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    """held-out AUCs (router, margin alone, op features alone; per shift), flip rates, sample counts"""
    cost: dict[str, Any] = field(default_factory=dict)
    """in-graph cost: element passes, and measured ms where calibration ran on the target device"""
    shifts: list[str] = field(default_factory=list)
    hold: list[str] = field(default_factory=lambda: ["clean"])
    """the calibration distributions each budget's τ holds on (``clean`` and/or shift names)"""

    def point_for(self, max_drop: float) -> CascadePoint | None:
        """The point with the largest budget ≤ ``max_drop`` (None below the smallest)."""
        best = None
        for p in self.points:
            if p.max_drop <= max_drop + 1e-12:
                best = p
        return best

    def to_json(self) -> dict[str, Any]:
        return {
            "fast_level": self.fast_level,
            "precise_level": self.precise_level,
            "risk": "logit = bias + Σ weight · log(feature + 1e-6); escalate when logit > tau (state apsq/tau)",
            "terms": [t.to_json() for t in self.terms],
            "bias": self.bias,
            "probabilities": self.probabilities,
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "points": [p.to_json() for p in self.points],
            "quality": self.quality,
            "cost": self.cost,
            "shifts": self.shifts,
            "hold": self.hold,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Router:
        return cls(
            fast_level=int(d["fast_level"]),
            precise_level=int(d["precise_level"]),
            terms=[Term.from_json(t) for t in d["terms"]],
            bias=float(d["bias"]),
            probabilities=bool(d["probabilities"]),
            ranges={k: (float(v[0]), float(v[1]), int(v[2])) for k, v in d["ranges"].items()},
            points=[CascadePoint.from_json(p) for p in d["points"]],
            quality=dict(d.get("quality", {})),
            cost=dict(d.get("cost", {})),
            shifts=[str(s) for s in d.get("shifts", [])],
            hold=[str(s) for s in d.get("hold", ["clean"])],
        )


@dataclass(kw_only=True)
class Manifest:
    """The package manifest (``apsq.json``)."""

    source_model: dict[str, Any]
    profile: DeviceProfile
    precisions: tuple[Precision, ...]
    default_max_drop: float
    inputs: list[InputSpec]
    outputs: list[str]
    batch: int
    ops: list[OpRecord]
    sensitivity: dict[str, Any]
    calibration: dict[str, Any]
    levels: list[Level] = field(default_factory=list)
    default_level: int = 0
    selection: dict[str, Any] = field(default_factory=dict)
    router: Router | None = None
    """the fitted router and its escalation cascade (body index ``len(levels)``), if calibration built one"""
    router_note: str = ""
    """why there is no router, when there is none"""
    decision: Decision = field(default_factory=Decision)
    """which output is judged and how it reads as per-position class scores (every drop, the router, the bench)"""
    files: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def route_ops(self) -> list[str]:
        return [op.name for op in self.ops]

    @property
    def judged_output(self) -> str:
        """The name of the output calibration judged (``decision.output``)."""
        k = self.decision.output
        return self.outputs[k] if k < len(self.outputs) else f"output {k}"

    @property
    def cascade_level(self) -> int | None:
        """Body index of the escalation cascade (after the levels), if there is one."""
        return None if self.router is None else len(self.levels)

    @property
    def budgets(self) -> list[float]:
        """Every max_drop the package has a level or a cascade threshold for, ascending."""
        points = self.router.points if self.router is not None else []
        return sorted({lv.max_drop for lv in self.levels} | {p.max_drop for p in points})

    @property
    def fast_route_codes(self) -> list[int] | None:
        """The route (precision code per routed op) of the cascade's fast level: what ``apsq_route``
        reads when the router does not escalate (None without a router)."""
        if self.router is None:
            return None
        choices = self.levels[self.router.fast_level].choices
        return [choices[n].fast.code for n in self.route_ops]

    @property
    def full_level(self) -> int:
        """Body index of the fully routed body (pins and forced precisions run there)."""
        return len(self.levels) + (0 if self.router is None else 1)

    def op(self, name: str) -> OpRecord:
        for rec in self.ops:
            if rec.name == name:
                return rec
        raise KeyError(name)

    def to_json(self, *, with_files: bool = True) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "generator": "apsq-ov",
            "source_model": self.source_model,
            "device": self.profile.device,
            "profile": self.profile.to_json(),
            "precisions": [p.value for p in self.precisions],
            "default_max_drop": self.default_max_drop,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": self.outputs,
            "decision": self.decision.to_json(),
            "batch": self.batch,
            "route_output": ROUTE_OUTPUT,
            "precision_codes": {str(p.code): p.value for p in Precision},
            "sensitivity": self.sensitivity,
            "calibration": self.calibration,
            "ops": [op.to_json() for op in self.ops],
            "selection": self.selection,
            "default_level": self.default_level,
            "levels": [level.to_json() for level in self.levels],
            "router": None if self.router is None else self.router.to_json(),
            "router_note": self.router_note,
        }
        if with_files:
            d["files"] = self.files
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = MANIFEST) -> Manifest:
        """:raises PackageError: naming ``source`` on a schema_version skew or a missing/bad field."""
        if not isinstance(d, dict):
            raise PackageError(f"{source}: expected a JSON object")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise PackageError(
                f"{source}: schema_version {d.get('schema_version')!r}, this apsq-ov reads {SCHEMA_VERSION}; "
                "re-run apsq-ov calibrate"
            )
        try:
            return cls(
                source_model=dict(d["source_model"]),
                profile=DeviceProfile.from_json(d["profile"], source=f"{source}:profile"),
                precisions=tuple(Precision.parse(p) for p in d["precisions"]),
                default_max_drop=float(d["default_max_drop"]),
                inputs=[InputSpec.from_json(s) for s in d["inputs"]],
                outputs=[str(o) for o in d["outputs"]],
                decision=Decision.from_json(d.get("decision")),
                batch=int(d["batch"]),
                ops=[OpRecord.from_json(o) for o in d["ops"]],
                sensitivity=dict(d["sensitivity"]),
                calibration=dict(d["calibration"]),
                levels=[Level.from_json(x) for x in d["levels"]],
                default_level=int(d["default_level"]),
                selection=dict(d["selection"]),
                router=None if d.get("router") is None else Router.from_json(d["router"]),
                router_note=str(d.get("router_note", "")),
                files=dict(d.get("files", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def validate_manifest(data: Any, *, source: str) -> None:
    """Validate a manifest against ``apsq_ov/schemas/apsq.schema.json``.

    :raises PackageError: naming ``source`` and the first offending field.
    """
    import jsonschema  # only when loading a package

    schema = json.loads((resources.files("apsq_ov") / "schemas" / "apsq.schema.json").read_text())
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise PackageError(f"{source}: invalid manifest at {where}: {exc.message}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Package:
    """A loaded, verified package directory."""

    path: Path
    manifest: Manifest

    @property
    def model_xml(self) -> Path:
        return self.path / MODEL_XML

    @classmethod
    def load(cls, path: str | Path) -> Package:
        """Read and verify a package: files present, manifest valid, file hashes as recorded.

        :raises PackageError: naming the package file at fault.
        """
        root = Path(path)
        if not root.is_dir():
            raise PackageError(f"package {root} is not a directory (run apsq-ov calibrate first)")
        for name in (MANIFEST, MODEL_XML, MODEL_BIN):
            if not (root / name).is_file():
                raise PackageError(f"package {root} is missing {name}")
        try:
            data = json.loads((root / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PackageError(f"{root / MANIFEST}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:  # say "skew", not "invalid"
            raise PackageError(
                f"{root / MANIFEST}: schema_version {data.get('schema_version')!r}, this apsq-ov reads "
                f"{SCHEMA_VERSION}; re-run apsq-ov calibrate"
            )
        validate_manifest(data, source=str(root / MANIFEST))
        manifest = Manifest.from_json(data, source=str(root / MANIFEST))
        changed = [n for n in (MODEL_XML, MODEL_BIN) if sha256_file(root / n) != manifest.files[n]]
        if len(changed) == 2:
            raise PackageError(
                f"{root / MANIFEST}: does not belong to this model.xml/model.bin (both sha256 differ: "
                "a manifest from another package, or both files replaced)"
            )
        if changed:
            raise PackageError(f"{root / changed[0]}: sha256 differs from the manifest (file changed or truncated)")
        return cls(root, manifest)

    def read_model(self, core: ov.Core | None = None) -> ov.Model:
        """The adaptive IR as an :class:`openvino.Model`."""
        core = core or ov.Core()
        try:
            return core.read_model(self.model_xml)
        except RuntimeError as exc:
            raise PackageError(f"{self.model_xml}: OpenVINO cannot read it ({str(exc).splitlines()[0]})") from exc


def _remove_stale_temporaries(out: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` directories left by a calibration that was killed mid-write."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name[len(f".{out.name}.tmp-") :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_package(out_dir: str | Path, model: ov.Model, manifest: Manifest) -> Package:
    """Write ``model`` and ``manifest`` to ``out_dir`` atomically (temporary sibling, then rename).

    An existing ``out_dir`` is replaced only once the new package is complete.

    :raises PackageError: if the directory cannot be written.
    """
    out = Path(out_dir).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise PackageError(f"cannot write package to {out}: {exc.strerror or exc}") from exc
    try:
        model.set_rt_info(json.dumps(manifest.to_json(with_files=False)), RT_INFO_KEY)
        ov.save_model(model, tmp / MODEL_XML, compress_to_fp16=False)
        manifest.files = {name: sha256_file(tmp / name) for name in (MODEL_XML, MODEL_BIN)}
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise PackageError(f"cannot write package to {out}: {exc.strerror or exc}") from exc
        raise
    return Package(out, manifest)
