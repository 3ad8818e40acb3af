"""One model version: read from its folder, checked against the contract, opened in ONNX
Runtime, warmed, and given a batcher and a named executor of its own.

A version is refused, with a reason from REFUSALS (the `reason` label of the load-failure
metric), when its manifest is missing or breaks serving.contract, a file is over
--max-model-bytes, is a symlink out of the version folder or differs from the manifest's
SHA-256, the protobuf is corrupt, the graph uses external data (never read; see
serving.runtime) or operators from a custom domain (ORT has no library for them: we never
register custom-op libraries), its input/outputs break the contract, or its `convserve.*`
metadata_props disagree with the manifest. The bytes are read once and ORT opens exactly
those, so a later change to the folder cannot change what a loaded version serves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.batcher import BatchConfig, Batcher, BatchObserver
from serving.contract import (
    INSIGHT_FILE,
    MANIFEST_FILE,
    OUTPUT_NAMES,
    PROBABILITIES,
    VARIANT_FILES,
    InputSpec,
    Manifest,
    ManifestError,
    Stage,
    read_document,
)
from serving.errors import DeviceUnavailable, ModelLoadError
from serving.lanes import Lanes
from serving.metadata import metadata_disagreement
from serving.monitor import Monitor
from serving.runtime import RuntimeOptions, Session
from serving.statistics import InferenceStatistics
from serving.tracing import model_attributes

log = logging.getLogger("convserve.repository")

# Why a version was refused: the `reason` label of convserve_model_load_failures_total.
REFUSALS = (
    "manifest",  # missing, not JSON, or a field that breaks serving.contract
    "missing_file",  # the model file named by --variant is not there or not readable
    "outside_folder",  # a model file is a symlink that leaves the version folder
    "too_large",  # over --max-model-bytes
    "checksum",  # SHA-256 differs from manifest.json (tampered or torn)
    "corrupt",  # not a parseable ONNX protobuf
    "external_data",  # initializers stored outside the file
    "custom_op",  # operators ONNX Runtime does not have (custom domains)
    "contract",  # input is not uint8 NCHW `images` of the manifest's size, or outputs missing
    "metadata",  # the graph's convserve.* metadata_props disagree with manifest.json
    "warmup",  # the graph loads but fails to run
    "onnxruntime",  # any other refusal by ONNX Runtime
    "other",
)


@dataclass
class ModelVersion:
    """One loaded, warmed version: what every request for it runs against."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    document: dict[str, Any]  # manifest.json as written (GetModelInfo returns it verbatim)
    session: Session
    batcher: Batcher
    executor: Lanes  # the ORT threads: the batcher's, and the insight graph's
    variant_file: str
    insight: Session | None = None  # model.insight.onnx, when the version has one
    stamp: float = 0.0  # the folder's stamp when loaded: a later difference is reported
    statistics: InferenceStatistics = field(default_factory=InferenceStatistics)
    # What it predicts, against its test set (serving.monitor).
    monitor: Monitor = field(init=False)

    def __post_init__(self) -> None:
        self.monitor = Monitor(self.manifest)

    @property
    def spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def num_classes(self) -> int:
        return len(self.manifest.labels)

    @property
    def opset(self) -> int:
        return self.manifest.opset or 0

    @property
    def stages(self) -> dict[str, Stage]:
        """The insight graph's stage outputs by name (empty without model.insight.onnx)."""
        if self.insight is None:
            return {}
        return {s.name: s for s in self.manifest.insight or ()}


@dataclass(frozen=True)
class Opened:
    """What the blocking part of a load made: checked and warmed, not yet served."""

    manifest: Manifest
    document: dict[str, Any]  # manifest.json as written
    session: Session
    insight: Session | None
    variant_file: str


