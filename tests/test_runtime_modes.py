"""The routed runtime in every way a model is called: caches, chunked prefill, threads, nesting, hooks, dtypes, lambda.

Each test compares against the same computation done the plain way (the
dynamic cache, each row alone, a serial run, an explicit layer loop, an
unpatched model), with routers whose logits are confident, so that pooling
the wrong tokens changes decisions.
"""

from __future__ import annotations

import threading

import pytest
import torch

import drllm
from drllm.routing import LAM_SCALE, choose
from conftest import random_batch, tiny_model
from test_runtime import explicit_logits, generate, random_paths

L = 4


def confident_routers(model, seed: int = 0, scale: float = 40.0) -> drllm.Routers:
    """Random routers whose logits are far apart, so every input gets a clear decision."""
    torch.manual_seed(seed)
    routers = drllm.Routers.for_model(model)
    with torch.no_grad():
        for mlp in routers.mlps:
            mlp.fc2.weight.mul_(scale)
            mlp.fc2.bias.normal_()
    return routers


def routed_paths(model, ids, mask, **kwargs) -> torch.Tensor:
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, **kwargs)
    return drllm.last_paths(model)


@pytest.fixture(scope="module")
def routed():
    """A patched tiny Llama with confident routers, and a left-padded batch whose padding moves the decisions."""
    model = tiny_model("llama")
    drllm.patch(model, confident_routers(model))
    ids, mask = random_batch(4, 12, seed=3)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        on_prompt = drllm.last_paths(model)
        model(input_ids=ids, attention_mask=mask, routing_mask=torch.ones_like(mask))
        on_everything = drllm.last_paths(model)
    assert not torch.equal(on_prompt, on_everything), "the padding must change some decision for these tests to bite"
    return model, ids, mask, on_prompt


@torch.no_grad()
@pytest.mark.parametrize("cache", ["static", "offloaded", "offloaded_static"])
def test_every_cache_routes_on_the_prompt_tokens(routed, cache):
    """Static caches make generate pass a 4D mask: the routers still pool the 2D padding mask."""
    model, ids, mask, on_prompt = routed
    sequences, logits = generate(model, ids, mask, n=4)
    assert torch.equal(drllm.last_paths(model), on_prompt)
    other_sequences, other_logits = generate(model, ids, mask, n=4, cache_implementation=cache)
    assert torch.equal(drllm.last_paths(model), on_prompt)
    assert torch.equal(other_sequences, sequences)
    torch.testing.assert_close(other_logits, logits, rtol=1e-4, atol=1e-5)
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = routed_paths(model, ids[row : row + 1, real], mask[row : row + 1, real], cache_implementation=cache)
        assert torch.equal(alone[0], on_prompt[row])


@torch.no_grad()
def test_a_4d_mask_alone_is_refused_when_routing(routed):
    model, ids, mask, _ = routed
    four_d = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])
    with pytest.raises(ValueError, match="routing_mask"):
        model(input_ids=ids, attention_mask=four_d)


@torch.no_grad()
def test_chunked_prefill_is_refused_by_name(routed):
    model, ids, mask, _ = routed
    with pytest.raises(ValueError, match="prefill_chunk_size=8"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, prefill_chunk_size=8, pad_token_id=0)
    model.generation_config.prefill_chunk_size = 8
    try:
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    finally:
        model.generation_config.prefill_chunk_size = None


def _job(model, seed: int):
    """One caller's work: a routed forward, a forced-path forward and a routed generation, on its own inputs."""
    ids, mask = random_batch(1 + seed % 3, 6 + seed % 5, seed=seed)
    out = []
    with torch.no_grad():
        out.append(model(input_ids=ids, attention_mask=mask).logits)
        out.append(drllm.last_paths(model))
        with drllm.forced_paths(model, random_paths(ids.shape[0], seed)):
            out.append(model(input_ids=ids, attention_mask=mask).logits)
            out.append(drllm.last_paths(model))
        out.extend(generate(model, ids, mask, n=3))
        out.append(drllm.last_paths(model))
    return out


