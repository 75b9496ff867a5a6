#!/usr/bin/env bash
# Installs the Debian packages the build, the tests and the demo use, if any
# is missing. Go itself is expected on the PATH (Go 1.26).
set -o errexit -o nounset -o pipefail

packages=(
  clang-14 llvm-14    # the BPF objects, pinned to clang 14 (hack/generate.sh, make verify)
  shellcheck          # make verify: the lint of every shell script
  bpftool             # inspecting attached programs in tests and the demo
  iproute2            # network namespaces and veth pairs for test pods
  util-linux          # nsenter, flock
  iptables            # --mode=iptables: iptables-nft and iptables-legacy (restore, save)
  conntrack           # make bench: each cell's connections flushed from the nodes' tables
  nftables            # nft: upstream kube-proxy's nftables mode in make bench
  dnsutils            # dig
  dnsmasq-base        # a DNS server behind a ClusterIP (no system service)
  curl
  etcd-server         # the local cluster's etcd (make demo, end-to-end tests)
  prometheus          # Prometheus and promtool: the monitoring checks, make demo-up
  qemu-system-x86     # make kernels: the eBPF tests on Debian's 5.10, 6.1, 6.12 (TCG, no KVM needed)
  busybox-static      # make kernels: the VMs' init, modprobe and depmod
  cpio                # make kernels: the VMs' initramfs
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "Installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null; then
  if [ -x /usr/local/go/bin/go ]; then
    echo "go is in /usr/local/go/bin: add it to PATH" >&2
  else
    echo "Go 1.26 is needed: https://go.dev/doc/install" >&2
  fi
  exit 1
fi
