package e2e

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// datapathCounters checks the eBPF proxies' per Service port counters and
// map fill as a scrape reads them: every node's client connects to a
// Service and to one without endpoints, and each node's proxy counts the
// connections, their reverse translations (getpeername) and the refusals
// on those ports, and exports no series for a Service nobody used there.
func (e *env) datapathCounters(t *testing.T, ns string) {
	ctx := context.Background()
	e.addWeb(t, ns, "m-1", "node1", "m")
	vip := e.createService(t, ns, "m", 80)
	e.expectBackends(t, vip+":80", "m-1") // 20 connects from each node's client
	e.createService(t, ns, "m-idle", 80)  // selects no pod, and nobody connects
	empty := e.createService(t, ns, "m-empty", 80)
	// Until a node programs the new Service its ClusterIP is an address of
	// the Service range that no Service holds, refused as well, but
	// counted as that (refused_unallocated_address), not on the Service:
	// wait for the node to serve the port before the counted refusals.
	for i, client := range e.clients {
		node := e.c.Nodes[i].Name
		var last string
		if !eventually(30*time.Second, func() bool {
			events, err := e.datapathEvent(ctx, node, "refused_no_backend")
			if err != nil {
				last = err.Error()
				return false
			}
			lines, err := connects(ctx, client, empty+":80", 1)
			after, err2 := e.datapathEvent(ctx, node, "refused_no_backend")
			last = fmt.Sprint(lines, err, err2)
			return err == nil && err2 == nil && after > events
		}) {
			t.Fatalf("from %s: the Service without endpoints never refused as a Service, last seen %s", client.Name, last)
		}
		lines, err := connects(ctx, client, empty+":80", 3)
		if err != nil || strings.Count(strings.Join(lines, "\n"), "err connection refused") != 3 {
			t.Fatalf("from %s to the Service without endpoints: want 3 refusals, got %v %v", client.Name, lines, err)
		}
	}

	port := func(svc string) string {
		return fmt.Sprintf(`{namespace=%q,port="http",protocol="TCP",service=%q}`, ns, svc)
	}
	atLeast := func(n float64) func(float64) bool { return func(v float64) bool { return v >= n } }
	e.expectMetricWhere(t, "kube_bpf_proxy_service_connections_translated_total"+port("m"), ">= 20", atLeast(20))
	e.expectMetricWhere(t, "kube_bpf_proxy_service_reverse_translations_total"+port("m"), ">= 20", atLeast(20))
	e.expectMetricWhere(t, "kube_bpf_proxy_service_refused_total"+port("m-empty"), ">= 3", atLeast(3))
	e.expectMetricWhere(t, "kube_bpf_proxy_service_datagrams_translated_total"+port("m"), "0", func(v float64) bool { return v == 0 })
	e.expectMetricWhere(t, `kube_bpf_proxy_bpf_map_entries{map="services"}`, ">= 3", atLeast(3))
	e.expectMetricWhere(t, `kube_bpf_proxy_bpf_map_capacity{map="service_stats"}`, "> 0", atLeast(1))
	for _, n := range e.c.Nodes {
		_, body, err := e.c.ProxyGet(ctx, n.Name, localcluster.ProxyMetricsAddr, "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(body, `service="m-idle"`) {
			t.Errorf("on %s: series of a Service nobody used:\n%s", n.Name, grepLines(body, `service="m-idle"`))
		}
	}
	for _, svc := range []string{"m", "m-idle", "m-empty"} {
		if err := e.c.Client.CoreV1().Services(ns).Delete(ctx, svc, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

func grepLines(body, s string) string {
	var out []string
	for _, l := range strings.Split(body, "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// expectMetricWhere waits until series (a name with its labels, as /metrics
// prints it) has a value ok accepts on both nodes; want says what ok wants.
func (e *env) expectMetricWhere(t *testing.T, series, want string, ok func(float64) bool) {
	t.Helper()
	for _, n := range e.c.Nodes {
		var last string
		if !eventually(30*time.Second, func() bool {
			_, body, err := e.c.ProxyGet(context.Background(), n.Name, localcluster.ProxyMetricsAddr, "/metrics")
			if err != nil {
				last = err.Error()
				return false
			}
			for _, line := range strings.Split(body, "\n") {
				if v, found := strings.CutPrefix(line, series+" "); found {
					last = line
					f, err := strconv.ParseFloat(v, 64)
					return err == nil && ok(f)
				}
			}
			last = series + " absent"
			return false
		}) {
			t.Errorf("on %s: want %s %s, last seen %s", n.Name, series, want, last)
		}
	}
}

// datapathEvent reads one kube_bpf_proxy_datapath_events_total counter of
// a node's proxy.
func (e *env) datapathEvent(ctx context.Context, node, event string) (float64, error) {
	_, body, err := e.c.ProxyGet(ctx, node, localcluster.ProxyMetricsAddr, "/metrics")
	if err != nil {
		return 0, err
	}
	series := fmt.Sprintf("kube_bpf_proxy_datapath_events_total{event=%q} ", event)
	for _, line := range strings.Split(body, "\n") {
		if v, found := strings.CutPrefix(line, series); found {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("%s absent", series)
}
