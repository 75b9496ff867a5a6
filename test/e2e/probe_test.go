package e2e

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/probe"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

const (
	probeNamespace = "kube-bpf-proxy-probe"
	// probeMetricsPort is the probe pods' named port "metrics".
	probeMetricsPort = "9090"
)

// probeDeployment is the latency probe running in the cluster: servers of
// the Deployment spread over both nodes, a client of the DaemonSet on each.
type probeDeployment struct {
	servers, clients []*localcluster.Pod
	// families are the probe Service's IP families, as the API server
	// allocated its ClusterIPs (the manifest asks PreferDualStack): IPv4
	// on an IPv4 cluster, both on a dual-stack one. The clients must
	// measure each, with the family in ip_family, and no other.
	families []string
}

// deployProbe installs the latency probe from manifests/probe as a user
// does (kubectl apply -k) and runs the Deployment's servers and the
// DaemonSet's clients as the kubelet would run them (the clients with
// their ServiceAccount's in-cluster credentials, reaching the API server
// through the kubernetes Service). The cluster's Prometheus scrapes every
// probe pod as job kube-bpf-proxy-probe until t ends; then the probe is
// uninstalled, so that what follows sees no trace of it.
func (e *env) deployProbe(t *testing.T, mode string) *probeDeployment {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := filepath.Join(manifestsDir, "probe")
	if _, err := e.c.Kubectl(ctx, "apply", "-k", dir); err != nil {
		t.Fatal(err)
	}
	// Last (cleanups run in reverse), once the pods are gone.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if _, err := e.c.Kubectl(ctx, "delete", "-k", dir, "--wait=true", "--timeout=90s"); err != nil {
			t.Errorf("uninstalling the probe: %v", err)
		}
	})
	e.checkProbeRBAC(t, ctx)
	e.ensureModeLabel(t, ctx, mode)
	var d probeDeployment
	svc, err := e.c.Client.CoreV1().Services(probeNamespace).Get(ctx, "probe-server", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p := svc.Spec.IPFamilyPolicy; p == nil || *p != corev1.IPFamilyPolicyPreferDualStack {
		t.Errorf("probe Service's ipFamilyPolicy %v, want PreferDualStack (dual-stack wherever the cluster is)", p)
	}
	if len(svc.Spec.IPFamilies) == 0 || len(svc.Spec.IPFamilies) != len(svc.Spec.ClusterIPs) {
		t.Fatalf("probe Service: families %v for ClusterIPs %v", svc.Spec.IPFamilies, svc.Spec.ClusterIPs)
	}
	for _, f := range svc.Spec.IPFamilies {
		d.families = append(d.families, string(f))
	}
	t.Logf("probe Service ClusterIPs %v, families %v", svc.Spec.ClusterIPs, d.families)
	d.servers, err = e.c.StartDeployment(ctx, probeNamespace, "probe-server", e.binary, "Probe server ready")
	t.Cleanup(func() { e.removePods(t, d.servers) })
	if err != nil {
		t.Fatal(err)
	}
	d.clients, err = e.c.StartDaemonSet(ctx, probeNamespace, "probe-client", e.binary, "Probe client ready")
	t.Cleanup(func() { e.removePods(t, d.clients) })
	if err != nil {
		t.Fatal(err)
	}
	var targets []localcluster.ScrapeTarget
	for _, p := range append(append([]*localcluster.Pod{}, d.clients...), d.servers...) {
		targets = append(targets, localcluster.ScrapeTarget{
			Address: net.JoinHostPort(p.IP.String(), probeMetricsPort),
			Labels:  map[string]string{"instance": p.Name, "pod": p.Name, "node": p.Node, "namespace": p.Namespace},
		})
	}
	if err := e.c.SetProbeTargets(targets); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.c.SetProbeTargets(nil); err != nil {
			t.Errorf("removing the probe's scrape targets: %v", err)
		}
	})
	return &d
}

