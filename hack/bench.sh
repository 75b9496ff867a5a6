#!/usr/bin/env bash
# make bench: every datapath side by side on a local cluster (see
# test/bench and docs/benchmarks.md): direct pod IPs, kube-bpf-proxy's ebpf
# and iptables (nft, legacy) modes and upstream kube-proxy's iptables (legacy,
# nft) and nftables modes, at 0, 1k and 10k background Services. About 40
# minutes on 2 cores; QUICK=1 runs the reduced matrix the tests run (about 5
# minutes); LARGE=1 adds 20k and 50k (the background Services are written
# into etcd: --load=etcd, LARGE's default; through the API, the default
# of the other runs (--load=api), 50k take hours). Needs root: network namespaces, cgroups, BPF, iptables in
# the nodes' namespaces. Extra arguments go to the benchmark (`--help`).
#
#   hack/bench.sh                       the full run, report in _output/bench-report
#   QUICK=1 hack/bench.sh               the quick run, report in _output/bench-quick
#   LARGE=1 hack/bench.sh               the full run at 0, 1k, 10k, 20k and 50k
#   hack/bench.sh --sizes=0,10000 --contenders=direct,ebpf
#   hack/bench.sh --family=ipv6 --sizes=0,1000   the IPv6 rows (docs/benchmarks.md, "IPv6 rows")
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then
    exec sudo -E "$0" "$@"
  fi
  echo "make bench needs root (network namespaces, cgroups, BPF): run it as root" >&2
  exit 1
fi
hack/deps.sh
mkdir -p _output
echo "==> Kubernetes control plane and upstream kube-proxy (built once, cached in ${KBP_CACHE:-/var/cache/kube-bpf-proxy})"
KUBE_BIN="$(hack/kube-build.sh 2> _output/kube-build.log)" || { cat _output/kube-build.log; echo "building Kubernetes failed (log: _output/kube-build.log)" >&2; exit 1; }
echo "    $KUBE_BIN"
echo "==> Building kube-bpf-proxy and the benchmark"
hack/build.sh
go build -o _output/bench ./hack/bench
args=(--kube-bin "$KUBE_BIN")
if [ -n "${QUICK:-}" ] && [ "${QUICK}" != 0 ]; then
  args+=(--quick)
fi
if [ -n "${LARGE:-}" ] && [ "${LARGE}" != 0 ]; then
  args+=(--large)
fi
exec _output/bench "${args[@]}" "$@"
