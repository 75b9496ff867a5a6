package proxy

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// triggered sets a slice's resourceVersion and last-change-trigger-time, as
// the API server and the EndpointSlice controller do.
func triggered(s *discoveryv1.EndpointSlice, rv string, at time.Time) *discoveryv1.EndpointSlice {
	s.ResourceVersion = rv
	s.Annotations = map[string]string{v1.EndpointsLastChangeTriggerTime: at.Format(time.RFC3339Nano)}
	return s
}

// programming returns the sample count and sum of
// kubeproxy_network_programming_duration_seconds.
func (h *proxierHarness) programming() (uint64, float64) {
	h.t.Helper()
	families, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "kubeproxy_network_programming_duration_seconds" {
			hist := f.GetMetric()[0].GetHistogram()
			return hist.GetSampleCount(), hist.GetSampleSum()
		}
	}
	return 0, 0
}

func (h *proxierHarness) checkProgramming(what string, wantCount uint64, wantSum float64) {
	h.t.Helper()
	if n, sum := h.programming(); n != wantCount || sum != wantSum {
		h.t.Errorf("%s: network programming %d samples summing to %vs, want %d summing to %vs", what, n, sum, wantCount, wantSum)
	}
}

// TestNetworkProgrammingLatency: each EndpointSlice change made after the
// proxy started is observed once, as the time from its trigger to the end
// of the sync that programmed it; a sync that fails keeps it for the one
// that succeeds, and a Service whose port failed on its own waits for the
// retry that programs it.
func TestNetworkProgrammingLatency(t *testing.T) {
	h := newProxierHarness(t) // started at t0
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.p.OnServiceUpsert(service("default", "big", "10.96.0.11", tcpPort("http", 80, 8080)))
	// Triggered before the proxy started: not its latency.
	h.p.OnEndpointSliceUpsert(triggered(slice("default", "web-1", "web", "http", 8080, "10.244.0.2"), "1", t0.Add(-time.Minute)))
	h.clk.Step(time.Second)
	h.syncOK()
	h.checkProgramming("changes from before the start", 0, 0)

	h.p.OnEndpointSliceUpsert(triggered(slice("default", "web-1", "web", "http", 8080, "10.244.0.3"), "2", t0.Add(2*time.Second)))
	h.clk.SetTime(t0.Add(3 * time.Second))
	h.dp.failWhole(errors.New("iptables-restore: boom"))
	if _, err := h.sync(); err == nil {
		t.Fatal("sync succeeded, want the scripted failure")
	}
	h.checkProgramming("after a failed sync", 0, 0)

	h.clk.SetTime(t0.Add(6 * time.Second))
	h.dp.failWhole(nil)
	h.syncOK()
	h.checkProgramming("after the full sync that programmed it", 1, 4)
	h.clk.Step(time.Second)
	h.syncOK()
	h.checkProgramming("after another sync", 1, 4)

	// big's port fails on its own: its change waits for the retry.
	h.dp.fail(portOf("big", "http", model.TCP), mapFullMsg)
	h.p.OnEndpointSliceUpsert(triggered(slice("default", "big-1", "big", "http", 8080, "10.244.1.2"), "3", t0.Add(7*time.Second)))
	h.p.OnEndpointSliceUpsert(triggered(slice("default", "web-1", "web", "http", 8080, "10.244.0.4"), "4", t0.Add(7*time.Second)))
	h.clk.SetTime(t0.Add(8 * time.Second))
	h.syncOK()
	h.checkProgramming("web programmed, big not", 2, 5)
	h.dp.fail(portOf("big", "http", model.TCP), "")
	h.clk.SetTime(t0.Add(8*time.Second + 2*harnessRetryPeriod))
	h.syncOK()
	h.checkProgramming("big programmed by its retry", 3, 5+1+2*harnessRetryPeriod.Seconds())
}

// TestChangeMetricsPendingResets: the pending change gauges count what
// waits for the next sync and go back to 0 when a sync takes the changes,
// even one that fails (kube-proxy's semantics: the changes are then in
// that sync's hands, and the next full sync carries them).
func TestChangeMetricsPendingResets(t *testing.T) {
	h := newProxierHarness(t)
	names := []string{
		"kubeproxy_sync_proxy_rules_endpoint_changes_pending", "kubeproxy_sync_proxy_rules_endpoint_changes_total",
		"kubeproxy_sync_proxy_rules_service_changes_pending", "kubeproxy_sync_proxy_rules_service_changes_total",
	}
	check := func(what string, epPending, epTotal, svcPending, svcTotal int) {
		t.Helper()
		var b strings.Builder
		for i, v := range []int{epPending, epTotal, svcPending, svcTotal} {
			fmt.Fprintf(&b, "%s %d\n", names[i], v)
		}
		got, err := gatherValues(h, names)
		if err != nil {
			t.Fatal(err)
		}
		if got != b.String() {
			t.Errorf("%s:\n%s\nwant\n%s", what, got, b.String())
		}
	}
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.p.OnEndpointSliceUpsert(triggered(slice("default", "web-1", "web", "http", 8080, "10.244.0.2"), "1", t0))
	h.p.OnEndpointSliceUpsert(triggered(slice("default", "web-1", "web", "http", 8080, "10.244.0.3"), "2", t0))
	check("before the first sync", 2, 2, 1, 1)
	h.dp.failWhole(errors.New("boom"))
	if _, err := h.sync(); err == nil {
		t.Fatal("sync succeeded, want the scripted failure")
	}
	check("after a failed sync", 0, 2, 0, 1)
	h.dp.failWhole(nil)
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 81, 8080)))
	check("a Service change", 0, 2, 1, 2)
	h.syncOK()
	check("after a sync", 0, 2, 0, 2)
}

