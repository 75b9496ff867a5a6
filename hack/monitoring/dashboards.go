// Package monitoring defines what Prometheus and Grafana users get: the
// alerting rules and the Grafana dashboards, written as typed Go (Grafana's
// foundation SDK) and rendered into manifests/monitoring by
// `go run ./hack/dashboards` (Render). Every PromQL expression is kept with
// the modes in which the end-to-end test's traffic feeds it, so that the
// test can require those to return data from a real Prometheus.
package monitoring

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/variants"
	"github.com/grafana/grafana-foundation-sdk/go/common"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/heatmap"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
	"github.com/grafana/grafana-foundation-sdk/go/stat"
	"github.com/grafana/grafana-foundation-sdk/go/table"
	"github.com/grafana/grafana-foundation-sdk/go/timeseries"
)

// Query is one PromQL expression of a dashboard panel.
type Query struct {
	Dashboard string // the dashboard's file name
	Panel     string
	Expr      string
	// FedIn lists the modes in which the end-to-end test's traffic gives
	// this expression data; empty when nothing there feeds it (errors that
	// do not happen, say).
	FedIn []string
}

// Variable is a template variable filled from label_values(Selector,
// Label).
type Variable struct {
	Name, Selector, Label string
}

// Dashboard is a rendered dashboard and its queries.
type Dashboard struct {
	File      string // file name under manifests/monitoring/dashboards
	Title     string
	JSON      []byte
	Queries   []Query
	Variables []Variable
}

// Template variables the expressions use. Grafana replaces them; a test
// evaluating the expressions replaces them as Substitute does.
const (
	// RateInterval is Grafana's $__rate_interval.
	RateInterval = "$__rate_interval"
	// Range is Grafana's $__range: the dashboard's whole time range.
	Range       = "$__range"
	modeVar     = "$mode"
	instanceVar = "$instance"
	protocolVar = "$protocol"
	familyVar   = "$ip_family"
)

// FamilyMatcher is in every selector of a series that carries (or may
// carry) an ip_family label: the family of the probe's ClusterIP, the
// family of one of the proxy's per-family proxiers. With the variable at
// All (".*") the panels add both families up; with one family selected they
// show it alone. The empty alternative keeps the series that have no
// ip_family label (counted over both families, or from a probe older than
// the label) whatever the selection: in PromQL a matcher that matches ""
// also matches a series without the label.
const FamilyMatcher = `ip_family=~"` + familyVar + `|"`

// Substitute replaces the dashboards' variables in expr as Grafana would
// with mode, every instance, protocol and IP family selected, and window as
// both the rate interval and the dashboard's range.
func Substitute(expr, mode, window string) string {
	r := []struct{ old, new string }{
		{RateInterval, window},
		{Range, window},
		{modeVar, mode},
		{instanceVar, ".+"},
		{protocolVar, ".+"},
		{familyVar, ".*"},
	}
	for _, x := range r {
		expr = strings.ReplaceAll(expr, x.old, x.new)
	}
	return expr
}

// Dashboards builds the dashboards.
func Dashboards() ([]Dashboard, error) {
	var out []Dashboard
	for _, f := range []func() (*board, *dashboard.DashboardBuilder){proxyDashboard, probeDashboard} {
		b, d := f()
		built, err := d.Build()
		if err != nil {
			return nil, fmt.Errorf("building dashboard %s: %w", b.file, err)
		}
		j, err := json.MarshalIndent(built, "", "  ")
		if err != nil {
			return nil, fmt.Errorf("rendering dashboard %s: %w", b.file, err)
		}
		out = append(out, Dashboard{File: b.file, Title: *built.Title, JSON: append(j, '\n'), Queries: b.queries, Variables: b.variables})
	}
	return out, nil
}

// board collects a dashboard's queries as its panels are made.
type board struct {
	file      string
	queries   []Query
	variables []Variable
}

// labelValues is a query variable reading label's values on the series of
// selector.
func (b *board) labelValues(name, label, selector string) *dashboard.QueryVariableBuilder {
	b.variables = append(b.variables, Variable{Name: name, Selector: selector, Label: label})
	return dashboard.NewQueryVariableBuilder(name).Datasource(datasource).
		Query(dashboard.StringOrMap{String: ptr(fmt.Sprintf("label_values(%s, %s)", selector, label))}).
		Refresh(dashboard.VariableRefreshOnTimeRangeChanged).Sort(dashboard.VariableSortAlphabeticalAsc).
		Multi(true).IncludeAll(true)
}

