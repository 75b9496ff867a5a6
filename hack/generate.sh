#!/usr/bin/env bash
# Regenerates the BPF objects and their Go bindings from bpf/ with the clang
# that internal/dataplane/ebpf/generate.go pins (clang-14, Debian bookworm's).
# Another major version compiles other objects, which make verify would then
# report stale, so any other clang is refused here.
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."

gen=internal/dataplane/ebpf/generate.go
cc="$(sed -n 's#^//go:generate .* -cc \(clang-[0-9][0-9]*\) .*#\1#p' "$gen")"
if [ -z "$cc" ]; then
  echo "$gen names no pinned clang (-cc clang-N)" >&2
  exit 1
fi
major="${cc#clang-}"
if ! command -v "$cc" >/dev/null || ! command -v "llvm-strip-$major" >/dev/null; then
  found=none
  if command -v clang >/dev/null; then
    found="clang $(clang -dumpversion)"
  fi
  echo "$cc and llvm-strip-$major are needed (found: $found). The committed BPF objects are" >&2
  echo "built with clang $major; another major version compiles other objects. Install" >&2
  echo "clang-$major and llvm-$major (hack/deps.sh does, on Debian bookworm)." >&2
  exit 1
fi
version="$("$cc" -dumpversion)"
if [ "${version%%.*}" != "$major" ]; then
  echo "$cc is clang $version, not clang $major: the committed BPF objects are built with $major." >&2
  exit 1
fi
go generate ./internal/dataplane/ebpf/
