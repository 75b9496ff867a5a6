package ebpf

// The BPF objects and their Go bindings are generated from bpf/ with Debian's
// clang and committed, so that `go build` needs no C toolchain. `make verify`
// regenerates them and fails on any difference.
//
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -tags linux -type svc_key -type svc_value -type slot_key -type backend_value -type revnat_value -type revnat_pair -type sock_revnat -type stat_index -type svc_stats -type affinity_key -type affinity_value -type match_key -type svc_range -type node_config lb ../../../bpf/lb.c