// target is one query of a panel.
type target struct {
	expr, legend string
	fedIn        []string
	// table: an instant query in table format, for table panels.
	table bool
	// heatmap: the buckets in heatmap format, for heatmap panels.
	heatmap bool
}

func t(expr, legend string, fedIn []string) target {
	return target{expr: expr, legend: legend, fedIn: fedIn}
}

func ptr[T any](v T) *T { return &v }

var datasource = common.DataSourceRef{Type: ptr("prometheus"), Uid: ptr("${datasource}")}

func (b *board) targets(panel string, ts []target) []cog.Builder[variants.Dataquery] {
	var out []cog.Builder[variants.Dataquery]
	for i, x := range ts {
		b.queries = append(b.queries, Query{Dashboard: b.file, Panel: panel, Expr: x.expr, FedIn: x.fedIn})
		q := prometheus.NewDataqueryBuilder().Datasource(datasource).Expr(x.expr).
			RefId(string(rune('A' + i)))
		if x.legend != "" {
			q = q.LegendFormat(x.legend)
		}
		switch {
		case x.table:
			q = q.Instant().Format(prometheus.PromQueryFormatTable)
		case x.heatmap:
			q = q.Format(prometheus.PromQueryFormatHeatmap)
		}
		out = append(out, q)
	}
	return out
}

func legend() *common.VizLegendOptionsBuilder {
	return common.NewVizLegendOptionsBuilder().ShowLegend(true).DisplayMode(common.LegendDisplayModeTable).
		Placement(common.LegendPlacementBottom).Calcs([]string{"mean", "max", "lastNotNull"})
}

func (b *board) timeseries(title, desc, unit string, span uint32, ts ...target) *timeseries.PanelBuilder {
	return b.signedTimeseries(title, desc, unit, span, ts...).Min(0)
}

// signedTimeseries is a time series panel whose axis goes below 0, for
// differences.
func (b *board) signedTimeseries(title, desc, unit string, span uint32, ts ...target) *timeseries.PanelBuilder {
	return timeseries.NewPanelBuilder().Title(title).Description(desc).Datasource(datasource).
		Unit(unit).Span(span).Height(8).Legend(legend()).Targets(b.targets(title, ts))
}

func (b *board) stat(title, desc, unit string, span uint32, ts ...target) *stat.PanelBuilder {
	return stat.NewPanelBuilder().Title(title).Description(desc).Datasource(datasource).
		Unit(unit).Span(span).Height(4).
		ReduceOptions(common.NewReduceDataOptionsBuilder().Calcs([]string{"lastNotNull"})).
		Targets(b.targets(title, ts))
}

func (b *board) modeVariable(selector string) *dashboard.QueryVariableBuilder {
	return b.labelValues("mode", "mode", selector).Label("Mode").
		Description("The proxy's datapath: ebpf or iptables. Select both to see them side by side.").
		AllValue(".*")
}

// familyVariable offers the IP families of selector's series. Its All is
// ".*", so that with it the queries add both families up.
func (b *board) familyVariable(selector string) *dashboard.QueryVariableBuilder {
	return b.labelValues("ip_family", "ip_family", selector).Label("IP family").
		Description("The IP family: IPv4, IPv6 (a dual-stack cluster has both). All adds them up; pick one to see it alone.").
		AllValue(".*").
		// All until the user picks: the panels add the families up.
		Current(dashboard.VariableOption{Selected: ptr(true),
			Text:  dashboard.StringOrArrayOfString{ArrayOfString: []string{"All"}},
			Value: dashboard.StringOrArrayOfString{ArrayOfString: []string{"$__all"}}})
}

func datasourceVariable() *dashboard.DatasourceVariableBuilder {
	return dashboard.NewDatasourceVariableBuilder("datasource").Label("Data source").Type("prometheus")
}

