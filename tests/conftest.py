"""Session fixtures every test file may share: one short Fashion-MNIST run, exported once.

The names are a contract between test files (export, serving, metrics, client):
`fashion_run` is a finished run directory, `model_repository` a model repository holding it as
`fashion-mnist` version 1 with the ORT-optimised and INT8 variants.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving_helpers import ROOT

# `cnn-serve` processes the tests start inherit this: no HTTP port (its default, 8080, would
# be shared by every server of the suite). A test that serves HTTP passes --http-port.
os.environ["CONVSERVE_HTTP_PORT"] = "0"

# A small stride-2 CNN: two epochs reach about 0.89 test accuracy in well under a minute on
# 2 CPU cores (no augmentation, no EMA, plain NCHW; the validation split picks best.pt).
FASHION_FAST = [
    "model.preset=null",
    "model.layers=[{type: conv, filters: 16, stride: 2, bn: false},"
    " {type: conv, filters: 32, stride: 2, bn: false},"
    " {type: flatten}, {type: linear, units: 64}]",
    "train.epochs=2",
    "train.batch_size=128",
    "train.ema_decay=null",
    "train.channels_last=false",
    "data.val_size=2000",
    "data.download=false",
    "augment.crop_padding=0",
    "augment.flip=false",
    # the suite's served model is the plain network trained the plain way: test-time views
    # and Muon have their own tests (test_training_tricks.py)
    "optim.conv_update=sgd",
    "export.tta=none",
    "train.select=val_accuracy",
]


@pytest.fixture(scope="session")
def fashion_run(tmp_path_factory) -> Path:
    """A run directory (checkpoints/best.pt, results.json, ...) of a quick Fashion-MNIST run."""
    from trainer.data import DataError
    from trainer.recipe import load_recipe
    from trainer.run import fit

    run_dir = tmp_path_factory.mktemp("fashion_run")
    try:
        fit(load_recipe("fashion_mnist", FASHION_FAST), run_dir, quiet=True)
    except DataError as exc:
        pytest.skip(f"Fashion-MNIST is not available (run `make data`): {exc}")
    return run_dir


@pytest.fixture(scope="session")
def model_repository(fashion_run, tmp_path_factory) -> Path:
    """A model repository with `fashion-mnist/1` (model.onnx, model.opt.onnx, model.int8.onnx)."""
    from trainer.export import export_checkpoint

    repo = tmp_path_factory.mktemp("models")
    export_checkpoint(fashion_run, repo, "fashion-mnist", version=1, optimize=True, int8=True)
    return repo


@pytest.fixture(scope="session")
def fashion_test():
    """The Fashion-MNIST test set (10,000 images)."""
    from trainer.data import load_dataset

    return load_dataset("fashion-mnist").test


@pytest.fixture(scope="session")
def version_dir(model_repository) -> Path:
    """`model_repository`'s fashion-mnist/1."""
    return model_repository / "fashion-mnist" / "1"


TRITON_VENV = ROOT / ".venv-tritonclient"
TRITON_STAMP = TRITON_VENV / ".installed-grpc-http"  # the Makefile's stamp: keep them equal
TRITON_PACKAGES = ("tritonclient[grpc,http]==2.73.0", "numpy")


@pytest.fixture(scope="session")
def tritonclient_python() -> str:
    """tritonclient lives in its own venv (it ships its own `inference` protos and wants
    protobuf < 7); `make test` creates it, and so does this fixture when it is missing."""
    python = TRITON_VENV / "bin" / "python"
    if not TRITON_STAMP.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRITON_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *TRITON_PACKAGES],
            check=True,
        )
        TRITON_STAMP.touch()
    return str(python)


KSERVE_VENV = ROOT / ".venv-kserve"
KSERVE_STAMP = KSERVE_VENV / ".installed"  # the Makefile's stamp: keep them equal
KSERVE_PACKAGES = ("kserve==0.21.0",)  # it pins protobuf < 7 (ours is 7): a venv of its own


@pytest.fixture(scope="session")
def kserve_python() -> str:
    """The KServe Python SDK (its REST client) in its own venv; `make test` creates it, and so
    does this fixture when it is missing (about a minute, 450 MB)."""
    python = KSERVE_VENV / "bin" / "python"
    if not KSERVE_STAMP.exists():
        subprocess.run([sys.executable, "-m", "venv", str(KSERVE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *KSERVE_PACKAGES], check=True)
        KSERVE_STAMP.touch()
    return str(python)
