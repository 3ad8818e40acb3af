"""MLServer serving the same ONNX model, for `make bench-http` (run from bench/.venv-mlserver).

MLServer ships no ONNX Runtime runtime, so this is what a user writes: a custom `MLModel`
whose `predict` runs an ONNX Runtime session with convserve's session options (the ones
bench/triton_server.py uses too) on the decoded input. `http_bench.py` writes the settings
(`settings.json`, `model-settings.json` naming `mlserver_model.OrtModel`) and starts
`mlserver start` on them; MLServer's adaptive batching is on with the same batch limit as
the others (`max_batch_size` 64, `max_batch_time` 0.5 ms), its parallel workers at their
default.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


def _session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class OrtModel(MLModel):
    async def load(self) -> bool:
        self._session = _session(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0]).astype(np.uint8, copy=False)
        (probs,) = self._session.run(["probabilities"], {"images": images})
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("probabilities", probs)],
        )
