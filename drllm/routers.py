"""Per-block router MLPs and their checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from . import ops

CONFIG_NAME = "drllm_routers.json"
WEIGHTS_NAME = "routers.safetensors"


class RouterMLP(nn.Module):
    """Linear(H, hidden) -> GELU(tanh) -> Linear(hidden, 3), float32, Xavier init."""

    def __init__(self, hidden_size: int, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden, dtype=torch.float32)
        self.fc2 = nn.Linear(hidden, 3, dtype=torch.float32)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.router_mlp(x.float(), self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class Routers(nn.Module):
    """One router per decoder block of a base model.

    The config records the base model's ``model_type``, hidden size and
    block count so that a checkpoint is never applied to another model.
    """

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

    @classmethod
    def for_model(cls, model: nn.Module, num_windows: int = 8, hidden: int = 128) -> "Routers":
        """Fresh routers sized for ``model`` (a loaded HF decoder model)."""
        from .runtime.adapters import describe

        info = describe(model)
        routers = cls(info.model_type, info.hidden_size, info.num_blocks, num_windows, hidden)
        return routers.to(info.device)

    @property
    def config(self) -> dict:
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_blocks": self.num_blocks,
            "num_windows": self.num_windows,
            "hidden": self.hidden,
        }

    def logits(self, block: int, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Windowed-mean router logits ``[B, 3]`` of block ``block``."""
        mlp = self.mlps[block]
        return ops.pooled_router_logits(
            hidden_states, mask, self.num_windows, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
        )

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
        """Write ``routers.safetensors`` and ``drllm_routers.json``, each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / WEIGHTS_NAME)
        tmp = directory / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(self.config, indent=2) + "\n")
        os.replace(tmp, directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "Routers":
        from safetensors.torch import load_file

        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} not found: a router checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(written by Routers.save_pretrained or `drllm train`)"
            )
        config = json.loads(config_file.read_text())
        routers = cls(**config)
        routers.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return routers.to(device)
