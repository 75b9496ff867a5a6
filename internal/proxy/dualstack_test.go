package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/healthz"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// dualStack makes svc a RequireDualStack Service with ClusterIPs ips, in
// that order (the first is spec.clusterIP).
func dualStack(svc *v1.Service, ips ...string) *v1.Service {
	svc.Spec.ClusterIP = ips[0]
	svc.Spec.ClusterIPs = ips
	svc.Spec.IPFamilies = nil
	for _, ip := range ips {
		f := v1.IPv4Protocol
		if strings.Contains(ip, ":") {
			f = v1.IPv6Protocol
		}
		svc.Spec.IPFamilies = append(svc.Spec.IPFamilies, f)
	}
	policy := v1.IPFamilyPolicySingleStack
	if len(ips) > 1 {
		policy = v1.IPFamilyPolicyRequireDualStack
	}
	svc.Spec.IPFamilyPolicy = &policy
	return svc
}

// slice6 is slice with addressType IPv6.
func slice6(ns, name, svc, portName string, port int32, ips ...string) *discoveryv1.EndpointSlice {
	s := slice(ns, name, svc, portName, port, ips...)
	s.AddressType = discoveryv1.AddressTypeIPv6
	return s
}

// requireModelIPv6 skips a test of what a Service serves in each family
// while the model's Tracker does not serve IPv6 (the per-family model
// lands separately; WithFamily(IPv6) serves IPv4 until then).
func requireModelIPv6(t *testing.T) {
	t.Helper()
	tr := model.NewTracker(model.WithFamily(model.IPv6))
	tr.UpsertService(dualStack(service("default", "probe", "", tcpPort("http", 80, 8080)), "10.96.0.1", "fd00::1"))
	for _, ports := range tr.Snapshot(true).Services {
		for _, sp := range ports {
			if sp.ClusterIP.IP.Is6() {
				return
			}
		}
	}
	t.Skip("the model does not serve IPv6 yet: model.WithFamily(IPv6) still serves IPv4")
}

// openByFamily hands each family its own datapath.
func openByFamily(dps map[model.IPFamily]dataplane.Dataplane) func(context.Context, model.IPFamily) (dataplane.Dataplane, error) {
	return func(_ context.Context, f model.IPFamily) (dataplane.Dataplane, error) { return dps[f], nil }
}

// runDualStack runs RunOpening for both families into dp4 and dp6 until
// the test ends.
func runDualStack(t *testing.T, client *fake.Clientset, dp4, dp6 dataplane.Dataplane, cfg Config) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1), healthz: testnet.FreeAddr(t), metrics: testnet.FreeAddr(t)}
	cfg.Families = []model.IPFamily{model.IPv4, model.IPv6}
	cfg.HealthzBindAddress, cfg.MetricsBindAddress = r.healthz, r.metrics
	go func() {
		r.done <- RunOpening(ctx, client, openByFamily(map[model.IPFamily]dataplane.Dataplane{model.IPv4: dp4, model.IPv6: dp6}), true, cfg)
	}()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// clusterIPs returns, for each Service of snap, its ClusterIPs and backends.
func clusterIPs(snap *model.Snapshot) map[string][]string {
	out := map[string][]string{}
	for name, ports := range snap.Services {
		for _, sp := range ports {
			out[name.Name] = append(out[name.Name], sp.ClusterIP.IP.String())
			for _, b := range sp.Backends {
				out[name.Name] = append(out[name.Name], b.IP.String())
			}
		}
	}
	return out
}

