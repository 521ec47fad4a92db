"""``drllm eval``: vanilla, routers (at the chosen lambda, or a sweep; budget routers at each budget, with their
label-free twin and the oracle) and baselines on the same items, with a paired test and figures."""

from __future__ import annotations

from pathlib import Path

from .common import (
    UsageError,
    add_data_args,
    add_json_arg,
    add_model_args,
    add_task_arg,
    budget_list,
    check_selection_kind,
    lam_value,
    load_model_from_args,
    load_routers,
    non_negative_int,
    positive_int,
    write_json_atomic,
)



def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy and layers per example, vanilla vs routed")
    add_model_args(p)
    p.add_argument("--routers", default=None,
                   help="router checkpoint folder (from `drllm train`, or `drllm train --budget`: budget routers, "
                        "evaluated with their label-free twin in DIR/label-free, their retrains on resamples in "
                        "DIR/resampled and the oracle); without it, vanilla "
                        "and --baselines only")
    add_task_arg(p)
    p.add_argument("--split", default=None, help="default: validation for ARC, train for GSM8K/MATH")
    p.add_argument("--n", type=positive_int, default=None, help="evaluate the first N examples (default: all)")
    p.add_argument("--reward", default=None, choices=["loglik", "generate"],
                   help="scoring: log-likelihood of each choice (default for ARC) or generation (default otherwise)")
    p.add_argument("--lam", type=lam_value, nargs="+", default=None,
                   help="control knob value(s) in [-1, 1]; several values make a sweep (default: the value "
                        "`drllm train` chose, from the routers' selection.json, else 0)")
    p.add_argument("--budgets", type=budget_list, default=None, metavar="K[,K...]",
                   help="budget routers: blocks each row skips, one row per K, e.g. 1,2,4,6,8 (default: the budgets "
                        "`drllm train --budget` compared, from the routers' selection.json)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward pass")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation only: tokens per answer")
    p.add_argument("--style", default=None, choices=["auto", "chat", "plain"],
                   help="prompt style (default: plain cloze for loglik, auto for generate)")
    p.add_argument("--baselines", nargs="+", default=[], metavar="METHOD:K[,K...]",
                   help="baselines dropping K blocks for every input: shortgpt (least influential blocks), static "
                        "(greedy by accuracy on train items), random (--seeds draws), exit (the last K blocks); "
                        "e.g. shortgpt:1,2,4 exit:1,2,4; with budget routers a METHOD alone drops each of the "
                        "budgets")
    p.add_argument("--calib-n", type=positive_int, default=64,
                   help="shortgpt/static: calibration/selection items taken from the train split (never the "
                        "evaluated items) when the routers recorded no dev part (with one: that dev part, from "
                        "the train split of the routers' own task)")
    p.add_argument("--seeds", type=positive_int, default=5, help="random: skip sets drawn per K")
    p.add_argument("--shortlist", type=non_negative_int, default=12,
                   help="static: after the first greedy step, consider only the N best single skips (0: every "
                        "block at every step)")
    p.add_argument("--resamples", type=non_negative_int, default=3,
                   help="static: also choose the sets on N bootstrap resamples of the selection items, reported "
                        "as static-resampled (mean and spread: how fragile static selection is; 0: none)")
    add_data_args(p)
    p.add_argument("--out-dir", default=None,
                   help="write the frontier plot (accuracy vs blocks per pass) and decision heatmaps/histograms here")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..eval.baselines import BaselineError, check_ks, parse_baselines
    from ..eval.budget_selection import LABEL_FREE, RESAMPLED, saved_companions
    from ..eval.compare import compare
    from ..eval.report import (budget_selection_lines, format_table, frontier_legend, frontier_plot, frontier_table,
                               routers_vs_baselines, selection_lines)
    from ..eval.selection import read_selection, routing_knobs
    from ..routing.budget import BudgetRouters
    from ..runtime.adapters import describe
    from ..tasks import ARC_TASKS, load_task

    reward = args.reward or ("loglik" if args.task in ARC_TASKS else "generate")
    if reward == "loglik" and args.task not in ARC_TASKS:
        raise UsageError("--reward loglik needs a multiple-choice task (arc_easy, arc_challenge)")
    examples = load_task(args.task, args.split, data_dir=args.data_dir, limit=args.n)
    # a bad folder fails before the model loads
    routers = load_routers(args.routers) if args.routers else None
    selection = read_selection(args.routers) if args.routers else None
    by_budget = isinstance(routers, BudgetRouters)
    check_selection_kind(args.routers, selection, by_budget)
    label_free, resampled, lams, budgets, knob_text = None, [], [], [], ""
    if by_budget:
        budgets, source = _budgets(args, routers, selection)
        label_free, resampled = saved_companions(args.routers, selection)
        for r in (routers, label_free, *resampled):
            if r is not None:
                _check_budgets(r, budgets)
        knob_text = f"budget routers evaluated at budgets {', '.join(map(str, budgets))} ({source})"
    else:
        if args.budgets is not None:
            raise UsageError("--budgets needs budget routers (drllm train --budget); "
                             + (f"{args.routers} holds the paper's per-block routers: give --lam"
                                if routers is not None else "give --routers"))
        # the knobs drllm train chose, unless given here
        lam, lam_source = routing_knobs(selection, lam=args.lam)["lam"]
        lams = lam if isinstance(lam, list) else [lam]  # --lam may give a sweep
        knob_text = f"routers evaluated at λ {', '.join(f'{x:g}' for x in lams)} ({lam_source})"
    try:
        baselines = parse_baselines(_at_budgets(args.baselines, budgets))
    except BaselineError as err:
        raise UsageError(str(err)) from None
    calibration, calib_source = [], None
    if any(method in ("shortgpt", "static") for method, _ in baselines):
        calibration, calib_source = _calibration(args, examples, selection)
    model, tokenizer = load_model_from_args(args)
    info = describe(model)
    try:
        for r in (routers, label_free, *resampled):
            if r is not None:
                r.check_compatible(info.model_type, info.hidden_size, info.num_blocks)
        check_ks(info.num_blocks, baselines)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:  # a skip set a baseline cannot make (e.g. a greedy static set stuck at the skip-run limit)
        res = compare(model, tokenizer, examples, routers=routers, lams=lams, budgets=budgets, label_free=label_free,
                      resampled=resampled,
                      baselines=baselines, calibration=calibration, seeds=args.seeds, reward=reward,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, style=args.style,
                      shortlist=args.shortlist or None, resamples=args.resamples)
    except BaselineError as err:
        raise UsageError(str(err)) from None
    results = res["sweep"]
    table = format_table(*frontier_table(res["methods"]))
    print(f"{args.task} {args.split or 'default split'}, {len(examples)} examples, {reward} scoring, "
          f"{res['methods'][0]['blocks_per_pass']:g} blocks")
    if selection is not None:
        lines = budget_selection_lines if by_budget else selection_lines
        print("routers: " + lines(selection))
    if routers is not None:
        print(knob_text + (f"; label-free routers from {LABEL_FREE}/ too" if label_free is not None else "")
              + (f"; {len(resampled)} retrains on resamples from {RESAMPLED}/" if resampled else ""))
    if calib_source:
        print(f"calibration/selection (shortgpt, static): {calib_source}")
    legend = frontier_legend(res["methods"])
    print("\n" + table + "\n\n" + legend)
    if routers is not None and baselines:
        print("\n" + format_table(*routers_vs_baselines(res["methods"])))
    figures = []
    if args.out_dir:
        from ..integrations.plotting import decision_heatmap, decision_histogram

        out = Path(args.out_dir)
        for r in results:
            tag, knob = (f"budget{r['budget']}", f"budget {r['budget']}") if r.get("budget") is not None else \
                (f"lam{r['lam']:+g}", f"λ={r['lam']:g}")
            figures.append(str(decision_heatmap(r["decisions"], out / f"decisions_heatmap_{tag}.png",
                                                title=f"{args.task}: routed decisions ({knob})")))
            figures.append(str(decision_histogram(r["decisions"], out / f"decisions_histogram_{tag}.png",
                                                  title=f"{args.task}: decisions per block ({knob})")))
        figures.append(str(frontier_plot(res["methods"], out / "frontier.png",
                                         title=f"{args.task} {args.split or ''}: accuracy vs compute "
                                               f"(n={len(examples)})")))
        (out / "frontier.md").write_text(table + "\n\n" + legend + "\n")
        print("\nfigures: " + ", ".join(figures))
    if args.json:
        write_json_atomic(args.json, {"task": args.task, "split": args.split, "reward": reward,
                                      "methods": res["methods"], "baselines": res["baselines"],
                                      "calibration": calib_source, "selection": selection, "budgets": budgets,
                                      "results": results, "label_free_results": res.get("label_free", []),
                                      "figures": figures})
    return 0


def _budgets(args, routers, selection) -> tuple[list[int], str]:
    """The budgets budget routers are evaluated at, and where they came from; --lam refused (it moves the
    paper's routers)."""
    if args.lam is not None:
        raise UsageError("--lam moves the paper's per-block routers; budget routers skip exactly K blocks per row: "
                         "give --budgets")
    if args.budgets is not None:
        return args.budgets, "given on the command line"
    if selection is not None:
        return list(selection["budgets"]), "the budgets drllm train --budget compared"
    if routers.head == "sets":
        return sorted(routers.sets), "the budgets of the routers' vocabulary"
    raise UsageError(f"{args.routers} holds no selection.json to read the budgets from: give --budgets, e.g. 1,2,4")


def _check_budgets(routers, budgets) -> None:
    """Every budget the routers must serve, refused in one line before the model loads."""
    try:
        for k in budgets:
            routers.check_budget(k)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _at_budgets(specs: list[str], budgets: list[int]) -> list[str]:
    """With budget routers, a baseline named alone drops each of the budgets (``static`` -> ``static:1,2,4``)."""
    if not budgets:
        return specs
    return [s if ":" in s else f"{s}:{','.join(map(str, budgets))}" for s in specs]


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
