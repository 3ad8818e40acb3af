#!/usr/bin/env bash
# HAProxy in front of one convserve replica (haproxy.cfg says why). Foreground; stop it with
# SIGTERM or Ctrl-C. Debian/Ubuntu: apt-get install haproxy (2.6 is tested here).
#
#   deploy/haproxy/run.sh                      # :8500 -> 127.0.0.1:50051
#   CONVSERVE_UPSTREAM=10.0.0.5:50051 CONVSERVE_PROXY_INFLIGHT=32 deploy/haproxy/run.sh
#
# CONVSERVE_PROXY_BIND      where clients connect (default 0.0.0.0:8500)
# CONVSERVE_UPSTREAM        the convserve gRPC port (default 127.0.0.1:50051)
# CONVSERVE_PROXY_INFLIGHT  calls in convserve at once (default 64: about what reaches its
#                           closed-loop capacity; more only queues inside it)
# CONVSERVE_PROXY_QUEUE_MS  how long a call may wait here for a slot before it is refused
#                           UNAVAILABLE (default 25: well inside a 0.5 s deadline)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONVSERVE_PROXY_DIR="$here"
export CONVSERVE_PROXY_BIND="${CONVSERVE_PROXY_BIND:-0.0.0.0:8500}"
export CONVSERVE_UPSTREAM="${CONVSERVE_UPSTREAM:-127.0.0.1:50051}"
export CONVSERVE_PROXY_INFLIGHT="${CONVSERVE_PROXY_INFLIGHT:-64}"
export CONVSERVE_PROXY_QUEUE_MS="${CONVSERVE_PROXY_QUEUE_MS:-25}"
exec haproxy -db -f "$here/haproxy.cfg"
