"""Evaluation: the frozen model with and without routers, and the baselines, on the same items.

- :mod:`~drllm.eval.scoring`: scoring runs (:func:`~drllm.eval.scoring.evaluate`,
  ``lam_sweep``, ``evaluate_path``, ``score_paths``), layers per example;
- :mod:`~drllm.eval.stats`: Wilson intervals, McNemar's exact test, seeded aggregates;
- :mod:`~drllm.eval.baselines`: static skip sets (ShortGPT, greedy static, random, early exit);
- :mod:`~drllm.eval.compare`: routers and baselines on the same items, equal compute only where blocks per
  pass match (``compare``, ``choose_baselines``);
- :mod:`~drllm.eval.budget`: budget routers against static sets at equal compute: vocabulary, oracle, tables;
- :mod:`~drllm.eval.selection`: ``min_margin`` and lambda chosen on the dev part (``select_routers``,
  ``read_selection``);
- :mod:`~drllm.eval.report`: tables, selection lines, the frontier plot.

Nothing is imported here: the command line's parser imports :mod:`~drllm.eval.report`
without paying for torch. Eval sits above train, search, runtime and routing and may import them.
"""
