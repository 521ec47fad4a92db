"""``drllm bench``: runtime performance, measured against the vanilla model in the same run.

Seven suites, one module each (also timed by ``benchmarks/bench_runtime.py``):

1. ``routing``: pooling + routers for every block against one vanilla prefill,
   and a routed prefill end to end (:mod:`.routing`).
2. ``generation``: batch-1 latency of fixed paths against vanilla and their
   ideal (:mod:`.generation`).
3. ``throughput``: tokens per second against batch size on the budget
   routers' own paths, eager and compiled (rows grouped by path), against
   the union bound (:mod:`.throughput`).
4. ``policy``: gathering the rows of a partial pass against running every row
   and selecting, to place the crossover (:mod:`.policy`).
5. ``grouping``: a path's rows as a group of their own against the shared
   executor, to place the grouping policy's crossover (:mod:`.grouping`).
6. ``compile``: compiled routed decoding (whole-step graphs per path)
   against the compiled vanilla model (:mod:`.compile`).
7. ``kernels``: the row ops' bandwidth against a plain copy of the same bytes
   (:mod:`.kernels`).

The suites share :mod:`.config` (sizes, random models), :mod:`.timing`
(interleaved medians) and :mod:`.workload` (prompts, paths, the model vanilla
or routed), and never import each other. :func:`run` runs the chosen ones;
:mod:`.targets` states each goal next to the measured value, so a reader of
the JSON sees at once what was met; :mod:`.report` makes the tables.

Every figure is a ratio against vanilla timed in the same run; variants are
interleaved (one repeat of each in turn) and medians taken, so a loaded
machine slows them all alike. CUDA is synchronised around every timing.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from dataclasses import asdict

import torch

from ..runtime.plan import row_policy
from .compile import bench_compile
from .config import BenchConfig
from .generation import bench_generation
from .grouping import bench_grouping, group_crossover
from .kernels import bench_kernels
from .policy import bench_policy, crossover
from .routing import bench_routing
from .targets import targets
from .throughput import bench_throughput
from .workload import generate_exactly, random_tokens

SUITES = {"routing": bench_routing, "generation": bench_generation, "throughput": bench_throughput,
          "policy": bench_policy, "grouping": bench_grouping, "compile": bench_compile, "kernels": bench_kernels}


def run(model, cfg: BenchConfig, log=print, model_name: str | None = None) -> dict:
    """Run the suites of ``cfg`` on ``model`` (unpatched) and return the results as a dict."""
    import drllm

    if drllm.is_patched(model):
        raise ValueError("benchmark an unpatched model: the suites patch and unpatch it themselves")
    device = model.device
    info = {
        "date": _dt.date.today().isoformat(),
        "model": model_name or getattr(model.config, "name_or_path", "") or model.config.model_type,
        "num_blocks": model.config.num_hidden_layers,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "row_policy": row_policy(),
        "config": asdict(cfg),
    }
    results = {"info": info, "suites": {}}
    total = time.perf_counter()
    if not cfg.warmup:  # one short generation, so the first timed variant does not pay for the first call
        generate_exactly(model, random_tokens(model, 1, 8, cfg.seed), 2)
    for name in cfg.suites:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
        log(f"[{name}]")
        start = time.perf_counter()
        results["suites"][name] = SUITES[name](model, cfg, log=log)
        results.setdefault("seconds", {})[name] = time.perf_counter() - start
    if "policy" in results["suites"]:
        results["policy_crossover"] = crossover(results["suites"]["policy"])
    if "grouping" in results["suites"]:
        results["grouping_crossover_rows"] = group_crossover(results["suites"]["grouping"])
    results["targets"] = targets(results, device)
    info["seconds"] = time.perf_counter() - total
    return results


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
