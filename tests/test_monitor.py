"""The model in production against its test set (serving.monitor): the profile the exporter
records, the out-of-distribution score every answer carries (Predict, V2, HTTP), the
prediction metrics, and the drift and out-of-distribution rules in a real Prometheus that
scrapes a real server: quiet on test images, firing on one class and on handwritten digits.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from prometheus_client import start_http_server
from sklearn.datasets import load_digits

from serving import monitor
from serving.contract import (
    CONFIDENCE_BUCKETS,
    INTENSITY_BUCKETS,
    OOD_SCORE,
    Manifest,
    ManifestError,
    read_document,
)
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc
from serving.proto.inference import grpc_predict_v2_pb2 as v2
from serving.proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.inprocess import InProcessServer, serving
from tests.serving_helpers import Prometheus, free_port, wait_for

MODEL = "fashion-mnist"


@pytest.fixture(scope="module")
def manifest(version_dir) -> Manifest:
    return Manifest.from_dict(read_document(version_dir))


def ort_outputs(version_dir: Path, images: np.ndarray) -> np.ndarray:
    """(N, 2, K) logits and probabilities, as the server's batcher returns them."""
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(["logits", "probabilities"], {"images": images})
    return np.stack([logits, probs], axis=1)


def digits(n: int) -> np.ndarray:
    """scikit-learn's bundled 8x8 handwritten digits (no download), white on black and
    upsampled to 28x28 uint8 as MNIST draws them."""
    out = []
    for img in load_digits().images[:n]:
        small = Image.fromarray(np.round(img * 255 / 16).astype(np.uint8))
        out.append(np.asarray(small.resize((28, 28), Image.Resampling.BILINEAR))[None])
    return np.stack(out)


