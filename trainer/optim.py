"""What the update step uses: the optimiser, the learning-rate schedule and the EMA of weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainer.recipe import OptimConfig, RecipeError, ScheduleConfig
from trainer.whitening import Whiten


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with `g`'s singular vectors: the quintic
    Newton-Schulz iteration Muon uses (coefficients from Keller Jordan's Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class MuonSGD(torch.optim.Optimizer):
    """SGD with momentum (Nesterov or not) for every group; groups marked `muon` instead take
    Muon's update: the momentum of the gradient, flattened to (out, in*k*k) and
    orthogonalised, applied to a filter bank renormalised to norm sqrt(out) first (the batch
    norm after each such convolution makes its scale irrelevant, airbench).

    torch.optim.Muon (torch 2.13) takes 2-D parameters only and refuses conv filters; this is
    the flattening airbench does, on the same iteration.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float, nesterov: bool):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0}
        defaults["muon"] = False
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, m, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and not group["muon"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(m).add_(g)
                buf = state["momentum_buffer"]
                update = g.add(buf, alpha=m) if nesterov else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                    update = newton_schulz(update.reshape(len(p), -1)).view_as(p)
                p.add_(update, alpha=-lr)


def _batchnorm_biases(model: nn.Module) -> set[int]:
    return {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}


def _muon_filters(model: nn.Module) -> set[int]:
    # In our builder a convolution without a bias is always followed by batch norm.
    return {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.bias is None and m.weight.requires_grad
    }


def make_optimizer(
    model: nn.Module, cfg: OptimConfig, steps_per_epoch: int = 0
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum), SGD with Muon for conv filters, or AdamW, as the recipe says.

    Groups: decayed weights; biases and batch-norm scales (never decayed: it only hurts);
    batch-norm biases (`bn_bias_lr_scale`); Muon's filters; a whitening layer's bias, with
    `train_steps` after which trainer.optim.make_scheduler stops it.
    """
    if cfg.conv_update == "muon" and cfg.name != "sgd":
        raise RecipeError("optim.conv_update=muon: the other weights' optimiser must be sgd")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bn_biases = _batchnorm_biases(model)
    muon = _muon_filters(model) if cfg.conv_update == "muon" else set()
    whiten = {id(m.bias): m.bias_epochs for m in model.modules() if isinstance(m, Whiten)}
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "weight_decay": cfg.weight_decay},
        "no_decay": {"params": [], "weight_decay": 0.0},
        "bn_bias": {"params": [], "weight_decay": 0.0, "lr": cfg.lr * cfg.bn_bias_lr_scale},
        "muon": {"params": [], "muon": True, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum},
    }
    for _, p in params:
        if id(p) in whiten:
            epochs = whiten[id(p)]
            steps = None if epochs is None else epochs * steps_per_epoch
            groups[f"whiten{len(groups)}"] = {
                "params": [p],
                "weight_decay": 0.0,
                "train_steps": steps,
            }
        elif id(p) in muon:
            groups["muon"]["params"].append(p)
        elif id(p) in bn_biases:
            groups["bn_bias"]["params"].append(p)
        else:
            groups["decay" if p.ndim > 1 else "no_decay"]["params"].append(p)
    kept = [g for g in groups.values() if g["params"]]
    if cfg.name == "sgd" and muon:
        return MuonSGD(kept, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    for g in kept:
        g.pop("muon", None)
        g.pop("momentum", None)
    if cfg.name == "sgd":  # no Muon group: torch's own (foreach) SGD
        return torch.optim.SGD(kept, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(kept, lr=cfg.lr, betas=tuple(cfg.betas))


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
    """The recipe's schedule over `total_steps` updates, stepped once per update; a group
    with `train_steps` (a whitening bias) stops there."""
    f = lr_factor(cfg, total_steps)

    def stopping(limit: int) -> Callable[[int], float]:
        return lambda step: f(step) if step < limit else 0.0

    factors = [
        f if g.get("train_steps") is None else stopping(g["train_steps"])
        for g in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


class Lookahead:
    """airbench's lookahead: every `every` steps the weights (and float buffers) are pulled
    to a slow average of themselves, `slow = lerp(slow, fast, 1 - decay)`, then copied back.
    `decay` grows as 0.95^5 * progress^3 (no pull early), and the last step takes the
    average outright."""

    def __init__(self, model: nn.Module, total_steps: int, every: int = 5):
        self.slow = [t.detach().clone() for t in self._tensors(model)]
        self.total = total_steps
        self.every = every

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [t for t in model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after update `step` (1-based)."""
        if step % self.every and step != self.total:
            return
        decay = 1.0 if step >= self.total else 0.95**5 * (step / self.total) ** 3
        fast = self._tensors(model)
        torch._foreach_lerp_(self.slow, fast, 1.0 - decay)
        torch._foreach_copy_(fast, self.slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mine, saved in zip(self.slow, state["slow"], strict=True):
            mine.copy_(saved)


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
