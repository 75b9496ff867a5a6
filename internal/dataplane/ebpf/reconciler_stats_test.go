package ebpf

import (
	"errors"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// statsOf is the counters entry of the service id serving fe.
func statsOf(t *testing.T, f *fakeMaps, fe model.Frontend) (lbSvcStats, bool) {
	t.Helper()
	v, ok := f.services.entries[fe]
	if !ok {
		t.Fatalf("%s is not a service", fe)
	}
	s, ok := f.stats.entries[idOf(v)]
	return s, ok
}

// A service id's counters exist from before its frontend is visible until
// the id is released, a grace period after the frontend went (also for a
// port without backends, which hides no slot), and an id handed out again
// counts from zero.
func TestReconcilerStatsFollowServiceIDs(t *testing.T) {
	// Two ids only, so the third port created reuses one.
	f := newFakeMaps(2, 64)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 2, 64)
	web := servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080")
	empty := servicePort("default", "empty", "http", model.TCP, "10.96.0.11:80")
	if err := r.sync(snapshot(true, web, empty)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	for _, p := range []model.ServicePort{web, empty} {
		if s, ok := statsOf(t, f, p.ClusterIP); !ok || s != (lbSvcStats{}) {
			t.Fatalf("%s: counters %+v (exist: %v), want zero", p.Name, s, ok)
		}
	}
	// The programs count.
	emptyID := idOf(f.services.entries[empty.ClusterIP])
	f.stats.entries[emptyID] = lbSvcStats{Refused: 7}
	f.takeLog()

	// empty goes: its counters with its id, after a grace period.
	if err := r.sync(snapshot(true, web)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	log := strings.Join(f.takeLog(), "\n")
	grace := strings.Index(log, "grace period")
	del := strings.Index(log, "delete stats")
	if grace < 0 || del < grace {
		t.Errorf("removing a port without backends did:\n%s\nwant a grace period, then its counters deleted", log)
	}

	// The id is reused, and counts from zero.
	other := servicePort("default", "other", "dns", model.UDP, "10.96.0.12:53", "10.244.0.1:53")
	if err := r.sync(snapshot(true, web, other)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	if id := idOf(f.services.entries[other.ClusterIP]); id != emptyID {
		t.Fatalf("other has id %d, want the released id %d reused", id, emptyID)
	}
	if s, ok := statsOf(t, f, other.ClusterIP); !ok || s != (lbSvcStats{}) {
		t.Errorf("reused id: counters %+v (exist: %v), want zero", s, ok)
	}
}

// Counters survive a restart. A datapath pinned by a version without them
// gets them, at zero, for every port it serves, when the proxy starts.
func TestReconcilerRestoreKeepsOrCreatesStats(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	web := servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080")
	dns := servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", "10.244.0.5:53")
	if err := r.sync(snapshot(true, web, dns)); err != nil {
		t.Fatal(err)
	}
	webID := idOf(f.services.entries[web.ClusterIP])
	dnsID := idOf(f.services.entries[dns.ClusterIP])
	f.stats.entries[webID] = lbSvcStats{Connections: 10, Reverse: 4}
	delete(f.stats.entries, dnsID) // as the previous version left it
	f.takeLog()

	restarted := newReconciler(f.maps(), f.grace(), 16, 64)
	if err := restarted.restore(); err != nil {
		t.Fatal(err)
	}
	if got := f.takeLog(); len(got) != 1 || got[0] != "update stats svc=2 connections=0 datagrams=0 refused=0 reverse=0" {
		t.Errorf("restore wrote %q, want the missing counters of dns created", got)
	}
	checkCopy(t, restarted, f)
	if s := f.stats.entries[webID]; s != (lbSvcStats{Connections: 10, Reverse: 4}) {
		t.Errorf("web's counters after restart: %+v, want them kept", s)
	}
	// Names come with the first sync, which leaves the counters alone.
	if n := len(restarted.namedIDs()); n != 0 {
		t.Errorf("%d ports named before the first sync, want 0", n)
	}
	if err := restarted.sync(snapshot(true, web, dns)); err != nil {
		t.Fatal(err)
	}
	if ops := f.takeLog(); len(ops) != 0 {
		t.Errorf("the first sync after the restart wrote %q, want nothing", ops)
	}
	if got := restarted.namedIDs(); got[webID] != web.Name || got[dnsID] != dns.Name || len(got) != 2 {
		t.Errorf("named ids %v", got)
	}
}

// A counters entry that cannot be created at restore is created by the
// next sync; that failure fails nothing, and the port keeps serving.
func TestReconcilerStatsCreatedLaterWhenRestoreCannot(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	web := servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080")
	if err := r.sync(snapshot(true, web)); err != nil {
		t.Fatal(err)
	}
	clear(f.stats.entries)
	f.fail = func(op fakeOp) error {
		if op.mapName == "stats" {
			return errors.New("injected: cannot allocate memory")
		}
		return nil
	}
	restarted := newReconciler(f.maps(), f.grace(), 16, 64)
	if err := restarted.restore(); err != nil {
		t.Fatalf("restore failed for want of counters: %v", err)
	}
	checkCopy(t, restarted, f)
	if err := restarted.sync(snapshot(true, web)); err != nil {
		t.Fatalf("sync failed for want of counters: %v", err)
	}
	f.fail = nil
	if err := restarted.sync(snapshot(true, web)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, restarted, f)
	if _, ok := statsOf(t, f, web.ClusterIP); !ok {
		t.Error("the counters were not created by a later sync")
	}
}

// A frontend taken over by another Service port in one sync (a ClusterIP
// reused at once) keeps its id, but not the old port's counts.
func TestReconcilerStatsResetWhenFrontendChangesOwner(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	old := servicePort("default", "old", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080")
	if err := r.sync(snapshot(true, old)); err != nil {
		t.Fatal(err)
	}
	id := idOf(f.services.entries[old.ClusterIP])
	f.stats.entries[id] = lbSvcStats{Connections: 3}
	// The same name keeps counting.
	if err := r.sync(snapshot(true, servicePort("default", "old", "http", model.TCP, "10.96.0.10:80", "10.244.0.2:8080"))); err != nil {
		t.Fatal(err)
	}
	if s := f.stats.entries[id]; s.Connections != 3 {
		t.Fatalf("an endpoint change reset the counters: %+v", s)
	}
	taken := servicePort("other", "new", "web", model.TCP, "10.96.0.10:80", "10.244.0.2:8080")
	if err := r.sync(snapshot(true, taken)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	if idOf(f.services.entries[taken.ClusterIP]) != id {
		t.Fatal("the frontend changed id; this test wants it kept")
	}
	if s := f.stats.entries[id]; s != (lbSvcStats{}) {
		t.Errorf("the new owner inherited %+v, want zero", s)
	}
	if got := r.namedIDs()[id]; got != taken.Name {
		t.Errorf("id %d named %v, want %v", id, got, taken.Name)
	}
}

// The entries the reconciler reports are what the maps hold.
func TestReconcilerEntriesMatchMaps(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	if err := r.sync(snapshot(true,
		servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080", "10.244.0.2:8080"),
		servicePort("default", "api", "http", model.TCP, "10.96.0.11:80", "10.244.0.2:8080", "10.244.0.3:8080"),
		servicePort("default", "empty", "http", model.TCP, "10.96.0.12:80"))); err != nil {
		t.Fatal(err)
	}
	e := r.entries()
	want := [6]int{len(f.services.entries), len(f.slots.entries), len(f.backends.entries), len(f.stats.entries),
		len(f.matches.entries), len(f.clusterIPs.entries)}
	if got := [6]int{e.frontends, e.slots, e.backends, e.stats, e.matches, e.clusterIPs}; got != want || got != [6]int{3, 4, 3, 3, 0, 3} {
		t.Errorf("entries (frontends, slots, backends, stats, matches, ClusterIPs) %v, the maps hold %v, want [3 4 3 3 0 3]", got, want)
	}
}

// A new service id whose counters entry cannot be created still serves its
// port: the failure is logged and counted, and a later sync of the port
// creates the entry.
func TestReconcilerNewPortServedWithoutStats(t *testing.T) {
	f := newFakeMaps(16, 64)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	r.events = newEventCounts(eventStatsFailed)
	web := servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080")
	f.fail = func(op fakeOp) error {
		if op.mapName == "stats" {
			return errors.New("injected: cannot allocate memory")
		}
		return nil
	}
	if err := r.sync(snapshot(true, web)); err != nil {
		t.Fatalf("the port failed for want of counters: %v", err)
	}
	checkCopy(t, r, f)
	if set, ok := liveSet(f, web.ClusterIP); !ok || strings.Join(set, " ") != "10.244.0.1:8080" {
		t.Fatalf("%s serves %v (%v), want its backend", web.ClusterIP, set, ok)
	}
	got := map[string]uint64{}
	r.events.copyTo(got)
	if got[eventStatsFailed] != 1 {
		t.Errorf("counted %d failed counters entries, want 1", got[eventStatsFailed])
	}
	f.fail = nil
	if err := r.sync(snapshot(false, web)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	if _, ok := statsOf(t, f, web.ClusterIP); !ok {
		t.Error("the counters were not created by a later sync")
	}
}
