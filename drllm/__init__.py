"""drllm: dynamic layer routing (skip / execute / repeat) for frozen HF decoder LLMs.

The public names are imported on first use (PEP 562), so ``drllm --help`` and
``import drllm.cli`` do not pay for torch and transformers.
"""

import importlib

# public name -> the module defining it; a new public name is one line here
_LAZY = {
    "Routers": ".routers",
    "patch": ".runtime.patch",
    "unpatch": ".runtime.patch",
    "forced_paths": ".runtime.patch",
    "last_paths": ".runtime.patch",
    "set_lam": ".runtime.patch",
    "observe": ".runtime.patch",
    "block_states": ".runtime.patch",
    "is_patched": ".runtime.patch",
    "as_paths": ".paths",
    "default_path": ".paths",
    "path_length": ".paths",
}

__all__ = list(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
