"""Compiled decoding of a patched model: whole-step graphs per path, the decoder blocks (regional) for the rest."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import describe
from .path_graphs import DEFAULT_CAPACITY, PathGraphs
from .state import require_state

# Every model compiled this way shares one code object (decode_block), and with it dynamo's
# limit on recompilations (per batch size class, mask kind and cache kind): leave room for them.
RECOMPILE_LIMIT = 64


def compile_model(model: nn.Module, path_graphs: int = DEFAULT_CAPACITY, **options) -> nn.Module:
    """Compile a patched ``model`` for decoding; returns it.

    Public as ``drllm.compile``. A decode step on a static cache whose rows
    share one frozen path (or a group of rows that do, see
    :mod:`drllm.runtime.grouping`) runs that path's whole-step graph: the
    step compiled as one graph, as compiled vanilla is, kept per path in an
    LRU of ``path_graphs`` paths (0: none;
    :mod:`drllm.runtime.path_graphs`). Every other decode step runs the
    blocks compiled (regional compilation): one ``torch.compile`` of the
    block class's ``forward`` serves every block, pass and path, since
    parameters and cache slots are inputs of the graph, so a prompt with a
    new path compiles nothing there. The prefill (whole prompts of any
    length, and the routers) and the routing between regional blocks stay
    eager. ``options`` go to ``torch.compile`` (e.g.
    ``mode="reduce-overhead"`` for CUDA graphs). Compiling the whole model
    (``torch.compile(model.forward)``, or transformers' own compilation for
    static caches) also works: the routed forward is left to run eagerly
    inside it.
    """
    state = require_state(model)
    layers = describe(model).base.layers
    hooked = [i for i, layer in enumerate(layers) if state.own_forward(layer)]
    if hooked:
        raise ValueError(
            f"blocks {hooked} have their own forward (accelerate hooks?): drllm.compile compiles the block class's "
            "forward and would bypass them; compile a model that is not dispatched with accelerate"
        )
    if len({type(layer) for layer in layers}) != 1:
        raise ValueError("drllm.compile needs every decoder block to be of one class")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    state.compiled = torch.compile(decode_block, **{"fullgraph": True, **options})
    state.graphs = PathGraphs(options, path_graphs) if path_graphs else None
    return model


def decode_block(layer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """One block pass, as compiled by :func:`compile_model`: a code object of drllm's own, so that its compiled
    graphs never share dynamo's cache (and recompile limit) with other compilations of the block class."""
    return type(layer).forward(layer, hidden_states, *args, **kwargs)
