"""The one contract between training and serving: the model version folder.

    <repository>/<name>/config.pbtxt             Triton-compatible config
    <repository>/<name>/<version>/model.onnx     uint8 NCHW `images` -> `logits`, `probabilities`
    <repository>/<name>/<version>/manifest.json  the typed `Manifest` below
    <repository>/<name>/<version>/model.{opt,int8,fp16,insight}.onnx  optional variants

A version is an all-digit folder, published by renaming a hidden one (never seen half
written). The graph carries its own preprocessing and softmax; the manifest keys in
METADATA_KEYS are stamped into every ONNX file as `convserve.<key>` metadata_props, so a
bare file describes itself and a file beside the wrong manifest is caught. The exporter
writes exactly this and the server reads exactly this; it needs only the standard library.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

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

# The manifest keys stamped into every ONNX file of a version, as METADATA_PREFIX + key (JSON
# unless the value is a string), and those of them the server checks against manifest.json.
METADATA_PREFIX = "convserve."
METADATA_KEYS = ("name", "labels", "input", "mean", "std", "dataset", "test_accuracy")
METADATA_KEYS += ("convserve_version", "source_commit")
METADATA_CHECKED = ("name", "labels", "input", "mean")
# Manifest fields serving cannot do without, and those it checks whenever they are there
# (checksums, Explain's stages); the rest describe the version.
REQUIRED = ("labels", "input", "mean")
SERVED = (*REQUIRED, "files", "insight")


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
class ManifestError(ValueError):
    """A manifest that breaks the contract; the message names the field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"'{key}' {message}")
        self.key = key


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
            raise ManifestError(key, f"must be an object, got {_show(d)}")
        if d.get("dtype", "uint8") != "uint8" or d.get("layout", "NCHW") != "NCHW":
            raise ManifestError(key, f"must be uint8 NCHW, manifest says {dict(d)}")
        dims = [_dim(d.get(k), f"{key}.{k}") for k in ("channels", "height", "width")]
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
            raise ManifestError("(root)", f"must be a JSON object, got {_show(d)}")
        for key in REQUIRED:
            if key not in d:
                raise ManifestError(key, "is missing")
        spec = InputSpec.from_dict(d["input"])
        labels = d["labels"]
        if not isinstance(labels, list) or not labels:
            raise ManifestError("labels", f"must be a non-empty list, got {_show(labels)}")

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
            mean=_floats(d["mean"], "mean", spec.channels),
            name=get("name", _str, ""),
            version=get("version", _int, 0),
            format=get("format", _str, MANIFEST_FORMAT),
            outputs=get("outputs", _strs, OUTPUT_NAMES),
            std=get("std", lambda v, k: _floats(v, k, spec.channels, positive=True), None),
            dataset=get("dataset", _str, ""),
            test_accuracy=get("test_accuracy", _fraction, None),
            opset=get("opset", _int, None),
            exporter=get("exporter", _str, ""),
            parity=get("parity", _object, None),
            variants=get("variants", _object, {}),
            rejected_variants=get("rejected_variants", _object, {}),
            insight=get("insight", _stages, None),
            training=get("training", _object, {}),
            created_at=get("created_at", _str, ""),
            source_commit=get("source_commit", _str, ""),
            convserve_version=get("convserve_version", _str, ""),
            files=get("files", _files, {}),
        )


