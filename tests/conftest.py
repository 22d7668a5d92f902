from __future__ import annotations

import numpy as np
import pytest

from apsq_ov.calibrate import CalibrationConfig, calibrate
from tests.models import conv_chain, conv_chain_data, save


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """A tiny conv model on disk, its calibration data, and a calibrated package."""
    root = tmp_path_factory.mktemp("tiny")
    model = save(conv_chain(), root / "tiny.xml")
    data = root / "calib.npz"
    np.savez(data, x=conv_chain_data())
    # The shipped EPYC profile, whichever CPU runs the tests: its defaults build fp32, bf16 and int8 variants
    # (the tests exercise all three) and its costs fix which levels selection builds.
    config = CalibrationConfig(subset_size=32, drop_samples=16, sensitivity_samples=8, profile="CPU")
    pkg = calibrate(model, data, root / "pkg", config)
    return {"root": root, "model": model, "data": data, "package": pkg}
