"""Seeing inside the CNN: proofs that the report's pictures and the served explanations are true.

- model.insight.onnx's stage outputs have the analytic volumes of the plan;
- the empirical receptive field (autograd on a linearised copy) equals the plan's;
- occlusion finds the object: its peak lies inside the shapes generator's bounding box;
- Explain over gRPC equals the shared numpy function in-process, and bad input is refused;
- the ONNX-only audit runs without torch; the HTML report opens in headless chromium.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from serving.client import Client, PredictionError, predict_main
from serving.faithfulness import evaluate
from serving.occlusion import DEFAULT_FILL, Grid, baseline_fill, grid, occlusion, peak, pixel_map
from tests.inprocess import serving
from tests.serving_helpers import ROOT
from trainer.data import load_dataset, make_shapes
from trainer.models import Classifier, plan, resolve_layers
from trainer.recipe import Recipe, load_recipe
from trainer.report.run import receptive_box

MODEL = "fashion-mnist"
ARTIFACTS = Path(os.environ.get("CONVSERVE_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts"))
# The shapes recipe trained to localise: random erasing with the mean fill (the occlusion
# patch's fill) teaches the network that a grey square is not an object. About 30 s on 2 cores.
SHAPES_FAST = [
    "data.shapes_train=12000",
    "train.epochs=8",
    "augment.erase_prob=1.0",
    "augment.erase_max_fraction=0.1",
]
# Measured (patch 5, stride 1, 120 images) with `peak` taking the maximum of the map averaged
# over overlapping positions: 91.7-95.0% over four models (this recipe; 6000 images x 6
# epochs with seeds 1 and 2; 6000 x 15), against 16-19% for a random peak. The raw
# single-position argmax gave 85.8-91.7% on the same heatmaps.
MIN_PEAK_INSIDE = 0.90


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[0]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def version_dir(model_repository) -> Path:
    return model_repository / MODEL / "1"


@pytest.fixture(scope="module")
def fashion_test():
    return load_dataset("fashion-mnist").test


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> Path:
    """A short shapes run trained by `cnn-train` itself, which writes report.html at the end."""
    from trainer.cli import train_main

    run = tmp_path_factory.mktemp("shapes_run")
    argv = ["--recipe", "shapes", "--out", str(run), "--no-export", "--quiet", *SHAPES_FAST]
    assert train_main(argv) == 0
    return run


# ----------------------------------------------------------------------------- insight graph
def test_insight_outputs_have_the_analytic_volume_of_every_stage(version_dir, fashion_test):
    manifest = json.loads((version_dir / "manifest.json").read_text())
    recipe = Recipe.model_validate(manifest["training"])
    rows = plan(resolve_layers(recipe.model), (1, 28, 28), len(manifest["labels"]))
    stages = [r for r in rows if r.is_stage]
    assert [s["name"] for s in manifest["insight"]["stages"]] == [
        f"stage{r.index}_{r.kind}" for r in stages
    ]
    sess = ort.InferenceSession(
        str(version_dir / "model.insight.onnx"), providers=["CPUExecutionProvider"]
    )
    images = fashion_test.images[:5]
    out = sess.run(None, {"images": images})
    assert [o.name for o in sess.get_outputs()][:2] == ["logits", "probabilities"]
    for got, r in zip(out[2:], stages, strict=True):
        assert got.shape == (5, *r.shape), f"layer {r.index} ({r.kind})"
    plain = ort.InferenceSession(
        str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(
        out[1], plain.run(["probabilities"], {"images": images})[0], atol=1e-5
    )


# ----------------------------------------------------------------------------- receptive field
def _linearised(model: Classifier) -> nn.Module:
    """A copy where every path carries gradient: positive weights, zero biases, BN and ReLU
    as identity, max pooling as average pooling of the same geometry."""

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (nn.BatchNorm2d, nn.ReLU, nn.GELU, nn.Dropout)):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
            else:
                swap(child)

    swap(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(m.weight.abs() + 0.01)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def _empirical_box(features: nn.Module, n_layers: int, in_shape, y: int, x: int) -> tuple:
    image = torch.ones((1, *in_shape), requires_grad=True)
    out = image
    for layer in list(features)[:n_layers]:
        out = layer(out)
    out[0, :, y, x].sum().backward()
    ys, xs = np.nonzero(image.grad[0].abs().sum(0).numpy())
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("preset", ["default", "lenet5", "whitened"])
def test_empirical_receptive_field_equals_the_plan_for_every_layer(preset):
    cfg = load_recipe("fashion_mnist").model
    if preset == "whitened":  # a 2x2 whitening first layer, no padding: a real layer
        cfg = load_recipe(ROOT / "bench" / "recipes" / "fashion_mnist_whitened.yaml").model
    elif preset != "default":
        cfg = cfg.model_copy(update={"preset": preset, "layers": None})
    in_shape = (1, 28, 28)
    model = Classifier(resolve_layers(cfg), in_shape, 10, [0.5], [0.25]).eval()
    linear = _linearised(model)
    checked = 0
    for r in model.rows:
        if r.rf is None:
            continue
        _, h, w = r.shape
        got = _empirical_box(linear.features, r.index + 1, in_shape, h // 2, w // 2)
        assert got == receptive_box(r, h // 2, w // 2, 28, 28), f"layer {r.index} ({r.kind})"
        checked += 1
    assert checked >= 4


# ----------------------------------------------------------------------------- occlusion
def test_the_peak_is_where_overlapping_positions_agree_not_a_lone_spike():
    g = grid(28, 28, 5, 1)  # 24 x 24 positions, each patch overlapping 4 neighbours a side
    h = np.zeros((g.rows, g.cols), dtype=np.float32)
    h[10:16, 10:16] = 0.6  # a region where every covering patch hides the object
    h[3, 20] = 0.9  # one position that spikes alone
    assert peak(h, g) == (12 + 2.5, 12 + 2.5)  # the region's middle (first of its maxima)
    wide = grid(28, 28, 7, 7)  # no overlap: the plain argmax
    h = np.zeros((wide.rows, wide.cols), dtype=np.float32)
    h[2, 1] = 1.0
    assert peak(h, wide) == (7 + 3.5, 14 + 3.5)


@pytest.mark.slow
def test_occlusion_peak_lies_inside_the_object_box(shapes_run, record_property):
    from trainer.export import load_model, resolve_checkpoint
    from trainer.report.run import torch_predict

    state, _, model = load_model(resolve_checkpoint(shapes_run))
    shapes = make_shapes(120, seed=20_240_601, max_area_fraction=0.25)
    predict = torch_predict(model)
    g: Grid = grid(28, 28, 5, 1)
    inside = chance = 0.0
    for image, label, (x0, y0, x1, y1) in zip(
        shapes.images, shapes.labels, shapes.boxes, strict=True
    ):
        occ = occlusion(
            image, predict, state["mean"], patch=g.patch, stride=g.stride, target=int(label)
        )
        px, py = peak(occ.heatmap, g)
        inside += x0 <= px < x1 and y0 <= py < y1
        cy = np.arange(g.rows) * g.stride + g.patch / 2
        cx = np.arange(g.cols) * g.stride + g.patch / 2
        chance += ((y0 <= cy) & (cy < y1)).mean() * ((x0 <= cx) & (cx < x1)).mean()
    rate, random_rate = inside / len(shapes), chance / len(shapes)
    record_property("occlusion_peak_inside_box", rate)
    record_property("random_peak_inside_box", random_rate)
    print(f"occlusion peak inside the box: {rate:.1%} (a random peak: {random_rate:.1%})")
    assert rate >= MIN_PEAK_INSIDE and rate >= 4 * random_rate, (
        f"peak inside the box for {rate:.1%} (random: {random_rate:.1%})"
    )


# ----------------------------------------------------------------------------- Explain
def test_explain_over_grpc_equals_the_shared_function_and_counts_1_plus_p_items(
    model_repository, version_dir, fashion_test, tmp_path
):
    manifest = json.loads((version_dir / "manifest.json").read_text())
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return sess.run(["probabilities"], {"images": x})[0]

    image = fashion_test.images[0]
    stage = manifest["insight"]["stages"][-1]
    items = {"model": "fashion-mnist", "version": "1"}
    with (
        serving(model_repository, max_batch_size=16, max_explain_positions=200) as server,
        Client(server.target) as client,
    ):
        ex = client.explain(image, patch_size=6, stride=2, activation_stage=stage["name"])
        computed = server.value("convserve_inference_items_total", **items)
        want = occlusion(image, predict, manifest["mean"], patch=6, stride=2)
        np.testing.assert_allclose(ex.heatmap, want.heatmap, atol=1e-5)
        assert ex.heatmap.shape == (12, 12) and ex.forward_passes == 1 + 144
        assert ex.target_class == want.target == ex.classes[0].index
        assert computed == 1 + 144  # through the batcher, in batches of 16
        assert ex.activations is not None and list(ex.activations.shape) == stage["shape"]
        # A fixed target class and the defaults (a seventh of the side, stride = patch).
        other = client.explain(image, target_class=3, render_png=True)
        assert other.target_class == 3 and other.heatmap.shape == (7, 7)
        assert Image.open(io.BytesIO(other.overlay_png)).size == (28 * 8, 28 * 8)
        assert server.value("convserve_requests_total", method="Explain", code="OK") == 2


def test_explains_default_points_at_the_garment_and_its_deletion_beats_random_order(
    model_repository, version_dir, fashion_test, record_property
):
    """Faithfulness of Explain's default (serving/faithfulness.py) on 100 stratified
    Fashion-MNIST test images, with the suite's trained fixture (`model_repository`: two
    epochs of a small CNN, 0.89 test accuracy). Measured on it: pointing 99%, deletion AUC
    0.12 against 0.49 for the same pixels in random order, insertion 0.85. The bars leave
    room for another machine's kernels: pointing >= 90% (the issue's bar), deletion below
    0.75 x random."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return sess.run(["probabilities"], {"images": x})[0]

    rng = np.random.default_rng(0)
    labels = fashion_test.labels
    idx = np.sort(np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), 10, replace=False) for c in range(10)]
    ))  # fmt: skip
    images = fashion_test.images[idx]
    g = grid(28, 28)  # the server's default
    with serving(model_repository) as server, Client(server.target) as client:
        explanations = [client.explain(image) for image in images]
    maps, peaks, targets = [], [], []
    for image, ex in zip(images, explanations, strict=True):
        fill = baseline_fill(image, DEFAULT_FILL, manifest["mean"], g.patch)
        maps.append(pixel_map(ex.heatmap, g, image, fill))
        peaks.append(peak(ex.heatmap, g))
        targets.append(ex.target_class)
    s = evaluate(images, np.array(targets), np.stack(maps), np.array(peaks), predict)
    for name in ("pointing", "background", "deletion", "random_deletion", "insertion"):
        record_property(name, getattr(s, name))
    print(f"Explain default: {s}")
    assert s.pointing >= 0.90, s
    assert s.deletion < 0.75 * s.random_deletion, s


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"patch_size": 29}, "patch_size"),
        ({"patch_size": -1}, "patch_size"),
        ({"stride": -2}, "stride"),
        ({"patch_size": 2, "stride": 1}, "limit"),  # 27 x 27 positions > 200
        ({"target_class": 10}, "target_class"),
        ({"activation_stage": "nope"}, "activation_stage"),
        ({"image": b"not an image"}, "image"),
    ],
)
def test_bad_explain_gets_invalid_argument_and_the_server_keeps_serving(
    explain_server, fashion_test, kwargs, reason
):
    kwargs = dict(kwargs)
    image = kwargs.pop("image", fashion_test.images[1])
    with Client(explain_server.target) as client:
        with pytest.raises(PredictionError) as err:
            client.explain(image, **kwargs)
        assert err.value.code.name == "INVALID_ARGUMENT" and reason in err.value.details
        assert client.explain(fashion_test.images[1], stride=7).forward_passes == 17


