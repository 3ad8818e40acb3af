"""The data plane: the one way into the serving core, whatever the wire.

Every front end is a converter: wire request -> the plain values and types below ->
`DataPlane.predict / infer / explain / model_info / ...` -> wire response. Here, once:
admission (nothing new while draining), choosing the model version, counting and decoding a
request's images (raw uint8 tensors in one copy, small encoded images inline, big ones on the
decode executor: serving.decoding; resolving the version again if a hot swap happened
meanwhile), validating every input before it joins a batch (a bad request never fails good
ones), handing rows to the version's batcher, and, with the answer, the version's monitor
(out-of-distribution score, drift counts), a sampled capture, and the ranking. Nothing here
knows about gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serving import occlusion, v2
from serving.capture import Capture
from serving.contract import TRITON_CONFIG_FILE, InputSpec, Manifest
from serving.decoding import Decoder
from serving.errors import DeadlineExceeded, Draining, InvalidInput, ModelNotFound, Overloaded
from serving.images import ImageInput, stack_uint8
from serving.model import ModelVersion
from serving.ranking import top_k
from serving.repository import ModelRepository
from serving.shm import SharedMemory
from serving.statistics import RequestClock

if TYPE_CHECKING:
    from serving.tracing import Tracing

# A drain stops the front end once no call has arrived for this long (in this many steps of
# the event loop, each on time).
SETTLE_QUIET_S = 0.1
SETTLE_STEPS = 5


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and when it is refused (serving.settings holds the
    defaults)."""

    max_images_per_request: int
    max_explain_positions: int  # occlusion patch positions (forward passes - 1)
    shed_by_deadline: bool  # refuse at admission what the queue would make late


@dataclass(frozen=True)
class Classification:
    """Predict's answer: the top k classes of every image, most likely first."""

    model: str
    version: int
    labels: tuple[str, ...]
    indices: np.ndarray  # (N, k) int
    probabilities: np.ndarray  # (N, k) float32
    # Out-of-distribution score of each image (serving.monitor: 0..1, higher is less like
    # the test set) and whether it is above the version's threshold (False without one).
    ood_scores: np.ndarray  # (N,) float
    ood_flagged: np.ndarray  # (N,) bool


@dataclass(frozen=True)
class ExplainRequest:
    image: ImageInput
    patch: int  # 0: the server's default (a seventh of the image's side)
    stride: int  # 0: the patch size
    target: int | None  # None: the top-1 class
    stage: str  # "": no activation maps
    render_png: bool


