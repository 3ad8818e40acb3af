"""Benchmark: what each training trick costs per step, side by side.

Builds the default Fashion-MNIST recipe's trainer with SGD for its conv filters ("plain"),
and with each trick switched on alone (recipe overrides; "muon" is the default recipe
itself, the whitened network its own recipe), then times the real training step
(augmentation, forward, loss, backward, update, lookahead) on the same batches, the tricks
interleaved over `--rounds` rounds (the order turning each round, a short untimed warm-up
before each trick's steps) so background load hits them alike. Reports
the median seconds per step, its ratio to plain, and seconds per epoch at that rate.

    python bench/trick_cost.py --out bench/results/trick_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer.augment import step_generator
from trainer.recipe import load_recipe
from trainer.run import Trainer

# Each trick alone on "plain": the default recipe with plain SGD for the conv filters (the
# update the tricks were screened against); "muon" is the default recipe itself.
SGD = ["optim.conv_update=sgd"]
TRICKS = {
    "plain": SGD,
    "whiten_dirac_gelu": ["@air"],
    "muon": [],
    "lookahead": [*SGD, "train.lookahead=true"],
    "alternate_flip": [*SGD, "augment.flip=alternate"],
    "translate_1px": [*SGD, "augment.crop_padding=1"],
    "bn_frozen_scale": [*SGD, "model.bn_scale=frozen", "model.bn_momentum=0.4"],
}
WARMUP = 2  # untimed steps of each trick before its timed ones, every round


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/trick_cost.json"))
    p.add_argument("--recipe", default="fashion_mnist")
    p.add_argument(
        "--air-recipe",
        default=str(Path(__file__).parent / "recipes" / "fashion_mnist_whitened.yaml"),
        help="the whitened network",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ov in TRICKS.items():
            recipe = (
                load_recipe(args.air_recipe) if ov == ["@air"] else load_recipe(args.recipe, ov)
            )
            trainers[name] = Trainer(recipe, Path(tmp) / name, quiet=True)
        times: dict[str, list[float]] = {n: [] for n in trainers}
        names = list(trainers)
        for r in range(args.rounds):
            # The order turns each round, and each trick takes WARMUP untimed steps before
            # its timed ones: with a fixed order and no warm-up, the first trick of every
            # round ("plain") paid for the switch from the last one's tensors and came out
            # 4-20% slower than tricks that do more work (session 11).
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = trainers[name]
                b = t.recipe.train.batch_size
                perm = torch.randperm(len(t.data.train_x), generator=step_generator(0, r, -1))
                t.model.train()
                for s in range(WARMUP + args.steps):
                    if s == WARMUP:
                        t0 = time.perf_counter()
                    idx = perm[s * b : (s + 1) * b]
                    x = t.augment(t.data.train_x[idx], step_generator(0, r, s), ids=idx, epoch=r)
                    t.step(x.contiguous(memory_format=torch.channels_last), t.data.train_y[idx])
                times[name].append((time.perf_counter() - t0) / args.steps)
        steps_per_epoch = next(iter(trainers.values())).steps_per_epoch
    base = statistics.median(times["plain"])
    out = {
        name: {
            "seconds_per_step": statistics.median(v),
            "rounds": v,
            "vs_plain": statistics.median(v) / base,
            "seconds_per_epoch": statistics.median(v) * steps_per_epoch,
        }
        for name, v in times.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, r in out.items():
        print(f"{name:>18}: {r['seconds_per_epoch']:.1f} s/epoch ({r['vs_plain']:.3f}x plain)")


if __name__ == "__main__":
    main()
