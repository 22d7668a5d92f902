"""The evaluation shifts: in range, deterministic, and each one really changes the data."""

from __future__ import annotations

import numpy as np
import pytest

from apsq_ov.errors import DataError
from apsq_ov.shifts import CALIBRATION, SHIFTS, apply
from tests.models import conv_chain_data


@pytest.mark.parametrize("name", list(SHIFTS))
def test_each_shift_stays_in_range_is_seeded_and_changes_the_data(name):
    x = conv_chain_data(3, size=16) * 2.0 - 1.0  # a [-1, 1] input, as PP-OCR / EfficientNet take
    y = apply(x, name, -1.0, 1.0, seed=3)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert np.mean(np.abs(y - x)) > 0.01, name
    np.testing.assert_array_equal(y, apply(x, name, -1.0, 1.0, seed=3))


def test_calibration_shifts_are_milder_kinds_of_evaluation_shifts_and_unknown_names_fail():
    x = conv_chain_data(2)
    for name, strength in CALIBRATION.items():
        mild = np.mean(np.abs(apply(x, name, 0.0, 1.0, strength=strength) - x))
        full = np.mean(np.abs(apply(x, name, 0.0, 1.0) - x))
        assert 0 < mild < full, name
    assert apply(x, "clean", 0.0, 1.0) is x
    with pytest.raises(DataError, match="unknown shift 'fog'"):
        apply(x, "fog", 0.0, 1.0)
