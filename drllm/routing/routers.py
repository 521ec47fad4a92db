"""Per-block router MLPs and their checkpoints (checked before use: they may come from someone else)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .. import ops
from ..artifacts import ArtifactError, load_tensors, read_json, tensor_header

CONFIG_NAME = "drllm_routers.json"
WEIGHTS_NAME = "routers.safetensors"

# Bounds of a router config: far above any real model, low enough that a lying file cannot exhaust memory.
CONFIG_BOUNDS = {"hidden_size": 65536, "num_blocks": 1024, "num_windows": 1024, "hidden": 4096}
REQUIRED = ("model_type", "hidden_size", "num_blocks")
MAX_PARAMETERS = 2**28  # 1 GiB of float32; a 405B Llama's routers (126 x 16384 x 128) fit


class RouterFileError(ArtifactError):
    """A router checkpoint drllm refuses to load; the message names the file, the problem and the fix."""


def fix_hint(directory: Path, kind: str = "Routers") -> str:
    what = "routers" if kind == "Routers" else "budget routers"
    return f"re-save the {what} with {kind}.save_pretrained or retrain them (`drllm train --out {directory}`)"


def check_fields(config, path: Path, fix: str, optional: tuple[str, ...] = ()) -> dict:
    """The checks every router config gets: a JSON object with known keys (``optional`` names more), a
    model_type string and positive ints within :data:`CONFIG_BOUNDS`; defaults filled in."""
    if not isinstance(config, dict):
        raise RouterFileError(f"{path}: expected a JSON object, got {type(config).__name__}; {fix}")
    unknown = sorted(set(config) - set(REQUIRED) - set(CONFIG_BOUNDS) - set(optional))
    missing = [k for k in REQUIRED if k not in config]
    if unknown or missing:
        keys = [f"{what} keys {names}" for what, names in (("unknown", unknown), ("missing", missing)) if names]
        raise RouterFileError(f"{path}: {', '.join(keys)}; {fix}")
    if not isinstance(config["model_type"], str) or not config["model_type"]:
        raise RouterFileError(f"{path}: model_type must be a non-empty string, got {config['model_type']!r}; {fix}")
    for key, bound in CONFIG_BOUNDS.items():
        value = config.get(key, 1)
        if type(value) is not int or not 1 <= value <= bound:  # bool is an int subclass: refused too
            raise RouterFileError(f"{path}: {key} must be an integer in [1, {bound}], got {value!r}; {fix}")
    return {"num_windows": 8, "hidden": 128, **config}


def check_parameters(count: int, path: Path, fix: str) -> None:
    """Refuse a config asking for more than :data:`MAX_PARAMETERS` parameters, before anything is allocated."""
    if count > MAX_PARAMETERS:
        raise RouterFileError(f"{path}: the config asks for {count:,} router parameters, more than the "
                              f"{MAX_PARAMETERS:,} allowed; {fix}")


def check_config(config, path: Path) -> dict:
    """A router config that is safe to build: known keys, right types, positive ints within bounds, and a
    parameter count below :data:`MAX_PARAMETERS`; checked before anything is allocated."""
    fix = fix_hint(path.parent)
    config = check_fields(config, path, fix)
    check_parameters(config["num_blocks"] * _mlp_parameters(config["hidden_size"], config["hidden"]), path, fix)
    return config


def _mlp_parameters(hidden_size: int, hidden: int) -> int:
    return hidden_size * hidden + hidden + hidden * 3 + 3


def mlp_layout(prefix: str, hidden_size: int, hidden: int, outputs: int = 3) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtype (float32) of one :class:`RouterMLP`'s tensors under ``prefix``."""
    shapes = {"fc1.weight": (hidden, hidden_size), "fc1.bias": (hidden,), "fc2.weight": (outputs, hidden),
              "fc2.bias": (outputs,)}
    return {f"{prefix}{name}": (shape, "F32") for name, shape in shapes.items()}


