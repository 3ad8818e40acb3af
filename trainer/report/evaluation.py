"""The report parts that need only predictions: occlusion maps, the confusion matrix,
per-class accuracy and the most confident mistakes. The training report (trainer.report.run,
PyTorch) and the ONNX-only audit (trainer.report.audit) both show them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from serving.faithfulness import Scores, evaluate, object_box
from serving.occlusion import (
    DEFAULT_FILL,
    Grid,
    baseline_fill,
    grid,
    occlusion,
    peak,
    pixel_map,
    upsample,
)
from trainer.report import figures
from trainer.report.page import Section

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 NCHW images -> probabilities
OCCLUDED_IMAGES = 6
MISTAKES = 16
FAITHFULNESS_IMAGES = 100  # test images the occlusion caption's figures are measured on


def occlusion_grid(height: int, width: int) -> Grid:
    """The report's occlusion grid: the default patch, overlapping with stride patch // 3."""
    g = grid(height, width)
    return grid(height, width, g.patch, max(1, g.patch // 3))


def evaluation_sections(
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    predict: Predict,
    mean: Sequence[float],
) -> list[Section]:
    """Occlusion maps, confusion matrix, per-class accuracy and confident mistakes."""
    k = len(classes)
    pred = probabilities.argmax(1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    accuracy = float((pred == labels).mean())
    return [
        _occlusion_section(images, labels, classes, predict, mean),
        Section(
            "confusion",
            "Confusion matrix (test set)",
            f"Each cell counts test images of the row's true class predicted as the column's "
            f"class; the diagonal holds the {int(cm.trace())} correct ones of {len(labels)} "
            f"(accuracy {accuracy:.2%}). Bright cells off the diagonal are the classes the "
            "network confuses.",
            figures.confusion_matrix(cm, classes),
        ),
        Section(
            "per_class",
            "Per-class accuracy (test set)",
            "The share of each class's test images classified correctly; the dashed line is "
            "the mean over classes. Short bars are the hard classes.",
            figures.per_class_accuracy(per_class, classes),
        ),
        _mistakes_section(images, labels, probabilities, classes),
    ]


def _occlusion_section(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    predict: Predict,
    mean: Sequence[float],
) -> Section:
    g = occlusion_grid(images.shape[2], images.shape[3])
    picks = images[:OCCLUDED_IMAGES]
    maps, titles = [], []
    for img, label in zip(picks, labels[:OCCLUDED_IMAGES], strict=True):
        occ = occlusion(img, predict, mean, patch=g.patch, stride=g.stride, target=int(label))
        maps.append(upsample(occ.heatmap, g, img.shape[1], img.shape[2]))
        titles.append(f"{classes[label]}\np={occ.probabilities[label]:.2f}")
    sample = images[:FAITHFULNESS_IMAGES]
    s = faithfulness(sample, predict, mean)
    h, w = images.shape[2:]
    # The pointing game needs a background to tell the object from (black on these
    # datasets); on photographs every pixel is "object" and a hit would mean nothing.
    boxed = np.mean([object_box(img) != (0, 0, w, h) for img in sample])
    pointing = (
        f"the map's peak lies on the object (pointing game) for {s.pointing:.0%} of them, and "
        f"on pure background for {s.background:.0%}; "
        if boxed > 0.5
        else ""
    )
    return Section(
        "occlusion",
        "Occlusion sensitivity",
        f"A {g.patch}x{g.patch} patch, filled with the image's own background colour, slides "
        f"over each test image in steps of {g.stride} px ({g.forward_passes} forward passes "
        "per image). Red marks where hiding the region lowers the probability of the true "
        "class (the evidence the network uses), blue where it raises it; each pixel shows the "
        "mean over the patches covering it. The title gives the true class and its "
        f"probability. How faithful such maps are, measured on {s.images} test images with "
        f"the server's Explain default: {pointing}deleting "
        "the pixels it ranks most important first drops the top class's probability with an "
        f"area under the curve of {s.deletion:.2f} (a random order of the same pixels: "
        f"{s.random_deletion:.2f}; lower is faster), and inserting them first into a blank "
        f"image raises it with an area of {s.insertion:.2f} (random: "
        f"{s.random_insertion:.2f}; higher is better).",
        figures.occlusion_maps(list(picks), maps, titles),
    )


def faithfulness(images: np.ndarray, predict: Predict, mean: Sequence[float]) -> Scores:
    """serving.faithfulness's figures of Explain's default occlusion on `images`, each
    explained for its predicted class."""
    g = grid(images.shape[2], images.shape[3])
    maps, peaks, targets = [], [], []
    for img in images:
        occ = occlusion(img, predict, mean)
        fill = baseline_fill(img, DEFAULT_FILL, mean, g.patch)
        maps.append(pixel_map(occ.heatmap, g, img, fill))
        peaks.append(peak(occ.heatmap, g))
        targets.append(occ.target)
    return evaluate(images, np.array(targets), np.stack(maps), np.array(peaks), predict)


def _mistakes_section(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> Section:
    pred = probabilities.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    conf = probabilities[wrong, pred[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:MISTAKES]
    titles = [
        f"true {classes[labels[i]]}\npred {classes[pred[i]]} {probabilities[i, pred[i]]:.2f}"
        for i in order
    ]
    fig = figures.mistakes([images[i] for i in order], titles) if len(order) else None
    caption = (
        f"The {len(order)} wrong test predictions made with the highest probability: true "
        "class, predicted class and its probability. Confident mistakes show ambiguous images, "
        "label noise or a blind spot of the network."
        if len(order)
        else "The network made no mistake on the test set."
    )
    return Section("mistakes", "Most confident mistakes", caption, fig)
