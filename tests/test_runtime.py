"""The routed runtime against vanilla models, explicit loops and full recomputation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaModel

import drllm
from drllm.runtime.adapters import cache_kwarg
from conftest import FAMILIES, VOCAB, explicit_logits, output_cache, random_batch, tiny_model, weights_hash

L = 4


def random_paths(batch: int, seed: int, num_blocks: int = L) -> torch.Tensor:
    """Random paths that skip and repeat the first and the last block in some rows."""
    g = torch.Generator().manual_seed(seed)
    paths = torch.randint(0, 3, (batch, num_blocks), generator=g)
    paths[0, 0], paths[0, -1] = 0, 2
    if batch > 1:
        paths[1, 0], paths[1, -1] = 2, 0
    paths[paths.sum(1) == 0, 1] = 1
    return paths


def generate(model, ids, mask, n=10, **kw):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=kw.pop("do_sample", False),
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def recompute_logits(model, sequences, mask, prompt_len):
    """Logits that predicted each generated token, from one cache-free forward."""
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], sequences.shape[1] - prompt_len, dtype=mask.dtype)], 1)
    logits = model(input_ids=sequences, attention_mask=full_mask, use_cache=False).logits
    return logits[:, prompt_len - 1 : -1]


@torch.no_grad()
def test_all_execute_is_vanilla(family):
    model = tiny_model(family)
    ids, mask = random_batch(3, 9, seed=1)
    ref_logits = model(input_ids=ids, attention_mask=mask).logits
    ref_seq, ref_gen = generate(model, ids, mask)
    drllm.patch(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref_logits)
    seq, gen = generate(model, ids, mask)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(gen, ref_gen)
    with drllm.forced_paths(model, torch.ones(L, dtype=torch.long)):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref_logits)
    assert torch.equal(drllm.last_paths(model), torch.ones(3, L, dtype=torch.long))


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_path_equals_explicit_loop(family, seed):
    model = tiny_model(family, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(1, VOCAB, (4, 11), generator=g)
    paths = random_paths(4, seed)
    with drllm.forced_paths(model, paths):
        batched = model(input_ids=ids).logits
    for row in range(4):
        expected = explicit_logits(model, ids[row], paths[row])
        torch.testing.assert_close(batched[row], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_cached_generation_matches_recomputation(family, seed, ops_backend):
    """Left-padded rows on different paths: the routed cache gives what recomputation gives."""
    model = tiny_model(family, seed=seed)
    ids, mask = random_batch(4, 9, seed=10 + seed)
    paths = random_paths(4, seed)
    with drllm.forced_paths(model, paths):
        seq, gen_logits = generate(model, ids, mask, n=12)
        assert torch.equal(drllm.last_paths(model), paths)
        full = recompute_logits(model, seq, mask, ids.shape[1])
    torch.testing.assert_close(gen_logits, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(seq[:, ids.shape[1] :], full.argmax(-1))


@torch.no_grad()
@pytest.mark.parametrize("keyword", sorted({"past_key_values", cache_kwarg(LlamaModel.forward)}))
def test_hand_driven_cache_matches_recomputation(keyword):
    """A decoding loop that passes the cache itself, by the current keyword or the deprecated one
    (transformers renamed ``past_key_values`` to ``cache`` in 5.24): each step's logits are what a
    cache-free forward of the whole sequence gives."""
    model = tiny_model("llama", seed=3)
    ids, mask = random_batch(3, 7, seed=31)
    paths = random_paths(3, seed=32)
    steps = torch.randint(1, VOCAB, (3, 4), generator=torch.Generator().manual_seed(33))
    with drllm.forced_paths(model, paths):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{keyword: DynamicCache()})
        cache, logits, full_mask = output_cache(out), [out.logits[:, -1]], mask
        for t in range(steps.shape[1]):
            full_mask = torch.cat([full_mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            out = model(input_ids=steps[:, t : t + 1], attention_mask=full_mask, use_cache=True, **{keyword: cache})
            assert output_cache(out) is cache
            logits.append(out.logits[:, -1])
        full = recompute_logits(model, torch.cat([ids, steps], 1), mask, ids.shape[1])
    torch.testing.assert_close(torch.stack(logits[:-1], 1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_sampling_and_static_cache_match_recomputation(family):
    model = tiny_model(family, seed=3)
    ids, mask = random_batch(3, 8, seed=5)
    paths = random_paths(3, seed=7)
    with drllm.forced_paths(model, paths):
        torch.manual_seed(0)
        seq, gen_logits = generate(model, ids, mask, n=9, do_sample=True, top_k=0)
        torch.testing.assert_close(gen_logits, recompute_logits(model, seq, mask, ids.shape[1]), rtol=1e-4, atol=1e-4)
        greedy, _ = generate(model, ids, mask, n=9)
        static, static_logits = generate(model, ids, mask, n=9, cache_implementation="static")
    assert torch.equal(static, greedy)
    torch.testing.assert_close(static_logits, recompute_logits_forced(model, static, mask, ids.shape[1], paths))


def recompute_logits_forced(model, sequences, mask, prompt_len, paths):
    with drllm.forced_paths(model, paths):
        return recompute_logits(model, sequences, mask, prompt_len)


@torch.no_grad()
def test_rows_are_independent(family, ops_backend):
    """Each row of a mixed, left-padded batch equals that row run alone."""
    model = tiny_model(family, seed=4)
    ids, mask = random_batch(5, 10, seed=6)
    paths = random_paths(5, seed=8)
    with drllm.forced_paths(model, paths):
        seq, gen_logits = generate(model, ids, mask, n=8)
    for row in range(5):
        real = ids[row][mask[row].bool()][None]
        with drllm.forced_paths(model, paths[row]):
            alone_seq, alone_logits = generate(model, real, torch.ones_like(real), n=8)
        assert torch.equal(alone_seq[0, real.shape[1] :], seq[row, ids.shape[1] :])
        torch.testing.assert_close(alone_logits[0], gen_logits[row], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_routers_decide_once_on_the_prompt(family, ops_backend):
    model = tiny_model(family, seed=5)
    routers = drllm.Routers.for_model(model, num_windows=3)
    ids, mask = random_batch(4, 9, seed=9)
    drllm.patch(model, routers)
    seq, gen_logits = generate(model, ids, mask, n=8)
    decided = drllm.last_paths(model)
    assert decided.shape == (4, L) and decided.min() >= 0 and decided.max() <= 2
    full = recompute_logits_forced(model, seq, mask, ids.shape[1], decided)
    torch.testing.assert_close(gen_logits, full, rtol=1e-4, atol=1e-4)
    # The prefill forward alone routes the same way.
    model(input_ids=ids, attention_mask=mask)
    assert torch.equal(drllm.last_paths(model), decided)


@torch.no_grad()
def test_routing_mask_pools_over_the_context_only():
    """Scoring context+continuation routes exactly as the context alone."""
    model = tiny_model("llama", seed=6)
    routers = drllm.Routers.for_model(model, num_windows=4)
    for mlp in routers.mlps:  # sharpen the routers so decisions vary
        mlp.fc2.weight.data *= 50
    drllm.patch(model, routers)
    ids, mask = random_batch(4, 8, seed=3, padding="right", min_len=3)
    model(input_ids=ids, attention_mask=mask)
    on_context = drllm.last_paths(model)
    assert len(set(map(tuple, on_context.tolist()))) > 1, "routers should disagree across rows"
    cont = torch.randint(1, VOCAB, (4, 5))
    # Append each row's continuation right after its context (right padding moves to the end).
    full = torch.zeros(4, 13, dtype=torch.long)
    full_mask = torch.zeros_like(full)
    ctx_mask = torch.zeros_like(full)
    for b in range(4):
        n = int(mask[b].sum())
        full[b, :n], full[b, n : n + 5] = ids[b, :n], cont[b]
        full_mask[b, : n + 5] = 1
        ctx_mask[b, :n] = 1
    model(input_ids=full, attention_mask=full_mask, routing_mask=ctx_mask)
    assert torch.equal(drllm.last_paths(model), on_context)


@torch.no_grad()
def test_lambda_knob_moves_decisions():
    model = tiny_model("qwen3", seed=7)
    routers = drllm.Routers.for_model(model)
    ids = torch.randint(1, VOCAB, (3, 6))
    drllm.patch(model, routers, lam=-1.0)
    model(input_ids=ids)
    assert torch.equal(drllm.last_paths(model), torch.zeros(3, L, dtype=torch.long))
    drllm.set_lam(model, 1.0)
    model(input_ids=ids)
    assert torch.equal(drllm.last_paths(model), torch.full((3, L), 2))
    drllm.set_lam(model, 0.0)
    model(input_ids=ids)
    free = drllm.last_paths(model)
    drllm.set_lam(model, 0.3)
    model(input_ids=ids)
    shifted = drllm.last_paths(model)
    assert (shifted >= free).all(), "a positive lambda never lowers a decision"
    with pytest.raises(ValueError, match="lam must be in"):
        drllm.set_lam(model, 1.5)


@torch.no_grad()
def test_unpatch_restores_and_weights_never_change(family):
    model = tiny_model(family, seed=8)
    before = weights_hash(model)
    keys = list(model.state_dict())
    ids, mask = random_batch(2, 7, seed=2)
    ref = model(input_ids=ids, attention_mask=mask).logits
    drllm.patch(model, drllm.Routers.for_model(model))
    assert list(model.state_dict()) == keys, "patching must not add parameters to the model"
    generate(model, ids, mask, n=4)
    with drllm.forced_paths(model, random_paths(2, 3)):
        generate(model, ids, mask, n=4)
    drllm.unpatch(model)
    assert not drllm.is_patched(model)
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    assert weights_hash(model) == before


def test_router_checkpoint_round_trip(tmp_path):
    model = tiny_model("mistral", seed=9)
    routers = drllm.Routers.for_model(model, num_windows=5)
    routers.save_pretrained(tmp_path)
    loaded = drllm.Routers.from_pretrained(tmp_path)
    assert loaded.config == routers.config
    for (k, a), (k2, b) in zip(routers.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b) and b.dtype == torch.float32
    ids = torch.randint(1, VOCAB, (3, 9))
    with torch.no_grad():
        drllm.patch(model, routers)
        model(input_ids=ids)
        first = drllm.last_paths(model)
        drllm.unpatch(model)
        drllm.patch(model, loaded)
        model(input_ids=ids)
    assert torch.equal(drllm.last_paths(model), first)


def test_router_parameters_stay_float32_for_bf16_models():
    model = tiny_model("llama").to(torch.bfloat16)
    routers = drllm.Routers.for_model(model)
    assert all(p.dtype == torch.float32 for p in routers.parameters())
    drllm.patch(model, routers)
    with torch.no_grad():
        model(input_ids=torch.randint(1, VOCAB, (2, 5)))
    assert drllm.last_paths(model).shape == (2, L)


@pytest.mark.parametrize(
    "other, problem",
    [
        (dict(family="llama", hidden_size=64), "hidden_size"),
        (dict(family="llama", num_layers=5), "num_blocks"),
        (dict(family="qwen2"), "model_type"),
    ],
)
def test_router_checkpoint_for_another_model_is_refused(tmp_path, other, problem):
    drllm.Routers.for_model(tiny_model("llama")).save_pretrained(tmp_path)
    routers = drllm.Routers.from_pretrained(tmp_path)
    family = other.pop("family")
    model = tiny_model(family, **other)
    with pytest.raises(ValueError, match=f"trained for another model.*{problem}"):
        drllm.patch(model, routers)
    assert not drllm.is_patched(model)


def test_missing_checkpoint_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="drllm_routers.json"):
        drllm.Routers.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "paths, message",
    [
        ([[1, 1, 1]], r"shape \[batch, 4\]"),
        ([[1, 1, 3, 1]], "0 \\(skip\\), 1 \\(execute\\) or 2 \\(repeat\\)"),
        ([[1, -1, 1, 1]], "0 \\(skip\\), 1 \\(execute\\) or 2 \\(repeat\\)"),
        ([[1.0, 1.0, 1.0, 1.0]], "integers"),
    ],
)
def test_invalid_paths_are_refused(paths, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        with drllm.forced_paths(model, paths):
            pass
    assert not drllm.is_patched(model)


def test_path_count_must_match_the_batch():
    model = tiny_model("llama")
    with drllm.forced_paths(model, [[1, 1, 1, 1], [1, 0, 1, 1]]):
        with pytest.raises(ValueError, match="2 paths for a batch of 3 rows"):
            model(input_ids=torch.randint(1, VOCAB, (3, 4)))


def test_empty_prompts_are_refused():
    model = tiny_model("llama")
    drllm.patch(model, drllm.Routers.for_model(model))
    with pytest.raises(ValueError, match="empty prompt"):
        model(input_ids=torch.zeros(2, 0, dtype=torch.long))
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="empty prompt"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=mask)


def test_patching_twice_and_unsupported_models_are_refused():
    model = tiny_model("llama")
    drllm.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        drllm.patch(model)
    drllm.unpatch(model)
    with pytest.raises(RuntimeError, match="not patched"):
        drllm.unpatch(model)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="llama, mistral, qwen2, qwen3"):
        drllm.patch(gpt2)


@torch.no_grad()
def test_num_return_sequences_expands_paths():
    model = tiny_model("qwen2", seed=2)
    ids, mask = random_batch(2, 6, seed=4)
    paths = random_paths(2, 5)
    with drllm.forced_paths(model, paths):
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=3,
                       max_new_tokens=3, pad_token_id=0)
        assert torch.equal(drllm.last_paths(model), paths.repeat_interleave(3, dim=0))


@torch.no_grad()
def test_prefix_reuse_equals_full_forward(family, ops_backend):
    """Rows that start from stored default-path states score as a full forward does."""
    model = tiny_model(family, seed=11)
    ids, mask = random_batch(3, 8, seed=12, padding="right")
    states = drllm.block_states(model, input_ids=ids, attention_mask=mask)
    assert len(states) == L and all(s.shape == (3, 8, 48) for s in states)
    candidates = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1], [1, 2, 1, 0], [1, 1, 1, 2]])
    paths = candidates.repeat_interleave(3, dim=0)  # every candidate on every input row
    sources = torch.arange(3).repeat(len(candidates))
    rows_ids, rows_mask = ids[sources], mask[sources]
    with drllm.forced_paths(model, paths):
        full = model(input_ids=rows_ids, attention_mask=rows_mask, use_cache=False).logits
    rows_run = []
    hooks = [blk.self_attn.register_forward_hook(lambda m, a, kw, out: rows_run.append(kw["hidden_states"].shape[0]),
                                                 with_kwargs=True) for blk in model.model.layers]
    with drllm.forced_paths(model, paths, prefix=(states, sources)):
        reused = model(input_ids=rows_ids, attention_mask=rows_mask, use_cache=False).logits
        assert torch.equal(drllm.last_paths(model), paths)
    for h in hooks:
        h.remove()
    # Block applications actually run: each row from its first edit (the last block for the default path).
    first_edit = [next((i for i, d in enumerate(p) if d != 1), L - 1) for p in candidates.tolist()]
    expected = sum(sum(p[k:]) for p, k in zip(candidates.tolist(), first_edit)) * 3
    assert sum(rows_run) == expected < int(paths.sum())
    torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="use_cache=False"):
        with drllm.forced_paths(model, paths, prefix=(states, sources)):
            model(input_ids=rows_ids, attention_mask=rows_mask)


@torch.no_grad()
def test_each_call_returns_its_own_decisions(family):
    """A call's decisions come back on its output (forward, base model, generate), not through a side channel."""
    model = tiny_model(family)
    routers = drllm.Routers.for_model(model)
    torch.manual_seed(3)
    for mlp in routers.mlps:
        torch.nn.init.normal_(mlp.fc2.bias, std=2.0)
    drllm.patch(model, routers, max_skip_run=None)
    ids_a, mask_a = random_batch(3, 9, seed=4)
    ids_b, mask_b = random_batch(2, 7, seed=5)
    out_a = model(input_ids=ids_a, attention_mask=mask_a)
    out_b = model.model(input_ids=ids_b, attention_mask=mask_b)
    assert out_a.paths.shape == (3, L) and out_b.paths.shape == (2, L)
    assert torch.equal(out_b.paths, drllm.last_paths(model)), "last_paths is the last call's decisions"
    with drllm.forced_paths(model, out_a.paths):
        assert torch.equal(model(input_ids=ids_a, attention_mask=mask_a).logits, out_a.logits)
    gen = model.generate(input_ids=ids_a, attention_mask=mask_a, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert torch.equal(gen.paths, out_a.paths), "routed once on the prompt, as the prompt's forward is"
    assert torch.equal(gen.past_key_values.decisions, gen.paths)
    with drllm.forced_paths(model, [0, 1, 2, 1]):
        forced = model(input_ids=ids_b, attention_mask=mask_b)
    assert forced.paths.tolist() == [[0, 1, 2, 1]] * 2
    drllm.unpatch(model)
    assert "paths" not in model(input_ids=ids_b, attention_mask=mask_b), "unpatched outputs are transformers' own"
