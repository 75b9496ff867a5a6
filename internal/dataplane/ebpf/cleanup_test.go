package ebpf

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// blockingSocketHost is a node's namespace whose opening waits until the
// test releases it.
type blockingSocketHost struct {
	*fakeSocketHost
	entered chan struct{}
	release chan struct{}
}

func (h *blockingSocketHost) open(ns string) (socketTable, error) {
	h.entered <- struct{}{}
	<-h.release
	return h.fakeSocketHost.open(ns)
}

// livenessBound only keeps a test that would hang from hanging: nothing
// here waits on time to pass.
const livenessBound = time.Minute

// The sync returns, and the next one applies, while the cleanup it handed
// over is still visiting namespaces: neither the map writes nor the packet
// layer's sync, which follows, wait for it.
func TestSyncDoesNotWaitForTheSocketCleanup(t *testing.T) {
	host := &blockingSocketHost{fakeSocketHost: newFakeSocketHost("node"),
		entered: make(chan struct{}, 8), release: make(chan struct{})}
	revnat := fakeRevnat{}
	revnat.record(1, "10.244.1.1:53", dnsVIP)
	host.ns["node"].sockets = append(host.ns["node"].sockets, udpSocket(1, "10.244.1.1:53"))
	events := newEventCounts()
	f := newFakeMaps(64, 256)
	sockets := newUDPSocketCleaner(host, revnat.lookup, events)
	cleanup := newCleanupWorker(sockets.clean)
	t.Cleanup(cleanup.close)
	dp := &Dataplane{familyPath: &familyPath{rec: newReconciler(f.maps(), f.grace(), 64, 256), sockets: sockets, cleanup: cleanup}, events: events}

	synced := make(chan error, 2)
	go func() {
		synced <- dp.Sync(context.Background(), snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53")))
		synced <- dp.Sync(context.Background(), snapshot(false, dnsPort("10.244.1.2:53")))
	}()
	select {
	case <-host.entered:
	case <-time.After(livenessBound):
		t.Fatal("the first sync handed over no cleanup")
	}
	// The first cleanup is stuck in the node's namespace.
	for range 2 {
		select {
		case err := <-synced:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(livenessBound):
			close(host.release)
			t.Fatal("a sync waited for the socket cleanup")
		}
	}
	if services, _ := dp.Counts(); services != 1 {
		t.Errorf("%d service ports in the maps, want the one synced", services)
	}
	close(host.release)
	dp.waitSocketCleanup()
	if want := []string{"node 1"}; !slices.Equal(host.destroyed, want) {
		t.Errorf("destroyed %v, want %v once the cleanup ran", host.destroyed, want)
	}
}

// recordingClean is a cleanup that records what it was asked to check and
// fails when told to; the first call waits for release.
type recordingClean struct {
	mu      sync.Mutex
	calls   [][]string
	fail    bool
	started chan struct{}
	release chan struct{}
}

func (r *recordingClean) clean(check udpCheck, stop <-chan struct{}) bool {
	r.mu.Lock()
	first := len(r.calls) == 0
	r.calls = append(r.calls, checkKeys(check))
	fail := r.fail
	r.mu.Unlock()
	if first && r.release != nil {
		r.started <- struct{}{}
		select {
		case <-r.release:
		case <-stop:
		}
	}
	return fail
}

func (r *recordingClean) got() [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

func checkOf(fe string, serving ...string) udpCheck {
	c := make(udpCheck)
	a := netip.MustParseAddrPort(fe)
	c.add(model.Frontend{IP: a.Addr(), Port: a.Port(), Protocol: model.UDP}, backendList(serving...), false)
	return c
}

func merged(checks ...udpCheck) udpCheck {
	out := make(udpCheck)
	for _, c := range checks {
		out.merge(c)
	}
	return out
}

// What syncs hand over while a cleanup runs is cleaned next, in one
// cleanup, with each frontend's newest serving endpoints.
func TestCleanupWorkerMergesWhatArrivesMeanwhile(t *testing.T) {
	r := &recordingClean{started: make(chan struct{}), release: make(chan struct{})}
	w := newCleanupWorker(r.clean)
	defer w.close()
	w.submit(checkOf(dnsVIP, "10.244.1.1:53", "10.244.1.2:53"), false)
	<-r.started
	w.submit(checkOf(dnsVIP, "10.244.1.2:53", "10.244.1.3:53"), false)
	w.submit(checkOf(otherVIP, "10.244.3.1:8125"), false)
	w.submit(checkOf(dnsVIP, "10.244.1.3:53"), false)
	close(r.release)
	w.wait()
	want := [][]string{
		{"10.96.0.10:53 [10.244.1.1:53 10.244.1.2:53]"},
		{"10.96.0.10:53 [10.244.1.3:53]", "10.96.0.11:53 [10.244.3.1:8125]"},
	}
	if got := r.got(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("cleanups %v, want %v", got, want)
	}
}

// A cleanup that failed somewhere is tried again with the next full sync,
// unless a later cleanup of the frontend superseded it.
func TestCleanupWorkerRetriesFailuresWithTheNextFullSync(t *testing.T) {
	r := &recordingClean{fail: true}
	w := newCleanupWorker(r.clean)
	defer w.close()
	w.submit(merged(checkOf(dnsVIP, "10.244.1.1:53"), checkOf(otherVIP, "10.244.3.1:8125")), false)
	w.wait()
	r.mu.Lock()
	r.fail = false
	r.mu.Unlock()
	w.submit(checkOf(otherVIP, "10.244.3.2:8125"), false)
	w.wait()
	w.submit(udpCheck{}, false)
	w.wait()
	w.submit(udpCheck{}, true)
	w.wait()
	w.submit(udpCheck{}, true)
	w.wait()
	want := [][]string{
		{"10.96.0.10:53 [10.244.1.1:53]", "10.96.0.11:53 [10.244.3.1:8125]"},
		{"10.96.0.11:53 [10.244.3.2:8125]"},
		{"10.96.0.10:53 [10.244.1.1:53]"},
	}
	if got := r.got(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("cleanups %v, want %v", got, want)
	}
}

// Closing interrupts a cleanup under way and drops what is pending.
func TestCleanupWorkerCloseStopsIt(t *testing.T) {
	r := &recordingClean{started: make(chan struct{}), release: make(chan struct{})}
	w := newCleanupWorker(r.clean)
	w.submit(checkOf(dnsVIP, "10.244.1.1:53"), false)
	<-r.started
	w.submit(checkOf(otherVIP, "10.244.3.1:8125"), false)
	w.close()
	w.submit(checkOf(otherVIP, "10.244.3.2:8125"), false)
	w.wait()
	if got := r.got(); len(got) != 1 {
		t.Errorf("cleanups %v, want only the one interrupted", got)
	}
}

// A frontend merged stays fresh if either side was: the sockets connected
// to it before it had a serving endpoint are there until a cleanup runs.
func TestUDPCheckMergeKeepsFresh(t *testing.T) {
	fe := dnsPort().ClusterIP
	c := make(udpCheck)
	c.add(fe, backendList("10.244.1.1:53"), true)
	newer := make(udpCheck)
	newer.add(fe, backendList("10.244.1.2:53"), false)
	c.merge(newer)
	if got, want := checkKeys(c), []string{"10.96.0.10:53 [10.244.1.2:53] fresh"}; !slices.Equal(got, want) {
		t.Errorf("merged %v, want %v", got, want)
	}
}
