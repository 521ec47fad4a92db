"""The Triton kernels load the same way from a source checkout, an editable install and a wheel.

``kernels/`` sits at the repository root and is installed as ``drllm.kernels``;
a checkout on ``PYTHONPATH`` has no ``drllm/kernels`` folder, so the loader
must find the kernels beside it. Each case runs in a fresh interpreter with the
editable install's import hook removed (except the editable case itself), and
checks where the kernels came from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")

PROBE = """
import sys
if {strip}:  # forget the editable install: only sys.path decides
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
import drllm.ops as ops
from drllm import kernels
assert ops._kernels is kernels, (ops._kernels, kernels)
assert kernels.HAS_TRITON and ops.backend("cpu")["triton"], ops.backend("cpu")
print(kernels.__file__)
"""


def _kernels_file(pythonpath: Path | None, strip: bool) -> Path:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DRLLM_OPS_BACKEND")}
    env["DRLLM_NO_EXT"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(strip=strip)], capture_output=True, text=True, env=env, cwd="/", timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1]).resolve()


def test_editable_install():
    assert _kernels_file(None, strip=False) == ROOT / "kernels" / "__init__.py"


def test_source_checkout(tmp_path):
    for name in ("drllm", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert not (tmp_path / "drllm" / "kernels").exists()
    assert _kernels_file(tmp_path, strip=True) == tmp_path / "kernels" / "__init__.py"


def test_wheel(tmp_path):
    env = dict(os.environ, DRLLM_NO_EXT="1")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("drllm-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert _kernels_file(site, strip=True) == site / "drllm" / "kernels" / "__init__.py"
