"""A patched model keeps Hugging Face's contract however a transformers user calls it (issue 20).

Each test compares against vanilla transformers on the same tiny model,
against each prompt alone, or against the routed model's own greedy
``generate``. Routers are confident (logits far apart) or sensitive (centred
on other prompts), so that pooling the wrong tokens or losing a row's path
changes decisions and tokens. The closing note of issue 20 names the test of
each numbered item: 1 manual_decode_loop, 2 speculative_decoding and
crop_skips_slots, 3 uncached_generation, 4 inputs_embeds, 5 deep_copied_cache
and deep_copy_of_a_patched_model, 6 beam_search_* and reordered_rows,
7 forced_paths_are_one_or_one_per_row, 8 last_paths_belongs_to_each_asyncio_task,
9 output_attentions (and output_hidden_states), 10 tests/test_lm_eval.py's
drllm_lm_eval_runs_lm_evals_command_line, 11 lora_wrapped_model.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from transformers import DynamicCache, LlamaModel

import drllm
from drllm.runtime import plan
from drllm.runtime.adapters import cache_kwarg
from conftest import VOCAB, output_cache, random_batch, tiny_model
from test_runtime import random_paths
from test_runtime_modes import confident_routers

L = 4
CACHE = cache_kwarg(LlamaModel.forward)  # ``cache`` from transformers 5.24, ``past_key_values`` before

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(model, ids, mask=None, n=8, **kwargs):
    """``generate`` with the dict output: sequences, per-step logits and ``paths`` (routed models)."""
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=kwargs.pop("do_sample", False), pad_token_id=0, return_dict_in_generate=True,
                          **kwargs)


def routed_model(family: str, seed: int = 0, **kwargs):
    model = tiny_model(family, seed=seed, **kwargs)
    return drllm.patch(model, confident_routers(model, seed=seed))


def sensitive_routers(model, scale: float = 30.0) -> drllm.Routers:
    """Routers centred on a set of random prompts (their mean logits are zero), then sharpened: decisions
    differ across prompts and move when the routers pool over other tokens than a prompt's, yet a prompt's
    own decisions are not ties."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        routers = drllm.Routers.for_model(model, num_windows=2)
    ids, mask = random_batch(8, 12, seed=99)
    states = drllm.block_states(model, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        for i, mlp in enumerate(routers.mlps):
            mlp.fc2.weight.mul_(scale)
            mlp.fc2.bias.sub_(routers.logits(i, states[i], mask).mean(0))
    return routers


def decode_by_hand(model, ids, mask, n: int, keyword: str = CACHE) -> torch.Tensor:
    """The manual decoding loop of transformers' cache docs: the user's own DynamicCache, passed back each step."""
    cache = DynamicCache(config=model.config)
    inputs, generated = {"input_ids": ids, "attention_mask": mask}, ids
    for _ in range(n):
        out = model(**inputs, use_cache=True, **{keyword: cache})
        token = out.logits[:, -1:].argmax(-1)
        generated = torch.cat([generated, token], dim=-1)
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(ids.shape[0], 1)], dim=-1)
        inputs = {"input_ids": token, "attention_mask": mask}
    return generated


# -- 1. a manual decode loop with the user's own cache object ----------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("keyword", sorted({"past_key_values", CACHE}))
def test_manual_decode_loop_with_the_users_cache_object(family, keyword):
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    vanilla = tiny_model(family, seed=2)
    want = decode_by_hand(vanilla, ids, mask, 10, keyword)
    assert torch.equal(want, greedy(vanilla, ids, n=10).sequences), "vanilla: the loop is greedy decoding"
    drllm.patch(vanilla)  # no routers: every block once, exactly vanilla
    assert torch.equal(decode_by_hand(vanilla, ids, mask, 10, keyword), want)

    routed = routed_model(family, seed=2)
    out = greedy(routed, ids, n=10)
    assert not (out.paths == 1).all(), "the routers must route for this test to bite"
    assert torch.equal(decode_by_hand(routed, ids, mask, 10, keyword), out.sequences)
    # generate given the user's object twice (a chat's turns): the second call continues the first
    cache = DynamicCache(config=routed.config)
    first = greedy(routed, ids, n=4, **{keyword: cache})
    second = greedy(routed, first.sequences, n=6, **{keyword: cache})
    assert torch.equal(second.sequences, out.sequences) and torch.equal(second.paths, out.paths)


