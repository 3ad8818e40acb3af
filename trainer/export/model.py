"""The model to export: a checkpoint found, read and rebuilt as an fp32 eval-mode network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.export.errors import ExportError, first_line
from trainer.models import Classifier, build_model
from trainer.recipe import Recipe, RecipeError


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file as given; for a run dir, its best checkpoint (else its last)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise ExportError(f"checkpoint {p} not found")
    candidates = [p / "checkpoints" / "best.pt", p / "checkpoints" / "last.pt"]
    candidates += [p / "best.pt", p / "last.pt"]
    for c in candidates:
        if c.is_file():
            return c
    raise ExportError(f"no checkpoint in {p} (looked for checkpoints/best.pt and last.pt)")


def load_model(checkpoint: Path) -> tuple[dict[str, Any], Recipe, Classifier]:
    """Read a checkpoint and rebuild its eval model (eval mode, fp32, strict weights)."""
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    needed = ("recipe", "eval_model", "classes", "in_shape", "mean", "std")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise ExportError(f"{checkpoint} is not a convserve training checkpoint (no {missing})")
    try:
        recipe = Recipe.model_validate(state["recipe"])
        model = build_model(
            recipe.model,
            tuple(state["in_shape"]),
            len(state["classes"]),
            state["mean"],
            state["std"],
        )
    except (ValidationError, RecipeError) as exc:
        raise ExportError(
            f"{checkpoint}: its recipe cannot build a model: {first_line(exc)}"
        ) from None
    _load_weights(model, state["eval_model"], checkpoint)
    return state, recipe, model.eval()


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], checkpoint: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    resized = sorted(
        k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape
    )
    if missing or unexpected or resized:
        parts = [
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", resized),
            )
            if keys
        ]
        raise ExportError(
            f"{checkpoint}: weights do not match the model its recipe describes "
            f"({'; '.join(parts)})"
        )
    model.load_state_dict(weights, strict=True)
