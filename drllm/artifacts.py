"""Files drllm writes and reads back: validated before use, never unpickled, one writer at a time.

Why: router checkpoints, trainer state and search records travel between
people and machines. A file from someone else must not run code (so no
pickle), must not allocate or load garbage before it is checked (so the
JSON is checked against bounds and the safetensors header against the
expected names, shapes and dtypes before any tensor is read), and a long
job's output must not be extended by a second process or under other
settings (so an exclusive lock and a settings sidecar). Every error is one
line naming the file, the problem and the fix. (torch is imported where it
is used: the CLI imports this module to build its parser.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArtifactError",
    "OutputLockedError",
    "read_json",
    "write_json",
    "tensor_header",
    "load_tensors",
    "exclusive_lock",
    "settings_path",
    "read_settings",
    "settings_diff",
    "claim_output",
    "model_fingerprint",
]

# A tensor layout: name -> (shape, safetensors dtype string such as "F32").
Layout = dict[str, tuple[tuple[int, ...], str]]


class ArtifactError(ValueError):
    """A file drllm refuses to use; the message names the file, the problem and the fix."""


class OutputLockedError(ArtifactError):
    """Another process is writing the same output."""


def read_json(path: Path, fix: str, error: type[ArtifactError] = ArtifactError) -> Any:
    """The parsed JSON of ``path``; a file that is not JSON raises ``error`` ending with ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise error(f"{path}: not a readable JSON file ({err}); {fix}") from None


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def tensor_header(path: Path, fix: str, error: type[ArtifactError] = ArtifactError) -> Layout:
    """Names, shapes and dtypes from a safetensors header, without reading any tensor."""
    from safetensors import safe_open

    if not path.is_file():
        raise error(f"{path}: file not found; {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise error(f"{path}: not a readable safetensors file, truncated or corrupt ({err}); {fix}") from None


def _layout_problems(found: Layout, expected: Layout) -> list[str]:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    problems = [f"{len(missing)} missing tensors (first: {missing[0]})"] if missing else []
    problems += [f"{len(extra)} unexpected tensors (first: {extra[0]})"] if extra else []
    for name in sorted(set(found) & set(expected)):
        (shape, dtype), (want_shape, want_dtype) = found[name], expected[name]
        if shape != want_shape or dtype != want_dtype:
            problems.append(f"{name} is {dtype}{list(shape)}, expected {want_dtype}{list(want_shape)}")
    return problems


def load_tensors(path: Path, expected: Layout, fix: str,
                 error: type[ArtifactError] = ArtifactError) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose header matches ``expected`` exactly and whose values are finite.

    The header is checked before any data is read, so a file made for
    another shape is refused without allocating its tensors.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    problems = _layout_problems(tensor_header(path, fix, error), expected)
    if problems:
        raise error(f"{path}: {'; '.join(problems[:3])}; {fix}")
    tensors = load_file(str(path))
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise error(f"{path}: tensor {name} holds non-finite values (NaN or inf); {fix}")
    return tensors


# ------------------------------------------------------------------ job outputs


def _lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``target`` (``flock`` on the sidecar ``TARGET.lock``).

    Why: two processes appending to one output both do all the work and
    write every record twice. The second fails at once, naming the PID
    that holds the lock; the lock goes with the process, even on SIGKILL.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(target)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise OutputLockedError(
            f"{target} is being written by another process (PID {holder}, lock file {lock}); "
            "wait for it to finish or pass another --out"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, removing it would race with the next writer


def settings_path(target: str | os.PathLike) -> Path:
    """``paths.jsonl`` -> ``paths.jsonl.settings.json``: the settings that made its records."""
    target = Path(target)
    return target.with_name(target.name + ".settings.json")


def read_settings(target: str | os.PathLike) -> dict | None:
    """The settings recorded next to ``target`` (None when there is no sidecar)."""
    path = settings_path(target)
    if not path.is_file():
        return None
    settings = read_json(path, f"delete {path} and {target}, or pass another --out")
    if not isinstance(settings, dict):
        raise ArtifactError(f"{path}: settings must be a JSON object; delete it and {target}, or pass another --out")
    return settings


def settings_diff(recorded: dict, settings: dict) -> list[str]:
    """``"name: old -> new"`` for every setting that differs."""
    names = sorted(set(recorded) | set(settings))
    return [f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in names if recorded.get(k) != settings.get(k)]


def claim_output(target: str | os.PathLike, settings: dict, overwrite: bool = False) -> None:
    """Make ``target`` an output of ``settings`` (call it under :func:`exclusive_lock`).

    A new output gets the sidecar; an existing one must have been made with
    the same settings, else extending it would mix records of two
    experiments. ``overwrite`` deletes the old output first.
    """
    target = Path(target)
    sidecar = settings_path(target)
    settings = json.loads(json.dumps(settings))  # as it reads back from the file
    if overwrite:
        for path in (target, sidecar):
            path.unlink(missing_ok=True)
    if not (target.is_file() and target.stat().st_size > 0):
        write_json(sidecar, settings)  # nothing written yet: the output is this run's
        return
    recorded = read_settings(target)
    if recorded is None:
        raise ArtifactError(
            f"{target} holds records but no {sidecar.name} saying which settings made them (an older drllm "
            "wrote it); pass a new --out, or --overwrite to start over"
        )
    if recorded != settings:
        raise ArtifactError(
            f"{target} was made with other settings ({'; '.join(settings_diff(recorded, settings))}); "
            "pass a new --out, or --overwrite to start over"
        )


_NOT_THE_MODEL = ("_name_or_path", "transformers_version")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: config (but not where it was loaded from), names, shapes, dtypes,
    a strided sample and a sum."""
    import torch

    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):
        fields = json.loads(config.to_json_string(use_diff=False))
        for where in _NOT_THE_MODEL:  # the same weights loaded from elsewhere are the same model
            fields.pop(where, None)
        digest.update(json.dumps(fields, sort_keys=True).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if flat.numel():
                step = max(1, flat.numel() // 4096)
                digest.update(flat[::step].float().cpu().numpy().tobytes())
                digest.update(repr(float(flat.double().sum())).encode())
    return digest.hexdigest()
