"""How faithful the explanations are: the pointing game and deletion / insertion curves
(serving/faithfulness.py) for occlusion with each fill tried, against captum's Occlusion
and IntegratedGradients on the same images, on a fixed stratified sample of the
Fashion-MNIST test set.

Occlusion runs exactly as the server runs it (serving/occlusion.py rows through the exported
model in ONNX Runtime); captum runs on the checkpoint's PyTorch model (the same weights:
export parity is 100% argmax). Every map's target is the model's top-1 class of the image.

Writes bench/results/explain_quality.json and prints the table BENCHMARKS.md holds.

    python bench/explain_quality.py --run runs/bench-export/run [--images 1000]

captum pins numpy < 2 in its metadata but runs on numpy 2: `make bench-explain` installs it
with --no-deps (with its deps pip would downgrade numpy under onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import faithfulness, occlusion  # noqa: E402
from trainer.data import load_dataset  # noqa: E402

BATCH = 1024


def stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n test indices, the same number from each class, seeded."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = n // len(classes)
    picks = [rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


class OnnxModel:
    def __init__(self, path: Path):
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        out = [
            self.sess.run(["probabilities"], {"images": rows[i : i + BATCH]})[0]
            for i in range(0, len(rows), BATCH)
        ]
        return np.concatenate(out)


def occlusion_maps(
    images: np.ndarray, targets: np.ndarray, model: OnnxModel, mean: list[float],
    fills: tuple[str, ...], patch: int, stride: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-pixel maps and peaks of occlusion, the heatmaps of `fills` averaged."""
    maps, peaks = [], []
    for image, target in zip(images, targets, strict=True):
        g = occlusion.grid(image.shape[1], image.shape[2], patch, stride)
        heat = np.zeros((g.rows, g.cols), dtype=np.float64)
        for fill in fills:
            rows = occlusion.occluded_rows(
                image, g, occlusion.baseline_fill(image, fill, mean, g.patch)
            )
            heat += occlusion.heatmap_from(model(rows), g, int(target)).heatmap
        heat /= len(fills)
        fill = occlusion.baseline_fill(image, fills[0], mean, g.patch)
        maps.append(occlusion.pixel_map(heat, g, image, fill))
        peaks.append(occlusion.peak(heat, g))
    return np.stack(maps), np.array(peaks)


def captum_maps(
    images: np.ndarray, targets: np.ndarray, checkpoint: Path, method: str, patch: int,
    stride: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    import torch
    from captum.attr import IntegratedGradients, Occlusion

    from trainer.export.model import load_model

    _, _, classifier = load_model(checkpoint)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(classifier(x), dim=1)

    x = torch.tensor(images, dtype=torch.float32)
    t = torch.tensor(targets, dtype=torch.long)
    chunks = []
    for i in range(0, len(x), 100):
        xi, ti = x[i : i + 100], t[i : i + 100]
        if method == "IntegratedGradients":
            attr = IntegratedGradients(probabilities).attribute(
                xi, baselines=torch.zeros_like(xi), target=ti, n_steps=32
            )
        else:
            c = xi.shape[1]
            attr = Occlusion(probabilities).attribute(
                xi, sliding_window_shapes=(c, patch, patch), strides=(c, stride, stride),
                baselines=0, target=ti,
            )  # fmt: skip
        chunks.append(attr.detach().sum(dim=1).numpy())
    maps = np.concatenate(chunks).astype(np.float32)
    return maps, np.array([faithfulness.pixel_peak(m) for m in maps])


def background_examples(
    images: np.ndarray,
    old: tuple[np.ndarray, np.ndarray],
    new: tuple[np.ndarray, np.ndarray],
    path: Path,
    n: int = 8,
) -> None:
    """Test images whose old-default peak sits on pure background: the image, the old map
    (grey training-mean patches, 7/7) and the new one (the image's background, 4/4), each
    peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [i for i, (x, y) in enumerate(old[1]) if faithfulness.on_background(images[i], x, y)][
        :n
    ]
    if not picks:
        return
    fig, axes = plt.subplots(3, len(picks), figsize=(1.6 * len(picks), 5.2), squeeze=False)
    rows = (("image", None), ("old default: grey, 7/7", old), ("new: background, 4/4", new))
    for r, (label, maps) in enumerate(rows):
        for c, i in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(images[i][0], cmap="gray")
            if maps is not None:
                m = np.nan_to_num(maps[0][i])
                top = float(np.abs(m).max()) or 1.0  # red: evidence, blue: against
                ax.imshow(m, cmap="bwr", vmin=-top, vmax=top, alpha=0.6)
                ax.plot(*maps[1][i], "c+", markersize=12, markeredgewidth=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle("Peaks on pure background (+): the old default against the new", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/bench-export/run",
                   help="training run (checkpoints/best.pt) of the exported model")  # fmt: skip
    p.add_argument("--model-dir", type=Path, default=None,
                   help="its exported version folder (default: found beside --run)")  # fmt: skip
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grids", default="7:7,4:4",
                   help="occlusion PATCH:STRIDE settings to measure (7:7 was Explain's default "
                   "before this benchmark; 4:4 is now)")  # fmt: skip
    p.add_argument("--no-captum", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/explain_quality.json")
    args = p.parse_args()
    model_dir = args.model_dir or next((args.run.parent / "models").glob("*/*"))
    manifest = json.loads((model_dir / "manifest.json").read_text())
    model = OnnxModel(model_dir / "model.onnx")
    test = load_dataset("fashion-mnist").test
    idx = stratified(test.labels, args.images, args.seed)
    images = test.images[idx]
    targets = model(images).argmax(1)
    methods: dict[str, Any] = {}

    def score(name: str, maps: np.ndarray, peaks: np.ndarray, seconds: float) -> None:
        s = faithfulness.evaluate(images, targets, maps, peaks, model, seed=args.seed)
        methods[name] = asdict(s) | {"seconds": round(seconds, 1)}
        print(f"{name:32s} pointing {s.pointing:.3f} background {s.background:.3f} "
              f"deletion {s.deletion:.3f} (random {s.random_deletion:.3f}) insertion "
              f"{s.insertion:.3f} (random {s.random_insertion:.3f})  {seconds:.0f}s",
              flush=True)  # fmt: skip

    fills = [(f,) for f in occlusion.FILLS] + [("background", "blur", "train_mean")]
    grids = [tuple(int(v) for v in g.split(":")) for g in args.grids.split(",")]
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for patch, stride in grids:
        for fill in fills:
            t0 = time.perf_counter()
            maps, peaks = occlusion_maps(images, targets, model, manifest["mean"], fill,
                                         patch, stride)  # fmt: skip
            name = f"occlusion {patch}/{stride} {'+'.join(fill)}"
            score(name, maps, peaks, time.perf_counter() - t0)
            kept[name] = (maps, peaks)
    old, new = "occlusion 7/7 train_mean", "occlusion 4/4 background"
    if old in kept and new in kept:
        background_examples(images, kept[old], kept[new], args.out.with_suffix(".png"))
    if not args.no_captum:
        checkpoint = args.run / "checkpoints" / "best.pt"
        patch, stride = grids[0]
        for method in ("Occlusion", "IntegratedGradients"):
            t0 = time.perf_counter()
            maps, peaks = captum_maps(images, targets, checkpoint, method, patch, stride)
            score(f"captum {method}", maps, peaks, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(model_dir), "test_accuracy": manifest.get("test_accuracy"),
        "images": len(images), "seed": args.seed, "grids": args.grids,
        "methods": methods}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
