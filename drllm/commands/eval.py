"""``drllm eval``: vanilla vs routed accuracy and layers on a task, with figures and a lambda sweep."""

from __future__ import annotations

from pathlib import Path

from .common import (
    UsageError,
    add_data_args,
    add_json_arg,
    add_model_args,
    add_task_arg,
    format_table,
    lam_value,
    load_model_from_args,
    positive_int,
    write_json_atomic,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy and layers per example, vanilla vs routed")
    add_model_args(p)
    p.add_argument("--routers", required=True, help="router checkpoint folder (from `drllm train`)")
    add_task_arg(p)
    p.add_argument("--split", default=None, help="default: validation for ARC, train for GSM8K/MATH")
    p.add_argument("--n", type=positive_int, default=None, help="evaluate the first N examples (default: all)")
    p.add_argument("--reward", default=None, choices=["loglik", "generate"],
                   help="scoring: log-likelihood of each choice (default for ARC) or generation (default otherwise)")
    p.add_argument("--lam", type=lam_value, nargs="+", default=[0.0],
                   help="control knob value(s) in [-1, 1]; several values make a sweep")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward pass")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation only: tokens per answer")
    p.add_argument("--style", default=None, choices=["auto", "chat", "plain"],
                   help="prompt style (default: plain cloze for loglik, auto for generate)")
    add_data_args(p)
    p.add_argument("--out-dir", default=None, help="write the decision heatmap/histogram (and sweep plot) PNGs here")
    add_json_arg(p)
    p.set_defaults(run=run)


def _cell(s: dict) -> str:
    return f"{s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def run(args) -> int:
    import drllm
    from ..evaluate import lam_sweep
    from ..tasks import ARC_TASKS, load_task

    reward = args.reward or ("loglik" if args.task in ARC_TASKS else "generate")
    if reward == "loglik" and args.task not in ARC_TASKS:
        raise UsageError("--reward loglik needs a multiple-choice task (arc_easy, arc_challenge)")
    examples = load_task(args.task, args.split, data_dir=args.data_dir, limit=args.n)
    routers = drllm.Routers.from_pretrained(args.routers)  # a bad folder fails before the model loads
    model, tokenizer = load_model_from_args(args)
    results = lam_sweep(model, tokenizer, routers, examples, args.lam, reward=reward, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, style=args.style)
    v = results[0]["vanilla"]
    L = results[0]["num_blocks"]
    rows = [["vanilla", "-", _cell(v), f"{v['mean_path_length']:.2f}", f"{v['layers_per_example']:.1f}", "-", "-"]]
    for r in results:
        s, d = r["routed"], r["difference"]
        rows.append(["routed", f"{r['lam']:g}", _cell(s), f"{s['mean_path_length']:.2f}",
                     f"{s['layers_per_example']:.1f}", f"{d['accuracy']:+.3f}",
                     f"{d['layers_per_example']:+.1f} ({d['layers_ratio']:.2f}x)"])
    table = format_table(["model", "lambda", "accuracy [95% CI]", "path length", "layers/example",
                          "Δ accuracy", "Δ layers"], rows)
    print(f"{args.task} {args.split or 'default split'}, {len(examples)} examples, {reward} scoring, {L} blocks\n")
    print(table)
    figures = []
    if args.out_dir:
        from ..integrations.plotting import decision_heatmap, decision_histogram, sweep_plot

        out = Path(args.out_dir)
        for r in results:
            tag = f"lam{r['lam']:+g}"
            figures.append(str(decision_heatmap(r["decisions"], out / f"decisions_heatmap_{tag}.png",
                                                title=f"{args.task}: routed decisions (λ={r['lam']:g})")))
            figures.append(str(decision_histogram(r["decisions"], out / f"decisions_histogram_{tag}.png",
                                                  title=f"{args.task}: decisions per block (λ={r['lam']:g})")))
        if len(results) > 1:
            figures.append(str(sweep_plot([{**r["routed"], "lam": r["lam"]} for r in results], v,
                                          out / "lambda_sweep.png", title=f"{args.task}: accuracy vs layers")))
            (out / "lambda_sweep.md").write_text(table + "\n")
        print("\nfigures: " + ", ".join(figures))
    if args.json:
        write_json_atomic(args.json, {"task": args.task, "split": args.split, "reward": reward,
                                      "results": results, "figures": figures})
    return 0
