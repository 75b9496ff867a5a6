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
	// Any other error leaves the datapath behind anywhere, and the caller
	// must make its next sync a full one.
	Sync(ctx context.Context, snap *model.Snapshot) error
	// Close releases what this process holds. The datapath itself stays in
	// place and keeps serving; removing it is Cleanup's job.
	Close() error
}
