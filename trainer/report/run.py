"""What a trained CNN learned, computed from its run directory (`cnn-report RUN_DIR`, torch).

Filters, activation maps per conv stage, receptive fields (from the analytic plan, drawn on an
input), the test patches that drive the last stage's channels most (cropped to the unit's
receptive field: the dataset-driven form of Zeiler and Fergus' visualisation), plus the
evaluation parts shared with the ONNX-only audit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import data as datalib
from trainer.export import ExportError, load_model, resolve_checkpoint
from trainer.models import Classifier, LayerInfo
from trainer.recipe import Recipe, load_recipe_data
from trainer.report import ReportError, figures
from trainer.report.evaluation import Predict, evaluation_sections
from trainer.report.page import Section, table_html, write_report

ACTIVATION_IMAGES = 3
PATCH_SEARCH_IMAGES = 2000
PATCH_CHANNELS = 8
PATCHES_PER_CHANNEL = 8


def receptive_box(row: LayerInfo, y: int, x: int, height: int, width: int) -> tuple:
    """(x0, y0, x1, y1), x1/y1 exclusive: the input pixels unit (y, x) of `row` can see,
    clipped to the image. Pixel i spans [i, i + 1); the plan's `start` is unit 0's centre."""
    assert row.rf is not None, "only spatial layers have a receptive field"
    half = row.rf / 2

    def span(i: int, size: int) -> tuple[int, int]:
        centre = row.start + i * row.jump
        return max(0, math.floor(centre - half)), min(size, math.ceil(centre + half))

    (x0, x1), (y0, y1) = span(x, width), span(y, height)
    return x0, y0, x1, y1


@torch.inference_mode()
def stage_maps(model: Classifier, images: np.ndarray, batch: int = 500) -> list[np.ndarray]:
    """Every conv stage's activations (N, C, H, W) float32 for uint8 `images`."""
    parts: list[list[torch.Tensor]] = []
    for i in range(0, len(images), batch):
        _, maps = model.forward_with_stages(torch.from_numpy(images[i : i + batch]))
        parts.append(maps)
    return [torch.cat([p[s] for p in parts]).numpy() for s in range(len(parts[0]))]


def torch_predict(model: Classifier, batch: int = 500) -> Predict:
    @torch.inference_mode()
    def predict(x: np.ndarray) -> np.ndarray:
        out = [
            torch.softmax(model(torch.from_numpy(x[i : i + batch])), 1)
            for i in range(0, len(x), batch)
        ]
        return torch.cat(out).numpy()

    return predict


def top_patches(
    images: np.ndarray, maps: np.ndarray, row: LayerInfo, channels: int, per_channel: int
) -> tuple[list[int], list[list[np.ndarray]]]:
    """For the `channels` channels with the strongest peaks: the `per_channel` images whose
    best unit fires most, each cropped to that unit's receptive field (zeros outside)."""
    n, c, h, w = maps.shape
    flat = maps.reshape(n, c, h * w)
    best_pos = flat.argmax(2)  # (N, C): each image's strongest unit per channel
    best_val = flat.max(2)
    chosen = np.argsort(-best_val.max(0), kind="stable")[:channels]
    rf = row.rf or 1
    pad = rf
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = []
    for ch in chosen:
        crops = []
        for i in np.argsort(-best_val[:, ch], kind="stable")[:per_channel]:
            y, x = divmod(int(best_pos[i, ch]), w)
            x0 = math.floor(row.start + x * row.jump - rf / 2) + pad
            y0 = math.floor(row.start + y * row.jump - rf / 2) + pad
            crops.append(padded[i, :, y0 : y0 + rf, x0 : x0 + rf])
        out.append(crops)
    return [int(c) for c in chosen], out


def _first_conv(model: Classifier) -> nn.Conv2d:
    return next(m for m in model.features.modules() if isinstance(m, nn.Conv2d))


def _architecture(model: Classifier) -> Section:
    c, h, w = model.in_shape
    rows: list[list[object]] = [["input", "", f"{h}x{w}x{c}", 0, "1x1"]]
    for r in model.rows:
        name = "classifier" if r.index < 0 else str(r.index)
        rf = f"{r.rf}x{r.rf}" if r.rf is not None else "whole image"
        rows.append([name, r.kind, r.volume, f"{r.params:,}", rf])
    rows.append(["total", "", "", f"{sum(r.params for r in model.rows):,}", ""])
    return Section(
        "architecture",
        "Architecture",
        "Each layer's output volume (height x width x channels), learned parameters and "
        "receptive field (the side of the input square one unit can see), computed "
        "analytically from the network's spec. Receptive fields grow with depth; after "
        "flatten or global pooling every unit sees the whole image.",
        table=table_html(["layer", "kind", "output", "parameters", "receptive field"], rows),
    )