// A dual-stack Service reaches both families' datapaths, each with its own
// family's ClusterIP and endpoints; an IPv6-only Service reaches the IPv6
// one alone, an IPv4-only Service the IPv4 one alone. AfterFirstSync runs
// once, after both first syncs.
func TestDualStackServesEachFamily(t *testing.T) {
	requireModelIPv6(t)
	client := fake.NewClientset(
		dualStack(service("default", "web", "", tcpPort("http", 80, 8080)), "10.96.0.10", "fd00::10"),
		slice("default", "web-4", "web", "http", 8080, "10.0.0.1"),
		slice6("default", "web-6", "web", "http", 8080, "fd01::1"),
		dualStack(service("default", "six", "", tcpPort("http", 80, 8080)), "fd00::20"),
		slice6("default", "six-6", "six", "http", 8080, "fd01::2"),
		dualStack(service("default", "four", "", tcpPort("http", 80, 8080)), "10.96.0.30"),
		slice("default", "four-4", "four", "http", 8080, "10.0.0.3"),
	)
	dp4, dp6 := newRecordingDataplane(), newRecordingDataplane()
	runDualStack(t, client, dp4, dp6, Config{SyncPeriod: time.Hour})
	got4, got6 := clusterIPs(dp4.next(t)), clusterIPs(dp6.next(t))
	want4 := map[string][]string{"web": {"10.96.0.10", "10.0.0.1"}, "four": {"10.96.0.30", "10.0.0.3"}}
	want6 := map[string][]string{"web": {"fd00::10", "fd01::1"}, "six": {"fd00::20", "fd01::2"}}
	for _, c := range []struct {
		family    string
		got, want map[string][]string
	}{{"IPv4", got4, want4}, {"IPv6", got6, want6}} {
		if len(c.got) != len(c.want) {
			t.Errorf("%s datapath serves %v, want %v", c.family, c.got, c.want)
			continue
		}
		for name, w := range c.want {
			if strings.Join(c.got[name], " ") != strings.Join(w, " ") {
				t.Errorf("%s datapath: %s serves %v, want %v", c.family, name, c.got[name], w)
			}
		}
	}
}

// AfterFirstSync runs once, after every family's first sync that
// programmed its datapath: not after IPv4's while IPv6's failed.
func TestDualStackAfterFirstSync(t *testing.T) {
	client := fake.NewClientset(
		service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)),
		slice("default", "web-4", "web", "http", 8080, "10.0.0.1"),
	)
	dp4, dp6 := newRecordingDataplane(), newRecordingDataplane()
	dp6.failNext = 1
	var after atomic.Int32
	afterCh := make(chan struct{}, 2)
	runDualStack(t, client, dp4, dp6, Config{SyncPeriod: time.Hour, RetryPeriod: 10 * time.Millisecond, AfterFirstSync: func() {
		after.Add(1)
		afterCh <- struct{}{}
	}})
	dp4.next(t)
	dp6.next(t) // failed: AfterFirstSync waits for its retry
	if n := after.Load(); n != 0 {
		t.Fatalf("AfterFirstSync ran %d times before IPv6's first sync succeeded", n)
	}
	dp6.next(t)
	select {
	case <-afterCh:
	case <-time.After(30 * time.Second):
		t.Fatal("AfterFirstSync did not run after both first syncs")
	}
	if n := after.Load(); n != 1 {
		t.Errorf("AfterFirstSync ran %d times, want once", n)
	}
}

