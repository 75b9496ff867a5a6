#!/usr/bin/env bash
# Benchmarks, reported as measured in one run (needs root for kernel maps).
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
hack/deps.sh
go test -run '^$' -bench . -benchtime "${BENCHTIME:-5x}" ./internal/dataplane/ebpf/ ./internal/model/
