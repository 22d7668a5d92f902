"""Shipped device Precision Profiles (one JSON per OpenVINO device name), read by
:mod:`apsq_ov.profiles`. Installed as ``apsq_ov.device_profiles``."""
