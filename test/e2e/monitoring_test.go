package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/hack/monitoring"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// startPrometheus starts the cluster's Prometheus (Debian's) with the
// shipped alerting rules, scraping both proxies every second.
func (e *env) startPrometheus(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := e.c.StartPrometheus(ctx, localcluster.PrometheusOptions{
		RuleFiles: []string{filepath.Join(repoRoot, monitoring.Dir, monitoring.RulesFile)},
	})
	if err != nil {
		t.Fatalf("starting Prometheus: %v (log %s)", err, e.c.PrometheusLog())
	}
}

// monitoring checks what a Prometheus scraping the proxies as job
// kube-proxy sees, in one mode: the series and their labels, counters
// rising with traffic, every dashboard and alert expression, the
// kubernetes-mixin's proxy dashboard, and the shipped files with promtool.
func (e *env) monitoring(t *testing.T, ns, mode string, since time.Time) {
	ctx := context.Background()
	api := e.c.PrometheusAPI()
	defer api.Close()
	e.promtoolChecks(t)

	// Both proxies scraped, as kube-proxy with the node as instance.
	var last string
	if !eventually(30*time.Second, func() bool {
		s, err := api.Query(ctx, `up{job="kube-proxy"} == 1`)
		if err != nil {
			last = err.Error()
			return false
		}
		last = fmt.Sprint(s)
		return slices.Equal(instances(s), []string{"node1", "node2"})
	}) {
		targets, _ := api.Targets(ctx)
		t.Fatalf("want both proxies up as job kube-proxy, instance node1 and node2; last %s; targets %+v", last, targets)
	}

	for _, c := range seriesChecks(mode) {
		t.Run("Series/"+c.name, func(t *testing.T) { e.checkSeries(t, api, c) })
	}

	// Traffic: a Service with TCP and UDP ports and two pods, and one
	// without endpoints.
	for i, node := range []string{"node1", "node2"} {
		_, err := e.c.AddPod(ctx, localcluster.PodSpec{
			Namespace: ns, Name: fmt.Sprintf("mon-%d", i+1), Node: node, Labels: map[string]string{"app": "mon"},
			Command:   testnet.Helper("serve", fmt.Sprintf("mon-%d", i+1), "tcp:80", "udp:5353"),
			ReadyLine: "ready",
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// Gone after the scenario: the next ones (a map sized for a few
	// Services among them) start from what they expect.
	t.Cleanup(func() {
		for _, svc := range []string{"mon", "mon-empty"} {
			_ = e.c.Client.CoreV1().Services(ns).Delete(context.Background(), svc, metav1.DeleteOptions{})
		}
		for _, p := range []string{"mon-1", "mon-2"} {
			if err := e.c.DeletePod(context.Background(), ns, p, 0); err != nil {
				t.Errorf("deleting pod %s: %v", p, err)
			}
		}
	})
	before := map[string]float64{}
	counters := counterChecks(ns, mode)
	for _, c := range counters {
		before[c.name] = e.value(t, api, c.expr)
	}
	vip := e.createMonService(t, ns, "mon")
	emptyVIP := e.createMonService(t, ns, "mon-empty")
	e.expectBackends(t, vip+":80", "mon-1", "mon-2")
	const n = 20
	requests := [][]string{
		{"tcp", vip + ":80", fmt.Sprint(n)},
		{"udp", vip + ":53", fmt.Sprint(n)},
		{"udp", vip + ":53", fmt.Sprint(n), "connected"},
		{"tcp", emptyVIP + ":80", fmt.Sprint(n)},
		{"udp", emptyVIP + ":53", fmt.Sprint(n), "connected"},
	}
	if mode == "ebpf" {
		// Refused at sendmsg(). In iptables mode the REJECT's ICMP error
		// reaches connected sockets only: an unconnected one times out.
		requests = append(requests, []string{"udp", emptyVIP + ":53", fmt.Sprint(n)})
	}
	for _, client := range e.clients {
		for _, args := range requests {
			out, err := client.Output(ctx, testnet.Helper(args...)...)
			if err != nil {
				t.Fatalf("%s from %s: %v", args, client.Name, err)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			want := "ok "
			if strings.HasPrefix(args[1], emptyVIP+":") {
				// A connected UDP socket in ebpf mode is refused once, at
				// connect(), and the helper stops there.
				want = "err connection refused"
			}
			for _, l := range lines {
				if !strings.HasPrefix(l, want) || (want == "ok " && len(lines) != n) {
					t.Fatalf("%s from %s: want %d lines %q..., got:\n%s", args, client.Name, n, want, out)
				}
			}
		}
	}
	for _, c := range counters {
		t.Run("Rises/"+c.name, func(t *testing.T) {
			var got float64
			ok := eventually(20*time.Second, func() bool {
				got = e.value(t, api, c.expr)
				return got-before[c.name] >= c.atLeast
			})
			if !ok {
				t.Errorf("%s: want a rise of at least %v with the traffic, got %v -> %v", c.expr, c.atLeast, before[c.name], got)
			}
		})
	}

	// Every dashboard and alert expression, over the time since this
	// mode's proxies started (what a dashboard of that range shows).
	window := fmt.Sprintf("%ds", int(time.Since(since).Seconds())+5)
	ds, err := monitoring.Dashboards()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range ds {
		for _, q := range d.Queries {
			t.Run("Dashboard/"+d.Title+"/"+q.Panel, func(t *testing.T) {
				e.checkExpr(t, api, monitoring.Substitute(q.Expr, mode, window), slices.Contains(q.FedIn, mode), false)
			})
		}
	}
	for _, d := range ds {
		for _, v := range d.Variables {
			t.Run("Variable/"+d.Title+"/"+v.Name, func(t *testing.T) {
				e.checkVariable(t, api, v, mode)
			})
		}
	}
	// The probe: a histogram for every client node / server node pair,
	// scraped while the probe runs (deployProbe).
	t.Run("ProbePairs", func(t *testing.T) {
		c := seriesCheck{name: "probe pairs",
			expr: fmt.Sprintf(`count by (client_node, server_node) (kube_bpf_proxy_probe_round_trip_seconds_count{job="kube-bpf-proxy-probe", mode=%q})`, mode)}
		var pairs []string
		ok := eventually(30*time.Second, func() bool {
			s, err := api.Query(ctx, c.expr)
			if err != nil {
				t.Fatal(err)
			}
			pairs = nil
			for _, x := range s {
				pairs = append(pairs, x.Labels["client_node"]+"->"+x.Labels["server_node"])
			}
			slices.Sort(pairs)
			return slices.Equal(pairs, []string{"node1->node1", "node1->node2", "node2->node1", "node2->node2"})
		})
		if !ok {
			t.Errorf("%s: want the four node pairs, got %v", c.expr, pairs)
		}
	})
	for _, a := range monitoring.Alerts() {
		t.Run("Alert/"+a.Name, func(t *testing.T) {
			e.checkExpr(t, api, a.Signal, slices.Contains(a.FedIn, mode), false)
			// A healthy cluster raises no alert, over the time since this
			// mode's proxies started and not a moment more: the scenarios
			// of the mode before (an API server outage's slow network
			// programming, the probe's refusals with no server ready) are
			// meant, and its proxies' series are the same series (same
			// job and instance), so any overlap would bring them in.
			sinceStart := fmt.Sprintf("%dms", time.Since(since).Milliseconds())
			expr := alertRange.ReplaceAllString(a.Expr(), "["+sinceStart+"]")
			s, err := api.Query(ctx, expr)
			if err != nil {
				t.Fatalf("%s: %v", expr, err)
			}
			if len(s) > 0 {
				t.Errorf("%s: a healthy cluster fires this alert: %v", expr, s)
			}
		})
	}
	for _, p := range mixinPanels(t) {
		t.Run("KubernetesMixin/"+p.title, func(t *testing.T) { e.checkMixinPanel(t, api, p, window) })
	}
}

// alertRange matches the range of an alert's range vectors, [10m].
var alertRange = regexp.MustCompile(`\[[0-9]+[smhd]\]`)

// checkExpr evaluates expr: it must parse and run; if fed, it must return
// data; if silent, it must return none.
func (e *env) checkExpr(t *testing.T, api *localcluster.PrometheusAPI, expr string, fed, silent bool) {
	t.Helper()
	var s []localcluster.Sample
	var err error
	// Rates need two scrapes after the traffic; a few seconds at most.
	wait := time.Duration(0)
	if fed {
		wait = 10 * time.Second
	}
	ok := eventually(wait, func() bool {
		s, err = api.Query(context.Background(), expr)
		return err == nil && (!fed || len(s) > 0)
	})
	switch {
	case err != nil:
		t.Errorf("%s: %v", expr, err)
	case silent && len(s) > 0:
		t.Errorf("%s: a healthy cluster fires this alert: %v", expr, s)
	case fed && !ok:
		t.Errorf("%s: no data, though the test's traffic feeds it", expr)
	}
}

// checkVariable requires a dashboard's label_values() variable to offer
// this mode (for mode) or some value (the others).
func (e *env) checkVariable(t *testing.T, api *localcluster.PrometheusAPI, v monitoring.Variable, mode string) {
	sel := monitoring.Substitute(v.Selector, mode, "1m")
	var got []string
	var err error
	ok := eventually(10*time.Second, func() bool {
		got, err = api.LabelValues(context.Background(), v.Label, sel)
		return err == nil && len(got) > 0 && (v.Name != "mode" || slices.Contains(got, mode))
	})
	switch {
	case err != nil:
		t.Errorf("label_values(%s, %s): %v", sel, v.Label, err)
	case !ok:
		t.Errorf("label_values(%s, %s) = %v, want values (the mode %s for mode)", sel, v.Label, got, mode)
	}
}

// instances returns the sorted instance labels of s.
func instances(s []localcluster.Sample) []string {
	var out []string
	for _, x := range s {
		out = append(out, x.Labels["instance"])
	}
	slices.Sort(out)
	return out
}

// seriesCheck is a series the proxy of each node must export, with labels.
type seriesCheck struct {
	name, expr string
	// labels each sample must carry: a value, or "*" for any non-empty one.
	labels map[string]string
}

func seriesChecks(mode string) []seriesCheck {
	// Both modes write iptables rules (the ebpf mode for traffic from
	// outside), so both name a backend.
	backend := "*"
	checks := []seriesCheck{
		{name: "info", expr: `kube_bpf_proxy_info{job="kube-proxy"}`,
			labels: map[string]string{"mode": mode, "iptables_backend": backend, "version": "*"}},
		{name: "sync duration", expr: `kubeproxy_sync_proxy_rules_duration_seconds_count{job="kube-proxy"}`},
		{name: "full sync duration", expr: `kubeproxy_sync_full_proxy_rules_duration_seconds_count{job="kube-proxy"}`},
		{name: "last sync", expr: `kubeproxy_sync_proxy_rules_last_timestamp_seconds{job="kube-proxy"}`},
		{name: "network programming", expr: `kubeproxy_network_programming_duration_seconds_count{job="kube-proxy"}`},
		{name: "endpoint changes", expr: `kubeproxy_sync_proxy_rules_endpoint_changes_total{job="kube-proxy"}`},
		{name: "endpoint changes pending", expr: `kubeproxy_sync_proxy_rules_endpoint_changes_pending{job="kube-proxy"}`},
		{name: "service changes", expr: `kubeproxy_sync_proxy_rules_service_changes_total{job="kube-proxy"}`},
		{name: "service changes pending", expr: `kubeproxy_sync_proxy_rules_service_changes_pending{job="kube-proxy"}`},
		{name: "healthz", expr: `sum by (instance, code) (kubeproxy_proxy_healthz_total{job="kube-proxy", code="200"})`,
			labels: map[string]string{"code": "200"}},
		{name: "API requests", expr: `sum by (instance, code, method, host) (rest_client_requests_total{job="kube-proxy", code="200", method="GET"})`,
			labels: map[string]string{"code": "200", "method": "GET", "host": "*"}},
		{name: "API request duration", expr: `sum by (instance, verb, host) (rest_client_request_duration_seconds_count{job="kube-proxy", verb="GET"})`,
			labels: map[string]string{"verb": "GET", "host": "*"}},
		{name: "syncs", expr: `kube_bpf_proxy_syncs_total{job="kube-proxy", kind="full"}`, labels: map[string]string{"kind": "full"}},
		{name: "services", expr: `kube_bpf_proxy_services{job="kube-proxy"}`},
		{name: "process", expr: `process_cpu_seconds_total{job="kube-proxy"}`},
		{name: "go", expr: `go_goroutines{job="kube-proxy"}`},
	}
	if mode == "ebpf" {
		for _, m := range []string{"services", "slots", "backends", "revnat", "service_stats"} {
			checks = append(checks, seriesCheck{name: "map " + m,
				expr:   fmt.Sprintf(`kube_bpf_proxy_bpf_map_entries{job="kube-proxy", map=%q} / kube_bpf_proxy_bpf_map_capacity{job="kube-proxy", map=%q}`, m, m),
				labels: map[string]string{"map": m}})
		}
	} else {
		checks = append(checks,
			seriesCheck{name: "restore failures", expr: `kubeproxy_sync_proxy_rules_iptables_restore_failures_total{job="kube-proxy"}`},
			seriesCheck{name: "rules", expr: `sum by (instance) (kubeproxy_sync_proxy_rules_iptables_total{job="kube-proxy"})`})
	}
	return checks
}

// checkSeries requires c's expression to return one sample per node,
// with c's labels.
func (e *env) checkSeries(t *testing.T, api *localcluster.PrometheusAPI, c seriesCheck) {
	var s []localcluster.Sample
	var err error
	ok := eventually(10*time.Second, func() bool {
		s, err = api.Query(context.Background(), c.expr)
		return err == nil && slices.Equal(slices.Compact(instances(s)), []string{"node1", "node2"})
	})
	if err != nil {
		t.Fatalf("%s: %v", c.expr, err)
	}
	if !ok {
		t.Fatalf("%s: want series for instances node1 and node2, got %v", c.expr, s)
	}
	for _, x := range s {
		for k, v := range c.labels {
			if got := x.Labels[k]; got == "" || (v != "*" && got != v) {
				t.Errorf("%s: a series of %s has %s=%q, want %q (labels %v)", c.expr, x.Labels["instance"], k, got, v, x.Labels)
			}
		}
	}
}

// counterCheck is a sum that must rise by at least atLeast with the
// scenario's traffic and changes.
type counterCheck struct {
	name, expr string
	atLeast    float64
}

func counterChecks(ns, mode string) []counterCheck {
	port := func(metric, svc, port, proto string) string {
		return fmt.Sprintf(`sum(%s{job="kube-proxy", namespace=%q, service=%q, port=%q, protocol=%q}) or vector(0)`, metric, ns, svc, port, proto)
	}
	checks := []counterCheck{
		// The two Services and their endpoints are synced.
		{name: "syncs", expr: `sum(kubeproxy_sync_proxy_rules_duration_seconds_count{job="kube-proxy"})`, atLeast: 2},
		// The scenario's Services are IPv4: each node's IPv4 proxier
		// syncs them. Its IPv6 proxier has nothing to sync and only
		// its periodic sync moves its series, as kube-proxy's.
		{name: "last sync", expr: `min(kubeproxy_sync_proxy_rules_last_timestamp_seconds{job="kube-proxy", ip_family="IPv4"})`, atLeast: 0.001},
		{name: "partial syncs", expr: `sum(kube_bpf_proxy_syncs_total{job="kube-proxy", kind="partial"}) or vector(0)`, atLeast: 2},
		{name: "network programming", expr: `sum(kubeproxy_network_programming_duration_seconds_count{job="kube-proxy"}) or vector(0)`, atLeast: 2},
		{name: "service changes", expr: `sum(kubeproxy_sync_proxy_rules_service_changes_total{job="kube-proxy"}) or vector(0)`, atLeast: 2},
		{name: "endpoint changes", expr: `sum(kubeproxy_sync_proxy_rules_endpoint_changes_total{job="kube-proxy"}) or vector(0)`, atLeast: 2},
	}
	if mode == "ebpf" {
		// 20 from each node's client, per socket kind.
		checks = append(checks,
			counterCheck{name: "connections translated", expr: port("kube_bpf_proxy_service_connections_translated_total", "mon", "http", "TCP"), atLeast: 40},
			// One connect per client: the helper's connected socket
			// sends its 20 datagrams after one connect().
			counterCheck{name: "connected UDP translated", expr: port("kube_bpf_proxy_service_connections_translated_total", "mon", "dns", "UDP"), atLeast: 2},
			counterCheck{name: "datagrams translated", expr: port("kube_bpf_proxy_service_datagrams_translated_total", "mon", "dns", "UDP"), atLeast: 40},
			counterCheck{name: "reverse translations", expr: port("kube_bpf_proxy_service_reverse_translations_total", "mon", "dns", "UDP"), atLeast: 40},
			counterCheck{name: "TCP refused", expr: port("kube_bpf_proxy_service_refused_total", "mon-empty", "http", "TCP"), atLeast: 40},
			counterCheck{name: "UDP refused", expr: port("kube_bpf_proxy_service_refused_total", "mon-empty", "dns", "UDP"), atLeast: 40},
			counterCheck{name: "datapath events", expr: `sum(kube_bpf_proxy_datapath_events_total{job="kube-proxy"}) or vector(0)`, atLeast: 40},
		)
	}
	return checks
}

// value returns the single value of expr (an expression that always has
// one, through "or vector(0)").
func (e *env) value(t *testing.T, api *localcluster.PrometheusAPI, expr string) float64 {
	t.Helper()
	s, err := api.Query(context.Background(), expr)
	if err != nil {
		t.Fatal(err)
	}
	if len(s) != 1 {
		t.Fatalf("%s: want one sample, got %v", expr, s)
	}
	return s[0].Value
}

// createMonService creates a Service selecting app with a TCP port "http"
// (80 -> 80) and a UDP port "dns" (53 -> 5353), and returns its ClusterIP.
func (e *env) createMonService(t *testing.T, ns, app string) string {
	t.Helper()
	svc, err := e.c.Client.CoreV1().Services(ns).Create(context.Background(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: app},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": app},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP},
				{Name: "dns", Port: 53, TargetPort: intstr.FromInt32(5353), Protocol: corev1.ProtocolUDP},
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return svc.Spec.ClusterIP
}

type mixinPanel struct {
	title   string
	targets []string
}

// mixinPanels reads the kubernetes-mixin's proxy dashboard queries.
func mixinPanels(t *testing.T) []mixinPanel {
	t.Helper()
	f, err := os.Open("testdata/kubernetes-mixin-proxy.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var panels []mixinPanel
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "panel: "):
			panels = append(panels, mixinPanel{title: strings.TrimPrefix(l, "panel: ")})
		case len(panels) == 0:
			t.Fatalf("testdata/kubernetes-mixin-proxy.txt: a query before any panel: %s", l)
		default:
			panels[len(panels)-1].targets = append(panels[len(panels)-1].targets, l)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(panels) < 11 {
		t.Fatalf("testdata/kubernetes-mixin-proxy.txt: %d panels, want the dashboard's 11", len(panels))
	}
	return panels
}

// checkMixinPanel requires every target to run and the panel to show data
// (from at least one target: the API request rate panel has one target
// per status class, and no request answered 5xx).
func (e *env) checkMixinPanel(t *testing.T, api *localcluster.PrometheusAPI, p mixinPanel, window string) {
	shown := false
	for _, q := range p.targets {
		expr := strings.NewReplacer("$cluster", "", "$instance", ".+", "$__rate_interval", window).Replace(q)
		var s []localcluster.Sample
		var err error
		wait := 10 * time.Second
		if shown {
			wait = 0 // one target with data is enough
		}
		if eventually(wait, func() bool {
			s, err = api.Query(context.Background(), expr)
			return err == nil && len(s) > 0
		}) {
			shown = true
		}
		if err != nil {
			t.Errorf("%s: %v", expr, err)
		}
	}
	if !shown {
		t.Errorf("panel %q of the kubernetes-mixin proxy dashboard shows no data for job=\"kube-proxy\": %v", p.title, p.targets)
	}
}

// promtoolChecks runs promtool on the shipped rules and the cluster's
// Prometheus configuration (Debian's promtool, the version that runs), and
// on the shipped scrape configuration with an upstream promtool: Debian
// builds Prometheus without Kubernetes service discovery, which that file
// uses.
func (e *env) promtoolChecks(t *testing.T) {
	t.Helper()
	dir := filepath.Join(repoRoot, monitoring.Dir)
	run := func(bin string, args ...string) {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			t.Errorf("%s %s: %v\n%s", bin, strings.Join(args, " "), err, out)
		}
	}
	run("promtool", "check", "rules", filepath.Join(dir, monitoring.RulesFile))
	run("promtool", "check", "config", filepath.Join(e.c.Dir, "prometheus", "prometheus.yml"))
	upstream := os.Getenv("PROMTOOL_UPSTREAM")
	if upstream == "" {
		out, err := exec.Command(filepath.Join(repoRoot, "hack/promtool-build.sh")).Output()
		if err != nil {
			t.Errorf("hack/promtool-build.sh: %v", err)
			return
		}
		upstream = strings.TrimSpace(string(out))
	}
	run(upstream, "check", "config", filepath.Join(dir, "prometheus", "scrape-configs.yaml"))
}
