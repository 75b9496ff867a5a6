package metrics

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/httpserve"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

func TestNewRegistersFamilies(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	// Vectors without children are not gathered; give each one a child.
	m.RecordSkipped("EndpointSlice", "InvalidAddress")
	m.SetIptablesRules(map[string]int{"nat": 9}, map[string]int{"nat": 3})
	m.InitIptables()
	m.InitServicePortReasons([]string{"map-full"})

	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	got := map[string]*dto.MetricFamily{}
	for _, f := range families {
		got[f.GetName()] = f
	}

	tests := []struct {
		name   string
		typ    dto.MetricType
		labels []string
	}{
		// kube-proxy v1.36's names, types and label names
		// (pkg/proxy/metrics/metrics.go).
		{"kubeproxy_sync_proxy_rules_duration_seconds", dto.MetricType_HISTOGRAM, []string{"ip_family"}},
		{"kubeproxy_sync_full_proxy_rules_duration_seconds", dto.MetricType_HISTOGRAM, []string{"ip_family"}},
		{"kubeproxy_sync_partial_proxy_rules_duration_seconds", dto.MetricType_HISTOGRAM, []string{"ip_family"}},
		{"kubeproxy_sync_proxy_rules_iptables_total", dto.MetricType_GAUGE, []string{"ip_family", "table"}},
		{"kubeproxy_sync_proxy_rules_iptables_last", dto.MetricType_GAUGE, []string{"ip_family", "table"}},
		{"kubeproxy_sync_proxy_rules_iptables_restore_failures_total", dto.MetricType_COUNTER, []string{"ip_family"}},
		{"kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", dto.MetricType_COUNTER, []string{"ip_family"}},
		{"kubeproxy_sync_proxy_rules_last_timestamp_seconds", dto.MetricType_GAUGE, []string{"ip_family"}},
		{"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", dto.MetricType_GAUGE, []string{"ip_family"}},
		{"kubeproxy_network_programming_duration_seconds", dto.MetricType_HISTOGRAM, []string{"ip_family"}},
		{"kubeproxy_conntrack_reconciler_sync_duration_seconds", dto.MetricType_HISTOGRAM, []string{"ip_family"}},
		{"kubeproxy_conntrack_reconciler_deleted_entries_total", dto.MetricType_COUNTER, []string{"ip_family"}},
		{"kubeproxy_sync_proxy_rules_no_local_endpoints_total", dto.MetricType_GAUGE, []string{"ip_family", "traffic_policy"}},
		{"kubeproxy_sync_proxy_rules_endpoint_changes_pending", dto.MetricType_GAUGE, nil},
		{"kubeproxy_sync_proxy_rules_endpoint_changes_total", dto.MetricType_COUNTER, nil},
		{"kubeproxy_sync_proxy_rules_service_changes_pending", dto.MetricType_GAUGE, nil},
		{"kubeproxy_sync_proxy_rules_service_changes_total", dto.MetricType_COUNTER, nil},
		{"kubeproxy_proxy_healthz_total", dto.MetricType_COUNTER, []string{"code"}},
		{"kubeproxy_proxy_livez_total", dto.MetricType_COUNTER, []string{"code"}},
		{"kube_bpf_proxy_syncs_total", dto.MetricType_COUNTER, []string{"ip_family", "kind"}},
		{"kube_bpf_proxy_sync_failures_total", dto.MetricType_COUNTER, []string{"ip_family", "kind"}},
		{"kube_bpf_proxy_sync_lock_timeouts_total", dto.MetricType_COUNTER, []string{"ip_family"}},
		{"kube_bpf_proxy_datapath_checks_total", dto.MetricType_COUNTER, []string{"ip_family", "result"}},
		{"kube_bpf_proxy_skipped_objects_total", dto.MetricType_COUNTER, []string{"ip_family", "reason", "resource"}},
		{"kube_bpf_proxy_service_ports_not_programmed", dto.MetricType_GAUGE, []string{"ip_family", "reason"}},
		{"kube_bpf_proxy_service_port_failures_total", dto.MetricType_COUNTER, []string{"ip_family", "reason"}},
		{"kube_bpf_proxy_services", dto.MetricType_GAUGE, []string{"ip_family"}},
		{"kube_bpf_proxy_backends", dto.MetricType_GAUGE, []string{"ip_family"}},
	}
	if len(got) != len(tests) {
		t.Errorf("gathered %d families, want %d", len(got), len(tests))
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, ok := got[tc.name]
			if !ok {
				t.Fatalf("not registered")
			}
			if f.GetType() != tc.typ {
				t.Errorf("type %v, want %v", f.GetType(), tc.typ)
			}
			if f.GetHelp() == "" {
				t.Error("no help text")
			}
			for _, metric := range f.GetMetric() {
				var names []string
				for _, l := range metric.GetLabel() {
					names = append(names, l.GetName())
				}
				if !slices.Equal(names, tc.labels) {
					t.Errorf("labels %v, want %v", names, tc.labels)
				}
			}
		})
	}

	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatalf("GatherAndLint: %v", err)
	}
	for _, p := range problems {
		if p.Metric == "kubeproxy_sync_proxy_rules_iptables_total" || p.Metric == "kubeproxy_sync_proxy_rules_no_local_endpoints_total" {
			continue // kube-proxy's names, gauges with a _total suffix, kept for its dashboards
		}
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

func TestSyncDurationBuckets(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.SyncProxyRulesDuration.Observe(0.003)

	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	idx := slices.IndexFunc(families, func(f *dto.MetricFamily) bool {
		return f.GetName() == "kubeproxy_sync_proxy_rules_duration_seconds"
	})
	if idx < 0 {
		t.Fatal("histogram not gathered")
	}
	buckets := families[idx].GetMetric()[0].GetHistogram().GetBucket()
	if len(buckets) != 15 {
		t.Fatalf("%d buckets, want 15", len(buckets))
	}
	want := 0.001
	for i, b := range buckets {
		if b.GetUpperBound() != want {
			t.Errorf("bucket %d: upper bound %v, want %v", i, b.GetUpperBound(), want)
		}
		want *= 2
	}
}

func TestRecord(t *testing.T) {
	end := time.Date(2026, 1, 2, 3, 4, 5, 500_000_000, time.UTC)
	endSeconds := "1.7673230455e+09"

	tests := []struct {
		name   string
		record func(m *Metrics)
		names  []string
		want   string
	}{
		{
			name:   "nothing recorded",
			record: func(*Metrics) {},
			names:  []string{"kube_bpf_proxy_syncs_total", "kube_bpf_proxy_sync_failures_total", "kubeproxy_sync_proxy_rules_last_timestamp_seconds"},
			want: `
# HELP kube_bpf_proxy_sync_failures_total Datapath sync attempts that failed, by kind. A failure makes the next sync a full one, unless the sync only found the xtables lock held (kube_bpf_proxy_sync_lock_timeouts_total).
# TYPE kube_bpf_proxy_sync_failures_total counter
kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="full"} 0
kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="partial"} 0
# HELP kube_bpf_proxy_syncs_total Datapath sync attempts, by kind: full (rewrite everything) or partial (changes only).
# TYPE kube_bpf_proxy_syncs_total counter
kube_bpf_proxy_syncs_total{ip_family="IPv4",kind="full"} 0
kube_bpf_proxy_syncs_total{ip_family="IPv4",kind="partial"} 0
# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds Unix time at which the datapath was last synced successfully.
# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge
kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} 0
`,
		},
		{
			name: "successful and failed syncs",
			record: func(m *Metrics) {
				m.RecordSync(SyncKindFull, 3*time.Millisecond, end, nil)
				m.RecordSync(SyncKindPartial, time.Millisecond, end.Add(time.Second), errors.New("map full"))
				m.RecordSync(SyncKindFull, 2*time.Millisecond, end.Add(2*time.Second), errors.New("map full"))
			},
			names: []string{"kube_bpf_proxy_syncs_total", "kube_bpf_proxy_sync_failures_total", "kubeproxy_sync_proxy_rules_last_timestamp_seconds"},
			want: `
# HELP kube_bpf_proxy_sync_failures_total Datapath sync attempts that failed, by kind. A failure makes the next sync a full one, unless the sync only found the xtables lock held (kube_bpf_proxy_sync_lock_timeouts_total).
# TYPE kube_bpf_proxy_sync_failures_total counter
kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="full"} 1
kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="partial"} 1
# HELP kube_bpf_proxy_syncs_total Datapath sync attempts, by kind: full (rewrite everything) or partial (changes only).
# TYPE kube_bpf_proxy_syncs_total counter
kube_bpf_proxy_syncs_total{ip_family="IPv4",kind="full"} 2
kube_bpf_proxy_syncs_total{ip_family="IPv4",kind="partial"} 1
# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds Unix time at which the datapath was last synced successfully.
# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge
kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} ` + endSeconds + `
`,
		},
		{
			name:   "queued",
			record: func(m *Metrics) { m.RecordQueued(end) },
			names:  []string{"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"},
			want: `
# HELP kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds Unix time at which the last Service or EndpointSlice change was queued for a datapath sync.
# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge
kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"} ` + endSeconds + `
`,
		},
		{
			name: "skipped objects and programmed state",
			record: func(m *Metrics) {
				m.RecordSkipped("Service", "InvalidClusterIP")
				m.RecordSkipped("Service", "InvalidClusterIP")
				m.RecordSkipped("EndpointSlice", "MissingServiceName")
				m.SetProgrammed(3, 7)
			},
			names: []string{"kube_bpf_proxy_skipped_objects_total", "kube_bpf_proxy_services", "kube_bpf_proxy_backends"},
			want: `
# HELP kube_bpf_proxy_backends Backends currently programmed in the datapath.
# TYPE kube_bpf_proxy_backends gauge
kube_bpf_proxy_backends{ip_family="IPv4"} 7
# HELP kube_bpf_proxy_services Service ports currently programmed in the datapath.
# TYPE kube_bpf_proxy_services gauge
kube_bpf_proxy_services{ip_family="IPv4"} 3
# HELP kube_bpf_proxy_skipped_objects_total Malformed Service or EndpointSlice objects, or parts of them, left out of the datapath, and in the eBPF mode Services naming host-scoped external addresses, which its socket programs leave out, by resource and reason.
# TYPE kube_bpf_proxy_skipped_objects_total counter
kube_bpf_proxy_skipped_objects_total{ip_family="IPv4",reason="InvalidClusterIP",resource="Service"} 2
kube_bpf_proxy_skipped_objects_total{ip_family="IPv4",reason="MissingServiceName",resource="EndpointSlice"} 1
`,
		},
		{
			name: "service port failures",
			record: func(m *Metrics) {
				m.InitServicePortReasons([]string{"map-full", "write-failed"})
				m.RecordServicePortFailure("map-full")
				m.RecordServicePortFailure("map-full")
				m.SetServicePortsNotProgrammed(map[string]int{"map-full": 3, "write-failed": 0})
				m.SetServicePortsNotProgrammed(map[string]int{"map-full": 1})
			},
			names: []string{"kube_bpf_proxy_service_ports_not_programmed", "kube_bpf_proxy_service_port_failures_total"},
			want: `
# HELP kube_bpf_proxy_service_port_failures_total Failed attempts to program a single service port, by reason; each failed retry counts.
# TYPE kube_bpf_proxy_service_port_failures_total counter
kube_bpf_proxy_service_port_failures_total{ip_family="IPv4",reason="map-full"} 2
kube_bpf_proxy_service_port_failures_total{ip_family="IPv4",reason="write-failed"} 0
# HELP kube_bpf_proxy_service_ports_not_programmed Service ports the datapath could not program and is retrying, by reason; every other port is kept up to date.
# TYPE kube_bpf_proxy_service_ports_not_programmed gauge
kube_bpf_proxy_service_ports_not_programmed{ip_family="IPv4",reason="map-full"} 1
kube_bpf_proxy_service_ports_not_programmed{ip_family="IPv4",reason="write-failed"} 0
`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			m := New(reg)
			tc.record(m)
			if err := testutil.GatherAndCompare(reg, strings.NewReader(tc.want), tc.names...); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestRecordSyncObservesDuration(t *testing.T) {
	m := New(prometheus.NewRegistry())
	m.RecordSync(SyncKindFull, 3*time.Millisecond, time.Unix(0, 0), nil)
	m.RecordSync(SyncKindPartial, 5*time.Millisecond, time.Unix(0, 0), errors.New("boom"))
	if n := testutil.CollectAndCount(m.SyncProxyRulesDuration.(prometheus.Collector)); n != 1 {
		t.Fatalf("%d histogram series, want 1", n)
	}
	var out dto.Metric
	if err := m.SyncProxyRulesDuration.(prometheus.Metric).Write(&out); err != nil {
		t.Fatal(err)
	}
	if got := out.GetHistogram().GetSampleCount(); got != 2 {
		t.Errorf("sample count %d, want 2 (failed syncs are timed too)", got)
	}
	if got, want := out.GetHistogram().GetSampleSum(), 0.008; got < want-1e-9 || got > want+1e-9 {
		t.Errorf("sample sum %v, want %v", got, want)
	}
	// Each kind's own histogram has its own sync only.
	for h, want := range map[prometheus.Observer]float64{m.SyncFullProxyRulesDuration: 0.003, m.SyncPartialProxyRulesDuration: 0.005} {
		var one dto.Metric
		if err := h.(prometheus.Metric).Write(&one); err != nil {
			t.Fatal(err)
		}
		if got := one.GetHistogram().GetSampleSum(); one.GetHistogram().GetSampleCount() != 1 || got < want-1e-9 || got > want+1e-9 {
			t.Errorf("%s: %d samples summing to %v, want one of %v", h.(prometheus.Metric).Desc(), one.GetHistogram().GetSampleCount(), got, want)
		}
	}
}

func TestNewNilRegisterer(t *testing.T) {
	m := New(nil)
	m.RecordSync(SyncKindFull, time.Millisecond, time.Now(), nil)
	m.SetProgrammed(1, 1)
}

func TestNewTwicePanics(t *testing.T) {
	reg := prometheus.NewRegistry()
	New(reg)
	defer func() {
		if recover() == nil {
			t.Error("second New on the same registry did not panic")
		}
	}()
	New(reg)
}

func TestDatapathEventsCollector(t *testing.T) {
	tests := []struct {
		name    string
		events  map[string]uint64
		err     error
		want    string
		wantErr string
	}{
		{
			name:   "counters",
			events: map[string]uint64{"connect_translated": 42, "connect_refused": 3, "sendmsg_translated": 1 << 40},
			want: `
# HELP kube_bpf_proxy_datapath_events_total Events counted by the datapath, by event: in ebpf mode connections translated (ClusterIPs, node ports, external IPs, affinity hits) or refused (no backend, no local endpoint, unknown port, unallocated address); in iptables mode failed restores and conntrack entries deleted.
# TYPE kube_bpf_proxy_datapath_events_total counter
kube_bpf_proxy_datapath_events_total{event="connect_refused"} 3
kube_bpf_proxy_datapath_events_total{event="connect_translated"} 42
kube_bpf_proxy_datapath_events_total{event="sendmsg_translated"} 1.099511627776e+12
`,
		},
		{
			name:   "no events",
			events: map[string]uint64{},
			want:   "",
		},
		{
			name:    "read error",
			err:     errors.New("map lookup: operation not permitted"),
			wantErr: "reading datapath event counters: map lookup: operation not permitted",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reads := 0
			c := NewDatapathEventsCollector(func() (map[string]uint64, error) {
				reads++
				return tc.events, tc.err
			})
			reg := prometheus.NewRegistry()
			reg.MustRegister(c)

			err := testutil.GatherAndCompare(reg, strings.NewReader(tc.want))
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("error %v, want one containing %q", err, tc.wantErr)
			}
			if reads != 1 {
				t.Errorf("read called %d times for one scrape, want 1", reads)
			}
		})
	}
}

func scrape(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

func TestHandler(t *testing.T) {
	tests := []struct {
		name        string
		readErr     error
		path        string
		wantCode    int
		wantLines   []string
		absentLines []string
	}{
		{
			name:     "all metrics",
			path:     "/metrics",
			wantCode: http.StatusOK,
			wantLines: []string{
				`kube_bpf_proxy_services{ip_family="IPv4"} 2`,
				`kube_bpf_proxy_datapath_events_total{event="connect_translated"} 5`,
				"# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
			},
		},
		{
			name:        "a failing collector does not fail the scrape",
			readErr:     errors.New("map gone"),
			path:        "/metrics",
			wantCode:    http.StatusOK,
			wantLines:   []string{`kube_bpf_proxy_services{ip_family="IPv4"} 2`},
			absentLines: []string{"kube_bpf_proxy_datapath_events_total{"},
		},
		{
			name:     "unknown path",
			path:     "/",
			wantCode: http.StatusNotFound,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			m := New(reg)
			m.SetProgrammed(2, 4)
			reg.MustRegister(NewDatapathEventsCollector(func() (map[string]uint64, error) {
				return map[string]uint64{"connect_translated": 5}, tc.readErr
			}))

			code, body := scrape(t, Handler(reg), tc.path)
			if code != tc.wantCode {
				t.Fatalf("status %d, want %d; body:\n%s", code, tc.wantCode, body)
			}
			lines := strings.Split(body, "\n")
			for _, want := range tc.wantLines {
				if !slices.Contains(lines, want) {
					t.Errorf("missing line %q in:\n%s", want, body)
				}
			}
			for _, absent := range tc.absentLines {
				if strings.Contains(body, absent) {
					t.Errorf("unexpected %q in:\n%s", absent, body)
				}
			}
		})
	}
}

func TestNewRegistry(t *testing.T) {
	reg := NewRegistry()
	New(reg)
	for _, name := range []string{"go_goroutines", "process_start_time_seconds"} {
		n, err := testutil.GatherAndCount(reg, name)
		if err != nil {
			t.Fatal(err)
		}
		// process_* metrics need procfs, which every supported platform has.
		if n != 1 {
			t.Errorf("%s: %d series, want 1", name, n)
		}
	}
}

func TestServedUntilCancel(t *testing.T) {
	reg := prometheus.NewRegistry()
	New(reg).SetProgrammed(1, 1)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	errc := make(chan error, 1)
	go func() { errc <- httpserve.Serve(ctx, "metrics", ln, Handler(reg)) }()

	resp, err := http.Get("http://" + ln.Addr().String() + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `kube_bpf_proxy_services{ip_family="IPv4"} 1`) {
		t.Errorf("GET /metrics: status %d, body:\n%s", resp.StatusCode, body)
	}

	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("Serve returned %v after cancel, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("server did not stop after its context was cancelled")
	}
}

func TestListenAndServeStopsOnCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- ListenAndServe(ctx, "127.0.0.1:0", prometheus.NewRegistry(), false) }()
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("ListenAndServe returned %v after cancel, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("ListenAndServe did not return after its context was cancelled")
	}
}

