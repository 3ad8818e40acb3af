"""The exporter: a checkpoint in, a complete, faithful, atomically published version out."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

import trainer
from serving.contract import versions
from serving.metadata import METADATA_KEYS
from trainer.cli import export_main, train_main
from trainer.data import load_dataset
from trainer.export import ExportError, export_checkpoint, load_model, resolve_checkpoint
from trainer.export.graph import WithProbabilities, export_onnx
from trainer.export.parity import PROBABILITY_TOLERANCE
from trainer.export.variants import VARIANTS, fp16_variant, variant_rejection
from trainer.models import build_model
from trainer.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fashion-mnist"
CONTRACT_KEYS = {
    "monitoring",
    "format",
    "name",
    "version",
    "labels",
    "input",
    "outputs",
    "mean",
    "std",
    "dataset",
    "test_accuracy",
    "opset",
    "exporter",
    "parity",
    "variants",
    "rejected_variants",
    "insight",
    "training",
    "created_at",
    "source_commit",
    "convserve_version",
    "files",
}


@pytest.fixture(scope="module")
def version_dir(model_repository) -> Path:
    return model_repository / MODEL / "1"


@pytest.fixture(scope="module")
def manifest(version_dir) -> dict:
    return json.loads((version_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fashion(model_repository):
    return load_dataset("fashion-mnist", download=False)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = _session(path)
    parts = [
        session.run(None, {"images": images[i : i + 1000]}) for i in range(0, len(images), 1000)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


# ----------------------------------------------------------------------------- the contract
def test_manifest_has_exactly_the_contract_keys_and_true_file_digests(manifest, version_dir):
    assert set(manifest) == CONTRACT_KEYS
    assert manifest["format"] == "convserve.manifest/1"
    assert (manifest["name"], manifest["version"]) == (MODEL, 1)
    assert manifest["input"] == {
        "name": "images",
        "dtype": "uint8",
        "layout": "NCHW",
        "channels": 1,
        "height": 28,
        "width": 28,
    }
    assert manifest["outputs"] == ["logits", "probabilities"]
    assert manifest["dataset"] == "fashion-mnist" and len(manifest["labels"]) == 10
    assert manifest["exporter"] in ("dynamo", "torchscript") and manifest["opset"] >= 18
    assert manifest["convserve_version"] == trainer.__version__
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", manifest["source_commit"])
    created = datetime.fromisoformat(manifest["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert manifest["training"]["data"]["name"] == "fashion-mnist"
    assert set(manifest["files"]) == {
        "model.onnx",
        "model.opt.onnx",
        "model.int8.onnx",
        "model.insight.onnx",
    }
    for filename, digest in manifest["files"].items():
        assert _sha256(version_dir / filename) == digest, filename
    assert sorted(p.name for p in version_dir.iterdir()) == sorted(
        [*manifest["files"], "manifest.json"]
    )


def test_onnx_runtime_agrees_with_pytorch_on_the_fashion_mnist_test_set(
    manifest, version_dir, fashion_run, fashion
):
    parity = manifest["parity"]
    assert parity["samples"] == len(fashion.test) >= 2000
    assert parity["argmax_agreement"] == 1.0
    assert parity["max_abs_diff_probability"] <= PROBABILITY_TOLERANCE
    assert parity["ort_test_accuracy"] == parity["torch_test_accuracy"] == manifest["test_accuracy"]
    assert manifest["test_accuracy"] >= 0.85

    # Recompute independently: the checkpoint's weights in PyTorch vs the graph in ORT.
    _, _, model = load_model(resolve_checkpoint(fashion_run))
    with torch.inference_mode():
        logits = model(torch.from_numpy(fashion.test.images))
    torch_probs = torch.softmax(logits, dim=1).numpy()
    ort_logits, ort_probs = _run(version_dir / "model.onnx", fashion.test.images)
    assert (ort_probs.argmax(1) == torch_probs.argmax(1)).all()
    assert np.abs(ort_probs - torch_probs).max() <= PROBABILITY_TOLERANCE
    assert np.abs(ort_logits - logits.numpy()).max() <= 1e-3
    accuracy = (ort_probs.argmax(1) == fashion.test.labels).mean()
    assert accuracy == pytest.approx(manifest["test_accuracy"], abs=1e-9)


def test_batches_of_1_7_and_64_all_run(version_dir, fashion):
    session = _session(version_dir / "model.onnx")
    for n in (1, 7, 64):
        logits, probs = session.run(
            ["logits", "probabilities"], {"images": fashion.test.images[:n]}
        )
        assert logits.shape == probs.shape == (n, 10)
        assert logits.dtype == probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_uint8_pixels_are_the_input_contract_and_floats_are_refused(version_dir):
    session = _session(version_dir / "model.onnx")
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    assert inp.shape[1:] == [1, 28, 28] and not isinstance(inp.shape[0], int)
    with pytest.raises((InvalidArgument, Fail), match=r"(?i)type|uint8"):
        session.run(None, {"images": np.zeros((2, 1, 28, 28), np.float32)})


def test_onnx_metadata_props_carry_the_manifest_values(version_dir, manifest):
    props = _props(version_dir / "model.onnx")
    for key in METADATA_KEYS:
        raw = props[f"convserve.{key}"]
        value = raw if isinstance(manifest[key], str) else json.loads(raw)
        assert value == manifest[key], key
    assert json.loads(props["convserve.labels"])[0] == "T-shirt/top"
    assert json.loads(props["convserve.input"])["dtype"] == "uint8"
    assert props["convserve.variant"] == "fp32"
    for filename, entry in manifest["variants"].items():
        variant_props = _props(version_dir / filename)
        assert variant_props["convserve.variant"] == entry["kind"]
        assert json.loads(variant_props["convserve.test_accuracy"]) == entry["test_accuracy"]
        assert variant_props["convserve.labels"] == props["convserve.labels"]


def test_the_full_onnx_checker_passes_and_weights_are_inline(version_dir):
    model = onnx.load(version_dir / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not list(version_dir.glob("*.data"))


def test_config_pbtxt_declares_uint8_images_and_fp32_outputs_for_triton(model_repository):
    text = (model_repository / MODEL / "config.pbtxt").read_text()
    assert re.search(r'^name: "fashion-mnist"$', text, re.M)
    assert re.search(r'^platform: "onnxruntime_onnx"$', text, re.M)
    assert re.search(r"^max_batch_size: \d+$", text, re.M)
    blocks = re.findall(
        r'\{\s*name: "(\w+)"\s*data_type: (\w+)\s*(?:format: \w+\s*)?dims: \[ ([\d, ]+) \]', text
    )
    assert blocks == [
        ("images", "TYPE_UINT8", "1, 28, 28"),
        ("logits", "TYPE_FP32", "10"),
        ("probabilities", "TYPE_FP32", "10"),
    ]
    assert re.search(r"dynamic_batching \{\s*max_queue_delay_microseconds: 500\s*\}", text)
    assert text.count("{") == text.count("}") and text.count("[") == text.count("]")


# ----------------------------------------------------------------------------- variants
def test_int8_variant_is_static_qdq_and_within_the_accuracy_bound(manifest, version_dir, fashion):
    entry = manifest["variants"]["model.int8.onnx"]
    q = entry["quantization"]
    assert q["format"] == "QDQ" and q["per_channel"]
    # the 1-channel stem and the classifier stay float (tests/test_int8.py: the rewrites)
    assert {"Conv", "Gemm", "Softmax"} <= set(q["float_ops"])
    assert q["rewrite_max_abs_diff_logit"] <= 1e-4
    assert entry["accuracy_drop"] <= 0.5
    ops = {n.op_type for n in onnx.load(version_dir / "model.int8.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    _, probs = _run(version_dir / "model.int8.onnx", fashion.test.images)
    accuracy = (probs.argmax(1) == fashion.test.labels).mean()
    assert accuracy == pytest.approx(entry["test_accuracy"], abs=1e-9)
    assert (manifest["test_accuracy"] - accuracy) * 100 <= 0.5


def test_optimized_variant_keeps_the_fp32_parity_bound(manifest, version_dir):
    entry = manifest["variants"]["model.opt.onnx"]
    assert entry["parity"]["argmax_agreement"] == 1.0
    assert entry["parity"]["max_abs_diff_probability"] <= PROBABILITY_TOLERANCE
    assert entry["test_accuracy"] == manifest["test_accuracy"]
    assert _session(version_dir / "model.opt.onnx").get_inputs()[0].type == "tensor(uint8)"


def test_fp16_conversion_keeps_uint8_in_and_float32_out(version_dir, fashion, tmp_path):
    dst = tmp_path / "model.fp16.onnx"
    fp16_variant(version_dir / "model.onnx", dst, None, 0)
    session = _session(dst)
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert [o.type for o in session.get_outputs()] == ["tensor(float)", "tensor(float)"]
    _, probs = _run(dst, fashion.test.images)
    _, fp32_probs = _run(version_dir / "model.onnx", fashion.test.images)
    assert np.abs(probs - fp32_probs).max() < 1e-2


def test_rejection_rule_uses_the_accuracy_drop_in_points():
    fine = {"argmax_agreement": 1.0, "max_abs_diff_probability": 1e-6}
    assert variant_rejection("int8", 0.90, 0.896, fine, 0.5) is None  # 0.4 points
    reason = variant_rejection("int8", 0.90, 0.894, fine, 0.5)  # 0.6 points
    assert reason and "0.60 points" in reason
    assert variant_rejection("fp16", 0.90, 0.90, fine, 0.0) is None
    assert variant_rejection("fp16", 0.90, 0.8999, fine, 0.0)
    off = {"argmax_agreement": 0.999, "max_abs_diff_probability": 3e-3}
    assert variant_rejection("int8", 0.90, 0.90, off, 0.5) is None  # int8 is judged on accuracy
    assert "argmax agreement" in variant_rejection("optimized", 0.90, 0.90, off, 0.5)


def _negated_classifier(src: Path, dst: Path, data, seed) -> dict:
    """A 'variant' whose last layer is negated: it predicts the least likely class."""
    model = onnx.load(src)
    last_gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for init in model.graph.initializer:
        if init.name in last_gemm.input[1:]:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, dst)
    return {}


def _broken_builder(src: Path, dst: Path, data, seed) -> dict:
    dst.write_bytes(b"half a file")
    raise RuntimeError("quantiser exploded")


def test_variants_that_lose_accuracy_or_fail_are_rejected_and_not_written(
    fashion_run, tmp_path, monkeypatch
):
    monkeypatch.setitem(VARIANTS, "fp16", ("model.fp16.onnx", _negated_classifier))
    monkeypatch.setitem(VARIANTS, "int8", ("model.int8.onnx", _broken_builder))
    result = export_checkpoint(fashion_run, tmp_path, MODEL, optimize=False, int8=True, fp16=True)
    m = result.manifest
    assert m["variants"] == {}
    bad = m["rejected_variants"]["model.fp16.onnx"]
    assert bad["accuracy_drop"] > 0.5 and "points below fp32" in bad["reason"]
    assert bad["test_accuracy"] < m["test_accuracy"]
    assert "quantiser exploded" in m["rejected_variants"]["model.int8.onnx"]["reason"]
    assert sorted(p.name for p in result.version_dir.iterdir()) == [
        "manifest.json",
        "model.insight.onnx",
        "model.onnx",
    ]


# ----------------------------------------------------------------------------- the repository
_EXPORT_FOREVER = """
import sys
from trainer.export import export_checkpoint
print("ready", flush=True)
while True:
    export_checkpoint(sys.argv[1], sys.argv[2], "killed", optimize=False)
