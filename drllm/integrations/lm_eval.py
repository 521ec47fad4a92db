"""lm-evaluation-harness model ``drllm``: a frozen Hugging Face model with routers.

Importing this module registers the model type ``drllm`` (a subclass of
lm-eval's ``HFLM``)::

    import lm_eval
    import drllm.integrations.lm_eval  # noqa: F401  (registers "drllm")

    lm_eval.simple_evaluate(
        model="drllm",
        model_args="pretrained=SmolLM2-135M-Instruct,routers=routers/,lam=0.0",
        tasks=["arc_easy"], batch_size=8,
    )

From the shell, ``drllm lm-eval`` runs lm-eval's own command line with
the model registered (lm-eval has no plugin entry point, so ``lm_eval
--model drllm`` alone cannot find it)::

    drllm lm-eval --model drllm --model_args pretrained=PATH,routers=DIR --tasks arc_easy

``pretrained`` is a hub name or local path (the embedded model's name loads
the embedded model, as ``drllm.models.load_model`` does) or a loaded model;
``routers`` a router checkpoint folder (or a :class:`drllm.Routers`; without
it every block runs once); ``lam`` the control knob.

Correctness with routers:

- **Log-likelihood.** HFLM calls the model on right-padded ``context +
  continuation`` rows without saying where each context ends, so routers
  would pool over the answer being scored and over padding. This class
  scores log-likelihood requests itself: each row gets an attention mask and
  a ``routing_mask`` covering exactly its context tokens, so a choice's path
  never depends on the choice. (HFLM's one-token-continuation logits reuse is
  not used: every distinct (input, context length) pair is one forward row.)
- **Generation.** HFLM left-pads and passes the attention mask to
  ``generate``; the routed model pools over each row's real prompt tokens, so
  batches of any size give every row its own path.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "drllm.integrations.lm_eval needs lm-evaluation-harness: pip install 'drllm[lmeval]' "
        "(or pip install lm-eval; make sure pip does not replace your torch)"
    ) from err

from tqdm.auto import tqdm

from ..batching import pad_batch, prefix_mask

__all__ = ["DrLLM"]


def _dtype(value):
    if value in (None, "auto"):
        return None
    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value))


@register_model("drllm")
class DrLLM(HFLM):
    """HFLM over a model patched with :func:`drllm.patch`."""

    def __init__(
        self,
        pretrained: Any = None,
        routers: Any = None,
        lam: float | str = 0.0,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        import drllm
        from drllm.models import load_model

        if pretrained is None or isinstance(pretrained, (str, os.PathLike)):
            model, tok = load_model(None if pretrained is None else str(pretrained), dtype=_dtype(dtype), device=device)
            if tokenizer is None:
                tokenizer = tok
        else:
            model = pretrained
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if tokenizer is None:
            raise ValueError("pass tokenizer= with a loaded model (drllm never downloads one)")
        if isinstance(routers, (str, os.PathLike)):
            routers = drllm.Routers.from_pretrained(routers)
        if drllm.is_patched(model):
            raise ValueError("the model is already patched: pass the unpatched model (drllm.unpatch(model))")
        drllm.patch(model, routers, lam=float(lam))
        self.routers = routers
        self.lam = float(lam)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    def set_lam(self, lam: float) -> None:
        """Change the control knob for the next requests."""
        import drllm

        drllm.set_lam(self.model, lam)
        self.lam = float(lam)

    # ------------------------------------------------------------------ log-likelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend != "causal":  # pragma: no cover - drllm patches decoder-only models
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        max_len = self.max_length
        rows: dict[tuple, int] = {}  # (input tokens, context length) -> row
        inputs: list[tuple[list[int], int]] = []
        plan = []  # per request: (row, continuation tokens)
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("empty context or continuation in a log-likelihood request")
            inp = (ctx + cont)[-(max_len + 1):][:-1]
            n_ctx = len(inp) - (len(cont) - 1)
            if n_ctx < 1:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit in max_length={max_len}")
            key = (tuple(inp), n_ctx)
            if key not in rows:
                rows[key] = len(inputs)
                inputs.append((inp, n_ctx))
            plan.append((rows[key], cont))

        if self.batch_size == "auto":
            batch_size = override_bs or self._detect_batch_size()
        else:
            batch_size = int(override_bs or self.batch_size)
        order = sorted(range(len(inputs)), key=lambda r: (-len(inputs[r][0]), tuple(inputs[r][0])))
        by_row: dict[int, list[int]] = {}
        for i, (r, _) in enumerate(plan):
            by_row.setdefault(r, []).append(i)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (drllm)")
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, attn = pad_batch([inputs[r][0] for r in chunk], pad)
            rmask = prefix_mask([inputs[r][1] for r in chunk], ids.shape[1])
            mixed = getattr(self, "mixed_precision_dtype", None)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=mixed, enabled=mixed is not None):
                logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                    routing_mask=rmask.to(self.device)).logits
            logp = F.log_softmax(logits, dim=-1, dtype=getattr(self, "softmax_dtype", None))
            for b, r in enumerate(chunk):
                _, n_ctx = inputs[r]
                for i in by_row[r]:
                    cont = plan[i][1]
                    # continuation token j is predicted at position n_ctx - 1 + j
                    lp = logp[b, n_ctx - 1 : n_ctx - 1 + len(cont)]
                    target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                    greedy = bool((lp.argmax(-1) == target).all())
                    answer = (float(lp.gather(-1, target[:, None]).sum()), greedy)
                    results[i] = answer
                    request_str = requests[i][0]
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    bar.update(1)
        bar.close()
        return results
