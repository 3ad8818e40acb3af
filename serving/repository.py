"""The model repository: which versions to serve, loading them, hot swaps, and the folders.

Layout: serving.contract (`ROOT/<name>/<version>/`; versions are all-digit folder names,
which the exporter publishes by renaming a hidden folder, so half a version is never seen).
How one version is loaded and checked, and why one is refused, is serving.model's. A new
version is loaded and warmed beside the old one, then swapped in with one dict assignment on
the event loop: requests that already hold the old version finish on it; nothing is lost.

The repository is an attack surface: whoever can write to it chooses what the server runs.
A refused version is logged and counted with its reason and the old one keeps serving; a
broken one is not retried until its folder changes. Folders writable by other users are
reported loudly on every scan that finds them. A served version lives in memory: if its
folder is deleted or changed, it keeps serving (logged and counted once) until a higher
valid version loads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from serving.audit import folder_mode, writable_folders
from serving.batcher import BatchConfig, BatchObserver
from serving.contract import valid_model_name
from serving.contract import versions as published_versions
from serving.errors import FailedPrecondition, ModelLoadError, ModelNotFound, NotReady
from serving.model import Loader, ModelVersion, load
from serving.runtime import RuntimeOptions

log = logging.getLogger("convserve.repository")


@dataclass(frozen=True)
class RepositoryConfig:
    """What to serve from where (serving.settings holds the defaults)."""

    root: Path
    models: tuple[str, ...]  # empty: every model in the repository
    pinned: dict[str, tuple[int, ...]]  # name -> versions
    poll_interval_s: float  # 0: load once, never poll
    variant: str  # serving.contract.VARIANT_FILES
    max_model_bytes: int
    # Triton's --model-control-mode: poll (scan every poll_interval_s), none (load at start,
    # never again) or explicit (only what load_model asks, starting with `models`)
    control: str = "poll"


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
    def retired(self, mv: ModelVersion) -> None:
        """A swapped-out version finished what it had admitted and is gone."""

    def observer(self, model: str, version: int) -> BatchObserver | None: ...


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
        self.events = events or RepositoryEvents()
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._failed: dict[tuple[str, int], float] = {}  # (name, version) -> manifest mtime
        self.loader = Loader(runtime, batching, config.variant, config.max_model_bytes)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._poller: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._changed: set[tuple[str, int, str]] = set()  # (name, version, event) reported
        self._writable: dict[Path, str] = {}  # folder -> who may write it (last scan)
        self.last_error: str = ""
        # name -> (version, reason, message) of its latest refused version, for operators
        self.refused: dict[str, tuple[int, str, str]] = {}
        # explicit control: the models asked for (the rest of the repository is not loaded)
        self.selected: set[str] = set(config.models)

    # -- queries ---------------------------------------------------------------------
    @property
    def explicit(self) -> bool:
        return self.config.control == "explicit"

    @property
    def ready(self) -> bool:
        # Explicit control may serve nothing yet, as Triton does: ready means every model
        # asked for is loaded.
        return (self.explicit or bool(self._models)) and all(self._models.values())

    def expected_wait(self) -> float:
        """The longest a request to any loaded version would now take (see Batcher)."""
        return max(
            (mv.batcher.expected_wait() for vs in self._models.values() for mv in vs.values()),
            default=0.0,
        )

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def get(self, name: str | None = None, version: int | None = None) -> ModelVersion:
        """The version to run (latest loaded when `version` is None or 0)."""
        if not self._models:
            if self.explicit:
                raise ModelNotFound("no model is loaded (explicit model control: load one)")
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
        if self.config.poll_interval_s > 0 and self.config.control == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.scan()
            except Exception:  # a poll must never stop polling
                log.exception("repository scan failed")

    def _model_dirs(self) -> list[Path]:
        """The repository's model folders (valid names), sorted; OSError when unreadable."""
        root = self.config.root
        return sorted(p for p in root.iterdir() if p.is_dir() and valid_model_name(p.name))

    def _candidates(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        try:
            dirs = self._model_dirs()
        except OSError as exc:
            self.last_error = f"model repository {self.config.root} is not readable: {exc}"
            log.error(self.last_error)
            return out
        for mdir in dirs:
            # The --model names (only those load/unload changed, with explicit control);
            # none named: every model, unless control is explicit.
            if (self.selected or self.explicit) and mdir.name not in self.selected:
                continue
            out[mdir.name] = published_versions(mdir)[::-1]
        return out

    async def scan(self) -> None:
        """Load whatever the policy wants and is not loaded yet; swap in newer versions."""
        self._check_writable()
        self._check_served()
        for name, found in self._candidates().items():
            loaded = self._models.get(name, {})
            pinned = self.config.pinned.get(name)
            if pinned:
                for v in pinned:
                    if v in found and v not in loaded:
                        await self._try_load(name, v)
                continue
            current = max(loaded) if loaded else 0
            # Newest first; at start-up fall back to older versions until one loads.
            for v in found:
                if v <= current:
                    break
                if await self._try_load(name, v):
                    break
                if current:
                    break  # a broken new version: keep serving the current one

    # -- explicit model control (Triton's RepositoryModelLoad / Unload) --------------------
    def index(self) -> list[tuple[str, int | None, str, str]]:
        """Every model of the repository folder: (name, version, state, reason), READY for
        each version served, UNAVAILABLE (version None) with the reason for the others."""
        out: list[tuple[str, int | None, str, str]] = []
        with contextlib.suppress(OSError):
            for mdir in self._model_dirs():
                name = mdir.name
                if not published_versions(mdir):
                    continue
                served = self._models.get(name)
                if served:
                    out += [(name, v, "READY", "") for v in sorted(served)]
                else:
                    why = self.refused[name][2] if name in self.refused else "not loaded"
                    out.append((name, None, "UNAVAILABLE", why))
        return out

    async def load_model(self, name: str) -> None:
        """Serve `name` at its latest valid version (again, if it is served: newer ones are
        picked up). Explicit control only; ModelLoadError when no version could load."""
        self._controlled("load")
        if not valid_model_name(name) or not published_versions(self.config.root / name):
            raise ModelNotFound(f"no model {name!r} with a version in {self.config.root}")
        self.selected.add(name)
        self._failed = {k: v for k, v in self._failed.items() if k[0] != name}  # try again
        await self.scan()
        if name not in self._models:
            why = self.refused.get(name, (0, "other", "no version could be loaded"))
            raise ModelLoadError(f"{name}: {why[2]}", why[1])

    def unload_model(self, name: str) -> None:
        """Stop serving `name`: calls already admitted finish on it. Explicit control only."""
        self._controlled("unload")
        self.selected.discard(name)
        versions = self._models.pop(name, None)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        for mv in versions.values():
            self._retire(mv)
        log.info("unloaded %s (versions %s)", name, sorted(versions))

    def _controlled(self, what: str) -> None:
        if not self.explicit:
            raise FailedPrecondition(
                f"explicit model {what} is not allowed with --model-control-mode "
                f"{self.config.control}: start the server with --model-control-mode explicit"
            )

    def _check_writable(self) -> None:
        """Warn loudly about repository folders other users can write (whoever can write
        there chooses what this server runs); report each folder once until it changes."""
        found = writable_folders(self.config.root)
        for folder, who in found.items():
            if self._writable.get(folder) != who:
                log.warning(
                    "INSECURE model repository: %s is writable by %s users (mode %s); "
                    "anyone who can write there chooses what this server runs",
                    folder,
                    who,
                    folder_mode(folder),
                )
        self._writable = found
        counts = {"group": 0, "other": 0}
        for who in found.values():
            counts[who] += 1
        self.events.writable(counts)

    def _check_served(self) -> None:
        """A served version lives in memory; report (once) its folder vanishing or changing."""
        for name, served in self._models.items():
            for mv in served.values():
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
        t0 = time.monotonic()
        observer = self.events.observer(name, version)
        mv = await load(self.loader, self._pool, name, version, vdir, observer)
        session = mv.session
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
            "loaded %s version %d (%s, %s, %s intra-op threads) in %.2fs",
            name,
            version,
            mv.variant_file,
            session.provider,
            self.loader.runtime.intra_op_threads or "ORT's default",
            time.monotonic() - t0,
        )
        return mv

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
            self.events.retired(mv)
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
        self._pool.shutdown(wait=False)


def _stamp(vdir: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in [vdir, *vdir.iterdir()])
    except (OSError, ValueError):
        return 0.0
