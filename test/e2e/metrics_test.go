package e2e

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodelabel"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// programmingCount is the network programming histogram's count series.
const programmingCount = `kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"}`

// scrape returns the proxy's /metrics on node.
func (e *env) scrape(node string) (string, error) {
	_, body, err := e.c.ProxyGet(context.Background(), node, localcluster.ProxyMetricsAddr, "/metrics")
	return body, err
}

// seriesLine returns the line of the first series of body that starts with
// prefix (a name, or a name and the start of its labels).
func seriesLine(body, prefix string) (string, bool) {
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, prefix) {
			return line, true
		}
	}
	return "", false
}

// seriesValue returns the value of the series printed exactly as series.
func seriesValue(body, series string) (float64, bool) {
	line, ok := seriesLine(body, series+" ")
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseFloat(strings.TrimPrefix(line, series+" "), 64)
	return v, err == nil
}

// expectScrape waits until check accepts node's /metrics, on each node;
// check returns what it saw, for the failure message.
func (e *env) expectScrape(t *testing.T, what string, check func(body string) (string, bool)) {
	t.Helper()
	for _, n := range e.c.Nodes {
		var last string
		if !eventually(30*time.Second, func() bool {
			body, err := e.scrape(n.Name)
			if err != nil {
				last = err.Error()
				return false
			}
			var ok bool
			last, ok = check(body)
			return ok
		}) {
			t.Errorf("on %s: want %s, last seen %s", n.Name, what, last)
		}
	}
}

// expectModeShown checks what tells a user which mode serves each node:
// the Node's kube-bpf-proxy.io/mode label, which the proxy sets after its
// first sync, and kube_bpf_proxy_info. The same scrape shows client-go's
// request counter, which the kube-proxy dashboard's API panels read.
func (e *env) expectModeShown(t *testing.T, mode string) {
	t.Helper()
	for _, n := range e.c.Nodes {
		var last string
		if !eventually(30*time.Second, func() bool {
			node, err := e.c.Client.CoreV1().Nodes().Get(context.Background(), n.Name, metav1.GetOptions{})
			if err != nil {
				last = err.Error()
				return false
			}
			last = fmt.Sprintf("labels %v", node.Labels)
			return node.Labels[nodelabel.Label] == mode
		}) {
			t.Errorf("Node %s: want label %s=%s, last seen %s", n.Name, nodelabel.Label, mode, last)
		}
	}
	e.expectScrape(t, "kube_bpf_proxy_info for mode "+mode, func(body string) (string, bool) {
		line, ok := seriesLine(body, "kube_bpf_proxy_info{")
		if !ok {
			return "no kube_bpf_proxy_info", false
		}
		// Both modes name their iptables backend: the ebpf mode writes
		// the rules for traffic from outside the node.
		backendNamed := strings.Contains(line, `iptables_backend="nft"`) || strings.Contains(line, `iptables_backend="legacy"`)
		return line, strings.Contains(line, `mode="`+mode+`"`) && strings.HasSuffix(line, "} 1") &&
			!strings.Contains(line, `version=""`) && backendNamed
	})
	e.expectScrape(t, `rest_client_requests_total{code="200",...}`, func(body string) (string, bool) {
		line, ok := seriesLine(body, `rest_client_requests_total{code="200"`)
		if !ok {
			return "no rest_client_requests_total with code 200", false
		}
		return line, true
	})
}

// programmingCounts returns each node's network programming count.
func (e *env) programmingCounts(t *testing.T) map[string]float64 {
	t.Helper()
	counts := map[string]float64{}
	for _, n := range e.c.Nodes {
		body, err := e.scrape(n.Name)
		if err != nil {
			t.Fatalf("scraping %s: %v", n.Name, err)
		}
		v, ok := seriesValue(body, programmingCount)
		if !ok {
			t.Fatalf("%s: no %s", n.Name, programmingCount)
		}
		counts[n.Name] = v
	}
	return counts
}

// expectProgrammingRose waits until each node has observed more network
// programming latencies than before: the EndpointSlice changes made since
// carry trigger times after the proxies started.
func (e *env) expectProgrammingRose(t *testing.T, before map[string]float64) {
	t.Helper()
	for _, n := range e.c.Nodes {
		var last float64
		if !eventually(30*time.Second, func() bool {
			body, err := e.scrape(n.Name)
			if err != nil {
				return false
			}
			last, _ = seriesValue(body, programmingCount)
			return last > before[n.Name]
		}) {
			t.Errorf("on %s: %s stayed at %v after endpoint changes, was %v", n.Name, programmingCount, last, before[n.Name])
		}
	}
}
