"""Soak benchmark: a long AsyncInferQueue run with a random max_drop per request.

Reports throughput (overall and per tenth of the run) and resident memory growth after warm-up,
beside plain OpenVINO FP32 async throughput measured in the same process. Writes
``benchmarks/results/soak.json`` and ``soak.md``.

Run: ``python benchmarks/soak.py [--requests 200000] [--jobs 0]`` (needs ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
import psutil
from rich.console import Console
from rich.table import Table

import apsq_ov
from apsq_ov.bench import THROUGHPUT, plain_rate
from apsq_ov.calibrate import CalibrationConfig, calibrate
from apsq_ov.datasets import load_fashion_mnist

RESULTS = Path(__file__).resolve().parent / "results"
MAX_DROPS = (0.0, 0.005, 0.01, 0.02, 0.05, 1.0)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def plain_throughput(x: np.ndarray, seconds: float) -> float:
    """Plain OpenVINO FP32 through its own ``AsyncInferQueue``, fed and read as the adaptive queue is
    (:func:`apsq_ov.bench.plain_rate`: each input copied into the idle request, every output read)."""
    core = ov.Core()
    model = core.read_model(apsq_ov.embedded_model())
    model.reshape([1, 1, 28, 28])
    return plain_rate(core.compile_model(model, "CPU", THROUGHPUT), x, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--jobs", type=int, default=0,
                        help="requests in flight; 0: twice OpenVINO's optimal number, as the plain baseline")
    args = parser.parse_args()
    console = Console()

    x_train, _ = load_fashion_mnist("train")
    x_test, _ = load_fashion_mnist("test")
    work = Path(tempfile.mkdtemp())
    np.savez(work / "calib.npz", images=x_train[:1000])
    with console.status("calibrating the embedded model"):
        pkg = calibrate(apsq_ov.embedded_model(), work / "calib.npz", work / "pkg", CalibrationConfig())
    compiled = apsq_ov.compile_model(pkg.path, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    queue = apsq_ov.AdaptiveAsyncInferQueue(compiled, args.jobs)
    done = np.zeros(args.requests, dtype=bool)

    def callback(request, n):
        request.get_result()
        done[n] = True

    queue.set_callback(callback)
    rng = np.random.default_rng(0)
    budgets = rng.choice(MAX_DROPS, size=args.requests)
    windows, rss = [], []
    tenth = max(args.requests // 10, 1)
    t_start = t_window = time.perf_counter()
    with console.status("soaking") as status:
        for n in range(args.requests):
            i = n % len(x_test)
            queue.start_async(x_test[i : i + 1], n, max_drop=float(budgets[n]))
            if (n + 1) % tenth == 0:
                queue.wait_all()
                now = time.perf_counter()
                windows.append(tenth / (now - t_window))
                rss.append(rss_mb())
                t_window = now
                status.update(f"soaking: {n + 1}/{args.requests}, {windows[-1]:.0f} req/s, RSS {rss[-1]:.1f} MiB")
    queue.wait_all()
    total = time.perf_counter() - t_start
    assert done.all(), "some callbacks never ran"
    baseline = plain_throughput(x_test, total / 4)
    growth = (rss[-1] - rss[0]) / rss[0] * 100.0  # from the end of the first tenth (warm) to the end
    result = {
        "requests": args.requests,
        "jobs": len(queue),
        "max_drops": list(MAX_DROPS),
        "throughput_rps": args.requests / total,
        "throughput_per_tenth_rps": windows,
        "plain_openvino_fp32_async_rps": baseline,
        "ratio_vs_plain_fp32": args.requests / total / baseline,
        "rss_mb_per_tenth": rss,
        "rss_growth_pct_after_warmup": growth,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1))
    rows = [
        ("requests (random max_drop each)", f"{args.requests}"),
        ("jobs", f"{len(queue)}"),
        ("adaptive throughput", f"{result['throughput_rps']:.0f} req/s"),
        ("plain OpenVINO FP32 async, fed the same way (same run)", f"{baseline:.0f} req/s"),
        ("ratio", f"{result['ratio_vs_plain_fp32']:.2f}x"),
        ("throughput, first / last tenth", f"{windows[0]:.0f} / {windows[-1]:.0f} req/s"),
        ("RSS after first tenth / at end", f"{rss[0]:.1f} / {rss[-1]:.1f} MiB"),
        ("RSS growth after warm-up", f"{growth:+.2f} %"),
    ]
    (RESULTS / "soak.md").write_text("| soak | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows))
    table = Table(title="apsq-ov soak (Fashion-MNIST ResNet, AdaptiveAsyncInferQueue)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


if __name__ == "__main__":
    main()
