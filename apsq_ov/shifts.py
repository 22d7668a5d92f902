"""Named distribution shifts of image inputs, applied in the data's own value range.

Where it sits in the data flow: the evaluation protocol (DESIGN.md §5) measures every method on
clean *and* shifted test data (``apsq-ov bench --shift``), and calibration fits the router on milder
shifted copies of the calibration data (:data:`CALIBRATION`). Inputs are whatever the model takes
(already preprocessed), so each shift maps the input's value range ``[lo, hi]`` (the data set's
min/max) onto [0, 1], acts there as on an image, and maps back; the result is clipped to the range.
Spatial shifts (blur, pixelate) act on the last two axes (NCHW).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from apsq_ov.errors import DataError

Shift = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]
"""``shift(x01, rng, strength) -> y01`` on data scaled to [0, 1]."""


def _blur(x: np.ndarray, _rng: np.random.Generator, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    if x.ndim < 3:
        return x
    return gaussian_filter(x, sigma=[0.0] * (x.ndim - 2) + [sigma, sigma], mode="nearest")


def _pixelate(x: np.ndarray, _rng: np.random.Generator, block: float) -> np.ndarray:
    b = int(block)
    if x.ndim < 3 or b < 2:
        return x
    h, w = x.shape[-2:]
    hb, wb = -(-h // b), -(-w // b)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, hb * b - h), (0, wb * b - w)]
    xp = np.pad(x, pad, mode="edge")
    blocks = xp.reshape(*x.shape[:-2], hb, b, wb, b).mean(axis=(-3, -1))
    return np.repeat(np.repeat(blocks, b, axis=-2), b, axis=-1)[..., :h, :w]


def _salt_pepper(x: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    mask = rng.random(x.shape[-2:]) < fraction
    value = (rng.random(x.shape[-2:]) < 0.5).astype(x.dtype)
    return np.where(mask, value, x)


SHIFTS: dict[str, tuple[Shift, float, str]] = {
    "brightness": (lambda x, r, s: x + s, 0.3, "+0.3 of the range"),
    "dark": (lambda x, r, s: x * s, 0.3, "×0.3 towards the minimum"),
    "contrast": (lambda x, r, s: 0.5 + (x - 0.5) * s, 2.0, "×2 about the middle"),
    "low_contrast": (lambda x, r, s: 0.5 + (x - 0.5) * s, 0.4, "×0.4 about the middle"),
    "noise": (lambda x, r, s: x + r.normal(0.0, s, x.shape), 0.2, "gaussian, σ 0.2 of the range"),
    "blur": (_blur, 1.5, "gaussian blur, σ 1.5 px"),
    "pixelate": (_pixelate, 4.0, "4×4 block means"),
    "salt_pepper": (_salt_pepper, 0.05, "5% of pixels to the minimum or maximum"),
}
"""name → (function, default strength, description) of the evaluation shifts."""

CALIBRATION: dict[str, float] = {"noise": 0.1, "dark": 0.5, "contrast": 1.5, "blur": 1.0}
"""The shifts (and their milder strengths) the router is fitted on by default: evaluation shifts of
these kinds are *seen* by calibration, the others never are."""


def _lookup(name: str) -> tuple[Shift, float, str]:
    if name not in SHIFTS:
        raise DataError(f"unknown shift {name!r}; use one of clean, {', '.join(SHIFTS)}")
    return SHIFTS[name]


def apply(
    x: np.ndarray, name: str, lo: float, hi: float, *, seed: int = 0, strength: float | None = None
) -> np.ndarray:
    """``x`` under shift ``name`` (``clean``: unchanged) in the value range ``[lo, hi]``.

    :raises DataError: for an unknown shift name.
    """
    if name == "clean":
        return x
    fn, default, _ = _lookup(name)
    span = max(hi - lo, 1e-12)
    x01 = (np.asarray(x, np.float64) - lo) / span
    y01 = fn(x01, np.random.default_rng(seed), default if strength is None else strength)
    return (np.clip(y01, 0.0, 1.0) * span + lo).astype(x.dtype)
