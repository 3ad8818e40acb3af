"""Command-line entry points: `cnn-train` and `cnn-export`."""

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
    # The ONNX exporter's graph passes log every step at INFO, and torch warns that torchvision
    # (whose detection ops we never export) is missing: neither tells a user anything.
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


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
    if args.no_export or not recipe.export.enabled:
        return 0
    from trainer.export import ExportError, export_checkpoint

    ex = recipe.export
    try:
        exported = export_checkpoint(
            result.run_dir,
            ex.repository,
            ex.name or recipe.name,
            opset=ex.opset,
            optimize=ex.optimize,
            int8=ex.int8,
            fp16=ex.fp16,
            max_accuracy_drop=ex.max_accuracy_drop,
        )
    except ExportError as exc:
        print(f"cnn-train: error: export failed: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(f"exported {exported.version_dir}")
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-export",
        description="Export a training checkpoint to ONNX as a new model version: "
        "REPOSITORY/NAME/VERSION/model.onnx + manifest.json (+ optional variants).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory")
    p.add_argument("--repository", required=True, help="model repository folder")
    p.add_argument("--name", help="model name (default: the recipe's export.name, else its name)")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--quantize", choices=["int8"], help="also write a static INT8 variant")
    p.add_argument("--fp16", action="store_true", help="also write a float16 variant")
    p.add_argument(
        "--no-optimize", action="store_true", help="skip the ORT-optimised variant model.opt.onnx"
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, at least 18 (default 18)")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.5,
        metavar="P",
        help="reject variants more than P test-accuracy points below fp32 (default 0.5)",
    )
    p.add_argument("--data-dir", help="folder holding the dataset's files (for the parity check)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    return p


def export_main(argv: Sequence[str] | None = None) -> int:
    args = _export_parser().parse_args(argv)
    setup_logging(args.quiet)
    from trainer.export import ExportError, export_checkpoint

    try:
        result = export_checkpoint(
            args.checkpoint,
            args.repository,
            args.name,
            version=args.version,
            opset=args.opset,
            optimize=not args.no_optimize,
            int8=args.quantize == "int8",
            fp16=args.fp16,
            max_accuracy_drop=args.max_accuracy_drop,
            data_dir=args.data_dir,
        )
    except ExportError as exc:
        print(f"cnn-export: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    m = result.manifest
    print(
        f"exported {result.version_dir} (test accuracy {m['test_accuracy']:.4f}, "
        f"variants: {', '.join(m['variants']) or 'none'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
