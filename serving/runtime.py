"""ONNX Runtime sessions: execution providers, fallback detection, session options, warm-up.

ONNX Runtime silently falls back to the CPU when the CUDA provider cannot load. We compare
the providers a session actually got with those we asked for: `auto` records the fallback
(the repository logs it once per version) and reports the active provider everywhere; an
explicit `cuda` fails at start-up. `auto` asks for CUDA only where one probe found it loads.
Models are loaded from bytes held in memory, so a version folder deleted or replaced under
a running server cannot change what it serves. External data is never read: ORT resolves an
external-data `location` of a model loaded from bytes against the process's working directory
(with graph optimisation off it really reads it), so every session points its external-data
folder at an empty private directory, where every reference fails.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace

import numpy as np
import onnxruntime as ort
from onnxruntime.datasets import get_example

from serving.contract import OUTPUT_NAMES
from serving.errors import DeviceUnavailable, InferenceFailed
from serving.runboard import RunBoard, board_for

log = logging.getLogger("convserve.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

GRAPH_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


SPINNING = ("run", "off", "always")


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are made (serving.settings holds the defaults)."""

    device: str  # auto | cpu | cuda | cuda:N | tensorrt
    intra_op_threads: int  # 0: ORT's default (one per core)
    inter_op_threads: int
    graph_optimization: str  # GRAPH_OPT_LEVELS
    # "run": intra-op workers spin between the parallel sections of one run and stop when
    # the run ends, so they hand work over without a futex wake-up per convolution and
    # burn no core between requests (BENCHMARKS.md: batch 1 0.36 -> 0.23 ms in a loop).
    # "off": they block after every section; "always": ORT's default, they keep spinning
    # after a run and take the cores gRPC and Python need on a small machine.
    spinning: str
    # serving.runboard: a CPU run that finds no other run in flight on the server takes a
    # session of this many intra-op threads (0: there is no such session), judged by the
    # board in this file ("": private to the process), this process writing slot board_slot.
    wide_threads: int = 0
    board: str = ""
    board_slots: int = 1
    board_slot: int = 0


def _device_id(device: str) -> int:
    _, _, idx = device.partition(":")
    return int(idx) if idx else 0


def requested_providers(device: str) -> list[tuple[str, dict[str, str]]]:
    """The provider list (with options) to ask ORT for, best first."""
    if device == "cpu":
        return [(CPU, {})]
    if device == "tensorrt":
        return [(TENSORRT, {}), (CUDA, {}), (CPU, {})]
    if device == "auto" or device.startswith("cuda"):
        return [(CUDA, {"device_id": str(_device_id(device))}), (CPU, {})]
    raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or tensorrt, got {device!r}")


def _preload_cuda_libraries() -> None:
    # onnxruntime-gpu >= 1.21 can load CUDA/cuDNN shipped as pip packages (nvidia-*).
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # missing wheels are reported by the fallback check
            log.debug("onnxruntime.preload_dlls() failed: %s", exc)


ORT_DEFAULT_LOGGER_SEVERITY = 2  # WARNING: ORT's own default; it has no getter to restore from
ORT_FATAL = 4


@functools.cache
def cuda_load_failure(device_id: int) -> str | None:
    """Why ONNX Runtime cannot start its CUDA provider on GPU `device_id` here, or None if it can.

    onnxruntime-gpu lists CUDA as available even where libcudart or the GPU is missing, and
    a session that asks for it then falls back after ORT's default logger prints a red
    `[E:onnxruntime...]` line (plain text, whatever --log-format says) for every session.
    So `auto` asks once, with a session of ORT's own one-node example and that logger
    silenced for the probe only: it runs before the first `auto` session opens, so no
    message about a model of ours can be lost (a model that fails still raises, and the
    repository logs it). preload_dlls print()s each library it cannot load; their names
    become our reason instead of lines on stdout.
    """
    printed = io.StringIO()
    so = ort.SessionOptions()
    so.log_severity_level = ORT_FATAL
    # Where the CUDA libraries load but no GPU answers, ORT's Python wrapper print()s its
    # "EP Error ... Falling back" too: the probe's stdout is captured whole.
    with contextlib.redirect_stdout(printed):
        _preload_cuda_libraries()
        ort.set_default_logger_severity(ORT_FATAL)
        try:
            probe = ort.InferenceSession(
                get_example("mul_1.onnx"),
                sess_options=so,
                providers=[(CUDA, {"device_id": str(device_id)}), (CPU, {})],
            )
        finally:
            ort.set_default_logger_severity(ORT_DEFAULT_LOGGER_SEVERITY)
    if probe.get_providers()[0] == CUDA:
        return None
    log.debug("CUDA probe: preload_dlls printed %r", printed.getvalue())
    missing = re.findall(r"^Failed to load (\S+):", printed.getvalue(), re.MULTILINE)
    if missing:
        names = ", ".join(os.path.basename(m) for m in missing)
        return f"{CUDA} failed to load (cannot load {names})"
    return f"{CUDA} failed to load (no GPU, or missing CUDA/cuDNN libraries)"


