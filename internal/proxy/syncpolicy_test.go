package proxy

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// monitoredDataplane is the scripted datapath with the iptables
// datapath's optional methods: a canary check and node changes in
// partial syncs.
type monitoredDataplane struct {
	*scriptedDataplane
	// flushed makes Intact report the canary gone; checkErr makes it fail.
	flushed  bool
	checkErr error
	checks   int
	// nodeChanges is what AppliesNodeChanges reports.
	nodeChanges bool
	// large is what LargeCluster reports.
	large bool
}

func (d *monitoredDataplane) LargeCluster() bool { return d.large }

func (d *monitoredDataplane) Intact(context.Context) (bool, error) {
	d.checks++
	if d.checkErr != nil {
		return false, d.checkErr
	}
	return !d.flushed, nil
}

func (d *monitoredDataplane) AppliesNodeChanges() bool { return d.nodeChanges }

func (d *scriptedDataplane) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.snaps)
}

func newMonitoredHarness(t *testing.T, nodeChanges bool) (*proxierHarness, *monitoredDataplane) {
	t.Helper()
	var md *monitoredDataplane
	h := newProxierHarnessFor(t, func(d *scriptedDataplane) dataplane.Dataplane {
		md = &monitoredDataplane{scriptedDataplane: d, nodeChanges: nodeChanges}
		// Wrapped as main wraps every datapath.
		return dataplane.WithHandover(md, "ebpf", func(context.Context) error { return nil })
	})
	return h, md
}

// As kube-proxy's iptables mode (pkg/proxy/iptables/proxier.go,
// syncProxyRules: doFullSync is needFullSync or an hour since the last
// full sync; ipt.Monitor checks the canary each syncPeriod and forces a
// full sync when it is gone): with iptables rules, each SyncPeriod only
// checks the canary; full syncs come once per FullSyncPeriod, after a
// failure, and when the canary is gone.
func TestProxierFullSyncsOncePerFullSyncPeriod(t *testing.T) {
	h, md := newMonitoredHarness(t, true)
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	if snap := h.syncOK(); !snap.Full {
		t.Fatal("first sync is not full")
	}
	checks := func(result string) float64 {
		return testutil.ToFloat64(h.m.DatapathChecksTotal.WithLabelValues(result, metrics.IPFamily))
	}

	// Periodic syncs without changes: partial and empty, one check each
	// period, however many syncs run within it.
	for i := 1; i <= 4; i++ {
		h.clk.Step(harnessSyncPeriod)
		if snap := h.syncOK(); snap.Full || len(snap.Services) != 0 {
			t.Fatalf("periodic sync %d: full=%v services %v, want an empty partial one", i, snap.Full, names(snap))
		}
	}
	h.p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, "10.244.0.2"))
	if snap := h.syncOK(); snap.Full || !slices.Equal(names(snap), []string{"web"}) {
		t.Fatalf("change within the period: full=%v services %v, want a partial [web]", snap.Full, names(snap))
	}
	if md.checks != 4 || checks(metrics.CheckIntact) != 4 {
		t.Errorf("%d checks (%v counted intact), want one per period: 4", md.checks, checks(metrics.CheckIntact))
	}

	// A check that cannot tell (iptables failed) keeps partial syncs.
	md.checkErr = errors.New("listing the canary: exit status 2")
	h.clk.Step(harnessSyncPeriod)
	if snap := h.syncOK(); snap.Full {
		t.Error("a check that failed made the sync full")
	}
	md.checkErr = nil
	if checks(metrics.CheckError) != 1 {
		t.Errorf("check errors counted %v, want 1", checks(metrics.CheckError))
	}

	// The canary gone: the next sync is full, then partial again.
	md.flushed = true
	h.clk.Step(harnessSyncPeriod)
	if snap := h.syncOK(); !snap.Full {
		t.Error("sync after the canary vanished is not full")
	}
	md.flushed = false
	if checks(metrics.CheckFlushed) != 1 {
		t.Errorf("flushes counted %v, want 1", checks(metrics.CheckFlushed))
	}
	h.clk.Step(harnessSyncPeriod)
	if snap := h.syncOK(); snap.Full {
		t.Error("sync after the repairing full one is full")
	}

	// FullSyncPeriod (an hour) after the last full sync: full.
	h.clk.Step(DefaultFullSyncPeriod - harnessSyncPeriod)
	if snap := h.syncOK(); !snap.Full {
		t.Error("sync an hour after the last full one is not full")
	}

	// In kube-proxy's large cluster mode an hour brings no full sync
	// (TestSyncProxyRulesLargeClusterMode), a flush still does.
	md.large = true
	h.clk.Step(DefaultFullSyncPeriod)
	if snap := h.syncOK(); snap.Full {
		t.Error("sync an hour later in large cluster mode is full")
	}
	md.flushed = true
	h.clk.Step(harnessSyncPeriod)
	if snap := h.syncOK(); !snap.Full {
		t.Error("sync after a flush in large cluster mode is not full")
	}
	md.flushed, md.large = false, false

	// A failure that lost state: the next sync is full.
	h.dp.failWhole(errors.New("restore failed"))
	h.p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, "10.244.0.3"))
	if _, err := h.sync(); err == nil {
		t.Fatal("failed sync reported no error")
	}
	h.dp.failWhole(nil)
	if snap := h.syncOK(); !snap.Full {
		t.Error("sync after a failure is not full")
	}
}

