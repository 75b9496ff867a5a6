package dataplane

import (
	"context"
	"errors"
	"fmt"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Layered is the eBPF mode's datapath: socket-level load balancing for
// every socket on the node (Primary), and per-packet rules (Packets) for
// what no socket on the node sent: packets arriving from outside at a node
// port, an external IP or a load balancer IP, which the socket hooks never
// see; and, with the socket layer confined to the node's network
// namespace, pods' packets to every frontend, ClusterIPs included. Both
// are given every snapshot; each writes only its part.
//
// Their writes do not overlap and neither reads the other, so their order
// matters only for make-before-break: the socket layer first, since a
// connection it translates never reaches the rules.
type Layered struct {
	Primary Dataplane
	Packets Dataplane
	// PacketsServe, if set, is called after each sync the packet layer
	// applied in full, until it succeeds: what must wait until the rules
	// serve this snapshot. The eBPF mode confines its socket layer to the
	// node's network namespace there (--bpf-socket-lb-host-netns-only),
	// once the rules serve pods' ClusterIP traffic.
	PacketsServe  func() error
	packetsServed bool
}

var _ Dataplane = (*Layered)(nil)

// Sync implements Dataplane. Service ports that failed in either layer are
// reported together; a layer failing as a whole fails the sync, after the
// other layer has still been given the snapshot (it keeps its part up to
// date; the caller's next full sync repeats it, which is idempotent).
func (l *Layered) Sync(ctx context.Context, snap *model.Snapshot) error {
	errPrimary := l.Primary.Sync(ctx, snap)
	errPackets := l.Packets.Sync(ctx, snap)
	if errPackets == nil && l.PacketsServe != nil && !l.packetsServed {
		if err := l.PacketsServe(); err != nil {
			// Retried after the next sync, which the error brings soon.
			errPackets = fmt.Errorf("after the packet layer's sync: %w", err)
		} else {
			l.packetsServed = true
		}
	}
	if errPrimary == nil && errPackets == nil {
		return nil
	}
	merged := &SyncError{}
	var whole []error
	for _, c := range []struct {
		layer string
		err   error
	}{{"socket layer", errPrimary}, {"packet layer", errPackets}} {
		if c.err == nil {
			continue
		}
		if ports, ok := OnlyServicesFailed(c.err); ok {
			merged.Services = append(merged.Services, ports...)
			continue
		}
		var se *SyncError
		if errors.As(c.err, &se) {
			merged.Services = append(merged.Services, se.Services...)
		}
		whole = append(whole, fmt.Errorf("%s: %w", c.layer, c.err))
	}
	merged.Err = errors.Join(whole...)
	return merged
}

// Close closes both layers; each keeps serving.
func (l *Layered) Close() error {
	return errors.Join(l.Primary.Close(), l.Packets.Close())
}

// Unwrap returns the socket layer, whose counters the proxy exports.
func (l *Layered) Unwrap() Dataplane { return l.Primary }

var (
	_ Monitored         = (*Layered)(nil)
	_ NodeChangeApplier = (*Layered)(nil)
)

// Intact is the packet layer's check (its canary chains), if it has one.
// The socket layer's maps are not checked: nobody else writes them, and a
// partial sync keeps them exact; they are reconciled in full with the
// packet layer's full syncs (at start, after a failure, once per
// FullSyncPeriod, and when the packet layer's rules were flushed). A
// packet layer without a check reports false, which keeps the full
// snapshot of every SyncPeriod.
func (l *Layered) Intact(ctx context.Context) (bool, error) {
	m, ok := l.Packets.(Monitored)
	if !ok {
		return false, nil
	}
	return m.Intact(ctx)
}

// LargeCluster is the packet layer's: its rules are what a full sync
// would make costly.
func (l *Layered) LargeCluster() bool {
	m, ok := l.Packets.(Monitored)
	return ok && m.LargeCluster()
}

// AppliesNodeChanges reports whether both layers take a node change in a
// partial snapshot.
func (l *Layered) AppliesNodeChanges() bool {
	return appliesNodeChanges(l.Primary) && appliesNodeChanges(l.Packets)
}

func appliesNodeChanges(dp Dataplane) bool {
	a, ok := dp.(NodeChangeApplier)
	return ok && a.AppliesNodeChanges()
}
