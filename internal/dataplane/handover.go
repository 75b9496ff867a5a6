package dataplane

import (
	"context"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Handover removes what another datapath mode left on the node, but only
// once this one serves: switching modes is make-before-break, like every
// other update. Both can be in place for a moment without harm: the eBPF
// programs translate at connect() before a packet exists, so iptables rules
// for a VIP see no traffic while the programs are attached.
type Handover struct {
	Dataplane
	// other names the mode being removed, for the log.
	other   string
	cleanup func(context.Context) error
	done    bool
	// lastErr is the last cleanup failure logged: a failure that repeats
	// (a capability the process lacks, say) is logged once, not per sync.
	lastErr string
}

// WithHandover wraps dp so that cleanup (of the mode named other) runs after
// its first successful sync, and again after later ones until it succeeds.
func WithHandover(dp Dataplane, other string, cleanup func(context.Context) error) *Handover {
	return &Handover{Dataplane: dp, other: other, cleanup: cleanup}
}

// Sync implements Dataplane. A failing cleanup is logged, not returned:
// this mode serves, and what is left of the other one is idle.
func (h *Handover) Sync(ctx context.Context, snap *model.Snapshot) error {
	if err := h.Dataplane.Sync(ctx, snap); err != nil {
		return err
	}
	if !h.done {
		if err := h.cleanup(ctx); err != nil {
			if msg := err.Error(); msg != h.lastErr {
				h.lastErr = msg
				klog.ErrorS(err, "Removing the previous datapath mode failed; retrying after each sync", "mode", h.other)
			} else {
				klog.V(2).InfoS("Removing the previous datapath mode failed again", "mode", h.other, "err", err)
			}
		} else {
			h.done = true
			klog.V(2).InfoS("No datapath of the other mode is left", "mode", h.other)
		}
	}
	return nil
}

// Unwrap returns the wrapped datapath.
func (h *Handover) Unwrap() Dataplane { return h.Dataplane }
