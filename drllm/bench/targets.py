"""The goals ``drllm bench`` reports against: each one's measured value next to its target.

Goals come from the issues that set them: the routers cost a small share of a
prefill, the all-execute path is vanilla within the run's own noise (eager
and compiled), a fixed path delivers at least 90 % of its ideal speedup
eager and 95 % compiled (the evenly skipped paths and each path of the
budget routers' vocabulary), batched decoding on the routers' own paths
reaches 95 % of the union bound's throughput (eager and compiled), no graph
is compiled after warm-up, and on a GPU the row ops and the pooling kernel
run near copy bandwidth.
"""

from __future__ import annotations

import operator

OPS = {"<=": operator.le, ">=": operator.ge}
ROUTING_SHARE = 0.01  # routers' time over one prefill at T = 512
SHARE_OF_IDEAL = {"eager": 0.9, "compiled": 0.95}  # fixed paths: measured speedup over the ideal block ratio's
SHARE_OF_BOUND = 0.95  # batched routers' paths: throughput over the union bound's
SHARE_OF_COPY = {"gather_rows": 0.8, "scatter_rows": 0.8, "pooled_router_logits": 0.5}


def goal(value: float, target: float, op: str, what: str) -> dict:
    return {"value": value, "target": target, "op": op, "met": bool(OPS[op](value, target)), "what": what}


def _path_goals(out: dict, rows: list[dict], noise: float, mode: str) -> None:
    """All-execute within noise of vanilla, and fixed paths' share of their ideal speedup."""
    every = next((r for r in rows if r["variant"] == "all-execute"), None)
    if every is not None:
        out[f"all_execute_vs_vanilla_{mode}"] = goal(
            abs(every["ratio"] - 1), noise, "<=", f"|all-execute / vanilla - 1| ({mode}) within the run's noise "
            "(the largest gap between vanilla and itself)")
    fixed = [r for r in rows if r["variant"].startswith(("skip", "vocabulary"))]
    if fixed:
        out[f"fixed_path_share_of_ideal_{mode}"] = goal(
            min(r["of_ideal_speedup"] for r in fixed), SHARE_OF_IDEAL[mode], ">=",
            f"worst fixed path ({mode}; skip k and the routers' vocabulary): measured speedup over the ideal "
            "block ratio's")


def targets(results: dict, device) -> dict:
    """``{name: {value, target, op, met, what}}`` for every goal the suites that ran can speak to."""
    s = results["suites"]
    out = {}
    if s.get("routing"):
        row = min(s["routing"], key=lambda r: abs(r["T"] - 512))
        out[f"routing_overhead_T{row['T']}"] = goal(row["routers_ratio"], ROUTING_SHARE, "<=",
                                                    f"routers of every block over one vanilla prefill of {row['T']} tokens")
    if s.get("generation"):
        longest = max(r["new_tokens"] for r in s["generation"])
        rows = [r for r in s["generation"] if r["new_tokens"] == longest]
        _path_goals(out, rows, rows[0]["noise"], "eager")
    if s.get("compile"):
        summary = next(r for r in s["compile"] if r["variant"] == "summary")
        _path_goals(out, s["compile"], summary["noise"], "compiled")
        out["compiled_graphs_after_first_round"] = goal(summary["graphs_after_warmup"], 0, "<=",
                                                        "graphs compiled once every path had run once")
    for r in s.get("throughput", []):
        out[f"throughput_B{r['batch']}_{r['mode']}_share_of_bound"] = goal(
            r["share_of_bound"], SHARE_OF_BOUND, ">=",
            f"routed tokens/s at batch {r['batch']} ({r['mode']}, the routers' paths) over the union bound's")
    if s.get("throughput"):
        out["throughput_graphs_after_warmup"] = goal(max(r["graphs_after_warmup"] for r in s["throughput"]), 0,
                                                     "<=", "graphs compiled in the timed rounds of every batch")
    if getattr(device, "type", device) == "cuda":
        for r in s.get("kernels", []):
            out[f"{r['op']}_share_of_copy"] = goal(r["share_of_copy"], SHARE_OF_COPY[r["op"]], ">=",
                                                   f"{r['op']} bandwidth over a device copy of the same bytes")
    return out