# -- 2. speculative decoding: prompt lookup and a draft model ---------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_speculative_decoding_routes_on_the_prompt_only(family):
    """Prompt lookup and assisted decoding give greedy's tokens and paths: the drafts appended to the first
    forward never reach the routers (Mistral's window of 7 is crossed, and the cache is cropped)."""
    model = tiny_model(family, seed=3)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6]])  # repeats: prompt lookup finds drafts
    drllm.patch(model, sensitive_routers(model), max_skip_run=None)
    want = greedy(model, ids, n=12)
    draft = tiny_model(family, seed=9, num_layers=2)
    routed_draft = routed_model(family, seed=9, num_layers=2)
    for kwargs in (dict(prompt_lookup_num_tokens=4), dict(assistant_model=draft),
                   dict(assistant_model=routed_draft)):
        got = greedy(model, ids, n=12, **kwargs)
        assert torch.equal(got.paths, want.paths), kwargs
        assert torch.equal(got.sequences, want.sequences), kwargs


@torch.no_grad()
def test_crop_skips_slots_no_row_fills():
    """A sliding-window cache cropped after a prefill whose second-pass slots stay empty."""
    model = drllm.patch(tiny_model("mistral", seed=1))
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    template = DynamicCache(config=model.config)
    template.activate_past_recording()  # as assisted decoding does: a window that was crossed can be cropped
    with drllm.forced_paths(model, [1, 0, 1, 1]):
        cache = output_cache(model(input_ids=ids, use_cache=True, **{CACHE: template}))
        cache.crop(-3)
        assert cache.get_seq_length() == 9
        step = model(input_ids=ids[:, 9:10], use_cache=True, **{CACHE: cache}).logits[:, -1]
        full = model(input_ids=ids[:, :10], use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


# -- 3. use_cache=False ------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_uncached_generation_keeps_the_prompts_decisions(family):
    model = tiny_model(family, seed=4)
    ids, mask = random_batch(4, 10, seed=5)
    drllm.patch(model, sensitive_routers(model), max_skip_run=None)
    want = greedy(model, ids, mask, n=8)
    got = greedy(model, ids, mask, n=8, use_cache=False)
    assert torch.equal(got.paths, want.paths)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(drllm.last_paths(model), want.paths), "every uncached step ran the prompt's paths"


# -- 4. inputs_embeds --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_generate_from_inputs_embeds():
    ids, mask = random_batch(3, 8, seed=6)
    vanilla = tiny_model("llama", seed=5)
    embeds = vanilla.get_input_embeddings()(ids)
    want = vanilla.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            pad_token_id=0)
    drllm.patch(vanilla)
    assert torch.equal(vanilla.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6,
                                        do_sample=False, pad_token_id=0), want)
    routed = routed_model("llama", seed=5)
    by_ids = greedy(routed, ids, mask, n=6)
    by_embeds = routed.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(by_embeds.paths, by_ids.paths)
    assert torch.equal(by_embeds.sequences, by_ids.sequences[:, ids.shape[1]:])


# -- 5. deep copies ----------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_deep_copied_cache_reuses_a_prompt(family):
    """Transformers' prompt reuse: a prefix's cache deep-copied for each continuation. The prefix's decisions
    hold for the continuation (nothing but the prompt routes), as forcing them on the whole prompt gives."""
    model = routed_model(family, seed=6)
    prefix = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))
    users = DynamicCache(config=model.config)
    out = model(input_ids=prefix, use_cache=True, **{CACHE: users})
    prompt_cache, decided = output_cache(out), out.paths
    for seed, reused in ((8, prompt_cache), (9, users), (10, prompt_cache)):  # the output's cache or the user's
        suffix = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(seed))
        whole = torch.cat([prefix, suffix], dim=1)
        got = greedy(model, whole, n=6, **{CACHE: copy.deepcopy(reused)})
        with drllm.forced_paths(model, decided):
            want = greedy(model, whole, n=6)
        assert torch.equal(got.sequences, want.sequences)
        assert torch.equal(got.paths, decided)
        assert prompt_cache.get_seq_length() == 9, "the copy, not the prompt's cache, was extended"


