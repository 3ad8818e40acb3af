"""Benchmark: the default Fashion-MNIST recipe over several seeds, as `cnn-train` runs it.

For each seed, times what `cnn-train --no-export --no-report` does (data, training,
validation, the test evaluation of the selected checkpoint) and reports test accuracy and
wall time; then, outside the timed part, scores every epoch's weights on the test set so
checkpoint-selection rules can be compared on the same runs (`selection` in the JSON: the
test accuracy each rule would have kept, per seed). With TTA in the recipe, the test figure
is given with and without it.

    python bench/train_fashion.py --out bench/results/train_fashion.json [--seeds 0 1 2]
    python bench/train_fashion.py --out /tmp/proxy.json --seeds 0 1 train.epochs=3  # screen

`--minimal-loop` also trains the same network with a minimal hand-written PyTorch loop for
the same steps on the same tensors, so the trainer's overhead shows as a ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.engine import configure_threads, evaluate
from trainer.models import build_model
from trainer.recipe import Recipe, load_recipe
from trainer.run import Trainer
from trainer.selection import SELECTION_RULES, select_epoch
from trainer.tta import TTA_VIEWS


def minimal_loop(trainer: Trainer, steps: int) -> dict[str, float]:
    """The same network and data, trained the plainest way PyTorch allows."""
    recipe, data = trainer.recipe, trainer.data
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, data.in_shape, len(data.classes), data.mean, data.std)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    b = recipe.train.batch_size
    n = len(data.train_x)
    model.train()
    done = 0
    t0 = time.perf_counter()
    while done < steps:
        perm = torch.randperm(n)
        for i in range(n // b):
            if done == steps:
                break
            idx = perm[i * b : (i + 1) * b]
            x = data.train_x[idx]
            if recipe.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": seconds, "images_per_s": steps * b / seconds}


def one_seed(recipe: Recipe, seed: int, minimal: bool, keep: Path | None) -> dict[str, Any]:
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": seed})})
    snapshots: list[dict[str, torch.Tensor]] = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = keep / f"seed{seed}" if keep else Path(tmp)
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        trainer = Trainer(recipe, run_dir, quiet=True)
        run_epoch = trainer._run_epoch

        def run_and_keep() -> dict[str, Any]:  # a state-dict copy: ~1 ms, not a checkpoint
            rec = run_epoch()
            snapshots.append(copy.deepcopy(trainer.eval_model.state_dict()))
            return rec

        trainer._run_epoch = run_and_keep  # type: ignore[method-assign]
        result = trainer.fit()
        wall = time.perf_counter() - t0
        # Untimed: every epoch's weights on the test set; the epochs some selection rule
        # keeps, through every test-time view too.
        d, tc = trainer.data, recipe.train
        model = trainer.eval_model
        picked = {select_epoch(result.history, rule) for rule in SELECTION_RULES}
        per_epoch = []
        for state, rec in zip(snapshots, result.history, strict=True):
            model.load_state_dict(state)
            row = {k: rec[k] for k in ("epoch", "val_loss", "val_accuracy", "epoch_seconds")}
            for tta in TTA_VIEWS if rec["epoch"] in picked else ("none",):
                ev = evaluate(model, d.test_x, d.test_y, tc.eval_batch_size, tta=tta)
                row[f"test_{tta}"] = ev.accuracy
            per_epoch.append(row)
        out = {
            "seed": seed,
            "test_accuracy": result.test_accuracy,
            "test_accuracy_no_tta": result.test_accuracy_no_tta,
            "selected_epoch": result.best_epoch,
            "wall_seconds": wall,
            "train_seconds": result.train_seconds,
            "images_per_s": result.images_per_s,
            "epochs": result.epochs_run,
            "per_epoch": per_epoch,
        }
        if minimal:
            steps = trainer.steps_per_epoch * result.epochs_run
            out["minimal_loop"] = minimal_loop(trainer, steps)
            out["trainer_vs_minimal_images_per_s"] = (
                result.images_per_s / out["minimal_loop"]["images_per_s"]
            )
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def selection(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The test accuracy each checkpoint-selection rule keeps, per seed and over seeds."""
    out = {}
    for rule in SELECTION_RULES:
        picked = [select_epoch(r["per_epoch"], rule) for r in runs]
        rows = [r["per_epoch"][e - 1] for r, e in zip(runs, picked, strict=True)]
        out[rule] = {"epochs": picked}
        for tta in TTA_VIEWS:
            out[rule][tta] = {"test_accuracy": [row[f"test_{tta}"] for row in rows]}
            out[rule][tta].update(spread(out[rule][tta]["test_accuracy"]))
    return out


def summary(recipe: Recipe, args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict:
    return {
        "recipe": recipe.name,
        "overrides": args.overrides,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": configure_threads(torch.device("cpu")),
            "torch": torch.__version__,
        },
        "seeds": [r["seed"] for r in runs],
        "test_accuracy": spread([r["test_accuracy"] for r in runs]),
        "test_accuracy_no_tta": spread([r["test_accuracy_no_tta"] for r in runs]),
        "wall_seconds": spread([r["wall_seconds"] for r in runs]),
        "epoch_seconds": spread([e["epoch_seconds"] for r in runs for e in r["per_epoch"]]),
        "selection": selection(runs),
        "runs": runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/train_fashion.json")
    p.add_argument("--recipe", default="fashion_mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--minimal-loop", action="store_true", help="also time a minimal loop")
    p.add_argument("--keep-runs", type=Path, help="keep each seed's run in DIR/seedN")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.epochs=3")
    args = p.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        runs.append(one_seed(recipe, seed, args.minimal_loop, args.keep_runs))
        r = runs[-1]
        print(
            f"seed {seed}: test {r['test_accuracy']:.4f} (no TTA {r['test_accuracy_no_tta']:.4f})"
            f" epoch {r['selected_epoch']}, wall {r['wall_seconds']:.0f} s, "
            f"{r['images_per_s']:.0f} img/s",
            flush=True,
        )
        out = summary(recipe, args, runs)  # after every seed: a stopped bench keeps its seeds
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for k in ("test_accuracy", "test_accuracy_no_tta", "wall_seconds"):
        s = out[k]
        print(f"{k}: mean {s['mean']:.4f} min {s['min']:.4f} max {s['max']:.4f}")
    for rule, sel in out["selection"].items():
        views = ", ".join(f"{t} {sel[t]['mean']:.4f} (min {sel[t]['min']:.4f})" for t in TTA_VIEWS)
        print(f"select {rule}: epochs {sel['epochs']}: {views}")


if __name__ == "__main__":
    main()
