#!/usr/bin/env bash
# Every test. Kernel tests (BPF programs in a cgroup of their own, pods as
# network namespaces) need root; CI runs this as root.
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then
  # The kernel tests need root: sudo where there is one, with the caller's
  # PATH (Go may be installed outside sudo's secure_path).
  exec sudo env "PATH=$PATH" "$0" "$@"
fi
hack/deps.sh
hack/verify.sh
mkdir -p _output
if [ "$(id -u)" != 0 ]; then
  echo "warning: not root, the kernel tests will be skipped" >&2
fi
echo "--- Kubernetes control plane for the end-to-end tests (built once, cached)"
# Its standard output is the binaries' directory; the build log goes to stderr.
KUBE_BIN="$(hack/kube-build.sh 2> _output/kube-build.log)" || { cat _output/kube-build.log; echo "building Kubernetes failed" >&2; exit 1; }
export KUBE_BIN
echo "$KUBE_BIN"
echo "--- upstream promtool, with Kubernetes discovery (built once, cached)"
PROMTOOL_UPSTREAM="$(hack/promtool-build.sh 2> _output/promtool-build.log)" || { cat _output/promtool-build.log; echo "building promtool failed" >&2; exit 1; }
export PROMTOOL_UPSTREAM
echo "$PROMTOOL_UPSTREAM"
echo "--- kernels for TestKernelMatrix, the eBPF tests on 5.10, 6.1, 6.12 (fetched once, cached)"
hack/kernels.sh --fetch
# Missing kernels fail the matrix instead of skipping it; the table and
# each kernel's output go to _output.
export KBP_REQUIRE_KERNELS=1 KBP_KERNELS_REPORT="$PWD/_output/kernels.md"
echo "--- the image (make image; its Debian root filesystem built once with debootstrap, cached)"
# The end-to-end tests run the proxy from it, unpacked; skopeo checks it
# in TestImage.
if [ "$(id -u)" = 0 ]; then
  command -v skopeo >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends skopeo
  hack/image.sh > _output/image-build.log 2>&1 || { cat _output/image-build.log; echo "building the image failed" >&2; exit 1; }
  tail -n 5 _output/image-build.log
  export KBP_IMAGE="$PWD/_output/kube-bpf-proxy-image.tar"
  # containerd's binaries from Debian's package, unpacked, not installed
  # (that would start a daemon on this machine): TestImage starts one of its
  # own to ctr images import the archive, as kind load does.
  if [ ! -x _output/containerd/usr/bin/ctr ]; then
    rm -rf _output/containerd-deb && mkdir -p _output/containerd-deb
    if (cd _output/containerd-deb && apt-get download containerd >/dev/null 2>&1); then
      dpkg-deb -x _output/containerd-deb/containerd_*.deb _output/containerd
    else
      echo "warning: apt-get download containerd failed: TestImage will not import the image with ctr" >&2
    fi
    rm -rf _output/containerd-deb
  fi
  if [ -x _output/containerd/usr/bin/ctr ]; then
    export KBP_CONTAINERD_DIR="$PWD/_output/containerd/usr/bin"
  fi
fi
echo "--- go test"
# -p 1: the kernel tests of several packages would otherwise share 2 cores
# with dozens of helper processes; they are correct in parallel, just slow.
go test -count=1 -p 1 -timeout 20m ./...
echo "--- go test -race (packages without kernel tests)"
go test -count=1 -race ./internal/model/... ./internal/runner/... ./internal/healthz/... \
  ./internal/metrics/... ./internal/watch/... ./internal/httpserve/... ./internal/nodelabel/... ./internal/version/... \
  ./test/bench/report/... ./test/bench/results/...
echo "--- make demo (the README's first command, end to end)"
hack/demo.sh > _output/demo.log 2>&1 || { cat _output/demo.log; echo "make demo failed" >&2; exit 1; }
grep -E '^(==>|\s+answered by|Done)' _output/demo.log
