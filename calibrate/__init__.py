"""Offline calibration (installed as ``apsq_ov.calibrate``): statistics, sensitivity, variants,
default policy → the package. Read in this order: :mod:`.pipeline` (the phases),
:mod:`.quantize` (NNCF's models), :mod:`.sensitivity` (scores), :mod:`.variants` (the adaptive IR),
:mod:`.selection` (the dial's levels), :mod:`.ondevice` (timing on this machine), :mod:`.router` (the cascade).
"""

from .pipeline import CalibrationConfig, calibrate, calibrate_model, read_model, sample_order
from .quantize import calibration_quantize_settings, package_quantize_settings, quantize_settings
from .sensitivity import SensitivityMetric

__all__ = [
    "CalibrationConfig",
    "SensitivityMetric",
    "calibrate",
    "calibrate_model",
    "calibration_quantize_settings",
    "package_quantize_settings",
    "quantize_settings",
    "read_model",
    "sample_order",
]
