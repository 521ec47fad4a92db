"""drllm: dynamic layer routing (skip / execute / repeat) for frozen HF decoder LLMs.

The public names are imported on first use (PEP 562), so ``drllm --help`` and
``import drllm.cli`` do not pay for torch and transformers.
"""

from ._lazy import lazy_attributes

# public name -> the module defining it; a new public name is one line here
_LAZY = {
    "Routers": ".routing.routers",
    "patch": ".runtime.patch",
    "unpatch": ".runtime.patch",
    "is_patched": ".runtime.patch",
    "forced_paths": ".runtime.control",
    "last_paths": ".runtime.control",
    "set_lam": ".runtime.control",
    "set_budget": ".runtime.control",
    "BudgetRouters": ".routing.budget",
    "observe": ".runtime.control",
    "block_states": ".runtime.control",
    "compile": ".runtime.compile:compile_model",
    "as_paths": ".paths",
    "default_path": ".paths",
    "path_length": ".paths",
}

__all__ = list(_LAZY)
__version__ = "0.1.0"
__getattr__ = lazy_attributes(__name__, _LAZY, globals())


def __dir__():
    return sorted([*globals(), *_LAZY])
