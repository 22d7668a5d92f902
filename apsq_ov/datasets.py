"""Real data that installs offline (see DATA.md): Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package, and the shifts the evaluation protocol applies to it.

Where it sits in the data flow: feeds ``apsq-ov demo``, the examples, tests and benchmarks; the
calibrate/infer contract itself only sees ``.npz``/``.npy`` files.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    """Apply a named distribution shift (:mod:`apsq_ov.shifts`) to images in [0, 1].

    :param name: ``clean``, ``noise`` (gaussian σ 0.2), ``dark`` (×0.3), ``contrast`` (×2 about 0.5), or
        any other name in :data:`apsq_ov.shifts.SHIFTS`.
    :return: shifted float32 images, clipped to [0, 1].
    :raises DataError: for an unknown shift name.
    """
    from apsq_ov.shifts import apply

    return apply(images, name, 0.0, 1.0, seed=seed)


def english_sentences() -> list[str]:
    """Real English sentences from the dataset descriptions scikit-learn ships (``datasets/descr/*.rst``)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("scikit-learn is not installed; it ships the English text the OCR lines are rendered from")
    descr = Path(spec.origin).parent / "datasets" / "descr"
    text = " ".join(p.read_text(errors="ignore") for p in sorted(descr.glob("*.rst")))
    text = re.sub(r"[`*_|:=\-\[\]<>#~^\\]+", " ", text)
    words = [w for w in text.split() if w.isascii() and w.isprintable()]
    return [" ".join(words[i : i + 6]) for i in range(0, len(words) - 6, 6)]


def render_text_lines(n: int, *, width: int = 320, height: int = 48, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Render ``n`` real English text lines with matplotlib's DejaVu fonts (Pillow), PP-OCR style.

    :return: float32 ``(n, 3, height, width)`` preprocessed as PP-OCRv4 rec wants ((x/255 − 0.5)/0.5,
        BGR; grey text so channel order is moot) and the exact texts.
    """
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    fonts = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    faces = [fonts / f for f in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")]
    rng = np.random.default_rng(seed)
    sentences = english_sentences()
    images, texts = [], []
    for _ in range(n):
        text = sentences[int(rng.integers(len(sentences)))]
        font = ImageFont.truetype(str(faces[int(rng.integers(len(faces)))]), size=int(rng.integers(22, 30)))
        while font.getlength(text) > width - 8 and " " in text:
            text = text.rsplit(" ", 1)[0]
        img = Image.new("L", (width, height), 255)
        ImageDraw.Draw(img).text((4, height // 2), text, fill=int(rng.integers(0, 60)), font=font, anchor="lm")
        x = (np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5
        images.append(np.repeat(x[None], 3, axis=0))
        texts.append(text)
    return np.stack(images).astype(np.float32), texts


def cer(pred: Sequence[Any], truth: Sequence[Any]) -> float:
    """Character error rate: Levenshtein distance / len(truth) (strings, or sequences of class indices)."""
    prev = list(range(len(truth) + 1))
    for i, a in enumerate(pred, start=1):
        cur = [i]
        for j, b in enumerate(truth, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return prev[-1] / max(len(truth), 1)


def ctc_greedy_decode(probs: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC decode of one ``(T, C)`` PP-OCR output: index 0 is blank, the last index a space."""
    return ctc_decode_indices(probs.argmax(-1), charset)


def ctc_decode_indices(idx: np.ndarray, charset: list[str]) -> str:
    """CTC decode of the ``(T,)`` top-1 class indices of a PP-OCR output (see :func:`ctc_greedy_decode`)."""
    return "".join(charset[i - 1] if i - 1 < len(charset) else " " for i in ctc_collapse(idx))


def ctc_collapse(idx: np.ndarray) -> list[int]:
    """Greedy CTC path → label indices: repeats merged, then the blank (class 0) dropped."""
    out, prev = [], 0
    for i in np.asarray(idx).tolist():
        if i != prev and i != 0:
            out.append(i)
        prev = i
    return out


def ctc_error_rate(outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """Mean character error rate of the greedy CTC decodes of ``(batch, T, classes)`` outputs against
    ``(batch, L)`` label indices (−1 = padding; see :func:`ctc_labels`)."""
    errors = [
        cer(ctc_collapse(path), truth[truth >= 0].tolist())
        for o, lab in zip(outputs, labels, strict=True)
        for path, truth in zip(np.asarray(o).argmax(-1), np.asarray(lab), strict=True)
    ]
    return float(np.mean(errors))


def ctc_labels(texts: Sequence[str], charset: list[str]) -> np.ndarray:
    """Texts as PP-OCR class indices (``charset[k]`` is class ``k + 1``, a space the last class), ``(n, L)``
    padded with −1: the ``labels`` array of a calibration ``.npz`` for a CTC sequence output."""
    index = {c: k + 1 for k, c in enumerate(charset)}
    rows = []
    for t in texts:
        missing = sorted({c for c in t if c != " " and c not in index})
        if missing:
            raise DataError(f"text {t!r}: characters {missing} are not in the model's charset")
        rows.append([len(charset) + 1 if c == " " else index[c] for c in t])
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, np.int64)
    for k, r in enumerate(rows):
        out[k, : len(r)] = r
    return out
