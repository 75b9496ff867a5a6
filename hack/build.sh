#!/usr/bin/env bash
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
mkdir -p _output
CGO_ENABLED=0 go build -trimpath -o _output/kube-bpf-proxy .
echo "built _output/kube-bpf-proxy"
