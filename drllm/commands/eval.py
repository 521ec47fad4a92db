"""``drllm eval``: vanilla, routers (at the chosen lambda, or a sweep) and baselines on the same items, with a paired
test and figures."""

from __future__ import annotations

from pathlib import Path

from .common import (
    UsageError,
    add_data_args,
    add_json_arg,
    add_model_args,
    add_task_arg,
    lam_value,
    load_model_from_args,
    positive_int,
    write_json_atomic,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy and layers per example, vanilla vs routed")
    add_model_args(p)
    p.add_argument("--routers", default=None,
                   help="router checkpoint folder (from `drllm train`); without it, vanilla and --baselines only")
    add_task_arg(p)
    p.add_argument("--split", default=None, help="default: validation for ARC, train for GSM8K/MATH")
    p.add_argument("--n", type=positive_int, default=None, help="evaluate the first N examples (default: all)")
    p.add_argument("--reward", default=None, choices=["loglik", "generate"],
                   help="scoring: log-likelihood of each choice (default for ARC) or generation (default otherwise)")
    p.add_argument("--lam", type=lam_value, nargs="+", default=None,
                   help="control knob value(s) in [-1, 1]; several values make a sweep (default: the value "
                        "`drllm train` chose, from the routers' selection.json, else 0)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward pass")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation only: tokens per answer")
    p.add_argument("--style", default=None, choices=["auto", "chat", "plain"],
                   help="prompt style (default: plain cloze for loglik, auto for generate)")
    p.add_argument("--baselines", nargs="+", default=[], metavar="METHOD:K[,K...]",
                   help="baselines dropping K blocks for every input: shortgpt (least influential blocks), static "
                        "(greedy by accuracy on train items), random (--seeds draws), exit (the last K blocks); "
                        "e.g. shortgpt:1,2,4 exit:1,2,4")
    p.add_argument("--calib-n", type=positive_int, default=64,
                   help="shortgpt/static: calibration/selection items taken from the train split (never the "
                        "evaluated items) when the routers recorded no dev part (with one: that dev part, from "
                        "the train split of the routers' own task)")
    p.add_argument("--seeds", type=positive_int, default=5, help="random: skip sets drawn per K")
    add_data_args(p)
    p.add_argument("--out-dir", default=None,
                   help="write the frontier plot (accuracy vs blocks per pass) and decision heatmaps/histograms here")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import drllm
    from ..eval.baselines import BaselineError, check_ks, parse_baselines
    from ..eval.compare import compare
    from ..eval.report import (format_table, frontier_legend, frontier_plot, frontier_table, routers_vs_baselines,
                               selection_lines)
    from ..eval.selection import read_selection, routing_knobs
    from ..runtime.adapters import describe
    from ..tasks import ARC_TASKS, load_task

    reward = args.reward or ("loglik" if args.task in ARC_TASKS else "generate")
    if reward == "loglik" and args.task not in ARC_TASKS:
        raise UsageError("--reward loglik needs a multiple-choice task (arc_easy, arc_challenge)")
    try:
        baselines = parse_baselines(args.baselines)
    except BaselineError as err:
        raise UsageError(str(err)) from None
    examples = load_task(args.task, args.split, data_dir=args.data_dir, limit=args.n)
    # a bad folder fails before the model loads
    routers = drllm.Routers.from_pretrained(args.routers) if args.routers else None
    selection = read_selection(args.routers) if args.routers else None
    # the knobs drllm train chose, unless given here (a chosen budget will be read the same way)
    knobs = routing_knobs(selection, lam=args.lam)
    lam, lam_source = knobs["lam"]
    lams = lam if isinstance(lam, list) else [lam]  # --lam may give a sweep
    calibration, source = [], None
    if any(method in ("shortgpt", "static") for method, _ in baselines):
        calibration, source = _calibration(args, examples, selection)
    model, tokenizer = load_model_from_args(args)
    info = describe(model)
    try:
        if routers is not None:
            routers.check_compatible(info.model_type, info.hidden_size, info.num_blocks)
        check_ks(info.num_blocks, baselines)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:  # a skip set a baseline cannot make (e.g. a greedy static set stuck at the skip-run limit)
        res = compare(model, tokenizer, examples, routers=routers, lams=lams, baselines=baselines,
                      calibration=calibration, seeds=args.seeds, reward=reward, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, style=args.style)
    except BaselineError as err:
        raise UsageError(str(err)) from None
    results = res["sweep"]
    table = format_table(*frontier_table(res["methods"]))
    print(f"{args.task} {args.split or 'default split'}, {len(examples)} examples, {reward} scoring, "
          f"{res['methods'][0]['blocks_per_pass']:g} blocks")
    if selection is not None:
        print("routers: " + selection_lines(selection))
    if routers is not None:
        print(f"routers evaluated at λ {', '.join(f'{x:g}' for x in lams)} ({lam_source})")
    if source:
        print(f"calibration/selection (shortgpt, static): {source}")
    legend = frontier_legend(res["methods"])
    print("\n" + table + "\n\n" + legend)
    if routers is not None and baselines:
        print("\n" + format_table(*routers_vs_baselines(res["methods"])))
    figures = []
    if args.out_dir:
        from ..integrations.plotting import decision_heatmap, decision_histogram

        out = Path(args.out_dir)
        for r in results:
            tag = f"lam{r['lam']:+g}"
            figures.append(str(decision_heatmap(r["decisions"], out / f"decisions_heatmap_{tag}.png",
                                                title=f"{args.task}: routed decisions (λ={r['lam']:g})")))
            figures.append(str(decision_histogram(r["decisions"], out / f"decisions_histogram_{tag}.png",
                                                  title=f"{args.task}: decisions per block (λ={r['lam']:g})")))
        figures.append(str(frontier_plot(res["methods"], out / "frontier.png",
                                         title=f"{args.task} {args.split or ''}: accuracy vs compute "
                                               f"(n={len(examples)})")))
        (out / "frontier.md").write_text(table + "\n\n" + legend + "\n")
        print("\nfigures: " + ", ".join(figures))
    if args.json:
        write_json_atomic(args.json, {"task": args.task, "split": args.split, "reward": reward,
                                      "methods": res["methods"], "baselines": res["baselines"],
                                      "calibration": source, "selection": selection, "results": results,
                                      "figures": figures})
    return 0


def _calibration(args, examples, selection) -> tuple[list, str]:
    """ShortGPT's calibration and static's selection items: the dev part recorded with the routers (from the
    train split of the task they were searched on, not necessarily the evaluated one), else the first
    ``--calib-n`` train items of the evaluated task; any refusal is a one-line error."""
    from ..eval.baselines import BaselineError, calibration_set
    from ..eval.selection import routers_dev_part

    dev = routers_dev_part(selection, args.routers)
    task, dev_ids = dev if dev is not None else (args.task, None)
    try:
        return calibration_set(task, examples, n=args.calib_n, data_dir=args.data_dir, dev_ids=dev_ids)
    except BaselineError as err:
        raise UsageError(str(err)) from None
