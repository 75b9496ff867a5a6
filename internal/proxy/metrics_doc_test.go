package proxy

import (
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/doctable"
)

const metricsDoc = "docs/metrics.md"

// recorder is a Registerer that keeps every collector registered through
// it, so that the test can list their descriptors (which a Registry does
// not expose), and registers them on a real registry too, so that a
// duplicate still panics as in the binary.
type recorder struct {
	reg        *prometheus.Registry
	collectors []prometheus.Collector
}

func (r *recorder) Register(c prometheus.Collector) error {
	if err := r.reg.Register(c); err != nil {
		return err
	}
	r.collectors = append(r.collectors, c)
	return nil
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

func (r *recorder) Unregister(c prometheus.Collector) bool { return r.reg.Unregister(c) }

// descName is the fully-qualified name of a descriptor. Desc has no
// accessor for it; its String form has been `Desc{fqName: "...", ...}`
// throughout client_golang v1.
var descName = regexp.MustCompile(`fqName: "([^"]+)"`)

// registeredNames returns the names of every metric family the binary's
// registry can export in the given mode, without a kernel: the Go and
// process collectors of metrics.NewRegistry, client-go's request metrics and
// kube_bpf_proxy_info (registered by cmd/kube-bpf-proxy's runProxy, the two
// calls repeated here), metrics.New (RunOpening), and the collectors
// datapathCollectors registers for the mode's real datapath type,
// wrapped as newDataplane wraps it. Registering reads nothing from a
// datapath, so zero values of the real types stand in for loaded ones.
func registeredNames(t *testing.T, mode string, dp dataplane.Dataplane) map[string]bool {
	t.Helper()
	names := map[string]bool{}
	base := metrics.NewRegistry()
	fams, err := base.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		names[f.GetName()] = true
	}
	rec := &recorder{reg: base}
	metrics.NewRESTClient(rec)
	metrics.RegisterInfo(rec, mode, "nft", "test")
	metrics.New(rec)
	new(datapathCollectors).register(rec, dp)
	for _, c := range rec.collectors {
		ch := make(chan *prometheus.Desc)
		go func() {
			c.Describe(ch)
			close(ch)
		}()
		for d := range ch {
			m := descName.FindStringSubmatch(d.String())
			if m == nil {
				t.Fatalf("cannot read the name of %s", d)
			}
			names[m[1]] = true
		}
	}
	return names
}

// gatheredTypes returns the type of each family the metrics package's
// collectors export once they have something to export: metrics.New's with
// their label values set, and the datapath collectors fed by fake sources.
// Families without a sample here (client-go's, until a request) are not
// type-checked.
func gatheredTypes(t *testing.T) map[string]string {
	t.Helper()
	reg := metrics.NewRegistry()
	metrics.NewRESTClient(reg)
	metrics.RegisterInfo(reg, "iptables", "nft", "test")
	m := metrics.New(reg)
	m.InitIptables()
	m.SetIptablesRules(map[string]int{"nat": 1}, map[string]int{"nat": 1})
	m.RecordSkipped("Service", "test")
	m.InitServicePortReasons([]string{dataplane.ReasonMapFull})
	m.NetworkProgrammingDuration.Observe(1)
	reg.MustRegister(
		metrics.NewDatapathEventsCollector(func() (map[string]uint64, error) { return map[string]uint64{"x": 1}, nil }),
		metrics.NewNFAcctCollector(func() (uint64, uint64, bool) { return 1, 1, true }),
		metrics.NewDatapathCountersCollector(fakeCounters{}),
	)
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	types := map[string]string{}
	for _, f := range fams {
		types[f.GetName()] = strings.ToLower(dto.MetricType_name[int32(f.GetType())])
	}
	return types
}

type fakeCounters struct{}

func (fakeCounters) ServicePortCounters() ([]dataplane.ServicePortCounters, error) {
	return []dataplane.ServicePortCounters{{Name: model.ServicePortName{ServiceName: model.ServiceName{Namespace: "ns", Name: "svc"}, Port: "http", Protocol: model.TCP}, Connections: 1}}, nil
}

func (fakeCounters) MapUsage() ([]dataplane.MapUsage, error) {
	return []dataplane.MapUsage{{Map: "services", Entries: 1, Capacity: 2}}, nil
}

// TestMetricsTables checks docs/metrics.md's two metric tables against what
// the proxy registers in both modes: every family has a row, every row names
// a family that is registered, and a row's type is the family's. A row's
// first cell names its series as `code` spans; `prefix_*` stands for every
// family starting with prefix (client-go's exec plugin and transport
// metrics, Go's and the process's) and must match at least one.
func TestMetricsTables(t *testing.T) {
	registered := registeredNames(t, "ebpf", dataplane.WithHandover(&dataplane.Layered{Primary: new(ebpf.Dataplane), Packets: new(iptables.Dataplane)}, "iptables", nil))
	for name := range registeredNames(t, "iptables", dataplane.WithHandover(new(iptables.Dataplane), "ebpf", nil)) {
		registered[name] = true
	}
	// What the two modes' datapaths register beyond metrics.New: if either
	// type stops implementing its interface, these families vanish from the
	// binary and from the set above, and their rows fail the test.
	for _, name := range []string{"kube_bpf_proxy_datapath_events_total", "kube_bpf_proxy_bpf_map_entries", "kubeproxy_iptables_ct_state_invalid_dropped_packets_total"} {
		if !registered[name] {
			t.Errorf("%s is not registered for either mode's datapath", name)
		}
	}
	types := gatheredTypes(t)

	documented := map[string]bool{}
	var patterns []string
	header := "| metric | type | labels | meaning |"
	for _, row := range doctable.Rows(t, metricsDoc, header) {
		if len(row) != 4 {
			t.Errorf("%s: row %q has %d cells, want 4", metricsDoc, row, len(row))
			continue
		}
		names := doctable.CodeSpans(row[0])
		if len(names) == 0 {
			t.Errorf("%s: row %q names no `metric`", metricsDoc, row)
		}
		typ, _, _ := strings.Cut(row[1], " ") // "gauge (1)"
		for _, name := range names {
			if prefix, ok := strings.CutSuffix(name, "*"); ok {
				patterns = append(patterns, prefix)
				if !slices.ContainsFunc(slices.Collect(mapKeys(registered)), func(n string) bool { return strings.HasPrefix(n, prefix) }) {
					t.Errorf("%s documents %s, which matches nothing the proxy registers: remove its row", metricsDoc, name)
				}
				continue
			}
			if documented[name] {
				t.Errorf("%s: %s has two rows", metricsDoc, name)
			}
			documented[name] = true
			if !registered[name] {
				t.Errorf("%s documents %s, which the proxy does not register: remove its row", metricsDoc, name)
				continue
			}
			if got, ok := types[name]; ok && got != typ {
				t.Errorf("%s: %s is a %s, its row says %q", metricsDoc, name, got, row[1])
			}
		}
	}
	for _, name := range slices.Sorted(mapKeys(registered)) {
		if documented[name] || slices.ContainsFunc(patterns, func(p string) bool { return strings.HasPrefix(name, p) }) {
			continue
		}
		t.Errorf("%s (a %s) has no row in %s", name, types[name], metricsDoc)
	}
}

func mapKeys(m map[string]bool) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
