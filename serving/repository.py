"""The model repository: load, validate, warm and hot-swap model versions.

Layout (the contract with the exporter): `ROOT/<name>/<version>/model.onnx + manifest.json`,
versions are all-digit folder names (the exporter writes into a dot-folder and renames, so a
half-written version is never seen). Each served version gets its own ORT session, its own
batcher and its own named executor. A new version is loaded and warmed beside the old one,
then swapped in with one dict assignment on the event loop: requests that already hold the
old version finish on it; nothing is lost. A version that fails to load is logged and
counted, and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import re
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

    def load(self, model: str, version: int, ok: bool, reason: str = "") -> None: ...
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
    path = vdir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{vdir}: no manifest.json") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    try:
        inp = manifest["input"]
        spec = InputSpec(int(inp["channels"]), int(inp["height"]), int(inp["width"]))
        labels = tuple(str(x) for x in manifest["labels"])
        if inp.get("dtype", "uint8") != "uint8" or inp.get("layout", "NCHW") != "NCHW":
            raise ModelLoadError(f"{path}: input must be uint8 NCHW, manifest says {inp}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: missing or malformed field {exc}") from None
    if not labels or spec.channels not in (1, 3) or min(spec.height, spec.width) < 1:
        raise ModelLoadError(f"{path}: labels/input spec are not usable ({spec}, {labels})")
    mean = manifest.get("mean")  # Explain fills occluded patches with it
    if not (
        isinstance(mean, list)
        and len(mean) == spec.channels
        and all(isinstance(m, int | float) and 0.0 <= m <= 1.0 for m in mean)
    ):
        raise ModelLoadError(
            f"{path}: 'mean' must list {spec.channels} training-mean value(s) in 0..1, got {mean!r}"
        )
    return manifest, spec, labels


def _check_contract(session: Session, spec: InputSpec, labels: tuple[str, ...], where: str) -> None:
    """The graph must take uint8 NCHW `images` matching the manifest and give K-way outputs."""
    if session.input_type != "tensor(uint8)":
        raise ModelLoadError(f"{where}: graph input is {session.input_type}, not tensor(uint8)")
    shape = session.input_shape
    if len(shape) != 4 or [d for d in shape[1:] if isinstance(d, int)] != list(spec.shape):
        raise ModelLoadError(f"{where}: graph input shape {shape} does not match {spec.shape}")
    for out in ("logits", "probabilities"):
        if out not in session.output_names:
            raise ModelLoadError(f"{where}: graph has no '{out}' output")
    k = session.session.get_outputs()[session.output_names.index("probabilities")].shape[-1]
    if isinstance(k, int) and k != len(labels):
        raise ModelLoadError(f"{where}: graph has {k} classes, manifest has {len(labels)} labels")


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
        self.last_error: str = ""

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
            log.error("refused %s version %d: %s", name, version, exc)
            self.events.load(name, version, ok=False, reason=str(exc))
            return False
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
            return np.stack((logits, probs), axis=1)

        batcher = Batcher(
            run, self.batching, executor, self.events.observer(name, version), f"{name}:{version}"
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
        if not path.is_file():
            raise ModelLoadError(f"{vdir}: no {fname}")
        size = path.stat().st_size
        if size > self.config.max_model_bytes:
            raise ModelLoadError(
                f"{path}: {size} bytes is over the --max-model-bytes cap "
                f"({self.config.max_model_bytes})"
            )
        data = path.read_bytes()
        digest = manifest.get("files", {}).get(fname)
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ModelLoadError(f"{path}: SHA-256 differs from manifest.json (tampered or torn)")
        try:
            # From bytes: external-data files are never followed, and a later change to
            # the folder cannot change what this version serves.
            session = Session(data, self.runtime, f"{vdir.parent.name}:{vdir.name}")
        except DeviceUnavailable:
            raise  # an explicit --device that cannot run here stops the server
        except Exception as exc:
            raise ModelLoadError(f"{path}: ONNX Runtime refused the model: {exc}") from None
        _check_contract(session, spec, labels, str(path))
        try:
            session.warmup(self.batching.max_batch_size, spec.shape)
        except Exception as exc:
            raise ModelLoadError(f"{path}: warm-up failed: {exc}") from None
        return manifest, spec, labels, session, fname

    def _open_insight(self, vdir: Path, manifest: dict[str, Any]) -> Session | None:
        """The insight graph's session, or None (then Explain returns no activations)."""
        path = vdir / INSIGHT_FILE
        if not manifest.get("insight") or not path.is_file():
            return None
        data = path.read_bytes()
        digest = manifest.get("files", {}).get(INSIGHT_FILE)
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise ModelLoadError(f"{path}: SHA-256 differs from manifest.json (tampered or torn)")
        try:
            return Session(data, self.runtime, f"{vdir.parent.name}:{vdir.name}:insight")
        except DeviceUnavailable:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{path}: ONNX Runtime refused the model: {exc}") from None

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


def _stamp(vdir: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in [vdir, *vdir.iterdir()])
    except (OSError, ValueError):
        return 0.0
