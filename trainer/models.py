"""CNNs built from a declarative layer spec, with an analytic summary.

The network takes raw uint8 NCHW pixels: its first module converts them to float and
normalises with the training mean/std, so the exported graph carries its own preprocessing
and nothing about normalisation lives anywhere else.

`plan()` walks the spec analytically (output volume, parameters, receptive field per layer);
the builder uses the same walk, so an impossible shape is reported before any tensor exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trainer.recipe import (
    ConvLayer,
    DropoutLayer,
    FlattenLayer,
    GlobalPoolLayer,
    LayerSpec,
    LinearLayer,
    ModelConfig,
    PoolLayer,
    RecipeError,
    ReluLayer,
    ResidualLayer,
    WhitenLayer,
)
from trainer.whitening import Whiten


def _conv(filters: int, kernel: int = 3, stride: int = 1, **kw) -> ConvLayer:
    return ConvLayer(type="conv", filters=filters, kernel=kernel, stride=stride, **kw)


def _pool(kind: str = "max", kernel: int = 2) -> PoolLayer:
    return PoolLayer(type="pool", kind=kind, kernel=kernel)


# Named presets. `fashion_mnist` is shaped for CPU FLOPs: the wide layers run at 14x14 and 7x7,
# where a 3x3 conv costs a quarter and a sixteenth of what it would at 28x28.
PRESETS: dict[str, tuple[LayerSpec, ...]] = {
    "lenet5": (
        _conv(6, 5, padding=2, bn=False),
        _pool("avg"),
        _conv(16, 5, padding=0, bn=False),
        _pool("avg"),
        FlattenLayer(type="flatten"),
        LinearLayer(type="linear", units=120),
        LinearLayer(type="linear", units=84),
    ),
    "resnet_small": (
        _conv(16),
        ResidualLayer(type="residual", filters=16),
        ResidualLayer(type="residual", filters=32, stride=2),
        ResidualLayer(type="residual", filters=64, stride=2),
        GlobalPoolLayer(type="global_pool", kind="avg"),
    ),
    "fashion_mnist": (
        # 16 filters at 28x28 are enough for a one-channel input and cost half of 32 in the
        # memory-bound full-resolution BN/ReLU/pool (measured: 1.2x images/s, same accuracy).
        _conv(16),
        _pool(),
        _conv(64),
        _conv(64),
        _pool(),
        _conv(128),
        _pool(),
        FlattenLayer(type="flatten"),
    ),
    "tiny": (  # for fast tests
        _conv(8),
        _pool(),
        _conv(16),
        _pool(),
        GlobalPoolLayer(type="global_pool", kind="avg"),
    ),
}


def resolve_layers(cfg: ModelConfig) -> Sequence[LayerSpec]:
    if cfg.layers is not None:
        return cfg.layers
    if cfg.preset not in PRESETS:
        raise RecipeError(
            f"model.preset: unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)})"
        )
    return PRESETS[cfg.preset]


# ----------------------------------------------------------------------------- analytic plan
@dataclass(frozen=True)
class LayerInfo:
    """One row of the summary: what a layer outputs and what one of its units can see."""

    index: int  # position in the spec; -1 for the implied classifier
    kind: str
    shape: tuple[int, ...]  # (C, H, W) for maps, (N,) for vectors
    params: int
    rf: int | None  # receptive field side in input pixels; None once spatial structure is gone
    jump: int  # distance in input pixels between adjacent units
    start: float  # input coordinate of the centre of unit (0, 0)

    @property
    def volume(self) -> str:
        if len(self.shape) == 3:
            c, h, w = self.shape
            return f"{h}x{w}x{c}"
        return str(self.shape[0])

    @property
    def is_stage(self) -> bool:
        """Conv stages are the layers whose activation maps the report and insight model show."""
        return self.kind in ("conv", "residual")


def _padding(spec: ConvLayer) -> int:
    return spec.kernel // 2 if spec.padding == "same" else spec.padding


def _conv_params(cin: int, cout: int, k: int, bn: bool) -> int:
    # with batch norm: no conv bias, BN weight + bias; without: the conv bias
    return cin * cout * k * k + (2 * cout if bn else cout)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan(
    layers: Sequence[LayerSpec], in_shape: tuple[int, int, int], num_classes: int
) -> list[LayerInfo]:
    """Walk the spec analytically. Raises RecipeError naming `model.layers[i]` on a bad shape."""
    shape: tuple[int, ...] = tuple(in_shape)
    rf, jump, start = 1, 1, 0.5
    rows: list[LayerInfo] = []

    def spatial(i: int, name: str, k: int, s: int, p: int, c: int) -> tuple[int, int, int]:
        if len(shape) != 3:
            raise RecipeError(f"model.layers[{i}] ({name}): needs a feature map, got a vector")
        _, h, w = shape
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if oh < 1 or ow < 1:
            raise RecipeError(
                f"model.layers[{i}] ({name}): kernel {k} stride {s} padding {p} does not fit "
                f"a {h}x{w} input (output would be {oh}x{ow})"
            )
        return c, oh, ow

    for i, spec in enumerate(layers):
        params = 0
        if isinstance(spec, ConvLayer):
            p = _padding(spec)
            new = spatial(i, "conv", spec.kernel, spec.stride, p, spec.filters)
            params = _conv_params(shape[0], spec.filters, spec.kernel, spec.bn)
            start += ((spec.kernel - 1) / 2 - p) * jump
            rf += (spec.kernel - 1) * jump
            jump *= spec.stride
            shape = new
        elif isinstance(spec, WhitenLayer):
            if i != 0:
                raise RecipeError(
                    f"model.layers[{i}] (whiten): whitens the input image; it must be layer 0"
                )
            k = spec.kernel
            new = spatial(i, "whiten", k, 1, 0, 2 * shape[0] * k * k)
            params = new[0] * shape[0] * k * k + new[0]
            start += (k - 1) / 2 * jump
            rf += (k - 1) * jump
            shape = new
        elif isinstance(spec, PoolLayer):
            s = spec.stride or spec.kernel
            shape = spatial(i, "pool", spec.kernel, s, 0, shape[0] if len(shape) == 3 else 0)
            start += (spec.kernel - 1) / 2 * jump
            rf += (spec.kernel - 1) * jump
            jump *= s
        elif isinstance(spec, ResidualLayer):
            cin = shape[0] if len(shape) == 3 else 0
            new = spatial(i, "residual", 3, spec.stride, 1, spec.filters)
            params = cin * spec.filters * 9 + spec.filters * spec.filters * 9 + 4 * spec.filters
            if spec.stride != 1 or cin != spec.filters:
                params += cin * spec.filters + 2 * spec.filters  # 1x1 projection + BN
            # The longer path (two 3x3 convs, padding 1) bounds what a unit sees; with
            # padding equal to half the kernel the centre offset does not move.
            rf += 2 * jump
            jump *= spec.stride
            rf += 2 * jump
            shape = new
        elif isinstance(spec, GlobalPoolLayer):
            if len(shape) != 3:
                raise RecipeError(f"model.layers[{i}] (global_pool): needs a feature map")
            shape = (shape[0],)
            rf = None
        elif isinstance(spec, FlattenLayer):
            if len(shape) == 3:
                shape = (shape[0] * shape[1] * shape[2],)
            rf = None
        elif isinstance(spec, LinearLayer):
            params = _numel(shape) * spec.units + spec.units
            shape = (spec.units,)
            rf = None
        rows.append(LayerInfo(i, spec.type, shape, params, rf, jump, start))

    n = _numel(shape)
    rows.append(
        LayerInfo(
            -1, "classifier", (num_classes,), n * num_classes + num_classes, None, jump, start
        )
    )
    return rows


def format_summary(rows: Sequence[LayerInfo], in_shape: tuple[int, int, int]) -> str:
    """The model.summary() table: layer, output volume, parameters, receptive field."""
    c, h, w = in_shape
    lines = [f"{'layer':<16}{'output':>14}{'params':>12}{'receptive field':>18}"]
    lines.append(f"{'input':<16}{f'{h}x{w}x{c}':>14}{0:>12,}{'1x1':>18}")
    for r in rows:
        name = "classifier" if r.index < 0 else f"{r.index}:{r.kind}"
        rf = f"{r.rf}x{r.rf}" if r.rf is not None else "whole image"
        lines.append(f"{name:<16}{r.volume:>14}{r.params:>12,}{rf:>18}")
    lines.append(f"{'total':<16}{'':>14}{sum(r.params for r in rows):>12,}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- modules
class Normalize(nn.Module):
    """uint8 pixels 0..255 -> float, normalised with the training mean/std (per channel)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * s))
        self.register_buffer("shift", m / s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.scale.dtype) * self.scale - self.shift


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def _activation(name: str) -> list[nn.Module]:
    return {"relu": [nn.ReLU(inplace=True)], "gelu": [nn.GELU()], "none": []}[name]