@dataclass(frozen=True)
class Explanation:
    model: str
    version: int
    labels: tuple[str, ...]
    ranked: np.ndarray  # class indices, most probable first
    probabilities: np.ndarray  # (K,) of the unoccluded image
    heatmap: np.ndarray  # (rows, cols) probability drop when each patch is hidden
    target: int
    forward_passes: int
    overlay_png: bytes
    activations: np.ndarray | None  # (C, H, W) float32 of the requested stage


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    versions: tuple[int, ...]
    manifest: Manifest
    document: dict[str, Any]  # manifest.json as written
    provider: str
    requested_device: str
    max_batch_size: int
    stages: tuple[str, ...] = ()  # conv stages whose activation maps Explain can return
    # What Triton's ModelConfig reports: the model's config.pbtxt ("" when it has none),
    # and how this server runs it.
    config_text: str = ""
    max_queue_delay_us: int = 0
    instances: int = 1
    variant_file: str = ""

    @property
    def spec(self) -> InputSpec:
        return self.manifest.input


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        limits: Limits,
        decode_executor: concurrent.futures.Executor | None = None,
        capture: Capture | None = None,
        tracing: Tracing | None = None,
    ):
        self.repository = repository
        self.capture = capture  # a sample of answered images for retraining (None: off)
        self.tracing = tracing  # spans of calls, for the front ends (None: tracing is off)
        self.limits = limits
        self.decoder = Decoder(decode_executor)
        self.admitting = True
        self.arrivals = 0  # calls that asked for admission, admitted or not
        self.shared_memory = SharedMemory()  # regions of clients on this host

    # -- admission and readiness ------------------------------------------------------
    def admit(self, deadline: float | None = None) -> None:
        """Every front end asks before each call, before parsing anything of it: Draining
        while the server drains; Overloaded when the work already queued would outlast the
        call's deadline (a time.monotonic() value), so it is refused now, at the cost of a
        refusal, instead of timing out later at the cost of waiting in the queue."""
        self.arrivals += 1
        if not self.admitting:
            raise Draining("server is draining; retry on another replica")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("deadline passed before the call was handled")
            wait = self.repository.expected_wait() if self.limits.shed_by_deadline else 0.0
            if wait >= left:
                raise Overloaded(
                    f"overloaded: about {wait * 1e3:.0f} ms of queued work, more than the "
                    f"{left * 1e3:.0f} ms this call has left; retry later"
                )

    def stop_admitting(self) -> None:
        self.admitting = False

    async def settle(self, limit: float, quiet: float = SETTLE_QUIET_S) -> bool:
        """After stop_admitting: wait until no call has arrived for `quiet` s of an event
        loop on time (True; a late step may hide calls behind it) or `limit` s pass (False).
        A transport stopped while it holds calls not yet handed to a handler cancels them,
        and a client reads CANCELLED as its own doing; meanwhile each reaches admit() and is
        refused as draining (UNAVAILABLE: retry elsewhere)."""
        step = quiet / SETTLE_STEPS
        end = time.monotonic() + limit
        calm = 0
        while calm < SETTLE_STEPS:
            if time.monotonic() >= end:
                return False
            seen, t0 = self.arrivals, time.monotonic()
            await asyncio.sleep(step)
            on_time = time.monotonic() - t0 < 2 * step
            calm = calm + 1 if on_time and self.arrivals == seen else 0
        return True

    @property
    def ready(self) -> bool:
        """Admitting, and every selected model has a version loaded."""
        return self.admitting and self.repository.ready

    def model(self, name: str | None, version: int | None) -> ModelVersion:
        return self.repository.get(name or None, version or None)

    def model_ready(self, name: str, version: str) -> bool:
        """V2's readiness of a model (a version given as text, "" for the latest)."""
        try:
            self.model(name, v2.version_number(version))
        except ModelNotFound:
            return False
        return True

    def model_info(self, name: str | None, version: int | None) -> ModelInfo:
        mv = self.model(name, version)
        return ModelInfo(
            name=mv.name,
            version=mv.version,
            versions=tuple(self.repository.versions(mv.name)),
            manifest=mv.manifest,
            document=mv.document,
            provider=mv.session.provider,
            requested_device=mv.session.requested_device,
            max_batch_size=mv.batcher.config.max_batch_size,
            stages=tuple(mv.stages),
            config_text=read_text(mv.path.parent / TRITON_CONFIG_FILE),
            max_queue_delay_us=round(mv.batcher.config.max_queue_delay_s * 1e6),
            instances=mv.batcher.config.instances,
            variant_file=mv.variant_file,
        )

    def index(self) -> list[tuple[str, int | None, str, str]]:
        """Every model of the repository: (name, version, state, reason); READY for each
        version served, UNAVAILABLE (no version) with the reason for the others."""
        return self.repository.index()

    def served(self, name: str, version: int | None) -> list[ModelVersion]:
        """The versions a statistics call means: every version of every model (no name),
        every loaded version of a model (no version), or that one."""
        r = self.repository
        if not name:
            return [r.get(n, v) for n in r.names() for v in r.versions(n)]
        if version:
            return [self.model(name, version)]
        self.model(name, None)  # ModelNotFound when it is not served
        return [r.get(name, v) for v in r.versions(name)]

    async def load_model(self, name: str) -> None:
        await self.repository.load_model(name)

    def unload_model(self, name: str) -> None:
        self.repository.unload_model(name)

    def model_metadata(self, name: str, version: int | None) -> v2.ModelMetadata:
        mv = self.model(name, version)
        return v2.model_metadata(
            mv.name, self.repository.versions(mv.name), mv.spec, mv.num_classes
        )

    # -- inference ---------------------------------------------------------------------
    async def predict(
        self,
        name: str,
        version: int | None,
        images: Sequence[ImageInput],
        k: int,
        deadline: float | None,
        request_id: str = "",
    ) -> Classification:
        """The top `k` classes (0: 1) of every image, computed in some batch."""
        mv = self.model(name, version)
        with RequestClock(mv.statistics) as clock:
            if k < 0:
                raise InvalidInput(f"top_k must be >= 0, got {k}")
            self.check_count(len(images))  # before looking at any of them
            rows, mv = await self._rows(images, mv, name, version)
            out = await mv.batcher.submit(rows, deadline)
            clock.computed()
            scores, flagged = self._answered(mv, rows, out, request_id)
            idx, probs = top_k(out[:, 1], min(k or 1, mv.num_classes))
            return Classification(mv.name, mv.version, mv.labels, idx, probs, scores, flagged)

    async def infer(self, request: v2.InferRequest, deadline: float | None) -> v2.InferResponse:
        """A V2 inference: one input tensor in, the requested output tensors out."""
        mv = self.model(request.model, request.version)
        with RequestClock(mv.statistics) as clock:
            request = v2.read_shared(request, self.shared_memory)
            rows = v2.input_rows(request, mv.spec, self.limits.max_images_per_request)
            wanted = v2.requested_outputs(request.outputs)
            out = await mv.batcher.submit(rows, deadline)
            clock.computed()
            scores, flagged = self._answered(mv, rows, out, request.id)
            outputs = v2.outputs(out, wanted, mv.labels, scores, flagged)
            v2.write_shared(outputs, self.shared_memory)
            return v2.InferResponse(mv.name, mv.version, request.id, outputs)

    def _answered(
        self, mv: ModelVersion, rows: np.ndarray, out: np.ndarray, request_id: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """What every answered Predict and V2 inference goes through: a sample of it is
        captured (--capture-dir) and the version's monitor counts it; returns each image's
        out-of-distribution score and flag."""
        if self.capture is not None:
            self.capture.offer(mv.name, mv.version, mv.labels, rows, out[:, 1], request_id)
        return mv.monitor.observe(rows, out)

    async def explain(
        self, name: str, version: int | None, request: ExplainRequest, deadline: float | None
    ) -> Explanation:
        """Occlusion sensitivity of one image: its 1 + P rows go through the same batcher as
        Predict; a stage's activation maps come from the insight graph."""
        mv = self.model(name, version)
        image, mv = await self._image(request.image, mv, name, version)
        try:
            g = occlusion.grid(image.shape[1], image.shape[2], request.patch, request.stride)
        except occlusion.OcclusionError as exc:
            raise InvalidInput(str(exc)) from None
        if g.positions > self.limits.max_explain_positions:
            raise InvalidInput(
                f"patch_size {g.patch} with stride {g.stride} needs {g.positions} positions; "
                f"the limit is {self.limits.max_explain_positions} (use a larger stride)"
            )
        target = request.target
        if target is not None and not 0 <= target < mv.num_classes:
            raise InvalidInput(f"target_class must be in 0..{mv.num_classes - 1}, got {target}")
        stage = request.stage
        if stage and stage not in mv.stages:
            have = ", ".join(mv.stages) or "none: this version has no model.insight.onnx"
            raise InvalidInput(f"activation_stage {stage!r} is not a stage (stages: {have})")
        fill = occlusion.baseline_fill(image, occlusion.DEFAULT_FILL, mv.manifest.mean, g.patch)
        rows = occlusion.occluded_rows(image, g, fill)
        out = await mv.batcher.submit(rows, deadline)
        result = occlusion.heatmap_from(out[:, 1], g, target)
        maps = await self._activations(mv, image, stage) if stage else None
        png = occlusion.overlay_png(image, result.heatmap, g) if request.render_png else b""
        probs = result.probabilities
        return Explanation(
            model=mv.name,
            version=mv.version,
            labels=mv.labels,
            ranked=np.argsort(-probs, kind="stable"),
            probabilities=probs,
            heatmap=result.heatmap,
            target=result.target,
            forward_passes=result.forward_passes,
            overlay_png=png,
            activations=maps,
        )

    async def _activations(self, mv: ModelVersion, image: np.ndarray, stage: str) -> np.ndarray:
        session = mv.insight
        assert session is not None  # mv.stages is empty without it
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(mv.executor, session.run, image[None], (stage,))
        return np.asarray(out[0][0], dtype=np.float32)

    # -- images ------------------------------------------------------------------------
    def check_count(self, n: int) -> None:
        """InvalidInput unless a request's image count is within 1..max_images_per_request."""
        if n == 0:
            raise InvalidInput("request has no images")
        if n > self.limits.max_images_per_request:
            raise InvalidInput(
                f"request has {n} images; the limit is {self.limits.max_images_per_request}"
            )

    async def _rows(
        self, images: Sequence[ImageInput], mv: ModelVersion, name: str, version: int | None
    ) -> tuple[np.ndarray, ModelVersion]:
        """The images as one (N, C, H, W) uint8 batch for `mv`, or for the version that
        replaced it while a big decode waited on a thread."""
        rows = stack_uint8(images, mv.spec)
        if rows is not None:
            return rows, mv
        while True:
            rows = self.decoder.inline(images, mv.spec)
            if rows is not None:  # no suspension: no swap can have happened
                return rows, mv
            rows = await self.decoder.in_thread(images, mv.spec)
            # The decode awaited a thread: a hot swap may have happened meanwhile, so resolve
            # the model again (and decode again, off the loop, if its input changed).
            latest = self.model(name, version)
            if latest is mv or latest.spec == mv.spec:
                return rows, latest
            mv = latest

    async def _image(
        self, image: ImageInput, mv: ModelVersion, name: str, version: int | None
    ) -> tuple[np.ndarray, ModelVersion]:
        if image is None:
            raise InvalidInput("request has no image")
        rows, mv = await self._rows([image], mv, name, version)
        return rows[0], mv


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""
