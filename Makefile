# convserve: the commands a newcomer needs. Every target does its own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install system-deps images proto data demo test test-fast fuzz lint format bench bench-train bench-ood bench-export bench-explain bench-serving bench-http bench-shm bench-targets bench-cpu bench-metrics bench-tracing bench-arena overload soak clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# constraints.txt pins torch to the release with a local CPU wheel (no CUDA download)
	$(PIP) install -q -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install convserve with its train and dev extras

proto: $(STAMP)  ## regenerate serving/proto/ from protos/ (commit the result)
	bash scripts/gen-proto.sh serving/proto $(PY)

data: $(STAMP)  ## get the datasets (Debian package when possible, else verified download)
	bash scripts/get-data.sh $(PY)

demo: install data  ## train (short), export, serve, classify test images over gRPC, stop
	DEMO_DIR=$(DEMO_DIR) VENV=$(VENV) bash scripts/demo.sh

TRITON_VENV := .venv-tritonclient

TRITON_STAMP := $(TRITON_VENV)/.installed-grpc-http

# tritonclient in a venv of its own: it declares its own `inference` protos and wants protobuf<7.
# Its packages are tests/conftest.py's TRITON_PACKAGES (the fixture makes the venv when missing).
$(TRITON_STAMP):
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q 'tritonclient[grpc,http]==2.73.0' numpy
	touch $@

KSERVE_VENV := .venv-kserve

# The KServe Python SDK, whose REST client the HTTP tests drive: it pins protobuf < 7.
# Its packages are tests/conftest.py's KSERVE_PACKAGES.
$(KSERVE_VENV)/.installed:
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q 'kserve==0.21.0'
	touch $@

CHECKOV_VENV := .venv-checkov

# checkov (policy linter for deploy/k8s) in a venv of its own: it pins old packaging and boto
# releases that must not leak into .venv.
$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==3.3.30'
	touch $@

system-deps:  ## the Debian packages the tests run (prometheus, chromium, podman...): apt as root, else the command to run
	bash scripts/system-deps.sh

# Build the CPU images (serving, trainer) with docker or podman, whichever answers. Settings
# are scripts/images.sh's: LOCAL_BASE=1 (bases from Debian packages), PYTHON_IMAGE, PIP_CA,
# TORCH_WHEEL, ENGINE, TAG.
images:  ## build the CPU serving and trainer images (docker or podman)
	bash scripts/images.sh serving train

test: system-deps install data $(TRITON_STAMP) $(KSERVE_VENV)/.installed $(CHECKOV_VENV)/.installed  ## the whole test suite
	$(PY) -m pytest -q

# The edit-test loop: every test not marked slow (no images, real Prometheus, extra venvs,
# multi-process training); the system packages the suite uses are not installed here.
test-fast: install data  ## the fast tier: pytest -m "not slow"
	$(PY) -m pytest -q -m "not slow"

FUZZ_SECONDS ?= 120

# Coverage-guided fuzzing (atheris) of image decoding and V2 tensor parsing, FUZZ_SECONDS per
# target; figures in runs/fuzz/fuzz.json, crashing inputs in runs/fuzz/artifacts/. Not in `test`.
fuzz: install  ## fuzz the codec and V2 tensor parsing for FUZZ_SECONDS each; writes runs/fuzz/fuzz.json
	$(PIP) install -q 'atheris>=3.0'  # the fuzz extra, without reinstalling convserve
	$(PY) scripts/fuzz.py --seconds $(FUZZ_SECONDS) --out runs/fuzz/fuzz.json

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-train: install data  ## the default recipe over 3 seeds (accuracy, wall), each trick's cost, TTA's served price; writes bench/results/train_fashion.json, trick_cost.json, tta_price.json
	$(PY) bench/train_fashion.py --seeds 0 1 2 --keep-runs runs/bench-train --out bench/results/train_fashion.json
	$(PY) bench/trick_cost.py --out bench/results/trick_cost.json
	$(PY) bench/tta_price.py --run runs/bench-train/seed0 --out bench/results/tta_price.json

bench-ood: install data  ## how the out-of-distribution score separates Fashion-MNIST from handwritten digits and noise photos (AUROC, flagged share); trains the default recipe once into runs/bench-ood (~7 min); writes bench/results/ood_quality.json
	test -f runs/bench-ood/run/checkpoints/last.pt || $(VENV)/bin/cnn-train --recipe fashion_mnist --out runs/bench-ood/run --no-export --no-report --quiet
	rm -rf runs/bench-ood/models
	$(VENV)/bin/cnn-export --checkpoint runs/bench-ood/run --repository runs/bench-ood/models --name fashion-mnist --version 1 --quiet
	$(PY) bench/ood_quality.py --version-dir runs/bench-ood/models/fashion-mnist/1 --out bench/results/ood_quality.json

bench-export: install data  ## ORT CPU images/s of the fp32, optimised and INT8 exports; writes bench/results/export.json
	$(PY) bench/export_bench.py --out bench/results/export.json

bench-explain: install data  ## Explain latency and forward passes, then explanation quality (pointing game, deletion/insertion) against captum; writes bench/results/explain.json, explain_quality.json
	test -f runs/bench-export/models/fashion-mnist/1/model.onnx || $(MAKE) bench-export
	$(PY) bench/explain_bench.py --out bench/results/explain.json
	# captum's metadata pins numpy<2; it runs on numpy 2, and its deps would downgrade ours
	$(PIP) install -q --no-deps 'captum==0.8.0'
	$(PY) bench/explain_quality.py --run runs/bench-export/run --out bench/results/explain_quality.json

