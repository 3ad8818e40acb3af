"""Publishing a version into a model repository, atomically, with its Triton config.

The version is built in a hidden `.tmp-<version>-<random>` folder inside
`<repository>/<name>/`, every file is fsynced, and the folder is renamed to its all-digit
name. A server that considers only all-digit folders never sees a half-written version. A
killed export leaves its hidden temp folder behind; it is safe to delete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from serving.contract import (
    INPUT_NAME,
    OUTPUT_NAMES,
    TRITON_CONFIG_FILE,
    valid_model_name,
    versions,
)
from trainer.atomic import fsync_dir, fsync_tree, umasked, write_atomic
from trainer.export.errors import ExportError

TRITON_MAX_BATCH_SIZE = 64


def prepare_model_dir(repository: Path, name: str, version: int | None) -> tuple[Path, int]:
    """`<repository>/<name>/`, made and proven writable, and the version to publish there
    (the next free one unless `version` is given)."""
    if not valid_model_name(name) or name.isdigit():  # a digit folder reads as a version
        raise ExportError(
            f"model name {name!r} must be letters, digits, '.', '_' or '-' "
            "(not only digits, at most 128)"
        )
    model_dir = repository / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=model_dir):  # modes do not stop root: really try
            pass
    except OSError as exc:
        raise ExportError(
            f"cannot write to model repository {repository}: {exc.strerror or exc}"
        ) from None
    if version is None:
        return model_dir, max(versions(model_dir), default=0) + 1
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    if (model_dir / str(version)).exists():
        raise ExportError(f"{model_dir / str(version)} already exists; choose another --version")
    return model_dir, version


def new_version_folder(model_dir: Path, version: int) -> Path:
    """The hidden folder a version is built in (owner-only until published)."""
    return Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))


def publish(tmp: Path, final: Path) -> None:
    """Make the built folder `tmp` appear as `final`, complete, or not at all."""
    os.chmod(tmp, umasked(0o777))  # readable by a server running as another user
    fsync_tree(tmp)
    if final.exists():
        raise ExportError(f"{final} appeared while exporting; nothing was overwritten")
    try:
        os.rename(tmp, final)  # atomic: the all-digit name appears complete or not at all
    except OSError as exc:  # ENOTEMPTY/EEXIST: another export published it first
        raise ExportError(f"could not publish {final}: {exc.strerror or exc}") from None
    fsync_dir(final.parent)


def triton_config(name: str, in_shape: tuple[int, int, int], num_classes: int) -> str:
    """A Triton model config for the ONNX Runtime backend with server-side batching."""
    dims = ", ".join(str(d) for d in in_shape)
    outputs = ",\n".join(
        f'  {{\n    name: "{o}"\n    data_type: TYPE_FP32\n    dims: [ {num_classes} ]\n  }}'
        for o in OUTPUT_NAMES
    )
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {TRITON_MAX_BATCH_SIZE}\n"
        "input [\n"
        f'  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_UINT8\n    format: FORMAT_NCHW\n'
        f"    dims: [ {dims} ]\n  }}\n"
        "]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 500\n}\n"
    )


def write_triton_config(
    model_dir: Path, name: str, in_shape: tuple[int, int, int], num_classes: int
) -> None:
    """`<model_dir>/config.pbtxt`, replaced atomically and readable by other users."""
    path = model_dir / TRITON_CONFIG_FILE
    try:
        write_atomic(path, triton_config(name, in_shape, num_classes), mode=0o666)
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc}") from None
