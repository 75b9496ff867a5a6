package bench

import (
	"math"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

func TestOrderRotates(t *testing.T) {
	cs := []string{"a", "b", "c"}
	for i, want := range [][]string{{"a", "b", "c"}, {"b", "c", "a"}, {"c", "a", "b"}, {"a", "b", "c"}} {
		if got := order(cs, i); !reflect.DeepEqual(got, want) {
			t.Errorf("size %d: %v, want %v", i, got, want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	valid := func() Config {
		c := QuickConfig()
		exe, _ := os.Executable()
		c.ClusterDir, c.OutDir = t.TempDir(), t.TempDir()
		c.KubeBin, c.Binary, c.Self, c.ManifestsDir = t.TempDir(), exe, exe, t.TempDir()
		return c
	}
	if err := func() error { c := valid(); return c.validate() }(); err != nil {
		t.Fatalf("the quick configuration: %v", err)
	}
	for name, tc := range map[string]struct {
		change func(*Config)
		want   string
	}{
		"unknown contender": {func(c *Config) { c.Contenders = []string{"ipvs"} }, `unknown contender "ipvs"`},
		"sizes descending":  {func(c *Config) { c.Sizes = []int{1000, 0} }, "must ascend"},
		"too many Services": {func(c *Config) { c.Sizes = []int{70000} }, "at most 60000"},
		"odd rate phases":   {func(c *Config) { c.RatePhases = 3 }, "must be even"},
		"unknown loader":    {func(c *Config) { c.Load = "kubectl" }, `background loader "kubectl"`},
		"no binary":         {func(c *Config) { c.Binary = "" }, "no kube-bpf-proxy binary"},
		"missing binary":    {func(c *Config) { c.Binary = "/nonexistent/kube-bpf-proxy" }, "kube-bpf-proxy binary: stat"},
		"IPv6 through etcd": {func(c *Config) { c.Family, c.Load = model.IPv6, LoadEtcd }, "IPv4 Services only"},
		"unknown family":    {func(c *Config) { c.Family = 5 }, "IP family 5"},
	} {
		t.Run(name, func(t *testing.T) {
			c := valid()
			tc.change(&c)
			err := c.validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
}

// TestIPv6Rows: an IPv6 run measures tcp-connect, UDP and the connection
// rate only; an IPv4 run measures every workload.
func TestIPv6Rows(t *testing.T) {
	v4, v6 := QuickConfig(), QuickConfig()
	v6.Family = model.IPv6
	for _, w := range []string{results.TCPConnect, results.TCPCRR, results.TCPRR, results.UDPConnected, results.UDPUnconnected, results.ConnectRate, results.Stream} {
		if !v4.runsWorkload(w) {
			t.Errorf("the IPv4 run skips %s", w)
		}
		want := w != results.TCPRR && w != results.Stream
		if got := v6.runsWorkload(w); got != want {
			t.Errorf("the IPv6 run measures %s: %v, want %v", w, got, want)
		}
	}
}

// TestOurArgsFor: only the eBPF mode's maps are sized, and only past
// their default capacity (50k Services of 10 endpoints).
func TestOurArgsFor(t *testing.T) {
	if got := ourArgsFor(results.EBPF, 10200, 10); got != nil {
		t.Errorf("10k Services: %v, want the defaults", got)
	}
	if got := ourArgsFor(results.IptablesLegacy, 50200, 10); got != nil {
		t.Errorf("iptables mode: %v, want no eBPF flag", got)
	}
	got := ourArgsFor(results.EBPF, 50200, 10)
	if len(got) != 1 || got[0] != "--bpf-backend-slots-max=628750" {
		t.Errorf("50k Services: %v", got)
	}
}

const twoSeries = `# HELP kubeproxy_network_programming_duration_seconds x
# TYPE kubeproxy_network_programming_duration_seconds histogram
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="0.25"} 3
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="0.5"} 5
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv4",le="+Inf"} 6
kubeproxy_network_programming_duration_seconds_sum{ip_family="IPv4"} 2.5
kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"} 6
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv6",le="0.25"} 1
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv6",le="0.5"} 1
kubeproxy_network_programming_duration_seconds_bucket{ip_family="IPv6",le="+Inf"} 1
kubeproxy_network_programming_duration_seconds_sum{ip_family="IPv6"} 0.1
kubeproxy_network_programming_duration_seconds_count{ip_family="IPv6"} 1
`

func TestParseHistogramSumsSeries(t *testing.T) {
	h, err := parseHistogram(strings.NewReader(twoSeries), "kubeproxy_network_programming_duration_seconds")
	if err != nil {
		t.Fatal(err)
	}
	want := &results.Histogram{Count: 7, Sum: 2.6, Bounds: []float64{0.25, 0.5, math.Inf(1)}, Buckets: []uint64{4, 6, 7}}
	if h.Count != want.Count || math.Abs(h.Sum-want.Sum) > 1e-9 || !reflect.DeepEqual(h.Bounds, want.Bounds) || !reflect.DeepEqual(h.Buckets, want.Buckets) {
		t.Errorf("got %+v, want %+v", h, want)
	}
	if h, err := parseHistogram(strings.NewReader(twoSeries), "absent"); h != nil || err != nil {
		t.Errorf("an absent histogram: %+v, %v; want nil, nil", h, err)
	}
}

// TestMergeHistogramsDifferentBounds: a bound one side lacks takes that
// side's cumulative count at its next lower bound.
func TestMergeHistogramsDifferentBounds(t *testing.T) {
	a := &results.Histogram{Count: 4, Bounds: []float64{1, math.Inf(1)}, Buckets: []uint64{3, 4}}
	b := &results.Histogram{Count: 2, Bounds: []float64{0.5, 2, math.Inf(1)}, Buckets: []uint64{1, 2, 2}}
	got := mergeHistograms(a, b)
	if want := []float64{0.5, 1, 2, math.Inf(1)}; !reflect.DeepEqual(got.Bounds, want) {
		t.Fatalf("bounds %v, want %v", got.Bounds, want)
	}
	if want := []uint64{1, 4, 5, 6}; !reflect.DeepEqual(got.Buckets, want) {
		t.Errorf("buckets %v, want %v", got.Buckets, want)
	}
	if mergeHistograms(nil, b) != b || mergeHistograms(a, nil) != a {
		t.Errorf("merging with nothing changed the histogram")
	}
}

// TestProcessUsage reads this test's own process: it has a resident set
// and, after some work, CPU time.
func TestProcessUsage(t *testing.T) {
	deadline := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}
	rss, cpu, err := processUsage(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if rss < 1<<20 || cpu <= 0 {
		t.Errorf("rss %d bytes, cpu %.2f s", rss, cpu)
	}
	if _, _, err := processUsage(1 << 30); err == nil {
		t.Error("a process that does not exist has usage")
	}
}

func TestLargeWorkloadsUpTo10k(t *testing.T) {
	large := LargeConfig()
	for _, c := range []struct {
		contender string
		size      int
		want      bool
	}{
		{results.IptablesLegacy, 10000, true},
		{results.IptablesLegacy, 20000, false},
		{results.KubeProxyNFTables, 50000, false},
		{results.EBPF, 50000, true},
		{results.Direct, 50000, true},
	} {
		if got := large.workloads(c.contender, c.size); got != c.want {
			t.Errorf("LargeConfig: %s at %d runs the workloads: %v, want %v", c.contender, c.size, got, c.want)
		}
	}
	full := FullConfig()
	if !full.workloads(results.IptablesLegacy, 50000) {
		t.Error("FullConfig skips the workloads at 50k")
	}
	full.ControlPlaneOnly = true
	if full.workloads(results.EBPF, 0) {
		t.Error("ControlPlaneOnly runs the workloads")
	}
}

func TestLargeSyncTimeoutCapped(t *testing.T) {
	if got := LargeConfig().SyncTimeout(50000); got != 5*time.Minute {
		t.Errorf("LargeConfig waits %s for 50k, want 5m", got)
	}
	if got, want := LargeConfig().SyncTimeout(10000), FullConfig().SyncTimeout(10000); got != want {
		t.Errorf("LargeConfig waits %s for 10k, FullConfig %s", got, want)
	}
}

func TestProjectedMiss(t *testing.T) {
	r := &runner{cfg: LargeConfig(), served: map[string]servedAt{
		results.IptablesLegacy:    {20000, 211 * time.Second},
		results.KubeProxyNFTables: {20000, 40 * time.Second},
	}}
	if why := r.projectedMiss(results.IptablesLegacy, 50000); !strings.Contains(why, "not tried: its cold start at 20000 Services (3m31s), scaled to 50000, is 8m48s, more than the 5m0s wait") {
		t.Errorf("iptables-legacy at 50k: %q", why)
	}
	for _, name := range []string{results.KubeProxyNFTables, results.EBPF} {
		if why := r.projectedMiss(name, 50000); why != "" {
			t.Errorf("%s at 50k: %q, want tried", name, why)
		}
	}
	r.cfg = FullConfig()
	if why := r.projectedMiss(results.IptablesLegacy, 50000); why != "" {
		t.Errorf("FullConfig: %q, want tried", why)
	}
}

func TestLargeEndpointChanges(t *testing.T) {
	c := LargeConfig()
	if got := c.endpointChanges(results.IptablesLegacy, 20000); got != 5 {
		t.Errorf("iptables-legacy at 20k: %d changes, want 5", got)
	}
	for _, tc := range []struct {
		name string
		size int
	}{{results.IptablesLegacy, 10000}, {results.EBPF, 50000}} {
		if got := c.endpointChanges(tc.name, tc.size); got != c.EndpointChanges {
			t.Errorf("%s at %d: %d changes, want %d", tc.name, tc.size, got, c.EndpointChanges)
		}
	}
}