TRITON_BENCH_VENV := bench/.venv-triton

# NVIDIA Triton's core for the serving benchmark: nvidia-pytriton bundles the tritonserver
# binary (Python backend only). A venv of its own: it pins its own protobuf and grpc stack.
# Same onnxruntime release as .venv, so both servers run the same kernels.
$(TRITON_BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_BENCH_VENV)
	$(TRITON_BENCH_VENV)/bin/pip install -q 'nvidia-pytriton==0.7.0' 'tritonclient[grpc]==2.73.0' \
		"onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')" numpy
	touch $@

MLSERVER_BENCH_VENV := bench/.venv-mlserver

# MLServer for the HTTP benchmark, in a venv of its own (its own protobuf, FastAPI, uvicorn),
# with the same onnxruntime release as .venv. uvloop < 0.22: MLServer 1.7's parallel
# inference workers call asyncio.get_event_loop() outside a loop, which uvloop 0.22 refuses.
$(MLSERVER_BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(MLSERVER_BENCH_VENV)
	$(MLSERVER_BENCH_VENV)/bin/pip install -q 'mlserver==1.7.1' 'uvloop==0.21.0' \
		"onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')" numpy
	touch $@

$(VENV)/bin/py-spy: | $(STAMP)
	$(PIP) install -q 'py-spy==0.4.3'

bench-serving: install data $(TRITON_BENCH_VENV)/.installed $(MLSERVER_BENCH_VENV)/.installed $(VENV)/bin/py-spy  ## convserve vs ORT in-process, a naive server, Triton (gRPC) and then MLServer and Triton over HTTP; writes bench/results/serving.{json,md}, http.{json,md} and latency_throughput.png
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) bench/serving_bench.py --out-dir bench/results $(BENCH_SERVING_ARGS)
	$(PY) bench/http_bench.py --out bench/results $(BENCH_HTTP_ARGS)

bench-http: install data $(TRITON_BENCH_VENV)/.installed $(MLSERVER_BENCH_VENV)/.installed  ## the HTTP part of bench-serving alone: convserve's HTTP port vs MLServer, Triton core and its own gRPC; writes bench/results/http.{json,md}
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) bench/http_bench.py --out bench/results $(BENCH_HTTP_ARGS)

bench-shm: install data  ## Triton's system shared memory vs raw_input_contents at 32 images per request; writes bench/results/shm.{json,md}
	$(PY) bench/shm_bench.py --out bench/results $(BENCH_SHM_ARGS)

bench-targets: install data $(TRITON_BENCH_VENV)/.installed  ## the serving targets: every system up at once, measured in turn over 5 rounds; writes bench/results/serving_targets.{json,md}
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) bench/serving_targets.py --out-dir bench/results $(BENCH_TARGETS_ARGS)

bench-cpu: install data  ## CPU per served request by thread and library (perf, system-wide); writes bench/results/cpu_breakdown_{c1,32}.json
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	command -v perf >/dev/null || (apt-get update -qq && apt-get install -y -qq linux-perf)
	$(PY) bench/cpu_breakdown.py --scenario c1 --system naive --system convserve \
		--out bench/results/cpu_breakdown_c1.json
	$(PY) bench/cpu_breakdown.py --scenario 32 --system naive --system "convserve, 2 workers" \
		--out bench/results/cpu_breakdown_32.json

bench-metrics: install data  ## what metrics cost: server with and without them, interleaved A/B under h2load; writes bench/results/metrics_cost.json
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) bench/metrics_cost.py --out bench/results/metrics_cost.json $(BENCH_METRICS_ARGS)

# BENCH_TRACING_ARGS="--base DIR": DIR a checkout of the commit before tracing, run beside it.
bench-tracing: install data  ## what OpenTelemetry tracing costs at c64: off, on (exported to an OTLP receiver), 1 in 100, interleaved under h2load; writes bench/results/tracing_cost.json
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) bench/tracing_cost.py --out bench/results/tracing_cost.json $(BENCH_TRACING_ARGS)

SERVED_MODEL := runs/bench-export/models/fashion-mnist/1/model.onnx
SOAK_SECONDS ?= 600

overload: install data  ## capacity, then 4x and 10x it open loop, ours and 513f521's, alone and behind HAProxy; writes bench/results/overload.json
	test -f $(SERVED_MODEL) || $(MAKE) bench-export
	$(PY) bench/overload.py --out bench/results/overload.json $(OVERLOAD_ARGS)

soak: install data  ## SOAK_SECONDS (600) at 70% of the sustainable rate: RSS growth, open fds; writes bench/results/soak.json
	test -f $(SERVED_MODEL) || $(MAKE) bench-export
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) bench/soak.py --out bench/results/soak.json $(SOAK_ARGS)

bench-arena: install data  ## RSS of ONNX Runtime's CPU memory settings on random batch sizes; writes bench/results/arena.json
	test -f $(SERVED_MODEL) || $(MAKE) bench-export
	$(PY) bench/arena_rss.py --model $(SERVED_MODEL) --out bench/results/arena.json

bench: bench-train bench-export bench-explain bench-serving bench-targets bench-metrics bench-tracing

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