// byMode joins kube_bpf_proxy_info's mode label onto a series of the
// proxy's and keeps the selected modes.
const byMode = ` * on(instance) group_left(mode) kube_bpf_proxy_info{job="kube-proxy", mode=~"$mode"}`

// proxySel selects the proxy's series of the selected instances and IP
// families.
const proxySel = `job="kube-proxy", instance=~"$instance", ` + FamilyMatcher

func proxyDashboard() (*board, *dashboard.DashboardBuilder) {
	b := &board{file: "kube-bpf-proxy.json"}
	rate := func(metric string) string {
		return fmt.Sprintf(`rate(%s{%s}[%s])`, metric, proxySel, RateInterval)
	}
	quantile := func(q, metric, by string) string {
		return fmt.Sprintf(`histogram_quantile(%s, sum by (%s, le) (%s%s))`, q, by, rate(metric+"_bucket"), byMode)
	}
	topk := func(metric string) string {
		return fmt.Sprintf(`topk(10, sum by (namespace, service, port, protocol) (%s%s))`, rate(metric), byMode)
	}
	gauge := func(metric, by string) string {
		return fmt.Sprintf(`sum by (%s) (%s{%s}%s)`, by, metric, proxySel, byMode)
	}
	rateBy := func(metric, by string) string {
		return fmt.Sprintf(`sum by (%s) (%s%s)`, by, rate(metric), byMode)
	}

	d := dashboard.NewDashboardBuilder("kube-bpf-proxy").
		Uid("kube-bpf-proxy").
		Description("kube-bpf-proxy, the kube-proxy replacement: syncs, network programming latency, datapath counters, BPF map fill and failures, split by datapath mode and IP family.").
		Tags([]string{"kube-bpf-proxy", "kubernetes", "kube-proxy"}).
		Refresh("30s").Time("now-1h", "now").Tooltip(dashboard.DashboardCursorSyncCrosshair).
		WithVariable(datasourceVariable()).
		WithVariable(b.modeVariable(`kube_bpf_proxy_info{job="kube-proxy"}`)).
		WithVariable(b.labelValues("instance", "instance", `kube_bpf_proxy_info{job="kube-proxy", mode=~"$mode"}`).
			Label("Node").AllValue(".+")).
		// A series each proxier of a family exports from the start.
		WithVariable(b.familyVariable(`kubeproxy_sync_proxy_rules_last_timestamp_seconds{job="kube-proxy"}`))

	d = d.WithRow(dashboard.NewRowBuilder("Overview")).
		WithPanel(b.stat("Proxies up", "Proxies scraped successfully, by mode (kube_bpf_proxy_info is 1 for each running proxy).", "none", 6,
			t(`count by (mode) (kube_bpf_proxy_info{job="kube-proxy", mode=~"$mode"})`, "{{mode}}", bothModes))).
		WithPanel(b.stat("Targets down", "kube-proxy scrape targets that failed their last scrape (see the KubeBpfProxyDown alert).", "none", 6,
			t(`sum(1 - up{job="kube-proxy"})`, "down", bothModes))).
		WithPanel(b.stat("Service ports programmed", "Service ports in the datapath, summed over the selected nodes, by mode.", "none", 6,
			t(gauge("kube_bpf_proxy_services", "mode"), "{{mode}}", bothModes))).
		WithPanel(b.stat("Backends programmed", "Backends in the datapath, summed over the selected nodes, by mode.", "none", 6,
			t(gauge("kube_bpf_proxy_backends", "mode"), "{{mode}}", bothModes)))

	d = d.WithRow(dashboard.NewRowBuilder("Syncs and network programming")).
		WithPanel(b.timeseries("Sync rate", "Datapath sync attempts per second by node and kind: full (everything rewritten: the first, the periodic ones and those after a failure) or partial (changes only).", "ops", 12,
			t(rateBy("kube_bpf_proxy_syncs_total", "instance, mode, kind"), "{{instance}} {{mode}} {{kind}}", bothModes))).
		WithPanel(b.timeseries("Sync duration, 99th percentile", "Time one sync takes, by kind and mode (kube-proxy's histograms).", "s", 12,
			t(quantile("0.99", "kubeproxy_sync_full_proxy_rules_duration_seconds", "mode"), "full {{mode}}", bothModes),
			t(quantile("0.99", "kubeproxy_sync_partial_proxy_rules_duration_seconds", "mode"), "partial {{mode}}", bothModes),
			t(quantile("0.99", "kubeproxy_sync_proxy_rules_duration_seconds", "instance, mode"), "all {{instance}} {{mode}}", bothModes))).
		WithPanel(b.timeseries("Network programming latency", "From a Service or EndpointSlice change (its last-change-trigger-time) until the datapath serves it, by mode: the Kubernetes network programming latency SLI.", "s", 12,
			t(quantile("0.5", "kubeproxy_network_programming_duration_seconds", "mode"), "p50 {{mode}}", bothModes),
			t(quantile("0.9", "kubeproxy_network_programming_duration_seconds", "mode"), "p90 {{mode}}", bothModes),
			t(quantile("0.99", "kubeproxy_network_programming_duration_seconds", "mode"), "p99 {{mode}}", bothModes))).
		WithPanel(b.timeseries("Pending changes and time since the last sync", "Endpoint and Service changes waiting for a sync, and seconds since the last successful sync, by node.", "none", 12,
			t(gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "instance, mode"), "endpoint changes pending {{instance}}", bothModes),
			t(gauge("kubeproxy_sync_proxy_rules_service_changes_pending", "instance, mode"), "service changes pending {{instance}}", bothModes),
			t(`time() - max by (instance, mode) (kubeproxy_sync_proxy_rules_last_timestamp_seconds{`+proxySel+`}`+byMode+`)`, "seconds since last sync {{instance}}", bothModes)))

	d = d.WithRow(dashboard.NewRowBuilder("Datapath")).
		WithPanel(b.timeseries("Connections translated, top 10 Service ports", "TCP and connected UDP connect() calls to a Service address that the eBPF programs sent to a backend, per second (ebpf mode).", "ops", 12,
			t(topk("kube_bpf_proxy_service_connections_translated_total"), "{{namespace}}/{{service}}:{{port}}/{{protocol}}", ebpfOnly))).
		WithPanel(b.timeseries("Datagrams translated, top 10 Service ports", "Unconnected UDP datagrams (sendmsg) to a Service address sent to a backend, per second (ebpf mode).", "pps", 12,
			t(topk("kube_bpf_proxy_service_datagrams_translated_total"), "{{namespace}}/{{service}}:{{port}}/{{protocol}}", ebpfOnly))).
		WithPanel(b.timeseries("Refused for want of a backend, top 10 Service ports", "connect() and sendmsg() calls to a Service with no ready endpoint, refused at once with ECONNREFUSED, per second (ebpf mode).", "ops", 12,
			t(topk("kube_bpf_proxy_service_refused_total"), "{{namespace}}/{{service}}:{{port}}/{{protocol}}", ebpfOnly))).
		WithPanel(b.timeseries("Reverse translations, top 10 Service ports", "Replies and peer names shown as the Service address (recvmsg, getpeername), per second (ebpf mode).", "ops", 12,
			t(topk("kube_bpf_proxy_service_reverse_translations_total"), "{{namespace}}/{{service}}:{{port}}/{{protocol}}", ebpfOnly))).
		WithPanel(b.timeseries("Datapath events", "Events the datapath counts, per second, by mode and event (ebpf: translations, refusals, sockets destroyed...; iptables: restores, conntrack entries deleted...).", "ops", 24,
			t(rateBy("kube_bpf_proxy_datapath_events_total", "mode, event"), "{{mode}} {{event}}", bothModes)))

	mapSel := func(metric string) string { return fmt.Sprintf(`%s{%s}`, metric, proxySel) }
	d = d.WithRow(dashboard.NewRowBuilder("BPF maps")).
		WithPanel(b.timeseries("BPF map fill", "Entries in use over capacity, per map, on the fullest selected node; the IPv6 maps are ipv6_services, ..., sized by the same flags. At 100 % new Service ports or backends are not programmed: raise --bpf-frontends-max (services), --bpf-service-ports-max (service_stats, cluster_ips) or --bpf-backend-slots-max (backends, slots, affinity_match). revnat holds the open translated sockets: at 100 % replies to new ones show the pod address (--bpf-sock-revnat-max). affinity evicts its least recently used entries (--bpf-affinity-max).", "percentunit", 12,
			t(`max by (map) ((`+mapSel("kube_bpf_proxy_bpf_map_entries")+` / `+mapSel("kube_bpf_proxy_bpf_map_capacity")+`)`+byMode+`)`, "{{map}}", ebpfOnly)).
			Max(1)).
		WithPanel(b.timeseries("BPF map entries and capacity", "Entries in use and capacity per map and node.", "none", 12,
			t(`max by (instance, map) (`+mapSel("kube_bpf_proxy_bpf_map_entries")+byMode+`)`, "{{instance}} {{map}} entries", ebpfOnly),
			t(`max by (instance, map) (`+mapSel("kube_bpf_proxy_bpf_map_capacity")+byMode+`)`, "{{instance}} {{map}} capacity", ebpfOnly)))

	d = d.WithRow(dashboard.NewRowBuilder("Failures")).
		WithPanel(b.timeseries("Sync failures", "Failed sync attempts per second, by node and kind. A failure makes the next sync a full one; each is logged with its cause.", "ops", 8,
			t(rateBy("kube_bpf_proxy_sync_failures_total", "instance, mode, kind"), "{{instance}} {{mode}} {{kind}}", bothModes))).
		WithPanel(b.timeseries("Service ports not programmed", "Service ports the datapath could not program and retries, by node and reason (map-full: raise the --bpf-*-max flag the Service's Warning Event names).", "none", 8,
			t(gauge("kube_bpf_proxy_service_ports_not_programmed", "instance, reason"), "{{instance}} {{reason}}", bothModes))).
		WithPanel(b.timeseries("Service port failures", "Failed attempts to program one Service port, per second, by reason; each failed retry counts.", "ops", 8,
			t(rateBy("kube_bpf_proxy_service_port_failures_total", "instance, reason"), "{{instance}} {{reason}}", bothModes))).
		WithPanel(b.timeseries("Skipped objects", "Services and EndpointSlices (or parts of them) left out as malformed, by resource and reason, over the interval.", "none", 12,
			t(fmt.Sprintf(`sum by (resource, reason) (increase(kube_bpf_proxy_skipped_objects_total{%s}[%s])%s)`, proxySel, RateInterval, byMode), "{{resource}} {{reason}}", nil))).
		WithPanel(b.timeseries("iptables restore failures", "iptables-restore runs that failed, whole and partial, per second (iptables mode).", "ops", 12,
			t(rateBy("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", "instance, mode"), "{{instance}} restore", []string{"iptables"}),
			t(rateBy("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", "instance, mode"), "{{instance}} partial restore", []string{"iptables"})))

	d = d.WithRow(dashboard.NewRowBuilder("API server and health checks")).
		WithPanel(b.timeseries("API requests", "The proxy's requests to the API server per second, by status code (client-go).", "ops", 12,
			t(rateBy("rest_client_requests_total", "mode, code"), "{{mode}} {{code}}", bothModes))).
		WithPanel(b.timeseries("Health checks", "/healthz and /livez answers per second, by code: 503 on /healthz means the datapath is falling behind (load balancers drain the node); on /livez, that the sync loop is stuck (the kubelet restarts the pod).", "ops", 12,
			t(rateBy("kubeproxy_proxy_healthz_total", "instance, code"), "{{instance}} healthz {{code}}", bothModes),
			t(rateBy("kubeproxy_proxy_livez_total", "instance, code"), "{{instance}} livez {{code}}", nil)))
	return b, d
}

