#!/usr/bin/env bash
# The newcomer's first command: installs what it needs, builds the proxy's
# image and (once, cached outside the repo) the Kubernetes control plane,
# then shows kube-bpf-proxy, run from the image, on a local two-node cluster
# in both modes.
#
#   hack/demo.sh           the tour, then everything is removed   (make demo)
#   hack/demo.sh --keep    leave the cluster running               (make demo-up)
#   hack/demo.sh --down    remove it                               (make demo-down)
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  # Root shells run it as is; elsewhere sudo, where there is one, with the
  # caller's PATH (Go may be installed outside sudo's secure_path).
  if command -v sudo >/dev/null; then
    exec sudo env "PATH=$PATH" "$0" "$@"
  fi
  echo "the demo needs root (network namespaces, cgroups, BPF): run it as root" >&2
  exit 1
fi
mkdir -p _output
if [ "${1:-}" != --down ]; then
  hack/deps.sh
  echo "==> Building Kubernetes control-plane binaries (once; cached in ${KBP_CACHE:-/var/cache/kube-bpf-proxy})"
  # Its standard output is the binaries' directory; the build log goes to stderr.
  KUBE_BIN="$(hack/kube-build.sh 2> _output/kube-build.log)" || { cat _output/kube-build.log; echo "building Kubernetes failed (log: _output/kube-build.log)" >&2; exit 1; }
  export KUBE_BIN
  echo "    $KUBE_BIN"
  echo "==> Building the kube-bpf-proxy image (its Debian root filesystem once with debootstrap, cached; docs/image.md)"
  hack/image.sh
fi
go build -o _output/demo ./hack/demo
# --keep runs hack/cluster's forwarder to Prometheus.
go build -o _output/cluster ./hack/cluster
exec _output/demo "$@"
