"""How good is the score once the ground truth is reliable? EfficientNet-Lite0 on many fresh crops.

The 400 held-out crops of ``benchmarks/sensitivity.py`` give a top-1 ground truth whose own
split-half Spearman is ~0.5, which caps any score's ρ. This script takes a package calibrated by
that benchmark and measures each INT8 op's isolated top-1 disagreement with FP32 on ``N`` fresh
crops (another seed, never seen by calibration), through ``AdaptiveAsyncInferQueue`` and
``precision_map`` pins. Writes ``benchmarks/results/sensitivity_fresh.json``.

Run: ``python benchmarks/sensitivity_fresh.py PACKAGE [--crops 2000]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_models import photo_crops  # noqa: E402

import apsq_ov  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--crops", type=int, default=2000)
    args = parser.parse_args()
    pkg = apsq_ov.Package.load(args.package)
    x = photo_crops(args.crops, seed=123)
    compiled = apsq_ov.compile_model(pkg.path, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})

    def top1(pin: dict[str, str] | None) -> np.ndarray:
        out: dict[int, int] = {}
        queue = apsq_ov.AdaptiveAsyncInferQueue(compiled, 0)
        queue.set_callback(lambda request, i: out.__setitem__(i, int(np.argmax(request.get_result()[0]))))
        for i in range(len(x)):
            queue.start_async(x[i : i + 1], i, precision="fp32", precision_map=pin)
        queue.wait_all()
        return np.array([out[i] for i in range(len(x))])

    t0 = time.perf_counter()
    ref = top1(None)
    rows = []
    for op in pkg.manifest.ops:
        if apsq_ov.Precision.INT8 in op.variants:
            d = top1({op.name: "int8"}) != ref
            score = op.sensitivity["predicted"]["int8"]
            rows.append((score, d.mean(), d[::2].mean(), d[1::2].mean(), op.drops[apsq_ov.Precision.INT8]))
    a = np.array(rows)
    result = {
        "package": str(args.package),
        "crops": args.crops,
        "int8_ops": len(rows),
        "seconds": time.perf_counter() - t0,
        "rho_score_vs_fresh_top1_drop": float(spearmanr(a[:, 0], a[:, 1]).statistic),
        "split_half_rho_of_fresh_ground_truth": float(spearmanr(a[:, 2], a[:, 3]).statistic),
        "rho_fresh_vs_package_held_out_drop": float(spearmanr(a[:, 1], a[:, 4]).statistic),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sensitivity_fresh.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
