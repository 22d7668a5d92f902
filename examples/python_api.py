"""apsq-ov inside an OpenVINO application: calibrate once, then route every request.

Run: ``python examples/python_api.py [PACKAGE_DIR]`` (needs ``dataset-fashion-mnist``).
The README's Python example is this file; ``tests/test_examples.py`` runs it.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

import apsq_ov
from apsq_ov.calibrate import CalibrationConfig, calibrate
from apsq_ov.datasets import load_fashion_mnist

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "fmnist.apsq"

# 1. Offline, once: calibration data as .npz keyed by the model's input name.
images, labels = load_fashion_mnist("train")
np.savez(out.parent / "calib.npz", images=images[:300], labels=labels[:300])
calibrate(apsq_ov.embedded_model(), out.parent / "calib.npz", out, CalibrationConfig(subset_size=300))

# 2. In the application: the same shape as OpenVINO's compile_model -> infer request -> infer.
compiled = apsq_ov.compile_model(out, "CPU")
request = compiled.create_infer_request()
test_images, test_labels = load_fashion_mnist("test")
for i in range(3):
    result = request.infer({"images": test_images[i : i + 1]}, max_drop=0.01)  # accuracy/speed dial per request
    label = int(np.argmax(result["logits"]))
    route = {op: p.value for op, p in result.route_precisions().items()}
    print(f"image {i}: predicted {label} (true {test_labels[i]}), route {sorted(set(route.values()))}")

# Pin one op to FP32 ("keep this layer precise"), everything else at INT8:
first_op = compiled.route_ops[0]
result = request.infer(test_images[:1], precision="int8", precision_map={first_op: "fp32"})
print("pinned route:", [p.value for p in result.route_precisions().values()])
