"""apsq-ov: adaptive precision scaling for CNN inference on OpenVINO.

Data flow: ``apsq_ov.calibrate`` (offline: sensitivity, variants, default policy) → a package
(adaptive IR + ``apsq.json``) → :func:`compile_model` → :class:`AdaptiveCompiledModel` →
:meth:`~AdaptiveCompiledModel.create_infer_request` → :meth:`AdaptiveInferRequest.infer` with
``max_drop=`` / ``precision=`` / ``precision_map=``. ``import apsq_ov`` stays lean: NNCF, typer and
rich load only when calibrating or using the CLI.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from apsq_ov.async_queue import AdaptiveAsyncInferQueue, EscalatedInput
from apsq_ov.errors import (
    ApsqError,
    CalibrationError,
    ConfigError,
    DataError,
    DeviceError,
    ModelError,
    PackageError,
    ProfileError,
    UnsupportedPrecisionError,
)
from apsq_ov.package import Package
from apsq_ov.precision import Precision
from apsq_ov.profiles import DeviceProfile, load_profile
from apsq_ov.runtime import AdaptiveCompiledModel, AdaptiveInferRequest, AdaptiveResult, compile_model

__version__ = "0.1.0"


def embedded_model() -> Path:
    """The bundled Fashion-MNIST ResNet IR (``examples/train_fashion_mnist.py`` trained it)."""
    return Path(str(resources.files("apsq_ov") / "data" / "fmnist_resnet.xml"))


__all__ = [
    "AdaptiveAsyncInferQueue",
    "AdaptiveCompiledModel",
    "AdaptiveInferRequest",
    "AdaptiveResult",
    "ApsqError",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "DeviceProfile",
    "EscalatedInput",
    "ModelError",
    "Package",
    "PackageError",
    "Precision",
    "ProfileError",
    "UnsupportedPrecisionError",
    "compile_model",
    "embedded_model",
    "load_profile",
]
