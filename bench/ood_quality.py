"""How well the out-of-distribution score separates Fashion-MNIST from what it is not.

The score is the server's (serving.monitor: among test images given the same answer, the
percentile of the energy -logsumexp(logits) or of the low logit norm, whichever is more
unusual), computed on the exported graph's outputs in ONNX Runtime with the tables and the
flag threshold the exporter writes in the manifest (the test set's 95th percentile: 5%
false positives). Against the Fashion-MNIST test set (10,000 images, in distribution):

- handwritten digits: scikit-learn's bundled `load_digits` (1,797 8x8 images, 0..16, shipped
  in its wheel: no download), scaled to 0..255 and upsampled to 28x28 (bilinear);
- photos of noise, as a new user sends them: 640x480 RGB PNGs of uniform random pixels,
  decoded and resized by the server's own codec (serving.codec) to the model's input;
- 28x28 noise: uniform random pixels at the model's size (no resize averaging it out).

For each: AUROC of the score (1.0: every outlier scores above every test image) and the
share flagged at the manifest's threshold; beside them the two usual baselines on their own,
the energy and the max-softmax (1 - top-1 probability), each with its AUROC and the share
above its own test-set 95th percentile. Writes bench/results/ood_quality.json.

    python bench/ood_quality.py --version-dir runs/bench-ood/models/fashion-mnist/1
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import monitor  # noqa: E402
from serving.codec import decode_image  # noqa: E402
from serving.contract import OOD_SCORE, InputSpec, Manifest, Monitoring, read_document  # noqa: E402
from trainer.data import load_dataset  # noqa: E402

BATCH = 1024


def run(session: ort.InferenceSession, rows: np.ndarray) -> np.ndarray:
    """(N, 2, K): logits then probabilities, as the server's batcher returns them."""
    parts = []
    for i in range(0, len(rows), BATCH):
        logits, probs = session.run(["logits", "probabilities"], {"images": rows[i : i + BATCH]})
        parts.append(np.stack([logits, probs], axis=1))
    return np.concatenate(parts)


def digits(spec: InputSpec) -> np.ndarray:
    """scikit-learn's 8x8 digits as uint8 images of the model's size (white on black, as
    MNIST: the digits' 0..16 ink scaled to 0..255)."""
    d = load_digits().images  # (1797, 8, 8) float 0..16
    out = np.empty((len(d), *spec.shape), dtype=np.uint8)
    for i, img in enumerate(d):
        small = Image.fromarray(np.round(img * 255 / 16).astype(np.uint8))
        big = small.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        out[i] = np.asarray(big)[None]
    return out


def noise_photos(spec: InputSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """640x480 RGB noise PNGs through the server's decoder (grayscale, resized)."""
    out = np.empty((n, *spec.shape), dtype=np.uint8)
    for i in range(n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        out[i] = decode_image(buf.getvalue(), spec)
    return out


def noise_small(spec: InputSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (n, *spec.shape), dtype=np.uint8)


def separation(inside: np.ndarray, outside: np.ndarray, m: Monitoring) -> dict[str, Any]:
    """AUROC and flagged share of the score, and of the energy and max-softmax baselines."""
    tables = monitor.tables(m)
    measures = {
        "score": lambda o: monitor.ood_scores(o, *tables),
        "energy": lambda o: monitor.energy(o[:, 0]),
        "max_softmax": lambda o: 1 - o[:, 1].max(axis=1),
    }
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    out: dict[str, Any] = {"images": len(outside)}
    for name, f in measures.items():
        s_in, s_out = f(inside), f(outside)
        threshold = m.ood_threshold if name == "score" else np.quantile(s_in, 0.95)
        out[name] = {
            "auroc": round(float(roc_auc_score(y, np.r_[s_in, s_out])), 4),
            "flagged": round(float((s_out > threshold).mean()), 4),
        }
    top = outside[:, 1]
    out["mean_top1_probability"] = round(float(top.max(axis=1).mean()), 4)
    out["predicted_classes"] = np.bincount(top.argmax(axis=1), minlength=top.shape[1]).tolist()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version-dir", type=Path, required=True)
    p.add_argument("--noise", type=int, default=300, help="noise images of each kind")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/ood_quality.json")
    args = p.parse_args()
    t0 = time.monotonic()
    manifest = Manifest.from_dict(read_document(args.version_dir), ignored=[])
    spec = manifest.input
    session = ort.InferenceSession(
        str(args.version_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    test = load_dataset(manifest.dataset or "fashion-mnist").test
    inside = run(session, test.images)
    reference = monitor.profile(inside[:, 0], inside[:, 1], test.images)
    if manifest.monitoring is not None:  # the exporter's, on the same graph and images
        assert abs(manifest.monitoring.ood_threshold - reference.ood_threshold) < 1e-3
    rng = np.random.default_rng(0)
    sets = {
        "digits": digits(spec),
        "noise_photos_640x480": noise_photos(spec, args.noise, rng),
        "noise_28x28": noise_small(spec, args.noise, rng),
    }
    result: dict[str, Any] = {
        "version_dir": str(args.version_dir),
        "test_accuracy": manifest.test_accuracy,
        "tta": manifest.training.get("export", {}).get("tta", "none"),
        "score": OOD_SCORE,
        "threshold": reference.ood_threshold,
        "test_flagged": reference.ood_false_positive_rate,
        "test_images": len(test.images),
        "against": {k: separation(inside, run(session, v), reference) for k, v in sets.items()},
        "seconds": round(time.monotonic() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    fpr = reference.ood_false_positive_rate
    print(f"threshold {reference.ood_threshold:.3f} (test set flagged {fpr:.3f})")
    heads = ("score: AUROC", "flagged", "energy: AUROC", "flagged", "max-softmax: AUROC")
    print("| against | images | " + " | ".join(heads) + " | flagged |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in result["against"].items():
        cells = [
            f"{r[m]['auroc']:.3f} | {r[m]['flagged']:.1%}"
            for m in ("score", "energy", "max_softmax")
        ]
        print(f"| {k} | {r['images']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
