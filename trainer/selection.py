"""Which epoch's weights a run keeps (`train.select`), from its validation metrics alone.

On 5,000 validation images one point of accuracy is 50 images, and ties are common: the
rules differ in what they trust. BENCHMARKS.md compares them on the same runs' per-epoch
test accuracy, over seeds.
"""

from __future__ import annotations

from typing import Any

SELECTION_RULES = ("val_accuracy", "val_accuracy_latest", "val_loss", "last")


def select_epoch(history: list[dict[str, Any]], rule: str) -> int:
    """The epoch (1-based) whose weights `rule` keeps, from the per-epoch validation
    metrics so far. Without a validation split every rule keeps the last epoch."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r} (known: {', '.join(SELECTION_RULES)})")
    scored = [r for r in history if r.get("val_accuracy") is not None]
    if rule == "last" or not scored:
        return int(history[-1]["epoch"])
    if rule == "val_loss":
        return int(min(scored, key=lambda r: (r["val_loss"], -r["epoch"]))["epoch"])
    latest = rule == "val_accuracy_latest"
    key = (
        (lambda r: (r["val_accuracy"], r["epoch"]))
        if latest
        else (lambda r: (r["val_accuracy"], -r["epoch"]))
    )
    return int(max(scored, key=key)["epoch"])