// A datapath of maps alone (no canary) keeps a full sync every SyncPeriod.
func TestProxierMapsSyncInFullEachPeriod(t *testing.T) {
	h := newProxierHarness(t)
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.syncOK()
	h.clk.Step(harnessSyncPeriod / 2)
	if snap := h.syncOK(); snap.Full {
		t.Error("sync within the period is full")
	}
	h.clk.Step(harnessSyncPeriod / 2)
	if snap := h.syncOK(); !snap.Full {
		t.Error("periodic sync is not full")
	}
}

// A change of the node goes in a partial sync to a datapath that applies
// it there (the iptables rules), and in a full one to any other (the eBPF
// maps, the layered datapath).
func TestProxierNodeChangeIsPartialWhereApplied(t *testing.T) {
	for _, c := range []struct {
		name        string
		nodeChanges bool
		wantFull    bool
	}{
		{"applied in partial syncs", true, false},
		{"needs a full sync", false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, _ := newMonitoredHarness(t, c.nodeChanges)
			h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
			h.syncOK()
			// A Service another proxy serves changes the node info.
			h.p.OnForeignServiceUpsert(service("default", "other", "10.96.0.99", tcpPort("http", 80, 8080)))
			snap := h.syncOK()
			if snap.Full != c.wantFull {
				t.Errorf("sync after the node changed: full=%v, want %v", snap.Full, c.wantFull)
			}
			if want := []string{"10.96.0.99"}; fmt.Sprint(snap.Node.ForeignClusterIPs) != fmt.Sprint(want) {
				t.Errorf("snapshot's node %+v, want the foreign ClusterIP", snap.Node)
			}
			if snap := h.syncOK(); snap.Full {
				t.Error("sync after the node change was applied is full")
			}
		})
	}
}

// A sync that found the xtables lock held changed nothing: it does not
// escalate to a full sync, its changes go again in the next partial one,
// and the retries back off from RetryPeriod to SyncPeriod, skipping the
// syncs triggered meanwhile. A full sync that hit the lock stays full.
func TestProxierLockTimeoutBacksOff(t *testing.T) {
	h, _ := newMonitoredHarness(t, true)
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.p.OnServiceUpsert(service("default", "db", "10.96.0.11", tcpPort("pg", 5432, 5432)))
	h.syncOK()

	busy := fmt.Errorf("applying 4 nat rules: %w", dataplane.ErrBusy)
	h.dp.failWhole(busy)
	h.p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, "10.244.0.2"))
	if _, err := h.sync(); err != nil {
		t.Fatalf("sync that found the lock held returned %v to the runner, want nil (the proxy backs off itself)", err)
	}
	if got := testutil.ToFloat64(h.m.SyncLockTimeoutsTotal); got != 1 {
		t.Errorf("lock time-outs counted %v, want 1", got)
	}
	at := h.clk.Now()
	for i, delay := range []time.Duration{1, 2, 4, 8, 16, 30, 30} {
		delay *= time.Second
		// Triggered syncs before the retry is due do nothing.
		n := h.dp.count()
		h.clk.SetTime(at.Add(delay - time.Millisecond))
		h.p.OnEndpointSliceUpsert(slice("default", "db-1", "db", "pg", 5432, fmt.Sprintf("10.244.1.%d", i+1)))
		if _, err := h.sync(); err != nil {
			t.Fatal(err)
		}
		if h.dp.count() != n {
			t.Fatalf("retry %d: the datapath was synced %s before the backoff of %s ended", i, time.Millisecond, delay)
		}
		h.clk.SetTime(at.Add(delay))
		snap, err := h.sync()
		if err != nil {
			t.Fatal(err)
		}
		if snap.Full || !slices.Contains(names(snap), "web") || !slices.Contains(names(snap), "db") {
			t.Fatalf("retry %d after %s: full=%v services %v, want a partial one with web (requeued) and db", i, delay, snap.Full, names(snap))
		}
		at = h.clk.Now()
	}

	// The lock is free: the requeued changes are applied, partially.
	h.dp.failWhole(nil)
	h.clk.Step(harnessSyncPeriod)
	snap := h.syncOK()
	if snap.Full || !slices.Contains(names(snap), "web") {
		t.Fatalf("sync after the lock was released: full=%v services %v, want a partial one with web", snap.Full, names(snap))
	}
	if ok, _, _ := h.health.Healthy(); !ok {
		t.Error("unhealthy after the requeued changes were applied")
	}
	// And the backoff starts again from RetryPeriod.
	h.dp.failWhole(busy)
	h.p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, "10.244.0.7"))
	if _, err := h.sync(); err != nil {
		t.Fatal(err)
	}
	h.clk.Step(harnessRetryPeriod)
	h.dp.failWhole(nil)
	if snap := h.syncOK(); snap.Full || !slices.Contains(names(snap), "web") {
		t.Errorf("first retry of a new backoff: full=%v services %v", snap.Full, names(snap))
	}

	// A full sync that found the lock held stays full.
	h.clk.Step(DefaultFullSyncPeriod)
	h.dp.failWhole(busy)
	if snap, _ := h.sync(); !snap.Full {
		t.Fatal("the sync an hour later is not full")
	}
	h.dp.failWhole(nil)
	h.clk.Step(harnessRetryPeriod)
	if snap := h.syncOK(); !snap.Full {
		t.Error("the full sync that found the lock held was retried as a partial one")
	}
}

