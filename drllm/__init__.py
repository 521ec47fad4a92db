"""drllm: dynamic layer routing (skip / execute / repeat) for frozen HF decoder LLMs."""

from .paths import as_paths, default_path, path_length
from .routers import Routers
from .runtime.patch import block_states, forced_paths, is_patched, last_paths, observe, patch, set_lam, unpatch

__all__ = [
    "Routers",
    "patch",
    "unpatch",
    "forced_paths",
    "last_paths",
    "set_lam",
    "observe",
    "block_states",
    "is_patched",
    "as_paths",
    "default_path",
    "path_length",
]
__version__ = "0.1.0"
