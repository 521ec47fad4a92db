"""Whole-step graphs: the decode step of one frozen path compiled as one graph, as compiled vanilla is one graph.

Regional compilation (:func:`drllm.compile`) calls one compiled block per
(block, pass): about 0.2-0.3 ms of dynamo's wrapper and guards per call on a
CPU, 30 calls per token. A frozen path is known before the decode step, so
the step can instead be the model class's own forward over a per-path view
of the model (:func:`path_view`): its decoder layer list is the path's
passes in order, each a :class:`PassBlock` that runs its block's class
forward with that (block, pass)'s slot as its cache, and its config says how
many passes there are and their attention types. The family's own code then
builds the masks (sliding windows included), the rotary embeddings and the
final norm, inside the graph.

The slots reach the graph as an input (:class:`PathCache`, the path's slot
layers in pass order), so one graph serves every sequence on that path.
Graphs are kept per path in a bounded LRU (:class:`PathGraphs`); each path
compiles its own copy of the step function's code object, so dynamo's cache
and recompile limit are per path and an evicted path's graphs go with its
code object. Batch sizes are not bucketed: as for compiled vanilla, dynamo
specialises batch 1 and, from a path's second batch size on, compiles one
graph for every size (automatic dynamic shapes), so a path needs at most
three graphs, and no row is padded. Only static full-attention cache slots
qualify (a dynamic cache changes shape every step); everything else falls
back to regional compilation.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
import types
from collections import OrderedDict

import torch
from torch import nn
from transformers.cache_utils import Cache

from .adapters import cache_kwarg
from .cache import slot_of
from .state import STATE_ATTR

DEFAULT_CAPACITY = 32  # paths whose graphs a model keeps; the budget routers' vocabulary is a few paths per budget


def path_slots(path: tuple, num_blocks: int) -> list[tuple[int, int]]:
    """``(block, slot)`` of each pass of ``path`` in execution order (slot ``L + i``: the repeat of block ``i``)."""
    return [(block, slot_of(block, bool(second), num_blocks)) for block, decision in enumerate(path)
            for second in range(decision)]


class PassBlock(nn.Module):
    """Pass ``index`` of a path: its block's class forward, given that pass's slot as its cache.

    The class forward, not the instance's: the patched instance forward reads
    the routing call from a context variable, which dynamo cannot trace, and
    a whole-step graph has no routing left to do.
    """

    def __init__(self, block: nn.Module, index: int, cache_name: str):
        super().__init__()
        self.block, self.index, self.cache_name = block, index, cache_name
        if hasattr(block, "attention_type"):
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        kwargs[self.cache_name] = kwargs[self.cache_name].views[self.index]
        return type(self.block).forward(self.block, hidden_states, *args, **kwargs)


def path_view(base: nn.Module, path: tuple, cache_name: str) -> nn.Module:
    """``base`` (the decoder model) seen along ``path``: its layers are the path's passes, in order.

    A shallow copy sharing every module and parameter of ``base``; its
    config is a copy whose ``num_hidden_layers`` (and ``layer_types``) count
    passes, not blocks.
    """
    L = len(base.layers)
    slots = path_slots(path, L)
    view = object.__new__(type(base))
    view.__dict__ = {k: v for k, v in base.__dict__.items() if k not in ("forward", STATE_ATTR)}
    view._modules = dict(base._modules)
    view._modules["layers"] = nn.ModuleList(PassBlock(base.layers[b], i, cache_name) for i, (b, _) in enumerate(slots))
    config = copy.copy(base.config)
    config.num_hidden_layers = len(slots)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [base.config.layer_types[b] for b, _ in slots]
    view.config = config
    return view


def child_name(top: nn.Module, base: nn.Module) -> str | None:
    """The attribute of ``top`` holding ``base`` (None: not a direct child)."""
    return next((key for key, module in top._modules.items() if module is base), None)


def model_view(top: nn.Module, base: nn.Module, view: nn.Module) -> nn.Module:
    """``top`` (the CausalLM) with its decoder ``base`` (a direct child) seen as ``view``: a shallow copy sharing
    every other module (the head), so a whole-step graph computes the logits too, as compiled vanilla's does."""
    name = child_name(top, base)
    copy_ = object.__new__(type(top))
    copy_.__dict__ = {k: v for k, v in top.__dict__.items() if k != "forward"}
    copy_._modules = {**top._modules, name: view}
    return copy_


class PathCache(Cache):
    """The cache a whole-step graph sees: the slot layers of one path's passes, in pass order.

    Mask sizes and positions come from the path's own slots (every one
    holds every row of the batch), and pass ``i`` writes through
    ``views[i]``, the routed cache's view of its slot.
    """

    def __init__(self, routed, slots: list[int]):
        super().__init__(layers=[routed.layers[s] for s in slots])
        self.views = [routed.views[s] for s in slots]


def decode_step(view: nn.Module, kwargs: dict):
    """One decode step of a path: the model class's forward over the path's view (what each graph compiles)."""
    return type(view).forward(view, **kwargs)


