"""The training loop, written out: forward, loss, backward, update; evaluation; checkpoints.

Data lives on the training device as uint8 tensors and is batched by index. Every random
draw is keyed by (seed, epoch, step) or saved in the checkpoint, so `--resume` continues a
run to the same weights an uninterrupted run reaches.

The same loop runs on one process or on N under torchrun (trainer.distributed): the recipe's
batch size is the global batch, each rank trains on its rows of it, DistributedDataParallel
averages the gradients, and rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from serving.cores import usable_cores
from trainer import data as datalib
from trainer.augment import (
    BatchAugment,
    KeyedDropout,
    set_dropout_step,
    step_generator,
    use_keyed_dropout,
)
from trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.distributed import World, process_group
from trainer.models import Classifier, build_model
from trainer.recipe import (
    OptimConfig,
    Recipe,
    ScheduleConfig,
    TrainConfig,
    load_recipe_data,
    recipe_to_dict,
)

log = logging.getLogger("convserve.train")

# Fields a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = (
    "data.data_dir",
    "data.download",
    "train.device",
    "train.sync_batchnorm",
    "export.",
)

ONE_PROCESS = World()  # no torchrun: every collective is a no-op

# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers; older torch has the old name.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ResumeError(RuntimeError):
    """A checkpoint that does not belong to this recipe."""


# ----------------------------------------------------------------------------- set-up
def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name}: CUDA is not available on this machine")
    return dev


def configure_threads(device: torch.device, world_size: int = 1) -> int:
    """On CPU use every core this process may run on, shared evenly between ranks."""
    n = max(1, usable_cores() // world_size) if device.type == "cpu" else 1
    torch.set_num_threads(n)
    return n


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
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


def make_criterion(cfg: TrainConfig, num_classes: int) -> Callable[..., torch.Tensor]:
    if cfg.loss == "cross_entropy":
        return lambda logits, y: F.cross_entropy(
            logits.float(), y, label_smoothing=cfg.label_smoothing
        )

    def mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, num_classes).float()
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
        return F.mse_loss(torch.softmax(logits.float(), dim=1), target)

    return mse


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


# ----------------------------------------------------------------------------- data on device
@dataclass
class DeviceData:
    """A dataset split into train/val/test, as uint8 tensors on the training device."""

    classes: tuple[str, ...]
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def prepare_data(recipe: Recipe, device: torch.device) -> DeviceData:
    d = recipe.data
    ds = load_recipe_data(recipe)
    train, val = datalib.split_validation(ds.train, d.val_size, seed=recipe.train.seed)
    mean, std = datalib.channel_stats(train.images)

    def put(s: datalib.ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(s.images).to(device), torch.from_numpy(s.labels).to(device)

    return DeviceData(
        ds.classes,
        (ds.channels, ds.height, ds.width),
        tuple(mean),
        tuple(std),
        *put(train),
        *put(val),
        *put(ds.test),
    )


# ----------------------------------------------------------------------------- loop
@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray
    probabilities: np.ndarray


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    channels_last: bool = False,
    autocast: bool = False,
    world: World = ONE_PROCESS,
) -> EvalResult:
    """Loss, accuracy, predictions and probabilities of `model` on a labelled uint8 set.

    On several processes each rank evaluates its shard of the rows; loss sums are added and
    probabilities gathered, so every rank returns the result for the whole set.
    """
    n = len(images)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), np.zeros(0, np.int64), np.zeros((0, 0)))
    was_training = model.training
    model.eval()
    mine = world.shard(n)
    xs, ys = images[mine], labels[mine]
    probs, losses = [], []
    for i in range(0, max(1, len(xs)), batch_size):  # a rank with no rows still answers
        x = _layout(xs[i : i + batch_size], channels_last)
        with _autocast(images.device, autocast):
            logits = model(x).float()
        losses.append(F.cross_entropy(logits, ys[i : i + batch_size], reduction="sum"))
        probs.append(torch.softmax(logits, dim=1))
    model.train(was_training)
    p = world.gather_rows(torch.cat(probs), n).cpu().numpy()
    loss_sum = world.sum(torch.stack(losses).sum())
    pred = p.argmax(1)
    y = labels.cpu().numpy()
    return EvalResult(float(loss_sum) / n, float((pred == y).mean()), pred, p)


def train_one_epoch(
    model: nn.Module,
    step_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    data: DeviceData,
    augment: BatchAugment,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    channels_last: bool,
    bar: tqdm | None,
    world: World = ONE_PROCESS,
) -> EpochStats:
    """One pass over the training set in seeded-permutation order (last partial batch dropped).

    `batch_size` is the global batch. Every rank draws the same permutation and trains on its
    own rows of each global batch, with the augmentation and dropout draws one process would
    make for those rows; `step_fn` returns the loss of the whole global batch.
    """
    model.train()
    n = len(data.train_x)
    steps = n // batch_size
    mine = world.batch_rows(batch_size)
    dropouts = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    perm = torch.randperm(n, generator=step_generator(seed, epoch, -1)).to(data.train_x.device)
    loss_sum = torch.zeros((), device=data.train_x.device)
    correct = torch.zeros((), device=data.train_x.device, dtype=torch.long)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = perm[step * batch_size : (step + 1) * batch_size][mine]
        x, y = data.train_x[idx], data.train_y[idx]
        if augment.active:
            x = augment(x, step_generator(seed, epoch, step), total=batch_size, offset=mine.start)
        set_dropout_step(dropouts, (seed, epoch, step), batch_size, mine.start)
        loss, logits = step_fn(_layout(x, channels_last), y)
        loss_sum += loss.detach()
        correct += (logits.argmax(1) == y).sum()
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                done = (step + 1) * batch_size
                bar.set_postfix(
                    loss=f"{loss_sum.item() / (step + 1):.4f}",
                    acc=f"{correct.item() / ((step + 1) * len(y)):.4f}",  # this rank's rows
                    img_s=f"{done / (time.perf_counter() - t0):.0f}",
                )
    correct = world.sum(correct)
    seconds = time.perf_counter() - t0
    return EpochStats(
        loss_sum.item() / max(1, steps),
        correct.item() / max(1, steps * batch_size),
        steps * batch_size,
        seconds,
    )


# ----------------------------------------------------------------------------- a whole run
@dataclass
class RunResult:
    run_dir: Path
    test_accuracy: float
    test_loss: float
    per_class_accuracy: dict[str, float]
    best_val_accuracy: float | None
    best_epoch: int
    epochs_run: int
    stopped: str
    train_seconds: float
    images_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Owns one run: model, optimiser, schedule, EMA, checkpoints and the metrics log."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | os.PathLike,
        *,
        quiet: bool = False,
        world: World = ONE_PROCESS,
    ):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.world = world
        self.quiet = quiet or not world.is_main
        tc = recipe.train
        world.batch_rows(tc.batch_size)  # refuse a global batch the ranks cannot split evenly
        self.device = world.device(select_device(tc.device))
        configure_threads(self.device, world.local_size)
        self.channels_last = tc.channels_last
        self.data = prepare_data(recipe, self.device)
        if len(self.data.train_x) < tc.batch_size:
            raise ValueError(
                f"train.batch_size={tc.batch_size} is larger than the training split "
                f"({len(self.data.train_x)} images)"
            )
        torch.manual_seed(tc.seed)
        d = self.data
        self.model: Classifier = build_model(
            recipe.model, d.in_shape, len(d.classes), d.mean, d.std
        ).to(self.device)
        self.dropouts = use_keyed_dropout(self.model)  # masks independent of process count
        self.sync_bn = tc.sync_batchnorm and world.joined and self.device.type == "cuda"
        if self.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif tc.sync_batchnorm and world.joined and world.is_main:
            log.warning(
                "train.sync_batchnorm: SyncBatchNorm needs CUDA in torch %s; on %s each process "
                "normalises with the batch statistics of its own rows",
                torch.__version__,
                self.device.type,
            )
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.steps_per_epoch = len(d.train_x) // tc.batch_size
        self.optimizer = make_optimizer(self.model, recipe.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(recipe.schedule, self.steps_per_epoch * tc.epochs)
        )
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema_decay else None
        self.criterion = make_criterion(tc, len(d.classes))
        fill = tuple(round(m * 255) for m in d.mean)
        self.augment = BatchAugment(recipe.augment, fill)
        self.forward = self._data_parallel(self.model)
        if tc.compile:
            for d in self.dropouts:  # a fresh key every step: keep it out of the graph
                d.forward = torch.compiler.disable(d.forward)
            self.forward = torch.compile(self.forward)
        self.epoch = 0  # epochs completed
        self.best_val = -1.0
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []

    def _data_parallel(self, model: nn.Module) -> nn.Module:
        """Under torchrun, DDP averages the gradients over ranks during the backward pass."""
        if not self.world.joined:
            return model
        # Buffers are not broadcast from rank 0 at every forward: the only buffers that move
        # are batch-norm statistics, which are averaged once per epoch instead.
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_SYNC)

    # -- the four steps -------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on this rank's rows; returns the global batch's loss and local logits."""
        tc = self.recipe.train
        with _autocast(self.device, tc.bf16_autocast):
            logits = self.forward(x)  # 1. forward pass
            loss = self.criterion(logits, y)  # 2. loss (mean over this rank's rows)
        # The global batch's loss: every rank sees the same value and stops together.
        batch_loss = self.world.mean(loss.detach())
        if not torch.isfinite(batch_loss):
            raise TrainingDiverged(
                f"loss became {batch_loss.item()} at epoch {self.epoch + 1}; stopping. The last "
                f"good checkpoint is {self.run_dir / 'checkpoints' / 'last.pt'}; lower optim.lr or "
                "set train.grad_clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        # 3. backward pass: gradients of the loss w.r.t. every weight (DDP averages them over
        # ranks: the mean of B/N-row means is the gradient of the B-row mean loss)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()  # 4. update the weights
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return batch_loss, logits

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    # -- checkpoints ---------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        d = self.data
        return {
            "format": "convserve.checkpoint/1",
            "recipe": recipe_to_dict(self.recipe),
            "epoch": self.epoch,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "model": self.model.state_dict(),
            "eval_model": self.eval_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "classes": list(d.classes),
            "in_shape": list(d.in_shape),
            "mean": list(d.mean),
            "std": list(d.std),
        }

    def restore(self, state: dict[str, Any]) -> None:
        check_same_recipe(state["recipe"], recipe_to_dict(self.recipe))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.best_val = float(state["best_val"])
        self.best_epoch = int(state["best_epoch"])
        self.history = list(state["history"])

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    # -- the run -------------------------------------------------------------------
    def fit(self, resume: bool = False) -> RunResult:
        tc = self.recipe.train
        main = self.world.is_main
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A rank restarted on a new node may not know the group is resuming: ask everyone.
        if self.world.any(resume, self.device):
            self.restore(load_checkpoint(self.ckpt_dir / "last.pt", self.device))
            log.info("resumed from %s at epoch %d", self.ckpt_dir / "last.pt", self.epoch)
        if main:
            self._write_static_files()
            self._rewrite_metrics_log()
        stopped = "completed"
        while self.epoch < tc.epochs:
            rec = self._run_epoch()
            if rec["val_accuracy"] is not None and rec["val_accuracy"] > self.best_val:
                self.best_val, self.best_epoch = rec["val_accuracy"], self.epoch
                if main:
                    save_checkpoint(self.state(), self.ckpt_dir / "best.pt")
            if main:
                save_checkpoint(self.state(), self.ckpt_dir / "last.pt")
            patience = tc.early_stopping_patience
            if patience and self.epoch - self.best_epoch >= patience and self.epoch < tc.epochs:
                stopped = f"early stop: no validation gain for {patience} epochs"
                log.info(stopped)
                break
        return self._finish(stopped)

    def _run_epoch(self) -> dict[str, Any]:
        tc = self.recipe.train
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{tc.epochs}",
            disable=self.quiet,
            leave=False,
            dynamic_ncols=True,
        )
        with bar:
            stats = train_one_epoch(
                self.model,
                self.step,
                self.data,
                self.augment,
                seed=tc.seed,
                epoch=self.epoch,
                batch_size=tc.batch_size,
                channels_last=self.channels_last,
                bar=None if self.quiet else bar,
                world=self.world,
            )
        self.epoch += 1
        if not self.sync_bn:
            ema = [self.ema.module] if self.ema is not None else []
            self.world.average_batchnorm_stats([self.model, *ema])
        val = None
        if len(self.data.val_x):
            val = evaluate(
                self.eval_model,
                self.data.val_x,
                self.data.val_y,
                tc.eval_batch_size,
                self.channels_last,
                tc.bf16_autocast,
                self.world,
            )
        rec = {
            "epoch": self.epoch,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "val_loss": val.loss if val else None,
            "val_accuracy": val.accuracy if val else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": stats.images_per_s,
            "epoch_seconds": stats.seconds,
            "time": time.time(),
        }
        self.history.append(rec)
        if self.world.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        val_text = f" val_loss {val.loss:.4f} val_acc {val.accuracy:.4f}" if val else ""
        log.info(
            "epoch %d/%d train_loss %.4f train_acc %.4f%s %.0f img/s (%.1fs)",
            self.epoch,
            tc.epochs,
            stats.loss,
            stats.accuracy,
            val_text,
            stats.images_per_s,
            stats.seconds,
        )
        return rec

    def _write_static_files(self) -> None:
        import yaml

        (self.run_dir / "recipe.yaml").write_text(
            yaml.safe_dump(recipe_to_dict(self.recipe), sort_keys=False)
        )
        (self.run_dir / "summary.txt").write_text(self.model.summary() + "\n")

    def _rewrite_metrics_log(self) -> None:
        # On resume the log holds exactly the epochs the checkpoint has seen.
        with open(self.run_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)

    def _finish(self, stopped: str) -> RunResult:
        tc = self.recipe.train
        best = self.ckpt_dir / "best.pt"
        self.world.barrier()  # rank 0 has written best.pt before anyone reads it
        if best.exists() and len(self.data.val_x):
            # Model selection used validation only; the test set is read once, here.
            self.eval_model.load_state_dict(load_checkpoint(best, self.device)["eval_model"])
        test = evaluate(
            self.eval_model,
            self.data.test_x,
            self.data.test_y,
            tc.eval_batch_size,
            self.channels_last,
            tc.bf16_autocast,
            self.world,
        )
        y = self.data.test_y.cpu().numpy()
        per_class = {
            c: float((test.predictions[y == i] == i).mean()) if (y == i).any() else float("nan")
            for i, c in enumerate(self.data.classes)
        }
        seconds = sum(r["epoch_seconds"] for r in self.history)
        images = sum(r["images_per_s"] * r["epoch_seconds"] for r in self.history)
        result = RunResult(
            run_dir=self.run_dir,
            test_accuracy=test.accuracy,
            test_loss=test.loss,
            per_class_accuracy=per_class,
            best_val_accuracy=self.best_val if self.best_val >= 0 else None,
            best_epoch=self.best_epoch,
            epochs_run=self.epoch,
            stopped=stopped,
            train_seconds=seconds,
            images_per_s=images / seconds if seconds else 0.0,
            history=self.history,
        )
        if not self.world.is_main:
            return result
        out = asdict(result)
        out["run_dir"] = str(self.run_dir)
        out["classes"] = list(self.data.classes)
        (self.run_dir / "results.json").write_text(json.dumps(out, indent=2) + "\n")
        np.savez_compressed(
            self.run_dir / "test_predictions.npz",
            labels=y,
            predictions=test.predictions,
            probabilities=test.probabilities.astype(np.float32),
        )
        log.info(
            "test accuracy %.4f (best val %.4f at epoch %d) — %s",
            test.accuracy,
            self.best_val,
            self.best_epoch,
            self.run_dir / "results.json",
        )
        return result


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


def fit(
    recipe: Recipe,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    quiet: bool = False,
    world: World | None = None,
) -> RunResult:
    """Train `recipe` into `run_dir` (resuming from its last checkpoint if asked).

    Under torchrun this process joins the group for the run and leaves it cleanly before
    returning; every rank returns the result, rank 0 alone has written it.
    """
    world = World.from_env() if world is None else world
    with process_group(world, world.device(select_device(recipe.train.device))):
        return Trainer(recipe, run_dir, quiet=quiet, world=world).fit(resume=resume)
