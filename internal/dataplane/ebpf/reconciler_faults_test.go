package ebpf

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// faultScenario is one sync whose every operation the fault tests fail in
// turn.
type faultScenario struct {
	name string
	// before is applied first, by a full sync without faults.
	before []model.ServicePort
	// snap is the sync under test; after is the whole desired state it
	// leads to.
	snap  func() *model.Snapshot
	after []model.ServicePort
}

func faultScenarios() []faultScenario {
	web := func(backends ...string) model.ServicePort {
		return servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", backends...)
	}
	api := func(backends ...string) model.ServicePort {
		return servicePort("default", "api", "http", model.TCP, "10.96.0.11:80", backends...)
	}
	dns := servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", "10.244.0.5:53", "10.244.1.5:53")
	// other shares a backend with web, which must outlive web's changes.
	other := servicePort("default", "other", "http", model.TCP, "10.96.0.12:80", "10.244.0.1:8080", "10.244.9.9:8080")
	a, b, c, d, e, f, g := "10.244.0.1:8080", "10.244.0.2:8080", "10.244.0.3:8080", "10.244.0.4:8080",
		"10.244.0.5:8080", "10.244.0.6:8080", "10.244.0.7:8080"
	// web with a NodePort on each of testNode's addresses, a local
	// external IP and a LoadBalancer IP: six frontends.
	webExt := func(backends ...string) model.ServicePort {
		return withExternal(withNodePort(web(backends...), 30080), []string{"10.0.0.1"}, []string{"192.0.2.10"})
	}
	webLocal := func(local []string, cluster ...string) model.ServicePort {
		sp := internalLocal(web(), local, cluster...)
		sp.External = webExt().External
		return sp
	}
	return []faultScenario{
		{
			name:   "replace and grow",
			before: []model.ServicePort{web(a, b, c), other},
			snap:   func() *model.Snapshot { return nodeSnap(false, web(a, d, e, f, g)) },
			after:  []model.ServicePort{web(a, d, e, f, g), other},
		},
		{
			name:   "shrink and replace",
			before: []model.ServicePort{web(a, b, c, d, e), other},
			snap:   func() *model.Snapshot { return nodeSnap(false, web(a, f)) },
			after:  []model.ServicePort{web(a, f), other},
		},
		{
			name:   "delete a service",
			before: []model.ServicePort{web(a, b, c), other},
			snap: func() *model.Snapshot {
				return withDeleted(nodeSnap(false), web().Name.ServiceName)
			},
			after: []model.ServicePort{other},
		},
		{
			name:   "create a service",
			before: []model.ServicePort{other},
			snap:   func() *model.Snapshot { return nodeSnap(false, api(a, b, c)) },
			after:  []model.ServicePort{other, api(a, b, c)},
		},
		{
			name:   "replace and grow one, create one, delete one",
			before: []model.ServicePort{web(a, b, c), dns, other},
			snap: func() *model.Snapshot {
				return withDeleted(nodeSnap(false, web(a, c, d, e), api(d, f)), dns.Name.ServiceName)
			},
			after: []model.ServicePort{web(a, c, d, e), api(d, f), other},
		},
		{
			name:   "add a NodePort, a local external IP and a LoadBalancer IP",
			before: []model.ServicePort{web(a, b, c), other},
			snap:   func() *model.Snapshot { return nodeSnap(false, webExt(a, b, d)) },
			after:  []model.ServicePort{webExt(a, b, d), other},
		},
		{
			name:   "internalTrafficPolicy Local: one id becomes two",
			before: []model.ServicePort{webExt(a, b, c), other},
			snap:   func() *model.Snapshot { return nodeSnap(false, webLocal([]string{a}, a, b, c, d)) },
			after:  []model.ServicePort{webLocal([]string{a}, a, b, c, d), other},
		},
		{
			name:   "internalTrafficPolicy Cluster: two ids become one",
			before: []model.ServicePort{webLocal([]string{a, b}, a, b, c), other},
			snap:   func() *model.Snapshot { return nodeSnap(false, webExt(a, d)) },
			after:  []model.ServicePort{webExt(a, d), other},
		},
		{
			name:   "affinity on, a backend replaced",
			before: []model.ServicePort{webExt(a, b, c), other},
			snap:   func() *model.Snapshot { return nodeSnap(false, withAffinity(webExt(a, d, c), time.Hour)) },
			after:  []model.ServicePort{withAffinity(webExt(a, d, c), time.Hour), other},
		},
		{
			name:   "an affinity port shrinks, replaces a backend and changes its timeout",
			before: []model.ServicePort{withAffinity(webExt(a, b, c, d, e), time.Hour), other},
			snap:   func() *model.Snapshot { return nodeSnap(false, withAffinity(webExt(a, f), time.Minute)) },
			after:  []model.ServicePort{withAffinity(webExt(a, f), time.Minute), other},
		},
		{
			name:   "delete a Service with external frontends and affinity",
			before: []model.ServicePort{withAffinity(webLocal([]string{a}, a, b), time.Hour), other},
			snap: func() *model.Snapshot {
				return withDeleted(nodeSnap(false), web().Name.ServiceName)
			},
			after: []model.ServicePort{other},
		},
	}
}

