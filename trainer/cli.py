"""Command-line entry points: `cnn-train` (and, later, `cnn-export`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from trainer.checkpoint import CheckpointError
from trainer.data import DataError
from trainer.recipe import RecipeError, list_recipes, load_recipe

# Errors a user can act on: printed as one clear message, never a stack trace.
USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, DataError, CheckpointError)


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-train",
        description="Train a CNN from a recipe, then export it into a model repository.",
        epilog="Overrides: any recipe field as FIELD=VALUE, e.g. train.epochs=3 optim.lr=0.05. "
        f"Bundled recipes: {', '.join(list_recipes())}.",
    )
    p.add_argument("--recipe", required=True, help="recipe YAML path or bundled recipe name")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, results)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--data-dir", help="folder holding the dataset's files (data.data_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--no-export", action="store_true", help="do not export to ONNX at the end")
    p.add_argument("--repository", help="model repository to export into (export.repository)")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    setup_logging(args.quiet)
    from trainer.engine import ResumeError, TrainingDiverged, fit

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.repository:
        overrides.append(f"export.repository={args.repository}")
    try:
        recipe = load_recipe(args.recipe, overrides)
        result = fit(recipe, args.out, resume=args.resume, quiet=args.quiet)
    except (*USER_ERRORS, ResumeError, TrainingDiverged) as exc:
        print(f"cnn-train: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"test accuracy {result.test_accuracy:.4f} after {result.epochs_run} epochs "
        f"({result.train_seconds:.0f}s, {result.images_per_s:.0f} img/s); "
        f"results in {result.run_dir / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
