"""`--workers N` process housekeeping that the metrics and security tests do not cover."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serving import settings as settings_module
from serving import workers as workers_module
from serving.client import Client
from serving.contract import OUTPUT_NAMES
from serving.cores import usable_cores
from serving.runboard import QUIET_NS, RunBoard, make_board_file
from serving.runtime import Session
from serving.settings import ServerSettings
from serving.workers import worker_settings
from tests.serving_helpers import (
    ServerProcess,
    free_port,
    metric_value,
    running_server,
    wait_for,
    wait_serving,
)
from tests.tiny_models import DEFAULT_LABELS, image_of_class, write_version


def test_the_parent_removes_the_metrics_folder_it_created(tmp_path: Path) -> None:
    repo, tmp = tmp_path / "models", tmp_path / "tmp"
    tmp.mkdir()
    write_version(repo, "tiny", 1)
    with running_server(repo, tmp_path, "--workers", "2", env={"TMPDIR": str(tmp)}):
        made = list(tmp.glob("convserve-prom-*"))
        assert len(made) == 1 and any(made[0].iterdir())  # the workers' metric files
        assert len(list(tmp.glob("convserve-workers-*"))) == 1  # the run board's folder
    assert not list(tmp.glob("convserve-prom-*"))  # one per server start would pile up in /tmp
    assert not list(tmp.glob("convserve-workers-*"))  # nor the run board's folder


def test_workers_serve_the_flags_main_was_given_not_the_command_line(tmp_path: Path) -> None:
    """Workers get the parent's settings: `main(argv)` called from code (here from
    `python -c`, whose sys.argv holds none of these flags) must not start workers that read
    the command line instead and serve some other repository."""
    repo = tmp_path / "models"
    write_version(repo, "tiny", 1)
    port = free_port()
    flags = ["--model-repository", str(repo), "--workers", "2", "--host", "127.0.0.1"]
    flags += ["--port", str(port), "--metrics-port", "0", "--poll-interval", "0"]
    code = f"import sys; from serving.main import main; sys.exit(main({flags!r}))"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(proc, port, 0, log_path)
    try:
        wait_serving(server)
        with Client(server.target) as client:
            image = image_of_class(2)
            assert client.predict([image])[0].label == DEFAULT_LABELS[2]
    finally:
        assert server.stop() == 0, server.log()


# ---------------------------------------------------------------- runs borrow idle cores
def test_only_a_run_alone_on_the_server_is_told_to_take_every_core(tmp_path: Path) -> None:
    path = make_board_file(tmp_path, 2)
    a, b = RunBoard(path, 2, 0), RunBoard(path, 2, 1)  # two workers' views of one board
    assert a.enter()  # nothing else in flight, and b has never run
    assert not b.enter()  # the other worker's run finds a's
    assert not a.enter()  # nor does a second lane of the first worker
    a.leave()
    a.leave()
    assert b.in_flight() == 1
    b.leave()
    assert not a.enter()  # b ran a moment ago: under load it is only between two runs
    a.leave()
    time.sleep(QUIET_NS / 1e9)  # quiet for that long: b is idle
    assert a.enter()
    a.leave()
    assert a.counts() == (4, 2) and b.counts() == (1, 0)
    assert a.in_flight() == b.in_flight() == 0


def test_lanes_of_one_worker_that_overlapped_lately_keep_their_share() -> None:
    board = RunBoard(None, 1, 0)  # one worker, --instances 2: its lanes share its slot
    for _ in range(3):  # a lone client: one run at a time, whichever lane takes it
        assert board.enter()
        board.leave()
    assert board.enter()
    assert not board.enter()  # both lanes at once: the second takes its share
    board.leave()
    board.leave()
    assert not board.enter()  # alone now, but only in a gap between the other lane's runs
    board.leave()
    time.sleep(QUIET_NS / 1e9)  # no overlap for that long: the load is gone
    assert board.enter()
    board.leave()
    assert board.counts() == (7, 5) and board.in_flight() == 0


def test_a_restarted_worker_clears_the_count_its_predecessor_left(tmp_path: Path) -> None:
    path = make_board_file(tmp_path, 2)
    RunBoard(path, 2, 1).enter()  # killed in the middle of a run: it never leaves
    other = RunBoard(path, 2, 0)
    assert not other.enter()
    other.leave()
    RunBoard(path, 2, 1)  # its successor takes the slot over
    assert other.enter()


def test_runs_borrow_idle_cores_only_where_each_gets_a_share(monkeypatch) -> None:
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 4)
    monkeypatch.setattr(workers_module, "usable_cores", lambda: 4)
    two = worker_settings(ServerSettings(workers=2), 50051, 1, "/board")
    assert two.intra_op_threads == 2 and two.runtime.wide_threads == 4
    assert (two.runtime.board, two.runtime.board_slots, two.runtime.board_slot) == ("/board", 2, 1)
    off = worker_settings(ServerSettings(workers=2, borrow_idle_cores=False), 50051)
    assert off.runtime.wide_threads == 0
    assert ServerSettings(instances=2, intra_op_threads=1).runtime.wide_threads == 4
    assert ServerSettings().runtime.wide_threads == 0  # ORT's own: a thread per core
    assert ServerSettings(intra_op_threads=1).runtime.wide_threads == 0  # one lane: as asked
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 1)
    monkeypatch.setattr(workers_module, "usable_cores", lambda: 1)
    assert worker_settings(ServerSettings(workers=2), 50051).runtime.wide_threads == 0


def test_the_wide_session_answers_the_same_bits(version_dir: Path, fashion_test) -> None:
    opts = replace(ServerSettings(device="cpu", intra_op_threads=1).runtime, wide_threads=2)
    session = Session((version_dir / "model.onnx").read_bytes(), opts, "fashion", wide=True)
    assert session.wide is not None and session.board is not None
    x = fashion_test.images[:64]
    for n in (1, 7, 32, 64):
        narrow = session.session.run(list(OUTPUT_NAMES), {"images": x[:n]})
        wide = session.wide.run(list(OUTPUT_NAMES), {"images": x[:n]})
        for a, b in zip(narrow, wide, strict=True):
            assert np.array_equal(a, b)
    assert session.board.in_flight() == 0
    session.classify(x[:8])  # through the board, and out of it
    assert session.board.in_flight() == 0


@pytest.mark.slow  # about 3 s each: a server of up to three processes
@pytest.mark.parametrize(
    "layout",
    [("--workers", "2"), ("--instances", "2", "--intra-op-threads", "1")],
    ids=["two workers", "two lanes"],
)
def test_one_client_runs_on_every_core(
    model_repository: Path, tmp_path: Path, fashion_test, layout: tuple[str, ...]
) -> None:
    """One gRPC channel is one connection, which SO_REUSEPORT gives to one worker: its runs,
    alone on the server, take the idle worker's core too, and answer as in-process ORT. One
    worker's two lanes hand a lone client's calls to one another: its runs are alone too."""
    if usable_cores() < 2:
        pytest.skip("one usable core: there is no core to borrow")
    version = model_repository / "fashion-mnist" / "1"
    sess = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    x = fashion_test.images[:32]
    want = sess.run(["probabilities"], {"images": x})[0]
    with running_server(model_repository, tmp_path, *layout) as s:
        with Client(s.target) as client:
            for _ in range(5):
                got = client.predict(list(x))
                assert [p.index for p in got] == list(want.argmax(1))
                probs = [p.classes[0].probability for p in got]
                assert np.array_equal(np.float32(probs), want.max(1))

        def counted() -> str | None:
            text = s.metrics()
            return text if metric_value(text, "convserve_cpu_runs_total", cores="all") else None

        text = wait_for("the runs in the parent's /metrics", counted)
        assert metric_value(text, "convserve_cpu_runs_total", cores="all") == 5
        assert metric_value(text, "convserve_cpu_runs_total", cores="share") == 0
