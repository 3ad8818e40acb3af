"""The one contract between training and serving: the model version folder.

    <repository>/<name>/config.pbtxt             Triton-compatible config
    <repository>/<name>/<version>/model.onnx     uint8 NCHW `images` -> `logits`, `probabilities`
    <repository>/<name>/<version>/manifest.json  the typed `Manifest` below
    <repository>/<name>/<version>/model.{opt,int8,fp16,insight}.onnx  optional variants

A version is an all-digit folder, published by renaming a hidden one (never seen half
written). The graph carries its own preprocessing and softmax; manifest keys are stamped
into every ONNX file as `convserve.<key>` metadata_props (serving.metadata), so a bare file
describes itself. The exporter writes exactly this and the server reads exactly this; it
needs only the standard library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from serving import fields as fields_
from serving.fields import ManifestError

MANIFEST_FORMAT = "convserve.manifest/1"
MANIFEST_FILE = "manifest.json"
TRITON_CONFIG_FILE = "config.pbtxt"
INPUT_NAME = "images"
LOGITS, PROBABILITIES = OUTPUT_NAMES = ("logits", "probabilities")
# The file each `cnn-serve --variant` serves; the exporter writes the optional ones.
VARIANT_FILES = {
    "fp32": "model.onnx",
    "opt": "model.opt.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
}
MODEL_FILE = VARIANT_FILES["fp32"]
INSIGHT_FILE = "model.insight.onnx"  # stage activations as extra outputs (Explain, reports)
# A model name: a folder name that is not a version number and is safe in a URL.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# Manifest fields serving cannot do without, and those it checks whenever they are there
# (checksums, Explain's stages); the rest describe the version.
REQUIRED = ("labels", "input", "mean")
SERVED = (*REQUIRED, "files", "insight")
# Buckets of the profile the exporter records (Monitoring) and of the server's histograms of
# the same figures, so production and the test set are counted alike: the top-1 probability
# (upper bounds), and an image's mean pixel intensity in 0..1.
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
INTENSITY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
# serving.monitor's out-of-distribution score: how unusual an image's energy and logit norm
# are among the test images given the same answer (a percentile, 0..1).
OOD_SCORE = "class_percentile(energy, logit_norm)"


# ----------------------------------------------------------------------------- layout
def valid_model_name(name: str) -> bool:
    """A model folder name the server serves and the exporter may write."""
    return bool(NAME_RE.fullmatch(name))


def versions(model_dir: Path) -> list[int]:
    """Published versions of a model, ascending: all-digit folder names above 0 (the
    exporter's hidden temp folders never count)."""
    try:
        return sorted(
            v
            for p in model_dir.iterdir()
            if p.name.isdigit() and p.is_dir() and (v := int(p.name)) > 0
        )
    except OSError:
        return []


# ----------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class InputSpec:
    """What a model's `images` input takes: uint8 NCHW of this size."""

    channels: int
    height: int
    width: int
    name: str = INPUT_NAME

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def nbytes(self) -> int:
        return self.channels * self.height * self.width

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
        }

    @classmethod
    def from_dict(cls, d: Any, key: str = "input") -> InputSpec:
        if not isinstance(d, Mapping):
            raise ManifestError(key, f"must be an object, got {fields_.show(d)}")
        if d.get("dtype", "uint8") != "uint8" or d.get("layout", "NCHW") != "NCHW":
            raise ManifestError(key, f"must be uint8 NCHW, manifest says {dict(d)}")
        dims = [fields_.dim(d.get(k), f"{key}.{k}") for k in ("channels", "height", "width")]
        if dims[0] not in (1, 3) or min(dims[1:]) < 1:
            raise ManifestError(key, f"must have 1 or 3 channels and a positive size, got {dims}")
        return cls(*dims)  # the input is always INPUT_NAME: a `name` here is not read


@dataclass(frozen=True)
class Stage:
    """One extra output of model.insight.onnx: a conv stage's activation maps, with its plan
    (receptive field, jump and start of its grid in input pixels)."""

    name: str
    layer: int
    kind: str
    shape: tuple[int, int, int]
    receptive_field: int | None  # None once spatial structure is gone
    jump: int
    start: float  # input coordinate of the centre of map unit (0, 0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True, kw_only=True)
