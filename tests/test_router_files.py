"""Router checkpoints from someone else: every corruption is refused before use, naming the file, the problem
and the fix (``Routers.from_pretrained``); ``generate`` refuses routers it would ignore."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import drllm
import drllm.routing.routers as routers_mod
from drllm.routing.routers import CONFIG_NAME, WEIGHTS_NAME, RouterFileError

H, L = 16, 3


@pytest.fixture
def saved(tmp_path):
    """A valid checkpoint folder of 3 routers over hidden size 16."""
    torch.manual_seed(0)
    drllm.Routers("llama", H, L, num_windows=4).save_pretrained(tmp_path)
    return tmp_path


def refused(folder, *fragments):
    """Loading ``folder`` raises a RouterFileError (a ValueError) whose one line holds every fragment."""
    with pytest.raises(RouterFileError) as info:
        drllm.Routers.from_pretrained(folder)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "re-save the routers" in message  # the fix
    for fragment in fragments:
        assert fragment in message, message
    return message


def edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def test_valid_checkpoint_loads_exactly(saved):
    want = drllm.Routers("llama", H, L, num_windows=4)
    want.load_state_dict(load_file(str(saved / WEIGHTS_NAME)))
    got = drllm.Routers.from_pretrained(saved)
    assert got.config == want.config
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


def test_data_bytes_overwritten_with_0xff_are_refused_as_non_finite(saved):
    weights = saved / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-64:] = b"\xff" * 64  # the end of the last tensor's data: NaN floats
    weights.write_bytes(bytes(data))
    refused(saved, str(weights), "non-finite", "mlps.")


def test_truncated_weights_are_refused_naming_the_file(saved):
    weights = saved / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(saved, str(weights), "truncated or corrupt")


def test_huge_hidden_size_fails_before_allocating(saved, monkeypatch):
    built = []
    monkeypatch.setattr(routers_mod.RouterMLP, "__init__", lambda self, *a, **k: built.append(a))
    edit_config(saved, hidden_size=2_000_000)
    refused(saved, str(saved / CONFIG_NAME), "hidden_size must be an integer in [1, 65536]", "2000000")
    edit_config(saved, hidden_size=65536, hidden=4096, num_blocks=1024)  # each within bounds, together too big
    refused(saved, "router parameters")
    assert built == []  # no router was built, so nothing was allocated


def test_config_lying_about_the_depth_is_explained(saved):
    edit_config(saved, num_blocks=L + 2)
    message = refused(saved, f"holds routers for {L} blocks", f"num_blocks {L + 2}", "different checkpoints")
    assert "Missing key" not in message


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2, 3]", "expected a JSON object, got list"),
        (json.dumps({"model_type": "llama", "hidden_size": H, "num_blocks": L, "extra": 1}), "unknown keys ['extra']"),
        (json.dumps({"model_type": "llama", "hidden_size": H}), "missing keys ['num_blocks']"),
        (json.dumps({"model_type": "llama", "hidden_size": True, "num_blocks": L}), "hidden_size must be an integer"),
        (json.dumps({"model_type": "llama", "hidden_size": "16", "num_blocks": L}), "hidden_size must be an integer"),
        (json.dumps({"model_type": "llama", "hidden_size": 16.0, "num_blocks": L}), "hidden_size must be an integer"),
        (json.dumps({"model_type": "llama", "hidden_size": H, "num_blocks": 0}), "num_blocks must be an integer"),
        (json.dumps({"model_type": "llama", "hidden_size": H, "num_blocks": L, "num_windows": -1}), "num_windows"),
        (json.dumps({"model_type": "llama", "hidden_size": H, "num_blocks": L, "hidden": 5000}), "hidden must be"),
        (json.dumps({"model_type": 7, "hidden_size": H, "num_blocks": L}), "model_type must be a non-empty string"),
    ],
)
def test_bad_configs_are_refused(saved, text, problem):
    (saved / CONFIG_NAME).write_text(text)
    refused(saved, str(saved / CONFIG_NAME), problem)


def test_wrong_dtype_is_refused_from_the_header(saved):
    weights = saved / WEIGHTS_NAME
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    refused(saved, str(weights), "is F16[", "expected F32[")


def test_wrong_shape_is_refused_from_the_header(saved):
    edit_config(saved, hidden_size=2 * H)
    refused(saved, "mlps.0.fc1.weight is F32[128, 16], expected F32[128, 32]")


@pytest.mark.parametrize("change, problem", [("drop", "1 missing tensors (first: mlps.0.fc1.bias)"),
                                             ("add", "1 unexpected tensors (first: mlps.0.extra)")])
def test_missing_and_extra_tensors_are_refused(saved, change, problem):
    weights = saved / WEIGHTS_NAME
    tensors = load_file(str(weights))
    if change == "drop":
        del tensors["mlps.0.fc1.bias"]
    else:
        tensors["mlps.0.extra"] = torch.zeros(2)
    save_file(tensors, str(weights))
    refused(saved, str(weights), problem)


def test_missing_weights_file_is_named(saved):
    (saved / WEIGHTS_NAME).unlink()
    refused(saved, str(saved / WEIGHTS_NAME), "file not found")


def test_generate_refuses_routers_with_a_forced_path(capsys):
    from drllm.cli import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "hello", "--routers", "some/routers", "--path", "1111"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drllm generate: error:") and "not allowed with argument" in err and "\n" not in err
