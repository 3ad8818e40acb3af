"""The code's shape is checked, not only reviewed: the import-linter contracts in
pyproject.toml (no import cycles; serving imports no torch, onnx or trainer; the core no gRPC
or protobuf; the contract only the standard library; a request walks down the layers), and
no module of ours so long that it holds several ideas."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.serving_helpers import ROOT

MAX_MODULE_LINES = 400
GENERATED = ROOT / "serving" / "proto"


def test_every_import_linter_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports is missing: `make install` installs import-linter (dev extra)"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_no_module_of_serving_or_trainer_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for package in ("serving", "trainer")
        for p in sorted((ROOT / package).rglob("*.py"))
        if not p.is_relative_to(GENERATED)
        and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"over {MAX_MODULE_LINES} lines (split by idea): {long}"
