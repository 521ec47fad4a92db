"""Budget routers: every row skips exactly K blocks, chosen once at the tap block (BudgetRouters, drllm.patch(...,
budget=K), drllm.set_budget), against counted block calls, explicit loops, brute force and vanilla."""

from __future__ import annotations

import itertools
import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

import drllm
from drllm import ops
from drllm.routing import BudgetRouters, RouterFileError
from drllm.routing.budget import CONFIG_NAME, MAX_SETS, WEIGHTS_NAME, longest_skip_run
from conftest import explicit_logits, random_batch, tiny_model

L, TAP = 6, 1
BUDGET_FAMILIES = ("llama", "mistral")  # mistral: a sliding window that decoding crosses
pytestmark = pytest.mark.usefixtures("one_thread")


def budget_routers(model, seed: int = 0, **options) -> BudgetRouters:
    """Budget routers for ``model`` with large random weights and no biases, so that rows pick different paths
    (the tiny models' hidden states are of the order of 0.01)."""
    routers = BudgetRouters.for_model(model, **{"tap": TAP, **options})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        routers.mlp.fc1.weight.copy_(30 * torch.randn(routers.mlp.fc1.weight.shape, generator=g))
        routers.mlp.fc2.weight.copy_(torch.randn(routers.mlp.fc2.weight.shape, generator=g))
    return routers


class PassCounter:
    """Which rows ran each block, per forward call inside :meth:`counting`: the rows a block is called with are
    matched to the rows of the hidden state entering it (drllm.observe), so a gathered subset is counted row by
    row. Rows whose entering states are equal (e.g. the same new token at block 0) form one class and are
    counted together."""

    def __init__(self, model):
        self.model = model
        self.calls: list[dict] = []  # per forward call: block -> (entering state, class per row, classes run)
        self.active = False
        for block, layer in enumerate(model.model.layers):
            layer.forward = self.wrap(block, layer.forward)  # before the patch: it runs what it finds there

    @contextmanager
    def counting(self):
        self.calls.clear()
        self.active = True
        try:
            with drllm.observe(self.model, self.observe):
                yield self
        finally:
            self.active = False

    def observe(self, block: int, hidden: torch.Tensor) -> None:
        if block == 0:
            self.calls.append({})
        classes = [next(c for c in range(b + 1) if torch.equal(hidden[c], hidden[b])) for b in range(len(hidden))]
        self.calls[-1][block] = (hidden, torch.tensor(classes), [])

    def wrap(self, block: int, forward):
        def counted(hidden_states, *args, **kwargs):
            if self.active:
                entering, classes, ran = self.calls[-1][block]
                for row in hidden_states:
                    match = [b for b, state in enumerate(entering) if torch.equal(state, row)]
                    assert match, f"block {block} ran a row that is not one of the rows entering it"
                    ran.append(int(classes[match[0]]))
            return forward(hidden_states, *args, **kwargs)

        return counted

    def check(self, paths: torch.Tensor, calls: int) -> None:
        """Every counted forward call ran each row's blocks exactly as ``paths`` says (decode steps included)."""
        assert len(self.calls) == calls
        for call in self.calls:
            for block, (_, classes, ran) in call.items():
                for c in classes.unique().tolist():
                    assert ran.count(c) == int(paths[classes == c, block].sum()), (block, c, ran)


def routed_model(family: str, budget: int, seed: int = 0, **options):
    model = tiny_model(family, num_layers=L)
    counter = PassCounter(model)
    routers = budget_routers(model, seed, **options)
    drllm.patch(model, routers, budget=budget)
    return model, routers, counter


def generate(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)


def check_passes(counter: PassCounter, paths: torch.Tensor, budget: int, calls: int) -> None:
    """Every forward call ran each row's blocks exactly as its path says: L - budget calls, one per kept block."""
    assert (paths.sum(1) == L - budget).all() and ((paths == 0) | (paths == 1)).all()
    assert (paths[:, :TAP] == 1).all()
    counter.check(paths, calls)


# ---------------------------------------------------------------- (a), (g) L - K passes per row, everywhere


@torch.no_grad()
@pytest.mark.parametrize("family", BUDGET_FAMILIES)
@pytest.mark.parametrize("budget", [1, 2, 3])
def test_every_row_runs_exactly_L_minus_K_passes(family, budget):
    model, routers, counter = routed_model(family, budget)
    ids, mask = random_batch(5, 9, seed=3)  # left-padded, rows of different lengths
    with counter.counting():
        paths = model(input_ids=ids, attention_mask=mask).paths
    check_passes(counter, paths, budget, calls=1)
    assert len({tuple(p) for p in paths.tolist()}) > 1, "rows should take different paths"
    assert max(longest_skip_run(torch.nonzero(p == 0).flatten().tolist()) for p in paths) <= 2
    with counter.counting():
        out = generate(model, ids, mask)
    assert torch.equal(out.paths, paths)  # decided on the same prompts
    check_passes(counter, paths, budget, calls=4)  # the prefill and three decode steps


