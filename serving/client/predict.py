"""`cnn-predict`: classify image files with a server, print a table or JSON lines, and the
accuracy where folders name the class; optionally write occlusion overlays."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from serving.client.access import ClientAccess
from serving.client.clients import Client
from serving.client.convert import Prediction
from serving.client.retry import PredictionError
from serving.options import nested, option, parse, validate

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


@dataclass(frozen=True)
class PredictSettings:
    """cnn-predict's settings (its output choices are plain flags: see `_output_flags`)."""

    server: str = option("localhost:50051", "HOST:PORT of cnn-serve")
    top_k: int = option(1, "classes shown per image")
    batch_size: int = option(64, "images per request", minimum=1)
    timeout: float = option(30.0, "seconds per request")
    model: str = option("", "model name (when the server serves several)")
    access: ClientAccess = nested(ClientAccess)

    def __post_init__(self) -> None:
        validate(self)


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--explain",
        metavar="DIR",
        type=Path,
        help="also write an occlusion overlay PNG per image into DIR (1 + P passes each)",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories")


def find_images(paths: Iterable[str]) -> list[Path]:
    """Files as given, and image files under directories (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def _truth(path: Path, labels: Sequence[str]) -> int | None:
    """A folder named after a class (its index, or its label with '/' as '-') is the truth."""
    name = path.parent.name
    for i, label in enumerate(labels):
        if name == str(i) or name == label.replace("/", "-"):
            return i
    return None


def predict_main(argv: Sequence[str] | None = None) -> int:
    """cnn-predict, in its caller's trace: TRACEPARENT (and OTEL_TRACES_EXPORTER for a span
    of its own), as serving.client.tracecontext.command_trace reads them."""
    from serving.client.tracecontext import command_trace
    from serving.tracing import TracingError

    try:
        with command_trace("cnn-predict"):
            return _predict(argv)
    except TracingError as exc:
        print(f"cnn-predict: {exc}", file=sys.stderr)
        return 2


def _predict(argv: Sequence[str] | None) -> int:
    s, args = parse(
        PredictSettings,
        argv,
        prog="cnn-predict",
        description="Classify images with a server.",
        env=False,
        extra=_output_flags,
    )
    try:
        files = find_images(args.paths)
    except FileNotFoundError as exc:
        print(f"cnn-predict: {exc}", file=sys.stderr)
        return 2
    if not files:
        print("cnn-predict: no images found", file=sys.stderr)
        return 2
    correct = known = 0
    show = not args.no_progress and len(files) > s.batch_size and sys.stderr.isatty()
    bar = tqdm(total=len(files), unit="img", disable=not show, file=sys.stderr)
    tls, token = s.access.tls, s.access.token
    with Client(s.server, timeout=s.timeout, tls=tls, auth_token=token) as client, bar:
        try:
            labels = client.model_info(s.model)["labels"]
            for start in range(0, len(files), s.batch_size):
                chunk = files[start : start + s.batch_size]
                preds = client.predict(chunk, s.top_k, model=s.model)
                for f, pred in zip(chunk, preds, strict=True):
                    _print(f, pred, args.json)
                    truth = _truth(f, labels)
                    if truth is not None:
                        known += 1
                        correct += pred.index == truth
                bar.update(len(chunk))
            if args.explain:
                _write_explanations(client, files, args.explain, s.model)
        except PredictionError as exc:
            print(f"cnn-predict: {exc}", file=sys.stderr)
            return 1
    if known:
        print(
            f"accuracy {correct / known:.4f} ({correct}/{known} images whose folder names "
            "their class)",
            file=sys.stderr,
        )
    return 0


def _write_explanations(client: Client, files: Sequence[Path], out: Path, model: str) -> None:
    """One `<stem>.explain.png` overlay per image (a numbered suffix when stems repeat)."""
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for f in files:
        name, n = f"{f.stem}.explain.png", 1
        while name in taken:
            n += 1
            name = f"{f.stem}-{n}.explain.png"
        taken.add(name)
        ex = client.explain(f, render_png=True, model=model)
        (out / name).write_bytes(ex.overlay_png)
    print(f"explanations: {len(files)} overlay PNGs in {out}", file=sys.stderr)


def _print(path: Path, pred: Prediction, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "file": str(path),
                    "model": pred.model,
                    "version": pred.version,
                    "classes": [
                        {"index": c.index, "label": c.label, "probability": round(c.probability, 6)}
                        for c in pred.classes
                    ],
                    "ood_score": round(pred.ood_score, 4),
                    "out_of_distribution": pred.out_of_distribution,
                }
            )
        )
    else:
        others = ", ".join(f"{c.label} {c.probability:.3f}" for c in pred.classes[1:])
        flag = "\tOUT OF DISTRIBUTION" if pred.out_of_distribution else ""
        print(
            f"{path}\t{pred.label}\t{pred.probability:.4f}"
            + (f"\t({others})" if others else "")
            + flag
        )
