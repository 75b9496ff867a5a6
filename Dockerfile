# The kube-bpf-proxy image: a static Go binary on Debian slim with the tools
# the iptables mode runs (iptables-{nft,legacy}-{save,restore}), nftables for
# inspecting the nft backend, and conntrack for debugging. The BPF objects are
# embedded in the binary, so no clang is needed.
#
#   docker build --build-arg VERSION="$(git describe --tags --always --dirty)" -t kube-bpf-proxy .
#
# VERSION is what --version and the kube_bpf_proxy_info metric report (the
# build context has no .git for Go to read it from).
FROM golang:1.26-bookworm AS build
ARG VERSION=unknown
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd ./cmd
COPY bpf ./bpf
COPY internal ./internal
RUN CGO_ENABLED=0 go build -trimpath \
    -ldflags="-s -w -X github.com/kube-bpf-proxy/kube-bpf-proxy/internal/version.stamp=${VERSION}" \
    -o /out/kube-bpf-proxy ./cmd/kube-bpf-proxy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables conntrack \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/kube-bpf-proxy /usr/local/bin/kube-bpf-proxy
ENTRYPOINT ["/usr/local/bin/kube-bpf-proxy"]
