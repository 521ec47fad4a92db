"""One GPU check: build, CUDA tests, ops bandwidth, runtime suites, in one call of under 9 minutes.

Run by ``benchmarks/gpu_check.sh [OUT_DIR]`` (default ``gpu-check/``). Each
step runs in its own process under a time limit, so a failing or slow step is
reported and the next one still runs. Writes ``OUT_DIR/gpu_check.json`` (every
step's status, reason, seconds and figures, plus the benchmark's targets) and
``OUT_DIR/gpu_check.md`` (the same as tables), next to the raw outputs of the
steps (``tests.xml``, ``ops.json``, ``bench.json``, ``*.log``).

Without a GPU every step is reported as skipped, with the reason, and the
exit status is 0: CI runs that mode. With a GPU the exit status is 1 when a
step failed or timed out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUDGET_S = 540  # 9 minutes on one H100/H200, all steps together
EXPECTED_MIN = 6
BENCH = ["-m", "drllm.cli", "bench", "--model", "random:llama-3.2-3b", "--dtype", "bfloat16", "--quick",
         "--batch-sizes", "1,8,64", "--gen-tokens", "32", "--tokens", "16",
         "--suites", "routing,generation,throughput,policy,grouping,compile,kernels"]
GPU_TESTS = ["tests/test_gpu.py", "tests/test_ext.py", "tests/test_kernels_triton.py::test_triton_compiled_on_cuda"]


def announce(out: Path) -> None:
    names = ", ".join(f"{name} ({limit / 60:.1f} min max)" for name, _, limit, _ in STEPS)
    print(f"drllm GPU check: will run {names}; expected about {EXPECTED_MIN} minutes on one H100/H200 "
          f"(at most {BUDGET_S // 60}), results in {out}/", flush=True)


def gpu() -> tuple[str | None, str | None]:
    """``(device name, None)`` when torch sees a CUDA device, else ``(None, why not)``."""
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"torch is not importable by {PY}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"
    name = r.stdout.strip()
    return (name, None) if name else (None, "no CUDA device: torch.cuda.is_available() is False")


def run(cmd: list[str], limit: float, log: Path) -> tuple[str, float]:
    """``(status, seconds)`` of a command run under ``limit`` seconds, its output in ``log``."""
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit, cwd=ROOT)
            status = "passed" if r.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timed out"
    return status, time.perf_counter() - start


def build(out: Path, limit: float) -> dict:
    status, seconds = run([PY, "-m", "pip", "install", "--no-build-isolation", "-e", ".[test]"], limit,
                          out / "build.log")
    if status == "failed":  # no package index on the machine: the dependencies must already be there
        status, more = run([PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], limit,
                           out / "build-no-deps.log")
        seconds += more
    probe = ("from drllm import ops; from drllm.ops import backends; "
             "assert backends.load_ext() and ops.has_kernel('gather_rows', 'cuda'), ops.backend('cuda')['ext']; "
             "print('cuda kernels')")
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True, cwd="/")
    ok = status == "passed" and r.returncode == 0
    return {"status": "passed" if ok else (status if status != "passed" else "failed"), "seconds": seconds,
            "reason": None if ok else (r.stderr.strip().splitlines() or ["see build.log"])[-1]}


def tests(out: Path, limit: float) -> dict:
    xml = out / "tests.xml"
    status, seconds = run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *GPU_TESTS],
                          limit, out / "tests.log")
    counts = {}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"status": status, "seconds": seconds, "counts": counts,
            "reason": None if status == "passed" else "see tests.log"}


def ops(out: Path, limit: float) -> dict:
    data = out / "ops.json"
    status, seconds = run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_ops.py", "-k", "cuda",
                           "--benchmark-only", f"--benchmark-json={data}"], limit, out / "ops.log")
    rows = []
    if data.exists():
        for b in json.loads(data.read_text())["benchmarks"]:
            rows.append({"name": b["name"], "us_per_op": b["extra_info"].get("us_per_op"),
                         "GB_s": b["extra_info"].get("GB/s")})
    return {"status": status, "seconds": seconds, "rows": rows, "reason": None if status == "passed" else "see ops.log"}


def bench(out: Path, limit: float) -> dict:
    data = out / "bench.json"
    status, seconds = run([PY, *BENCH, "--json", str(data)], limit, out / "bench.log")
    targets = json.loads(data.read_text()).get("targets", {}) if data.exists() else {}
    return {"status": status, "seconds": seconds, "targets": targets,
            "reason": None if status == "passed" else "see bench.log"}


# (name, what it does, time limit in seconds, the step)
STEPS = [
    ("build", "build drllm._C with its CUDA kernels (pip install --no-build-isolation -e .)", 150, build),
    ("tests", "every test that needs CUDA: kernels against the reference (fp32/bf16/fp16), CUDA row ops, "
              "the runtime end to end, compiled decoding", 150, tests),
    ("ops", "ops benchmark on CUDA: pooling and row ops, bandwidth against a device copy", 60, ops),
    ("bench", "runtime suites on random:llama-3.2-3b in bf16, batch 1 to 64, with targets", 180, bench),
]


def markdown(report: dict) -> str:
    lines = [f"# drllm GPU check, {report['date']}", "", f"device: {report['device'] or 'none'}", "",
             "| step | what | status | seconds | reason |", "|---|---|---|---:|---|"]
    for name, what, _, _ in STEPS:
        step = report["steps"][name]
        lines.append(f"| {name} | {what} | {step['status']} | {step.get('seconds', 0):.0f} | {step.get('reason') or ''} |")
    counts = report["steps"]["tests"].get("counts")
    if counts:
        lines += ["", "tests: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
    rows = report["steps"]["ops"].get("rows")
    if rows:
        lines += ["", "| ops benchmark | us per op | GB/s |", "|---|---:|---:|"]
        lines += [f"| {r['name']} | {r['us_per_op']} | {r['GB_s'] if r['GB_s'] is not None else ''} |" for r in rows]
    targets = report["steps"]["bench"].get("targets")
    if targets:
        lines += ["", "| target | value | goal | met |", "|---|---:|---|---|"]
        lines += [f"| {k} | {t['value']:.3f} | {t['op']} {t['target']:.3f} | {'yes' if t['met'] else 'NO'} |"
                  for k, t in targets.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    announce(out)
    device, why = gpu()
    report = {"date": time.strftime("%Y-%m-%d"), "device": device, "budget_s": BUDGET_S, "steps": {}}
    start = time.perf_counter()
    for name, what, limit, run_step in STEPS:
        left = BUDGET_S - (time.perf_counter() - start)
        if why is not None:
            step = {"status": "skipped", "reason": why}
        elif left < 20:
            step = {"status": "skipped", "reason": f"the {BUDGET_S} s budget is spent"}
        else:
            step = run_step(out, min(limit, left))
            if name == "build" and step["status"] != "passed":
                why = "the CUDA extension did not build (see the build step)"
        report["steps"][name] = {"what": what, **step}
        print(f"  {name}: {step['status']}" + (f" ({step['reason']})" if step.get("reason") else ""), flush=True)
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [n for n, s in report["steps"].items() if s["status"] in ("failed", "timed out")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