// The layered datapath (the eBPF mode) reports a lock time-out of its
// packet layer as one: the socket layer applied its part, which the
// requeued changes apply again, idempotently.
func TestOnlyBusyThroughLayers(t *testing.T) {
	busy := fmt.Errorf("packet layer: %w", fmt.Errorf("restore: %w", dataplane.ErrBusy))
	other := errors.New("map gone")
	port := &dataplane.ServiceError{Service: model.ServicePortName{Port: "http"}, Err: errors.New("map full")}
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"busy", busy, true},
		{"busy with failed ports", &dataplane.SyncError{Services: []*dataplane.ServiceError{port}, Err: errors.Join(busy)}, true},
		{"busy and another failure", &dataplane.SyncError{Err: errors.Join(busy, other)}, false},
		{"another failure", other, false},
		{"ports only", &dataplane.SyncError{Services: []*dataplane.ServiceError{port}}, false},
		{"nil", nil, false},
	} {
		if got := dataplane.OnlyBusy(c.err); got != c.want {
			t.Errorf("%s: OnlyBusy = %v, want %v", c.name, got, c.want)
		}
	}
}

// A canary check that found the xtables lock held takes the busy path: no
// restore waits for the lock a second time in the same sync, the lock
// time-out is counted once, and the changes go in the retry after the
// backoff, which checks again.
func TestProxierBusyCheckBacksOff(t *testing.T) {
	h, md := newMonitoredHarness(t, true)
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.syncOK()
	n := h.dp.count()

	md.checkErr = fmt.Errorf("listing the canary: %w", dataplane.ErrBusy)
	h.clk.Step(harnessSyncPeriod)
	h.p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, "10.244.0.2"))
	if err := h.p.sync(context.Background()); err != nil {
		t.Fatalf("sync whose check found the lock held returned %v, want nil (the proxy backs off itself)", err)
	}
	if h.dp.count() != n {
		t.Fatal("the datapath was synced after the check found the lock held: a second wait for the lock")
	}
	if got := testutil.ToFloat64(h.m.SyncLockTimeoutsTotal); got != 1 {
		t.Errorf("lock time-outs counted %v, want 1", got)
	}
	if ok, _, _ := h.health.Healthy(); ok {
		t.Log("healthy while backing off (the health grace period)")
	}

	// The lock is free: the retry, a backoff later, checks again and
	// applies the change.
	md.checkErr = nil
	checks := md.checks
	h.clk.Step(harnessRetryPeriod)
	snap := h.syncOK()
	if md.checks != checks+1 {
		t.Errorf("the retry ran %d checks, want 1", md.checks-checks)
	}
	if snap.Full || !slices.Equal(names(snap), []string{"web"}) {
		t.Errorf("retry: full=%v services %v, want a partial [web]", snap.Full, names(snap))
	}
	if got := testutil.ToFloat64(h.m.SyncLockTimeoutsTotal); got != 1 {
		t.Errorf("lock time-outs counted %v after the retry, want 1", got)
	}
}