def test_threads_sharing_a_model_get_their_serial_results(routed, one_thread):
    model = routed[0]
    seeds = list(range(16))
    serial = {seed: _job(model, seed) for seed in seeds}
    results, errors = {}, []
    barrier = threading.Barrier(4)

    def worker(mine):
        barrier.wait()
        for seed in mine:
            try:
                results[seed] = _job(model, seed)
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(seeds[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for seed in seeds:
        for got, want in zip(results[seed], serial[seed]):
            assert torch.equal(got, want), f"seed {seed}"


@torch.no_grad()
def test_a_forward_nested_in_an_observer_leaves_the_outer_one_intact(routed):
    model, ids, mask, on_prompt = routed
    ref = model(input_ids=ids, attention_mask=mask).logits
    other_ids, other_mask = random_batch(2, 7, seed=11)
    inner_ref = model(input_ids=other_ids, attention_mask=other_mask).logits
    inner_paths = drllm.last_paths(model)
    inner, entered = [], []

    def nested(block, hidden):
        if block == 1 and not entered:  # the observer sees the inner forward's blocks too: call the model once
            entered.append(block)
            inner.append(model(input_ids=other_ids, attention_mask=other_mask).logits)

    with drllm.observe(model, nested):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)
    assert torch.equal(drllm.last_paths(model), on_prompt)
    assert torch.equal(inner[0], inner_ref)
    model(input_ids=other_ids, attention_mask=other_mask)
    assert torch.equal(drllm.last_paths(model), inner_paths)


@torch.no_grad()
def test_unpatch_restores_instance_forwards():
    model = tiny_model("qwen2")
    ids, mask = random_batch(2, 6, seed=4)
    ref = model(input_ids=ids, attention_mask=mask).logits
    layer = model.model.layers[1]
    calls = []
    original = layer.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = hooked
    drllm.patch(model, confident_routers(model))
    model(input_ids=ids, attention_mask=mask)
    drllm.unpatch(model)
    assert vars(layer)["forward"] is hooked
    assert "generate" not in vars(model) and "prepare_inputs_for_generation" not in vars(model)
    calls.clear()
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    assert calls == [1]


@torch.no_grad()
def test_accelerate_dispatched_model_routes_and_unpatches(tmp_path):
    """Blocks 1 and 3 offloaded to disk by accelerate (meta weights, loaded by their hooks on every call)."""
    from accelerate import dispatch_model

    plain = tiny_model("llama")
    routers = confident_routers(plain)
    ids, mask = random_batch(3, 9, seed=1)
    vanilla = plain(input_ids=ids, attention_mask=mask).logits
    drllm.patch(plain, routers)
    routed = plain(input_ids=ids, attention_mask=mask).logits
    paths = drllm.last_paths(plain)
    drllm.unpatch(plain)

    model = tiny_model("llama")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(L)})
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path), main_device="cpu")
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    hooks = {i: vars(layer)["forward"] for i, layer in enumerate(model.model.layers)}
    drllm.patch(model, routers)
    assert all(mlp.fc1.weight.device.type == "cpu" for mlp in routers.mlps)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, routed)
    assert torch.equal(drllm.last_paths(model), paths)
    with drllm.forced_paths(model, random_paths(3, 5)):
        forced = model(input_ids=ids, attention_mask=mask).logits
    for row, path in enumerate(random_paths(3, 5)):
        real = mask[row].bool()
        torch.testing.assert_close(forced[row, real], explicit_logits(model, ids[row, real], path), rtol=1e-4, atol=1e-5)
    drllm.unpatch(model)
    assert all(vars(layer)["forward"] is hooks[i] for i, layer in enumerate(model.model.layers))
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, vanilla)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_routed_error_is_within_twice_the_plain_loop(dtype):
    """Flash-attention's rule: against an fp64 layer loop, the routed batch errs at most 2x the dtype's own loop."""
    model = tiny_model("llama", seed=2)
    ids, mask = random_batch(3, 10, seed=6, padding="right")
    paths = random_paths(3, seed=9)
    assert (paths == 0).any() and (paths == 2).any()
    reference = model.to(torch.float64)
    exact = [explicit_logits(reference, ids[r, mask[r].bool()], paths[r]) for r in range(3)]
    low = model.to(dtype)
    plain = [explicit_logits(low, ids[r, mask[r].bool()], paths[r]) for r in range(3)]
    with drllm.forced_paths(low, paths):
        routed = low(input_ids=ids, attention_mask=mask).logits
    for r in range(3):
        real = mask[r].bool()
        err = (routed[r, real].double() - exact[r]).abs().max().item()
        err_plain = (plain[r].double() - exact[r]).abs().max().item()
        assert err <= 2 * err_plain + 1e-6, (r, err, err_plain)


