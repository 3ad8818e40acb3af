"""The serving install path, for real: the wheel, in a fresh venv without torch, serves.

The venv gets exactly what the CPU image installs (deploy/docker/Dockerfile): the pinned
requirements file with the CPU onnxruntime wheel, then the convserve wheel with --no-deps.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serving.client import Client
from tests.serving_helpers import ROOT, ServerProcess, free_port, wait_serving

REQUIREMENTS = ROOT / "deploy" / "docker" / "requirements-serving-cpu.txt"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_under_serving_imports_torch():
    sources = sorted((ROOT / "serving").rglob("*.py"))
    offenders = [str(p.relative_to(ROOT)) for p in sources if "torch" in imported_modules(p)]
    assert not offenders, f"serving/ must not import torch: {offenders}"
    # And nothing pulls it in indirectly: import every serving module in a clean process.
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in sources
        if p.name != "__init__.py" and "proto" not in p.parts
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def build_wheel(dist: Path, tmp: Path) -> Path:
    """Build from a copy of the sources, so setuptools leaves no build/ in the work tree."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("serving", "trainer"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("convserve-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_without_extras_serves_from_a_fresh_venv_without_torch(model_repository, tmp_path):
    wheel = build_wheel(tmp_path / "dist", tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    # This venv's pip installs into the fresh one (--python), so the fresh one needs no pip.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", py]
    for extra in (["-r", REQUIREMENTS], ["--no-deps", wheel]):
        out = subprocess.run([*pip, "install", *extra], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    # Every base dependency the wheel declares is met (onnxruntime-gpu by the CPU wheel),
    # and there is no torch.
    check = (
        "import importlib.metadata as md, importlib.util, json\n"
        "from packaging.requirements import Requirement\n"
        "missing = []\n"
        "for r in map(Requirement, md.requires('convserve')):\n"
        "    if r.marker and not r.marker.evaluate({'extra': ''}): continue\n"
        "    name = 'onnxruntime' if r.name == 'onnxruntime-gpu' else r.name\n"
        "    try: v = md.version(name)\n"
        "    except md.PackageNotFoundError: missing.append(r.name); continue\n"
        "    if not r.specifier.contains(v, prereleases=True): missing.append(f'{name}=={v}')\n"
        "torch = importlib.util.find_spec('torch') is not None\n"
        "ort = md.version('onnxruntime')\n"
        "print(json.dumps({'missing': missing, 'torch': torch, 'ort': ort}))\n"
    )
    facts = json.loads(subprocess.check_output([py, "-c", check], cwd=tmp_path, text=True))
    assert facts == {"missing": [], "torch": False, "ort": "1.31.1"}, facts

    port, mport, hport = free_port(), free_port(), free_port()
    log_path = tmp_path / "fresh-venv-server.log"
    cmd = [venv / "bin" / "cnn-serve", "--model-repository", model_repository, "--host",
           "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
           "--metrics-port", str(mport), "--device", "cpu", "--http-port", str(hport)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(log_path, "w") as log:
        # cwd outside the repository: the server must import convserve from the venv.
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, port, mport, log_path)
    try:
        wait_serving(server, timeout=90)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
        with Client(server.target) as client:
            assert client.health() == "SERVING"
            preds = client.predict(list(images), top_k=3)
        expected = reference_probabilities(model_repository, images)
        for pred, probs in zip(preds, expected, strict=True):
            assert pred.index == int(probs.argmax())
            assert pred.probability == pytest.approx(float(probs.max()), abs=1e-5)
        assert "convserve_requests_total" in server.metrics()
        assert "uvloop event loop" in server.log()  # the image's pinned uvloop is used
        # The wheel carries the page (package data) and the HTTP front end's dependencies.
        with urllib.request.urlopen(f"http://127.0.0.1:{hport}/", timeout=10) as r:
            assert b"<title>convserve" in r.read()
    finally:
        assert server.stop() == 0, server.log()


def reference_probabilities(repository: Path, images: np.ndarray) -> np.ndarray:
    """The exported graph run in this process (it carries its own preprocessing/softmax)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(repository / "fashion-mnist" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (probs,) = session.run(["probabilities"], {"images": images})
    return probs
