# Every target delegates to a script in hack/; see docs/development.md.
.PHONY: all build image test unit verify generate kernels bench microbench demo demo-up demo-down deps clean

all: build

build:
	hack/build.sh

# The image as an archive, without a registry (docs/image.md):
# _output/kube-bpf-proxy-image.tar, for docker/podman load, ctr images import
# and kind load image-archive. Needs root (debootstrap, cached).
image:
	hack/image.sh

# Every test, kernel tests included (they need root). Installs what it needs.
test:
	hack/test.sh

# Tests that need neither root nor a kernel.
unit:
	go test ./...

verify:
	hack/verify.sh

# The eBPF kernel tests on Debian's 5.10, 6.1 and 6.12 in qemu (fetched once
# into the cache); a table of kernels by test, also in _output/kernels.md.
kernels:
	hack/kernels.sh

generate:
	hack/generate.sh

# Every datapath side by side on a local cluster, report in _output/bench-report
# (about 40 minutes); QUICK=1 for the reduced run the tests make (5 minutes),
# LARGE=1 for 20k and 50k Services too.
bench:
	QUICK="$(QUICK)" LARGE="$(LARGE)" hack/bench.sh

# The Go micro-benchmarks of the reconcilers and the change tracker.
microbench:
	hack/microbench.sh

# A local two-node cluster (real kube-apiserver and controllers) running the
# proxy: the whole tour, then everything removed.
demo:
	hack/demo.sh

# The same cluster left running, with the kubeconfig printed; demo-down removes it.
demo-up:
	hack/demo.sh --keep

demo-down:
	hack/demo.sh --down

deps:
	hack/deps.sh

clean:
	rm -rf _output