def session_options(opts: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.graph_optimization_level = GRAPH_OPT_LEVELS[opts.graph_optimization]
    so.log_severity_level = 3  # our own log says what matters
    # Memory (RELIABILITY.md, `make bench-arena`): keep ORT's CPU arena, extended by powers
    # of two, and memory patterns. Warm-up runs the largest batch, so the arena reaches its
    # steady size before the first request (RSS +0.05% and +0.95% over 1500 random-size
    # batches in two runs), and it was the fastest. kSameAsRequested (an env allocator) held
    # 10 MiB more; patterns off saved 6 MiB but ran 20% slower; no arena let malloc's
    # fragmentation grow RSS 7% in one run.
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    if opts.spinning not in SPINNING:
        raise ValueError(f"spinning must be one of {SPINNING}, got {opts.spinning!r}")
    spin = "0" if opts.spinning == "off" else "1"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")  # one inter-op thread
    so.add_session_config_entry(
        "session.force_spinning_stop", "1" if opts.spinning == "run" else "0"
    )
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", _no_external_data_dir().name
    )
    return so


@functools.cache
def _no_external_data_dir() -> tempfile.TemporaryDirectory:
    """An empty folder only this process can write (removed at exit): the only place ORT
    may look for external data, so every external-data reference fails to resolve."""
    return tempfile.TemporaryDirectory(prefix="convserve-no-external-data-")


class Session:
    """One ORT session on the chosen device, with the provider it really got."""

    def __init__(
        self, model_bytes: bytes, opts: RuntimeOptions, label: str = "model", wide: bool = False
    ):
        self.requested_device = opts.device
        wanted = requested_providers(opts.device)
        first_wanted = wanted[0][0]
        built = set(ort.get_available_providers())
        usable, known_failure = set(built), None
        if opts.device == "auto" and CUDA in built:
            known_failure = cuda_load_failure(_device_id(opts.device))
            if known_failure:
                usable.discard(CUDA)
        elif first_wanted in (CUDA, TENSORRT):
            _preload_cuda_libraries()  # explicit: ORT's own messages say why it cannot load
        providers = [(p, o) for p, o in wanted if p in usable] or [(CPU, {})]
        self.session = ort.InferenceSession(
            model_bytes, sess_options=session_options(opts), providers=providers
        )
        active = self.session.get_providers()
        self.provider = active[0]
        # Why this session runs on another provider than the first it wanted (None: it did not).
        self.fallback: str | None = None
        if self.provider != first_wanted:
            if first_wanted not in built:
                reason = f"{first_wanted} is not available in this onnxruntime build"
            else:
                reason = known_failure or (
                    f"{first_wanted} failed to load (missing CUDA/cuDNN libraries or no GPU)"
                )
            if opts.device != "auto":
                raise DeviceUnavailable(
                    f"--device {opts.device} was requested but {reason}; "
                    f"ONNX Runtime would run {label} on {self.provider}"
                )
            self.fallback = f"--device auto wanted {first_wanted} but {reason}"
        self.on_gpu = self.provider in (CUDA, TENSORRT)
        # A second session of all the server's cores for runs alone on it (`wide`: the
        # batcher's session; serving.runboard). It blocks between parallel sections.
        self.wide: ort.InferenceSession | None = None
        self.board: RunBoard | None = None
        if wide and not self.on_gpu and opts.wide_threads > opts.intra_op_threads > 0:
            so = session_options(replace(opts, intra_op_threads=opts.wide_threads, spinning="off"))
            self.wide = ort.InferenceSession(model_bytes, sess_options=so, providers=[CPU])
            self.board = board_for(opts.board, opts.board_slots, opts.board_slot)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_type = inp.type
        self.input_shape = inp.shape
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def metadata_props(self) -> dict[str, str]:
        """The graph's metadata_props (serving.contract reads the convserve.* ones)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def output_shape(self, name: str) -> list[int | str | None]:
        """An output's declared shape (symbolic dimensions as their names)."""
        return self.session.get_outputs()[self.output_names.index(name)].shape

    def run(self, images: np.ndarray, outputs: tuple[str, ...] = ("probabilities",)) -> list:
        """Run a uint8 NCHW batch; a failure is InferenceFailed with ORT's reason."""
        try:
            if self.on_gpu:
                return self._run_bound(images, outputs)
            if self.board is None:
                return self.session.run(list(outputs), {self.input_name: images})
            session = self.wide if self.board.enter() else self.session
            try:
                return session.run(list(outputs), {self.input_name: images})
            finally:
                self.board.leave()
        except Exception as exc:
            raise InferenceFailed(f"inference failed: {exc}") from exc

    def classify(self, images: np.ndarray) -> np.ndarray:
        """A batcher's run: uint8 NCHW rows -> (N, 2, K) float32, logits then probabilities."""
        logits, probs = self.run(images, OUTPUT_NAMES)
        # np.stack is pure Python around this (~7 against ~3 us on every run)
        out = np.empty((len(probs), 2, probs.shape[1]), dtype=probs.dtype)
        out[:, 0] = logits
        out[:, 1] = probs
        return out

    def _run_bound(self, images: np.ndarray, outputs: tuple[str, ...]) -> list:
        # IO binding: the input is copied to the device once and outputs are fetched once.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, images)
        for name in outputs:
            binding.bind_output(name, "cuda", _device_id(self.requested_device))
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def warmup(self, max_batch_size: int, shape: tuple[int, int, int]) -> None:
        """Run batch 1 and max batch once (in each session) so the first request pays no
        allocation cost."""
        for n in sorted({1, max_batch_size}):
            x = np.zeros((n, *shape), dtype=np.uint8)
            if self.wide is None:
                self.run(x)
                continue
            for session in (self.session, self.wide):  # not through the board: both
                try:
                    session.run(["probabilities"], {self.input_name: x})
                except Exception as exc:
                    raise InferenceFailed(f"inference failed: {exc}") from exc
