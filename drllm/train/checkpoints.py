"""Checkpoints: one folder per epoch, routers plus trainer state, so an interrupted run resumes exactly.

Each folder is written to a temporary name and renamed into place, so it is
complete or absent. It holds the routers (:meth:`Routers.save_pretrained`)
and the trainer state: optimizer moments as safetensors, the rest (epoch,
history, the run's signature, optimizer groups, scheduler) as JSON, never
pickle, and every part is checked before it is loaded: an output folder may
come from someone else, and unpickling a file runs any code it carries.
The routers of the epoch kept so far (the best on the dev part) are in
``checkpoints/best``, written the same way before the epoch's own folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..artifacts import ArtifactError, load_tensors, read_json, write_json
from ..routing import Routers

__all__ = ["checkpoint_dirs", "refuse_legacy_state", "save_checkpoint", "save_best", "best_dir", "resume"]

CHECKPOINTS = "checkpoints"
BEST = "best"
STATE_TENSORS = "trainer_state.safetensors"  # optimizer moments
STATE_JSON = "trainer_state.json"  # epoch, history, signature, optimizer groups, scheduler
STATE_KEYS = {"epoch", "history", "signature", "param_groups", "scheduler"}
LEGACY_STATE = "trainer_state.pt"  # a pickle of older versions: never loaded


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    root = out_dir / CHECKPOINTS
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("epoch-") and (d / STATE_JSON).is_file():
                try:
                    found.append((int(d.name[len("epoch-") :]), d))
                except ValueError:
                    pass
    return sorted(found)


def refuse_legacy_state(out_dir: Path) -> None:
    """Refuse to resume next to a pickled trainer state of an older drllm, which is never loaded: unpickling
    a file from someone else runs any code it carries."""
    legacy = sorted((out_dir / CHECKPOINTS).glob(f"epoch-*/{LEGACY_STATE}"))
    if legacy:
        raise ArtifactError(
            f"{legacy[-1]}: a pickled trainer state (older drllm), never loaded because unpickling can run code; "
            f"delete {out_dir / CHECKPOINTS} or train into a fresh --out"
        )


def _optimizer_layout(optimizer: torch.optim.Optimizer) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors AdamW holds after a step, as saved: ``optimizer.<param>.<step|exp_avg|exp_avg_sq>``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {f"optimizer.{i}.{name}": (shape, "F32") for i, p in enumerate(params)
            for name, shape in (("step", ()), ("exp_avg", tuple(p.shape)), ("exp_avg_sq", tuple(p.shape)))}


def _save_trainer_state(directory: Path, optimizer, scheduler, info: dict) -> None:
    """Optimizer moments as safetensors, the rest (``info``, optimizer groups, scheduler) as JSON."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{name}": t.detach().cpu().contiguous()
               for i, state in opt["state"].items() for name, t in state.items()}
    save_file(tensors, str(directory / STATE_TENSORS))
    write_json(directory / STATE_JSON, {**info, "param_groups": opt["param_groups"],
                                        "scheduler": scheduler.state_dict()})


def best_dir(out_dir: Path) -> Path:
    return out_dir / CHECKPOINTS / BEST


def _write_folder(final: Path, write) -> None:
    """``write(folder)`` into a temporary folder renamed to ``final``: it appears complete, or not at all
    (a leftover ``final`` of an earlier run is replaced)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_best(out_dir: Path, routers: Routers) -> None:
    """Keep ``routers`` as the best so far."""
    _write_folder(best_dir(out_dir), routers.save_pretrained)


def save_checkpoint(out_dir: Path, epoch: int, routers: Routers, optimizer, scheduler, info: dict,
                    keep: int) -> Path:
    """Epoch ``epoch``'s folder; only the newest ``keep`` (at least one) are kept."""
    def write(folder: Path) -> None:
        routers.save_pretrained(folder)
        _save_trainer_state(folder, optimizer, scheduler, info)

    final = out_dir / CHECKPOINTS / f"epoch-{epoch:04d}"
    _write_folder(final, write)
    for _, old in checkpoint_dirs(out_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _as_json(value):
    """``value`` as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(value))


def _without_lr(group) -> dict | None:
    return {k: v for k, v in group.items() if k != "lr"} if isinstance(group, dict) else None


def _state_problem(state, epoch: int, optimizer, scheduler) -> str | None:
    """What makes the JSON part of a trainer state unfit for this trainer, if anything: its keys, the epoch
    of its folder, optimizer groups other than this run's (but for the scheduled learning rate), a
    scheduler state of another shape."""
    groups = _as_json(optimizer.state_dict()["param_groups"])
    sched = _as_json(scheduler.state_dict())
    if not isinstance(state, dict) or set(state) != STATE_KEYS:
        return "not a trainer state (other keys)"
    if state["epoch"] != epoch or not isinstance(state["history"], list) or len(state["history"]) != epoch:
        return f"epoch or history does not match the folder's epoch {epoch}"
    saved = state["param_groups"] if isinstance(state["param_groups"], list) else []
    if [_without_lr(g) for g in saved] != [_without_lr(g) for g in groups] or not all(
            isinstance(g["lr"], float) for g in saved):
        return "optimizer settings differ from this run's"
    if not isinstance(state["scheduler"], dict) or set(state["scheduler"]) != set(sched) or any(
            type(state["scheduler"][k]) is not type(v) for k, v in sched.items()):
        return "scheduler state does not fit this run's scheduler"
    return None


def resume(ckpt: Path, epoch: int, signature: dict, routers: Routers, optimizer, scheduler) -> list[dict]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``routers``, ``optimizer`` and ``scheduler``
    after checking every part of it; returns the history so far."""
    fix = f"delete {ckpt} to resume from the epoch before, or train into a fresh --out"
    path = ckpt / STATE_JSON
    state = read_json(path, fix)
    if isinstance(state, dict) and state.get("signature") != _as_json(signature):
        recorded = state.get("signature") if isinstance(state.get("signature"), dict) else {}
        changed = [k for k in signature if recorded.get(k) != _as_json(signature[k])]
        raise ArtifactError(
            f"{ckpt} was written by a run with another {' and '.join(changed)}; "
            "pass resume=False (drllm train --no-resume) to start over, or use another output folder"
        )
    problem = _state_problem(state, epoch, optimizer, scheduler)
    if problem:
        raise ArtifactError(f"{path}: {problem}; {fix}")
    tensors = load_tensors(ckpt / STATE_TENSORS, _optimizer_layout(optimizer), fix)
    moments: dict[int, dict] = {}
    for key, t in tensors.items():
        _, index, name = key.split(".")
        moments.setdefault(int(index), {})[name] = t
    routers.load_state_dict(Routers.from_pretrained(ckpt).state_dict())
    optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return state["history"]
