// Package dataplane defines what every datapath mode implements.
package dataplane

import (
	"context"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Dataplane programs one node's datapath from model snapshots.
type Dataplane interface {
	// Sync brings the datapath to the snapshot's desired state, writing only
	// what differs from what it last applied. On error the datapath keeps
	// serving whatever it applied successfully. A *SyncError whose Err is
	// nil means only the service ports it lists failed, each left as it
	// was, and everything else was applied: the caller retries those ports.
	// An error wrapping ErrBusy (OnlyBusy) changed nothing: the caller
	// hands the same changes again later. Any other error leaves the
	// datapath behind anywhere, and the caller must make its next sync a
	// full one.
	Sync(ctx context.Context, snap *model.Snapshot) error
	// Close releases what this process holds. The datapath itself stays in
	// place and keeps serving; removing it is Cleanup's job.
	Close() error
}

// Monitored is implemented by datapaths whose full sync rewrites
// everything they hold at a cost that grows with the cluster (the iptables
// rules), and that can tell cheaply whether someone removed what they
// applied (kube-proxy's canary chains). The proxy then syncs them in full
// only at start, after a failure that lost track of the kernel's state,
// once per FullSyncPeriod, and when Intact says the state is gone; each
// SyncPeriod in between costs one Intact check. Datapaths that do not
// implement it get a full snapshot every SyncPeriod.
type Monitored interface {
	// Intact reports whether what the datapath applied is still in place.
	// An error says nothing either way: the proxy logs it and checks
	// again at the next period, or, for one wrapping ErrBusy (the lock
	// held), backs off as for a sync that found it held, and checks
	// again at the retry.
	Intact(ctx context.Context) (bool, error)
	// LargeCluster reports kube-proxy's large cluster mode (more than 1000
	// endpoints in the rules: every Service's in the iptables mode, only
	// those of Services with an external frontend in the eBPF mode's
	// packet layer): a full sync takes seconds there, so it runs only
	// at start, after a failure and when Intact says the state is gone,
	// never merely because FullSyncPeriod has passed.
	LargeCluster() bool
}

// NodeChangeApplier is implemented by datapaths that apply a change of
// Snapshot.Node given in a partial snapshot, rewriting only what reads the
// node. For any other datapath a node change makes the next snapshot full.
type NodeChangeApplier interface {
	// AppliesNodeChanges reports whether partial snapshots may carry a
	// changed Node.
	AppliesNodeChanges() bool
}
