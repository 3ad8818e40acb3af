"""One training run: the run directory, checkpoints, resume, the metrics log and results.

    RUN/recipe.yaml, summary.txt, metrics.jsonl (one line per epoch)
    RUN/checkpoints/last.pt (every epoch, atomic; --resume), best.pt (the epoch train.select keeps)
    RUN/results.json, test_predictions.npz   the test set, read once at the end

Every random draw of the loop (trainer.engine) is keyed by (seed, epoch, step) or saved in the
checkpoint, so `--resume` continues a run to the same weights an uninterrupted run reaches.
Under torchrun rank 0 alone writes logs and checkpoints; every rank returns the result.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from trainer.augment import BatchAugment, use_keyed_dropout
from trainer.checkpoint import (
    check_same_recipe,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.distributed import ONE_PROCESS, World, process_group
from trainer.engine import (
    TrainingDiverged,
    TrainStep,
    configure_threads,
    evaluate,
    make_criterion,
    prepare_data,
    select_device,
    train_one_epoch,
)
from trainer.models import Classifier, build_model
from trainer.optim import EMA, Lookahead, make_optimizer, make_scheduler
from trainer.recipe import Recipe, recipe_to_dict
from trainer.selection import select_epoch
from trainer.whitening import fit_whitening

log = logging.getLogger("convserve.train")


@dataclass
class RunResult:
    run_dir: Path
    test_accuracy: float  # through the export's test-time views (export.tta)
    test_accuracy_no_tta: float
    tta: str
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
        fit_whitening(self.model, d.train_x)  # a `whiten` first layer, from training images
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
        self.optimizer = make_optimizer(self.model, recipe.optim, self.steps_per_epoch)
        total_steps = self.steps_per_epoch * tc.epochs
        self.scheduler = make_scheduler(self.optimizer, recipe.schedule, total_steps)
        self.lookahead = Lookahead(self.model, total_steps) if tc.lookahead else None
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema_decay else None
        fill = tuple(round(m * 255) for m in d.mean)
        self.augment = BatchAugment(recipe.augment, fill, len(d.train_x), tc.seed)
        forward = world.data_parallel(self.model, self.device)
        if tc.compile:
            for d in self.dropouts:  # a fresh key every step: keep it out of the graph
                d.forward = torch.compiler.disable(d.forward)
            forward = torch.compile(forward)
        self.step = TrainStep(
            self.model,
            forward,
            make_criterion(tc, len(self.data.classes)),
            self.optimizer,
            self.scheduler,
            self.ema,
            self.lookahead,
            tc.grad_clip,
            tc.bf16_autocast,
            world,
        )
        self.epoch = 0  # epochs completed
        self.best_val = -1.0
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []

    def tta_options(self) -> list[str]:
        """The test-time views the test set is scored with: none, and the export's."""
        return list(dict.fromkeys(["none", self.recipe.export.tta]))

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
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
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
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
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
            if select_epoch(self.history, tc.select) == self.epoch:
                val_acc = rec["val_accuracy"]
                self.best_val = val_acc if val_acc is not None else -1.0
                self.best_epoch = self.epoch
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
            try:
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
            except TrainingDiverged as exc:
                raise TrainingDiverged(
                    f"{exc} at epoch {self.epoch + 1}; stopping. The last good checkpoint is "
                    f"{self.ckpt_dir / 'last.pt'}; lower optim.lr or set train.grad_clip"
                ) from None
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
        if best.exists() and self.best_epoch != self.epoch:
            # Model selection used validation only; the test set is read once, here.
            self.eval_model.load_state_dict(load_checkpoint(best, self.device)["eval_model"])
        tests = {
            tta: evaluate(
                self.eval_model,
                self.data.test_x,
                self.data.test_y,
                tc.eval_batch_size,
                self.channels_last,
                tc.bf16_autocast,
                self.world,
                tta,
            )
            for tta in self.tta_options()
        }
        test = tests[self.recipe.export.tta]
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
            test_accuracy_no_tta=tests["none"].accuracy,
            tta=self.recipe.export.tta,
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
