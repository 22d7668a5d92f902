"""Offline calibration (installed as ``apsq_ov.calibrate``)."""
