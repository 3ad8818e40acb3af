"""Typed training recipes: YAML in, validated once, errors that name the field.

A recipe says everything about a run: data, augmentation, network, optimiser, schedule and
training loop. Command-line overrides (`train.epochs=3`) are applied to the raw mapping before
validation, so an override is checked exactly like the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer import data as datalib

RECIPES_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the offending field."""


class _Strict(BaseModel):
    # Unknown keys are errors (a typo must not be silently ignored); no str->int coercion.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ----------------------------------------------------------------------------- data
class DataConfig(_Strict):
    name: Literal["fashion-mnist", "mnist", "cifar10", "imagefolder", "shapes"]
    data_dir: str | None = None
    download: bool = True
    # Images held out of training for validation; None: a tenth of the training images,
    # at least min(100, half) and at most 5000 (trainer.data.default_val_size).
    val_size: int | None = Field(None, ge=0)
    # Only imagefolder and shapes use these; the IDX and CIFAR files fix their own size.
    image_size: int | None = Field(None, ge=4, le=1024)
    channels: Literal[1, 3] | None = None
    shapes_train: int = Field(6000, ge=10)
    shapes_test: int = Field(1000, ge=10)


class AugmentConfig(_Strict):
    crop_padding: int = Field(0, ge=0, le=16)  # random translations of up to this many pixels
    # Horizontal mirror: true flips a random half of each batch; "alternate" flips a random
    # half of the images in the first epoch and then exactly the other half every other
    # epoch (airbench's derandomised flip: every image is seen both ways every two epochs).
    flip: bool | Literal["alternate"] = False
    erase_prob: float = Field(0.0, ge=0.0, le=1.0)
    erase_max_fraction: float = Field(0.25, gt=0.0, le=1.0)


# ----------------------------------------------------------------------------- model
class ConvLayer(_Strict):
    type: Literal["conv"]
    filters: int = Field(ge=1)
    kernel: int = Field(3, ge=1)
    stride: int = Field(1, ge=1)
    padding: int | Literal["same"] = "same"
    bn: bool = True
    act: Literal["relu", "gelu", "none"] = "relu"
    # "dirac": kaiming, then the first min(in, out) filters set to pass their input channel
    # through unchanged (identity initialisation, airbench)
    init: Literal["kaiming", "xavier", "dirac", "default"] = "kaiming"


class WhitenLayer(_Strict):
    """A frozen patch-whitening convolution (airbench): 2 x C x kernel^2 filters, the
    eigenvectors of the training patches' covariance scaled by 1/sqrt(eigenvalue), and their
    negatives; no padding. Set from the training images before the first step and never
    trained; its bias trains for the first `bias_epochs` epochs only (None: throughout)."""

    type: Literal["whiten"]
    kernel: int = Field(2, ge=1, le=5)
    act: Literal["relu", "gelu", "none"] = "gelu"
    bias_epochs: int | None = Field(3, ge=0)


class PoolLayer(_Strict):
    type: Literal["pool"]
    kind: Literal["max", "avg"] = "max"
    kernel: int = Field(2, ge=1)
    stride: int | None = Field(None, ge=1)  # defaults to the kernel size


