package metrics

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	kbpmodel "github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

type fakeDatapathCounters struct {
	ports    []dataplane.ServicePortCounters
	usage    []dataplane.MapUsage
	portsErr error
	usageErr error
}

func (f *fakeDatapathCounters) ServicePortCounters() ([]dataplane.ServicePortCounters, error) {
	return f.ports, f.portsErr
}

func (f *fakeDatapathCounters) MapUsage() ([]dataplane.MapUsage, error) {
	return f.usage, f.usageErr
}

func portName(ns, name, port string, proto kbpmodel.Protocol) kbpmodel.ServicePortName {
	return kbpmodel.ServicePortName{ServiceName: kbpmodel.ServiceName{Namespace: ns, Name: name}, Port: port, Protocol: proto}
}

// scrapeFamilies serves reg as the proxy does and parses what a Prometheus
// server would read.
func scrapeFamilies(t *testing.T, reg *prometheus.Registry) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := scrape(t, Handler(reg), "/metrics")
	if code != http.StatusOK {
		t.Fatalf("status %d:\n%s", code, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing the scrape: %v\n%s", err, body)
	}
	return families
}

// samples renders a family as "name{label=value,...} value" lines, sorted.
func samples(f *dto.MetricFamily) []string {
	if f == nil {
		return nil
	}
	var out []string
	for _, m := range f.GetMetric() {
		var labels []string
		for _, l := range m.GetLabel() {
			labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
		}
		var v float64
		switch f.GetType() {
		case dto.MetricType_COUNTER:
			v = m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			v = m.GetGauge().GetValue()
		}
		out = append(out, fmt.Sprintf("{%s} %g", strings.Join(labels, ","), v))
	}
	slices.Sort(out)
	return out
}

func TestDatapathCountersCollector(t *testing.T) {
	src := &fakeDatapathCounters{
		ports: []dataplane.ServicePortCounters{
			{Name: portName("default", "web", "http", kbpmodel.TCP), Connections: 12, ReverseTranslations: 12},
			{Name: portName("kube-system", "kube-dns", "dns", kbpmodel.UDP), Connections: 2, Datagrams: 1 << 40, ReverseTranslations: 9},
			{Name: portName("default", "empty", "", kbpmodel.TCP), Refused: 3},
			// Never used on this node: not exported.
			{Name: portName("default", "idle", "http", kbpmodel.TCP)},
		},
		usage: []dataplane.MapUsage{
			{Map: "services", Entries: 4, Capacity: 65536},
			{Map: "slots", Entries: 7, Capacity: 262144},
			{Map: "backends", Entries: 5, Capacity: 262144},
			{Map: "revnat", Entries: 31, Capacity: 262144},
			{Map: "service_stats", Entries: 4, Capacity: 65536},
		},
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewDatapathCountersCollector(src))
	families := scrapeFamilies(t, reg)

	web := `namespace="default",port="http",protocol="TCP",service="web"`
	dns := `namespace="kube-system",port="dns",protocol="UDP",service="kube-dns"`
	empty := `namespace="default",port="",protocol="TCP",service="empty"`
	want := map[string]struct {
		typ     dto.MetricType
		samples []string
	}{
		"kube_bpf_proxy_service_connections_translated_total": {dto.MetricType_COUNTER,
			[]string{"{" + empty + "} 0", "{" + web + "} 12", "{" + dns + "} 2"}},
		"kube_bpf_proxy_service_datagrams_translated_total": {dto.MetricType_COUNTER,
			[]string{"{" + empty + "} 0", "{" + web + "} 0", "{" + dns + "} 1.099511627776e+12"}},
		"kube_bpf_proxy_service_refused_total": {dto.MetricType_COUNTER,
			[]string{"{" + empty + "} 3", "{" + web + "} 0", "{" + dns + "} 0"}},
		"kube_bpf_proxy_service_reverse_translations_total": {dto.MetricType_COUNTER,
			[]string{"{" + empty + "} 0", "{" + web + "} 12", "{" + dns + "} 9"}},
		"kube_bpf_proxy_bpf_map_entries": {dto.MetricType_GAUGE, []string{
			`{map="backends"} 5`, `{map="revnat"} 31`, `{map="service_stats"} 4`, `{map="services"} 4`, `{map="slots"} 7`}},
		"kube_bpf_proxy_bpf_map_capacity": {dto.MetricType_GAUGE, []string{
			`{map="backends"} 262144`, `{map="revnat"} 262144`, `{map="service_stats"} 65536`, `{map="services"} 65536`, `{map="slots"} 262144`}},
	}
	if len(families) != len(want) {
		t.Errorf("families %v, want %d", slices.Sorted(func(yield func(string) bool) {
			for n := range families {
				if !yield(n) {
					return
				}
			}
		}), len(want))
	}
	for name, w := range want {
		f := families[name]
		if f == nil {
			t.Errorf("%s missing", name)
			continue
		}
		if f.GetType() != w.typ {
			t.Errorf("%s is a %v, want a %v", name, f.GetType(), w.typ)
		}
		if f.GetHelp() == "" {
			t.Errorf("%s has no help", name)
		}
		got := samples(f)
		wantSamples := slices.Clone(w.samples)
		slices.Sort(wantSamples)
		if !slices.Equal(got, wantSamples) {
			t.Errorf("%s:\n got %q\nwant %q", name, got, wantSamples)
		}
	}
}