def _init_conv(conv: nn.Conv2d, how: str) -> None:
    if how in ("kaiming", "dirac"):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if how == "dirac":  # the first filters pass their input channel through
        with torch.no_grad():
            nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])
    elif how == "xavier":
        nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None and how != "default":
        nn.init.zeros_(conv.bias)


def _build_layer(spec: LayerSpec, in_shape: tuple[int, ...]) -> nn.Module:
    if isinstance(spec, ConvLayer):
        conv = nn.Conv2d(
            in_shape[0], spec.filters, spec.kernel, spec.stride, _padding(spec), bias=not spec.bn
        )
        _init_conv(conv, spec.init)
        mods: list[nn.Module] = [conv]
        if spec.bn:
            mods.append(nn.BatchNorm2d(spec.filters))
        return nn.Sequential(*mods, *_activation(spec.act))
    if isinstance(spec, WhitenLayer):
        return nn.Sequential(
            Whiten(in_shape[0], spec.kernel, spec.bias_epochs), *_activation(spec.act)
        )
    if isinstance(spec, PoolLayer):
        pool = nn.MaxPool2d if spec.kind == "max" else nn.AvgPool2d
        return pool(spec.kernel, spec.stride or spec.kernel)
    if isinstance(spec, ResidualLayer):
        return Residual(in_shape[0], spec.filters, spec.stride)
    if isinstance(spec, ReluLayer):
        return nn.ReLU()
    if isinstance(spec, DropoutLayer):
        return nn.Dropout(spec.p)
    if isinstance(spec, GlobalPoolLayer):
        pool = nn.AdaptiveMaxPool2d(1) if spec.kind == "max" else nn.AdaptiveAvgPool2d(1)
        return nn.Sequential(pool, nn.Flatten())
    if isinstance(spec, FlattenLayer):
        return nn.Flatten()
    if isinstance(spec, LinearLayer):
        lin = nn.Linear(_numel(in_shape), spec.units)
        return nn.Sequential(lin, nn.ReLU(inplace=True)) if spec.act == "relu" else lin
    raise TypeError(f"unknown layer spec {spec!r}")


