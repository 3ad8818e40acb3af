#!/usr/bin/env bash
# The main job end to end: train (short recipe) -> export -> serve -> classify over gRPC -> stop.
set -euo pipefail
VENV=${VENV:-.venv}
RUN=${DEMO_DIR:-runs/demo}
EPOCHS=${DEMO_EPOCHS:-2}
PORT=${DEMO_PORT:-50051}
METRICS_PORT=${DEMO_METRICS_PORT:-8000}
HTTP_PORT=${DEMO_HTTP_PORT:-8080}
KEEP=${DEMO_KEEP:-0}  # 1: keep serving at the end (the page stays up) until Ctrl-C
N_IMAGES=${DEMO_IMAGES:-1000}
PY=$VENV/bin/python
rm -rf "$RUN"

echo "== 1. train the Fashion-MNIST recipe for $EPOCHS epochs (DEMO_EPOCHS=20 for the full one)"
"$VENV/bin/cnn-train" --recipe fashion_mnist --out "$RUN" --repository "$RUN/models" \
  "train.epochs=$EPOCHS"

echo "== 2. write $N_IMAGES Fashion-MNIST test images as PNG files, one folder per class"
"$PY" - "$RUN/test-images" "$N_IMAGES" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
from trainer.data import load_dataset
out, n = Path(sys.argv[1]), int(sys.argv[2])
test = load_dataset("fashion-mnist").test
for i in range(n):
    folder = out / str(int(test.labels[i]))
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(test.images[i, 0]).save(folder / f"{i:05d}.png")
PYEOF

echo "== 3. start cnn-serve on port $PORT (HTTP on $HTTP_PORT, metrics on $METRICS_PORT)"
"$VENV/bin/cnn-serve" --model-repository "$RUN/models" --port "$PORT" \
  --http-port "$HTTP_PORT" --metrics-port "$METRICS_PORT" --host 127.0.0.1 \
  --metrics-host 127.0.0.1 >"$RUN/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
if ! "$PY" -m serving.probe "127.0.0.1:$PORT" --wait 60 >/dev/null; then
  echo "server did not become SERVING; its log:" >&2; cat "$RUN/server.log" >&2; exit 1
fi

echo "== 4. classify them over gRPC with cnn-predict"
"$VENV/bin/cnn-predict" --server "127.0.0.1:$PORT" --top-k 2 "$RUN/test-images" \
  >"$RUN/predictions.tsv"
head -5 "$RUN/predictions.tsv"
echo "   ... all $N_IMAGES predictions in $RUN/predictions.tsv"

echo "== 5. classify one over HTTP (KServe V2's REST peers: curl, tritonclient.http)"
IMAGE=$(find "$RUN/test-images" -name '*.png' | sort | head -1)
"$PY" - "http://127.0.0.1:$HTTP_PORT/v1/models/fashion-mnist/predict?top_k=1" "$IMAGE" <<'PYEOF'
import json, sys, urllib.request
body = open(sys.argv[2], "rb").read()
answer = json.load(urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=body)))
best = answer["predictions"][0]["classes"][0]
print(f"   POST {sys.argv[2]} -> {best['label']} ({best['probability']:.3f})")
PYEOF
echo "   try the model in a browser: http://127.0.0.1:$HTTP_PORT/"
if [ "$KEEP" = 1 ]; then
  echo "   (serving until Ctrl-C)"
  trap 'kill -TERM $SERVER; wait $SERVER' INT
  wait $SERVER || true
  exit 0
fi

echo "== 6. stop the server (SIGTERM: drain, exit 0; DEMO_KEEP=1 keeps it up for the page)"
kill -TERM $SERVER
wait $SERVER
trap - EXIT
echo "done: run directory $RUN (results.json, metrics.jsonl, models/, server.log)"
echo "report: $RUN/report.html (what the network learned; open it in a browser)"
