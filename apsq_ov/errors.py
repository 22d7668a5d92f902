"""The one error tree of apsq-ov. The CLI catches :class:`ApsqError`, prints one line, exits 1."""

from __future__ import annotations


class ApsqError(Exception):
    """Base of every user-facing apsq-ov error."""


class ConfigError(ApsqError, ValueError):
    """A bad option value (precision name, max_drop outside [0, 1], unknown op in a precision map)."""


class UnsupportedPrecisionError(ConfigError):
    """A precision the package or the device does not offer."""


class DataError(ApsqError, ValueError):
    """Input or calibration data that does not match the model (keys, shapes, dtypes, NaN/Inf, empty)."""


class ModelError(ApsqError):
    """A model file that is missing, unreadable, or has nothing apsq-ov can route."""


class ProfileError(ApsqError):
    """A device profile that is missing or malformed."""


class PackageError(ApsqError):
    """A package directory that is missing files, corrupt, or of another schema_version."""


class CalibrationError(ApsqError):
    """A failure while calibrating (NNCF or OpenVINO refused the model)."""


class DeviceError(ApsqError):
    """A device OpenVINO does not see here, or that refused to compile the model."""
