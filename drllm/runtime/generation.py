"""The wrappers ``generate`` needs: the routing mask for every forward, one routing per generation, paths on the
output.

A routed ``generate`` marks its forwards as one generation
(:func:`~drllm.runtime.forward.generating`): the routers pool over the
prompt only (not the drafts of prompt lookup or assisted decoding), the
prompt's decisions hold for every step (also with ``use_cache=False``), and
one forced path per prompt follows transformers' expansion of the prompts
for beams and ``num_return_sequences``. Like the forwards, the wrappers are
``functools.partial`` objects that keep the wrapped method's signature
(transformers inspects it) and follow the model into a deep copy.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .cache import routed_cache
from .forward import forward_with_paths, generating
from .state import RoutingState


@functools.lru_cache(maxsize=None)
def _function_signature(function) -> inspect.Signature:
    signature = inspect.signature(function)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def method_signature(method) -> inspect.Signature:
    """The signature of a bound method (computed once per function)."""
    function = getattr(method, "__func__", None)
    return _function_signature(function) if function is not None else inspect.signature(method)


def with_routing_mask(prepare):
    """``prepare_inputs_for_generation`` that also passes the 2D padding mask of the new tokens as ``routing_mask``.

    transformers turns the 2D mask into a 4D one before the forward for
    compileable (static) caches; the routers still need to know the padding.
    The wrapper has ``prepare``'s signature: ``generate`` reads it (e.g. to
    accept ``inputs_embeds``).
    """
    return functools.update_wrapper(functools.partial(prepare_with_routing_mask, prepare), prepare)


def prepare_with_routing_mask(prepare, *args, **kwargs):
    inputs = prepare(*args, **kwargs)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = method_signature(prepare).bind_partial(*args, **kwargs).arguments.get("attention_mask")
    tokens = inputs.get("input_ids")
    if tokens is None:
        tokens = inputs.get("inputs_embeds")
    if inputs.get("routing_mask") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2 and tokens is not None:
        inputs["routing_mask"] = mask[:, mask.shape[1] - tokens.shape[1]:]
    return inputs


def routed_generate(model: nn.Module, generate, state: RoutingState):
    """``generate`` that refuses chunked prefill (routing decides once on the whole prompt, not on its first
    chunk), routes once per generation on the prompt and, with ``return_dict_in_generate=True``, returns one
    path per output sequence as ``out.paths``."""
    return functools.update_wrapper(functools.partial(generate_routed, model, generate, state), generate)


def generate_routed(model: nn.Module, generate, state: RoutingState, *args, **kwargs):
    arguments = method_signature(generate).bind_partial(*args, **kwargs).arguments
    extra = next((v for k, v in arguments.items() if k == "kwargs" and isinstance(v, dict)), {})
    config = arguments.get("generation_config") or model.generation_config
    size = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
    if size is not None:
        raise ValueError(
            f"prefill_chunk_size={size}: a routed model decides each row's path once on the whole prompt, "
            "so it cannot prefill in chunks; call generate without prefill_chunk_size"
        )
    for key in ("cache", "past_key_values"):
        given = kwargs.get(key)
        routed = routed_cache(given) if given is not None else None
        if routed is not None and routed is not given and routed.decisions is not None:
            kwargs[key] = routed  # the caller's own cache object stands for the routed cache attached to it
    prompt = extra.get("inputs_embeds")
    if prompt is None:
        prompt = arguments.get("inputs")
    if prompt is None:
        prompt = extra.get("input_ids")
    shape = prompt.shape if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else (None, None)
    with generating(state, shape[1], shape[0]):
        out = forward_with_paths(generate, *args, **kwargs)
    return _one_path_per_sequence(out, shape[0])


def _one_path_per_sequence(out, prompts: int | None):
    """``out.paths`` with one row per returned sequence: beam search runs ``num_beams`` rows per prompt but
    returns ``num_return_sequences``, and every row of a prompt has the prompt's path."""
    paths = out.get("paths") if hasattr(out, "keys") else None
    sequences = out.get("sequences") if paths is not None else None
    if sequences is None or not prompts or paths.shape[0] == sequences.shape[0]:
        return out
    if paths.shape[0] % prompts or sequences.shape[0] % prompts:
        return out
    grouped = paths.view(prompts, paths.shape[0] // prompts, -1)
    if bool((grouped == grouped[:, :1]).all()):
        out["paths"] = grouped[:, 0].repeat_interleave(sequences.shape[0] // prompts, dim=0)
    return out
