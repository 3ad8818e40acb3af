"""The manifest a new version starts from: what was trained, on what, from which source.

The typed `Manifest` and its JSON are the contract's (serving.contract); the exporter fills
in opset, parity, variants, insight and files with `dataclasses.replace` as it learns them.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import trainer
from serving.contract import InputSpec, Manifest
from trainer.recipe import Recipe


def new_manifest(
    name: str,
    version: int,
    state: dict[str, Any],
    recipe: Recipe,
    test_accuracy: float,
    exporter: str,
) -> Manifest:
    """The manifest of a version whose fp32 graph has just been exported from `state`."""
    c, h, w = state["in_shape"]
    return Manifest(
        labels=tuple(state["classes"]),
        input=InputSpec(c, h, w),
        mean=tuple(float(m) for m in state["mean"]),
        name=name,
        version=version,
        std=tuple(float(s) for s in state["std"]),
        dataset=recipe.data.name,
        test_accuracy=test_accuracy,  # PyTorch's; parity guarantees ORT's is the same
        exporter=exporter,
        training=state["recipe"],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source_commit=source_commit(),
        convserve_version=trainer.__version__,
    )


def source_commit() -> str:
    """The convserve source commit (`-dirty` if the work tree has changes), else "unknown"."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            raise OSError(out.stderr)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