def test_lambda_is_monotone_and_useful_over_the_whole_range():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 3, generator=gen)
    grid = torch.linspace(-1, 1, 21).tolist()
    decisions = torch.stack([choose(logits, lam) for lam in grid])  # [lams, rows]
    assert torch.equal(decisions[10], logits.argmax(-1)), "lambda 0 is the routers' own argmax"
    assert (decisions[0] == 0).all() and (decisions[-1] == 2).all()
    assert (decisions[1:] >= decisions[:-1]).all(), "no decision ever moves towards skipping as lambda grows"
    mean = decisions.float().mean(1)
    assert (mean[1:] > mean[:-1]).all(), "every step of the grid changes some decisions: no dead range"
    assert 0 < mean[5] < mean[10] < mean[15] < 2, "lambda = +-0.5 still leaves rows to the routers"
    # the paper's mixing rule, kept as an option, decides every row by |lambda| = 0.5
    assert (choose(logits, -0.5, "mix") == 0).all() and (choose(logits, 0.5, "mix") == 2).all()
    assert LAM_SCALE > 0


@torch.no_grad()
def test_lambda_rule_through_the_model(routed):
    model, ids, mask, on_prompt = routed
    drllm.set_lam(model, 0.5, rule="mix")
    try:
        model(input_ids=ids, attention_mask=mask)
        assert (drllm.last_paths(model) == 2).all()
        drllm.set_lam(model, 0.5, rule="shift")
        model(input_ids=ids, attention_mask=mask)
        assert (drllm.last_paths(model) >= on_prompt).all()
        with pytest.raises(ValueError, match="lam rule"):
            drllm.set_lam(model, 0.5, rule="sigmoid")
    finally:
        drllm.set_lam(model, 0.0, rule="shift")


def test_backend_and_row_policy_choices_belong_to_the_calling_thread():
    from drllm import ops
    from drllm.runtime import plan

    def other_thread() -> dict:
        seen = {}
        t = threading.Thread(target=lambda: seen.update(mode=ops.backend("cpu")["mode"], policy=plan.row_policy()))
        t.start()
        t.join()
        return seen

    before = other_thread()
    previous_backend = ops.set_backend("reference" if before["mode"] != "reference" else "ext")
    previous_policy = plan.set_row_policy("select" if before["policy"]["policy"] != "select" else "gather", 0.5)
    try:
        assert ops.backend("cpu")["mode"] != before["mode"] and plan.row_policy() != before["policy"]
        assert other_thread() == before
    finally:
        ops.set_backend(previous_backend)
        plan.restore_row_policy(previous_policy)


@torch.no_grad()
def test_routed_paths_keep_the_search_constraint_on_skip_runs():
    """Routers that want to skip everything skip at most two blocks in a row, unless the limit is lifted."""
    model = tiny_model("llama", num_layers=7)
    routers = drllm.Routers.for_model(model)
    for mlp in routers.mlps:
        mlp.fc2.bias.data = torch.tensor([50.0, 0.0, 0.0])
    ids, mask = random_batch(3, 8, seed=2)
    drllm.patch(model, routers)
    model(input_ids=ids, attention_mask=mask)
    assert torch.equal(drllm.last_paths(model), torch.tensor([[0, 0, 1] * 2 + [0]] * 3))
    drllm.set_lam(model, -1.0)  # the knob's end is "skip every block"
    model(input_ids=ids, attention_mask=mask)
    assert (drllm.last_paths(model) == 0).all()
    with drllm.forced_paths(model, torch.zeros(7, dtype=torch.long)):  # forced paths are never changed
        model(input_ids=ids, attention_mask=mask)
        assert (drllm.last_paths(model) == 0).all()
    drllm.unpatch(model)
    drllm.patch(model, routers, max_skip_run=None)
    model(input_ids=ids, attention_mask=mask)
    assert (drllm.last_paths(model) == 0).all()
    drllm.unpatch(model)
    with pytest.raises(ValueError, match="max_skip_run"):
        drllm.patch(model, routers, max_skip_run=-1)