// probeScenario checks what the probe's clients export: round trips for
// every client-node/server-node pair, both protocols and every IP family of
// the Service with the proxies' mode, no series of another family, no
// error, and refusals counted for each family once the Service has no
// ready endpoint (which it leaves so: the probe goes with the mode).
func (e *env) probeScenario(t *testing.T, mode string, d *probeDeployment) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	servers, clients := d.servers, d.clients
	nodes := make([]string, 0, len(e.c.Nodes))
	for _, n := range e.c.Nodes {
		nodes = append(nodes, n.Name)
	}

	// Every pair and protocol measured with the mode; what came before
	// (the first probes may race the proxies' sync of the new endpoints,
	// or the mode label) is left out by the before/after difference.
	before := e.waitForProbes(t, ctx, clients, nodes, mode, d.families, 1)
	after := e.waitForProbes(t, ctx, clients, nodes, mode, d.families, 5)
	for i := range clients {
		for _, name := range []string{"kube_bpf_proxy_probe_round_trip_seconds", "kube_bpf_proxy_probe_connect_seconds", "kube_bpf_proxy_probe_errors_total"} {
			for _, m := range after[i][name].GetMetric() {
				if f := labelOf(m, "ip_family"); !slices.Contains(d.families, f) {
					t.Errorf("client %s: %s series of ip_family %q, the Service has %v", clients[i].Name, name, f, d.families)
				}
			}
		}
		diff := diffScrapes(before[i], after[i])
		for _, want := range []string{"refused", "timeout", "reset", "other"} {
			if n := diff.errors[want]; n != 0 {
				t.Errorf("client %s: %g %s errors while every server was ready", clients[i].Name, n, want)
			}
		}
		for _, name := range []string{"kube_bpf_proxy_probe_connect_seconds", "kube_bpf_proxy_probe_first_byte_seconds"} {
			for _, server := range nodes {
				if diff.counts[name+"|"+server] == 0 {
					t.Errorf("client %s: no %s observed towards servers on %s", clients[i].Name, name, server)
				}
			}
		}
	}
	summaries, err := probe.Summarize(before, after)
	if err != nil {
		t.Fatal(err)
	}
	var table strings.Builder
	if err := probe.WriteTable(&table, summaries); err != nil {
		t.Fatal(err)
	}
	t.Logf("probe through the ClusterIP, %s mode:\n%s", mode, table.String())
	for _, family := range d.families {
		for _, protocol := range []string{"tcp", "udp"} {
			found := false
			for _, s := range summaries {
				if s.Mode == mode && s.Family == family && s.Protocol == protocol {
					found = true
					if s.Requests == 0 || s.Errors != 0 || s.Mean <= 0 || s.P99 < s.P50 {
						t.Errorf("%s/%s/%s summary: %+v", mode, family, protocol, s)
					}
				}
			}
			if !found {
				t.Errorf("no %s/%s/%s summary among %+v", mode, family, protocol, summaries)
			}
		}
	}

	// No ready endpoint: each probe is refused at once (the eBPF connect
	// hook's ECONNREFUSED, the iptables REJECT), counted as such.
	for _, s := range servers {
		if err := e.c.SetPodReady(ctx, s.Namespace, s.Name, false); err != nil {
			t.Fatal(err)
		}
	}
	for _, client := range clients {
		for _, family := range d.families {
			for _, protocol := range []string{"tcp", "udp"} {
				var last float64
				if !eventually(60*time.Second, func() bool {
					s, err := e.scrapeProbe(ctx, client)
					if err != nil {
						return false
					}
					last = sumCounter(s, "kube_bpf_proxy_probe_errors_total", map[string]string{
						"client_node": client.Node, "mode": mode, "protocol": protocol, "kind": probe.KindRefused, "ip_family": family})
					return last >= 3
				}) {
					t.Errorf("client %s: %g refused %s %s probes counted with no ready server, want at least 3", client.Name, last, family, protocol)
				}
			}
		}
	}
}

