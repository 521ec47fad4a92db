"""Per-architecture knowledge: where the decoder blocks live and what is supported.

Llama, Qwen2, Qwen3 and Mistral share the transformers 5.x decoder layout
(``model.model.layers``, layers called with keyword arguments, K/V written
through ``cache.update(k, v, layer_idx)``), so one adapter serves all four; a
new family is added here once checked against the tests. The cache keyword is
``cache`` from transformers 5.24 and ``past_key_values`` before
(:func:`cache_kwarg`). A PEFT wrapper is seen through (:func:`unwrap`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    hidden_size: int
    num_blocks: int
    device: torch.device
    base: nn.Module  # the module owning ``layers`` (e.g. LlamaModel)


def cache_kwarg(forward) -> str:
    """The keyword ``forward`` takes its KV cache by: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (``PeftModel.get_base_model()``), else ``model`` itself.

    A LoRA-wrapped model is patched where transformers' own model is: its
    adapters live inside the blocks, and the wrapper's forward and
    ``generate`` reach the patched ones.
    """
    get_base_model = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(get_base_model) else model


def decoder(model: nn.Module) -> nn.Module:
    """The module holding the decoder blocks: ``model.model`` for a CausalLM, else ``model``."""
    model = unwrap(model)
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise TypeError(
        f"{type(model).__name__} has no decoder blocks at `.layers` or `.model.layers`; "
        f"drllm supports Hugging Face decoder models of types {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def describe(model: nn.Module) -> ModelInfo:
    """Check that ``model`` is supported and return what the runtime needs to know."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"unsupported architecture {model_type!r}: drllm supports model_type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    base = decoder(model)
    return ModelInfo(model_type, config.hidden_size, len(base.layers), execution_device(model), base)


def dispatched_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on (``dispatch_model`` / ``device_map``), or None without a hook."""
    hooks = [getattr(module, "_hf_hook", None)]
    hooks += list(getattr(hooks[0], "hooks", ()))  # a SequentialHook holds several
    for hook in hooks:
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def execution_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its accelerate execution device, else its first parameter not offloaded to meta."""
    device = dispatched_device(model)
    if device is not None:
        return device
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    for module in model.modules():
        device = dispatched_device(module)
        if device is not None:
            return device
    return torch.device("cpu")
