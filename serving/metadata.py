"""The `convserve.*` metadata_props the exporter stamps into every ONNX file of a version:
the manifest keys below, so a bare file describes itself, and the server's check that a
graph's stamps agree with the manifest beside it (a graph from another version, model or
dataset dropped there is refused). Standard library only, as the contract.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from serving.contract import MANIFEST_FILE, InputSpec, Manifest
from serving.fields import ManifestError, per_channel

# The manifest keys stamped into every ONNX file of a version, as METADATA_PREFIX + key (JSON
# unless the value is a string), and those of them the server checks against manifest.json.
METADATA_PREFIX = "convserve."
METADATA_KEYS = ("name", "labels", "input", "mean", "std", "dataset", "test_accuracy")
METADATA_KEYS += ("convserve_version", "source_commit")
METADATA_CHECKED = ("name", "labels", "input", "mean")


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
    return per_channel(value, key, manifest.input.channels)