@torch.no_grad()
def test_deep_copy_of_a_patched_model_is_a_patched_copy():
    """A reference/EMA copy: the copy routes with its own weights and routers; the original is untouched."""
    model = routed_model("llama", seed=7)
    ids, mask = random_batch(3, 9, seed=8)
    before = model(input_ids=ids, attention_mask=mask)
    twin = copy.deepcopy(model)
    same = twin(input_ids=ids, attention_mask=mask)
    assert torch.equal(same.logits, before.logits) and torch.equal(same.paths, before.paths)
    with torch.no_grad():
        for p in twin.model.layers[1].parameters():
            p.mul_(1.5)  # an EMA step, say
    # the reference: a fresh vanilla model with the same change, patched with the same routers
    reference = tiny_model("llama", seed=7)
    for p in reference.model.layers[1].parameters():
        p.mul_(1.5)
    drllm.patch(reference, copy.deepcopy(drllm.runtime.state.state_of(twin).routers))
    changed, want = twin(input_ids=ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
    assert torch.equal(changed.logits, want.logits) and torch.equal(changed.paths, want.paths)
    assert not torch.equal(changed.logits, before.logits)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before.logits), "the original is untouched"
    assert torch.equal(greedy(twin, ids, mask, n=4).sequences, greedy(reference, ids, mask, n=4).sequences)
    drllm.unpatch(twin)
    assert drllm.is_patched(model) and not drllm.is_patched(twin)
    assert all("forward" not in vars(m) for m in twin.modules())


# -- 6. beam search ----------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_beam_search_rows_equal_each_prompt_alone(family):
    """Prompts on different paths, in one left-padded batch, beam-searched: each equals that prompt alone."""
    model = routed_model(family, seed=8)
    ids, mask = random_batch(3, 10, seed=9)
    beams = dict(num_beams=3, num_return_sequences=2, output_scores=True)
    out = greedy(model, ids, mask, n=7, **beams)
    assert out.paths.shape == (6, L)
    assert len({tuple(p) for p in out.paths.tolist()}) > 1, "prompts must take different paths for this test to bite"
    for row in range(3):
        real = ids[row : row + 1, mask[row].bool()]
        alone = greedy(model, real, n=7, **beams)
        assert torch.equal(alone.paths, out.paths[2 * row : 2 * row + 2])
        assert torch.equal(alone.sequences[:, real.shape[1]:], out.sequences[2 * row : 2 * row + 2, ids.shape[1]:])
        torch.testing.assert_close(alone.sequences_scores, out.sequences_scores[2 * row : 2 * row + 2],
                                   rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("sample", [False, True])
def test_beam_search_on_the_default_path_is_vanilla(sample):
    ids, mask = random_batch(2, 8, seed=10)
    model = tiny_model("llama", seed=9)
    kwargs = dict(num_beams=3, num_return_sequences=2, do_sample=sample, output_scores=True)
    torch.manual_seed(0)
    want = greedy(model, ids, mask, n=6, **kwargs)
    drllm.patch(model)
    torch.manual_seed(0)
    got = greedy(model, ids, mask, n=6, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.sequences_scores, want.sequences_scores)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["gather", "select"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_reordered_rows_keep_their_paths(family, policy):
    """Rows on mixed paths reordered (beam_idx), selected and repeated: the next steps give what recomputing
    the reordered sequences on the reordered paths gives."""
    model = drllm.patch(tiny_model(family, seed=10))
    paths = random_paths(4, seed=11)
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(12))
    steps = torch.randint(1, VOCAB, (6, 3), generator=torch.Generator().manual_seed(13))
    previous = plan.set_row_policy(policy)
    try:
        with drllm.forced_paths(model, paths):
            cache = output_cache(model(input_ids=ids, use_cache=True))
        for op, rows in (("reorder_cache", [2, 0, 0, 3]), ("batch_select_indices", [3, 0, 1]),
                         ("batch_repeat_interleave", 2)):
            if op == "batch_repeat_interleave":
                cache.batch_repeat_interleave(rows)
                index = torch.arange(ids.shape[0]).repeat_interleave(rows)
            else:
                index = torch.tensor(rows)
                getattr(cache, op)(index)
            ids, paths = ids[index], paths[index]
            assert torch.equal(cache.decisions, paths), op
            step = steps[: ids.shape[0], :1]
            got = model(input_ids=step, use_cache=True, **{CACHE: cache})
            assert torch.equal(got.paths, paths), op
            ids = torch.cat([ids, step], dim=1)
            with drllm.forced_paths(model, paths):
                want = model(input_ids=ids, use_cache=False).logits[:, -1]
            torch.testing.assert_close(got.logits[:, -1], want, rtol=1e-4, atol=1e-5, msg=op)
    finally:
        plan.restore_row_policy(previous)


# -- 7. forced path counts ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_forced_paths_are_one_or_one_per_row():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))
    two = [[1, 0, 1, 1], [1, 2, 1, 1]]
    with drllm.forced_paths(model, two):
        with pytest.raises(ValueError, match="2 paths for a batch of 4 rows"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="2 paths for a batch of 4 rows"):
            model.generate(input_ids=ids, max_new_tokens=2, pad_token_id=0)
        # one path per prompt: transformers repeats each prompt for its returned sequences, and the paths follow
        out = greedy(model, ids[:2], n=2, num_return_sequences=2, do_sample=True)
        assert out.paths.tolist() == [two[0], two[0], two[1], two[1]]
    with drllm.forced_paths(model, two[1]):
        assert model(input_ids=ids).paths.tolist() == [two[1]] * 4


# -- 8. decisions per call ---------------------------------------------------------------------------------------


def test_last_paths_belongs_to_each_asyncio_task():
    model = routed_model("llama", seed=11)
    inputs = [random_batch(2, 7 + k, seed=20 + k) for k in range(2)]
    with torch.no_grad():
        alone = [model(input_ids=ids, attention_mask=mask).paths for ids, mask in inputs]
    assert not torch.equal(alone[0], alone[1])

    async def caller(k: int, barrier: list):
        ids, mask = inputs[k]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
            gen = greedy(model, ids, mask, n=2)
        barrier.append(k)
        while len(barrier) < 2:  # both tasks have run their calls before either reads back
            await asyncio.sleep(0)
        return out.paths, gen.paths, drllm.last_paths(model)

    async def main():
        barrier: list = []
        return await asyncio.gather(caller(0, barrier), caller(1, barrier))

    for k, (own, generated, last) in enumerate(asyncio.run(main())):
        assert torch.equal(own, alone[k]) and torch.equal(generated, alone[k])
        assert torch.equal(last, alone[k]), f"task {k} read another task's decisions"


# -- 9. output_attentions and output_hidden_states ---------------------------------------------------------------


@torch.no_grad()
def test_output_attentions_is_transformers_layout_or_refused():
    ids, mask = random_batch(3, 8, seed=14)
    model = tiny_model("llama", seed=12, attn="eager")  # sdpa returns no attention maps
    want = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    drllm.patch(model)
    got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == L and all(torch.equal(a, b) for a, b in zip(got, want))
    with drllm.forced_paths(model, random_paths(3, seed=15)):
        with pytest.raises(ValueError, match="output_attentions=True is refused on a routed path"):
            model(input_ids=ids, attention_mask=mask, output_attentions=True)
        with pytest.raises(ValueError, match="output_attentions"):
            greedy(model, ids, mask, n=2, output_attentions=True)
    drllm.unpatch(model)
    drllm.patch(model, confident_routers(model))
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


@torch.no_grad()
def test_output_hidden_states_has_one_entry_per_block_on_each_rows_path():
    ids, mask = random_batch(3, 8, seed=16)
    model = tiny_model("qwen2", seed=13)
    paths = random_paths(3, seed=17)
    entering = [None] * L
    with drllm.forced_paths(model, paths), drllm.observe(model, entering.__setitem__):
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hidden) == L + 1 and all(h.shape == (3, 8, 48) for h in hidden)
    for block in range(L):  # entry i: the hidden state entering block i on each row's path
        assert torch.equal(hidden[block], entering[block])


