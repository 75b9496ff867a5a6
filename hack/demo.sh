#!/usr/bin/env bash
# The newcomer's first command: installs what it needs, then shows the eBPF
# datapath serving a ClusterIP to curl and dig in throw-away namespaces.
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "make demo needs root (network namespaces, cgroups, BPF): run it with sudo" >&2
  exit 1
fi
hack/deps.sh
mkdir -p _output
go build -o _output/demo ./hack/demo
exec _output/demo
