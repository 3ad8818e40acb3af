#!/usr/bin/env bash
# The system programs the test suite runs for real, each with the Debian package that has it.
# As root with apt, the missing ones are installed; otherwise this stops at once and prints
# the exact command. `make test` calls it first, so a fresh machine needs nothing by hand.
set -euo pipefail

# path or command | Debian package | what needs it
NEEDED=(
  "prometheus|prometheus|a real Prometheus scrapes the server and the serving container"
  "promtool|prometheus|promtool checks and unit-tests the recording and alerting rules"
  "/usr/bin/chromium|chromium|the HTML report opens in headless Chromium"
  "podman|podman|the images are built and run as containers"
  "runc|runc|podman's runtime here (crun refuses cgroup v1 with a unified mount)"
  "catatonit|catatonit|the infra container of the pods podman kube play starts"
  "mmdebstrap|mmdebstrap|base images made from Debian packages when no registry answers"
  "/usr/lib/cni/dnsname|golang-github-containernetworking-plugin-dnsname|Compose services find each other by name"
  "h2load|nghttp2-client|open-loop gRPC load at a fixed rate for the overload tests"
  "/usr/sbin/haproxy|haproxy|deploy/haproxy: admission in front of the server under overload"
  "curl|curl|the HTTP tests call the REST API the way the README shows, with curl"
)

missing=()
for entry in "${NEEDED[@]}"; do
  IFS='|' read -r what package _ <<<"$entry"
  if [[ $what == /* ]]; then [ -e "$what" ] && continue; else command -v "$what" >/dev/null && continue; fi
  [[ " ${missing[*]} " == *" $package "* ]] || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages the tests need: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "the tests need these Debian packages: ${missing[*]}" >&2
for entry in "${NEEDED[@]}"; do
  IFS='|' read -r what package why <<<"$entry"
  [[ " ${missing[*]} " == *" $package "* ]] && echo "  $package: $why" >&2
done
echo "install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
exit 1