// nodeSnap is a snapshot on testNode.
func nodeSnap(full bool, ports ...model.ServicePort) *model.Snapshot {
	return onNode(testNode, full, ports...)
}

// faultRun is a scenario's starting state, with every operation watched.
type faultRun struct {
	f *fakeMaps
	r *reconciler
}

func startFaultRun(t *testing.T, sc faultScenario) faultRun {
	t.Helper()
	f := newFakeMaps(64, 256)
	r := newReconciler(f.maps(), f.grace(), 64, 256)
	if err := r.sync(nodeSnap(true, sc.before...)); err != nil {
		t.Fatalf("initial state: %v", err)
	}
	f.takeLog()
	f.ops = 0
	watchHoles(t, f)
	watchReaders(t, f)
	return faultRun{f: f, r: r}
}

// portsOf lists the service ports of a scenario by frontend, every
// frontend the programs serve for them on testNode.
func portsOf(sc faultScenario) map[model.Frontend]model.ServicePortName {
	out := make(map[model.Frontend]model.ServicePortName)
	for _, p := range append(slices.Clone(sc.before), sc.after...) {
		for _, f := range socketFrontends(&p, &testNode) {
			out[f.Frontend] = p.Name
		}
	}
	return out
}

type liveState struct {
	backends []string
	// flags are the entry's flags, as the programs read them.
	flags  uint32
	exists bool
}

func (s liveState) String() string {
	if !s.exists {
		return "<not a service>"
	}
	return fmt.Sprintf("%v flags=%#x", s.backends, s.flags)
}

func liveStates(f *fakeMaps, ports map[model.Frontend]model.ServicePortName) map[model.Frontend]liveState {
	out := make(map[model.Frontend]liveState)
	for fe := range ports {
		set, ok := liveSet(f, fe)
		out[fe] = liveState{backends: set, flags: flagsOf(f.services.entries[fe]), exists: ok}
	}
	return out
}

func (s liveState) equal(o liveState) bool {
	return s.exists == o.exists && s.flags == o.flags && slices.Equal(s.backends, o.backends)
}