// A port held under two ids for a moment (a frontend change whose removal
// failed) is one series, never two with one label set.
func TestDatapathCountersCollectorSumsOnePortsIDs(t *testing.T) {
	name := portName("default", "web", "http", kbpmodel.TCP)
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewDatapathCountersCollector(&fakeDatapathCounters{ports: []dataplane.ServicePortCounters{
		{Name: name, Connections: 5}, {Name: name, Connections: 2, Refused: 1},
	}}))
	families := scrapeFamilies(t, reg)
	labels := `{namespace="default",port="http",protocol="TCP",service="web"}`
	for family, want := range map[string]string{
		"kube_bpf_proxy_service_connections_translated_total": labels + " 7",
		"kube_bpf_proxy_service_refused_total":                labels + " 1",
	} {
		if got := samples(families[family]); !slices.Equal(got, []string{want}) {
			t.Errorf("%s: %q, want %q", family, got, want)
		}
	}
}

// A read error leaves the families it concerns out of the scrape, reported
// as an error; everything else is served.
func TestDatapathCountersCollectorReadErrors(t *testing.T) {
	ports := []dataplane.ServicePortCounters{{Name: portName("default", "web", "http", kbpmodel.TCP), Connections: 1}}
	usage := []dataplane.MapUsage{{Map: "services", Entries: 1, Capacity: 8}}
	for _, tc := range []struct {
		name    string
		src     *fakeDatapathCounters
		served  []string
		missing []string
		wantErr string
	}{{
		name:    "counters",
		src:     &fakeDatapathCounters{portsErr: errors.New("batch lookup: bad file descriptor"), usage: usage},
		served:  []string{"kube_bpf_proxy_bpf_map_entries", "kube_bpf_proxy_bpf_map_capacity"},
		missing: []string{"kube_bpf_proxy_service_connections_translated_total", "kube_bpf_proxy_service_refused_total"},
		wantErr: "reading service port counters: batch lookup: bad file descriptor",
	}, {
		name:    "map usage",
		src:     &fakeDatapathCounters{ports: ports, usageErr: errors.New("counting kbp_revnat entries: EPERM")},
		served:  []string{"kube_bpf_proxy_service_connections_translated_total"},
		missing: []string{"kube_bpf_proxy_bpf_map_entries", "kube_bpf_proxy_bpf_map_capacity"},
		wantErr: "reading map usage: counting kbp_revnat entries: EPERM",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			m := New(reg)
			m.SetProgrammed(1, 1)
			reg.MustRegister(NewDatapathCountersCollector(tc.src))
			if _, err := reg.Gather(); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("gather error %v, want one containing %q", err, tc.wantErr)
			}
			families := scrapeFamilies(t, reg)
			for _, name := range append(tc.served, "kube_bpf_proxy_services") {
				if families[name] == nil {
					t.Errorf("%s not served", name)
				}
			}
			for _, name := range tc.missing {
				if families[name] != nil {
					t.Errorf("%s served despite the read error: %v", name, samples(families[name]))
				}
			}
		})
	}
}
