"""Triton's gRPC extensions as a Triton user's script calls them, with tritonclient.grpc.

Run by tests/test_triton_extensions.py from the tritonclient venv (never imported by the
suite: tritonclient declares its own `inference` protos):

    python triton_grpc_extensions.py SERVER MODEL X.npy OUT.json

X.npy holds uint8 images (N, 1, 28, 28). Prints nothing; writes what each call answered
(probabilities as lists) to OUT.json for the test to check against ONNX Runtime.
"""

import json
import queue
import sys
from functools import partial

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

server, model, x_path, out_path = sys.argv[1:5]
x = np.load(x_path)
c = grpcclient.InferenceServerClient(server)
out = {}


def attempt(name, fn):
    try:
        out[name] = fn()
    except InferenceServerException as exc:
        out[name] = {"error": exc.status(), "message": exc.message()}


def collect(q, result, error):  # tritonclient calls back with keywords
    q.put((result, error))


def infer_input(images):
    i = grpcclient.InferInput("images", list(images.shape), "UINT8")
    i.set_data_from_numpy(images)
    return i


# 1. repository index (before any load: explicit mode serves nothing yet)
attempt("index_before", lambda: c.get_model_repository_index(as_json=True))
# 2. load
attempt("load", lambda: c.load_model(model) or "ok")
attempt("index_after", lambda: c.get_model_repository_index(as_json=True))
attempt("ready", lambda: c.is_model_ready(model))
# 3. model config
attempt("config", lambda: c.get_model_config(model, as_json=True))
# 4. async inference
results = queue.Queue()
c.async_infer(model, [infer_input(x[:4])], partial(collect, results))
r, e = results.get(timeout=60)
out["async_infer"] = {"error": str(e)} if e else r.as_numpy("probabilities").tolist()
# 5. classification extension
attempt(
    "classification",
    lambda: [
        s.decode()
        for s in c.infer(
            model,
            [infer_input(x[:2])],
            outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)],
        )
        .as_numpy("probabilities")
        .ravel()
    ],
)
# 6. stream inference: four requests, the third with the wrong datatype
answers = queue.Queue()
c.start_stream(callback=partial(collect, answers))
for i in range(4):
    if i == 2:
        bad = grpcclient.InferInput("images", [1, 1, 28, 28], "FP32")
        bad.set_data_from_numpy(x[:1].astype(np.float32))
        c.async_stream_infer(model, [bad], request_id="bad")
    else:
        c.async_stream_infer(model, [infer_input(x[i : i + 1])], request_id=str(i))
stream = []
for _ in range(4):
    r, e = answers.get(timeout=60)
    stream.append(
        {"error": e.message()}
        if e
        else {"id": r.get_response().id, "p": r.as_numpy("probabilities").tolist()}
    )
c.stop_stream()
out["stream"] = stream
# 7. system shared memory: inputs from a region, outputs into another
n = 8
in_bytes, out_bytes = x[:n].nbytes, n * 10 * 4
h_in = shm.create_shared_memory_region("cs_in", "/cs_test_in", in_bytes)
h_out = shm.create_shared_memory_region("cs_out", "/cs_test_out", out_bytes)
try:
    shm.set_shared_memory_region(h_in, [np.ascontiguousarray(x[:n])])
    c.register_system_shared_memory("cs_in", "/cs_test_in", in_bytes)
    c.register_system_shared_memory("cs_out", "/cs_test_out", out_bytes)
    out["shm_status"] = c.get_system_shared_memory_status(as_json=True)
    i = grpcclient.InferInput("images", [n, 1, 28, 28], "UINT8")
    i.set_shared_memory("cs_in", in_bytes)
    o = grpcclient.InferRequestedOutput("probabilities")
    o.set_shared_memory("cs_out", out_bytes)
    c.infer(model, [i], outputs=[o])
    out["shm"] = shm.get_contents_as_numpy(h_out, np.float32, [n, 10]).tolist()
    c.unregister_system_shared_memory()
    out["shm_status_after"] = c.get_system_shared_memory_status(as_json=True)
finally:
    shm.destroy_shared_memory_region(h_in)
    shm.destroy_shared_memory_region(h_out)
# 8. statistics (after the inferences above)
attempt("statistics", lambda: c.get_inference_statistics(model, as_json=True))
# 9. trace and log settings
attempt("trace", lambda: c.get_trace_settings(as_json=True))
attempt("trace_on", lambda: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}))
attempt("log", lambda: c.get_log_settings(as_json=True))
attempt("log_verbose", lambda: c.update_log_settings({"log_verbose_level": 1}, as_json=True))
attempt("log_back", lambda: c.update_log_settings({"log_verbose_level": 0}, as_json=True))
# 10. unload
attempt("unload", lambda: c.unload_model(model) or "ok")
attempt("ready_after_unload", lambda: c.is_model_ready(model))
c.close()
with open(out_path, "w") as f:
    json.dump(out, f)
