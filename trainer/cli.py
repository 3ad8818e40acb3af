"""Command-line entry points: `cnn-train`, `cnn-export` and `cnn-report`.

Each command imports what its path needs when it runs: `cnn-report --model` audits an
exported model with ONNX Runtime alone and must not import torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.data import DataError
from trainer.recipe import Recipe, RecipeError, list_recipes, load_recipe
from trainer.report import ReportError

if TYPE_CHECKING:
    from trainer.distributed import World

# Errors a user can act on: printed as one clear message, never a stack trace (with
# trainer.checkpoint.CheckpointError, imported with torch by the commands that train).
USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, DataError)


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
        allow_abbrev=False,  # argv goes on to torchrun's parser, which has flags of its own
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
    p.add_argument(
        "--no-report", action="store_true", help="do not write OUT/report.html at the end"
    )
    p.add_argument("--repository", help="model repository to export into (export.repository)")
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume when OUT/checkpoints/last.pt exists, else start (for jobs a scheduler "
        "may restart; a torchrun restart after a lost worker always resumes)",
    )
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE")
    g = p.add_argument_group(
        "several processes (passed to torch.distributed.run; ignored inside torchrun)"
    )
    g.add_argument("--nproc", type=int, metavar="N", help="training processes on this machine")
    g.add_argument("--nnodes", default="1", help="machines, or MIN:MAX for an elastic range")
    g.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="R",
        help="restart the group up to R times when a worker fails; it resumes from last.pt",
    )
    g.add_argument("--rdzv-backend", help="rendezvous backend, e.g. c10d (several machines)")
    g.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous (several machines)")
    g.add_argument("--rdzv-id", help="a job id shared by all machines of one run")
    g.add_argument("--rdzv-conf", help="extra rendezvous settings, e.g. is_host=true")
    g.add_argument(
        "--local-addr",
        help="this machine's address as the other machines reach it (default: its host name)",
    )
    return p


TRAIN_MODULE = "trainer.cli"  # what torchrun starts on every rank: this command again
LAUNCH_FLAGS = (  # the launcher's options above, each with a value
    "--nproc",
    "--nnodes",
    "--max-restarts",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv-id",
    "--rdzv-conf",
    "--local-addr",
)


def _launch(args: argparse.Namespace, recipe: Recipe, argv: Sequence[str]) -> int:
    """Start this command on --nproc processes (per machine) under torchrun."""
    from trainer.distributed import LaunchOptions, World, launch

    opts = LaunchOptions(
        args.nproc,
        args.nnodes,
        args.max_restarts,
        args.rdzv_backend,
        args.rdzv_endpoint,
        args.rdzv_id,
        args.rdzv_conf,
        args.local_addr,
    )
    if opts.fixed_world_size:  # refuse an indivisible batch here, once, not on every rank
        World(size=opts.fixed_world_size).batch_rows(recipe.train.batch_size)
    return launch(opts, TRAIN_MODULE, _without_launch_options(argv))


def _without_launch_options(argv: Sequence[str]) -> list[str]:
    """The ranks' argv: this command's, less the options only the launcher uses."""
    out: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg.split("=", 1)[0] in LAUNCH_FLAGS:
            skip_value = "=" not in arg
        else:
            out.append(arg)
    return out


def train_main(argv: Sequence[str] | None = None) -> int:
    """`cnn-train`: its exit code. A torchrun rank does not return: it ends the process with
    that code (`trainer.distributed.end_rank` says why)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _train_parser().parse_args(argv)
    from trainer.distributed import World, end_rank

    world = World.from_env()
    code = _train(args, argv, world)
    if world.launched:  # a torchrun rank ends without finalizing: see end_rank
        end_rank(code)
    return code


