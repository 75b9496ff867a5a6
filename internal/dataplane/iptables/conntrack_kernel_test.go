package iptables

import (
	"errors"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// failingConntrack is a conntrack whose deletions fail.
type failingConntrack struct{ calls int }

func (f *failingConntrack) deleteStale(*staleUDP) (uint, error) {
	f.calls++
	return 0, errors.New("netlink: no buffer space available")
}

func (f *failingConntrack) Close() {}

// As kube-proxy: a conntrack cleanup that fails is logged and counted, and
// the sync that wrote the rules succeeds (a failed sync would turn /healthz
// and every health check node port to 503 with the rules in place). The
// next sync, even one without changes, tries the cleanup again.
func TestKernelConntrackCleanupErrorDoesNotFailTheSync(t *testing.T) {
	d := open(t, Config{Backend: BackendLegacy, NetNS: nodeNS(t)})
	d.ct.Close()
	ct := &failingConntrack{}
	d.ct = ct
	mustSync(t, d, snap(true, sp("dns", "dns", model.UDP, "10.96.0.10:53", "10.244.1.1:53")))
	// The endpoint moves: its old flows are stale.
	mustSync(t, d, snap(false, sp("dns", "dns", model.UDP, "10.96.0.10:53", "10.244.1.2:53")))
	if ct.calls != 2 {
		t.Fatalf("cleanups tried: %d, want 2", ct.calls)
	}
	ev, _ := d.Events()
	if ev["conntrack_cleanup_failed"] != 2 {
		t.Errorf("conntrack_cleanup_failed = %d, want 2", ev["conntrack_cleanup_failed"])
	}
	if d.applied == nil {
		t.Error("the rules in place were forgotten after a cleanup failed")
	}
	// A sync without changes writes nothing, but cleans up again.
	mustSync(t, d, snap(false))
	if ct.calls != 3 {
		t.Errorf("cleanups tried: %d, want a retry in the sync after a failure", ct.calls)
	}
}