// A sync that fails at any one operation leaves each service port in its
// old state or its new one, never a mix and never a hole, names the port
// that failed, keeps its copy equal to the kernel, and the next sync
// converges. Every operation of every sync, failed or not, is checked for
// holes and for deletions a racing connect could trip over.
func TestReconcilerFailedSyncLeavesEachPortOldOrNew(t *testing.T) {
	for _, sc := range faultScenarios() {
		t.Run(sc.name, func(t *testing.T) {
			ports := portsOf(sc)

			clean := startFaultRun(t, sc)
			old := liveStates(clean.f, ports)
			if err := clean.r.sync(sc.snap()); err != nil {
				t.Fatalf("sync without faults: %v", err)
			}
			operations := clean.f.ops
			checkCopy(t, clean.r, clean.f)
			want := served(clean.f)
			updated := liveStates(clean.f, ports)
			clean.f.takeLog()
			if err := clean.r.sync(nodeSnap(true, sc.after...)); err != nil {
				t.Fatal(err)
			}
			if ops := clean.f.takeLog(); len(ops) != 0 {
				t.Errorf("a full sync after the change wrote %q, want nothing", ops)
			}
			t.Logf("%d operations", operations)

			for n := 1; n <= operations; n++ {
				run := startFaultRun(t, sc)
				var failedOp fakeOp
				run.f.fail = func(op fakeOp) error {
					err := failNth(n)(op)
					if err != nil {
						failedOp = op
					}
					return err
				}
				err := run.r.sync(sc.snap())
				if failedOp.mapName == "stats" && failedOp.kind == "update" {
					// Counters fail nothing: the port is served, and a
					// later sync creates them.
					if err != nil {
						t.Errorf("operation %d (%s) failed: sync returned %v, want nil", n, failedOp.text, err)
					}
					checkCopy(t, run.r, run.f)
					if got := liveStates(run.f, ports); !maps.EqualFunc(got, updated, liveState.equal) {
						t.Errorf("operation %d (%s) failed: serving %v, want %v", n, failedOp.text, got, updated)
					}
					continue
				}
				var se *dataplane.SyncError
				if !errors.As(err, &se) {
					t.Fatalf("operation %d failed: sync returned %v, want a *dataplane.SyncError", n, err)
				}
				checkCopy(t, run.r, run.f)
				failed := make(map[model.ServicePortName]bool)
				for _, s := range se.Services {
					failed[s.Service] = true
					if s.Service != ports[s.Frontend] || s.Reason != dataplane.ReasonWriteFailed {
						t.Errorf("operation %d failed: error names %v (%s), want %v (%s)",
							n, s.Service, s.Reason, ports[s.Frontend], dataplane.ReasonWriteFailed)
					}
				}
				// One operation failed: one port, or the garbage collection.
				reported := len(se.Services)
				if se.Err != nil {
					reported++
				}
				if reported != 1 {
					t.Errorf("operation %d failed: %v reports %d failures, want 1", n, err, reported)
				}
				for fe, now := range liveStates(run.f, ports) {
					want, state := updated[fe], "new"
					if failed[ports[fe]] {
						want, state = old[fe], "old"
					}
					if !now.equal(want) {
						t.Errorf("operation %d failed (%v): %s serves %v, want its %s state %v", n, err, fe, now, state, want)
					}
				}

				run.f.fail = nil
				if err := run.r.sync(nodeSnap(true, sc.after...)); err != nil {
					t.Fatalf("operation %d failed, then the next sync: %v", n, err)
				}
				checkCopy(t, run.r, run.f)
				if got := served(run.f); got != want {
					t.Errorf("operation %d failed, then the next sync left\n%swant\n%s", n, got, want)
				}
			}
		})
	}
}

// When the writes that undo a failed update fail too, the port may serve a
// mix of old and new backends, but still no hole, the copy stays the
// kernel's, nothing racing connects may read is deleted, and the next sync
// converges.
func TestReconcilerFailedUndoKeepsCopyExact(t *testing.T) {
	for _, sc := range faultScenarios() {
		t.Run(sc.name, func(t *testing.T) {
			clean := startFaultRun(t, sc)
			if err := clean.r.sync(sc.snap()); err != nil {
				t.Fatal(err)
			}
			want := served(clean.f)
			for n := 1; n <= clean.f.ops; n++ {
				run := startFaultRun(t, sc)
				run.f.fail = failFrom(n)
				var se *dataplane.SyncError
				if err := run.r.sync(sc.snap()); !errors.As(err, &se) {
					t.Fatalf("operations %d.. failed: sync returned %v, want a *dataplane.SyncError", n, err)
				}
				checkCopy(t, run.r, run.f)
				run.f.fail = nil
				if err := run.r.sync(nodeSnap(true, sc.after...)); err != nil {
					t.Fatalf("operations %d.. failed, then the next sync: %v", n, err)
				}
				if got := served(run.f); got != want {
					t.Errorf("operations %d.. failed, then the next sync left\n%swant\n%s", n, got, want)
				}
			}
		})
	}
}