// gatherValues renders the named single-series families as "name value"
// lines, in the order given.
func gatherValues(h *proxierHarness, names []string) (string, error) {
	families, err := h.reg.Gather()
	if err != nil {
		return "", err
	}
	vals := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			switch {
			case m.GetGauge() != nil:
				vals[f.GetName()] = m.GetGauge().GetValue()
			case m.GetCounter() != nil:
				vals[f.GetName()] = m.GetCounter().GetValue()
			}
		}
	}
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "%s %v\n", n, vals[n])
	}
	return b.String(), nil
}

// iptablesLike is a scripted datapath that reports what the iptables one
// does.
type iptablesLike struct {
	*scriptedDataplane
	restoreFailures uint64
	cleanupRan      bool
	cleanupDeleted  uint
}

func (d *iptablesLike) RuleCounts() map[string]int   { return map[string]int{"nat": 40, "filter": 4} }
func (d *iptablesLike) RulesWritten() map[string]int { return map[string]int{"nat": 7, "filter": 4} }
func (d *iptablesLike) RestoreFailures() uint64      { return d.restoreFailures }
func (d *iptablesLike) LastConntrackCleanup() (bool, time.Duration, uint) {
	return d.cleanupRan, time.Millisecond, d.cleanupDeleted
}

// In the iptables mode the proxy feeds kube-proxy's iptables series from
// the datapath: restore failures as they grow, failed partial syncs, the
// rule counts and the conntrack cleanups.
func TestIptablesMetrics(t *testing.T) {
	h := newProxierHarness(t)
	dp := &iptablesLike{scriptedDataplane: h.dp}
	h.reg = prometheus.NewRegistry()
	h.m = metrics.New(h.reg)
	h.p = NewProxier(dp, h.m, h.health, Config{SyncPeriod: harnessSyncPeriod, RetryPeriod: harnessRetryPeriod}, WithClock(h.clk))
	h.p.OnSynced()
	t.Cleanup(h.p.retry.stop)
	names := []string{
		`kubeproxy_sync_proxy_rules_iptables_restore_failures_total`,
		`kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total`,
		`kubeproxy_sync_proxy_rules_iptables_total`,
		`kubeproxy_sync_proxy_rules_iptables_last`,
		`kubeproxy_conntrack_reconciler_deleted_entries_total`,
	}
	check := func(what, want string) {
		t.Helper()
		got, err := gatherValues(h, names)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("%s:\n%swant\n%s", what, got, want)
		}
	}
	check("before any sync", `kubeproxy_sync_proxy_rules_iptables_restore_failures_total 0
kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total 0
kubeproxy_sync_proxy_rules_iptables_total 0
kubeproxy_sync_proxy_rules_iptables_last 0
kubeproxy_conntrack_reconciler_deleted_entries_total 0
`)
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	dp.cleanupRan, dp.cleanupDeleted = true, 3
	h.syncOK()
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 81, 8080)))
	dp.cleanupRan = false
	dp.restoreFailures = 2
	h.dp.failWhole(errors.New("iptables-restore: boom"))
	if _, err := h.sync(); err == nil {
		t.Fatal("sync succeeded, want the scripted failure")
	}
	check("after a failed partial sync", `kubeproxy_sync_proxy_rules_iptables_restore_failures_total 2
kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total 1
kubeproxy_sync_proxy_rules_iptables_total 40
kubeproxy_sync_proxy_rules_iptables_last 7
kubeproxy_conntrack_reconciler_deleted_entries_total 3
`)
}

// TestNetworkProgrammingSliceBeforeService: Services and EndpointSlices come
// from separate informers, so a slice can arrive before its Service. Its
// change is observed once, by the sync that programs the Service, and not
// by an unrelated sync before.
func TestNetworkProgrammingSliceBeforeService(t *testing.T) {
	h := newProxierHarness(t) // started at t0
	h.p.OnServiceUpsert(service("default", "other", "10.96.0.12", tcpPort("http", 80, 8080)))
	h.p.OnEndpointSliceUpsert(triggered(slice("default", "web-1", "web", "http", 8080, "10.244.0.2"), "1", t0.Add(time.Second)))
	h.clk.SetTime(t0.Add(2 * time.Second))
	h.syncOK()
	h.checkProgramming("before the Service arrived", 0, 0)

	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.clk.SetTime(t0.Add(4 * time.Second))
	h.syncOK()
	h.checkProgramming("after the sync that programmed the Service", 1, 3)
	h.clk.Step(time.Second)
	h.syncOK()
	h.checkProgramming("after another sync", 1, 3)
}