// Profiles are served only when asked for (--profiling), as kube-proxy.
func TestHandlerProfiling(t *testing.T) {
	for _, profiling := range []bool{false, true} {
		rec := httptest.NewRecorder()
		handler(prometheus.NewRegistry(), profiling).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/pprof/heap", nil))
		if got, want := rec.Code == http.StatusOK, profiling; got != want {
			t.Errorf("profiling %t: GET /debug/pprof/heap answered %d", profiling, rec.Code)
		}
	}
}

// Each family's proxier records under its own ip_family; the series without
// the label are shared, and the change counters sum the families' trackers.
func TestForFamily(t *testing.T) {
	reg := prometheus.NewRegistry()
	v4 := New(reg)
	v6 := v4.ForFamily(model.IPv6)
	v4.RecordSync(SyncKindFull, time.Millisecond, time.Unix(10, 0), nil)
	v6.RecordSync(SyncKindFull, time.Millisecond, time.Unix(20, 0), errors.New("failed"))
	v6.SetProgrammed(2, 3)
	v4.SetChangeSource(func() model.ChangeCounts { return model.ChangeCounts{ServiceChanges: 1} })
	v6.SetChangeSource(func() model.ChangeCounts { return model.ChangeCounts{ServiceChanges: 2} })
	want := `
# HELP kube_bpf_proxy_sync_failures_total Datapath sync attempts that failed, by kind. A failure makes the next sync a full one, unless the sync only found the xtables lock held (kube_bpf_proxy_sync_lock_timeouts_total).
# TYPE kube_bpf_proxy_sync_failures_total counter
kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="full"} 0
kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="partial"} 0
kube_bpf_proxy_sync_failures_total{ip_family="IPv6",kind="full"} 1
kube_bpf_proxy_sync_failures_total{ip_family="IPv6",kind="partial"} 0
# HELP kube_bpf_proxy_services Service ports currently programmed in the datapath.
# TYPE kube_bpf_proxy_services gauge
kube_bpf_proxy_services{ip_family="IPv4"} 0
kube_bpf_proxy_services{ip_family="IPv6"} 2
# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds Unix time at which the datapath was last synced successfully.
# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge
kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} 10
kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv6"} 0
# HELP kubeproxy_sync_proxy_rules_service_changes_total Service events seen, changed or not.
# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter
kubeproxy_sync_proxy_rules_service_changes_total 3
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"kube_bpf_proxy_sync_failures_total", "kube_bpf_proxy_services", "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
		"kubeproxy_sync_proxy_rules_service_changes_total"); err != nil {
		t.Error(err)
	}
	if v4.Family() != "IPv4" || v6.Family() != "IPv6" {
		t.Errorf("families %q %q", v4.Family(), v6.Family())
	}
}
