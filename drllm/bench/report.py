"""The tables ``drllm bench`` prints: one per suite that ran, and the targets next to their values."""

from __future__ import annotations


def tables(results: dict) -> list[tuple[str, list[str], list[list]]]:
    """``(title, headers, rows)`` of each suite's table."""
    out = []
    s = results["suites"]
    if "routing" in s:
        out.append(("routing overhead (batch 1)", ["T", "prefill ms", "routers ms", "routers / prefill",
                                                   "routed prefill / vanilla"],
                    [[r["T"], f"{r['prefill_ms']:.1f}", f"{r['routers_ms']:.2f}", f"{100 * r['routers_ratio']:.2f}%",
                      f"{r['routed_prefill_ratio']:.3f}"] for r in s["routing"]]))
    if "generation" in s:
        out.append(("generation latency (batch 1)", ["new tokens", "path", "blocks", "ms", "vs vanilla",
                                                     "ideal", "of ideal speedup"],
                    [[r["new_tokens"], r["variant"], f"{r['blocks']}", f"{r['ms']:.0f}", f"{r['ratio']:.3f}",
                      f"{r['ideal_ratio']:.3f}", f"{100 * r['of_ideal_speedup']:.1f}%"] for r in s["generation"]]))
    if "throughput" in s:
        out.append(("throughput (the budget routers' paths, rows grouped by path)",
                    ["batch", "mode", "vanilla tok/s", "routed tok/s", "union bound tok/s", "routed / vanilla",
                     "bound / vanilla", "of bound", "union passes", "paths", "graphs after warm-up"],
                    [[r["batch"], r["mode"], f"{r['vanilla_tok_s']:.1f}", f"{r['routed_tok_s']:.1f}",
                      f"{r['bound_tok_s']:.1f}", f"{r['routed_vs_vanilla']:.3f}", f"{r['bound_vs_vanilla']:.3f}",
                      f"{100 * r['share_of_bound']:.1f}%", f"{r['union_passes']}/{r['num_blocks']}",
                      r["distinct_paths"], r["graphs_after_warmup"]] for r in s["throughput"]]))
    if "grouping" in s:
        out.append(("a second path's rows grouped vs in the shared executor", ["batch", "rows", "grouped ms",
                                                                              "shared ms", "grouped / shared"],
                    [[r["batch"], r["rows"], f"{r['grouped_ms']:.0f}", f"{r['shared_ms']:.0f}",
                      f"{r['grouped_vs_shared']:.3f}"] for r in s["grouping"]]))
    if "policy" in s:
        out.append(("gather/scatter vs run-all-and-select", ["batch", "active rows", "gather ms", "select ms",
                                                             "select / gather", "us per partial pass"],
                    [[r["batch"], f"{r['active_fraction']:.2f}", f"{r['gather_ms']:.0f}", f"{r['select_ms']:.0f}",
                      f"{r['select_vs_gather']:.3f}", f"{r['per_pass_us']:+.1f}"] for r in s["policy"]]))
    if "compile" in s:
        rows = [r for r in s["compile"] if r["variant"] != "summary"]
        summary = next(r for r in s["compile"] if r["variant"] == "summary")
        out.append((f"compiled decoding (batch 1, static cache, {summary['new_tokens']} tokens; noise "
                    f"{100 * summary['noise']:.1f}%, {summary['graphs_compiled']} graphs, "
                    f"{summary['graphs_after_warmup']} after the first round)",
                    ["path", "blocks", "ms", "vs compiled vanilla", "ideal", "of ideal speedup", "compile s",
                     "graph compile s"],
                    [[r["variant"], r["blocks"], f"{r['ms']:.0f}", f"{r['ratio']:.3f}", f"{r['ideal_ratio']:.3f}",
                      f"{100 * r['of_ideal_speedup']:.1f}%", f"{r['compile_s']:.1f}",
                      "-" if r.get("graph_compile_s") is None else f"{r['graph_compile_s']:.1f}"] for r in rows]))
    if "kernels" in s:
        out.append(("kernels against a copy of the same bytes", ["op", "backend", "dtype", "GB/s", "copy GB/s",
                                                                "share of copy", "us per op"],
                    [[r["op"], r["backend"], r["dtype"], f"{r['GB_s']:.1f}", f"{r['copy_GB_s']:.1f}",
                      f"{100 * r['share_of_copy']:.0f}%", f"{r['us_per_op']:.1f}"] for r in s["kernels"]]))
    if results.get("targets"):
        out.append(("targets", ["goal", "value", "target", "met"],
                    [[name, f"{t['value']:.3f}", f"{t['op']} {t['target']:.3f}", "yes" if t["met"] else "NO"]
                     for name, t in results["targets"].items()]))
    return out
