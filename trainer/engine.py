"""The training loop, written out: forward, loss, backward, update; and evaluation.

Data lives on the training device as uint8 tensors and is batched by index. Every random
draw is keyed by (seed, epoch, step), so an epoch computes the same thing whether the run
was resumed or not (trainer.run owns the run: checkpoints, logs, results).

The same loop runs on one process or on N under torchrun (trainer.distributed): the recipe's
batch size is the global batch, each rank trains on its rows of it and DistributedDataParallel
averages the gradients.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from serving.cores import usable_cores
from trainer import data as datalib
from trainer.augment import BatchAugment, KeyedDropout, set_dropout_step, step_generator
from trainer.distributed import ONE_PROCESS, World
from trainer.optim import EMA, Lookahead
from trainer.recipe import Recipe, TrainConfig, load_recipe_data
from trainer.tta import WithTTA


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- set-up
def select_device(name: str) -> torch.device:
    """The recipe's train.device; "auto" is CUDA when there is one."""
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
    """Load the recipe's dataset, split off its seeded validation set and put it on `device`."""
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


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ----------------------------------------------------------------------------- the step
def make_criterion(cfg: TrainConfig, num_classes: int) -> Callable[..., torch.Tensor]:
    """The recipe's loss: cross-entropy, or MSE between softmax and one-hot targets (both
    with optional label smoothing)."""
    if cfg.loss == "cross_entropy":
        return lambda logits, y: F.cross_entropy(
            logits.float(), y, label_smoothing=cfg.label_smoothing
        )

    def mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, num_classes).float()
        target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
        return F.mse_loss(torch.softmax(logits.float(), dim=1), target)

    return mse


@dataclass
class TrainStep:
    """One optimisation step on this rank's rows of a global batch."""

    model: nn.Module  # the weights: clipped, and averaged into the EMA
    forward: Callable[[torch.Tensor], torch.Tensor]  # `model`, or its DDP / compiled wrapper
    criterion: Callable[..., torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None = None
    lookahead: Lookahead | None = None
    grad_clip: float | None = None
    autocast: bool = False  # bf16, CUDA only
    world: World = ONE_PROCESS

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the global batch's loss and this rank's logits. TrainingDiverged (before
        any weight changes) when the loss is NaN or infinite."""
        with _autocast(x.device, self.autocast):
            logits = self.forward(x)  # 1. forward pass
            loss = self.criterion(logits, y)  # 2. loss (mean over this rank's rows)
        # The global batch's loss: every rank sees the same value and stops together.
        batch_loss = self.world.mean(loss.detach())
        if not torch.isfinite(batch_loss):
            raise TrainingDiverged(f"loss became {batch_loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        # 3. backward pass: gradients of the loss w.r.t. every weight (DDP averages them over
        # ranks: the mean of B/N-row means is the gradient of the B-row mean loss)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()  # 4. update the weights
        self.scheduler.step()
        if self.lookahead is not None:
            self.lookahead.after_step(self.model, self.scheduler.last_epoch)
        if self.ema is not None:
            self.ema.update(self.model)
        return batch_loss, logits


# ----------------------------------------------------------------------------- the loop
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
            g = step_generator(seed, epoch, step)
            x = augment(x, g, total=batch_size, offset=mine.start, ids=idx, epoch=epoch)
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


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    channels_last: bool = False,
    autocast: bool = False,
    world: World = ONE_PROCESS,
    tta: str = "none",
) -> EvalResult:
    """Loss, accuracy, predictions and probabilities of `model` on a labelled uint8 set,
    through the test-time views `tta` (trainer.tta; "none": the plain forward pass).

    On several processes each rank evaluates its shard of the rows; loss sums are added and
    probabilities gathered, so every rank returns the result for the whole set.
    """
    n = len(images)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), np.zeros(0, np.int64), np.zeros((0, 0)))
    was_training = model.training
    model.eval()
    forward = WithTTA(model, tta) if tta != "none" else model
    mine = world.shard(n)
    xs, ys = images[mine], labels[mine]
    probs, losses = [], []
    for i in range(0, max(1, len(xs)), batch_size):  # a rank with no rows still answers
        x = _layout(xs[i : i + batch_size], channels_last)
        with _autocast(images.device, autocast):
            logits = forward(x).float()
        losses.append(F.cross_entropy(logits, ys[i : i + batch_size], reduction="sum"))
        probs.append(torch.softmax(logits, dim=1))
    model.train(was_training)
    p = world.gather_rows(torch.cat(probs), n).cpu().numpy()
    loss_sum = world.sum(torch.stack(losses).sum())
    pred = p.argmax(1)
    y = labels.cpu().numpy()
    return EvalResult(float(loss_sum) / n, float((pred == y).mean()), pred, p)