# -- 11. PEFT ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_lora_wrapped_model_patches_routes_exactly_and_unpatches():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", seed=14)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    ids, mask = random_batch(3, 9, seed=18)
    vanilla = wrapped(input_ids=ids, attention_mask=mask).logits
    merged = copy.deepcopy(wrapped).merge_and_unload()  # the same weights, without the adapter layers
    routers = confident_routers(merged, seed=14)
    drllm.patch(merged, copy.deepcopy(routers))
    drllm.patch(wrapped, routers)
    assert drllm.is_patched(wrapped)
    got, want = wrapped(input_ids=ids, attention_mask=mask), merged(input_ids=ids, attention_mask=mask)
    assert not (want.paths == 1).all()
    assert torch.equal(got.paths, want.paths)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    gen, gen_merged = greedy(wrapped, ids, mask, n=5), greedy(merged, ids, mask, n=5)
    assert torch.equal(gen.paths, want.paths) and torch.equal(gen.sequences, gen_merged.sequences)
    with drllm.forced_paths(wrapped, random_paths(3, seed=19)):
        forced = wrapped(input_ids=ids, attention_mask=mask)
    assert torch.equal(forced.paths, random_paths(3, seed=19))
    drllm.unpatch(wrapped)
    assert not drllm.is_patched(wrapped)
    assert torch.equal(wrapped(input_ids=ids, attention_mask=mask).logits, vanilla)
