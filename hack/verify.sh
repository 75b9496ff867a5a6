#!/usr/bin/env bash
# Fails if the committed BPF objects differ from what bpf/ generates, if the
# committed dashboards and rules differ from what hack/dashboards writes, if any
# Go file is not gofmt'ed, or if go vet finds anything.
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."

echo "--- regenerating BPF objects in a scratch copy"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$scratch"
(cd "$scratch" && hack/generate.sh)
if ! diff -r -q internal/dataplane/ebpf "$scratch/internal/dataplane/ebpf"; then
  echo "The committed BPF objects are stale: run 'make generate' and commit the result." >&2
  exit 1
fi

echo "--- dashboards and rules"
go run ./hack/dashboards -out "$scratch/generated" >/dev/null
for f in $(cd "$scratch/generated" && find . -type f -printf '%P\n'); do
  if ! cmp -s "$scratch/generated/$f" "manifests/monitoring/$f"; then
    echo "manifests/monitoring/$f is stale: run 'go run ./hack/dashboards' and commit the result." >&2
    exit 1
  fi
done

echo "--- gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
  echo "Not gofmt'ed (run gofmt -w):" >&2
  echo "$unformatted" >&2
  exit 1
fi

echo "--- go vet"
go vet ./...
echo "verify: ok"
