"""Patch whitening (airbench, arXiv 2404.00498): a frozen first convolution that
decorrelates the pixels of every k x k patch, so the layers after it learn from inputs whose
directions all have unit variance. Cheap (2 x C x k^2 filters, no padding) and set once from
the training images before the first step; its bias trains for the first epochs only
(trainer.optim gives it its own schedule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Whiten(nn.Conv2d):
    """The frozen patch-whitening convolution (recipe `whiten`); `fit_whitening` sets it."""

    def __init__(self, cin: int, kernel: int, bias_epochs: int | None):
        super().__init__(cin, 2 * cin * kernel * kernel, kernel, bias=True)
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)
        self.bias_epochs = bias_epochs


@torch.no_grad()
def fit_whitening(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set a Whiten first layer from the covariance of the normalised patches of the first
    5,000 training images: the eigenvectors scaled by 1/sqrt(eigenvalue + eps), then the
    same negated (so a ReLU/GELU after it loses no direction). Deterministic for the same
    images; computed on the layer's device."""
    whiten = next((m for m in model.features.modules() if isinstance(m, Whiten)), None)
    if whiten is None:
        return
    k = whiten.kernel_size[0]
    x = model.preprocess(images[:5000].to(whiten.weight.device)).double()
    patches = F.unfold(x, k).transpose(1, 2).reshape(-1, x.shape[1] * k * k)
    cov = patches.T @ patches / len(patches)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0), vectors.T.flip(0)  # largest first, one per row
    scaled = (vectors / torch.sqrt(values.clamp_min(0) + eps)[:, None]).float()
    w = torch.cat([scaled, -scaled]).view_as(whiten.weight)
    whiten.weight.copy_(w)