// checkProbeRBAC asks the API server, with the client's and the server's
// own ServiceAccount tokens, what they may do: the client reads its one
// Service and Nodes, nothing else; the server nothing.
func (e *env) checkProbeRBAC(t *testing.T, ctx context.Context) {
	t.Helper()
	client, err := e.c.ServiceAccountKubeconfig(ctx, probeNamespace, "probe-client", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	server, err := e.c.ServiceAccountKubeconfig(ctx, probeNamespace, "probe-server", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []struct {
		kubeconfig string
		args       []string
		allowed    bool
	}{
		{client, []string{"get", "services/probe-server", "-n", probeNamespace}, true},
		{client, []string{"list", "services/probe-server", "-n", probeNamespace}, true},
		{client, []string{"watch", "services/probe-server", "-n", probeNamespace}, true},
		{client, []string{"get", "nodes/node1"}, true},
		{client, []string{"watch", "nodes"}, true},
		{client, []string{"list", "services", "-n", probeNamespace}, false},
		{client, []string{"get", "services/other", "-n", probeNamespace}, false},
		{client, []string{"get", "services/kubernetes", "-n", "default"}, false},
		{client, []string{"update", "services/probe-server", "-n", probeNamespace}, false},
		{client, []string{"patch", "nodes/node1"}, false},
		{client, []string{"list", "pods", "-n", probeNamespace}, false},
		{client, []string{"list", "endpointslices.discovery.k8s.io", "-n", probeNamespace}, false},
		{client, []string{"get", "secrets", "-n", probeNamespace}, false},
		{server, []string{"get", "services/probe-server", "-n", probeNamespace}, false},
		{server, []string{"get", "nodes/node1"}, false},
	} {
		out, err := e.c.KubectlAs(ctx, q.kubeconfig, append([]string{"auth", "can-i"}, q.args...)...)
		// The answer is the last line, after any warning (kubectl warns
		// that nodes are not namespaced); can-i exits 1 for "no".
		lines := strings.Split(strings.TrimSpace(out), "\n")
		got := strings.TrimSpace(lines[len(lines)-1])
		if (got == "yes") != q.allowed || (got != "yes" && got != "no") {
			t.Errorf("can %s %s? got %q (err %v), want allowed=%v", filepath.Base(q.kubeconfig), q.args, got, err, q.allowed)
		}
	}
}

// ensureModeLabel waits until each Node carries the mode label its proxy
// writes after its first sync, naming the running mode: the probe reads it.
func (e *env) ensureModeLabel(t *testing.T, ctx context.Context, mode string) {
	t.Helper()
	for _, n := range e.c.Nodes {
		var got string
		if !eventually(30*time.Second, func() bool {
			node, err := e.c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				got = err.Error()
				return false
			}
			got = node.Labels[probe.ModeLabel]
			return got == mode
		}) {
			t.Fatalf("Node %s: label %s=%q, want %q, written by its proxy", n.Name, probe.ModeLabel, got, mode)
		}
	}
}

// waitForProbes waits until every client has counted at least n more
// round trips with mode for every server node, protocol and IP family than
// it had on entry (n from zero on the first call), and returns the last
// scrapes.
func (e *env) waitForProbes(t *testing.T, ctx context.Context, clients []*localcluster.Pod, nodes []string, mode string, families []string, n float64) []probe.Scrape {
	t.Helper()
	count := func(s probe.Scrape, client *localcluster.Pod, server, protocol, family string) float64 {
		return sumHistogramCount(s, "kube_bpf_proxy_probe_round_trip_seconds", map[string]string{
			"client_node": client.Node, "server_node": server, "mode": mode, "protocol": protocol, "ip_family": family})
	}
	scrapes := make([]probe.Scrape, len(clients))
	for i, client := range clients {
		start, err := e.scrapeProbe(ctx, client)
		if err != nil {
			start = probe.Scrape{}
		}
		var last string
		if !eventually(90*time.Second, func() bool {
			s, err := e.scrapeProbe(ctx, client)
			if err != nil {
				last = err.Error()
				return false
			}
			scrapes[i] = s
			var missing []string
			for _, server := range nodes {
				for _, protocol := range []string{"tcp", "udp"} {
					for _, family := range families {
						if count(s, client, server, protocol, family)-count(start, client, server, protocol, family) < n {
							missing = append(missing, fmt.Sprintf("%s->%s/%s/%s (%g)", client.Node, server, protocol, family, count(s, client, server, protocol, family)))
						}
					}
				}
			}
			last = "too few round trips: " + strings.Join(missing, ", ") + "; errors " + fmt.Sprint(errorCounts(s))
			return len(missing) == 0
		}) {
			t.Fatalf("client %s, %s mode: %s", client.Name, mode, last)
		}
	}
	return scrapes
}

// scrapeProbe fetches a probe pod's /metrics as Prometheus would, from its
// node.
func (e *env) scrapeProbe(ctx context.Context, p *localcluster.Pod) (probe.Scrape, error) {
	code, body, err := e.c.NodeGet(ctx, p.Node, net.JoinHostPort(p.IP.String(), probeMetricsPort), "/metrics")
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("GET /metrics of %s: status %d", p.Name, code)
	}
	return probe.ParseScrape(strings.NewReader(body))
}

func (e *env) removePods(t *testing.T, pods []*localcluster.Pod) {
	for _, p := range pods {
		if err := e.c.DeletePod(context.Background(), p.Namespace, p.Name, 0); err != nil {
			t.Errorf("removing pod %s: %v", p.Name, err)
		}
	}
}

// scrapeDiff is what a client counted between two scrapes.
type scrapeDiff struct {
	errors map[string]float64 // by kind
	counts map[string]float64 // "metric|server_node" -> observations
}

func diffScrapes(before, after probe.Scrape) scrapeDiff {
	d := scrapeDiff{errors: map[string]float64{}, counts: map[string]float64{}}
	for kind, v := range errorCounts(after) {
		d.errors[kind] = v - errorCounts(before)[kind]
	}
	for _, name := range []string{"kube_bpf_proxy_probe_connect_seconds", "kube_bpf_proxy_probe_first_byte_seconds"} {
		for _, m := range after[name].GetMetric() {
			server := labelOf(m, "server_node")
			d.counts[name+"|"+server] += float64(m.GetHistogram().GetSampleCount())
		}
		for _, m := range before[name].GetMetric() {
			d.counts[name+"|"+labelOf(m, "server_node")] -= float64(m.GetHistogram().GetSampleCount())
		}
	}
	return d
}

func errorCounts(s probe.Scrape) map[string]float64 {
	out := map[string]float64{}
	for _, m := range s["kube_bpf_proxy_probe_errors_total"].GetMetric() {
		out[labelOf(m, "kind")] += m.GetCounter().GetValue()
	}
	return out
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func matches(m *dto.Metric, labels map[string]string) bool {
	for k, v := range labels {
		if labelOf(m, k) != v {
			return false
		}
	}
	return true
}

func sumHistogramCount(s probe.Scrape, name string, labels map[string]string) float64 {
	var total float64
	for _, m := range s[name].GetMetric() {
		if matches(m, labels) {
			total += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return total
}

func sumCounter(s probe.Scrape, name string, labels map[string]string) float64 {
	var total float64
	for _, m := range s[name].GetMetric() {
		if matches(m, labels) {
			total += m.GetCounter().GetValue()
		}
	}
	return total
}