class Monitoring:
    """What the served graph did on the test set, to compare production with (serving.monitor):
    the predicted-class shares, the top-1 probability's and the input intensity's shares over
    the buckets above (the last bound is 1.0), the out-of-distribution score's tables (per
    predicted class, the test images' energy and logit-norm quantiles at 0, 1/(Q-1), ... 1;
    empty for a class no test image was given) and its threshold: the test set's
    `1 - ood_false_positive_rate` quantile of the score."""

    images: int
    class_fractions: tuple[float, ...]
    confidence_buckets: tuple[float, ...] = CONFIDENCE_BUCKETS
    confidence_fractions: tuple[float, ...]
    intensity_buckets: tuple[float, ...] = INTENSITY_BUCKETS
    intensity_fractions: tuple[float, ...]
    ood_score: str = OOD_SCORE
    ood_energy_quantiles: tuple[tuple[float, ...], ...]
    ood_norm_quantiles: tuple[tuple[float, ...], ...]
    ood_threshold: float
    ood_false_positive_rate: float

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """manifest.json, its fields in the file's order. Serving needs `labels`, `input` and
    `mean` (Explain fills occluded patches with it); the rest describes the version and may
    be absent from a manifest our exporter did not write. The reports (`parity`, `variants`,
    `rejected_variants`) and `training` (the recipe) are the exporter's to describe."""

    format: str = MANIFEST_FORMAT
    name: str = ""
    version: int = 0
    labels: tuple[str, ...]
    input: InputSpec
    outputs: tuple[str, ...] = OUTPUT_NAMES
    mean: tuple[float, ...]
    std: tuple[float, ...] | None = None
    dataset: str = ""
    test_accuracy: float | None = None  # fraction 0..1, PyTorch's (parity makes ORT's equal)
    opset: int | None = None
    exporter: str = ""  # "dynamo" | "torchscript"
    parity: dict[str, Any] | None = None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # filename -> report
    rejected_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    insight: tuple[Stage, ...] | None = None  # model.insight.onnx's stages, when written
    monitoring: Monitoring | None = None  # the test set's profile, when the exporter wrote it
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""  # UTC ISO-8601
    source_commit: str = ""
    convserve_version: str = ""
    files: dict[str, str | None] = field(default_factory=dict)  # filename -> SHA-256

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, in manifest.json's key order."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "input":
                value = value.to_dict()
            elif f.name == "insight" and value is not None:
                value = {"file": INSIGHT_FILE, "stages": [s.to_dict() for s in value]}
            elif f.name == "monitoring" and value is not None:
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any, *, ignored: list[str] | None = None) -> Manifest:
        """Validate a parsed manifest.json; ManifestError names the first bad field.

        With `ignored` (a list), a descriptive field that breaks the contract is left at its
        default and its error appended there instead (a server serves what it needs and
        reports the rest); what serving relies on (SERVED) is always checked."""
        if not isinstance(d, Mapping):
            raise ManifestError("(root)", f"must be a JSON object, got {fields_.show(d)}")
        for key in REQUIRED:
            if key not in d:
                raise ManifestError(key, "is missing")
        spec = InputSpec.from_dict(d["input"])
        labels = d["labels"]
        if not isinstance(labels, list) or not labels:
            raise ManifestError("labels", f"must be a non-empty list, got {fields_.show(labels)}")

        def get(key: str, check: Any, default: Any) -> Any:
            if d.get(key) is None:
                return default
            try:
                return check(d[key], key)
            except ManifestError as exc:
                if ignored is None or key in SERVED:
                    raise
                ignored.append(str(exc))
                return default

        return cls(
            labels=tuple(str(x) for x in labels),
            input=spec,
            mean=fields_.per_channel(d["mean"], "mean", spec.channels),
            name=get("name", fields_.text, ""),
            version=get("version", fields_.integer, 0),
            format=get("format", fields_.text, MANIFEST_FORMAT),
            outputs=get("outputs", fields_.texts, OUTPUT_NAMES),
            std=get(
                "std", lambda v, k: fields_.per_channel(v, k, spec.channels, positive=True), None
            ),
            dataset=get("dataset", fields_.text, ""),
            test_accuracy=get("test_accuracy", fields_.fraction, None),
            opset=get("opset", fields_.integer, None),
            exporter=get("exporter", fields_.text, ""),
            parity=get("parity", fields_.mapping, None),
            variants=get("variants", fields_.mapping, {}),
            rejected_variants=get("rejected_variants", fields_.mapping, {}),
            insight=get("insight", _stages, None),
            monitoring=get("monitoring", lambda v, k: _monitoring(v, k, len(labels)), None),
            training=get("training", fields_.mapping, {}),
            created_at=get("created_at", fields_.text, ""),
            source_commit=get("source_commit", fields_.text, ""),
            convserve_version=get("convserve_version", fields_.text, ""),
            files=get("files", fields_.files, {}),
        )


