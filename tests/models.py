"""Tiny OpenVINO models built in code for unit tests (opset13), and their calibration data.

Weights are seeded random: these models test graph structure and routing mechanics only; every
quality claim is made on the real models (the bundled Fashion-MNIST ResNet, PP-OCRv4).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
from openvino import opset13 as ops

CPU_CAPS = tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
"""What this machine's CPU plugin exposes (``BF16``, ``FP16``, ``INT8`` …, in the plugin's order): the tests
whose expectations depend on the hardware (an AVX2-only EPYC has no BF16) read it here."""


def conv_chain(channels: int = 8, size: int = 16, seed: int = 0, outlier: float = 1.0) -> ov.Model:
    """input -> conv1(+bias) -> relu -> conv2 -> relu -> global mean -> fc: three routable ops.

    :param outlier: scale conv1's output channel 0 by this and conv2's weights on that channel by its
        inverse: the FP32 function is unchanged, but conv2's input gets an outlier channel that
        dominates a per-tensor INT8 range (a quantization-hostile op).
    """
    rng = np.random.default_rng(seed)
    x = ops.parameter([-1, 3, size, size], np.float32, name="x")
    x.output(0).get_tensor().set_names({"x"})
    w1_data = (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32)
    b1_data = rng.standard_normal((1, channels, 1, 1)).astype(np.float32) * 0.1
    w1_data[0] *= outlier
    b1_data[0, 0] *= outlier
    c1 = ops.convolution(x, ops.constant(w1_data), [1, 1], [1, 1], [1, 1], [1, 1])
    c1.set_friendly_name("conv1")
    b1 = ops.add(c1, ops.constant(b1_data))
    b1.set_friendly_name("conv1/bias")
    r1 = ops.relu(b1)
    w2_data = (rng.standard_normal((channels, channels, 3, 3)) * 0.2).astype(np.float32)
    w2_data[:, 0] /= outlier
    w2 = ops.constant(w2_data)
    c2 = ops.convolution(r1, w2, [1, 1], [1, 1], [1, 1], [1, 1])
    c2.set_friendly_name("conv2")
    r2 = ops.relu(c2)
    pooled = ops.reduce_mean(r2, ops.constant(np.array([2, 3], np.int64)), False)
    fw = ops.constant(rng.standard_normal((4, channels)).astype(np.float32))
    fc = ops.matmul(pooled, fw, False, True)
    fc.set_friendly_name("fc")
    fc.output(0).get_tensor().set_names({"logits"})
    return ov.Model([fc.output(0)], [x], "conv_chain")


def conv_chain_data(n: int = 32, size: int = 16, seed: int = 1) -> np.ndarray:
    """In-range calibration inputs for :func:`conv_chain` (uniform in [0, 1])."""
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, 3, size, size)).astype(np.float32)


def save(model: ov.Model, path) -> str:
    ov.save_model(model, str(path), compress_to_fp16=False)
    return str(path)


def _stem(size: int, rng: np.random.Generator) -> tuple[ov.Node, ov.Node]:
    """The input ``x`` ``(N, 3, size, size)`` and ``conv1`` (8 channels, 3x3, no bias) on it."""
    x = ops.parameter([-1, 3, size, size], np.float32, name="x")
    x.output(0).get_tensor().set_names({"x"})
    w1 = ops.constant((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32))
    c1 = ops.convolution(x, w1, [1, 1], [1, 1], [1, 1], [1, 1])
    c1.set_friendly_name("conv1")
    return x, c1


def conv_map(size: int = 16, seed: int = 0, logit: bool = False) -> ov.Model:
    """input -> conv1(+bias) -> relu -> conv2 (one output channel, bias centring it) -> sigmoid: an
    ``(N, 1, H, W)`` probability map (a segmentation / text-detection head), or with ``logit`` a single
    logit per input, ``(N, 1)`` (a binary classifier: global mean of conv2's map)."""
    rng = np.random.default_rng(seed)
    x, c1 = _stem(size, rng)
    b1 = ops.add(c1, ops.constant((rng.standard_normal((1, 8, 1, 1)) * 0.1).astype(np.float32)))
    b1.set_friendly_name("conv1/bias")
    w2 = ops.constant((rng.standard_normal((1, 8, 3, 3)) * 0.2).astype(np.float32))
    c2 = ops.convolution(ops.relu(b1), w2, [1, 1], [1, 1], [1, 1], [1, 1])
    c2.set_friendly_name("conv2")
    z = ops.reduce_mean(c2, ops.constant(np.array([2, 3], np.int64)), False) if logit else c2  # (N, 1) / map
    probe = ov.Core().compile_model(ov.Model([z.output(0)], [x]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    centre = -float(np.median(probe(conv_chain_data(64, size))[0]))  # half the decisions on each side
    z = ops.add(z, ops.constant(np.float32(centre)))
    if logit:
        z.output(0).get_tensor().set_names({"logit"})
        return ov.Model([z.output(0)], [x], "conv_logit")
    p = ops.sigmoid(z)
    p.output(0).get_tensor().set_names({"prob"})
    return ov.Model([p.output(0)], [x], "conv_map")


def two_heads(size: int = 16, seed: int = 0) -> ov.Model:
    """A detector-like model with two outputs: ``boxes`` ``(N, 4)`` first — a regression whose argmax is
    coordinate 0 whatever the precision (a large offset on it) — then ``scores`` ``(N, 5)``, near-tied
    class logits (centred on calibration data) whose top-1 INT8 flips on some inputs."""
    rng = np.random.default_rng(seed)
    x, c1 = _stem(size, rng)
    w2 = ops.constant((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32))
    c2 = ops.convolution(ops.relu(c1), w2, [1, 1], [1, 1], [1, 1], [1, 1])
    c2.set_friendly_name("conv2")
    pooled = ops.reduce_mean(ops.relu(c2), ops.constant(np.array([2, 3], np.int64)), False)
    box = ops.matmul(pooled, ops.constant(rng.standard_normal((4, 8)).astype(np.float32)), False, True)
    box.set_friendly_name("box_head")
    boxes = ops.add(box, ops.constant(np.array([[100.0, 0.0, 0.0, 0.0]], np.float32)))
    boxes.output(0).get_tensor().set_names({"boxes"})
    cls = ops.matmul(pooled, ops.constant(rng.standard_normal((5, 8)).astype(np.float32)), False, True)
    cls.set_friendly_name("class_head")
    probe = ov.Core().compile_model(ov.Model([cls.output(0)], [x]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    centre = -probe(conv_chain_data(64, size))[0].mean(axis=0, keepdims=True).astype(np.float32)
    scores = ops.add(cls, ops.constant(centre))
    scores.output(0).get_tensor().set_names({"scores"})
    return ov.Model([boxes.output(0), scores.output(0)], [x], "two_heads")
