#!/usr/bin/env bash
# Builds the Kubernetes control-plane binaries the local cluster runs
# (kube-apiserver, kube-controller-manager), upstream kube-proxy for the
# benchmark's side-by-side runs, and a kubectl of the same version
# (Debian's is 1.20) from the Go module proxy, once,
# into a cache outside the repository. A second run finds them and returns at
# once. Prints the directory holding the binaries on standard output, and
# nothing else there: the build's own output goes to standard error.
#
# k8s.io/kubernetes cannot be built with a plain `go install module@version`:
# its go.mod replaces every k8s.io staging module with a directory of its own
# repository, and replace directives only apply in the main module. So the
# build runs in a small wrapper module whose go.mod requires k8s.io/kubernetes
# and points each staging module at its published v0.Y.Z release.
#
#   KUBE_VERSION  the Kubernetes release (default v1.36.3)
#   KBP_CACHE     the cache root (default /var/cache/kube-bpf-proxy for root,
#                 ~/.cache/kube-bpf-proxy otherwise)
set -o errexit -o nounset -o pipefail

version="${KUBE_VERSION:-v1.36.3}"
if [ "$(id -u)" = 0 ]; then
  cache="${KBP_CACHE:-/var/cache/kube-bpf-proxy}"
else
  cache="${KBP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-bpf-proxy}"
fi
dir="$cache/kubernetes-$version"
commands=(kube-apiserver kube-controller-manager kubectl kube-proxy)

# One build at a time: a second caller waits and then finds the binaries.
mkdir -p "$cache"
exec 9>"$cache/kubernetes-$version.lock"
flock 9

have_all() {
  for c in "${commands[@]}"; do [ -x "$dir/bin/$c" ] || return 1; done
}
if have_all; then
  echo "$dir/bin"
  exit 0
fi

# v1.36.3 -> staging modules at v0.36.3.
staging_version="v0.${version#v1.}"
mkdir -p "$dir/wrapper" "$dir/bin"
cd "$dir/wrapper"
echo "building Kubernetes $version (${commands[*]}) into $dir/bin; this takes a few minutes once" >&2

kube_mod="$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
[ -f "$kube_mod" ] || { echo "could not download k8s.io/kubernetes@$version" >&2; exit 1; }
go_directive="$(sed -n 's/^go \(.*\)$/\1/p' "$kube_mod")"
mapfile -t staging < <(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$kube_mod")
[ "${#staging[@]}" -gt 0 ] || { echo "no staging replacements found in $kube_mod" >&2; exit 1; }

{
  echo "module kbp.local/kube-build"
  echo
  echo "go $go_directive"
  echo
  echo "require k8s.io/kubernetes $version"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m $staging_version"; done
  echo ")"
} > go.mod
# The wrapper names the commands as tools so `go mod tidy` pulls in exactly
# what they import.
for c in "${commands[@]}"; do
  go get -tool "k8s.io/kubernetes/cmd/$c@$version" >&2
done

pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$version" | cut -d. -f2) -X $pkg.gitTreeState=clean"
for c in "${commands[@]}"; do
  [ -x "$dir/bin/$c" ] && continue
  CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$dir/bin/$c.tmp" "k8s.io/kubernetes/cmd/$c" >&2
  mv "$dir/bin/$c.tmp" "$dir/bin/$c"
done
have_all
echo "$dir/bin"
