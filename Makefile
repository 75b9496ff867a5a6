# Every target delegates to a script in hack/; see README.md.
.PHONY: all build test unit verify generate bench demo deps clean

all: build

build:
	hack/build.sh

# Every test, kernel tests included (they need root). Installs what it needs.
test:
	hack/test.sh

# Tests that need neither root nor a kernel.
unit:
	go test ./...

verify:
	hack/verify.sh

generate:
	hack/generate.sh

bench:
	hack/bench.sh

demo:
	hack/demo.sh

deps:
	hack/deps.sh

clean:
	rm -rf _output