def noise_photo(seed: int) -> bytes:
    """A 640x480 RGB photo of uniform noise, as PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def tensor(image_chw: np.ndarray) -> pb.Image:
    return pb.Image(
        tensor=pb.Tensor(dtype=pb.UINT8, shape=list(image_chw.shape), data=image_chw.tobytes())
    )


def predict(server: InProcessServer, images: list[pb.Image], model: str = MODEL):
    with server.channel() as ch:
        return pb_grpc.ClassifierStub(ch).Predict(pb.PredictRequest(model=model, images=images))


# ----------------------------------------------------------------------------- the profile
def test_profile_flags_the_chosen_share_of_the_test_set_and_buckets_like_prometheus():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 10)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    images = rng.integers(0, 256, (4000, 1, 8, 8), dtype=np.uint8)
    p = monitor.profile(logits, probs, images)

    np.testing.assert_allclose(
        monitor.energy(logits), -np.log(np.exp(logits.astype(np.float64)).sum(axis=1))
    )
    out = np.stack([logits, probs], axis=1)
    scores = monitor.ood_scores(out, *monitor.tables(p))
    assert ((scores >= 0) & (scores <= 1)).all()
    assert p.ood_threshold == pytest.approx(np.quantile(scores, 0.95), abs=1e-6)
    assert p.ood_false_positive_rate == pytest.approx(0.05, abs=2e-3)
    assert sum(p.class_fractions) == pytest.approx(1) and len(p.class_fractions) == 10
    assert sum(p.confidence_fractions) == pytest.approx(1)
    assert sum(p.intensity_fractions) == pytest.approx(1)
    # A value on a bound counts in that bound's bucket, as Prometheus's `le` counts it.
    on_bound = np.array([CONFIDENCE_BUCKETS[0], CONFIDENCE_BUCKETS[0] + 1e-9, 1.0])
    counts = monitor.bucket_counts(on_bound, CONFIDENCE_BUCKETS)
    assert counts[0] == 1 and counts[1] == 1 and counts[-1] == 1


def test_percentiles_place_a_value_among_its_own_classs_test_values():
    table = np.array([np.linspace(0, 10, 11), np.full(11, np.nan)])  # class 1: never given
    values = np.array([-1.0, 0.0, 2.5, 5.0, 10.0, 11.0, 3.0])
    classes = np.array([0, 0, 0, 0, 0, 0, 1])
    got = monitor.percentiles(values, classes, table)
    np.testing.assert_allclose(got, [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0])


def test_the_request_paths_flat_lookup_equals_percentiles_on_every_case():
    """FlatTable (one searchsorted over shifted tables) against percentiles: values on
    quantiles, between them, beyond both ends, on a flat stretch, NaN, an empty class."""
    rng = np.random.default_rng(3)
    table = np.sort(rng.normal(0, 3, (6, 101)), axis=1).round(6)
    table[2] = np.nan
    table[4, 30:70] = table[4, 30]
    flat = monitor.FlatTable(table)
    for _ in range(300):
        n = int(rng.integers(1, 80))
        values = rng.normal(0, 6, n)
        classes = rng.integers(0, 6, n)
        on = rng.random(n) < 0.3  # exactly on one of its class's quantiles
        values[on] = table[classes[on], rng.integers(0, 101, on.sum())]
        values[rng.random(n) < 0.05] = np.nan
        values[rng.random(n) < 0.05] = 1e12
        values[rng.random(n) < 0.05] = -np.inf
        np.testing.assert_allclose(
            flat(values, classes), monitor.percentiles(values, classes, table), atol=1e-12
        )


def test_the_request_paths_scorer_equals_ood_scores(manifest):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 1, (2000, 10)) * rng.uniform(0.2, 8, (2000, 1))
    logits = logits.astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    out = np.stack([logits, probs], axis=1)
    tables = monitor.tables(manifest.monitoring)
    np.testing.assert_allclose(
        monitor.Scorer(*tables)(out), monitor.ood_scores(out, *tables), atol=1e-9
    )


def test_a_single_image_scores_in_plain_python_as_a_batch_does_in_numpy(manifest):
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 4, (300, 10)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    out = np.stack([logits, probs], axis=1)
    watch = monitor.Monitor(manifest)
    image = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    one = [watch.observe(image, out[i : i + 1])[0][0] for i in range(len(out))]
    np.testing.assert_allclose(one, watch.observe(np.repeat(image, 300, 0), out)[0], atol=1e-12)


def test_manifest_monitoring_round_trips_and_a_bad_field_is_named(manifest):
    doc = manifest.to_dict()
    assert Manifest.from_dict(json.loads(json.dumps(doc))).monitoring == manifest.monitoring
    bad = {**doc, "monitoring": {**doc["monitoring"], "class_fractions": [0.5, 0.5]}}
    with pytest.raises(ManifestError, match=r"'monitoring\.class_fractions' must list 10"):
        Manifest.from_dict(bad)
    ignored: list[str] = []  # descriptive: a server serves the version without a profile
    assert Manifest.from_dict(bad, ignored=ignored).monitoring is None and ignored


def test_the_exporter_records_what_the_served_graph_did_on_the_test_set(
    manifest, version_dir, fashion_test
):
    m = manifest.monitoring
    assert m is not None and m.images == len(fashion_test.images) == 10_000
    out = ort_outputs(version_dir, fashion_test.images)
    again = monitor.profile(out[:, 0], out[:, 1], fashion_test.images)
    assert np.allclose(m.class_fractions, again.class_fractions, atol=1e-4)
    assert np.allclose(m.confidence_fractions, again.confidence_fractions, atol=1e-4)
    assert m.intensity_fractions == again.intensity_fractions
    for mine, theirs in zip(monitor.tables(m), monitor.tables(again), strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-4)
    assert m.ood_threshold == pytest.approx(again.ood_threshold, abs=1e-3)
    assert m.ood_score == OOD_SCORE
    assert m.ood_false_positive_rate == pytest.approx(0.05, abs=2e-3)
    assert m.confidence_buckets == CONFIDENCE_BUCKETS and m.intensity_buckets == INTENSITY_BUCKETS


# ----------------------------------------------------------------------------- every answer
@pytest.fixture(scope="module")
def server(model_repository):
    with serving(model_repository, http_port=free_port(), max_message_bytes=4_000_000) as s:
        yield s


def test_every_answer_carries_the_score_and_the_flag_on_each_wire(
    server, manifest, version_dir, fashion_test
):
    x = fashion_test.images[:64]
    expected = monitor.ood_scores(ort_outputs(version_dir, x), *monitor.tables(manifest.monitoring))
    threshold = manifest.monitoring.ood_threshold
    resp = predict(server, [tensor(i) for i in x])
    got = np.array([p.ood_score for p in resp.predictions])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [p.out_of_distribution for p in resp.predictions] == list(expected > threshold)

    # KServe V2: the server's own outputs, when named.
    req = v2.ModelInferRequest(model_name=MODEL, raw_input_contents=[x.tobytes()])
    req.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
    req.outputs.add(name="ood_score")
    req.outputs.add(name="ood_flagged")
    with server.channel() as ch:
        v2resp = v2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
    assert [(o.name, o.datatype, list(o.shape)) for o in v2resp.outputs] == [
        ("ood_score", "FP32", [64, 1]),
        ("ood_flagged", "BOOL", [64, 1]),
    ]
    np.testing.assert_allclose(np.frombuffer(v2resp.raw_output_contents[0], "<f4"), got, 1e-6)
    flags = np.frombuffer(v2resp.raw_output_contents[1], np.bool_)
    assert list(flags) == [p.out_of_distribution for p in resp.predictions]

    # HTTP: the classify endpoint's JSON.
    body = Image.fromarray(x[0][0])
    buf = io.BytesIO()
    body.save(buf, format="PNG")
    url = f"{server.url}/v1/models/{MODEL}/predict"
    r = urllib.request.urlopen(urllib.request.Request(url, data=buf.getvalue()), timeout=10)
    (answer,) = json.loads(r.read())["predictions"]
    assert answer["ood_score"] == pytest.approx(float(got[0]), abs=1e-4)
    assert answer["out_of_distribution"] is bool(expected[0] > threshold)


def test_a_photo_of_noise_is_flagged_and_garments_mostly_are_not(server, fashion_test):
    """Tried as a new user would: a 640x480 photo of noise was answered "Bag, 0.70" with
    nothing to say it is not a garment."""
    photos = predict(server, [pb.Image(encoded=noise_photo(s)) for s in range(4)])
    assert all(p.out_of_distribution for p in photos.predictions), photos
    garments = predict(server, [tensor(i) for i in fashion_test.images[:500:5]])
    flagged = sum(p.out_of_distribution for p in garments.predictions)
    assert flagged <= 15  # about 5 of 100 by construction of the threshold


def test_prediction_metrics_count_what_was_answered_and_not_explanations(
    model_repository, manifest, version_dir, fashion_test
):
    x = fashion_test.images[100:172]
    out = ort_outputs(version_dir, x)
    with serving(model_repository) as server:
        labels = {"model": MODEL, "version": "1"}
        for name, share in zip(manifest.labels, manifest.monitoring.class_fractions, strict=True):
            of = {**labels, "class": name}
            assert server.value("convserve_reference_class_fraction", **of) == pytest.approx(share)
            assert server.value("convserve_predictions_total", **of) == 0
        predict(server, [tensor(i) for i in x[:40]])
        predict(server, [tensor(i) for i in x[40:]])
        with server.channel() as ch:  # 1 + 49 occluded rows through the batcher, not counted
            pb_grpc.ClassifierStub(ch).Explain(pb.ExplainRequest(model=MODEL, image=tensor(x[0])))

        def counted() -> bool:
            return server.value("convserve_prediction_confidence_count", **labels) == len(x)

        wait_for("the monitor's counts in the metrics (flushed once a second)", counted)
        per_class = np.bincount(out[:, 1].argmax(axis=1), minlength=10)
        for i, name in enumerate(manifest.labels):
            got = server.value("convserve_predictions_total", **labels, **{"class": name})
            assert got == per_class[i], name
        top = out[:, 1].max(axis=1)
        conf_sum = server.value("convserve_prediction_confidence_sum", **labels)
        assert conf_sum == pytest.approx(top.sum(), rel=1e-5)
        le = f"{CONFIDENCE_BUCKETS[5]}"
        assert server.value("convserve_prediction_confidence_bucket", **labels, le=le) == (
            (top <= CONFIDENCE_BUCKETS[5]).sum()
        )
        light = x.reshape(len(x), -1).mean(axis=1) / 255
        light_sum = server.value("convserve_input_mean_intensity_sum", **labels)
        assert light_sum == pytest.approx(light.sum(), rel=1e-6)
        m = manifest.monitoring
        flagged = (monitor.ood_scores(out, *monitor.tables(m)) > m.ood_threshold).sum()
        assert server.value("convserve_ood_flagged_total", **labels) == flagged


# ----------------------------------------------------------------------------- drift, for real
@pytest.mark.slow  # a real Prometheus scraping a real server: about 15 s
def test_drift_stays_low_on_test_images_and_fires_on_one_class_and_on_digits(
    version_dir, fashion_test, tmp_path
):
    """Three copies of one version under three names, each sent 640 images: test images
    (PSI stays under the alert's 0.2), images of one class, and handwritten digits (both
    cross it, and both alerts go pending; they fire after 15 minutes of it)."""
    repo = tmp_path / "models"
    for name in ("clothes", "one-class", "digits"):
        shutil.copytree(version_dir, repo / name / "1")
    n, rng = 640, np.random.default_rng(1)
    sent = {
        "clothes": fashion_test.images[rng.choice(len(fashion_test.images), n, replace=False)],
        "one-class": fashion_test.images[fashion_test.labels == 1][:n],
        "digits": np.concatenate([digits(n // 2)] * 2),
    }
    with serving(repo, max_images_per_request=64) as server:
        httpd, _ = start_http_server(0, "127.0.0.1", server.registry)  # as cnn-serve's own
        prom = Prometheus(tmp_path, f"127.0.0.1:{httpd.server_port}")
        try:
            prom.wait_ready()  # a first sample of every (zero) counter before any traffic
            for name, images in sent.items():
                for i in range(0, n, 64):
                    predict(server, [tensor(im) for im in images[i : i + 64]], model=name)
            prom.wait_scrapes_after(time.time() + 1.0)  # the monitors flush once a second

            psi = "job_model_version:convserve_prediction_drift:psi_rate30m{model=%r}"
            answered = "job_model_version:convserve_predictions:increase30m{model=%r}"

            def settled() -> bool:
                return all(prom.value(answered % m) >= n for m in sent)

            wait_for("every answer in the rules' window", settled)
            drift = {m: prom.value(psi % m) for m in sent}
            assert drift["clothes"] < 0.2 < min(drift["one-class"], drift["digits"]), drift

            def pending() -> set[tuple[str, str]]:
                alerts = prom.query('ALERTS{alertstate="pending"}')
                return {(a["metric"]["alertname"], a["metric"]["model"]) for a in alerts}

            want = {
                ("ConvservePredictionDrift", "one-class"),
                ("ConvservePredictionDrift", "digits"),
            }
            got = wait_for(
                "the drift alerts to go pending", lambda: want <= pending() and pending()
            )
            assert ("ConvservePredictionDrift", "clothes") not in got
            assert ("ConvserveOutOfDistribution", "clothes") not in got
        finally:
            prom.stop()
            httpd.shutdown()
            httpd.server_close()
