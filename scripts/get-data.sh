#!/usr/bin/env bash
# Get Fashion-MNIST: the Debian package when we can install it, else a verified download.
set -euo pipefail
PY=${1:-python3}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian package dataset-fashion-mnist"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || echo "apt could not install dataset-fashion-mnist; falling back to download"
  fi
fi
# Locates (or downloads and verifies) the files; a clear error if neither works.
"$PY" -c "from trainer.data import load_dataset; d = load_dataset('fashion-mnist'); \
print(f'fashion-mnist ready: {len(d.train)} train, {len(d.test)} test images')"
