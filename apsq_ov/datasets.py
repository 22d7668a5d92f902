"""Real data that installs offline (see DATA.md): Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package, and the shifts the evaluation protocol applies to it.

Where it sits in the data flow: feeds ``apsq-ov demo``, the examples, tests and benchmarks; the
calibrate/infer contract itself only sees ``.npz``/``.npy`` files.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from apsq_ov.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(
            f"cannot read {path}: {exc}; install it with `apt-get install -y dataset-fashion-mnist`"
        ) from exc
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "test", root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split as float32 images in [0, 1] shaped (N, 1, 28, 28) and int64 labels.

    :param split: ``"train"`` (60k) or ``"test"`` (10k).
    :param root: folder holding the gzipped IDX files.
    :return: ``(images, labels)``.
    :raises DataError: if the files are missing or unreadable.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return (images[:, None].astype(np.float32) / 255.0), labels.astype(np.int64)


def shift(images: np.ndarray, name: str, *, seed: int = 0) -> np.ndarray:
    """Apply a named distribution shift to images in [0, 1] (calibrate on clean data only).

    :param name: ``clean``, ``noise`` (gaussian σ 0.2), ``dark`` (×0.3) or ``contrast`` (×2 about 0.5).
    :return: shifted float32 images, clipped to [0, 1].
    :raises DataError: for an unknown shift name.
    """
    if name == "clean":
        return images
    if name == "noise":
        out = images + np.random.default_rng(seed).normal(0.0, 0.2, images.shape).astype(np.float32)
    elif name == "dark":
        out = images * 0.3
    elif name == "contrast":
        out = (images - 0.5) * 2.0 + 0.5
    else:
        raise DataError(f"unknown shift {name!r}; use one of clean, noise, dark, contrast")
    return np.clip(out, 0.0, 1.0).astype(np.float32)
