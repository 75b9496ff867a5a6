#!/usr/bin/env bash
# Regenerates the BPF objects and their Go bindings from bpf/ with Debian's clang.
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
go generate ./internal/dataplane/ebpf/
