"""The wheel maps calibrate/ to apsq_ov.calibrate and ships the profiles and the embedded model;
the README's Python example runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORT_CHECK = """
import sys, apsq_ov, apsq_ov.calibrate
from apsq_ov.profiles import load_profile, shipped_profiles
assert apsq_ov.embedded_model().is_file(), apsq_ov.embedded_model()
assert shipped_profiles() == ['CPU', 'CPU.epyc-avx2', 'CPU.xeon-avx512fp16', 'GPU.core-ultra-arc',
                            'GPU.gen11', 'GPU.gen12-iris-xe'], shipped_profiles()
assert load_profile('CPU').device == 'CPU'
assert not {'nncf', 'typer', 'rich'} & set(sys.modules), 'import apsq_ov must stay lean'
print(apsq_ov.calibrate.__file__)
"""


def test_wheel_installs_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, ROOT], check=True)
    wheel = next(tmp_path.glob("apsq_ov-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = (
        "apsq_ov/calibrate/pipeline.py",
        "apsq_ov/device_profiles/CPU.json",
        "apsq_ov/device_profiles/CPU.xeon-avx512fp16.json",
        "apsq_ov/device_profiles/CPU.epyc-avx2.json",
        "apsq_ov/data/fmnist_resnet.xml",
        "apsq_ov/data/fmnist_resnet.bin",
        "apsq_ov/schemas/apsq.schema.json",
    )
    for required in shipped:
        assert required in names
    assert not any(n.startswith(("calibrate/", "tests/", "device_profiles/")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel], check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], env=env, cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert out.strip().startswith(str(target))


def test_editable_install_imports_from_the_checkout():
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=ROOT.parent, check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    assert Path(out.strip()).resolve() == ROOT / "calibrate" / "__init__.py"


def test_readme_python_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, ROOT / "examples" / "python_api.py", tmp_path / "pkg"], capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("image ") == 3
    assert "pinned route: ['fp32'," in proc.stdout
    assert (tmp_path / "pkg" / "apsq.json").is_file()
