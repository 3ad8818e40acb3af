"""Benchmark: the default Fashion-MNIST recipe through our trainer, next to a minimal loop.

Trains `trainer/recipes/fashion_mnist.yaml` with `trainer.run` (augmentation, EMA,
checks, checkpoints, evaluation) and reports test accuracy, wall time and training
images/s; then trains the same network with a minimal hand-written PyTorch loop (index a
batch, forward, loss, backward, step) for the same number of steps on the same tensors, so
the framework's overhead shows as a ratio measured side by side in one run.

    python bench/train_fashion.py --out bench/results/train_fashion.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.engine import configure_threads
from trainer.models import build_model
from trainer.recipe import load_recipe
from trainer.run import Trainer


def minimal_loop(trainer: Trainer, steps: int) -> dict[str, float]:
    """The same network and data, trained the plainest way PyTorch allows."""
    recipe, data = trainer.recipe, trainer.data
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, data.in_shape, len(data.classes), data.mean, data.std)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe.optim.lr * 0.5,
        momentum=0.9,
        nesterov=True,
        weight_decay=recipe.optim.weight_decay,
    )
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/train_fashion.json")
    p.add_argument("--recipe", default="fashion_mnist")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(recipe, run_dir, quiet=True)
        result = trainer.fit()
        wall = time.perf_counter() - t0
        steps = trainer.steps_per_epoch * result.epochs_run
        threads = configure_threads(trainer.device)
        minimal = minimal_loop(trainer, steps)
    out = {
        "recipe": recipe.name,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": threads,
            "torch": torch.__version__,
            "device": str(trainer.device),
        },
        "trainer": {
            "test_accuracy": result.test_accuracy,
            "best_val_accuracy": result.best_val_accuracy,
            "epochs": result.epochs_run,
            "steps": steps,
            "wall_seconds": wall,
            "train_seconds": result.train_seconds,
            "images_per_s": result.images_per_s,
            "per_class_accuracy": result.per_class_accuracy,
        },
        "minimal_loop": minimal,
        "trainer_vs_minimal_images_per_s": result.images_per_s / minimal["images_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("trainer", "minimal_loop")}, indent=2))
    print(f"trainer/minimal images/s: {out['trainer_vs_minimal_images_per_s']:.3f}")


if __name__ == "__main__":
    main()
