#!/usr/bin/env bash
# Fails if go.mod and go.sum are not tidy, if any Go file is not gofmt'ed,
# if shellcheck finds anything in a shell script, if the committed BPF
# objects differ from what bpf/ generates with the pinned clang, if the
# committed dashboards and rules differ from what hack/dashboards writes, or
# if go vet or staticcheck (pinned in go.mod) finds anything.
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."

echo "--- go mod tidy"
if ! go mod tidy -diff; then
  echo "go.mod or go.sum is not tidy: run 'go mod tidy' and commit the result." >&2
  exit 1
fi

echo "--- gofmt"
unformatted=$(git ls-files -z '*.go' | xargs -0 gofmt -l)
if [ -n "$unformatted" ]; then
  echo "Not gofmt'ed (run gofmt -w):" >&2
  echo "$unformatted" >&2
  exit 1
fi

echo "--- shellcheck"
if ! command -v shellcheck >/dev/null; then
  echo "shellcheck is missing: run hack/deps.sh" >&2
  exit 1
fi
# Every tracked shell script: *.sh, and files without the suffix (.ci/run)
# whose first line runs a shell.
scripts=()
while IFS= read -r -d '' f; do
  case "$f" in
    *.sh) scripts+=("$f") ;;
    *)
      first=
      if [ -f "$f" ]; then IFS= read -r first < "$f" || true; fi
      if [[ $first =~ ^\#!.*[/\ ](ba|da)?sh(\ |$) ]]; then scripts+=("$f"); fi
      ;;
  esac
done < <(git ls-files -z)
shellcheck "${scripts[@]}"

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

echo "--- go vet"
go vet ./...

echo "--- staticcheck"
go tool staticcheck ./...
echo "verify: ok"
