package ebpf

// The BPF objects and their Go bindings are generated from bpf/ with Debian
// bookworm's clang 14 and committed, so that `go build` needs no C toolchain.
// The clang is pinned by name (-cc clang-14; bpf2go strips with
// llvm-strip-14): another major version compiles other objects.
// hack/generate.sh refuses any other version, and `make verify` regenerates
// the objects with it and fails on any difference.
//
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target bpfel -tags linux -type svc_key -type svc_value -type slot_key -type backend_value -type revnat_value -type revnat_pair -type sock_revnat -type stat_index -type svc_stats -type affinity_key -type affinity_value -type match_key -type svc_range -type node_config -type svc6_key -type backend6_value -type revnat6_value -type revnat6_pair -type sock_revnat6 -type svc_range6 -type in6_words lb ../../../bpf/lb.c
