#!/usr/bin/env bash
# The local cluster (test/utils/localcluster): a real kube-apiserver, etcd and
# kube-controller-manager, and two simulated nodes, in network namespaces of
# their own. Builds what it needs first. Commands: see hack/cluster/main.go.
#
#   hack/cluster.sh up | down
#   hack/cluster.sh kubectl get endpointslices -A
#   hack/cluster.sh add-pod web-1 --node node2 --labels app=web
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the local cluster needs root (network namespaces, cgroups): run it with sudo" >&2
  exit 1
fi
if [ "${1:-}" = up ]; then
  hack/deps.sh
fi
KUBE_BIN="$(hack/kube-build.sh)"
export KUBE_BIN
mkdir -p _output
go build -o _output/cluster ./hack/cluster
hack/build.sh >/dev/null
exec _output/cluster "$@"
