// Package ebpf is the socket-level eBPF datapath: it loads and attaches the
// programs in bpf/, keeps their maps pinned, and reconciles model snapshots
// into them.
package ebpf

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Dataplane is the eBPF implementation of dataplane.Dataplane.
type Dataplane struct {
	mu     sync.Mutex
	kernel *kernelObjects
	grace  *rcuGracePeriod
	rec    *reconciler
}

var _ dataplane.Dataplane = (*Dataplane)(nil)

// New loads and attaches the datapath, adopting whatever an earlier run left
// pinned. Until the first Sync, the adopted state keeps serving.
func New(cfg Config) (*Dataplane, error) {
	if cfg.MaxServices == 0 || cfg.MaxBackends == 0 || cfg.MaxSockets == 0 {
		return nil, errors.New("map capacities must be positive")
	}
	k, err := load(cfg)
	if err != nil {
		return nil, err
	}
	maps := Maps{
		Services: newKernelMap[lbSvcKey, lbSvcValue](k.objs.KbpServices, lbMapKbpServices),
		Slots:    newKernelMap[lbSlotKey, uint32](k.objs.KbpSlots, lbMapKbpSlots),
		Backends: newKernelMap[uint32, lbBackendValue](k.objs.KbpBackends, lbMapKbpBackends),
	}
	grace := newRCUGracePeriod()
	rec := newReconciler(maps, grace, cfg.MaxServices, cfg.MaxBackends)
	if err := rec.restore(); err != nil {
		k.Close()
		grace.Close()
		return nil, fmt.Errorf("reading pinned maps: %w", err)
	}
	return &Dataplane{kernel: k, grace: grace, rec: rec}, nil
}

// Sync applies snap. When it applies it only in part it returns a
// *dataplane.SyncError: each port in its Services was left as it was.
func (d *Dataplane) Sync(ctx context.Context, snap *model.Snapshot) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	return d.rec.sync(snap)
}

// Counts reports the service ports and backends the maps hold.
func (d *Dataplane) Counts() (services, backends int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.rec.counts()
}

// eventNames name the per-CPU counters of bpf/lb.c for metrics.
var eventNames = map[lbStatIndex]string{
	lbStatIndexSTAT_CONNECT_TRANSLATED:   "connect_translated",
	lbStatIndexSTAT_SENDMSG_TRANSLATED:   "sendmsg_translated",
	lbStatIndexSTAT_REFUSED_NO_BACKEND:   "refused_no_backend",
	lbStatIndexSTAT_REFUSED_MISSING_SLOT: "refused_missing_slot",
	lbStatIndexSTAT_REVNAT_TRANSLATED:    "reverse_translated",
	lbStatIndexSTAT_REVNAT_UPDATE_FAILED: "reverse_entry_update_failed",
}

// Events sums the datapath's per-CPU event counters.
func (d *Dataplane) Events() (map[string]uint64, error) {
	out := make(map[string]uint64, len(eventNames))
	for idx, name := range eventNames {
		var perCPU []uint64
		if err := d.kernel.objs.KbpStats.Lookup(idx, &perCPU); err != nil {
			return nil, fmt.Errorf("reading %s counter: %w", name, err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		out[name] = sum
	}
	return out, nil
}

// Close releases this process's handles; pins keep the datapath serving.
func (d *Dataplane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return errors.Join(d.kernel.Close(), d.grace.Close())
}
