package monitoring

import (
	"sigs.k8s.io/yaml"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
)

// Job names of the scrape configurations: the proxy keeps kube-proxy's, so
// kube-proxy's dashboards and alerts (kubernetes-mixin selects
// job="kube-proxy") read it unchanged.
const (
	ProxyJob = "kube-proxy"
	ProbeJob = "kube-bpf-proxy-probe"
)

// Alert is one alerting rule. Expr is Signal compared with Threshold, so
// that a test can evaluate Signal alone and see that it returns data where
// the test's traffic feeds it, while the alert itself (rightly) stays
// silent.
type Alert struct {
	Name string
	// Signal is the watched quantity, one series per thing to page about.
	Signal string
	// Condition follows Signal: "> 0.9", "== 0".
	Condition string
	For       string
	Severity  string
	Summary   string
	// Description tells the operator what happened and what to do; it may
	// use the alert's labels ({{ $labels.instance }}) and {{ $value }}.
	Description string
	// FedIn lists the modes in which the end-to-end test's traffic gives
	// Signal data.
	FedIn []string
}

// Expr is the rule's expression.
func (a Alert) Expr() string { return a.Signal + " " + a.Condition }

// Modes in which an expression has data in the end-to-end test.
var (
	bothModes = []string{"ebpf", "iptables"}
	ebpfOnly  = []string{"ebpf"}
)

// Alerts are the shipped alerting rules, in file order.
func Alerts() []Alert {
	proxy := `job="` + ProxyJob + `"`
	probe := `job="` + ProbeJob + `"`
	return []Alert{
		{
			Name:      "KubeBpfProxyDown",
			Signal:    `up{` + proxy + `}`,
			Condition: "== 0",
			For:       "5m",
			Severity:  "critical",
			Summary:   "kube-bpf-proxy cannot be scraped.",
			Description: "Prometheus has not scraped kube-bpf-proxy on {{ $labels.instance }} for 5 minutes. The node's datapath keeps serving what was last programmed, " +
				"but Service and endpoint changes are not applied there while the proxy is down. " +
				"Check the pod (kubectl -n kube-system get pods -l k8s-app=kube-bpf-proxy -o wide --field-selector spec.nodeName={{ $labels.instance }}), its logs and restarts, " +
				"and that port 10249 of the node is reachable from Prometheus.",
			FedIn: bothModes,
		},
		{
			Name:      "KubeBpfProxySyncsFailing",
			Signal:    `sum by (instance) (increase(kube_bpf_proxy_sync_failures_total{` + proxy + `}[10m]))`,
			Condition: "> 0",
			For:       "15m",
			Severity:  "warning",
			Summary:   "kube-bpf-proxy keeps failing to sync its datapath.",
			Description: "kube-bpf-proxy on {{ $labels.instance }} failed {{ $value | humanize }} datapath syncs in the last 10 minutes, for 15 minutes: Service and endpoint changes are not reaching the node. " +
				"Each failure is logged with its cause (kubectl -n kube-system logs on that node's kube-bpf-proxy pod); common ones are iptables-restore errors (iptables mode: " +
				"another program holding the xtables lock, raise --iptables-lock-wait) and BPF map writes refused by the kernel (ebpf mode: memory).",
			FedIn: bothModes,
		},
		{
			Name:      "KubeBpfProxyServicePortsNotProgrammed",
			Signal:    `sum by (instance, reason) (kube_bpf_proxy_service_ports_not_programmed{` + proxy + `})`,
			Condition: "> 0",
			For:       "10m",
			Severity:  "warning",
			Summary:   "Some Service ports are not programmed by kube-bpf-proxy.",
			Description: "{{ $value }} Service ports are not programmed on {{ $labels.instance }} (reason {{ $labels.reason }}); every other Service is served and these are retried. " +
				"The Services concerned carry a Warning Event (kubectl get events -A --field-selector reason=ServicePortNotProgrammed) that names them and the cause. " +
				"reason=map-full: a BPF map is too small, raise the flag the Event names (--" + ebpf.FlagMaxFrontends + ", --" + ebpf.FlagMaxServices + " or --" + ebpf.FlagMaxBackends + ") (see KubeBpfProxyBPFMapNearlyFull). " +
				"reason=write-failed: the kernel refused a write; check the proxy's log and the node's memory.",
			FedIn: bothModes,
		},
		{
			// Every map, of both families (the IPv6 ones are
			// labelled ipv6_services, ...: $map is the name without
			// the prefix, the same flag sizes both). revnat holds
			// open sockets only (each entry goes with its socket),
			// so a full one means that many open translated
			// sockets, and the next show the pod address; affinity
			// is an LRU map, which evicts instead of refusing.
			Name: "KubeBpfProxyBPFMapNearlyFull",
			Signal: `max by (instance, map) (kube_bpf_proxy_bpf_map_entries{` + proxy + `}` +
				` / kube_bpf_proxy_bpf_map_capacity{` + proxy + `})`,
			Condition: "> 0.9",
			For:       "15m",
			Severity:  "warning",
			Summary:   "A BPF map of kube-bpf-proxy is more than 90 % full.",
			Description: `{{ $map := reReplaceAll "^ipv6_" "" $labels.map }}` +
				"The {{ $labels.map }} map of kube-bpf-proxy on {{ $labels.instance }} is {{ $value | humanizePercentage }} full. " +
				`{{ if eq $map "revnat" }}` +
				"It holds an entry per open socket the programs translated, each gone with its socket; once it is full, replies to newly translated sockets and their peer names show the pod address " +
				"(kube_bpf_proxy_datapath_events_total{event=\"reverse_entry_update_failed\"} rises). Raise --" + ebpf.FlagMaxRevNAT +
				`{{ else if eq $map "affinity" }}` +
				"It holds the backend chosen for each client of a Service with sessionAffinity: ClientIP; once it is full, the least recently used choices are evicted, " +
				"and those clients may move to another backend before their affinity timeout. Raise --" + ebpf.FlagMaxAffinity +
				`{{ else }}` +
				"Once it is full, new Service ports or backends are not programmed (kube_bpf_proxy_service_ports_not_programmed{reason=\"map-full\"} rises and the Service gets a Warning Event) " +
				"while everything already programmed keeps serving. Raise --" +
				`{{ if eq $map "services" }}` + ebpf.FlagMaxFrontends +
				`{{ else if or (eq $map "service_stats") (eq $map "cluster_ips") }}` + ebpf.FlagMaxServices +
				`{{ else }}` + ebpf.FlagMaxBackends + `{{ end }}` +
				`{{ end }}` +
				" in the DaemonSet's args (on restart the proxy copies its maps into ones of the new size while the old ones keep serving)" +
				`{{ if and (ne $map "revnat") (ne $map "affinity") }}, or remove unused Services{{ end }}.`,
			FedIn: ebpfOnly,
		},
		{
			Name: "KubeBpfProxyNetworkProgrammingSlow",
			Signal: `histogram_quantile(0.99, sum by (instance, le) (rate(kubeproxy_network_programming_duration_seconds_bucket{` + proxy +
				`}[10m])))`,
			Condition: "> 30",
			For:       "15m",
			Severity:  "warning",
			Summary:   "Endpoint changes take long to reach the datapath.",
			Description: "On {{ $labels.instance }}, 99 % of Service and endpoint changes took up to {{ $value | humanizeDuration }} from the change (the EndpointSlice's last-change-trigger-time) " +
				"until the datapath served them, above the 30 s of the Kubernetes network programming latency SLO. " +
				"Look at the sync duration (kubeproxy_sync_proxy_rules_duration_seconds) and failures on that node: in iptables mode large rule sets sync slowly (consider --mode=ebpf, " +
				"or a larger --min-sync-period to batch changes); a slow or overloaded API server or kube-controller-manager also delays the EndpointSlices.",
			FedIn: bothModes,
		},
		{
			Name: "KubeBpfProxyProbeErrors",
			// Per IP family: on a dual-stack cluster one family failing
			// alone is not diluted by the other's successes, and the
			// alert names it.
			Signal: `sum by (client_node, mode, ip_family) (rate(kube_bpf_proxy_probe_errors_total{` + probe + `}[5m]))` +
				` / (sum by (client_node, mode, ip_family) (rate(kube_bpf_proxy_probe_round_trip_seconds_count{` + probe + `}[5m]))` +
				` + sum by (client_node, mode, ip_family) (rate(kube_bpf_proxy_probe_errors_total{` + probe + `}[5m])))`,
			Condition: "> 0.01",
			For:       "10m",
			Severity:  "warning",
			Summary:   "Requests through a ClusterIP fail on a node.",
			Description: "{{ $value | humanizePercentage }} of the latency probe's requests through the probe Service's {{ $labels.ip_family }} ClusterIP fail on node {{ $labels.client_node }} ({{ $labels.mode }} mode). " +
				"See the errors by kind (kube_bpf_proxy_probe_errors_total): refused means the node's proxy has no backend for the Service (check the probe server pods and kube-bpf-proxy on that node), " +
				"timeout or reset point at the network between the nodes or an overloaded server. " +
				"If one IP family fails alone, look at that family's datapath on the node (its proxier, its iptables or ip6tables rules) and at the pods' addresses of that family.",
			// Errors are counted only when they happen.
		},
	}
}

