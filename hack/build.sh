#!/usr/bin/env bash
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
mkdir -p _output
# The version --version and the kube_bpf_proxy_info metric report.
version="$(git describe --tags --always --dirty 2>/dev/null || echo unknown)"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/kube-bpf-proxy/kube-bpf-proxy/internal/version.stamp=$version" \
  -o _output/kube-bpf-proxy ./cmd/kube-bpf-proxy
echo "built _output/kube-bpf-proxy"
