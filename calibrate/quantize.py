"""NNCF at calibration's boundary: the ``nncf.quantize`` settings for a device, NNCF's INT8 model and NNCF's
INT4 weight compression — the sources every INT8 and INT4 variant is cut from.

Where it sits in the data flow: phase 2 of :mod:`.pipeline` (before the adaptive IR is built). The same
settings are public (:func:`calibration_quantize_settings`, :func:`package_quantize_settings`) so baselines
meant to match apsq-ov's INT8 route quantize exactly as calibration did. NNCF is imported only here, and only
when a function runs (``import apsq_ov`` stays lean).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import openvino as ov

from apsq_ov.errors import CalibrationError, ConfigError
from apsq_ov.package import Manifest
from apsq_ov.profiler import host_int8_hardware
from apsq_ov.profiles import DeviceProfile, load_profile

from .ondevice import runs_here

if TYPE_CHECKING:
    from .pipeline import CalibrationConfig, Progress

ACTIVATION_RANGES = ("minmax", "histogram")
"""NNCF's activation range estimators calibration can use (``RangeEstimatorParametersSet.MINMAX`` — NNCF's
default — and ``.HISTOGRAM``). Which reads closer to FP32 depends on the model, measured on fresh data here
(all-INT8, NNCF's 300-sample subset, full bias correction): EfficientNet-Lite0 top-1 agreement 92.0% → 93.5%
with histogram ranges (2,000 crops, McNemar p = 0.003), PP-OCRv4 rec 1 − CER 96.4% → 95.5%, Fashion-MNIST
accuracy 91.83% → 91.85% (output NMSE 5x lower). The judged output's NMSE on 200 held-out inputs picked the
better one in every draw: hence ``auto``."""

OVERFLOW_FIXES = ("auto", "all", "first-layer", "none")
"""Which weights calibration quantizes to 7 bits against the saturation of pre-VNNI 8-bit dot products
(NNCF's ``OverflowFix``): ``auto`` — every layer's where the INT8 hardware can saturate, none elsewhere;
``all`` (``ENABLE``), ``first-layer`` (``FIRST_LAYER``, NNCF's default), ``none`` (``DISABLE``)."""
_NNCF_FIX = {"all": ("ENABLE", "7-bit weights in every layer"),
             "first-layer": ("FIRST_LAYER", "first-layer overflow fix"),
             "none": ("DISABLE", "no overflow fix")}  # fmt: skip
"""Per choice but ``auto``: NNCF's ``OverflowFix`` member and the words the quantizer's description uses."""


def check_overflow_fix(value: str) -> None:
    """:raises ConfigError: unless ``value`` is one of :data:`OVERFLOW_FIXES`."""
    if value not in OVERFLOW_FIXES:
        raise ConfigError(f"overflow fix must be one of {', '.join(repr(f) for f in OVERFLOW_FIXES)}, got {value!r}")

# INT8 hardware on which 8-bit dot products cannot saturate their intermediate buffer (OpenVINO's "Saturation
# (overflow) issue workaround": the problem does not occur on GPUs or on CPUs with VNNI and later).
NO_SATURATION = ("VNNI", "AMX", "DP4A", "XMX")


@dataclass(frozen=True)
class QuantizeSettings:
    """How calibration calls ``nncf.quantize``: its keyword arguments and a one-line description (the
    manifest's ``calibration.quantizer``)."""

    kwargs: dict[str, Any]
    description: str
    overflow_fix: str = "none"
    """the overflow fix applied (one of :data:`OVERFLOW_FIXES` but ``auto``, which resolves to another)"""


def quantize_settings(
    profile: DeviceProfile,
    bias_correction: str = "full",
    host_int8_hardware: str | None = None,
    activation_ranges: str = "minmax",
    overflow_fix: str = "auto",
) -> QuantizeSettings:
    """The ``nncf.quantize`` settings for ``profile``'s device.

    Where 8-bit dot products can saturate (a pre-VNNI CPU: the profile's INT8 hardware, or
    ``host_int8_hardware`` — this machine's CPU, when the package targets it), every layer's weights are
    quantized to 7 bits (``OverflowFix.ENABLE``: OpenVINO's documented workaround), not only the first
    layer's (NNCF's default). Measured on an AVX2-only EPYC (300 fresh crops, 300 calibration crops, full
    bias correction, histogram ranges): EfficientNet-Lite0 top-1 agreement with FP32 67.7% with the
    first-layer fix → 82.7% with every layer's (NNCF's defaults: 72.7%); Fashion-MNIST barely moves
    (10,000 test images: 99.28% → 99.36% agreement, accuracy 91.70% → 91.79%, FP32 91.80%; with min-max
    ranges 99.28–99.29% → 99.31–99.40% over two runs). Where the hardware cannot saturate (or the device
    is a GPU) the fix is off: 8-bit weights everywhere.
    ``full`` bias correction (``fast_bias_correction=False``) re-estimates each bias on the quantized
    model's own activations. Measured on EfficientNet-Lite0 (500 fresh crops, this machine): top-1
    agreement with FP32 83.0% (NNCF's defaults) → 91.6% (both), the same latency (1.00x).
    ``activation_ranges``: one of :data:`ACTIVATION_RANGES` (``auto`` is resolved by :func:`quantize`).
    ``overflow_fix``: one of :data:`OVERFLOW_FIXES` (``auto``: as above).
    """
    import nncf
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if activation_ranges not in ACTIVATION_RANGES:
        raise ConfigError(f"activation ranges must be {' or '.join(repr(r) for r in ACTIVATION_RANGES)} here, "
                          f"got {activation_ranges!r}")  # fmt: skip
    saturates = not profile.device.startswith("GPU") and (
        profile.int8_hardware not in NO_SATURATION
        or (host_int8_hardware is not None and host_int8_hardware not in NO_SATURATION)
    )
    kwargs: dict[str, Any] = {"fast_bias_correction": bias_correction == "fast"}
    advanced: dict[str, Any] = {}
    check_overflow_fix(overflow_fix)
    chosen = ("all" if saturates else "none") if overflow_fix == "auto" else overflow_fix
    member, words = _NNCF_FIX[chosen]
    advanced["overflow_fix"] = getattr(nncf.OverflowFix, member)
    if activation_ranges == "histogram":
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.HISTOGRAM
    kwargs["advanced_parameters"] = nncf.AdvancedQuantizationParameters(**advanced)
    hw = host_int8_hardware if saturates and host_int8_hardware is not None else profile.int8_hardware
    hw = "pre-VNNI" if hw.startswith("INT8 without VNNI") else hw  # the profile's "INT8 without VNNI (…)"
    fix = f"{words} ({hw} INT8)"
    return QuantizeSettings(
        kwargs,
        f"nncf.quantize (preset performance, {bias_correction} bias correction, {activation_ranges} activation "
        f"ranges, {fix})",
        chosen,
    )


def calibration_quantize_settings(
    config: CalibrationConfig | None = None, profile: DeviceProfile | None = None, activation_ranges: str | None = None
) -> QuantizeSettings:
    """The settings :func:`~.pipeline.calibrate` gives ``nncf.quantize`` for ``config`` (default: the defaults) and
    its device's profile: where the package targets this machine's CPU, the host's own INT8 hardware
    must not saturate either. What baselines meant to match apsq-ov's INT8 route should use — with the
    activation ranges a package's calibration chose (:func:`package_quantize_settings`).

    :param activation_ranges: overrides ``config.activation_ranges``, which must not be ``auto`` without it.
    """
    from .pipeline import CalibrationConfig  # (the config module imports this one)

    config = config or CalibrationConfig(activation_ranges="minmax")
    profile = profile or load_profile(config.device, config.profile)
    host = host_int8_hardware() if runs_here(config.device, profile) else None
    ranges = activation_ranges or config.activation_ranges
    if ranges == "auto":
        raise ConfigError("activation ranges 'auto' are chosen by calibration: pass the one it chose")
    return quantize_settings(profile, config.bias_correction, host, ranges, config.overflow_fix)


def package_quantize_settings(manifest: Manifest) -> QuantizeSettings:
    """The ``nncf.quantize`` settings ``manifest``'s package was calibrated with (its INT8 route is NNCF's
    model with these): the bias correction and activation ranges it records, its profile's device."""
    from .pipeline import CalibrationConfig

    cal = manifest.calibration
    # Packages calibrated before the option recorded it only in the description (where saturating INT8 then
    # got the first-layer fix).
    fix = cal.get("overflow_fix") or ("first-layer" if "first-layer overflow fix" in (cal.get("quantizer") or "")
                                      else "auto")  # fmt: skip
    config = CalibrationConfig(device=manifest.profile.device, bias_correction=cal.get("bias_correction", "full"),
                               activation_ranges=cal.get("activation_ranges", "minmax"), overflow_fix=fix)  # fmt: skip
    return calibration_quantize_settings(config, manifest.profile)


def nncf_quantize(model: ov.Model, data: list[list[np.ndarray]], progress: Progress | None,
                   settings: QuantizeSettings, phase: str = "nncf.quantize") -> ov.Model:  # fmt: skip
    import nncf  # heavy: imported only when calibrating

    nncf.set_log_level(logging.ERROR)
    if progress:
        progress(phase, 0, 1)
    try:
        q = nncf.quantize(model.clone(), nncf.Dataset(data), subset_size=len(data), **settings.kwargs)
    except Exception as exc:  # NNCF raises many types; translate them all at this boundary
        raise CalibrationError(f"nncf.quantize failed: {type(exc).__name__}: {exc}") from exc
    if progress:
        progress(phase, 1, 1)
    return q


RANGE_CHECK_SAMPLES = 256
"""Held-out samples (at most) on which ``activation_ranges="auto"`` compares the INT8 models."""


def quantize(
    model: ov.Model,
    calib: list[list[np.ndarray]],
    check: list[list[np.ndarray]],
    output: int,
    config: CalibrationConfig,
    profile: DeviceProfile,
    progress: Progress | None,
) -> tuple[ov.Model, QuantizeSettings, dict[str, Any]]:
    """NNCF's INT8 model, its settings and what the manifest records of the activation ranges. With
    ``auto``, one model per :data:`ACTIVATION_RANGES` entry, kept: the one whose judged output (``output``)
    has the lower mean NMSE against FP32's on ``check`` (the ground-truth split, held out from scoring; NNCF's
    subset includes it when the calibration data is small); ties keep NNCF's default (``minmax``)."""
    if config.activation_ranges != "auto":
        settings = calibration_quantize_settings(config, profile)
        q = nncf_quantize(model, calib, progress, settings)
        return q, settings, {"activation_ranges": config.activation_ranges}
    ref = outputs_f32(model, check, output)
    built: dict[str, tuple[ov.Model, QuantizeSettings]] = {}
    nmse: dict[str, float] = {}
    for ranges in ACTIVATION_RANGES:
        settings = calibration_quantize_settings(config, profile, activation_ranges=ranges)
        built[ranges] = nncf_quantize(model, calib, progress, settings, f"nncf.quantize ({ranges} ranges)"), settings
        got = outputs_f32(built[ranges][0], check, output)
        nmse[ranges] = float(np.mean([np.sum((g - r) ** 2) / max(float(np.sum(r**2)), 1e-30)
                                      for g, r in zip(got, ref, strict=True)]))  # fmt: skip
    chosen = min(ACTIVATION_RANGES, key=lambda k: nmse[k])  # the first of equals: NNCF's default
    return (*built[chosen], {"activation_ranges": chosen, "activation_ranges_nmse": nmse,
                             "activation_ranges_checked_on": len(check)})  # fmt: skip


def outputs_f32(model: ov.Model, data: list[list[np.ndarray]], output: int) -> list[np.ndarray]:
    """Output ``output`` of ``model`` (FP32 inference precision) for each item of ``data``."""
    req = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    return [req.infer(x)[output].astype(np.float64) for x in data]


def nncf_compress_int4(model: ov.Model, progress: Progress | None) -> ov.Model:
    """NNCF's INT4 weight-only compression (symmetric, per output channel) of every MatMul it takes:
    the source of the INT4 variants. NNCF never compresses convolutions to INT4."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    if progress:
        progress("nncf.compress_weights int4", 0, 1)
    try:
        q4 = nncf.compress_weights(
            model.clone(), mode=nncf.CompressWeightsMode.INT4_SYM, ratio=1.0, group_size=-1, all_layers=True
        )
    except Exception as exc:  # NNCF raises many types; translate them all at this boundary
        raise CalibrationError(f"nncf.compress_weights (int4) failed: {type(exc).__name__}: {exc}") from exc
    if progress:
        progress("nncf.compress_weights int4", 1, 1)
    return q4
