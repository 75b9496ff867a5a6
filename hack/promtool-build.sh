#!/usr/bin/env bash
# Builds upstream promtool (Prometheus 2.42.0, the version Debian ships) from
# the Go module proxy, once, into a cache outside the repository, and prints
# its path on standard output (the build's output goes to standard error).
#
# Why: Debian builds Prometheus without Kubernetes service discovery, so its
# promtool rejects kubernetes_sd_configs, which the shipped scrape
# configuration (manifests/monitoring/prometheus/scrape-configs.yaml) uses.
# The end-to-end test checks that file with this one.
#
# The module's go.mod has replace directives, which only apply in the main
# module, so `go install module@version` refuses it: the build runs inside the
# downloaded module instead.
#
#   PROMETHEUS_MODULE_VERSION  default v0.42.0 (= Prometheus 2.42.0)
#   KBP_CACHE                  as hack/kube-build.sh
set -o errexit -o nounset -o pipefail

version="${PROMETHEUS_MODULE_VERSION:-v0.42.0}"
if [ "$(id -u)" = 0 ]; then
  cache="${KBP_CACHE:-/var/cache/kube-bpf-proxy}"
else
  cache="${KBP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-bpf-proxy}"
fi
out="$cache/promtool-$version/promtool"
mkdir -p "$(dirname "$out")"
exec 9>"$cache/promtool-$version.lock"
flock 9
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi
echo "building promtool $version into $out; this takes a few minutes once" >&2
src="$(go mod download -json "github.com/prometheus/prometheus@$version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[ -d "$src" ] || { echo "could not download github.com/prometheus/prometheus@$version" >&2; exit 1; }
(cd "$src" && go build -o "$out.tmp" ./cmd/promtool) >&2
mv "$out.tmp" "$out"
echo "$out"
