"""What the update step uses: the optimiser, the learning-rate schedule and the EMA of weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainer.recipe import OptimConfig, ScheduleConfig


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW over `model`'s parameters, as the recipe says."""
    # No weight decay on biases and batch-norm scales: decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(cfg: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at each step (one-cycle, cosine with warmup, constant)."""
    warm = max(1, int(cfg.warmup_fraction * total_steps)) if cfg.warmup_fraction else 0
    low = cfg.final_lr_fraction

    def f(step: int) -> float:
        if cfg.name == "constant":
            return 1.0
        if step < warm:  # both start low and ramp up linearly
            return 0.1 + 0.9 * step / warm if cfg.name == "onecycle" else (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.name == "onecycle":
            return 1.0 - (1.0 - low) * t  # linear anneal to `low`
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule over `total_steps` updates, stepped once per update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps))


class EMA:
    """Exponential moving average of weights (and float buffers), evaluated instead of the
    raw weights. The decay ramps up over the first steps so early noise is not kept."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mine = list(self.module.parameters()) + list(self.module.buffers())
        theirs = list(model.parameters()) + list(model.buffers())
        return mine, theirs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine, theirs = self._pairs(model)
        floats = [
            (a, b.detach()) for a, b in zip(mine, theirs, strict=True) if a.is_floating_point()
        ]
        torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - d)
        for a, b in zip(mine, theirs, strict=True):
            if not a.is_floating_point():
                a.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
