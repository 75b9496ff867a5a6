package bench

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/probe"
)

func TestParseMemoryVariant(t *testing.T) {
	got, err := ParseMemoryVariant("low=/bin/kbp,GOGC=50,GOMEMLIMIT=80MiB,--profiling")
	want := MemoryVariant{Name: "low", Binary: "/bin/kbp",
		Env:  []corev1.EnvVar{{Name: "GOGC", Value: "50"}, {Name: "GOMEMLIMIT", Value: "80MiB"}},
		Args: []string{"--profiling"}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, %v; want %+v", got, err, want)
	}
	for _, bad := range []string{"", "nobinary", "=bin", "n=b,NOVALUE"} {
		if _, err := ParseMemoryVariant(bad); err == nil {
			t.Errorf("%q: want an error", bad)
		}
	}
}

// The full-sync histogram carries a constant label: its sum and count are
// read as well as unlabelled samples, from probe.ParseScrape's parse.
func TestSamples(t *testing.T) {
	scrape, err := probe.ParseScrape(strings.NewReader(`# HELP go_memstats_heap_inuse_bytes x
# TYPE go_memstats_heap_inuse_bytes gauge
go_memstats_heap_inuse_bytes 1.2e+08
# TYPE kubeproxy_sync_full_proxy_rules_duration_seconds histogram
kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family="ipv4",le="0.1"} 1
kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family="ipv4",le="+Inf"} 3
kubeproxy_sync_full_proxy_rules_duration_seconds_sum{ip_family="ipv4"} 1.5
kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="ipv4"} 3
# TYPE kube_bpf_proxy_services gauge
kube_bpf_proxy_services 10001
`))
	if err != nil {
		t.Fatal(err)
	}
	got := samples(scrape)
	want := map[string]float64{
		"go_memstats_heap_inuse_bytes":                           1.2e8,
		"kubeproxy_sync_full_proxy_rules_duration_seconds_sum":   1.5,
		"kubeproxy_sync_full_proxy_rules_duration_seconds_count": 3,
		"kube_bpf_proxy_services":                                10001,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}
