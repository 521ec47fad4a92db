"""The wrappers ``generate`` needs: the routing mask for every forward, no chunked prefill, paths on the output."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .forward import with_paths


def with_routing_mask(prepare):
    """``prepare_inputs_for_generation`` that also passes the 2D padding mask of the new tokens as ``routing_mask``.

    transformers turns the 2D mask into a 4D one before the forward for
    compileable (static) caches; the routers still need to know the padding.
    """
    signature = inspect.signature(prepare)

    def prepare_inputs_for_generation(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        if mask is None:
            mask = kwargs.get("attention_mask")
        tokens = inputs.get("input_ids")
        if tokens is None:
            tokens = inputs.get("inputs_embeds")
        if inputs.get("routing_mask") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None:
            inputs["routing_mask"] = mask[:, mask.shape[1] - tokens.shape[1]:]
        return inputs

    return prepare_inputs_for_generation


def routed_generate(model: nn.Module, generate):
    """``generate`` that refuses chunked prefill (routing decides once on the whole prompt, not on its first
    chunk) and, with ``return_dict_in_generate=True``, returns the rows' decisions as ``out.paths``."""
    signature = inspect.signature(generate)

    @functools.wraps(generate)
    def generate_routed(*args, **kwargs):
        config = signature.bind_partial(*args, **kwargs).arguments.get("generation_config") or model.generation_config
        size = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
        if size is not None:
            raise ValueError(
                f"prefill_chunk_size={size}: a routed model decides each row's path once on the whole prompt, "
                "so it cannot prefill in chunks; call generate without prefill_chunk_size"
            )
        return with_paths(generate)(*args, **kwargs)

    return generate_routed