class ResidualLayer(_Strict):
    """A basic ResNet block: conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    type: Literal["residual"]
    filters: int = Field(ge=1)
    stride: int = Field(1, ge=1, le=2)


class ReluLayer(_Strict):
    type: Literal["relu"]


class DropoutLayer(_Strict):
    type: Literal["dropout"]
    p: float = Field(ge=0.0, lt=1.0)


class GlobalPoolLayer(_Strict):
    type: Literal["global_pool"]
    kind: Literal["max", "avg"] = "avg"


class FlattenLayer(_Strict):
    type: Literal["flatten"]


class LinearLayer(_Strict):
    type: Literal["linear"]
    units: int = Field(ge=1)
    act: Literal["relu", "none"] = "relu"


LayerSpec = Annotated[
    ConvLayer
    | WhitenLayer
    | PoolLayer
    | ResidualLayer
    | ReluLayer
    | DropoutLayer
    | GlobalPoolLayer
    | FlattenLayer
    | LinearLayer,
    Field(discriminator="type"),
]


class ModelConfig(_Strict):
    """Either a named preset or an explicit list of layers; the classifier layer is implied."""

    preset: str | None = None
    layers: list[LayerSpec] | None = None
    classifier_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Batch norm: the running statistics' momentum (torch's convention: the weight of the
    # newest batch) and whether the scale is trained or frozen at 1 (airbench: frozen, 0.4).
    bn_momentum: float = Field(0.1, gt=0.0, le=1.0)
    bn_scale: Literal["trained", "frozen"] = "trained"

    @model_validator(mode="after")
    def _one_of(self) -> ModelConfig:
        if (self.preset is None) == (self.layers is None):
            raise ValueError("give exactly one of 'preset' or 'layers'")
        return self


# ----------------------------------------------------------------------------- optimisation
class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    # Conv filters' update: the optimiser's, or "muon": the momentum of the gradient
    # orthogonalised by Newton-Schulz iterations (filters flattened to out x in*k*k) at
    # `muon_lr`, each filter bank renormalised (trainer.optim.MuonSGD). Everything else
    # keeps SGD.
    conv_update: Literal["sgd", "muon"] = "sgd"
    muon_lr: float = Field(0.24, gt=0.0)
    muon_momentum: float = Field(0.6, ge=0.0, lt=1.0)
    # Batch-norm biases learn this many times faster, with weight decay divided by it
    # (airbench: 64, with the scale frozen).
    bn_bias_lr_scale: float = Field(1.0, gt=0.0)


class ScheduleConfig(_Strict):
    name: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # of all steps
    final_lr_fraction: float = Field(0.01, ge=0.0, le=1.0)


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1)
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    # Lookahead (airbench): every 5 steps the weights move to a slow average of themselves,
    # whose pull grows with the cube of progress and takes over entirely at the last step.
    lookahead: bool = False
    early_stopping_patience: int | None = Field(None, ge=1)
    seed: int = 0
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    bf16_autocast: bool = True  # CUDA only
    eval_batch_size: int = Field(1000, ge=1)
    # Several GPUs: normalise with the statistics of the global batch (SyncBatchNorm, which is
    # CUDA-only in torch 2.13). On CPU each process normalises with its own rows' statistics.
    sync_batchnorm: bool = False
    # Which epoch's weights the run keeps (trainer.selection): the lowest validation loss,
    # the best validation accuracy (first or latest on a tie), or the last epoch. Validation
    # loss, not accuracy, by default: on 5,000 images one point is 50 images and ties are
    # common (BENCHMARKS.md compares the rules over seeds).
    select: Literal["val_loss", "val_accuracy", "val_accuracy_latest", "last"] = "val_loss"


class ExportConfig(_Strict):
    enabled: bool = True
    repository: str = "models"
    name: str | None = None  # defaults to the dataset name
    opset: int = Field(18, ge=18)
    optimize: bool = True
    int8: bool = False
    fp16: bool = False
    max_accuracy_drop: float = Field(0.5, ge=0.0)
    # Test-time augmentation in the exported graph (trainer.tta): "mirror" doubles the
    # served compute per image, "mirror_shift" multiplies it by six.
    tta: Literal["none", "mirror", "mirror_shift"] = "none"


class Recipe(_Strict):
    name: str
    data: DataConfig
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()


# ----------------------------------------------------------------------------- loading
def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc or '<root>'}: {e['msg']}{got_text}")
    return "\n".join(lines)


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict | list):
            raise RecipeError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ("train.epochs", 3); the value is read as YAML (so 3 is an int)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected FIELD=VALUE, e.g. train.epochs=3")
    key, _, value = text.partition("=")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe path as given, or the name of a bundled recipe (`shapes`, `fashion_mnist`)."""
    p = Path(path)
    if p.exists():
        return p
    bundled = RECIPES_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if bundled.exists():
        return bundled
    raise RecipeError(f"recipe {str(path)!r} not found (bundled: {', '.join(list_recipes())})")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_from_dict(raw: dict[str, Any], overrides: list[str] = (), source: str = "") -> Recipe:
    """Validate a raw mapping (plus FIELD=VALUE overrides) into a Recipe."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy through the same YAML types
    for text in overrides:
        key, value = parse_override(text)
        try:
            _set_path(raw, key, value)
        except (IndexError, ValueError, KeyError, TypeError) as exc:
            raise RecipeError(f"override {text!r}: no such field ({exc})") from None
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None


def load_recipe_data(recipe: Recipe, data_dir: str | None = None) -> datalib.Dataset:
    """The recipe's dataset (train and test), as its data section and seed describe it;
    `data_dir` overrides data.data_dir. Raises datalib.DataError."""
    d = recipe.data
    return datalib.load_dataset(
        d.name,
        data_dir=data_dir or d.data_dir,
        download=d.download,
        image_size=d.image_size,
        channels=d.channels,
        seed=recipe.train.seed,
        shapes_train=d.shapes_train,
        shapes_test=d.shapes_test,
    )


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (path or bundled name), apply overrides, validate."""
    p = resolve_recipe_path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {p}: expected a mapping at the top level")
    return recipe_from_dict(raw, list(overrides), source=str(p))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json", exclude_none=False)
