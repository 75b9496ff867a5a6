package dataplane

import (
	"context"
	"errors"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

type fakeLayer struct {
	err    error
	synced int
	closed bool
}

func (f *fakeLayer) Sync(context.Context, *model.Snapshot) error { f.synced++; return f.err }
func (f *fakeLayer) Close() error                                { f.closed = true; return nil }

func TestLayeredMergesFailures(t *testing.T) {
	port := func(name string) *ServiceError {
		return &ServiceError{Service: model.ServicePortName{Port: name}, Reason: ReasonMapFull, Err: errors.New("full")}
	}
	whole := errors.New("iptables-restore failed")
	for _, tc := range []struct {
		name                string
		primary, packets    error
		wantPorts           int
		wantOnlyPorts, want bool
	}{
		{name: "both fine"},
		{name: "ports of each layer", primary: &SyncError{Services: []*ServiceError{port("a")}},
			packets: &SyncError{Services: []*ServiceError{port("b")}}, wantPorts: 2, wantOnlyPorts: true, want: true},
		{name: "packet layer failed as a whole", primary: &SyncError{Services: []*ServiceError{port("a")}},
			packets: whole, wantPorts: 1, want: true},
		{name: "socket layer failed as a whole", primary: whole, want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, k := &fakeLayer{err: tc.primary}, &fakeLayer{err: tc.packets}
			l := &Layered{Primary: p, Packets: k}
			err := l.Sync(context.Background(), &model.Snapshot{Full: true})
			if p.synced != 1 || k.synced != 1 {
				t.Errorf("layers synced %d and %d times, want once each", p.synced, k.synced)
			}
			if (err != nil) != tc.want {
				t.Fatalf("err %v", err)
			}
			if err == nil {
				return
			}
			ports, only := OnlyServicesFailed(err)
			if only != tc.wantOnlyPorts {
				t.Errorf("only ports failed: %v (%v)", only, err)
			}
			if only && len(ports) != tc.wantPorts {
				t.Errorf("%d ports reported, want %d", len(ports), tc.wantPorts)
			}
			if !only && tc.wantPorts > 0 && len(failedPortsOf(err)) != tc.wantPorts {
				t.Errorf("ports lost from a whole failure: %v", err)
			}
			if !only && !errors.Is(err, whole) {
				t.Errorf("whole failure not wrapped: %v", err)
			}
		})
	}
	p, k := &fakeLayer{}, &fakeLayer{}
	l := &Layered{Primary: p, Packets: k}
	l.Close()
	if !p.closed || !k.closed {
		t.Error("Close did not close both layers")
	}
	if l.Unwrap() != p {
		t.Error("Unwrap is not the socket layer")
	}
}

func failedPortsOf(err error) []*ServiceError {
	var se *SyncError
	if errors.As(err, &se) {
		return se.Services
	}
	return nil
}

// PacketsServe runs after a sync the packet layer applied in full, never
// before, and once it has succeeded, never again; its failure fails the
// sync, so that the next one retries it.
func TestLayeredPacketsServe(t *testing.T) {
	p, k := &fakeLayer{}, &fakeLayer{err: errors.New("iptables-restore failed")}
	calls := 0
	var fail error
	l := &Layered{Primary: p, Packets: k, PacketsServe: func() error { calls++; return fail }}
	sync := func() error { return l.Sync(context.Background(), &model.Snapshot{Full: true}) }
	if err := sync(); err == nil || calls != 0 {
		t.Fatalf("packet layer failed: err %v, PacketsServe called %d times, want an error and 0", err, calls)
	}
	k.err = &SyncError{Services: []*ServiceError{{Reason: ReasonMapFull, Err: errors.New("one port")}}}
	if err := sync(); err == nil || calls != 0 {
		t.Fatalf("packet layer failed a port: err %v, PacketsServe called %d times, want an error and 0", err, calls)
	}
	k.err, fail = nil, errors.New("map write failed")
	if err := sync(); err == nil || calls != 1 {
		t.Fatalf("PacketsServe failed: err %v, called %d times, want an error and 1", err, calls)
	}
	fail = nil
	for range 2 {
		if err := sync(); err != nil {
			t.Fatal(err)
		}
	}
	if calls != 2 {
		t.Errorf("PacketsServe called %d times, want 2 (once failing, once succeeding)", calls)
	}
}

// monitoredLayer is a packet layer with a canary and node changes in
// partial syncs, as the iptables datapath.
type monitoredLayer struct {
	fakeLayer
	intact bool
}

func (m *monitoredLayer) Intact(context.Context) (bool, error) { return m.intact, nil }
func (m *monitoredLayer) AppliesNodeChanges() bool             { return true }
func (m *monitoredLayer) LargeCluster() bool                   { return false }

// The layered datapath checks its packet layer's canary, and takes node
// changes in partial syncs only if both layers do (the eBPF maps do not:
// their node port frontends are per node address).
func TestLayeredDelegatesToPacketLayer(t *testing.T) {
	packets := &monitoredLayer{intact: true}
	l := &Layered{Primary: &fakeLayer{}, Packets: packets}
	if ok, err := l.Intact(context.Background()); !ok || err != nil {
		t.Errorf("Intact with an intact packet layer: %v, %v", ok, err)
	}
	packets.intact = false
	if ok, _ := l.Intact(context.Background()); ok {
		t.Error("Intact with a flushed packet layer reports true")
	}
	if l.AppliesNodeChanges() {
		t.Error("node changes in partial syncs with a socket layer that needs full ones")
	}
	both := &Layered{Primary: &monitoredLayer{}, Packets: packets}
	if !both.AppliesNodeChanges() {
		t.Error("node changes not in partial syncs with two layers that take them")
	}
	// A packet layer without a canary keeps the full sync of each period.
	if ok, _ := (&Layered{Primary: &fakeLayer{}, Packets: &fakeLayer{}}).Intact(context.Background()); ok {
		t.Error("Intact without a packet layer check reports true")
	}
}
