package metrics

import (
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// gather returns the family named name, or nil.
func gather(t *testing.T, reg *prometheus.Registry, name string) *dto.MetricFamily {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	for _, f := range families {
		if f.GetName() == name {
			return f
		}
	}
	return nil
}

// kube-proxy's network programming buckets: 0.25, 0.5, 1..59 by 1, 60..115
// by 5, 120..300 by 30.
func TestNetworkProgrammingBuckets(t *testing.T) {
	var want []float64
	want = append(want, 0.25, 0.5)
	for s := 1; s <= 59; s++ {
		want = append(want, float64(s))
	}
	for s := 60; s <= 115; s += 5 {
		want = append(want, float64(s))
	}
	for s := 120; s <= 300; s += 30 {
		want = append(want, float64(s))
	}
	reg := prometheus.NewRegistry()
	m := New(reg)
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	m.ObserveNetworkProgramming(now, map[model.ServiceName][]time.Time{
		{Namespace: "a", Name: "a"}: {now.Add(-700 * time.Millisecond), now.Add(-2 * time.Second)},
		{Namespace: "b", Name: "b"}: {now.Add(-90 * time.Second)},
	})
	f := gather(t, reg, "kubeproxy_network_programming_duration_seconds")
	if f == nil || len(f.GetMetric()) != 1 {
		t.Fatalf("family %v, want one series", f)
	}
	h := f.GetMetric()[0].GetHistogram()
	var got []float64
	for _, b := range h.GetBucket() {
		got = append(got, b.GetUpperBound())
	}
	if !slices.Equal(got, want) {
		t.Errorf("buckets %v, want %v", got, want)
	}
	if h.GetSampleCount() != 3 || h.GetSampleSum() != 92.7 {
		t.Errorf("%d samples summing to %v, want 3 summing to 92.7", h.GetSampleCount(), h.GetSampleSum())
	}
}

func TestChangeCounters(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	names := []string{
		"kubeproxy_sync_proxy_rules_endpoint_changes_pending", "kubeproxy_sync_proxy_rules_endpoint_changes_total",
		"kubeproxy_sync_proxy_rules_service_changes_pending", "kubeproxy_sync_proxy_rules_service_changes_total",
	}
	want := func(epPending, epTotal, svcPending, svcTotal int) string {
		return strings.NewReplacer("EP", strconv.Itoa(epPending), "ET", strconv.Itoa(epTotal), "SP", strconv.Itoa(svcPending), "ST", strconv.Itoa(svcTotal)).Replace(`
# HELP kubeproxy_sync_proxy_rules_endpoint_changes_pending EndpointSlice events that changed a slice since the last sync.
# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_pending gauge
kubeproxy_sync_proxy_rules_endpoint_changes_pending EP
# HELP kubeproxy_sync_proxy_rules_endpoint_changes_total EndpointSlice events seen, changed or not.
# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_total counter
kubeproxy_sync_proxy_rules_endpoint_changes_total ET
# HELP kubeproxy_sync_proxy_rules_service_changes_pending Services whose served spec changed since the last sync.
# TYPE kubeproxy_sync_proxy_rules_service_changes_pending gauge
kubeproxy_sync_proxy_rules_service_changes_pending SP
# HELP kubeproxy_sync_proxy_rules_service_changes_total Service events seen, changed or not.
# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter
kubeproxy_sync_proxy_rules_service_changes_total ST
`)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want(0, 0, 0, 0)), names...); err != nil {
		t.Errorf("before a source is set: %v", err)
	}
	m.SetChangeSource(func() model.ChangeCounts {
		return model.ChangeCounts{ServiceChanges: 7, EndpointChanges: 11, PendingServices: 2, PendingEndpointChanges: 3}
	})
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want(3, 11, 2, 7)), names...); err != nil {
		t.Error(err)
	}
}

var errBoom = errors.New("boom")