def read_document(version_dir: Path) -> dict[str, Any]:
    """`version_dir`/manifest.json as written. FileNotFoundError when there is none;
    ManifestError when it is not JSON."""
    try:
        return json.loads((version_dir / MANIFEST_FILE).read_text())
    except ValueError as exc:
        raise ManifestError("(root)", f"not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- metadata_props
def metadata_props(manifest: Manifest, variant: str) -> dict[str, str]:
    """The `convserve.*` metadata_props the exporter stamps into one file of a version: the
    manifest's METADATA_KEYS, plus which variant the file is."""
    doc = manifest.to_dict()
    props = {
        f"{METADATA_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v)
        for k in METADATA_KEYS
        for v in [doc[k]]
    }
    props[f"{METADATA_PREFIX}variant"] = variant
    return props


def metadata_disagreement(props: Mapping[str, str], manifest: Manifest) -> str | None:
    """Why a graph's `convserve.*` metadata_props disagree with its manifest (a graph from
    another version, model or dataset dropped beside it), or None. Keys a graph lacks are
    not compared: a graph not made by our exporter is judged by its inputs and outputs."""
    for key in METADATA_CHECKED:
        text = props.get(f"{METADATA_PREFIX}{key}")
        if text is None:
            continue
        ours = getattr(manifest, key)
        try:
            theirs = _metadata_value(key, text, manifest)
        except (ValueError, ManifestError):
            theirs = text
        if theirs != ours:
            shown = manifest.to_dict()[key]
            return (
                f"graph metadata {METADATA_PREFIX}{key} = {text!r} disagrees with "
                f"{MANIFEST_FILE} ({shown!r})"
            )
    return None


def _metadata_value(key: str, text: str, manifest: Manifest) -> Any:
    """A stamped value read back as the manifest field's type."""
    if key == "name":
        return text
    value = json.loads(text)
    if key == "labels":
        return tuple(str(x) for x in value) if isinstance(value, list) else value
    if key == "input":
        return InputSpec.from_dict(value)
    return _floats(value, key, manifest.input.channels)


# ----------------------------------------------------------------------------- field checks
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(key, f"must be a string, got {_show(value)}")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 17.0: JSON writers that know only floats
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(key, f"must be an integer, got {_show(value)}")
    return value


def _dim(value: Any, key: str) -> int:  # "28" too, as hand-written manifests have it
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return _int(value, key)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _float(value: Any, key: str) -> float:
    if not _number(value):
        raise ManifestError(key, f"must be a number, got {_show(value)}")
    return float(value)


def _fraction(value: Any, key: str) -> float:
    if not 0.0 <= _float(value, key) <= 1.0:
        raise ManifestError(key, f"must be a fraction in 0..1, got {_show(value)}")
    return float(value)


def _floats(value: Any, key: str, channels: int, positive: bool = False) -> tuple[float, ...]:
    """One number per channel: in 0..1 (a training mean), or above 0 (a training std)."""
    ok = (lambda v: v > 0) if positive else (lambda v: 0.0 <= v <= 1.0)
    if not (
        isinstance(value, list)
        and len(value) == channels
        and all(_number(v) and ok(v) for v in value)
    ):
        what = "positive value(s)" if positive else f"training-{key} value(s) in 0..1"
        shown = _show(value)  # a manifest's value, quoted back: clipped
        raise ManifestError(key, f"must list {channels} {what} (one per channel), got {shown}")
    return tuple(float(v) for v in value)


def _strs(value: Any, key: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ManifestError(key, f"must be a list of strings, got {_show(value)}")
    return tuple(value)


def _object(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(key, f"must be a JSON object, got {_show(value)}")
    return value


def _files(value: Any, key: str) -> dict[str, str | None]:
    """filename -> SHA-256 hex digest; None or "" for a file not checked. A digest that is
    not the file's refuses the version at load ("checksum"), whatever its form."""
    files = _object(value, key)
    for name, digest in files.items():
        if digest is not None and not isinstance(digest, str):
            raise ManifestError(f"{key}.{name}", f"must be a SHA-256 hex digest, got {digest!r}")
    return files


def _stages(value: Any, key: str) -> tuple[Stage, ...]:
    stages = _object(value, key).get("stages", [])
    if not isinstance(stages, list):
        raise ManifestError(f"{key}.stages", f"must be a list, got {_show(stages)}")
    return tuple(_stage(s, f"{key}.stages[{i}]") for i, s in enumerate(stages))


def _stage(value: Any, key: str) -> Stage:
    s = _object(value, key)
    shape, rf = s.get("shape"), s.get("receptive_field")
    if not (isinstance(shape, list) and len(shape) == 3):
        raise ManifestError(f"{key}.shape", f"must be [C, H, W], got {_show(shape)}")
    c, h, w = (_int(d, f"{key}.shape") for d in shape)
    return Stage(
        name=_str(s.get("name"), f"{key}.name"),
        layer=_int(s.get("layer", 0), f"{key}.layer"),
        kind=_str(s.get("kind", ""), f"{key}.kind"),
        shape=(c, h, w),
        receptive_field=None if rf is None else _int(rf, f"{key}.receptive_field"),
        jump=_int(s.get("jump", 0), f"{key}.jump"),
        start=_float(s.get("start", 0.0), f"{key}.start"),
    )
