"""Hostile models: the repository is an attack surface (issue #10).

A version that is hostile or broken in any one way is refused with a reason category in the
log and in metrics, and the version already served keeps answering correctly. Folders other
users can write are reported loudly. A served version lives in memory: deleting or changing
its folder is reported once and changes nothing until a higher valid version loads.

Models are tiny graphs built by hand (tests/tiny_models.py) with known answers; servers are
built in this process (tests/inprocess.py), poll a repository every 0.2 s and are spoken to
by real gRPC clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto
from prometheus_client import CollectorRegistry

from serving.client import Client
from serving.metrics import Metrics
from serving.model import REFUSALS
from serving.observers import MetricsEvents
from serving.repository import ModelRepository
from serving.runtime import Session
from serving.settings import ServerSettings
from tests.inprocess import InProcessServer, serving
from tests.serving_helpers import wait_for
from tests.tiny_models import (
    DEFAULT_LABELS,
    image_of_class,
    make_model,
    with_external_data,
    write_version,
)

MODEL = "tiny"
MAX_MODEL_BYTES = 64 * 1024
IMAGES = [image_of_class(k) for k in range(len(DEFAULT_LABELS))]


def assert_serves(server: InProcessServer, version: int, labels=DEFAULT_LABELS) -> None:
    """Predict answers every class correctly from `version`."""
    with Client(server.target) as client:
        preds = client.predict(IMAGES)
    assert [p.index for p in preds] == list(range(len(IMAGES)))
    assert [p.label for p in preds] == list(labels)
    assert {p.version for p in preds} == {version}


# ----------------------------------------------------------------------------- hostile kinds
# Each writes version `v` of MODEL into `root`, hostile in one way, and names the refusal.
def _external(location: Callable[[Path, Path], str], **kw) -> Callable[[Path, int], Path]:
    def write(root: Path, v: int) -> Path:
        outside = root / f"outside-{v}.bin"  # a real file, outside every version folder
        outside.write_bytes(np.arange(4, dtype=np.float32).tobytes())
        model = make_model()
        with_external_data(model, location(root, outside))
        links = {"ks.bin": outside} if kw.get("symlink") else None
        return write_version(root, MODEL, v, model=model, symlinks=links)

    return write


def _corrupt(cut: Callable[[bytes], bytes]) -> Callable[[Path, int], Path]:
    def write(root: Path, v: int) -> Path:
        return write_version(root, MODEL, v, model_bytes=cut(make_model().SerializeToString()))

    return write


def _graph(**knobs) -> Callable[[Path, int], Path]:
    # metadata={}: like a graph not made by our exporter, so only the contract judges it.
    return lambda root, v: write_version(root, MODEL, v, model=make_model(metadata={}, **knobs))


def _manifest(**kw) -> Callable[[Path, int], Path]:
    return lambda root, v: write_version(root, MODEL, v, **kw)


def _relabel(m: dict) -> None:
    m["labels"] = ["cat", "dog", "emu", "yak"]


def _bad_checksum(m: dict) -> None:
    m["files"]["model.onnx"] = hashlib.sha256(b"something else").hexdigest()


HOSTILE: dict[str, tuple[Callable[[Path, int], Path], str]] = {
    "external data ../": (_external(lambda root, out: f"../../{out.name}"), "external_data"),
    "external data absolute path": (_external(lambda root, out: str(out)), "external_data"),
    "external data symlink out": (
        _external(lambda root, out: "ks.bin", symlink=True),
        "external_data",
    ),
    "model file symlink out": (
        lambda root, v: write_version(
            root, MODEL, v, symlinks={"model.onnx": root / MODEL / "1" / "model.onnx"}
        ),
        "outside_folder",
    ),
    "over --max-model-bytes": (
        lambda root, v: write_version(root, MODEL, v, model=make_model(pad_bytes=MAX_MODEL_BYTES)),
        "too_large",
    ),
    "truncated protobuf": (_corrupt(lambda b: b[: len(b) // 2]), "corrupt"),
    "random bytes": (_corrupt(lambda b: np.random.default_rng(0).bytes(len(b))), "corrupt"),
    "SHA-256 differs from manifest": (_manifest(edit_manifest=_bad_checksum), "checksum"),
    "float input": (_graph(input_dtype=TensorProto.FLOAT), "contract"),
    "NHWC input": (_graph(layout="NHWC"), "contract"),
    "input of the wrong size": (_graph(shape=(1, 10, 10)), "contract"),
    "no probabilities output": (_graph(outputs=("logits",)), "contract"),
    "custom operator domain": (_graph(custom_domain="com.evil"), "custom_op"),
    "no manifest": (_manifest(write_manifest=False), "manifest"),
    "manifest not JSON": (_manifest(manifest_text="{not json"), "manifest"),
    "manifest without labels": (_manifest(edit_manifest=lambda m: m.pop("labels")), "manifest"),
    "manifest disagrees with graph metadata": (_manifest(edit_manifest=_relabel), "metadata"),
}


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory) -> Iterator[tuple[InProcessServer, Path, Iterator[int]]]:
    """One server polling every 0.2 s, serving a good version 1; each test drops the next
    (higher) version number, so each hostile version is the newest the server sees."""
    root = tmp_path_factory.mktemp("hostile") / "models"
    write_version(root, MODEL, 1)
    with serving(root, poll_interval=0.2, device="cpu", max_model_bytes=MAX_MODEL_BYTES) as s:
        yield s, root, itertools.count(2)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_version_is_refused_with_its_reason_and_the_old_one_keeps_serving(
    hostile_server, kind
):
    server, root, versions = hostile_server
    write, reason = HOSTILE[kind]
    assert reason in REFUSALS
    v = next(versions)
    failures = {"model": MODEL, "reason": reason}
    before = server.value("convserve_model_load_failures_total", **failures)
    write(root, v)
    wait_for(
        f"the refusal of version {v} as {reason}",
        lambda: f"refused {MODEL} version {v} ({reason})" in server.log(),
        every=0.05,
    )
    assert server.value("convserve_model_load_failures_total", **failures) == before + 1
    labels = {"model": MODEL, "version": str(v), "reason": reason}
    assert server.value("convserve_model_version_refused", **labels) == 1
    assert_serves(server, version=1)
    assert server.running


def test_external_data_is_never_read_from_the_working_directory(tmp_path, monkeypatch):
    """ORT resolves external data of a model loaded from bytes against the process's working
    directory, and with graph optimisation off really reads it: a model could pull in any
    file under the server's working directory. Our sessions never read external data."""
    (tmp_path / "ks.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    model = make_model()
    with_external_data(model, "ks.bin")
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # The hazard is real: plain ONNX Runtime loads the weights from the working directory.
    ort.InferenceSession(model.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    opts = ServerSettings(device="cpu", intra_op_threads=1, graph_optimization="disable").runtime
    with pytest.raises(Exception, match=r"[Ee]xternal data"):
        Session(model.SerializeToString(), opts)


def test_a_served_version_deleted_or_changed_on_disk_keeps_serving_until_a_higher_one_loads(
    tmp_path,
):
    root = tmp_path / "models"
    v1 = write_version(root, MODEL, 1)
    with serving(root, poll_interval=0.2, device="cpu") as server:
        changed = "convserve_model_files_changed_total"
        # Changed in place: the copy in memory is what serves.
        manifest = (v1 / "manifest.json").read_text()
        (v1 / "manifest.json").write_text(manifest.replace('"dark"', '"pitch"'))
        os.utime(v1 / "manifest.json", (time.time() + 5, time.time() + 5))
        was = lambda event: server.value(changed, model=MODEL, event=event)  # noqa: E731
        wait_for("the change to be reported", lambda: was("changed") == 1)
        assert_serves(server, version=1)
        # Deleted: still served from memory.
        shutil.rmtree(v1)
        wait_for("the deletion to be reported", lambda: was("deleted") == 1)
        assert_serves(server, version=1)
        for _ in range(2):  # more scans: each event is reported once
            server.call(server.app.repository.scan())
        assert was("changed") == 1
        assert was("deleted") == 1
        log = server.log()
        assert log.count(f"{v1} was deleted under the running server") == 1
        assert log.count(f"{v1} was changed under the running server") == 1
        # A higher valid version replaces it.
        labels = ("black", "grey", "silver", "white")
        write_version(root, MODEL, 2, labels=labels)
        with Client(server.target) as client:
            wait_for("version 2 to load", lambda: client.model_info()["version"] == 2)
        assert_serves(server, version=2, labels=labels)


# ----------------------------------------------------------------------------- writable folders
def _repository(root: Path) -> tuple[ModelRepository, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = ServerSettings(
        model_repository=root,
        poll_interval=0,
        device="cpu",
        intra_op_threads=1,
        max_batch_size=4,
        max_queue_size=64,
    )
    repo = ModelRepository(
        settings.repository, settings.runtime, settings.batching, MetricsEvents(Metrics(registry))
    )
    return repo, registry


def test_folders_writable_by_other_users_are_reported_loudly_but_still_served(tmp_path, caplog):
    root = tmp_path / "models"
    vdir = write_version(root, MODEL, 1)
    root.chmod(0o777)
    (root / MODEL).chmod(0o775)
    writable = "convserve_repository_writable_folders"

    async def scenario() -> None:
        repo, registry = _repository(root)
        await repo.start()  # start-up: both folders reported
        try:
            assert repo.get(MODEL).version == 1  # a warning, not a refusal
            assert registry.get_sample_value(writable, {"who": "other"}) == 1
            assert registry.get_sample_value(writable, {"who": "group"}) == 1
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert any(f"{root} is writable by other users" in w for w in warnings)
            assert any(f"{root / MODEL} is writable by group users" in w for w in warnings)
            caplog.clear()
            vdir.chmod(0o757)
            await repo.scan()  # a later scan finds the version folder too
            assert registry.get_sample_value(writable, {"who": "other"}) == 2
            assert f"{vdir} is writable by other users" in caplog.text
            assert f"{root} is writable" not in caplog.text  # already reported
            for folder in (root, root / MODEL, vdir):
                folder.chmod(0o755)
            await repo.scan()
            assert registry.get_sample_value(writable, {"who": "other"}) == 0
            assert registry.get_sample_value(writable, {"who": "group"}) == 0
        finally:
            await repo.close()

    with caplog.at_level(logging.WARNING, logger="convserve.repository"):
        asyncio.run(scenario())


def test_at_start_up_a_refused_newest_version_falls_back_and_its_reason_is_kept(tmp_path):
    """The repository keeps each model's latest refusal (version, reason, message)."""
    root = tmp_path / "models"
    write_version(root, MODEL, 1)
    HOSTILE["custom operator domain"][0](root, 2)

    async def scenario() -> None:
        repo, registry = _repository(root)
        await repo.start()
        try:
            assert repo.get(MODEL).version == 1
            version, reason, message = repo.refused[MODEL]
            assert (version, reason) == (2, "custom_op")
            assert "com.evil" in message
            labels = {"model": MODEL, "reason": "custom_op"}
            assert registry.get_sample_value("convserve_model_load_failures_total", labels) == 1
        finally:
            await repo.close()

    asyncio.run(scenario())


def test_a_manifest_field_serving_does_not_use_is_logged_not_refused_and_info_is_verbatim(
    tmp_path,
):
    """A hand-edited manifest with a descriptive field of the wrong type (a string version)
    and a key of its own still serves, as it always did: the field is named in the log, and
    GetModelInfo returns manifest.json as written, unknown keys and all."""

    def edit(man: dict) -> None:
        man["version"] = "1"
        man["owner"] = "team-a"

    write_version(tmp_path, MODEL, 1, edit_manifest=edit)
    with serving(tmp_path) as server, Client(server.target) as client:
        info = client.model_info()
        assert info["version"] == 1
        assert info["manifest"]["version"] == "1" and info["manifest"]["owner"] == "team-a"
        assert "served without these fields: 'version' must be an integer" in server.log()