@torch.no_grad()
@pytest.mark.parametrize("family", BUDGET_FAMILIES)
def test_out_paths_are_the_routers_pick_at_the_tap_and_static_cache_generates(family):
    budget = 3
    model, routers, counter = routed_model(family, budget, seed=1)
    ids, mask = random_batch(4, 8, seed=5)
    states = drllm.block_states(model, input_ids=ids, attention_mask=mask)  # the blocks before the tap run every row
    want = routers.pick(routers.scores(states[TAP], mask), budget)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).paths, want)
    with counter.counting():
        out = generate(model, ids, mask, cache_implementation="static")
    assert torch.equal(out.paths, want)
    check_passes(counter, want, budget, calls=4)


@torch.no_grad()
def test_forced_paths_override_the_budget():
    model, _, _ = routed_model("llama", 2)
    ids, mask = random_batch(3, 7, seed=2)
    forced = torch.tensor([1, 2, 0, 1, 1, 2])
    with drllm.forced_paths(model, forced):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).paths, forced.expand(3, L))


# ---------------------------------------------------------------- (b) the routed logits are the picked paths'


@torch.no_grad()
@pytest.mark.parametrize("family", BUDGET_FAMILIES)
@pytest.mark.parametrize("head", ["blocks", "sets"])
def test_routed_logits_equal_the_picked_paths_and_each_row_alone(family, head):
    sets = {2: [[1, 2], [3, 5], [2, 4], [4, 5]], 3: [[1, 3, 5], [2, 3, 5]]}
    model, _, _ = routed_model(family, 2, seed=4, **({"head": "sets", "sets": sets} if head == "sets" else {}))
    ids, mask = random_batch(5, 10, seed=7)
    out = model(input_ids=ids, attention_mask=mask)
    assert len({tuple(p) for p in out.paths.tolist()}) > 1
    with drllm.forced_paths(model, out.paths):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, out.logits)
    for b in range(len(ids)):
        real = ids[b][mask[b] == 1]
        alone = model(input_ids=real[None])
        assert torch.equal(alone.paths[0], out.paths[b])
        torch.testing.assert_close(alone.logits[0], out.logits[b][mask[b] == 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(explicit_logits(model, real, out.paths[b]), alone.logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("head", ["blocks", "sets"])
def test_scores_equal_the_pooling_loop_on_every_backend(head, ops_backend):
    """The pooled op serves any output width (L per-block damages, or one per vocabulary set)."""
    sets = {1: [[2], [3], [5]], 2: [[2, 4]]}
    options = {"head": "sets", "sets": sets} if head == "sets" else {}
    routers = BudgetRouters("llama", 24, 7, tap=2, num_windows=3, **options)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 11, 24, generator=g)
    mask = torch.ones(4, 11, dtype=torch.long)
    mask[0, :6], mask[2, 9:] = 0, 0  # left- and right-padded rows
    mlp = routers.mlp
    want = ops.pooled_router_logits_loop(hidden, mask, 3, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                                         dtype=torch.float64)
    got = routers.scores(hidden, mask)
    assert got.shape == (4, routers.num_outputs) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- (c) pick against brute force


def lexicographic_reference(scores: torch.Tensor, budget: int, tap: int, max_skip_run) -> list[int]:
    """Among every allowed K-set of blocks >= tap, the one whose blocks, ranked by predicted damage, come first."""
    order = scores[tap:].argsort(stable=True).tolist()
    rank = {block + tap: r for r, block in enumerate(order)}
    allowed = [s for s in itertools.combinations(range(tap, len(scores)), budget)
               if max_skip_run is None or longest_skip_run(s) <= max_skip_run]
    return sorted(min(allowed, key=lambda s: sorted(rank[b] for b in s)))


@pytest.mark.parametrize("tap, max_skip_run", [(0, None), (0, 1), (2, 1), (0, 2), (1, 2), (3, 0)])
def test_pick_blocks_equals_brute_force(tap, max_skip_run):
    n = 8
    routers = BudgetRouters("llama", 4, n, tap=tap, max_skip_run=max_skip_run)
    scores = torch.randn(64, n, generator=torch.Generator().manual_seed(tap))
    for budget in range(routers.most_skips() + 1):
        paths = routers.pick(scores, budget)
        assert paths.dtype == torch.int64 and paths.shape == (64, n)
        for row, path in zip(scores, paths):
            skipped = torch.nonzero(path == 0).flatten().tolist()
            assert skipped == lexicographic_reference(row, budget, tap, max_skip_run)
            if max_skip_run is None:  # no limit: simply the K least damaging blocks
                assert skipped == sorted((row[tap:].argsort()[:budget] + tap).tolist())
    with pytest.raises(ValueError, match=f"cannot skip {routers.most_skips() + 1} blocks"):
        routers.pick(scores, routers.most_skips() + 1)


def test_pick_sets_is_the_least_damaging_set_of_size_K():
    sets = {1: [[3], [5]], 2: [[2, 3], [4, 6], [5, 6]], 4: [[2, 3, 5, 6]]}
    routers = BudgetRouters("llama", 4, 7, tap=2, head="sets", sets=sets)
    assert routers.num_outputs == 6
    scores = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    for budget, offset in ((1, 0), (2, 2), (4, 5)):
        paths = routers.pick(scores, budget)
        for row, path in zip(scores, paths):
            best = min(range(len(sets[budget])), key=lambda j: row[offset + j].item())
            assert torch.nonzero(path == 0).flatten().tolist() == sets[budget][best]
    assert torch.equal(routers.pick(scores, 0), torch.ones(32, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"cannot skip 3 blocks per row: they serve K in \[0, 1, 2, 4\]"):
        routers.pick(scores, 3)


# ---------------------------------------------------------------- (d) K = 0 is vanilla


@torch.no_grad()
@pytest.mark.parametrize("family", BUDGET_FAMILIES)
def test_budget_zero_is_vanilla(family):
    vanilla = tiny_model(family, num_layers=L)
    ids, mask = random_batch(3, 9, seed=1)
    want_logits = vanilla(input_ids=ids, attention_mask=mask).logits
    want = generate(vanilla, ids, mask)
    model, _, _ = routed_model(family, 0)
    out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.logits, want_logits) and (out.paths == 1).all()
    got = generate(model, ids, mask)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(torch.stack(got.logits), torch.stack(want.logits))


# ---------------------------------------------------------------- (e) the knob and its refusals


def one_line_error(fn, *fragments):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@torch.no_grad()
def test_set_budget_changes_the_budget():
    model, routers, _ = routed_model("llama", 1)
    ids, mask = random_batch(4, 8, seed=9)
    for budget in (3, 0, 2):
        drllm.set_budget(model, budget)
        assert (model(input_ids=ids, attention_mask=mask).paths.sum(1) == L - budget).all()
    most = routers.most_skips()
    for bad, fragment in ((-1, "integer >= 0"), (1.5, "integer >= 0"), (True, "integer >= 0"),
                          (most + 1, f"K from 0 to {most}")):
        one_line_error(lambda: drllm.set_budget(model, bad), fragment)
    one_line_error(lambda: drllm.set_budget(model, None), "budget routers need a budget")
    one_line_error(lambda: drllm.set_lam(model, -0.5), "lam=-0.5", "budget routers")
    drllm.set_lam(model, 0.0)
    assert (model(input_ids=ids, attention_mask=mask).paths.sum(1) == L - 2).all()


def test_wrong_routers_and_budgets_are_refused():
    model = tiny_model("llama", num_layers=L)
    per_block = drllm.Routers.for_model(model)
    one_line_error(lambda: drllm.patch(model, per_block, budget=2), "budget=2 needs budget routers", "lam")
    one_line_error(lambda: drllm.patch(model, budget=2), "needs budget routers")
    routers = budget_routers(model)
    one_line_error(lambda: drllm.patch(model, routers), "budget routers need a budget")
    one_line_error(lambda: drllm.patch(model, routers, lam=0.3, budget=1), "lam=0.3")
    one_line_error(lambda: drllm.patch(model, routers, budget=L), "cannot skip 6 blocks")
    other = BudgetRouters("llama", 48, L + 1)
    one_line_error(lambda: drllm.patch(model, other, budget=1), "num_blocks: routers 7, model 6")
    assert not drllm.is_patched(model)
    drllm.patch(model, per_block)
    one_line_error(lambda: drllm.set_budget(model, 1), "needs budget routers", "lam")


@pytest.mark.parametrize("options, fragment", [
    ({"tap": 6}, "tap must be a block in [0, 6)"),
    ({"head": "top"}, "unknown head 'top'"),
    ({"max_skip_run": True}, "max_skip_run must be"),
    ({"head": "sets"}, "head 'sets' needs sets"),
    ({"sets": {1: [[2]]}}, "head 'blocks' scores every block"),
    ({"head": "sets", "sets": {1: [[0]]}}, "blocks in [1, 6)"),
    ({"head": "sets", "sets": {2: [[3, 2]]}}, "sorted list of 2 distinct blocks"),
    ({"head": "sets", "sets": {2: [[3, 3]]}}, "sorted list of 2 distinct blocks"),
    ({"head": "sets", "sets": {2: [[3]]}}, "sorted list of 2 distinct blocks"),
    ({"head": "sets", "sets": {2: [[3, 6]]}}, "blocks in [1, 6)"),
    ({"head": "sets", "sets": {3: [[1, 2, 3]]}}, "more than max_skip_run 2 consecutive skips"),
    ({"head": "sets", "sets": {1: [[2], [2]]}}, "lists a skip set twice"),
    ({"head": "sets", "sets": {0: [[2]]}}, "budgets K >= 1"),
    ({"head": "sets", "sets": {"1": [[2]], 1: [[3]]}}, "budget 1 twice"),
    ({"head": "sets", "sets": {1: []}}, "non-empty list"),
])
def test_bad_budget_router_configs_are_refused(options, fragment):
    one_line_error(lambda: BudgetRouters("llama", 8, L, **{"tap": TAP, **options}), fragment)


# ---------------------------------------------------------------- (f) checkpoints


@pytest.fixture
def saved(tmp_path):
    routers = BudgetRouters("llama", 16, L, tap=TAP, head="sets", sets={1: [[2], [4]], 2: [[1, 3], [4, 5]]},
                            num_windows=4, hidden=8)
    routers.save_pretrained(tmp_path)
    return tmp_path, routers


def test_checkpoint_round_trip(saved, tmp_path_factory):
    folder, routers = saved
    got = BudgetRouters.from_pretrained(folder)
    assert got.config == routers.config and got.sets == routers.sets
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), routers.state_dict().values()))
    assert all(p.requires_grad and p.device.type == "cpu" for p in got.parameters())
    hidden, mask = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.long)
    assert torch.equal(got.pick(got.scores(hidden, mask), 2), routers.pick(routers.scores(hidden, mask), 2))
    blocks = BudgetRouters("qwen3", 16, L, tap=2, max_skip_run=None)
    other = tmp_path_factory.mktemp("blocks")
    blocks.save_pretrained(other)
    assert BudgetRouters.from_pretrained(other).config == blocks.config


