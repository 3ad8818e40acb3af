"""Test-time augmentation: the logits of a few views of each image, averaged.

Views, as airbench weighs them (arXiv 2404.00498): "mirror" averages the image and its
horizontal mirror; "mirror_shift" gives that pair half the weight and spreads the other half
over the mirror pairs of the image shifted by one pixel up-left and down-right (edges
replicated). Every view of a batch runs as one forward pass of 2 or 6 times the rows, so
the served graph stays one Conv chain; the price is 2x or 6x the compute per image.

The views are part of the exported graph (`export.tta`): the served model scores what the
manifest says. Explanations (the insight model) look at the plain network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TTA_VIEWS = ("none", "mirror", "mirror_shift")


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`x` moved by (dy, dx) pixels, the uncovered edge replicated from the border."""
    _, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return padded[:, :, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def tta_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, views: str
) -> torch.Tensor:
    """Averaged logits of the views of a float batch `x` (NCHW) through `forward`."""
    if views == "none":
        return forward(x)
    batch = [x, x.flip(3)]
    if views == "mirror_shift":
        a, b = _shifted(x, -1, -1), _shifted(x, 1, 1)
        batch += [a, a.flip(3), b, b.flip(3)]
    logits = forward(torch.cat(batch)).unflatten(0, (len(batch), -1))
    if views == "mirror":
        return logits.mean(0)
    return 0.5 * logits[:2].mean(0) + 0.5 * logits[2:].mean(0)


class WithTTA(nn.Module):
    """A classifier whose forward pass averages the logits of `views` of its input.

    Views are taken after the classifier's own normalisation (a float image), so shifting
    replicates real pixel values; the input stays the raw uint8 the classifier takes.
    """

    def __init__(self, classifier: nn.Module, views: str):
        super().__init__()
        if views not in TTA_VIEWS:
            raise ValueError(f"unknown TTA views {views!r} (known: {', '.join(TTA_VIEWS)})")
        self.classifier = classifier
        self.views = views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.classifier
        return tta_logits(c.forward_normalised, c.preprocess(x), self.views)
