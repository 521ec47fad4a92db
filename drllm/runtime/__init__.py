"""The routed runtime: executor, routed KV cache and per-architecture adapters."""