// A datapath of one family that fails every sync does not hold up the
// other family's syncs; /healthz turns unhealthy, as kube-proxy's does
// when either family's changes wait too long, and the sync metrics say
// which family fails.
func TestDualStackFailingFamily(t *testing.T) {
	client := fake.NewClientset(
		dualStack(service("default", "web", "", tcpPort("http", 80, 8080)), "10.96.0.10", "fd00::10"),
		slice("default", "web-4", "web", "http", 8080, "10.0.0.1"),
	)
	dp4, dp6 := newRecordingDataplane(), newRecordingDataplane()
	dp6.failNext = 1 << 30
	// A short SyncPeriod: the failing family's change is stale after
	// 2*SyncPeriod, and its retries keep coming.
	r := runDualStack(t, client, dp4, dp6, Config{SyncPeriod: 200 * time.Millisecond, RetryPeriod: 50 * time.Millisecond})
	dp4.next(t)
	dp6.next(t)
	// IPv4 keeps syncing changes while IPv6 fails.
	if _, err := client.DiscoveryV1().EndpointSlices("default").Create(context.Background(),
		slice("default", "web-4b", "web", "http", 8080, "10.0.0.2"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		snap := dp4.next(t)
		if got := clusterIPs(snap)["web"]; len(got) == 3 {
			break
		}
	}
	var st struct {
		Healthy bool                       `json:"healthy"`
		Status  map[string]json.RawMessage `json:"status"`
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := get(t, "http://"+r.healthz+"/healthz")
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			t.Fatalf("/healthz body %q: %v", body, err)
		}
		if code == 503 {
			if st.Healthy {
				t.Errorf("503 with healthy true: %s", body)
			}
			if _, ok := st.Status["IPv4"]; !ok {
				t.Errorf("/healthz status lacks IPv4, which syncs: %s", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz still %d with IPv6 failing: %s", code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, text := get(t, "http://"+r.metrics+"/metrics")
	for _, want := range []string{
		`kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="full"} 0`,
		`kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="partial"} 0`,
		`kube_bpf_proxy_sync_failures_total{ip_family="IPv6",kind="full"} `,
		`kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"} `,
		`kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv6"} 0`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if strings.Contains(text, `kube_bpf_proxy_sync_failures_total{ip_family="IPv6",kind="full"} 0`) {
		t.Error("IPv6's failed full syncs are not counted")
	}
}

// A Service another proxy serves is told to each family's datapath by its
// ClusterIP of that family.
func TestDualStackForeignClusterIPs(t *testing.T) {
	svc := dualStack(service("default", "theirs", "", tcpPort("http", 80, 8080)), "fd00::30", "10.96.0.30")
	for _, c := range []struct {
		family model.IPFamily
		want   string
	}{{model.IPv4, "10.96.0.30"}, {model.IPv6, "fd00::30"}} {
		if got := clusterIPOf(svc, c.family); got != netip.MustParseAddr(c.want) {
			t.Errorf("%v: %v, want %s", c.family, got, c.want)
		}
	}
	single := service("default", "old", "10.96.0.31", tcpPort("http", 80, 8080))
	single.Spec.ClusterIPs = nil
	if got := clusterIPOf(single, model.IPv4); got != netip.MustParseAddr("10.96.0.31") {
		t.Errorf("spec.clusterIP alone: %v", got)
	}
	if got := clusterIPOf(single, model.IPv6); got.IsValid() {
		t.Errorf("IPv6 of an IPv4 Service: %v", got)
	}
}

// Each family's Proxier has a tracker of its family, and records its
// metrics under it.
func TestProxierFamily(t *testing.T) {
	m := metrics.New(nil)
	health := healthz.NewProxyHealth(time.Minute, nil)
	for _, f := range model.Families {
		p := newProxier(f, m.ForFamily(f), health, Config{}, true)
		if p.family != f || p.tracker.Family() != f || p.metrics.Family() != f.String() {
			t.Errorf("%v proxier: family %v, tracker's %v, metrics' %q", f, p.family, p.tracker.Family(), p.metrics.Family())
		}
	}
	if p := NewProxier(newRecordingDataplane(), m, health, Config{}); p.family != model.IPv4 {
		t.Errorf("NewProxier serves %v by default, want IPv4", p.family)
	}
}

// eventful is a datapath with event counters; iptables says whether it is
// an iptables datapath (per family) or not (the eBPF one, whose IPv6 view
// shares the IPv4 one's counters).
type eventful struct {
	*recordingDataplane
	events map[string]uint64
}

func (e eventful) Events() (map[string]uint64, error) { return e.events, nil }

type iptablesEventful struct {
	eventful
	*iptablesLike
}

func (e iptablesEventful) Events() (map[string]uint64, error) { return e.eventful.Events() }
func (e iptablesEventful) Sync(ctx context.Context, s *model.Snapshot) error {
	return e.eventful.Sync(ctx, s)
}
func (e iptablesEventful) Close() error { return nil }

// kube_bpf_proxy_datapath_events_total is registered once: the two
// families' iptables datapaths count their own events, which it sums; a
// datapath that is not per family (the eBPF one) is read once.
func TestDatapathEventsOfBothFamilies(t *testing.T) {
	for _, c := range []struct {
		name     string
		v4, v6   dataplane.Dataplane
		wantSync float64
	}{
		{"iptables",
			iptablesEventful{eventful{newRecordingDataplane(), map[string]uint64{"restore_failed": 2}}, &iptablesLike{}},
			iptablesEventful{eventful{newRecordingDataplane(), map[string]uint64{"restore_failed": 3}}, &iptablesLike{}}, 5},
		{"ebpf",
			eventful{newRecordingDataplane(), map[string]uint64{"restore_failed": 2}},
			eventful{newRecordingDataplane(), map[string]uint64{"restore_failed": 2}}, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			var dc datapathCollectors
			dc.register(reg, c.v4)
			dc.register(reg, c.v6)
			want := fmt.Sprintf(`
# HELP kube_bpf_proxy_datapath_events_total Events counted by the datapath, by event: in ebpf mode connections translated (ClusterIPs, node ports, external IPs, affinity hits) or refused (no backend, no local endpoint, unknown port, unallocated address); in iptables mode failed restores and conntrack entries deleted.
# TYPE kube_bpf_proxy_datapath_events_total counter
kube_bpf_proxy_datapath_events_total{event="restore_failed"} %v
`, c.wantSync)
			if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "kube_bpf_proxy_datapath_events_total"); err != nil {
				t.Error(err)
			}
		})
	}
}
