"""Transport and access: TLS, mutual TLS, certificate rotation, bearer tokens, the probe port.

Servers serve a tiny model (tests/tiny_models.py), each started once, built in this process
(tests/inprocess.py) and spoken to by real gRPC clients, `cnn-predict` and `cnn-bench`:

- `tls_server`: TLS (server certificate only), a token file, a health port;
- `mtls_server`: mutual TLS, a health port, no tokens.

`cnn-serve` processes only for what a process does: `mtls_workers` (`--workers 2`, mutual
TLS) re-reads its certificates on SIGHUP in every worker; /metrics binds where it is told;
bad credentials stop start-up with exit code 3.

Certificates are made at test time (tests/certs.py); no key is ever committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.client import TLS, Client, PredictionError
from serving.probe import check
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc
from serving.proto.inference import grpc_predict_v2_pb2 as v2
from serving.proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.certs import CA
from tests.inprocess import InProcessServer, serving
from tests.serving_helpers import (
    ROOT,
    ServerProcess,
    free_port,
    start_server,
    wait_for,
    wait_serving,
)
from tests.tiny_models import image_of_class, write_version

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
TOKENS = "# test tokens\ntok-all\n\ntok-infer inference\ntok-meta metadata\n"
GREY = image_of_class(2)  # the tiny model answers class 2 ("mid") for it


@dataclass
class Secured:
    """A running server and the files its clients need (`ca` follows certificate rotation)."""

    server: InProcessServer | ServerProcess
    health_port: int
    dir: Path
    ca: Path
    tokens: Path | None = None
    client_cert: tuple[Path, Path] | None = None

    @property
    def target(self) -> str:
        return f"localhost:{self.server.port}"

    def tls(self, ca: Path | None = None) -> TLS:
        cert, key = self.client_cert or (None, None)
        return TLS(str(ca or self.ca), cert and str(cert), key and str(key))

    def channel(self, ca: Path | None = None, cert: tuple[Path, Path] | None = None):
        """A new channel (its own connection, so a new TLS handshake)."""
        cert = cert or self.client_cert
        creds = grpc.ssl_channel_credentials(
            (ca or self.ca).read_bytes(),
            cert[1].read_bytes() if cert else None,
            cert[0].read_bytes() if cert else None,
        )
        opts = [("grpc.use_local_subchannel_pool", 1), ("test.nonce", str(time.monotonic_ns()))]
        return grpc.secure_channel(self.target, creds, options=opts)


@contextlib.contextmanager
def _serving_process(repo: Path, d: Path, *args: str) -> Iterator[tuple[ServerProcess, int]]:
    """A `cnn-serve` process with `args` and a plaintext health port, once that port says
    SERVING (the main port may need TLS or a token); stopped on exit."""
    health = free_port()
    server = start_server(repo, d, *args, "--health-port", str(health), wait=False)
    try:
        wait_serving(server, port=health)
        yield server, health
    finally:
        server.stop()


def _mutual_tls(d: Path) -> tuple[dict[str, Path], Path, tuple[Path, Path]]:
    """Files in `d` for a mutual-TLS server: its settings (tls_cert, tls_key, tls_client_ca),
    the CA that vouches for it, and a client certificate and key the server trusts."""
    server_ca, client_ca = CA("server-ca"), CA("client-ca")
    cert, key = server_ca.issue("server").write(d / "server")
    files = {
        "tls_cert": cert,
        "tls_key": key,
        "tls_client_ca": client_ca.write(d / "client-ca.crt"),
    }
    return files, server_ca.write(d / "ca.crt"), client_ca.issue("client").write(d / "client")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_version(root)
    return root


@pytest.fixture(scope="module")
def tls_server(repo, tmp_path_factory) -> Iterator[Secured]:
    d = tmp_path_factory.mktemp("tls")
    ca = CA("server-ca")
    cert, key = ca.issue("server").write(d / "server")
    tokens = d / "tokens.txt"
    tokens.write_text(TOKENS)
    health = free_port()
    with serving(
        repo,
        poll_interval=0,
        tls_cert=cert,
        tls_key=key,
        auth_token_file=tokens,
        health_port=health,
    ) as server:
        yield Secured(server, health, d, ca.write(d / "ca.crt"), tokens)


@pytest.fixture(scope="module")
def mtls_server(repo, tmp_path_factory) -> Iterator[Secured]:
    d = tmp_path_factory.mktemp("mtls")
    files, ca, client = _mutual_tls(d)
    health = free_port()
    with serving(repo, poll_interval=0, health_port=health, **files) as server:
        yield Secured(server, health, d, ca, client_cert=client)


@pytest.fixture(scope="module")
def mtls_workers(repo, tmp_path_factory) -> Iterator[Secured]:
    d = tmp_path_factory.mktemp("mtls-workers")
    files, ca, client = _mutual_tls(d)
    tls = [a for name, path in files.items() for a in (f"--{name.replace('_', '-')}", str(path))]
    with _serving_process(
        repo, d, *("--workers", "2", "--intra-op-threads", "1", "--poll-interval", "0"), *tls
    ) as (server, health):
        # Health answers once one worker is up; the other may still be starting and would
        # read certificate files a test rewrites meanwhile. Both have read theirs once each
        # says it is listening.
        both = lambda: server.log().count("listening on") >= 2  # noqa: E731
        wait_for("both workers to listen", both, timeout=60, every=0.05)
        yield Secured(server, health, d, ca, client_cert=client)


def _code(fn: Callable[[], object]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _predict_request() -> pb.PredictRequest:
    t = pb.Tensor(dtype=pb.UINT8, shape=list(GREY.shape), data=GREY.tobytes())
    return pb.PredictRequest(images=[pb.Image(tensor=t)])


def _calls(channel: grpc.Channel, token: str | None) -> dict[str, Callable[[], object]]:
    """One call per method under test, each sending `token` (None: no authorization)."""
    md = _bearer(token)
    c, i = pb_grpc.ClassifierStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
    infer = v2.ModelInferRequest(model_name="tiny")
    infer.inputs.add(name="images", datatype="UINT8", shape=[1, *GREY.shape])
    infer.raw_input_contents.append(GREY.tobytes())
    explain = pb.ExplainRequest(image=_predict_request().images[0])
    return {
        "Predict": lambda: c.Predict(_predict_request(), metadata=md, timeout=10),
        "PredictStream": lambda: list(
            c.PredictStream(iter([_predict_request()]), metadata=md, timeout=10)
        ),
        "Explain": lambda: c.Explain(explain, metadata=md, timeout=10),
        "ModelInfer": lambda: i.ModelInfer(infer, metadata=md, timeout=10),
        "GetModelInfo": lambda: c.GetModelInfo(pb.ModelInfoRequest(), metadata=md, timeout=10),
        "ServerReady": lambda: i.ServerReady(v2.ServerReadyRequest(), metadata=md, timeout=10),
        "ModelMetadata": lambda: i.ModelMetadata(
            v2.ModelMetadataRequest(name="tiny"), metadata=md, timeout=10
        ),
    }


INFERENCE = ("Predict", "PredictStream", "Explain", "ModelInfer")
METADATA = ("GetModelInfo", "ServerReady", "ModelMetadata")


# ----------------------------------------------------------------------------- TLS
def test_tls_serves_and_a_plaintext_client_is_refused(tls_server):
    with Client(tls_server.target, tls=tls_server.tls(), auth_token="tok-all") as client:
        assert client.predict([GREY])[0].label == "mid"
    with grpc.insecure_channel(tls_server.target) as ch:
        code = _code(_calls(ch, "tok-all")["Predict"])
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client_cert", ["none", "other-ca", "trusted-ca"])
def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca(
    mtls_server, client_cert
):
    cert = {
        "none": None,
        "other-ca": CA("other-ca").issue("intruder").write(mtls_server.dir / "intruder"),
        "trusted-ca": mtls_server.client_cert,
    }[client_cert]
    creds = grpc.ssl_channel_credentials(
        mtls_server.ca.read_bytes(),
        cert[1].read_bytes() if cert else None,
        cert[0].read_bytes() if cert else None,
    )
    with grpc.secure_channel(mtls_server.target, creds) as ch:
        code = _code(_calls(ch, None)["Predict"])
    want = grpc.StatusCode.OK if client_cert == "trusted-ca" else grpc.StatusCode.UNAVAILABLE
    assert code == want


def test_health_port_answers_plaintext_while_the_main_port_requires_mutual_tls(mtls_server):
    assert check(f"127.0.0.1:{mtls_server.health_port}") == "SERVING"
    assert check(f"127.0.0.1:{mtls_server.server.port}") == "UNREACHABLE"
    with grpc.insecure_channel(f"127.0.0.1:{mtls_server.health_port}") as ch:
        # health alone: the model's services are not on the probe port
        code = _code(_calls(ch, None)["Predict"])
    assert code == grpc.StatusCode.UNIMPLEMENTED


def _rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)  # same inode
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _fresh_connections_ok(s: Secured, ca: Path, n: int) -> bool:
    for _ in range(n):
        with s.channel(ca) as ch:
            if _code(_calls(ch, None)["ServerReady"]) != grpc.StatusCode.OK:
                return False
    return True


def test_sighup_to_the_parent_reloads_certificates_in_every_worker(mtls_workers):
    s = mtls_workers
    new_ca = CA("server-ca-2")
    new_ca_path = new_ca.write(s.dir / "ca2.crt")
    leaf = new_ca.issue("server")
    # Rewritten in place with the old mtime: invisible to the change check, only SIGHUP
    # can make the workers read it.
    _rewrite_keeping_mtime(s.dir / "server.crt", leaf.cert_pem)
    _rewrite_keeping_mtime(s.dir / "server.key", leaf.key_pem)
    assert _fresh_connections_ok(s, s.ca, 4)
    s.server.proc.send_signal(signal.SIGHUP)
    # 8 new connections in a row spread over both workers (SO_REUSEPORT): all must see it.
    every_worker = lambda: _fresh_connections_ok(s, new_ca_path, 8)  # noqa: E731
    wait_for("every worker to present the new certificate", every_worker, timeout=15)
    s.ca = new_ca_path
    assert s.server.proc.poll() is None, s.server.log()


def test_certificate_rotation_keeps_open_streams_and_new_connections_see_it(tls_server):
    s = tls_server
    requests: queue.Queue[pb.PredictRequest | None] = queue.Queue()
    answers = []

    def feed() -> Iterator[pb.PredictRequest]:
        while (r := requests.get(timeout=30)) is not None:
            yield r

    with s.channel() as old:
        stream = pb_grpc.ClassifierStub(old).PredictStream(
            feed(), metadata=_bearer("tok-infer"), timeout=30
        )
        requests.put(_predict_request())
        answers.append(next(stream))
        new_ca = CA("server-ca-2")
        new_ca_path = new_ca.write(s.dir / "ca2.crt")
        new_ca.issue("server").write(s.dir / "server")  # replaced: a new mtime
        with s.channel(new_ca_path) as ch:
            assert _code(_calls(ch, "tok-all")["GetModelInfo"]) == grpc.StatusCode.OK
        with s.channel(s.ca) as ch:  # the old CA no longer vouches for the server
            assert _code(_calls(ch, "tok-all")["GetModelInfo"]) == grpc.StatusCode.UNAVAILABLE
        requests.put(_predict_request())
        answers.append(next(stream))  # the stream opened before the rotation still answers
        requests.put(None)
        assert list(stream) == []
    s.ca = new_ca_path
    assert [a.predictions[0].classes[0].label for a in answers] == ["mid", "mid"]


# ----------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("token", [None, "not-a-token", "tok-all-but-longer"])
def test_a_missing_or_unknown_token_is_unauthenticated(tls_server, token):
    with tls_server.channel() as ch:
        codes = {name: _code(call) for name, call in _calls(ch, token).items()}
    assert codes == dict.fromkeys(codes, UNAUTHENTICATED)


def test_a_token_outside_its_groups_is_permission_denied(tls_server):
    with tls_server.channel() as ch:
        meta = {n: _code(c) for n, c in _calls(ch, "tok-meta").items() if n in INFERENCE}
        infer = {n: _code(c) for n, c in _calls(ch, "tok-infer").items() if n in METADATA}
    assert meta == dict.fromkeys(INFERENCE, PERMISSION_DENIED)
    assert infer == dict.fromkeys(METADATA, PERMISSION_DENIED)


def test_a_token_inside_its_groups_is_served(tls_server):
    with tls_server.channel() as ch:
        infer = {n: _code(c) for n, c in _calls(ch, "tok-infer").items() if n in INFERENCE}
        meta = {n: _code(c) for n, c in _calls(ch, "tok-meta").items() if n in METADATA}
        every = {n: _code(c) for n, c in _calls(ch, "tok-all").items()}
    assert infer == dict.fromkeys(INFERENCE, grpc.StatusCode.OK)
    assert meta == dict.fromkeys(METADATA, grpc.StatusCode.OK)
    assert every == dict.fromkeys(every, grpc.StatusCode.OK)


def test_health_is_open_by_default_and_reflection_is_not(tls_server):
    with tls_server.channel() as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        code = _code(lambda: list(refl.ServerReflectionInfo(iter([ask]), timeout=5)))
        allowed = _code(
            lambda: list(
                refl.ServerReflectionInfo(iter([ask]), timeout=5, metadata=_bearer("tok-all"))
            )
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert (code, allowed) == (UNAUTHENTICATED, grpc.StatusCode.OK)


def test_every_rpc_we_serve_belongs_to_a_group():
    """A method in no group is refused to every token: a new RPC must be given a group."""
    from serving.grpc.auth import group_of

    for file in (pb.DESCRIPTOR, v2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for m in service.methods:
                assert group_of(f"/{service.full_name}/{m.name}") is not None, m.full_name


def test_a_method_outside_every_group_is_refused(tls_server):
    with tls_server.channel() as ch:
        nope = ch.unary_unary("/convserve.v1.Classifier/Nope")
        anonymous = _code(lambda: nope(b"", timeout=5))
        known = _code(lambda: nope(b"", timeout=5, metadata=_bearer("tok-all")))
    assert (anonymous, known) == (UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)


def test_refusals_are_counted_by_group_and_code(tls_server):
    def counted(code: str) -> float:
        failures = "convserve_auth_failures_total"
        return tls_server.server.value(failures, group="inference", code=code)

    before = counted("PERMISSION_DENIED"), counted("UNAUTHENTICATED")
    with tls_server.channel() as ch:
        _code(_calls(ch, "tok-meta")["Predict"])
        _code(_calls(ch, "tok-meta")["Explain"])
        _code(_calls(ch, "nobody")["Predict"])
    after = counted("PERMISSION_DENIED"), counted("UNAUTHENTICATED")
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)


@pytest.mark.slow  # about 2 s: the file is looked at once a second, twice
def test_token_file_edits_apply_without_a_restart(tls_server):
    tokens = tls_server.tokens

    def predicts(*names: str) -> tuple[grpc.StatusCode, ...]:
        with tls_server.channel() as ch:
            return tuple(_code(_calls(ch, name)["Predict"]) for name in names)

    tokens.write_text("tok-all\ntok-new inference\ntok-meta metadata\n")  # tok-infer removed
    try:
        applied = lambda: predicts("tok-new", "tok-infer") == (OK, UNAUTHENTICATED)  # noqa: E731
        wait_for("tok-new in and tok-infer out (the file is looked at once a second)", applied, 10)
    finally:
        tokens.write_text(TOKENS)
        # Later tests need tok-infer back.
        wait_for("the token file to be restored", lambda: predicts("tok-infer") == (OK,), 10)


# ----------------------------------------------------------------------------- clients
def test_client_and_cnn_predict_present_tls_and_a_token(tls_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("# mine\ntok-all\n")
    image = tmp_path / "grey.png"
    from PIL import Image

    Image.fromarray(GREY[0]).save(image)
    with Client(tls_server.target, tls=tls_server.tls(), auth_token="tok-infer") as client:
        assert client.predict([image])[0].label == "mid"
        with pytest.raises(PredictionError) as denied:
            client.model_info()
    assert denied.value.code == PERMISSION_DENIED

    def predict(*flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "serving.client", "--server", tls_server.target, *flags]
        return subprocess.run(
            [*cmd, "--tls-ca", str(tls_server.ca), str(image)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = predict("--auth-token-file", str(token_file), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["classes"][0]["label"] == "mid"
    # --auth-token reaches the server: a known token that may read metadata, not predict.
    refused = predict("--auth-token", "tok-meta")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr


def test_cnn_bench_presents_tls_and_a_token(tls_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("tok-all\n")
    out = subprocess.run(
        [
            *(sys.executable, "-m", "serving.client.loadgen", "--target", tls_server.target),
            *("--tls-ca", str(tls_server.ca), "--auth-token-file", str(token_file)),
            *("--duration", "0.3", "--warmup", "0", "--concurrency", "1", "--json", "-"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["errors"] == {} and report["requests"] > 0
    assert "tok-all" not in out.stdout  # the token is never reported


# ----------------------------------------------------------------------------- metrics
def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def test_metrics_bound_to_loopback_is_not_reachable_on_another_address(repo, tmp_path):
    # 127.0.0.2 is this host too: the 0.0.0.0 listeners answer there, the 127.0.0.1 one not.
    # (start_server binds /metrics to 127.0.0.1; gRPC and the health port to 0.0.0.0 here.)
    args = ("--host", "0.0.0.0", "--poll-interval", "0")
    with _serving_process(repo, tmp_path, *args) as (s, health):
        assert "convserve_requests_total" in s.metrics()
        assert _connects("127.0.0.2", health)
        assert not _connects("127.0.0.2", s.metrics_port)


# ----------------------------------------------------------------------------- start-up
@pytest.fixture(scope="module")
def refused_starts(repo, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """cnn-serve with bad credentials, all started at once (each stops before loading)."""
    d = tmp_path_factory.mktemp("bad")
    ca = CA("ca")
    cert, _ = ca.issue("a").write(d / "a")
    _, other_key = ca.issue("b").write(d / "b")
    (d / "tokens").write_text("tok-x inference,root\n")
    base = [sys.executable, "-m", "serving.main", "--model-repository", str(repo)]
    base += ["--host", "127.0.0.1", "--metrics-port", "0"]
    cases = {
        "mismatched-key": ["--tls-cert", str(cert), "--tls-key", str(other_key)],
        "mismatched-key-workers": [
            *("--workers", "2", "--tls-cert", str(cert), "--tls-key", str(other_key))
        ],
        "missing-cert": ["--tls-cert", str(d / "nope.crt"), "--tls-key", str(other_key)],
        "bad-token-file": ["--auth-token-file", str(d / "tokens")],
    }
    procs = {
        name: subprocess.Popen(
            [*base, "--port", str(free_port()), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in cases.items()
    }
    out = {}
    for name, p in procs.items():
        try:
            stdout, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout)
    return out


@pytest.mark.slow  # about 3 s: four cnn-serve processes started at once
@pytest.mark.parametrize(
    "case, says",
    [
        ("mismatched-key", "not a matching PEM certificate"),
        ("mismatched-key-workers", "not a matching PEM certificate"),
        ("missing-cert", "nope.crt: cannot be read"),
        ("bad-token-file", "unknown group(s) ['root']"),
    ],
)
def test_refuses_to_start_with_bad_credentials(refused_starts, case, says):
    result = refused_starts[case]
    assert result.returncode == 3, result.stdout
    assert "cannot start" in result.stdout and says in result.stdout


def test_tokens_are_compared_in_constant_time_over_every_entry(tmp_path, monkeypatch):
    """Every entry is compared (no early exit at a match), as digests of equal length."""
    import hmac

    from serving import auth

    path = tmp_path / "tokens"
    path.write_text("first\nsecond inference\nthird\n")
    table = auth.TokenTable(path)
    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert table.grants("first") == frozenset(auth.GROUPS)
    assert table.grants("second") == frozenset({"inference"})
    assert table.grants("x" * 1000) is None
    assert seen == [(32, 32)] * 9
