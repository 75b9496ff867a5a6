package iptables

import (
	"context"
	"fmt"
)

// SavedRules is what `kube-bpf-proxy inspect` reads of a node's rules.
type SavedRules struct {
	// Backend is the iptables backend read, "nft" or "legacy".
	Backend string
	// NAT and Filter are iptables-save's dumps of the two tables.
	NAT, Filter []byte
}

// ChainServices is the top-level nat chain every Service frontend's rule
// is in: its presence tells that the node runs kube-proxy-style rules.
const ChainServices = chainServices

// ReadRules dumps the nat and filter tables of the backend cfg names (with
// BackendAuto, the one the node uses, as the iptables mode picks it), in
// cfg.NetNS if set. It only reads.
func ReadRules(ctx context.Context, cfg Config) (*SavedRules, error) {
	cfg = cfg.withDefaults()
	backend := cfg.Backend
	switch backend {
	case BackendAuto:
		var err error
		if backend, err = detectBackend(ctx, cfg.tool("")); err != nil {
			return nil, err
		}
	case BackendNFT, BackendLegacy:
	default:
		return nil, fmt.Errorf("unknown iptables backend %q: want nft, legacy or auto", backend)
	}
	t := cfg.tool(backend)
	nat, err := t.save(ctx, "nat")
	if err != nil {
		return nil, err
	}
	filter, err := t.save(ctx, "filter")
	if err != nil {
		return nil, err
	}
	return &SavedRules{Backend: backend, NAT: nat, Filter: filter}, nil
}
