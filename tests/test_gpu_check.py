"""``benchmarks/gpu_check.sh`` on a machine without a GPU: it says what it would run, skips every step with the reason, exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_reports_every_step_skipped(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # no GPU, even on a GPU machine
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("drllm GPU check: will run build") and "expected about" in first and "H100/H200" in first
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["device"] is None
    assert list(report["steps"]) == ["build", "tests", "ops", "bench"]
    for step in report["steps"].values():
        assert step["status"] == "skipped" and "no CUDA device" in step["reason"] and step["what"]
    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert summary.count("| skipped |") == 4
