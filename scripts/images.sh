#!/usr/bin/env bash
# Build the CPU images (serving, trainer) with whichever container engine answers.
#
#   bash scripts/images.sh [serving] [train] [prometheus]     (default: serving train)
#
# Settings (environment variables; `make images VAR=...` passes them):
#   ENGINE        docker or podman (default: the first whose `info` succeeds; a docker
#                 client with no engine behind it does not count)
#   LOCAL_BASE=1  make the base images from Debian packages with mmdebstrap, for machines
#                 that reach no image registry (Python 3.11 from bookworm instead of the
#                 official python:3.12 image); `prometheus` needs it
#   PYTHON_IMAGE  the base image (default: the Dockerfiles' official python image)
#   PIP_CA        a CA bundle pip inside the build trusts, for a TLS-intercepting proxy
#                 (default: the system bundle, when there is one); passed as a build secret,
#                 so no layer keeps it
#   TORCH_WHEEL   a torch wheel the trainer image installs instead of asking PyTorch's index
#   TAG           image tag (default 0.1.0)
# With podman on a cgroup v1 host, CONTAINERS_CONF defaults to deploy/podman/containers.conf
# (runc, rlimits: what such hosts need).
set -euo pipefail
cd "$(dirname "$0")/.."
tar=""
trap 'rm -f deploy/docker/wheels/torch-*.whl ${tar:+"$tar"}' EXIT

TAG=${TAG:-0.1.0}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(serving train)

if [ -z "${ENGINE:-}" ]; then
  for e in docker podman; do
    if command -v "$e" >/dev/null && "$e" info >/dev/null 2>&1; then ENGINE=$e; break; fi
  done
fi
[ -n "${ENGINE:-}" ] || { echo "no container engine answers (docker info, podman info)" >&2; exit 1; }
if [ "$ENGINE" = podman ] && [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then  # cgroup v1
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
fi

# A base image from Debian packages: mmdebstrap writes a root filesystem, the engine imports
# it. Made once; a later run reuses it.
debian_base() {  # NAME PACKAGES
  if "$ENGINE" image inspect "$1" >/dev/null 2>&1; then return; fi
  command -v mmdebstrap >/dev/null || { echo "LOCAL_BASE=1 needs mmdebstrap" >&2; exit 1; }
  tar=$(mktemp --suffix=.tar)
  echo "making base image $1 from Debian bookworm packages: $2"
  mmdebstrap --quiet --variant=minbase --include="$2" bookworm "$tar"
  # An imported root filesystem has no environment: give it the usual PATH.
  "$ENGINE" import --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "$tar" "$1" >/dev/null
  rm -f "$tar"
}

if [ "${LOCAL_BASE:-0}" = 1 ]; then
  PYTHON_IMAGE=${PYTHON_IMAGE:-localhost/convserve-base:bookworm}
  debian_base "$PYTHON_IMAGE" python3,python3-venv,python3-pip,python-is-python3,ca-certificates
fi

build=("$ENGINE" build --network host)
[ "$ENGINE" = podman ] && build+=(--format docker)  # OCI format drops HEALTHCHECK
[ -n "${PYTHON_IMAGE:-}" ] && build+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
PIP_CA=${PIP_CA:-}
[ -z "$PIP_CA" ] && [ -s /etc/ssl/certs/ca-certificates.crt ] && PIP_CA=/etc/ssl/certs/ca-certificates.crt
[ -n "$PIP_CA" ] && build+=(--secret "id=pip-ca,src=$PIP_CA")
[ "$ENGINE" = docker ] && export DOCKER_BUILDKIT=1  # RUN --mount needs BuildKit

for target in "${targets[@]}"; do
  case $target in
    serving)
      "${build[@]}" -f deploy/docker/Dockerfile -t "convserve:$TAG" . ;;
    train)
      rm -f deploy/docker/wheels/torch-*.whl
      if [ -n "${TORCH_WHEEL:-}" ]; then
        ln "$TORCH_WHEEL" deploy/docker/wheels/ 2>/dev/null || cp "$TORCH_WHEEL" deploy/docker/wheels/
      fi
      "${build[@]}" -f deploy/docker/Dockerfile.train -t "convserve-train:$TAG" . ;;
    prometheus)
      [ "${LOCAL_BASE:-0}" = 1 ] || { echo "prometheus: an image made with LOCAL_BASE=1 only" >&2; exit 1; }
      debian_base "localhost/convserve-prometheus:bookworm" prometheus,ca-certificates ;;
    *) echo "unknown image: $target (serving, train, prometheus)" >&2; exit 2 ;;
  esac
done
