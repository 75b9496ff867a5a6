# The kube-bpf-proxy image, for users with a registry. `make image`
# (hack/image.sh) builds the same image without one, as an archive, and is
# what the tests run; both hold the same things (docs/image.md):
#
#   - Debian bookworm, slim (no docs, man pages or locales), every package
#     upgraded from bookworm-updates and bookworm-security;
#   - the packages in hack/image/packages, without recommends: iptables
#     (iptables-{nft,legacy}-{save,restore}: the iptables mode and the eBPF
#     mode's packet layer run them), nftables (nft) and conntrack, to inspect
#     the node; util-linux (nsenter, setpriv) comes with the base system;
#   - the static binary at /usr/local/bin/kube-bpf-proxy, the entrypoint, and
#     a link /usr/local/bin/kube-proxy to it, so that kubeadm's kube-proxy
#     DaemonSet (command /usr/local/bin/kube-proxy) runs it with only its
#     image changed.
#
# The BPF objects are embedded in the binary, so no clang is needed.
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
COPY hack/image/packages /tmp/packages
RUN apt-get update \
 && apt-get -y upgrade \
 && apt-get install -y --no-install-recommends $(grep -v '^\s*\(#\|$\)' /tmp/packages) \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /var/log/alternatives.log /tmp/packages
COPY --from=build /out/kube-bpf-proxy /usr/local/bin/kube-bpf-proxy
RUN ln -s kube-bpf-proxy /usr/local/bin/kube-proxy
ENTRYPOINT ["/usr/local/bin/kube-bpf-proxy"]
