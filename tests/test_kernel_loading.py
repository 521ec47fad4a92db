"""The Triton kernels are the installed package ``drllm.kernels``, never a file loaded by path.

``kernels/`` sits at the repository root and setup.py installs it as
``drllm.kernels`` (editable install or wheel). A checkout on ``PYTHONPATH``
without an install has no ``drllm.kernels``: the ops must not reach for the
``kernels/`` folder beside it, but give one warning and use the reference; so
must a broken ``drllm.kernels``. Each case runs in a fresh interpreter with the
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
import sys, warnings
if {strip}:  # forget the editable install: only sys.path decides
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import drllm.ops as ops
    from drllm.ops import backends
    h = torch.randn(2, 5, 8); m = torch.ones(2, 5, dtype=torch.long); m[1, :2] = 0
    params = (torch.randn(128, 8), torch.zeros(128), torch.randn(3, 128), torch.zeros(3))
    out = ops.pooled_router_logits(h, m, 8, *params)
    assert torch.equal(out, ops.pooled_router_logits_reference(h, m, 8, *params))
messages = [str(w.message) for w in caught if "drllm.kernels" in str(w.message)]
if backends.kernels is None:  # one warning, the reference everywhere, nothing loaded by path
    assert len(messages) == 1, messages
    assert "drllm.kernels" not in sys.modules, sys.modules["drllm.kernels"]
    assert ops.backend("cuda")["pooling"] == "reference" and ops.backend("cpu")["triton"] is None
    print(messages[0])
    print("reference")
else:
    from drllm import kernels
    assert backends.kernels is kernels, (backends.kernels, kernels)
    assert kernels.HAS_TRITON and ops.backend("cpu")["triton"], ops.backend("cpu")
    assert not messages, messages
    print(kernels.__file__)
"""


def _probe(pythonpath: Path | None, strip: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DRLLM_OPS_BACKEND")}
    env["DRLLM_NO_EXT"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(strip=strip)], capture_output=True, text=True, env=env, cwd="/", timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()


def _kernels_file(pythonpath: Path | None, strip: bool) -> Path:
    return Path(_probe(pythonpath, strip)[-1]).resolve()


def _checkout(tmp_path: Path) -> Path:
    for name in ("drllm", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert not (tmp_path / "drllm" / "kernels").exists()
    return tmp_path


def test_editable_install():
    assert _kernels_file(None, strip=False) == ROOT / "kernels" / "__init__.py"


def test_source_checkout_without_install_uses_the_reference(tmp_path):
    """``kernels/`` beside the checkout is not loaded by path: one warning, the reference works."""
    *_, message, result = _probe(_checkout(tmp_path), strip=True)
    assert result == "reference"
    assert "ModuleNotFoundError" in message and "drllm.kernels" in message


def test_broken_kernels_use_the_reference(tmp_path):
    """A ``drllm.kernels`` that fails to import: one warning with the error, the reference works."""
    checkout = _checkout(tmp_path)
    (checkout / "drllm" / "kernels").mkdir()
    (checkout / "drllm" / "kernels" / "__init__.py").write_text("raise RuntimeError('a broken kernels package')\n")
    *_, message, result = _probe(checkout, strip=True)
    assert result == "reference"
    assert "a broken kernels package" in message


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
    assert (site / "drllm" / "ops" / "__init__.py").is_file()  # the ops package ships in the wheel
    assert _kernels_file(site, strip=True) == site / "drllm" / "kernels" / "__init__.py"