"""


def _check_published(model_dir: Path, seen: set[str]) -> None:
    """Every all-digit folder must be complete the moment it is visible."""
    if not model_dir.is_dir():
        return
    for entry in model_dir.iterdir():
        if not entry.name.isdigit() or entry.name in seen:
            continue
        manifest = json.loads((entry / "manifest.json").read_text())
        assert manifest["version"] == int(entry.name)
        for filename, digest in manifest["files"].items():
            assert _sha256(entry / filename) == digest, f"{entry}/{filename} is torn"
        onnx.checker.check_model(onnx.load(entry / "model.onnx"))
        seen.add(entry.name)


def _hidden(model_dir: Path) -> set[str]:
    return {p.name for p in model_dir.glob(".tmp-*")} if model_dir.is_dir() else set()


@pytest.mark.slow
def test_a_killed_export_never_shows_a_half_written_version(fashion_run, tmp_path):
    model_dir = tmp_path / "killed"
    seen: set[str] = set()
    for delay in (0.0, 0.4, 1.5):  # just after the temp folder appears ... well into the build
        before = _hidden(model_dir)
        proc = subprocess.Popen(
            [sys.executable, "-c", _EXPORT_FOREVER, str(fashion_run), str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout.readline().strip() == b"ready"
            deadline = time.monotonic() + 120
            while not _hidden(model_dir) - before:  # an export is now writing
                assert proc.poll() is None and time.monotonic() < deadline
                _check_published(model_dir, seen)
                time.sleep(0.002)
            kill_at = time.monotonic() + delay
            while time.monotonic() < kill_at:
                _check_published(model_dir, seen)
                time.sleep(0.002)
        finally:
            proc.kill()
            proc.wait()
        _check_published(model_dir, seen)
    assert _hidden(model_dir), "no kill landed mid-export"
    assert versions(model_dir) == sorted(int(v) for v in seen)


def test_versions_count_up_and_an_existing_version_is_refused(
    model_repository, fashion_run, tmp_path, capsys
):
    shutil.copytree(model_repository / MODEL, tmp_path / MODEL)
    (tmp_path / MODEL / ".tmp-7-abandoned").mkdir()  # hidden folders are not versions
    args = ["--checkpoint", str(fashion_run), "--repository", str(tmp_path), "--name", MODEL]
    assert export_main([*args, "--no-optimize", "--quiet"]) == 0
    assert str(tmp_path / MODEL / "2") in capsys.readouterr().out
    assert versions(tmp_path / MODEL) == [1, 2]
    assert json.loads((tmp_path / MODEL / "2" / "manifest.json").read_text())["version"] == 2

    assert export_main([*args, "--version", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(fashion_run, tmp_path, MODEL, version=1)


def test_published_version_and_config_have_ordinary_permissions(model_repository, tmp_path):
    # A server may run as another user: temp-folder modes (0700/0600) must not leak through.
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "plain_file").write_text("x")
    assert _mode(model_repository / MODEL / "1") == _mode(tmp_path / "plain_dir")
    assert _mode(model_repository / MODEL / "config.pbtxt") == _mode(tmp_path / "plain_file")


# ----------------------------------------------------------------------------- the CLIs
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("cnn-export: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_cli_missing_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    args = ["--checkpoint", str(tmp_path / "nope.pt"), "--repository", str(tmp_path / "m")]
    assert export_main([*args, "--name", "x", "--quiet"]) == 2
    assert "not found" in _one_line_error(capsys)


def test_cli_checkpoint_that_does_not_match_its_recipe_exits_2(fashion_run, tmp_path, capsys):
    state = torch.load(resolve_checkpoint(fashion_run), weights_only=True)
    state["recipe"]["model"]["layers"][0]["filters"] = 8  # the weights have 16
    torch.save(state, tmp_path / "mismatch.pt")
    args = ["--checkpoint", str(tmp_path / "mismatch.pt"), "--repository", str(tmp_path / "m")]
    assert export_main([*args, "--name", "x", "--quiet"]) == 2
    assert "do not match" in _one_line_error(capsys)
    assert not (tmp_path / "m").exists()


def test_cli_unwritable_repository_exits_2(fashion_run, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    repo = tmp_path / "a_file" / "sub"  # even root cannot create a folder under a file
    args = ["--checkpoint", str(fashion_run), "--repository", str(repo)]
    assert export_main([*args, "--name", "x", "--quiet"]) == 2
    assert "cannot write to model repository" in _one_line_error(capsys)


@pytest.mark.slow
def test_cnn_train_exports_its_best_checkpoint_at_the_end(tmp_path, capsys):
    fast = ["data.shapes_train=2000", "data.shapes_test=300", "data.val_size=200"]
    fast += ["train.batch_size=50", "train.epochs=1", "export.optimize=false"]
    args = ["--recipe", "shapes", "--quiet", "--out", str(tmp_path / "run")]
    assert train_main([*args, "--repository", str(tmp_path / "models"), *fast]) == 0
    out = capsys.readouterr().out
    version_dir = tmp_path / "models" / "shapes" / "1"
    assert str(version_dir) in out
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["parity"]["samples"] >= 2000 and manifest["parity"]["test_samples"] == 300
    assert manifest["training"]["data"]["name"] == "shapes"


def test_dynamo_failure_falls_back_to_the_torchscript_exporter(tmp_path, monkeypatch, caplog):
    model = build_model(load_recipe("shapes").model, (1, 16, 16), 3, [0.5], [0.25]).eval()
    real_export = torch.onnx.export

    def dynamo_breaks(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("unsupported operator in this test")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    path = tmp_path / "model.onnx"
    assert export_onnx(WithProbabilities(model), path, (1, 16, 16), 21) == "torchscript"
    assert "unsupported operator in this test" in caplog.text
    graph = onnx.load(path)
    assert graph.opset_import[0].version <= 20
    onnx.checker.check_model(graph, full_check=True)
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8)
    logits, probs = _session(path).run(["logits", "probabilities"], {"images": x})
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert probs.shape == (3, 3)