def read_document(version_dir: Path) -> dict[str, Any]:
    """`version_dir`/manifest.json as written. FileNotFoundError when there is none;
    ManifestError when it is not JSON."""
    try:
        return json.loads((version_dir / MANIFEST_FILE).read_text())
    except ValueError as exc:
        raise ManifestError("(root)", f"not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- field checks
def _monitoring(value: Any, key: str, classes: int) -> Monitoring:
    m = fields_.mapping(value, key)

    def shares(name: str, n: int) -> tuple[float, ...]:
        v = m.get(name)
        if not (
            isinstance(v, list) and len(v) == n and all(fields_.is_number(x) and x >= 0 for x in v)
        ):
            raise ManifestError(f"{key}.{name}", f"must list {n} shares, got {fields_.show(v)}")
        return tuple(float(x) for x in v)

    def bounds(name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        v = m.get(name, list(default))
        ok = isinstance(v, list) and v and all(map(fields_.is_number, v)) and v == sorted(set(v))
        if not (ok and v[-1] == 1.0):
            raise ManifestError(f"{key}.{name}", f"must rise to 1.0, got {fields_.show(v)}")
        return tuple(float(x) for x in v)

    def tables(name: str) -> tuple[tuple[float, ...], ...]:
        v = m.get(name)  # one row per class: empty, or Q >= 2 rising numbers (Q for all)
        ok = isinstance(v, list) and len(v) == classes and all(isinstance(r, list) for r in v)
        sizes = {len(r) for r in v if r} if ok else set()
        ok = ok and len(sizes) == 1 and min(sizes) >= 2
        if not (ok and all(all(map(fields_.is_number, r)) and r == sorted(r) for r in v)):
            what = f"must list {classes} rows of rising quantiles"
            raise ManifestError(f"{key}.{name}", f"{what}, got {fields_.show(v)}")
        return tuple(tuple(float(x) for x in r) for r in v)

    conf = bounds("confidence_buckets", CONFIDENCE_BUCKETS)
    light = bounds("intensity_buckets", INTENSITY_BUCKETS)
    fpr = "ood_false_positive_rate"
    return Monitoring(
        images=fields_.integer(m.get("images"), f"{key}.images"),
        class_fractions=shares("class_fractions", classes),
        confidence_buckets=conf,
        confidence_fractions=shares("confidence_fractions", len(conf)),
        intensity_buckets=light,
        intensity_fractions=shares("intensity_fractions", len(light)),
        ood_score=fields_.text(m.get("ood_score", OOD_SCORE), f"{key}.ood_score"),
        ood_energy_quantiles=tables("ood_energy_quantiles"),
        ood_norm_quantiles=tables("ood_norm_quantiles"),
        ood_threshold=fields_.real(m.get("ood_threshold"), f"{key}.ood_threshold"),
        ood_false_positive_rate=fields_.fraction(m.get(fpr), f"{key}.{fpr}"),
    )


def _stages(value: Any, key: str) -> tuple[Stage, ...]:
    stages = fields_.mapping(value, key).get("stages", [])
    if not isinstance(stages, list):
        raise ManifestError(f"{key}.stages", f"must be a list, got {fields_.show(stages)}")
    return tuple(_stage(s, f"{key}.stages[{i}]") for i, s in enumerate(stages))


def _stage(value: Any, key: str) -> Stage:
    s = fields_.mapping(value, key)
    shape, rf = s.get("shape"), s.get("receptive_field")
    if not (isinstance(shape, list) and len(shape) == 3):
        raise ManifestError(f"{key}.shape", f"must be [C, H, W], got {fields_.show(shape)}")
    c, h, w = (fields_.integer(d, f"{key}.shape") for d in shape)
    return Stage(
        name=fields_.text(s.get("name"), f"{key}.name"),
        layer=fields_.integer(s.get("layer", 0), f"{key}.layer"),
        kind=fields_.text(s.get("kind", ""), f"{key}.kind"),
        shape=(c, h, w),
        receptive_field=None if rf is None else fields_.integer(rf, f"{key}.receptive_field"),
        jump=fields_.integer(s.get("jump", 0), f"{key}.jump"),
        start=fields_.real(s.get("start", 0.0), f"{key}.start"),
    )
