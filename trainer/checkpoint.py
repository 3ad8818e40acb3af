"""Checkpoints that are written atomically and resume a run exactly.

A checkpoint holds only tensors, plain containers and RNG states as tensors, so
`torch.load(weights_only=True)` can read it: loading a checkpoint never runs code.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from trainer.atomic import write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says which and why."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, rename.

    A crash (or a full disk) at any moment leaves either the previous checkpoint or the new
    one under the final name, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialise in memory first: torch.save's zip writer turns a failed write (a full disk,
    # EFBIG past RLIMIT_FSIZE) into an opaque RuntimeError; a plain write keeps the OSError.
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        write_atomic(path, buf.getbuffer())
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc.strerror or exc}; "
            "the previous checkpoint is intact"
        ) from exc
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with `weights_only=True` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for torn or foreign files
        msg = f"checkpoint {path} is not a readable convserve checkpoint: {exc}"
        raise CheckpointError(msg) from exc


def rng_state() -> dict[str, Any]:
    """Global RNG states (dropout draws from torch's global generator) as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Fields a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = (
    "data.data_dir",
    "data.download",
    "train.device",
    "train.sync_batchnorm",
    "export.",
)


class ResumeError(RuntimeError):
    """A checkpoint that does not belong to this recipe."""


def check_same_recipe(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint with a recipe that would compute something else."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = flat(saved), flat(current)
    diff = sorted(
        k
        for k in set(a) | set(b)
        if a.get(k) != b.get(k) and not any(k.startswith(p) for p in RESUMABLE_CHANGES)
    )
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise ResumeError(f"checkpoint was written by a different recipe ({shown})")
