"""Training randomness keyed by step: batch augmentation (crop, flip, erasing) and dropout.

Each augmentation works on a whole uint8 batch at once (no per-sample Python). The random
draws for a step come from a generator keyed by (seed, epoch, step) and are drawn for the
whole global batch, so a rank that takes rows [a, b) of it sees exactly the draws a single
process would have used for those rows: augmentation does not depend on the process count.
Dropout masks are drawn the same way (`KeyedDropout`), so dropout does not depend on it either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.recipe import AugmentConfig


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator for one step, independent of every other step and of process count."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)
    return g


class BatchAugment:
    """Applies the recipe's augmentations to rows `rows` of a global batch of size `total`."""

    def __init__(self, cfg: AugmentConfig, fill: tuple[int, ...], images: int = 0, seed: int = 0):
        self.cfg = cfg
        self.fill = fill  # per-channel uint8 value used for erasing (the dataset mean)
        # "alternate" flips: which images the first epoch mirrors, one draw per image
        self.first_flips: torch.Tensor | None = None
        if cfg.flip == "alternate":
            g = torch.Generator().manual_seed(seed)
            self.first_flips = torch.rand(images, generator=g) < 0.5

    @property
    def active(self) -> bool:
        c = self.cfg
        return c.crop_padding > 0 or c.flip or c.erase_prob > 0

    def __call__(
        self,
        x: torch.Tensor,
        g: torch.Generator,
        total: int | None = None,
        offset: int = 0,
        *,
        ids: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> torch.Tensor:
        """`ids`: the rows' indices in the training set (alternate flips need them)."""
        n, _, h, w = x.shape
        total = total or n
        rows = slice(offset, offset + n)
        dev = x.device
        c = self.cfg
        if c.crop_padding:
            p = c.crop_padding
            dy = torch.randint(0, 2 * p + 1, (total,), generator=g)[rows].to(dev)
            dx = torch.randint(0, 2 * p + 1, (total,), generator=g)[rows].to(dev)
            padded = F.pad(x, (p, p, p, p))
            iy = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
            ix = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
            ib = torch.arange(n, device=dev)[:, None, None, None]
            ic = torch.arange(x.shape[1], device=dev)[None, :, None, None]
            x = padded[ib, ic, iy, ix]
        if c.flip == "alternate":
            if self.first_flips is None or ids is None:
                raise ValueError("alternate flips need the images' training-set indices")
            flip = (self.first_flips[ids.cpu()] ^ bool(epoch % 2)).to(dev)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        elif c.flip:
            flip = (torch.rand(total, generator=g) < 0.5)[rows].to(dev)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if c.erase_prob > 0:
            x = self._erase(x, g, total, rows)
        return x

    def _erase(self, x: torch.Tensor, g: torch.Generator, total: int, rows: slice) -> torch.Tensor:
        """Random erasing: a rectangle of up to `erase_max_fraction` of the area set to the mean."""
        _n, ch, h, w = x.shape
        dev = x.device
        apply = (torch.rand(total, generator=g) < self.cfg.erase_prob)[rows]
        area = torch.rand(total, generator=g)[rows] * self.cfg.erase_max_fraction * h * w
        aspect = torch.exp((torch.rand(total, generator=g)[rows] - 0.5) * 2 * 1.0986)  # 1/3..3
        eh = (area * aspect).sqrt().clamp(1, h).floor()
        ew = (area / aspect).sqrt().clamp(1, w).floor()
        y0 = (torch.rand(total, generator=g)[rows] * (h - eh + 1)).floor()
        x0 = (torch.rand(total, generator=g)[rows] * (w - ew + 1)).floor()
        ys = torch.arange(h)[None, :]
        xs = torch.arange(w)[None, :]
        my = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])
        mx = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])
        mask = (my[:, :, None] & mx[:, None, :]) & apply[:, None, None]
        fill = torch.tensor(self.fill, dtype=x.dtype, device=dev).view(1, ch, 1, 1)
        return torch.where(mask[:, None].to(dev), fill, x)


# ----------------------------------------------------------------------------- dropout
class KeyedDropout(nn.Module):
    """Dropout whose mask for a row depends only on (seed, epoch, step, layer, global row).

    torch's own dropout draws from the process's global generator, so on N processes each
    rank would draw different masks than one process draws for the same rows. This one draws
    the mask of the whole global batch from a generator keyed by the step (on the device of
    the activations) and keeps this rank's rows, like `BatchAugment`. Same scaling as
    nn.Dropout; outside the training loop (no key set) it is plain dropout.
    """

    def __init__(self, p: float, layer: int):
        super().__init__()
        self.p = p
        self.layer = layer
        self.key: tuple[int, int, int] | None = None  # (seed, epoch, step)
        self.rows: tuple[int, int] = (0, 0)  # (global batch size, offset of this rank's rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.key is None:
            return F.dropout(x, self.p, training=True)
        total, offset = self.rows
        seed = np.random.SeedSequence([k % 2**64 for k in (*self.key, self.layer)])
        g = torch.Generator(device=x.device)
        g.manual_seed(int(seed.generate_state(1, np.uint64)[0]))
        u = torch.rand((total or len(x), *x.shape[1:]), generator=g, device=x.device)
        keep = u[offset : offset + len(x)] >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}"


def use_keyed_dropout(model: nn.Module) -> list[KeyedDropout]:
    """Replace every nn.Dropout in `model` by a KeyedDropout (dropout has no weights)."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Dropout
    ]
    keyed = []
    for layer, (parent, name, child) in enumerate(swaps):
        keyed.append(KeyedDropout(child.p, layer))
        setattr(parent, name, keyed[-1])
    return keyed


def set_dropout_step(
    dropouts: Sequence[KeyedDropout], key: tuple[int, int, int], total: int, offset: int
) -> None:
    """Key the next forward pass's dropout masks by step and global batch rows."""
    for d in dropouts:
        d.key, d.rows = key, (total, offset)