class Classifier(nn.Module):
    """Normalize -> the spec's layers -> (flatten) -> [dropout] -> linear classifier."""

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        in_shape: tuple[int, int, int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        classifier_dropout: float = 0.0,
    ):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.rows = plan(layers, self.in_shape, num_classes)
        self.preprocess = Normalize(mean, std)
        shapes = [self.in_shape] + [r.shape for r in self.rows[:-1]]
        self.features = nn.ModuleList(_build_layer(s, shapes[i]) for i, s in enumerate(layers))
        last = self.rows[-2].shape if len(self.rows) > 1 else self.in_shape
        self.flatten = nn.Flatten() if len(last) == 3 else nn.Identity()
        self.dropout = nn.Dropout(classifier_dropout) if classifier_dropout else nn.Identity()
        self.classifier = nn.Linear(_numel(last), num_classes)

    @property
    def stage_indices(self) -> list[int]:
        return [r.index for r in self.rows if r.is_stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normalised(self.preprocess(x))

    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an already normalised float batch (what test-time views work on)."""
        for layer in self.features:
            x = layer(x)
        return self.classifier(self.dropout(self.flatten(x)))

    def forward_with_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits plus the activation maps of every conv stage (for insight and reports)."""
        stages = set(self.stage_indices)
        maps = []
        x = self.preprocess(x)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in stages:
                maps.append(x)
        return self.classifier(self.dropout(self.flatten(x))), maps

    def summary(self) -> str:
        return format_summary(self.rows, self.in_shape)


def build_model(
    cfg: ModelConfig,
    in_shape: tuple[int, int, int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Classifier:
    """Build the classifier a recipe describes (validated analytically first)."""
    model = Classifier(
        resolve_layers(cfg), in_shape, num_classes, mean, std, cfg.classifier_dropout
    )
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = cfg.bn_momentum
            if cfg.bn_scale == "frozen":  # stays 1: the next layer sets the scale
                bn.weight.requires_grad_(False)
    return model
