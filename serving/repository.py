"""The model repository: load, validate, warm and hot-swap model versions.

Layout (the contract with the exporter): `ROOT/<name>/<version>/model.onnx + manifest.json`,
versions are all-digit folder names (the exporter writes into a dot-folder and renames, so a
half-written version is never seen). Each served version gets its own ORT session, its own
batcher and its own named executor. A new version is loaded and warmed beside the old one,
then swapped in with one dict assignment on the event loop: requests that already hold the
old version finish on it; nothing is lost.

The repository is an attack surface: whoever can write to it chooses what the server runs.
A version is refused, with a reason from REFUSALS in the log and metrics, and the old one keeps
serving, when its manifest is missing or unusable, a file is over --max-model-bytes, is a
symlink out of the version folder or differs from the manifest's SHA-256, the protobuf is
corrupt, the graph uses external data (never read; see serving.runtime) or operators from a
custom domain (ORT has no library for them: we never register custom-op libraries), its
input/outputs break the contract, or its `convserve.*` metadata_props disagree with the
manifest. Folders writable by other users are reported loudly on every scan that finds them.
A served version lives in memory: if its folder is deleted or changed, it keeps serving
(logged and counted once) until a higher valid version loads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.batcher import BatchConfig, Batcher, BatchObserver
from serving.codec import InputSpec
from serving.errors import DeviceUnavailable, ModelLoadError, ModelNotFound, NotReady
from serving.runtime import RuntimeOptions, Session

log = logging.getLogger("convserve.repository")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VARIANT_FILES = {
    "fp32": "model.onnx",
    "opt": "model.opt.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
}
INSIGHT_FILE = "model.insight.onnx"  # stage activations as extra outputs (Explain only)
MANIFEST_FILE = "manifest.json"
# The manifest keys the exporter stamps into every ONNX file it writes, as metadata_props
# named METADATA_PREFIX + key (JSON unless the value is a string).
METADATA_PREFIX = "convserve."
METADATA_KEYS = (
    "name",
    "labels",
    "input",
    "mean",
    "std",
    "dataset",
    "test_accuracy",
    "convserve_version",
    "source_commit",
)


def metadata_props(manifest: dict[str, Any], variant: str) -> dict[str, str]:
    """The convserve.* metadata_props the exporter stamps into a file of a version (the
    manifest's METADATA_KEYS, plus which variant the file is); `_check_metadata` reads them."""
    props = {
        f"{METADATA_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v)
        for k in METADATA_KEYS
        for v in [manifest[k]]
    }
    props[f"{METADATA_PREFIX}variant"] = variant
    return props


# Why a version was refused: the `reason` label of convserve_model_load_failures_total.
REFUSALS = (
    "manifest",  # missing, not JSON, or missing/unusable fields
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
# The manifest keys the exporter also stamps into the graph that must agree with it.
METADATA_CHECKED = ("name", "labels", "input", "mean")


@dataclass(frozen=True)
class RepositoryConfig:
    root: Path
    models: tuple[str, ...] = ()  # empty: every model in the repository
    pinned: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> versions
    poll_interval_s: float = 0.0  # 0: load once, never poll
    variant: str = "fp32"
    max_model_bytes: int = 512 * 1024 * 1024


class RepositoryEvents:
    """What the repository reports (implemented by serving.metrics)."""

    def load(self, model: str, version: int, ok: bool, reason: str = "") -> None:
        """A load finished; `reason` is the refusal category (REFUSALS) when not ok."""

    def changed(self, model: str, version: int, event: str) -> None:
        """A served version's folder was `deleted` or `changed` (it keeps serving)."""

    def writable(self, folders: dict[str, int]) -> None:
        """Repository folders writable by others, counted by who ("group", "other")."""

    def swap(self, model: str, old: int | None, new: int) -> None: ...
    def info(self, mv: ModelVersion, live: bool) -> None: ...
    def observer(self, model: str, version: int) -> BatchObserver | None: ...


@dataclass
class ModelVersion:
    """One loaded, warmed version: what Predict and ModelInfer run against."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any]
    spec: InputSpec
    labels: tuple[str, ...]
    session: Session
    batcher: Batcher
    executor: concurrent.futures.ThreadPoolExecutor
    variant_file: str
    opset: int
    insight: Session | None = None  # model.insight.onnx, when the version has one
    stamp: float = 0.0  # the folder's _stamp when loaded: a later difference is reported

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        """The insight graph's stage outputs by name (manifest["insight"]["stages"])."""
        if self.insight is None:
            return {}
        return {s["name"]: s for s in (self.manifest.get("insight") or {}).get("stages", [])}

    async def infer(self, rows: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """(N, C, H, W) uint8 -> (N, 2, K): logits and probabilities per row."""
        return await self.batcher.submit(rows, deadline)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _read_manifest(vdir: Path) -> tuple[dict[str, Any], InputSpec, tuple[str, ...]]:
    path = vdir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{vdir}: no manifest.json", "manifest") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})", "manifest") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path}: not a JSON object", "manifest")
    try:
        inp = manifest["input"]
        spec = InputSpec(int(inp["channels"]), int(inp["height"]), int(inp["width"]))
        labels = tuple(str(x) for x in manifest["labels"])
        if inp.get("dtype", "uint8") != "uint8" or inp.get("layout", "NCHW") != "NCHW":
            raise ModelLoadError(
                f"{path}: input must be uint8 NCHW, manifest says {inp}", "manifest"
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: missing or malformed field {exc}", "manifest") from None
    if not labels or spec.channels not in (1, 3) or min(spec.height, spec.width) < 1:
        raise ModelLoadError(
            f"{path}: labels/input spec are not usable ({spec}, {labels})", "manifest"
        )
    mean = manifest.get("mean")  # Explain fills occluded patches with it
    if not (
        isinstance(mean, list)
        and len(mean) == spec.channels
        and all(isinstance(m, int | float) and 0.0 <= m <= 1.0 for m in mean)
    ):
        raise ModelLoadError(
            f"{path}: 'mean' must list {spec.channels} training-mean value(s) in 0..1, "
            f"got {mean!r}",
            "manifest",
        )
    return manifest, spec, labels


def _check_contract(session: Session, spec: InputSpec, labels: tuple[str, ...], where: str) -> None:
    """The graph must take uint8 NCHW `images` matching the manifest and give K-way outputs."""
    if session.input_type != "tensor(uint8)":
        raise ModelLoadError(
            f"{where}: graph input is {session.input_type}, not tensor(uint8)", "contract"
        )
    shape = session.input_shape
    if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] != list(spec.shape):
        raise ModelLoadError(
            f"{where}: graph input shape {shape} does not match {spec.shape} (NCHW)", "contract"
        )
    for out in ("logits", "probabilities"):
        if out not in session.output_names:
            raise ModelLoadError(f"{where}: graph has no '{out}' output", "contract")
    k = session.session.get_outputs()[session.output_names.index("probabilities")].shape[-1]
    if isinstance(k, int) and k != len(labels):
        raise ModelLoadError(
            f"{where}: graph has {k} classes, manifest has {len(labels)} labels", "contract"
        )


def _check_metadata(session: Session, manifest: dict[str, Any], where: str) -> None:
    """The exporter stamps manifest keys into the graph's metadata_props (`convserve.KEY`):
    a graph from another version, model or dataset dropped beside this manifest disagrees.
    A graph without them (not made by our exporter) is judged by the contract alone."""
    props = session.session.get_modelmeta().custom_metadata_map
    for key in METADATA_CHECKED:
        text = props.get(f"{METADATA_PREFIX}{key}")
        if text is None:
            continue
        try:
            value = text if key == "name" else json.loads(text)
        except ValueError:
            value = text
        if value != manifest.get(key):
            raise ModelLoadError(
                f"{where}: graph metadata convserve.{key} = {text!r} disagrees with "
                f"manifest.json ({manifest.get(key)!r})",
                "metadata",
            )


def _ort_refusal(exc: Exception) -> str:
    """The REFUSALS category of an ONNX Runtime load error (from its message)."""
    text = str(exc)
    if "External data" in text or "external data" in text:
        return "external_data"
    if "INVALID_PROTOBUF" in text or "protobuf parsing failed" in text:
        return "corrupt"
    if "is not a registered function/op" in text or "opset import for domain" in text:
        return "custom_op"
    return "onnxruntime"


class ModelRepository:
    """Serves every selected model at its latest (or pinned) versions, polling for new ones."""

    def __init__(
        self,
        config: RepositoryConfig,
        runtime: RuntimeOptions,
        batching: BatchConfig,
        events: RepositoryEvents | None = None,
    ):
        self.config = config
        self.runtime = runtime
        self.batching = batching
        self.events = events or RepositoryEvents()
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._failed: dict[tuple[str, int], float] = {}  # (name, version) -> manifest mtime
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._poller: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._changed: set[tuple[str, int, str]] = set()  # (name, version, event) reported
        self._writable: dict[Path, str] = {}  # folder -> who may write it (last scan)
        self.last_error: str = ""
        # name -> (version, reason, message) of its latest refused version, for operators
        self.refused: dict[str, tuple[int, str, str]] = {}

    # -- queries ---------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self._models) and all(self._models.values())

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def get(self, name: str | None = None, version: int | None = None) -> ModelVersion:
        """The version to run (latest loaded when `version` is None or 0)."""
        if not self._models:
            raise NotReady("no model is loaded yet; retry shortly")
        if not name:
            if len(self._models) != 1:
                names = ", ".join(self.names()) or "none loaded"
                raise ModelNotFound(f"request must name a model (served: {names})")
            name = next(iter(self._models))
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not served (served: {', '.join(self.names())})")
        if not version:
            return versions[max(versions)]
        mv = versions.get(version)
        if mv is None:
            have = ", ".join(str(v) for v in sorted(versions))
            raise ModelNotFound(f"model {name!r} has no version {version} loaded (loaded: {have})")
        return mv

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """First scan (loads and warms everything selected), then poll if configured."""
        await self.scan()
        if self.config.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.scan()
            except Exception:  # a poll must never stop polling
                log.exception("repository scan failed")

    def _candidates(self) -> dict[str, list[int]]:
        root = self.config.root
        out: dict[str, list[int]] = {}
        try:
            entries = sorted(p for p in root.iterdir() if p.is_dir())
        except OSError as exc:
            self.last_error = f"model repository {root} is not readable: {exc}"
            log.error(self.last_error)
            return out
        for mdir in entries:
            name = mdir.name
            if not NAME_RE.match(name) or (self.config.models and name not in self.config.models):
                continue
            try:
                versions = sorted(
                    (int(v.name) for v in mdir.iterdir() if v.name.isdigit() and v.is_dir()),
                    reverse=True,
                )
            except OSError:
                continue
            out[name] = [v for v in versions if v > 0]
        return out

    async def scan(self) -> None:
        """Load whatever the policy wants and is not loaded yet; swap in newer versions."""
        self._check_writable()
        self._check_served()
        for name, versions in self._candidates().items():
            loaded = self._models.get(name, {})
            pinned = self.config.pinned.get(name)
            if pinned:
                for v in pinned:
                    if v in versions and v not in loaded:
                        await self._try_load(name, v)
                continue
            current = max(loaded) if loaded else 0
            # Newest first; at start-up fall back to older versions until one loads.
            for v in versions:
                if v <= current:
                    break
                if await self._try_load(name, v):
                    break
                if current:
                    break  # a broken new version: keep serving the current one

    def _check_writable(self) -> None:
        """Warn loudly about repository folders other users can write (whoever can write
        there chooses what this server runs); report each folder once until it changes."""
        found = _writable_folders(self.config.root)
        for folder, who in found.items():
            if self._writable.get(folder) != who:
                log.warning(
                    "INSECURE model repository: %s is writable by %s users (mode %s); "
                    "anyone who can write there chooses what this server runs",
                    folder,
                    who,
                    _mode(folder),
                )
        self._writable = found
        counts = {"group": 0, "other": 0}
        for who in found.values():
            counts[who] += 1
        self.events.writable(counts)

    def _check_served(self) -> None:
        """A served version lives in memory; report (once) its folder vanishing or changing."""
        for name, versions in self._models.items():
            for mv in versions.values():
                if mv.path.is_dir():
                    if _stamp(mv.path) == mv.stamp:
                        continue
                    event = "changed"
                else:
                    event = "deleted"
                if (name, mv.version, event) in self._changed:
                    continue
                self._changed.add((name, mv.version, event))
                log.warning(
                    "%s version %d: its folder %s was %s under the running server; still "
                    "serving the copy loaded in memory until a higher valid version loads",
                    name,
                    mv.version,
                    mv.path,
                    event,
                )
                self.events.changed(name, mv.version, event)

    async def _try_load(self, name: str, version: int) -> bool:
        vdir = self.config.root / name / str(version)
        stamp = _stamp(vdir)
        if self._failed.get((name, version)) == stamp:
            return False  # already failed in this exact state; don't retry every poll
        try:
            mv = await self._load(name, version, vdir)
        except ModelLoadError as exc:
            self._failed[(name, version)] = stamp
            self.last_error = str(exc)
            self.refused[name] = (version, exc.refusal, str(exc))
            log.error("refused %s version %d (%s): %s", name, version, exc.refusal, exc)
            self.events.load(name, version, ok=False, reason=exc.refusal)
            return False
        mv.stamp = stamp
        if self.refused.get(name, (version + 1,))[0] <= version:
            del self.refused[name]
        self.events.load(name, version, ok=True)
        self._install(mv)
        return True

    async def _load(self, name: str, version: int, vdir: Path) -> ModelVersion:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        manifest, spec, labels, session, fname = await loop.run_in_executor(
            self._loader, self._open, vdir
        )
        insight = await loop.run_in_executor(self._loader, self._open_insight, vdir, manifest)
        executor = concurrent.futures.ThreadPoolExecutor(
            self.batching.instances, thread_name_prefix=f"ort-{name}-{version}"
        )

        def run(x: np.ndarray) -> np.ndarray:
            logits, probs = session.run(x, ("logits", "probabilities"))
            # np.stack is pure Python around this (~7 against ~3 us on every run)
            out = np.empty((len(probs), 2, probs.shape[1]), dtype=probs.dtype)
            out[:, 0] = logits
            out[:, 1] = probs
            return out

        batcher = Batcher(
            run, self.batching, executor, self.events.observer(name, version), f"{name}:{version}"
        )
        # Once per version: its insight session, if any, fell back for the same reason.
        if session.fallback:
            log.warning(
                "FALLBACK: %s version %d: %s; serving on %s",
                name,
                version,
                session.fallback,
                session.provider,
            )
        log.info(
            "loaded %s version %d (%s, %s) in %.2fs",
            name,
            version,
            fname,
            session.provider,
            time.monotonic() - t0,
        )
        return ModelVersion(
            name,
            version,
            vdir,
            manifest,
            spec,
            labels,
            session,
            batcher,
            executor,
            fname,
            int(manifest.get("opset", 0)),
            insight,
        )

    def _open(self, vdir: Path) -> tuple[dict, InputSpec, tuple[str, ...], Session, str]:
        """Blocking part of a load (runs on the loader thread): read, check, session, warm."""
        manifest, spec, labels = _read_manifest(vdir)
        fname = VARIANT_FILES[self.config.variant]
        path = vdir / fname
        session = self._session(path, manifest, f"{vdir.parent.name}:{vdir.name}")
        _check_contract(session, spec, labels, str(path))
        try:
            session.warmup(self.batching.max_batch_size, spec.shape)
        except Exception as exc:
            raise ModelLoadError(f"{path}: warm-up failed: {exc}", "warmup") from None
        return manifest, spec, labels, session, fname

    def _open_insight(self, vdir: Path, manifest: dict[str, Any]) -> Session | None:
        """The insight graph's session, or None (then Explain returns no activations)."""
        path = vdir / INSIGHT_FILE
        if not manifest.get("insight") or not path.is_file():
            return None
        return self._session(path, manifest, f"{vdir.parent.name}:{vdir.name}:insight")

    def _session(self, path: Path, manifest: dict[str, Any], label: str) -> Session:
        """Read one model file into memory, check it and open it in ONNX Runtime."""
        data = _read_model_file(path, self.config.max_model_bytes)
        digest = (manifest.get("files") or {}).get(path.name)
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ModelLoadError(
                f"{path}: SHA-256 differs from manifest.json (tampered or torn)", "checksum"
            )
        try:
            # From bytes: a later change to the folder cannot change what this version
            # serves, and ORT reads exactly the bytes we checked (no external data).
            session = Session(data, self.runtime, label)
        except DeviceUnavailable:
            raise  # an explicit --device that cannot run here stops the server
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: ONNX Runtime refused the model: {exc}", _ort_refusal(exc)
            ) from None
        _check_metadata(session, manifest, str(path))
        return session

    def _install(self, mv: ModelVersion) -> None:
        versions = self._models.setdefault(mv.name, {})
        old = None if self.config.pinned.get(mv.name) else (max(versions) if versions else None)
        if old is None:
            versions[mv.version] = mv
        else:
            # One assignment swaps the whole mapping; callers that already hold the old
            # version finish on it.
            self._models[mv.name] = {mv.version: mv}
            self._retire(versions[old])
        self.events.info(mv, live=True)
        self.events.swap(mv.name, old, mv.version)

    def _retire(self, mv: ModelVersion) -> None:
        self.events.info(mv, live=False)

        async def drain() -> None:
            await mv.batcher.close(timeout=60.0)
            mv.executor.shutdown(wait=False)
            log.info("retired %s version %d", mv.name, mv.version)

        task = asyncio.get_running_loop().create_task(drain())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, timeout: float | None = None) -> None:
        """Stop polling; let every batcher finish what it admitted (bounded by `timeout`)."""
        if self._poller is not None:
            self._poller.cancel()
        batchers = [mv.batcher for vs in self._models.values() for mv in vs.values()]
        await asyncio.gather(*(b.close(timeout) for b in batchers))
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for vs in self._models.values():
            for mv in vs.values():
                mv.executor.shutdown(wait=False)
        self._loader.shutdown(wait=False)


def _read_model_file(path: Path, max_bytes: int) -> bytes:
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


def _writable_folders(root: Path) -> dict[Path, str]:
    """Root, model and version folders that users other than the owner may write:
    folder -> "other" (world-writable) or "group"."""
    out: dict[Path, str] = {}
    folders = [root]
    try:
        for mdir in root.iterdir():
            if mdir.is_dir() and not mdir.name.startswith("."):
                folders.append(mdir)
                folders += [v for v in mdir.iterdir() if v.name.isdigit() and v.is_dir()]
    except OSError:
        pass
    for folder in folders:
        try:
            mode = folder.stat().st_mode
        except OSError:
            continue
        if mode & stat.S_IWOTH:
            out[folder] = "other"
        elif mode & stat.S_IWGRP:
            out[folder] = "group"
    return out


def _mode(path: Path) -> str:
    try:
        return stat.filemode(path.stat().st_mode)
    except OSError:
        return "?"


def _stamp(vdir: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in [vdir, *vdir.iterdir()])
    except (OSError, ValueError):
        return 0.0