def refused(folder, *fragments):
    """Loading ``folder`` raises a one-line RouterFileError that holds every fragment and the fix."""
    with pytest.raises(RouterFileError) as info:
        BudgetRouters.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message and "re-save the budget routers with BudgetRouters.save_pretrained" in message
    for fragment in fragments:
        assert fragment in message, message


def edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize("changes, problem", [
    ({"hidden_size": 32}, "mlp.fc1.weight is F32[8, 16], expected F32[8, 32]"),
    ({"sets": {"1": [[2], [4]], "2": [[1, 3]]}}, "mlp.fc2.weight is F32[4, 8], expected F32[3, 8]"),
    ({"sets": {"2": [[1, 2, 3]]}}, "sorted list of 2 distinct blocks"),
    ({"sets": {"2": [[1, 9]]}}, "blocks in [1, 6)"),
    ({"sets": {"2": [["1", 3]]}}, "sorted list of 2 distinct blocks"),
    ({"sets": {"02": [[1, 3]]}}, "budgets K >= 1"),
    ({"sets": {"x": [[1, 3]]}}, "budgets K >= 1"),
    ({"sets": [[1, 3]]}, "head 'sets' needs sets"),
    ({"sets": {"1": [[2]] * (MAX_SETS + 1)}}, f"more than {MAX_SETS} skip sets"),
    ({"tap": 6}, "tap must be a block"),
    ({"tap": 3}, "blocks in [3, 6)"),
    ({"head": "both"}, "unknown head 'both'"),
    ({"max_skip_run": -1}, "max_skip_run must be"),
    ({"max_skip_run": 0}, "more than max_skip_run 0 consecutive skips"),
    ({"extra": 1}, "unknown keys ['extra']"),
    ({"hidden_size": 2_000_000}, "hidden_size must be an integer in [1, 65536]"),
    ({"hidden_size": 65536, "hidden": 4096}, "router parameters, more than"),
])
def test_hostile_configs_are_refused_naming_the_file(saved, changes, problem):
    folder, _ = saved
    edit_config(folder, **changes)
    where = folder / (WEIGHTS_NAME if problem.startswith("mlp.") else CONFIG_NAME)
    refused(folder, str(where), problem)


def test_non_finite_and_truncated_weights_are_refused(saved):
    folder, _ = saved
    weights = folder / WEIGHTS_NAME
    tensors = load_file(str(weights))
    tensors["mlp.fc2.bias"][1] = float("nan")
    save_file(tensors, str(weights))
    refused(folder, str(weights), "mlp.fc2.bias holds non-finite values")
    weights.write_bytes(weights.read_bytes()[:100])
    refused(folder, str(weights), "truncated or corrupt")
    (folder / CONFIG_NAME).write_text("{nope")
    refused(folder, str(folder / CONFIG_NAME), "not a readable JSON file")


def test_missing_checkpoint_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_NAME} and {WEIGHTS_NAME}"):
        BudgetRouters.from_pretrained(tmp_path)