def _train(args: argparse.Namespace, argv: list[str], world: World) -> int:
    from trainer.checkpoint import CheckpointError, ResumeError

    setup_logging(args.quiet or not world.is_main)  # the other ranks stay quiet
    from trainer.engine import TrainingDiverged
    from trainer.run import fit

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.repository:
        overrides.append(f"export.repository={args.repository}")
    try:
        recipe = load_recipe(args.recipe, overrides)
        if args.nproc and not world.launched:
            return _launch(args, recipe, argv)
        resume = args.resume or _resume_after_restart(args, world)
        result = fit(recipe, args.out, resume=resume, quiet=args.quiet, world=world)
    except (*USER_ERRORS, CheckpointError, ResumeError, TrainingDiverged) as exc:
        print(f"cnn-train: error: {exc}", file=sys.stderr)
        return 2
    if not world.is_main:
        return 0
    views = (
        f" with {result.tta} test-time views ({result.test_accuracy_no_tta:.4f} without)"
        if result.tta != "none"
        else ""
    )
    print(
        f"test accuracy {result.test_accuracy:.4f}{views} after {result.epochs_run} epochs "
        f"({result.train_seconds:.0f}s, {result.images_per_s:.0f} img/s); "
        f"results in {result.run_dir / 'results.json'}"
    )
    if not args.no_report:
        _write_report(result.run_dir, args.data_dir)
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


def _write_report(run_dir: Path, data_dir: str | None) -> None:
    """The run's HTML report; a failure is reported and does not fail the trained run."""
    from trainer.report.run import run_report

    try:
        print(f"report {run_report(run_dir, data_dir=data_dir)}")
    except ReportError as exc:
        print(f"cnn-train: warning: no report: {_one_line(exc)}", file=sys.stderr)


def _resume_after_restart(args: argparse.Namespace, world: World) -> bool:
    """After torchrun restarted the group (or with --auto-resume), continue from last.pt."""
    last = Path(args.out) / "checkpoints" / "last.pt"
    if not (world.restart or args.auto_resume) or not last.exists():
        return False
    if world.restart:
        logging.getLogger("convserve.train").info(
            "restart %d of the process group: resuming from the last checkpoint", world.restart
        )
    return True


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
    p.add_argument(
        "--tta",
        choices=["none", "mirror", "mirror_shift"],
        help="test-time views in the graph: 2x (mirror) or 6x (mirror_shift) the compute per "
        "image (default: the recipe's export.tta)",
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
            tta=args.tta,
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


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-report",
        description="Write a self-contained HTML report of what a CNN learned: from a training "
        "run (RUN_DIR), or from an exported model and labelled data (--model, --data; no torch).",
    )
    p.add_argument("run_dir", nargs="?", help="training run directory (cnn-train --out)")
    p.add_argument("--out", type=Path, help="HTML file (default RUN_DIR/report.html, audit.html)")
    p.add_argument("--model", type=Path, help="model version folder: models/NAME/VERSION")
    p.add_argument(
        "--data",
        type=Path,
        help="labelled images for --model: class folders (label or index names) of image "
        "files, or a folder of IDX files (t10k-images-idx3-ubyte[.gz] + labels)",
    )
    p.add_argument("--data-dir", help="dataset files for RUN_DIR's recipe (data.data_dir)")
    return p


def report_main(argv: Sequence[str] | None = None) -> int:
    """`cnn-report RUN_DIR` (imports torch) or `cnn-report --model V --data PATH` (no torch)."""
    p = _report_parser()
    args = p.parse_args(argv)
    if (args.run_dir is None) == (args.model is None):
        p.error("give either RUN_DIR or --model (with --data)")
    try:
        if args.model is not None:
            if args.data is None:
                p.error("--model needs --data")
            from trainer.report.audit import audit_report

            out = audit_report(args.model, args.data, args.out or Path("audit.html"))
        else:
            from trainer.report.run import run_report

            out = run_report(args.run_dir, args.out, args.data_dir)
    except ReportError as exc:
        print(f"cnn-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report {out}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