def fixed_slots(cache) -> bool:
    """Whether every slot of a routed cache is a fixed-size full-attention layer (transformers' ``StaticLayer``):
    a step's shapes then never change. Static sliding-window layers keep their fill level as a Python int, which a
    graph would be specialised on at every step."""
    return all(getattr(layer, "is_compileable", False) and not getattr(layer, "is_sliding", False)
               for layer in cache.layers)


def fixed_shapes(kwargs: dict, routed) -> dict:
    """A step's inputs with the same shapes at every step: the 2D padding mask zero-padded to the slots' length
    (transformers pads it so to build the mask of a static layer, so the mask is the same), and positions given
    (the routed cache's count of tokens seen, as the model would take them). Views are copied: a graph compiled
    for a view guards on its base, so a view (a whole batch's mask) and a tensor (a group's rows) would each
    compile a graph."""
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) and v._base is not None else v for k, v in kwargs.items()}
    tokens = kwargs.get("input_ids")
    tokens = tokens if tokens is not None else kwargs["inputs_embeds"]
    mask = kwargs.get("attention_mask")
    length = routed.layers[0].max_cache_len
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] < length:
        kwargs["attention_mask"] = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = (torch.arange(tokens.shape[1], device=tokens.device) + routed.seen_tokens)[None]
    return kwargs


def _own_function(fn, name: str):
    """``fn`` with a code object and globals of its own: dynamo keeps its compiled graphs (and recompile count) per
    code object (see :meth:`PathGraph.release`) and stores the compiled functions in the frame's globals: a dict
    per path keeps the module's clean."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, dict(fn.__globals__), name, fn.__defaults__, fn.__closure__)


class PathGraph:
    """The compiled decode step of one path: the path's view and its own compiled step function.

    ``users`` (threads inside :attr:`step`) and ``evicted`` are kept under
    :attr:`PathGraphs.lock`: an evicted graph is released only once no thread
    runs it.
    """

    def __init__(self, base: nn.Module, path: tuple, options: dict, top: nn.Module | None = None):
        self.slots = [slot for _, slot in path_slots(path, len(base.layers))]
        self.view = path_view(base, path, cache_kwarg(type(base.layers[0]).forward))
        if top is not None:
            self.view = model_view(top, base, self.view)
        digest = hashlib.sha1(bytes(path) + (b"model" if top is not None else b"")).hexdigest()[:12]
        self.function = _own_function(decode_step, f"drllm_step_{digest}")
        self.step = torch.compile(self.function, **options)
        self.users = 0
        self.evicted = False

    def release(self) -> None:
        """Drop dynamo's compiled graphs of this path (its cache entries hold them past the function's life)."""
        torch._dynamo.eval_frame.reset_code(self.function.__code__)


class PathGraphs:
    """A patched model's whole-step graphs per path and level, the least recently used evicted beyond ``capacity``.

    ``compile_seconds`` holds each graph's first call (tracing and compiling
    included), keyed as the graphs are, evicted ones too. Thread-safe: steps run outside
    :attr:`lock`, so a graph evicted while threads run it (or are about to)
    is released by the last of them; releasing it earlier would leave them
    to recompile onto a code object no LRU holds. A deep copy of the model
    starts with none.
    """

    def __init__(self, options: dict, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"path graph capacity must be >= 1, got {capacity}")
        self.options = {"fullgraph": True, **options}
        self.capacity = capacity
        self.graphs: OrderedDict = OrderedDict()
        self.compile_seconds: dict = {}
        self.lock = threading.Lock()

    def run(self, base: nn.Module, routed, path: tuple, kwargs: dict, cache_name: str, top: nn.Module | None = None):
        """The decode step of ``path`` over ``kwargs`` (every row on that path), the routed cache's slots given as
        the path's cache under ``cache_name``; compiled at the first call of its path. With ``top`` (see
        :func:`model_view`), ``kwargs`` are the CausalLM's and the graph computes the logits too; graphs are kept
        per ``(path, level)``, level ``"model"`` or ``"decoder"``."""
        key = (path, "decoder" if top is None else "model")
        with self.lock:
            graph = self.graphs.get(key)
            if graph is None:
                graph = self.graphs[key] = PathGraph(base, path, self.options, top)
                while len(self.graphs) > self.capacity:
                    self._evict(self.graphs.popitem(last=False)[1])
            self.graphs.move_to_end(key)
            graph.users += 1
            first = key not in self.compile_seconds
        try:
            kwargs = fixed_shapes(kwargs, routed)
            kwargs[cache_name] = PathCache(routed, graph.slots)
            start = time.perf_counter()
            out = graph.step(graph.view, kwargs)
        finally:
            with self.lock:
                graph.users -= 1
                if graph.evicted and graph.users == 0:
                    graph.release()
        if first:
            with self.lock:
                self.compile_seconds.setdefault(key, time.perf_counter() - start)
        return out

    @staticmethod
    def _evict(graph: PathGraph) -> None:
        """Mark ``graph`` (already out of the LRU) evicted; release it now if idle, else its last user will."""
        graph.evicted = True
        if graph.users == 0:
            graph.release()

    def __deepcopy__(self, memo):
        return PathGraphs(self.options, self.capacity)