// abWindow is the A/B panels' window: their rates and the steps of their
// subqueries, so that two steps share no sample (four scrapes at the
// manifests' 15 s).
const abWindow = "1m"

// abDifference is the A/B's difference ebpf − iptables of histogram h's
// mean (docs/ab-testing.md), per by (a label, or "" for none): the mean
// over the nodes in each mode of each node's mean, so that every node
// weighs the same, however many requests it sent. withProtocol selects the
// dashboard's $protocol.
func abDifference(h, by string, withProtocol bool) string {
	mean := func(mode string) string {
		hsel := fmt.Sprintf(`job="kube-bpf-proxy-probe", mode=%q, %s`, mode, FamilyMatcher)
		if withProtocol {
			hsel += `, protocol=~"$protocol"`
		}
		perNode, avg := "client_node", "avg"
		if by != "" {
			perNode += ", " + by
			avg = "avg by (" + by + ")"
		}
		return fmt.Sprintf(`%s (sum by (%s) (rate(%s_sum{%s}[%s])) / sum by (%s) (rate(%s_count{%s}[%s])))`,
			avg, perNode, h, hsel, abWindow, perNode, h, hsel, abWindow)
	}
	on := ""
	if by != "" {
		on = " on(" + by + ")"
	}
	return fmt.Sprintf(`(%s) -%s (%s)`, mean("ebpf"), on, mean("iptables"))
}

