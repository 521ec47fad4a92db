"""Integrations: the lm-eval-harness model (:mod:`drllm.integrations.lm_eval`, needs the ``lmeval``
extra) and figures (:mod:`drllm.integrations.plotting`, matplotlib). Neither is imported here."""
