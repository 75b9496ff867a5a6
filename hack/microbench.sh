#!/usr/bin/env bash
# The Go micro-benchmarks (make microbench), reported as measured in one run (needs root: kernel maps,
# iptables in test namespaces). Both modes program the same 10k Services x
# 10 endpoints (apitest.ScaleSnapshot), so their numbers sit side by side.
#
# iptables-nft 1.8.9's restore --noflush grows faster than linearly with the
# number of chains: one full sync of 10k x 10 takes many minutes. The nft
# backend is therefore measured at 1000 Services unless
# KBP_BENCH_SERVICES_NFT says otherwise (10000 to measure it at full size).
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
hack/deps.sh
export KBP_BENCH_SERVICES_NFT="${KBP_BENCH_SERVICES_NFT:-1000}"
go test -run '^$' -bench . -benchtime "${BENCHTIME:-5x}" -timeout 60m \
  ./internal/dataplane/ebpf/ ./internal/model/ ./internal/watch/
# An iptables sync at this size takes seconds: fewer rounds.
go test -run '^$' -bench . -benchtime "${IPTABLES_BENCHTIME:-2x}" -timeout 60m \
  ./internal/dataplane/iptables/