@pytest.fixture(scope="module")
def explain_server(model_repository):
    with serving(model_repository, max_explain_positions=200) as s:
        yield s


def test_cnn_predict_explain_writes_an_overlay_per_image(explain_server, fashion_test, tmp_path):
    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(_png(fashion_test.images[i]))
    out = tmp_path / "explained"
    rc = predict_main(["--server", explain_server.target, "--explain", str(out), str(tmp_path)])
    assert rc == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["img0.explain.png", "img1.explain.png"]
    assert Image.open(out / written[0]).size == (224, 224)


# ----------------------------------------------------------------------------- reports
def test_audit_of_an_exported_model_runs_without_torch(version_dir, fashion_test, tmp_path):
    data = tmp_path / "labelled"
    manifest = json.loads((version_dir / "manifest.json").read_text())
    for i in range(60):
        label = int(fashion_test.labels[i])
        folder = data / manifest["labels"][label].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(_png(fashion_test.images[i]))
    out = tmp_path / "audit.html"
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises
        "from trainer.cli import report_main\n"
        f"rc = report_main(['--model', {str(version_dir)!r}, '--data', {str(data)!r}, "
        f"'--out', {str(out)!r}])\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    for section in ("occlusion", "confusion", "per_class", "mistakes"):
        assert f"id='{section}'" in html
        assert (tmp_path / f"audit-{section}.png").is_file()
    assert "60 labelled images" in html


@pytest.mark.slow
def test_report_opens_in_headless_chromium_with_every_image_loaded(shapes_run):
    from playwright.sync_api import sync_playwright

    report = shapes_run / "report.html"
    assert report.is_file(), "cnn-train did not write its report"
    html = report.read_text()
    for section in (
        "architecture",
        "curves",
        "filters",
        "activations",
        "receptive_fields",
        "top_patches",
        "occlusion",
        "confusion",
        "per_class",
        "mistakes",
    ):
        assert f"id='{section}'" in html, section
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    errors: list[str] = []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])"
        )
        captions = page.eval_on_selector_all("figure figcaption", "els => els.length")
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert len(images) >= 9 and all(ok and w > 0 and h > 0 for ok, w, h in images), images
    assert captions == len(images)
    assert errors == []
