"""What a real CPU-only start writes to its log: only our own JSON lines, one FALLBACK each.

Meant for machines where onnxruntime-gpu lists CUDA but cannot start it (no GPU or no CUDA
libraries); where CUDA really starts, `--device auto` does not fall back and it is skipped.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import onnxruntime as ort
import pytest

from serving.runtime import CUDA, cuda_load_failure
from tests.serving_helpers import running_server
from tests.tiny_models import make_model, write_version


def _versions(messages: list[str], pattern: str) -> Counter:
    return Counter(m.group(1) for m in map(re.compile(pattern).match, messages) if m)


def test_auto_device_on_a_cpu_only_machine_logs_json_and_one_fallback_per_version(tmp_path):
    if CUDA in ort.get_available_providers() and cuda_load_failure(0) is None:
        pytest.skip("CUDA starts here: --device auto does not fall back")
    repo = tmp_path / "models"
    write_version(repo, "plain", 1)
    # A version with model.insight.onnx opens two ONNX Runtime sessions.
    write_version(
        repo,
        "with-insight",
        1,
        extra_files={"model.insight.onnx": make_model(metadata={}).SerializeToString()},
        edit_manifest=lambda m: m.update(insight={"stages": []}),
    )
    with running_server(repo, tmp_path, "--device", "auto", "--log-format", "json") as s:
        pass
    lines = s.log().splitlines()
    assert not [line for line in lines if "[E:onnxruntime" in line]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line is not JSON: {line!r}")
    messages = [r["message"] for r in records]
    both = Counter({"plain version 1": 1, "with-insight version 1": 1})
    assert _versions(messages, r"loaded (\S+ version \d+) ") == both
    assert _versions(messages, r"FALLBACK: (\S+ version \d+): ") == both, messages
    assert {r["level"] for r in records if r["message"].startswith("FALLBACK")} == {"warning"}