// probeSel selects the probe's series of the selected modes, protocols and
// IP families; tcpPhaseSel the connect and first-byte histograms, which are
// TCP's only and carry no protocol label.
const (
	probeSel    = `job="kube-bpf-proxy-probe", mode=~"$mode", protocol=~"$protocol", ` + FamilyMatcher
	tcpPhaseSel = `job="kube-bpf-proxy-probe", mode=~"$mode", ` + FamilyMatcher
)

func probeDashboard() (*board, *dashboard.DashboardBuilder) {
	b := &board{file: "kube-bpf-proxy-probe.json"}
	rate := func(metric, sel string) string {
		return fmt.Sprintf(`rate(%s{%s}[%s])`, metric, sel, RateInterval)
	}
	// mean is sum over count of a histogram, by the given labels.
	sel := func(h string) string {
		if h == "kube_bpf_proxy_probe_connect_seconds" || h == "kube_bpf_proxy_probe_first_byte_seconds" {
			return tcpPhaseSel
		}
		return probeSel
	}
	mean := func(h, by string) string {
		return fmt.Sprintf(`sum by (%s) (%s) / sum by (%s) (%s)`, by, rate(h+"_sum", sel(h)), by, rate(h+"_count", sel(h)))
	}
	quantile := func(q, h, by string) string {
		return fmt.Sprintf(`histogram_quantile(%s, sum by (%s, le) (%s))`, q, by, rate(h+"_bucket", sel(h)))
	}
	const rt = "kube_bpf_proxy_probe_round_trip_seconds"
	// The variance is E[x²] - E[x]², both from counters (the squared sum
	// is a counter of the probe's own), clamped at 0 against rounding.
	stddev := fmt.Sprintf(`sqrt(clamp_min(sum by (mode) (%s) / sum by (mode) (%s) - (%s) ^ 2, 0))`,
		rate("kube_bpf_proxy_probe_round_trip_squared_seconds_total", probeSel), rate(rt+"_count", probeSel), mean(rt, "mode"))
	errSel := probeSel

	d := dashboard.NewDashboardBuilder("kube-bpf-proxy probe").
		Uid("kube-bpf-proxy-probe").
		Description("Round trips through a ClusterIP measured by the kube-bpf-proxy latency probe: a client pod on every node, server pods behind a Service; each request is a new connection through the Service datapath. A dual-stack Service is probed on both of its ClusterIPs: the IP family variable picks one, All adds them up.").
		Tags([]string{"kube-bpf-proxy", "kubernetes", "latency"}).
		Refresh("30s").Time("now-1h", "now").Tooltip(dashboard.DashboardCursorSyncCrosshair).
		WithVariable(datasourceVariable()).
		WithVariable(b.modeVariable(`kube_bpf_proxy_probe_round_trip_seconds_count{job="kube-bpf-proxy-probe"}`)).
		WithVariable(b.labelValues("protocol", "protocol", `kube_bpf_proxy_probe_round_trip_seconds_count{job="kube-bpf-proxy-probe"}`).
			Label("Protocol").AllValue(".+")).
		WithVariable(b.familyVariable(`kube_bpf_proxy_probe_round_trip_seconds_count{job="kube-bpf-proxy-probe"}`))

	d = d.WithRow(dashboard.NewRowBuilder("Round trip")).
		WithPanel(b.timeseries("Round trip, mean", "Mean time of one request through the ClusterIP (new connection, request, whole answer), by mode: rate of the histogram's sum over rate of its count.", "s", 12,
			t(mean(rt, "mode"), "{{mode}}", bothModes))).
		WithPanel(b.timeseries("Round trip, standard deviation", "Standard deviation of the round trip by mode, exact: from the rates of the sum of squares, the sum and the count.", "s", 12,
			t(stddev, "{{mode}}", bothModes))).
		WithPanel(b.timeseries("Round trip, percentiles", "50th and 99th percentiles of the round trip by mode, from the histogram's buckets.", "s", 12,
			t(quantile("0.5", rt, "mode"), "p50 {{mode}}", bothModes),
			t(quantile("0.99", rt, "mode"), "p99 {{mode}}", bothModes))).
		WithPanel(b.timeseries("Requests", "Probe requests per second, by mode, protocol and IP family (of the ClusterIP: a dual-stack Service is probed on both).", "reqps", 12,
			t(fmt.Sprintf(`sum by (mode, protocol, ip_family) (%s)`, rate(rt+"_count", probeSel)), "{{mode}} {{protocol}} {{ip_family}}", bothModes))).
		WithPanel(b.timeseries("Round trip by IP family, mean", "Mean round trip by mode and IP family: IPv4 and IPv6 side by side on a dual-stack cluster.", "s", 24,
			t(mean(rt, "mode, ip_family"), "{{mode}} {{ip_family}}", bothModes)))

	// The A/B (docs/ab-testing.md): half the nodes in each mode at the
	// same time, swapped halfway. At each moment the difference holds no
	// time effect; the node groups' own difference enters it with one
	// sign before the swap and the other after, and cancels over a range
	// covering both halves equally.
	abDiff := func(h, by string) string { return abDifference(h, by, h == rt) }
	const conn = "kube_bpf_proxy_probe_connect_seconds"
	// Over the range: the mean of the differences at abWindow steps (no
	// overlap between two steps' rates), and the half-width of its 95 %
	// interval, 1.96·sd/√n.
	overRange := func(diff string) (mean, half string) {
		sub := fmt.Sprintf(`(%s)[%s:%s]`, diff, Range, abWindow)
		return fmt.Sprintf(`avg_over_time(%s)`, sub),
			fmt.Sprintf(`1.96 * stddev_over_time(%s) / sqrt(count_over_time(%s))`, sub, sub)
	}
	rtMean, rtHalf := overRange(abDiff(rt, "protocol"))
	connMean, connHalf := overRange(abDiff(conn, ""))
	d = d.WithRow(dashboard.NewRowBuilder("A/B: ebpf − iptables, nodes in both modes at once")).
		WithPanel(b.timeseries("Mean round trip by client node and mode", "Each client node's mean round trip, labelled with its node's mode: during an A/B half the nodes run each mode, and the lines change mode when the nodes swap (docs/ab-testing.md).", "s", 12,
			t(mean(rt, "client_node, mode, protocol"), "{{client_node}} {{mode}} {{protocol}}", bothModes))).
		WithPanel(b.signedTimeseries("Difference ebpf − iptables, mean", "Mean over the ebpf nodes minus mean over the iptables nodes, measured at the same time ("+abWindow+" windows). Below 0: ebpf faster. Before the swap this holds the node groups' own difference with one sign, after it with the other: read the average over both halves (next panel).", "s", 12,
			t(abDiff(rt, "protocol"), "{{protocol}} round trip", nil),
			t(abDiff(conn, ""), "tcp connect", nil))).
		WithPanel(b.stat("Round trip ebpf − iptables over the range", "Mean of the "+abWindow+" differences over the dashboard's range. Set the range to cover both halves of the A/B equally, so that the node groups' difference cancels.", "s", 6,
			t(rtMean, "{{protocol}}", nil))).
		WithPanel(b.stat("± 95 % interval, round trip", "Half-width of the 95 % interval of the mean difference: 1.96·sd/√n over the "+abWindow+" differences in the range. 0 within mean ± this: no difference measured. Conservative with both halves pooled (the node effect adds to the spread); docs/ab-testing.md computes it per half.", "s", 6,
			t(rtHalf, "{{protocol}}", nil))).
		WithPanel(b.stat("Connect ebpf − iptables over the range", "As the round trip's, for the TCP connect() through the ClusterIP.", "s", 6,
			t(connMean, "tcp connect", nil))).
		WithPanel(b.stat("± 95 % interval, connect", "Half-width of the 95 % interval of the connect's mean difference.", "s", 6,
			t(connHalf, "tcp connect", nil)))

	d = d.WithRow(dashboard.NewRowBuilder("Connect and first byte")).
		WithPanel(b.timeseries("Connect", "Time of connect() through the ClusterIP, mean and 99th percentile by mode: in ebpf mode the backend is chosen in this call.", "s", 12,
			t(mean("kube_bpf_proxy_probe_connect_seconds", "mode"), "mean {{mode}}", bothModes),
			t(quantile("0.99", "kube_bpf_proxy_probe_connect_seconds", "mode"), "p99 {{mode}}", bothModes))).
		WithPanel(b.timeseries("First byte", "Time from sending the request to the first byte of the answer, mean and 99th percentile by mode.", "s", 12,
			t(mean("kube_bpf_proxy_probe_first_byte_seconds", "mode"), "mean {{mode}}", bothModes),
			t(quantile("0.99", "kube_bpf_proxy_probe_first_byte_seconds", "mode"), "p99 {{mode}}", bothModes)))

	d = d.WithRow(dashboard.NewRowBuilder("Distribution and node pairs, per mode")).
		WithPanel(heatmap.NewPanelBuilder().Title("Round trip distribution ($mode)").
			Description("Round trips per bucket over time, one panel per selected mode.").
			Datasource(datasource).Span(24).Height(10).Repeat("mode").
			Calculate(false).Unit("s").
			Targets(b.targets("Round trip distribution ($mode)", []target{{
				expr:   fmt.Sprintf(`sum by (le) (increase(%s_bucket{%s}[%s]))`, rt, probeSel, RateInterval),
				legend: "{{le}}", fedIn: bothModes, heatmap: true,
			}}))).
		WithPanel(table.NewPanelBuilder().Title("Mean round trip, client node x server node ($mode)").
			Description("Mean round trip over the dashboard's time range for each pair of client node (rows) and server node (columns), one table per selected mode.").
			Datasource(datasource).Span(24).Height(8).Repeat("mode").Unit("s").
			WithTransformation(dashboard.DataTransformerConfig{Id: "groupingToMatrix", Options: map[string]any{
				"rowField": "client_node", "columnField": "server_node", "valueField": "Value",
			}}).
			Targets(b.targets("Mean round trip, client node x server node ($mode)", []target{{
				expr: fmt.Sprintf(`sum by (client_node, server_node) (increase(%s_sum{%s}[%s])) / sum by (client_node, server_node) (increase(%s_count{%s}[%s]))`,
					rt, probeSel, Range, rt, probeSel, Range),
				fedIn: bothModes, table: true,
			}})))

	d = d.WithRow(dashboard.NewRowBuilder("Errors")).
		WithPanel(b.timeseries("Errors by kind", "Failed probe requests per second by mode, client node and kind: refused (no backend), timeout, reset, other.", "reqps", 12,
			t(fmt.Sprintf(`sum by (mode, client_node, kind) (%s)`, rate("kube_bpf_proxy_probe_errors_total", errSel)), "{{mode}} {{client_node}} {{kind}}", nil))).
		WithPanel(b.timeseries("Error ratio", "Failed requests over all requests, by mode (the KubeBpfProxyProbeErrors alert fires above 1 % on a node).", "percentunit", 12,
			t(fmt.Sprintf(`sum by (mode) (%s) / (sum by (mode) (%s) + sum by (mode) (%s))`,
				rate("kube_bpf_proxy_probe_errors_total", errSel), rate(rt+"_count", probeSel), rate("kube_bpf_proxy_probe_errors_total", errSel)), "{{mode}}", nil))).
		WithPanel(b.timeseries("Server requests", "Requests the probe servers answered per second, by server node and protocol.", "reqps", 24,
			t(fmt.Sprintf(`sum by (node, protocol) (rate(kube_bpf_proxy_probe_server_requests_total{job="kube-bpf-proxy-probe", %s}[%s]))`, FamilyMatcher, RateInterval), "{{node}} {{protocol}}", bothModes)))
	return b, d
}
