#!/usr/bin/env bash
# Regenerates test/e2e/testdata/kubeadm-v1.36/kube-proxy.yaml and
# cmd/kube-bpf-proxy/testdata/kubeadm-v1.36-config.conf from kubeadm's own
# code (hack/kubeadm-render/main.go), in a wrapper module beside
# hack/kube-build.sh's, whose go.mod it reuses (run that first).
#
#   KUBE_VERSION  the Kubernetes release (default v1.36.3)
#   KBP_CACHE     the cache root (as hack/kube-build.sh)
set -o errexit -o nounset -o pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
version="${KUBE_VERSION:-v1.36.3}"
cache="${KBP_CACHE:-/var/cache/kube-bpf-proxy}"
wrapper="$cache/kubernetes-$version/wrapper"
[ -f "$wrapper/go.mod" ] || { echo "no $wrapper/go.mod: run hack/kube-build.sh first" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The wrapper's module, without its tool directives (this is no tool).
sed -e 's#^module .*#module kbp.local/kubeadm-render#' -e '/^tool (/,/^)/d' -e '/^tool /d' \
  "$wrapper/go.mod" > "$work/go.mod"
cp "$wrapper/go.sum" "$work/go.sum"
sed '/^\/\/go:build ignore$/d' "$root/hack/kubeadm-render/main.go" > "$work/main.go"
(cd "$work" && GOFLAGS=-mod=mod go mod tidy >&2 && go run . > rendered.yaml)

minor="$(echo "$version" | cut -d. -f1-2)"
out="$root/test/e2e/testdata/kubeadm-$minor/kube-proxy.yaml"
mkdir -p "$(dirname "$out")"
{
  echo "# kubeadm $version's kube-proxy addon, as \`kubeadm init --pod-network-cidr=10.244.0.0/16\`"
  echo "# installs it on a control plane advertised at 192.168.0.10:6443: the output of kubeadm's"
  echo "# own code (k8s.io/kubernetes@$version cmd/kubeadm/app/phases/addons/proxy EnsureProxyAddon,"
  echo "# printManifest=true, after componentconfigs.Default), unedited below this comment."
  echo "# Copyright The Kubernetes Authors, Apache-2.0. test/e2e/kubeadm_test.go applies it;"
  echo "# hack/kubeadm-render.sh regenerates it."
  cat "$work/rendered.yaml"
} > "$out"
# config.conf is the ConfigMap's key, a block scalar indented by four.
awk '/^  config.conf: \|-$/ {on=1; next} on && /^  [a-z]/ {on=0} on && /^---$/ {on=0} on' "$work/rendered.yaml" |
  sed -e 's/^    //' | sed -e ':a' -e '/^\n*$/{$d;N;ba' -e '}' | perl -pe 'chomp if eof' \
  > "$root/cmd/kube-bpf-proxy/testdata/kubeadm-$minor-config.conf"
echo "wrote $out and cmd/kube-bpf-proxy/testdata/kubeadm-$minor-config.conf" >&2
