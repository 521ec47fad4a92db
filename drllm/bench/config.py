"""What a ``drllm bench`` run measures: the sizes of each suite, and random-weight models of published shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Random-weight models with published configurations (speed does not depend on the weights).
RANDOM_CONFIGS = {
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                         tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5),
    # for tests and smoke runs
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096),
}


def random_model(name: str, device="cpu", dtype: torch.dtype | None = None, seed: int = 0):
    """A random-weight Llama with the configuration ``name`` (a key of :data:`RANDOM_CONFIGS`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random model {name!r}; choose from {', '.join(RANDOM_CONFIGS)}")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = LlamaConfig(**RANDOM_CONFIGS[name], bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with device:  # initialise on the target device (an 8B model in fp32 on the host would be 32 GB)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@dataclass
class BenchConfig:
    suites: tuple = ("routing", "generation", "throughput", "policy", "grouping", "compile", "kernels")
    repeats: int = 3
    prefill_lengths: tuple = (128, 512, 2048)
    prompt_length: int = 32
    gen_tokens: tuple = (256, 1000)
    skip_counts: tuple = (3, 5, 8)
    batch_sizes: tuple = (1, 2, 4, 8, 16, 32, 64)
    throughput_tokens: int = 32
    policy_batches: tuple = (4, 16, 64)
    policy_fractions: tuple = (0.25, 0.5, 0.75, 0.9)
    policy_tokens: int = 16
    compile_tokens: int = 64
    compile_mode: str | None = None  # torch.compile mode of suites compile and throughput ("reduce-overhead": CUDA graphs)
    compile_backend: str | None = None  # torch.compile backend of those suites (None: inductor; tests use "eager")
    tokenizer: str | None = None  # suites throughput and compile: prompts are cfg.task's questions (None: random tokens)
    task: str = "arc_easy"
    routers: str | None = None  # BudgetRouters directory (`drllm train --budget`); None: a stand-in (workload.py)
    budget: int = 8  # blocks the budget routers skip per row
    grouping_batch: int = 16  # suite grouping: batch split between two paths
    grouping_rows: tuple = (1, 2, 4, 8)  # suite grouping: rows on the second path
    warmup: bool = True  # an untimed round of every variant before the timed ones
    seed: int = 0

    @classmethod
    def for_run(cls, quick: bool, device: torch.device, **overrides) -> "BenchConfig":
        cuda = torch.device(device).type == "cuda"
        if quick:
            cfg = cls(repeats=1, prefill_lengths=(128, 512), prompt_length=16, gen_tokens=(4, 8),
                      batch_sizes=(1, 4, 16), throughput_tokens=4, policy_batches=(8, 32),
                      policy_fractions=(0.5, 0.875), policy_tokens=2, compile_tokens=8, warmup=False)
            if cuda:
                cfg = cls(repeats=3, gen_tokens=(64, 128), batch_sizes=(1, 8, 32, 128), throughput_tokens=32,
                          policy_batches=(8, 128), policy_fractions=(0.5, 0.875), compile_tokens=64,
                          compile_mode="reduce-overhead")
        else:
            cfg = cls()
            if cuda:
                cfg = cls(repeats=5, batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128), throughput_tokens=64,
                          policy_batches=(4, 16, 64, 128), policy_fractions=(0.25, 0.5, 0.75, 0.9, 0.97),
                          policy_tokens=32, compile_tokens=128, compile_mode="reduce-overhead")
        for name, value in overrides.items():
            if value is not None:
                setattr(cfg, name, value)
        return cfg