class Loader:
    """Opens version folders with one runtime, batching and variant configuration."""

    def __init__(
        self,
        runtime: RuntimeOptions,
        batching: BatchConfig,
        variant: str,
        max_model_bytes: int,
    ):
        self.runtime = runtime
        self.batching = batching
        self.variant_file = VARIANT_FILES[variant]
        self.max_model_bytes = max_model_bytes

    def open(self, vdir: Path) -> Opened:
        """The blocking part of a load (on the loader thread): read, check, open, warm.
        ModelLoadError says why a version cannot be served."""
        manifest, document = read_manifest(vdir)
        label = f"{vdir.parent.name}:{vdir.name}"
        path = vdir / self.variant_file
        session = self._session(path, manifest, label, wide=True)
        check_contract(session, manifest, str(path))
        try:
            session.warmup(self.batching.max_batch_size, manifest.input.shape)
        except Exception as exc:
            raise ModelLoadError(f"{path}: warm-up failed: {exc}", "warmup") from None
        insight = None
        if manifest.insight is not None and (vdir / INSIGHT_FILE).is_file():
            insight = self._session(vdir / INSIGHT_FILE, manifest, f"{label}:insight")
        return Opened(manifest, document, session, insight, self.variant_file)

    def serve(
        self,
        name: str,
        version: int,
        vdir: Path,
        opened: Opened,
        observer: BatchObserver | None,
    ) -> ModelVersion:
        """The loop's part: an executor and a batcher of the version's own."""
        executor = Lanes(self.batching.instances, f"ort-{name}-{version}")
        # Triton-style statistics see every batcher observation and pass it on.
        statistics = InferenceStatistics(observer)
        batcher = Batcher(
            opened.session.classify,
            self.batching,
            executor,
            statistics,
            f"{name}:{version}",
            model_attributes(name, version, opened.session.provider),
        )
        return ModelVersion(
            name,
            version,
            vdir,
            opened.manifest,
            opened.document,
            opened.session,
            batcher,
            executor,
            opened.variant_file,
            opened.insight,
            statistics=statistics,
        )

    def _session(self, path: Path, manifest: Manifest, label: str, wide: bool = False) -> Session:
        """Read one model file into memory, check it and open it in ONNX Runtime."""
        data = read_model_file(path, self.max_model_bytes)
        digest = manifest.files.get(path.name)
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ModelLoadError(
                f"{path}: SHA-256 differs from manifest.json (tampered or torn)", "checksum"
            )
        try:
            # From bytes: ORT reads exactly the bytes we checked (no external data).
            session = Session(data, self.runtime, label, wide)
        except DeviceUnavailable:
            raise  # an explicit --device that cannot run here stops the server
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: ONNX Runtime refused the model: {exc}", ort_refusal(exc)
            ) from None
        why = metadata_disagreement(session.metadata_props, manifest)
        if why:
            raise ModelLoadError(f"{path}: {why}", "metadata")
        return session


async def load(
    loader: Loader,
    pool: concurrent.futures.Executor,
    name: str,
    version: int,
    vdir: Path,
    observer: BatchObserver | None,
) -> ModelVersion:
    """Open `vdir` on `pool` (blocking work off the event loop), then serve it."""
    opened = await asyncio.get_running_loop().run_in_executor(pool, loader.open, vdir)
    return loader.serve(name, version, vdir, opened, observer)


def read_manifest(vdir: Path) -> tuple[Manifest, dict[str, Any]]:
    """The version's manifest, typed, and as written; ModelLoadError("manifest") naming the
    file and the field when serving cannot use it. Descriptive fields that break the
    contract are logged and left out: the old server served such versions, and so do we."""
    path = vdir / MANIFEST_FILE
    ignored: list[str] = []
    try:
        document = read_document(vdir)
        manifest = Manifest.from_dict(document, ignored=ignored)
    except FileNotFoundError:
        raise ModelLoadError(f"{vdir}: no {MANIFEST_FILE}", "manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not readable ({exc})", "manifest") from None
    except ManifestError as exc:
        raise ModelLoadError(f"{path}: {exc}", "manifest") from None
    if ignored:
        log.warning("%s: served without these fields: %s", path, "; ".join(ignored))
    return manifest, document


def check_contract(session: Session, manifest: Manifest, where: str) -> None:
    """The graph must take uint8 NCHW `images` matching the manifest and give K-way outputs."""
    spec = manifest.input
    if session.input_type != "tensor(uint8)":
        raise ModelLoadError(
            f"{where}: graph input is {session.input_type}, not tensor(uint8)", "contract"
        )
    shape = session.input_shape
    if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] != list(spec.shape):
        raise ModelLoadError(
            f"{where}: graph input shape {shape} does not match {spec.shape} (NCHW)", "contract"
        )
    for out in OUTPUT_NAMES:
        if out not in session.output_names:
            raise ModelLoadError(f"{where}: graph has no '{out}' output", "contract")
    k = session.output_shape(PROBABILITIES)[-1]
    if isinstance(k, int) and k != manifest.num_classes:
        raise ModelLoadError(
            f"{where}: graph has {k} classes, manifest has {manifest.num_classes} labels",
            "contract",
        )


def ort_refusal(exc: Exception) -> str:
    """The REFUSALS category of an ONNX Runtime load error (from its message)."""
    text = str(exc)
    if "External data" in text or "external data" in text:
        return "external_data"
    if "INVALID_PROTOBUF" in text or "protobuf parsing failed" in text:
        return "corrupt"
    if "is not a registered function/op" in text or "opset import for domain" in text:
        return "custom_op"
    return "onnxruntime"


def read_model_file(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, if it is a regular file inside its version folder under the cap."""
    if not path.is_file():
        raise ModelLoadError(f"{path.parent}: no {path.name}", "missing_file")
    if not path.resolve().is_relative_to(path.parent.resolve()):
        raise ModelLoadError(
            f"{path}: a symlink to {path.resolve()}, outside the version folder", "outside_folder"
        )
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ModelLoadError(
                    f"{path}: {size} bytes is over the --max-model-bytes cap ({max_bytes})",
                    "too_large",
                )
            data = f.read(max_bytes + 1)  # the file may grow after the size check
    except OSError as exc:
        raise ModelLoadError(f"{path}: not readable ({exc})", "missing_file") from None
    if len(data) > max_bytes:
        raise ModelLoadError(f"{path}: over the --max-model-bytes cap ({max_bytes})", "too_large")
    return data