def _layout(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtype (float32) of the tensors a checkpoint of ``config`` holds."""
    layout = {}
    for i in range(config["num_blocks"]):
        layout.update(mlp_layout(f"mlps.{i}.", config["hidden_size"], config["hidden"]))
    return layout


def _check_depth(weights: Path, config_file: Path, num_blocks: int) -> None:
    """A config whose ``num_blocks`` disagrees with the weights gets a message saying so (from the header)."""
    fix = fix_hint(weights.parent)
    blocks = {name.split(".")[1] for name in tensor_header(weights, fix, RouterFileError) if name.startswith("mlps.")}
    if blocks and len(blocks) != num_blocks:
        raise RouterFileError(
            f"{weights}: holds routers for {len(blocks)} blocks but {config_file} says num_blocks {num_blocks}: "
            f"the two files come from different checkpoints; {fix}"
        )


class RouterMLP(nn.Module):
    """Linear(H, hidden) -> GELU(tanh) -> Linear(hidden, outputs), float32, Xavier init (3 outputs: skip,
    execute, repeat)."""

    def __init__(self, hidden_size: int, hidden: int = 128, outputs: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden, dtype=torch.float32)
        self.fc2 = nn.Linear(hidden, outputs, dtype=torch.float32)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.router_mlp(x.float(), self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class RouterCheckpoint:
    """What router classes share: a ``config`` naming the base model, checked against it, and saving as
    ``weights_name`` (safetensors) + ``config_name`` (JSON)."""

    weights_name: str
    config_name: str
    config_keys: tuple[str, ...]  # the attributes a checkpoint's config records

    @property
    def config(self) -> dict:
        return {key: getattr(self, key) for key in self.config_keys}

    @classmethod
    def for_model(cls, model: nn.Module, **options):
        """Fresh routers sized for ``model`` (a loaded HF decoder model), read from its config; ``options`` as the
        constructor's (e.g. ``num_windows``, ``hidden``).

        :func:`drllm.patch` checks them against the model and moves each router
        to its block's device.
        """
        config = model.config
        routers = cls(config.model_type, config.hidden_size, config.num_hidden_layers, **options)
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        return routers.to(device)

    def check_compatible(self, model_type: str, hidden_size: int, num_blocks: int) -> None:
        """Raise a ValueError naming every mismatch with the base model."""
        problems = [
            f"{name}: routers {mine!r}, model {theirs!r}"
            for name, mine, theirs in (
                ("model_type", self.model_type, model_type),
                ("hidden_size", self.hidden_size, hidden_size),
                ("num_blocks", self.num_blocks, num_blocks),
            )
            if mine != theirs
        ]
        if problems:
            raise ValueError(
                "these routers were trained for another model (" + "; ".join(problems) + "). "
                "Load the router checkpoint made for this base model, or train one with `drllm train`."
            )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the float32 weights (``weights_name``) and the config (``config_name``) into ``directory``, each
        atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (self.weights_name + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / self.weights_name)
        tmp = directory / (self.config_name + ".tmp")
        tmp.write_text(json.dumps(self.config, indent=2) + "\n")
        os.replace(tmp, directory / self.config_name)


class Routers(RouterCheckpoint, nn.Module):
    """One router per decoder block of a base model.

    The config records the base model's ``model_type``, hidden size and
    block count so that a checkpoint is never applied to another model.
    """

    weights_name, config_name = WEIGHTS_NAME, CONFIG_NAME
    config_keys = ("model_type", "hidden_size", "num_blocks", "num_windows", "hidden")

    def __init__(self, model_type: str, hidden_size: int, num_blocks: int, num_windows: int = 8, hidden: int = 128):
        super().__init__()
        if num_windows < 1:
            raise ValueError(f"num_windows must be >= 1, got {num_windows}")
        self.model_type = model_type
        self.hidden_size = hidden_size
        self.num_blocks = num_blocks
        self.num_windows = num_windows
        self.hidden = hidden
        self.mlps = nn.ModuleList(RouterMLP(hidden_size, hidden) for _ in range(num_blocks))

    def logits(self, block: int, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Windowed-mean router logits ``[B, 3]`` of block ``block``."""
        mlp = self.mlps[block]
        return ops.pooled_router_logits(
            hidden_states, mask, self.num_windows, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
        )

    def weighted_logits(self, block: int, weights: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` from precomputed pooling weights (:func:`drllm.ops.window_weights`), shared by blocks."""
        mlp = self.mlps[block]
        return ops.weighted_router_logits(
            weights, hidden_states, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
        )

    def device_of(self, block: int) -> torch.device:
        """Where block ``block``'s router lives (each may sit on its own block's device)."""
        return self.mlps[block].fc1.weight.device

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "Routers":
        """Routers saved by :meth:`save_pretrained`, checked before use: the config against a schema with
        bounds, then the weights' names, shapes and dtypes (from the header, before any tensor is read), then
        their values (finite). Raises :class:`RouterFileError` naming the file, the problem and the fix."""
        directory = Path(directory)
        config_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        config = check_config(read_config(config_file, WEIGHTS_NAME, fix_hint(directory), "Routers"), config_file)
        _check_depth(weights, config_file, config["num_blocks"])
        state = load_tensors(weights, _layout(config), fix_hint(directory), RouterFileError)
        routers = cls(**config)
        routers.load_state_dict(state)
        return routers.to(device)


def read_config(config_file: Path, weights_name: str, fix: str, kind: str):
    """The parsed JSON config of a checkpoint folder; a folder without one gets a FileNotFoundError saying what
    a checkpoint folder holds."""
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: a router checkpoint folder holds {config_file.name} and {weights_name} "
            f"(written by {kind}.save_pretrained or `drllm train`)"
        )
    return read_json(config_file, fix, RouterFileError)