// RuleGroupName is the rule group of the shipped rules.
const RuleGroupName = "kube-bpf-proxy"

type rule struct {
	Alert       string            `json:"alert"`
	Expr        string            `json:"expr"`
	For         string            `json:"for,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type ruleGroup struct {
	Name  string `json:"name"`
	Rules []rule `json:"rules"`
}

func ruleGroups() []ruleGroup {
	g := ruleGroup{Name: RuleGroupName}
	for _, a := range Alerts() {
		g.Rules = append(g.Rules, rule{
			Alert: a.Name, Expr: a.Expr(), For: a.For,
			Labels:      map[string]string{"severity": a.Severity},
			Annotations: map[string]string{"summary": a.Summary, "description": a.Description},
		})
	}
	return []ruleGroup{g}
}

const generatedNote = "# Generated by `go run ./hack/dashboards` from hack/monitoring; do not edit.\n"

// rulesFile renders the plain Prometheus rules file (rule_files:).
func rulesFile() ([]byte, error) {
	b, err := yaml.Marshal(map[string]any{"groups": ruleGroups()})
	if err != nil {
		return nil, err
	}
	return append([]byte(generatedNote), b...), nil
}

// prometheusRule renders the same rules as a prometheus-operator
// PrometheusRule.
func prometheusRule() ([]byte, error) {
	obj := map[string]any{
		"apiVersion": "monitoring.coreos.com/v1",
		"kind":       "PrometheusRule",
		"metadata": map[string]any{
			"name":      "kube-bpf-proxy",
			"namespace": "kube-system",
			"labels":    map[string]string{"app.kubernetes.io/name": "kube-bpf-proxy"},
		},
		"spec": map[string]any{"groups": ruleGroups()},
	}
	b, err := yaml.Marshal(obj)
	if err != nil {
		return nil, err
	}
	return append([]byte(generatedNote), b...), nil
}
