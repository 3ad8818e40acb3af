#!/usr/bin/env bash
# 1 vs 2 replicas through the round-robin client (cnn-bench, closed loop, 16 in flight), on
# one machine: two cnn-serve processes bound to 127.0.0.2 and 127.0.0.3 on the same port,
# measured alternately (1, 2, 1, 2). Both replicas share the machine's cores, so expect no
# gain here; the point is that the round-robin client spreads load without errors.
#   bash bench/replicas.sh [MODEL_REPOSITORY]   (default runs/bench-export/models)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REPO=${1:-runs/bench-export/models}
OUT=$(mktemp -d)
free_port() { $PY -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
P=$(free_port)
M=$(free_port)
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; rm -rf "$OUT"' EXIT
for h in 127.0.0.2 127.0.0.3; do
  $PY -m serving.main --model-repository "$REPO" --host $h --port "$P" --metrics-host $h \
    --metrics-port "$M" --device cpu --poll-interval 0 --log-level warning >"$OUT/$h.log" 2>&1 &
  pids+=($!)
done
for h in 127.0.0.2 127.0.0.3; do $PY -m serving.probe "$h:$P" --wait 120 >/dev/null; done
for rep in 1 2 1 2; do
  if [ $rep = 1 ]; then T=127.0.0.2:$P; else T=127.0.0.2:$P,127.0.0.3:$P; fi
  $PY -m serving.client.loadgen --target "$T" --concurrency 16 --duration 8 --warmup 2 \
    --json "$OUT/r.json" >/dev/null
  $PY -c "import json; r = json.load(open('$OUT/r.json')); l = r['latency_ms']; \
print('$rep replica(s): %.0f req/s, p50 %.1f ms, p99 %.1f ms, errors %s' \
% (r['requests_per_s'], l['p50'], l['p99'], r['error_count']))"
done