def _load(run_dir: Path, data_dir: str | None) -> tuple[dict, Recipe, Classifier, Any]:
    try:
        state, recipe, model = load_model(resolve_checkpoint(run_dir))
    except ExportError as exc:
        raise ReportError(str(exc)) from None
    d = recipe.data
    try:
        ds = load_recipe_data(recipe, data_dir)
    except datalib.DataError as exc:
        raise ReportError(f"cannot load the {d.name} test set: {exc}") from None
    return state, recipe, model, ds


def run_report(run_dir: str | Path, out: Path | None = None, data_dir: str | None = None) -> Path:
    """Build and write the full report of a training run (default RUN_DIR/report.html);
    returns the HTML path."""
    run_dir = Path(run_dir)
    out = out or run_dir / "report.html"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    state, recipe, model, ds = _load(run_dir, data_dir)
    classes = list(state["classes"])
    test = ds.test
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in model.rows if r.is_stage]
    names = [f"stage{r.index}_{r.kind}" for r in stages]
    sections = [_architecture(model)]
    if history:
        sections.append(
            Section(
                "curves",
                "Training curves",
                "Loss and accuracy after each epoch on the training batches (with augmentation"
                " and dropout) and on the held-out validation split, and the learning rate at "
                "the end of each epoch. Validation far below training means overfitting.",
                figures.training_curves(history),
            )
        )
    weights = _first_conv(model).weight.detach().numpy()
    sections.append(
        Section(
            "filters",
            "First-layer filters",
            f"The {len(weights)} {weights.shape[2]}x{weights.shape[3]} filters of the first "
            "conv layer, each scaled to its own range (dark: negative weight, light: positive)."
            " Most detect edges, bars or blobs at some orientation.",
            figures.filter_grid(weights),
        )
    )
    search = test.images[:PATCH_SEARCH_IMAGES]
    maps = stage_maps(model, search)
    n_act = ACTIVATION_IMAGES
    per_stage = max(2, min(8, 24 // max(1, len(stages))))
    sections.append(
        Section(
            "activations",
            "Activation maps by stage",
            f"Each row is a test image followed by the first {per_stage} channels of each conv "
            "stage's output (bright: strong activation; each map on its own scale). Early "
            "stages keep the image's layout and respond to edges; deeper stages are coarser "
            "and more abstract.",
            figures.activation_maps(
                list(search[:n_act]),
                [(n, m[:n_act]) for n, m in zip(names, maps, strict=True)],
                per_stage,
            ),
        )
    )
    _, h, w = model.in_shape
    boxes = []
    for name, r in zip(names, stages, strict=True):
        _, sh, sw = r.shape
        boxes.append((name, receptive_box(r, sh // 2, sw // 2, h, w), r.rf))
    sections.append(
        Section(
            "receptive_fields",
            "Receptive fields",
            "For the central unit of each conv stage, the red square is the part of the input "
            "it can see (its receptive field from the analytic plan, clipped to the image). "
            "Every layer with a kernel or a stride makes it grow.",
            figures.receptive_fields(test.images[0], boxes),
        )
    )
    chosen, patches = top_patches(search, maps[-1], stages[-1], PATCH_CHANNELS, PATCHES_PER_CHANNEL)
    sections.append(
        Section(
            "top_patches",
            "What the last conv stage's channels respond to",
            f"Rows are {len(chosen)} channels of {names[-1]} (those with the strongest peaks); "
            f"each row shows the {len(search)} test images' patches that activate that channel "
            f"most, strongest first, cropped to the unit's {stages[-1].rf}x{stages[-1].rf} "
            "receptive field (black lies outside the image). Similar patches in a row show the "
            "feature the channel detects.",
            figures.top_patches(patches, chosen),
        )
    )
    probs, labels = _test_probabilities(run_dir, model, test)
    sections += evaluation_sections(
        test.images, labels, probs, classes, torch_predict(model), state["mean"]
    )
    acc = float((probs.argmax(1) == labels).mean())
    facts = (
        f"Run {run_dir} ({recipe.name}): {recipe.data.name}, {len(history)} epochs, "
        f"test accuracy {acc:.2%} on {len(labels)} images."
    )
    return write_report(f"What {recipe.name} learned", facts, sections, out)


def _test_probabilities(run_dir: Path, model: Classifier, test: Any) -> tuple:
    """The run's saved test predictions; recomputed when they do not match the test set."""
    path = run_dir / "test_predictions.npz"
    if path.is_file():
        saved = np.load(path)
        if len(saved["labels"]) == len(test) and (saved["labels"] == test.labels).all():
            return saved["probabilities"], test.labels
    return torch_predict(model)(test.images), test.labels
