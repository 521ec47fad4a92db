"""The routed runtime, along the pipeline: plan (which rows run each pass), executor (runs the plan over the
blocks), cache (one slot per block pass), forward and generation (the wrappers), patch (installs and removes
them), control (per-caller settings), compile (compiled decoding), adapters (per-architecture knowledge)."""
