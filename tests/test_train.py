"""Router training: loss, class weights, features, learning a prompt-dependent policy, checkpoints, resume."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from tiny_tokenizer import make_tiny_tokenizer

import drllm
from drllm import ops
from drllm.artifacts import ArtifactError
from drllm.train import (
    TrainConfig,
    batched_router_logits,
    class_weights,
    classification_metrics,
    extract_features,
    focal_loss,
    label_path,
    load_path_records,
    train_routers,
)

# Tiny models are all per-op overhead: one intra-op thread is faster (far faster on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")

L = 4
# Three "topics" of prompt text, each with its own labelled path: the policy depends on the prompt.
TOPICS = {
    "abcdefghij": "1021",
    "0123456789": "2110",
    "+-*/=<>()[]": "0112",
}


def synthetic_records(n: int, seed: int = 0, null_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    topics = list(TOPICS)
    out = []
    for i in range(n):
        alphabet = topics[i % len(topics)]
        prompt = "".join(rng.choice(alphabet + "  ") for _ in range(rng.randint(6, 24))).strip() or alphabet[0]
        path = TOPICS[alphabet]
        if null_every and i % null_every == null_every - 1:
            path = None
        out.append({
            "id": f"syn-{i}", "task": "synthetic", "prompt": prompt, "gold": "A", "num_blocks": L,
            "default_reward": 1.0, "default_margin": 0.1, "best_path": path, "best_reward": 1.0,
            "best_margin": 0.2, "best_length": None if path is None else sum(map(int, path)),
            "good_paths": [] if path is None else [{"path": path, "reward": 1.0, "margin": 0.2,
                                                     "length": sum(map(int, path))}],
            "evaluations": 10, "seconds": 0.1,
        })
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(one_thread):
    return tiny_model("llama", seed=3, num_layers=L), make_tiny_tokenizer()


def test_class_weights_hand_computed():
    labels = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 0, 0]])  # counts: 6, 3, 0
    beta = 0.9
    w0, w1 = (1 - beta) / (1 - beta**6), (1 - beta) / (1 - beta**3)
    scale = 2 / (w0 + w1)
    got = class_weights(labels, beta)
    torch.testing.assert_close(got, torch.tensor([w0 * scale, w1 * scale, 0.0]), rtol=1e-6, atol=1e-7)
    # beta -> 0: every seen class weighs 1; the paper's beta 0.999 favours the rare class
    torch.testing.assert_close(class_weights(labels, 0.0), torch.tensor([1.0, 1.0, 0.0]))
    w = class_weights(torch.tensor([0] * 900 + [1] * 90 + [2] * 10), 0.999)
    assert w[2] > w[1] > w[0] and math.isclose(float(w.sum()), 3.0, rel_tol=1e-6)


def test_focal_loss_hand_computed():
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0], [6.0, 1.0, 1.0]]))  # p = .25 .5 .25 / .75 ...
    targets = torch.tensor([1, 0, 0])
    weights = torch.tensor([0.5, 2.0, 1.0])
    by_hand = [
        2.0 * (1 - 0.5) ** 2 * -math.log(0.5),
        0.5 * (1 - 0.25) ** 2 * -math.log(0.25),
        0.5 * (1 - 0.75) ** 2 * -math.log(0.75),
    ]
    got = focal_loss(logits, targets, weights, gamma=2.0)
    assert math.isclose(float(got), sum(by_hand) / 3, rel_tol=1e-6)
    # gamma 0 without weights is the cross-entropy
    torch.testing.assert_close(focal_loss(logits, targets, None, gamma=0.0), F.cross_entropy(logits, targets))


def test_batched_logits_equal_router_logits():
    torch.manual_seed(0)
    routers = drllm.Routers("llama", 16, 3, num_windows=4)
    hidden = torch.randn(5, 11, 16)
    mask = torch.ones(5, 11, dtype=torch.long)
    for b, n in enumerate([11, 7, 3, 1, 5]):
        mask[b, n:] = 0
    means, valid = ops.window_means(hidden, mask, 4)
    got = batched_router_logits(routers, means[:, None].expand(5, 3, 4, 16), valid)
    for i in range(3):
        torch.testing.assert_close(got[:, i], routers.logits(i, hidden, mask), rtol=1e-5, atol=1e-6)


def test_features_follow_the_labelled_path_and_ignore_batching(setup):
    model, tok = setup
    prompts = [tok("abc def")["input_ids"], tok("0123")["input_ids"], tok("x")["input_ids"]]
    paths = torch.tensor([[1, 0, 2, 1], [2, 1, 1, 0], [0, 0, 1, 1]])
    batched = {}
    for idx, means, valid in extract_features(model, prompts, paths, 8, batch_size=3):
        for r, i in enumerate(idx):
            batched[i] = (means[r], valid[r])
    for i, toks in enumerate(prompts):
        seen = {}
        ids = torch.tensor([toks])
        with drllm.forced_paths(model, paths[i]), drllm.observe(model, lambda b, h: seen.__setitem__(b, h.clone())):
            model(input_ids=ids, use_cache=False)
        for block in range(L):
            means, valid = ops.window_means(seen[block], torch.ones_like(ids), 8)
            torch.testing.assert_close(batched[i][0][block], means[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(batched[i][1], valid[0])
    assert int(batched[2][1].sum()) == 1  # one token: one window


def test_records_label_default_when_no_path_wins(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", synthetic_records(9, null_every=3))
    records = load_path_records(f, L)
    assert len(records) == 9 and sum(r["label"] == "1111" for r in records) == 3
    assert [r["label"] for r in records] == [r["best_path"] or "1111" for r in synthetic_records(9, null_every=3)]
    with pytest.raises(ValueError, match="model has 5 blocks"):
        load_path_records(f, 5)


def _record(good, default_reward=1, default_margin=0.5):
    return {"num_blocks": 4, "default_reward": default_reward, "default_margin": default_margin,
            "best_path": good[0]["path"] if good else None, "best_margin": good[0]["margin"] if good else None,
            "good_paths": good}


def test_label_needs_min_margin():
    near_tie = {"path": "0111", "margin": 0.01, "length": 3}
    shorter = {"path": "0101", "margin": 0.05, "length": 2}
    robust = {"path": "1101", "margin": 0.4, "length": 3}
    robust_wider = {"path": "1011", "margin": 0.6, "length": 3}
    rec = _record([shorter, near_tie, robust, robust_wider])
    assert label_path(rec, 0.0) == "0101"  # shortest correct path
    assert label_path(rec, 0.2) == "1011"  # shortest robust one, then the widest margin
    assert label_path(rec, 1.0) == "1111"  # none wins by 1.0: the default path
    assert label_path(_record([], default_reward=0, default_margin=-0.3), 0.0) == "1111"
    generated = _record([{"path": "1121", "margin": None, "length": 5}])  # generation rewards carry no margin
    assert label_path(generated, 0.2) == "1121"


def test_min_margin_changes_labels_and_training_data(setup, tmp_path):
    model, tok = setup
    records = synthetic_records(12, seed=5)
    for r in records[::2]:
        for g in r["good_paths"]:
            g["margin"] = 0.05
        r["best_margin"] = 0.05
    f = write_jsonl(tmp_path / "paths.jsonl", records)
    strict = train_routers(model, tok, f, tmp_path / "strict", config=_cfg(tmp_path, epochs=1, min_margin=0.1))
    loose = train_routers(model, tok, f, tmp_path / "loose", config=_cfg(tmp_path, epochs=1, min_margin=0.0))
    assert strict["default_labels"] == 6 and loose["default_labels"] == 0
    assert strict["class_counts"]["execute"] > loose["class_counts"]["execute"]
    with pytest.raises(ValueError, match="min_margin"):
        TrainConfig(min_margin=-0.1)


def _probe(default_margin, skip_margins):
    return {"id": "x", "num_blocks": len(skip_margins), "default_margin": default_margin, "skip_margins": skip_margins}


def test_items_without_a_decisive_path_teach_the_shared_skip_unless_it_costs_their_answer():
    robust = _record([{"path": "1101", "margin": 0.4, "length": 3}])
    undecided = _record([{"path": "0111", "margin": 0.01, "length": 3}], default_margin=0.05)
    assert label_path(robust, 0.2, shared=1, probe=_probe(0.5, [0.1, -0.2, 0.3, 0.1])) == "1101"  # its own path
    assert label_path(undecided, 0.2, shared=1, probe=_probe(0.05, [0.1, 0.02, -0.3, 0.1])) == "1011"
    assert label_path(undecided, 0.2, shared=1, probe=_probe(0.05, [0.1, -0.02, 0.3, 0.1])) == "1111"  # loses it
    wrong_anyway = _record([], default_reward=0, default_margin=-0.3)
    assert label_path(wrong_anyway, 0.2, shared=2, probe=_probe(-0.3, [0.1, 0.1, -0.5, 0.1])) == "1101"
    assert label_path(undecided, 0.2, shared=1, probe=None) == "1111"  # not probed: the default
    assert label_path(undecided, 0.2, shared=None, probe=_probe(0.05, [0.1] * 4)) == "1111"


def test_training_with_skip_probes_teaches_the_shared_skip(setup, tmp_path):
    model, tok = setup
    records = synthetic_records(12, seed=6, null_every=3)  # 4 items without a path
    f = write_jsonl(tmp_path / "paths.jsonl", records)
    probes = [{"id": r["id"], "num_blocks": L, "default_margin": 0.1,
               "skip_margins": [-0.1, 0.05, 0.2, -0.3] if i != 2 else [0.1, -0.2, 0.2, 0.1]}
              for i, r in enumerate(records)]  # block 2 never loses an item; item 2 would lose block 1
    skips = write_jsonl(tmp_path / "skips.jsonl", probes)
    plain = train_routers(model, tok, f, tmp_path / "plain", config=_cfg(tmp_path, epochs=1, min_margin=0.0))
    shared = train_routers(model, tok, f, tmp_path / "shared", config=_cfg(tmp_path, epochs=1, min_margin=0.0),
                           skips_file=skips)
    assert plain["shared_skip"] is None and plain["default_labels"] == 4
    assert shared["shared_skip"] == 2 and shared["default_labels"] == 0
    assert shared["shared_labels"] == 4 + sum(r["best_path"] == "1101" for r in records)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**probes[0], "num_blocks": 5, "skip_margins": [0.1] * 5}])
    with pytest.raises(ValueError, match="another number of blocks"):
        train_routers(model, tok, f, tmp_path / "bad", config=_cfg(tmp_path, epochs=1), skips_file=bad)


def _cfg(tmp_path, **kw):
    base = dict(epochs=6, batch_size=16, dev_fraction=0.2, min_block_labels=0, progress=False,
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return TrainConfig(**base)


def test_learns_prompt_dependent_policy(setup, tmp_path):
    model, tok = setup
    records = synthetic_records(150, seed=1)
    f = write_jsonl(tmp_path / "paths.jsonl", records)
    result = train_routers(model, tok, f, tmp_path / "routers", config=_cfg(tmp_path, epochs=25, lr=3e-3))
    val = result["final"]["dev"]
    assert result["dev"] == 30 and result["train"] == 120
    assert min(val["per_layer_accuracy"]) >= 0.95, val["per_layer_accuracy"]
    assert val["macro_f1"] >= 0.95
    assert set(val["per_class"]) == {"skip", "execute", "repeat"}
    # the trained routers drive inference to the labelled paths (teacher forcing = inference semantics)
    routers = drllm.Routers.from_pretrained(tmp_path / "routers")
    drllm.patch(model, routers)
    try:
        hits = total = 0
        for r in records[:60]:
            ids = torch.tensor([tok(r["prompt"])["input_ids"]])
            model(input_ids=ids, use_cache=False)
            got = drllm.last_paths(model)[0].tolist()
            hits += sum(int(a == int(b)) for a, b in zip(got, r["best_path"]))
            total += L
    finally:
        drllm.unpatch(model)
    assert hits / total >= 0.95
    # a second run finds every feature in the cache
    again = train_routers(model, tok, f, tmp_path / "again", config=_cfg(tmp_path, epochs=1))
    assert again["extract"]["computed"] == 0 and again["extract"]["cached"] == 150


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(setup, tmp_path):
    model, tok = setup
    f = write_jsonl(tmp_path / "paths.jsonl", synthetic_records(60, seed=2, null_every=7))
    full = train_routers(model, tok, f, tmp_path / "full", config=_cfg(tmp_path))

    class Stop(Exception):
        pass

    def stop_at_3(epoch, metrics):
        if epoch == 3:
            raise Stop

    with pytest.raises(Stop):
        train_routers(model, tok, f, tmp_path / "part", config=_cfg(tmp_path), callback=stop_at_3)
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert ckpts == ["best", "epoch-0003"]  # atomic folders only, older epochs pruned; the best epoch's routers
    # round trip: the checkpoint's routers load as saved
    saved = drllm.Routers.from_pretrained(tmp_path / "part" / "checkpoints" / "epoch-0003")
    assert saved.config["num_blocks"] == L
    resumed = train_routers(model, tok, f, tmp_path / "part", config=_cfg(tmp_path))
    assert resumed["resumed_from"] == 3
    assert resumed["history"] == full["history"] and resumed["epoch"] == full["epoch"]
    a = drllm.Routers.from_pretrained(tmp_path / "full").state_dict()
    b = drllm.Routers.from_pretrained(tmp_path / "part").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "part" / "train_metrics.json").read_text()) == full["history"]
    # a different configuration refuses to resume; --no-resume starts over
    with pytest.raises(ValueError, match="another config"):
        train_routers(model, tok, f, tmp_path / "part", config=_cfg(tmp_path, lr=5e-4))
    fresh = train_routers(model, tok, f, tmp_path / "part", config=_cfg(tmp_path, lr=5e-4, epochs=1, resume=False))
    assert fresh["resumed_from"] is None and len(fresh["history"]) == 1


def test_classification_metrics_by_hand():
    labels = torch.tensor([[0, 1, 2], [1, 1, 1]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 1]])
    m = classification_metrics(pred, labels)
    assert m["per_layer_accuracy"] == [1.0, 0.5, 0.5]
    assert m["per_class"]["skip"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1, "predicted": 1}
    ex = m["per_class"]["execute"]  # tp 3, predicted 4, support 4
    assert (ex["precision"], ex["recall"]) == (0.75, 0.75)
    assert m["per_class"]["repeat"]["f1"] == 0.0
    assert math.isclose(m["macro_f1"], (1.0 + 0.75 + 0.0) / 3)
    assert m["mean_pred_length"] == 3.0 and m["mean_label_length"] == 3.0


def test_train_command(setup, tmp_path, capsys):
    from drllm.cli import main

    model, tok = setup
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    f = write_jsonl(tmp_path / "paths.jsonl", synthetic_records(30, seed=4, null_every=5))
    rc = main(["train", "--model", str(tmp_path / "model"), "--device", "cpu", "--paths", str(f),
               "--out", str(tmp_path / "routers"), "--epochs", "2", "--batch-size", "8", "--no-progress",
               "--min-margin", "0.2", "--lam", "0", "--min-block-labels", "0", "--json", str(tmp_path / "train.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "30 examples (6 teach the default path, 0 thin block decisions taught as execute)" in out
    assert "macro F1" in out and "min_margin 0.2, lambda 0" in out and "nothing to choose" in out
    payload = json.loads((tmp_path / "train.json").read_text())
    assert len(payload["run"]["history"]) == 2 and payload["train"] + payload["dev"] == 30
    assert drllm.Routers.from_pretrained(tmp_path / "routers").num_blocks == L


class _Payload:
    """A pickle that creates ``marker`` when unpickled (a harmless stand-in for any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _interrupted(model, tok, tmp_path, stop_at):
    """Train into ``tmp_path/part`` and stop after epoch ``stop_at``; returns the paths file."""
    f = write_jsonl(tmp_path / "paths.jsonl", synthetic_records(30, seed=2, null_every=7))

    def stop(epoch, metrics):
        if epoch == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_routers(model, tok, f, tmp_path / "part", config=_cfg(tmp_path), callback=stop)
    return f


def test_resume_never_unpickles_a_planted_trainer_state(setup, tmp_path):
    model, tok = setup
    f = _interrupted(model, tok, tmp_path, stop_at=2)
    ckpt = tmp_path / "part" / "checkpoints" / "epoch-0002"
    assert {p.suffix for p in ckpt.iterdir()} == {".json", ".safetensors"}  # no pickle is written
    planted = ckpt / "trainer_state.pt"  # where older versions kept their pickled state
    torch.save({"optimizer": _Payload(tmp_path / "ran")}, planted)
    probe = tmp_path / "probe.pt"  # the payload is real: unpickling a copy runs it
    torch.save({"optimizer": _Payload(tmp_path / "probe-ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()
    with pytest.raises(ArtifactError, match=r"trainer_state\.pt: a pickled trainer state.*delete .*checkpoints "
                                            r"or train into a fresh --out") as info:
        train_routers(model, tok, f, tmp_path / "part", config=_cfg(tmp_path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ran").exists()
    # a folder holding only an old checkpoint is refused the same way
    shutil.rmtree(ckpt)
    old = tmp_path / "part" / "checkpoints" / "epoch-0005"
    old.mkdir()
    torch.save({"optimizer": _Payload(tmp_path / "ran")}, old / "trainer_state.pt")
    with pytest.raises(ArtifactError, match="pickled trainer state"):
        train_routers(model, tok, f, tmp_path / "part", config=_cfg(tmp_path))
    assert not (tmp_path / "ran").exists()


def _nan_moment(ckpt):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "trainer_state.safetensors"))
    tensors["optimizer.0.exp_avg"][0, 0] = float("nan")
    save_file(tensors, str(ckpt / "trainer_state.safetensors"))


def _edit_state(**changes):
    def edit(ckpt):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state.update({k: v(state) for k, v in changes.items()})
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return edit


@pytest.mark.parametrize("tamper, problem", [
    (_nan_moment, "tensor optimizer.0.exp_avg holds non-finite values"),
    (lambda ckpt: (ckpt / "trainer_state.json").write_text("{oops"), "not a readable JSON file"),
    (lambda ckpt: (ckpt / "trainer_state.safetensors").write_bytes(b"\0" * 16), "truncated or corrupt"),
    (_edit_state(param_groups=lambda s: [{**s["param_groups"][0], "weight_decay": 0.5}]), "optimizer settings"),
    (_edit_state(epoch=lambda s: 7), "epoch or history"),
    (_edit_state(scheduler=lambda s: {**s["scheduler"], "last_epoch": "3"}), "scheduler state"),
    (_edit_state(extra=lambda s: 1), "not a trainer state"),
])
def test_tampered_trainer_state_is_refused_naming_the_file(setup, tmp_path, tamper, problem):
    model, tok = setup
    f = _interrupted(model, tok, tmp_path, stop_at=1)
    ckpt = tmp_path / "part" / "checkpoints" / "epoch-0001"
    tamper(ckpt)
    with pytest.raises(ArtifactError, match="trainer_state") as info:
        train_routers(model, tok, f, tmp_path / "part", config=_cfg(tmp_path))
    assert problem in str(info.value) and f"delete {ckpt}" in str(info.value)


def test_repeated_ids_keep_the_first_record_with_a_warning(setup, tmp_path):
    model, tok = setup
    records = synthetic_records(10, seed=3)
    again = [{**r, "best_path": "2222", "good_paths": []} for r in records[:3]]  # e.g. two searches appended
    f = write_jsonl(tmp_path / "paths.jsonl", records + again)
    with pytest.warns(UserWarning, match="3 records repeat an id already seen"):
        loaded = load_path_records(f, L)
    assert [r["id"] for r in loaded] == [r["id"] for r in records]
    assert all(r["label"] != "2222" for r in loaded)
    with pytest.warns(UserWarning, match="3 records repeat an id"):
        result = train_routers(model, tok, f, tmp_path / "routers", config=_cfg(tmp_path, epochs=1))
    assert result["records"] == 10 and result["train"] + result["dev"] == 10


def test_second_trainer_into_one_folder_fails_at_once(setup, tmp_path):
    from drllm.artifacts import OutputLockedError, exclusive_lock

    model, tok = setup
    f = write_jsonl(tmp_path / "paths.jsonl", synthetic_records(6))
    with exclusive_lock(tmp_path / "routers"):  # another trainer (a lock of its own, as another process has)
        with pytest.raises(OutputLockedError, match="routers is being written by another process"):
            train_routers(model, tok, f, tmp_path / "routers", config=_cfg(tmp_path, epochs=1))
    assert not (tmp_path / "routers" / "checkpoints").exists()
    train_routers(model, tok, f, tmp_path / "routers", config=_cfg(tmp_path, epochs=1))