func TestHealthCounts(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	healthz, livez := m.HealthCounts()
	healthz(200)
	healthz(200)
	healthz(503)
	livez(503)
	livez(404) // not an answer of the check: not counted
	want := `
# HELP kubeproxy_proxy_healthz_total Answers of /healthz, by HTTP status code.
# TYPE kubeproxy_proxy_healthz_total counter
kubeproxy_proxy_healthz_total{code="200"} 2
kubeproxy_proxy_healthz_total{code="503"} 1
# HELP kubeproxy_proxy_livez_total Answers of /livez, by HTTP status code.
# TYPE kubeproxy_proxy_livez_total counter
kubeproxy_proxy_livez_total{code="200"} 0
kubeproxy_proxy_livez_total{code="503"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "kubeproxy_proxy_healthz_total", "kubeproxy_proxy_livez_total"); err != nil {
		t.Error(err)
	}
}

// The iptables-only series appear only once InitIptables says the mode is
// iptables, as kube-proxy registers them only in that mode; a failed
// partial sync counts as a partial restore failure there.
func TestIptablesSeries(t *testing.T) {
	names := []string{
		"kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
		"kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
		"kubeproxy_conntrack_reconciler_deleted_entries_total",
	}
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.AddIptablesRestoreFailures(1)
	m.RecordSync(SyncKindPartial, time.Millisecond, time.Now(), errBoom)
	m.RecordConntrackCleanup(time.Millisecond, 2)
	for _, n := range names {
		if f := gather(t, reg, n); f != nil {
			t.Errorf("%s exported outside the iptables mode", n)
		}
	}

	reg = prometheus.NewRegistry()
	m = New(reg)
	m.InitIptables()
	want := `
# HELP kubeproxy_conntrack_reconciler_deleted_entries_total Stale UDP conntrack entries deleted after syncs.
# TYPE kubeproxy_conntrack_reconciler_deleted_entries_total counter
kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"} 5
# HELP kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total Failed partial syncs of the iptables mode, each followed by a full one.
# TYPE kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total counter
kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family="IPv4"} 1
# HELP kubeproxy_sync_proxy_rules_iptables_restore_failures_total Failed iptables-restore runs of the iptables mode's syncs.
# TYPE kubeproxy_sync_proxy_rules_iptables_restore_failures_total counter
kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family="IPv4"} 3
`
	m.AddIptablesRestoreFailures(2)
	m.AddIptablesRestoreFailures(1)
	m.RecordConntrackCleanup(time.Millisecond, 5)
	m.RecordSync(SyncKindPartial, time.Millisecond, time.Now(), errBoom)
	m.RecordSync(SyncKindFull, time.Millisecond, time.Now(), errBoom)
	m.RecordSync(SyncKindPartial, time.Millisecond, time.Now(), nil)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), names...); err != nil {
		t.Error(err)
	}
}

func TestRegisterInfo(t *testing.T) {
	reg := prometheus.NewRegistry()
	RegisterInfo(reg, "iptables", "nft", "v0.3.0")
	want := `
# HELP kube_bpf_proxy_info Always 1; its labels say the datapath mode, the iptables backend (none in ebpf mode) and the version running.
# TYPE kube_bpf_proxy_info gauge
kube_bpf_proxy_info{iptables_backend="nft",mode="iptables",version="v0.3.0"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
}

func TestNFAcctCollector(t *testing.T) {
	ok := true
	c := NewNFAcctCollector(func() (uint64, uint64, bool) { return 7, 2, ok })
	want := `
# HELP kubeproxy_iptables_ct_state_invalid_dropped_packets_total Packets dropped by the iptables rules because conntrack marked them INVALID.
# TYPE kubeproxy_iptables_ct_state_invalid_dropped_packets_total counter
kubeproxy_iptables_ct_state_invalid_dropped_packets_total 7
# HELP kubeproxy_iptables_localhost_nodeports_accepted_packets_total Packets accepted on node ports of the loopback interface.
# TYPE kubeproxy_iptables_localhost_nodeports_accepted_packets_total counter
kubeproxy_iptables_localhost_nodeports_accepted_packets_total 2
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	ok = false
	if n := testutil.CollectAndCount(c); n != 0 {
		t.Errorf("unreadable counters exported %d series", n)
	}
}
