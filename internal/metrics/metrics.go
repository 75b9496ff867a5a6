// Package metrics defines the proxy's Prometheus metrics.
//
// Everything is registered on a registry the caller passes in; nothing uses
// the default registry. The kubeproxy_* metrics keep kube-proxy's names,
// types and buckets so that existing dashboards and alerts work unchanged;
// the kube_bpf_proxy_* metrics are this proxy's own.
package metrics

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/httpserve"
)

// Values of the kind label of the sync metrics.
const (
	// SyncKindFull is a sync that rewrites the whole datapath state (the
	// first one, and the one after a failed apply).
	SyncKindFull = "full"
	// SyncKindPartial is a sync that writes only what changed.
	SyncKindPartial = "partial"
)

// Metrics holds the proxy's collectors. The fields may be used directly; the
// Record methods cover the common cases.
type Metrics struct {
	// SyncProxyRulesDuration observes how long each sync took, failed or
	// not.
	SyncProxyRulesDuration prometheus.Histogram
	// SyncFullProxyRulesDuration and SyncPartialProxyRulesDuration split
	// SyncProxyRulesDuration by kind, as kube-proxy does: the two kinds cost
	// orders of magnitude apart, in the iptables mode above all.
	SyncFullProxyRulesDuration    prometheus.Histogram
	SyncPartialProxyRulesDuration prometheus.Histogram
	// IptablesRules is the number of rules per table after the last
	// iptables sync, unchanged ones included (iptables mode only).
	IptablesRules *prometheus.GaugeVec
	// SyncProxyRulesLastTimestamp is the Unix time of the last successful
	// sync.
	SyncProxyRulesLastTimestamp prometheus.Gauge
	// SyncProxyRulesLastQueuedTimestamp is the Unix time of the last change
	// queued for a sync.
	SyncProxyRulesLastQueuedTimestamp prometheus.Gauge

	// SyncsTotal counts sync attempts by kind (SyncKindFull, SyncKindPartial).
	SyncsTotal *prometheus.CounterVec
	// SyncFailuresTotal counts failed sync attempts by kind. A sync that
	// applied everything but some service ports that failed one by one is
	// not a failed sync: those ports are counted by ServicePortFailuresTotal.
	SyncFailuresTotal *prometheus.CounterVec
	// ServicePortsNotProgrammed is the number of service ports the datapath
	// could not program and is retrying, by reason (dataplane.Reason*).
	ServicePortsNotProgrammed *prometheus.GaugeVec
	// ServicePortFailuresTotal counts failed attempts to program one service
	// port, by reason: each retry that fails again counts.
	ServicePortFailuresTotal *prometheus.CounterVec
	// UnservedFeatureServices is the number of Services that ask for a
	// feature the proxy does not serve yet (model.Feature), by feature.
	UnservedFeatureServices *prometheus.GaugeVec
	// SkippedObjectsTotal counts Services and EndpointSlices (or parts of
	// them) ignored as malformed, by resource and reason. Both labels must
	// come from small fixed sets, never from object names.
	SkippedObjectsTotal *prometheus.CounterVec
	// Services is the number of service ports programmed in the datapath.
	Services prometheus.Gauge
	// Backends is the number of backends programmed in the datapath.
	Backends prometheus.Gauge
}

// New creates the collectors and registers them on reg. It panics if reg
// already holds collectors with the same names (calling New twice on one
// registry is a programming error). A nil reg registers nothing, which suits
// tests of other packages.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		SyncProxyRulesDuration: syncHistogram("kubeproxy_sync_proxy_rules_duration_seconds",
			"Time taken by each attempt to bring the datapath in line with the Services and EndpointSlices, in seconds."),
		SyncFullProxyRulesDuration: syncHistogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
			"Time taken by each full sync of the datapath (the first, the periodic ones and those after a failure), in seconds."),
		SyncPartialProxyRulesDuration: syncHistogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
			"Time taken by each partial sync of the datapath (changed Services only), in seconds."),
		IptablesRules: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kubeproxy_sync_proxy_rules_iptables_total",
			Help: "Rules of the iptables mode per table after the last sync, those a partial sync left unchanged included.",
		}, []string{"table"}),
		SyncProxyRulesLastTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
			Help: "Unix time at which the datapath was last synced successfully.",
		}),
		SyncProxyRulesLastQueuedTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
			Help: "Unix time at which the last Service or EndpointSlice change was queued for a datapath sync.",
		}),
		SyncsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_syncs_total",
			Help: "Datapath sync attempts, by kind: full (rewrite everything) or partial (changes only).",
		}, []string{"kind"}),
		SyncFailuresTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_sync_failures_total",
			Help: "Datapath sync attempts that failed, by kind. A failure makes the next sync a full one.",
		}, []string{"kind"}),
		ServicePortsNotProgrammed: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kube_bpf_proxy_service_ports_not_programmed",
			Help: "Service ports the datapath could not program and is retrying, by reason; every other port is kept up to date.",
		}, []string{"reason"}),
		ServicePortFailuresTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_service_port_failures_total",
			Help: "Failed attempts to program a single service port, by reason; each failed retry counts.",
		}, []string{"reason"}),
		UnservedFeatureServices: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kube_bpf_proxy_unserved_feature_services",
			Help: "Services that ask for a feature not served yet, by feature: only their ClusterIP is served.",
		}, []string{"feature"}),
		SkippedObjectsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_skipped_objects_total",
			Help: "Malformed Service or EndpointSlice objects, or parts of them, left out of the datapath, by resource and reason.",
		}, []string{"resource", "reason"}),
		Services: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kube_bpf_proxy_services",
			Help: "Service ports currently programmed in the datapath.",
		}),
		Backends: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kube_bpf_proxy_backends",
			Help: "Backends currently programmed in the datapath.",
		}),
	}
	// Export both kinds from the start, so that rate() and absence alerts
	// see a zero rather than no series.
	for _, kind := range []string{SyncKindFull, SyncKindPartial} {
		m.SyncsTotal.WithLabelValues(kind)
		m.SyncFailuresTotal.WithLabelValues(kind)
	}
	if reg != nil {
		reg.MustRegister(
			m.SyncProxyRulesDuration,
			m.SyncFullProxyRulesDuration,
			m.SyncPartialProxyRulesDuration,
			m.IptablesRules,
			m.SyncProxyRulesLastTimestamp,
			m.SyncProxyRulesLastQueuedTimestamp,
			m.SyncsTotal,
			m.SyncFailuresTotal,
			m.ServicePortsNotProgrammed,
			m.ServicePortFailuresTotal,
			m.UnservedFeatureServices,
			m.SkippedObjectsTotal,
			m.Services,
			m.Backends,
		)
	}
	return m
}

// syncHistogram is a sync-duration histogram with kube-proxy's buckets:
// 1 ms doubling up to about 16 s.
func syncHistogram(name, help string) prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    name,
		Help:    help,
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 15),
	})
}

// RecordSync records one sync attempt of the given kind that took elapsed and
// ended at end, with its result.
func (m *Metrics) RecordSync(kind string, elapsed time.Duration, end time.Time, err error) {
	m.SyncProxyRulesDuration.Observe(elapsed.Seconds())
	if kind == SyncKindFull {
		m.SyncFullProxyRulesDuration.Observe(elapsed.Seconds())
	} else {
		m.SyncPartialProxyRulesDuration.Observe(elapsed.Seconds())
	}
	m.SyncsTotal.WithLabelValues(kind).Inc()
	if err != nil {
		m.SyncFailuresTotal.WithLabelValues(kind).Inc()
		return
	}
	m.SyncProxyRulesLastTimestamp.Set(unixSeconds(end))
}

// SetIptablesRules records the rules per table ("nat", "filter") after an
// iptables sync.
func (m *Metrics) SetIptablesRules(counts map[string]int) {
	for table, n := range counts {
		m.IptablesRules.WithLabelValues(table).Set(float64(n))
	}
}

// RecordQueued records that a change was queued for a sync at t.
func (m *Metrics) RecordQueued(t time.Time) {
	m.SyncProxyRulesLastQueuedTimestamp.Set(unixSeconds(t))
}

// RecordSkipped counts one object of resource left out for reason.
func (m *Metrics) RecordSkipped(resource, reason string) {
	m.SkippedObjectsTotal.WithLabelValues(resource, reason).Inc()
}

// InitServicePortReasons exports the service port failure metrics at zero
// for each reason, so that alerts see a zero rather than no series.
func (m *Metrics) InitServicePortReasons(reasons []string) {
	for _, r := range reasons {
		m.ServicePortsNotProgrammed.WithLabelValues(r)
		m.ServicePortFailuresTotal.WithLabelValues(r)
	}
}

// RecordServicePortFailure counts one failed attempt to program a service
// port.
func (m *Metrics) RecordServicePortFailure(reason string) {
	m.ServicePortFailuresTotal.WithLabelValues(reason).Inc()
}

// SetServicePortsNotProgrammed records how many service ports wait for a
// retry, by reason. Reasons absent from byReason keep their value: pass
// every reason, with its zeros.
func (m *Metrics) SetServicePortsNotProgrammed(byReason map[string]int) {
	for r, n := range byReason {
		m.ServicePortsNotProgrammed.WithLabelValues(r).Set(float64(n))
	}
}

// InitUnservedFeatures exports the unserved feature gauge at zero for each
// feature.
func (m *Metrics) InitUnservedFeatures(features []string) {
	for _, f := range features {
		m.UnservedFeatureServices.WithLabelValues(f)
	}
}

// AddUnservedFeatureServices adds delta (+1 or -1) to the Services using
// feature.
func (m *Metrics) AddUnservedFeatureServices(feature string, delta int) {
	m.UnservedFeatureServices.WithLabelValues(feature).Add(float64(delta))
}

// SetProgrammed records how many service ports and backends the datapath
// holds after a sync.
func (m *Metrics) SetProgrammed(services, backends int) {
	m.Services.Set(float64(services))
	m.Backends.Set(float64(backends))
}

func unixSeconds(t time.Time) float64 {
	return float64(t.UnixNano()) / float64(time.Second)
}

// datapathEventsCollector exports the eBPF datapath's event counters, read at
// scrape time.
type datapathEventsCollector struct {
	read func() (map[string]uint64, error)
	desc *prometheus.Desc
}

// NewDatapathEventsCollector returns a collector that calls read on every
// scrape and exports each entry as kube_bpf_proxy_datapath_events_total with
// the key as its event label. read sums the per-CPU counters; the values must
// only grow while the maps exist (a reset, e.g. after --cleanup, is handled
// by Prometheus like any counter reset). A read error is reported as an
// invalid metric: the scrape then reports the error (with Handler, the other
// metrics are still served) instead of exporting made-up values.
func NewDatapathEventsCollector(read func() (map[string]uint64, error)) prometheus.Collector {
	return &datapathEventsCollector{
		read: read,
		desc: prometheus.NewDesc(
			"kube_bpf_proxy_datapath_events_total",
			"Events counted by the datapath, by event: in ebpf mode connections translated or refused for lack of a backend; in iptables mode failed restores and conntrack entries deleted.",
			[]string{"event"}, nil,
		),
	}
}

func (c *datapathEventsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.desc
}

func (c *datapathEventsCollector) Collect(ch chan<- prometheus.Metric) {
	events, err := c.read()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, fmt.Errorf("reading datapath event counters: %w", err))
		return
	}
	// Sorted only to make the output stable; the registry sorts too.
	for _, name := range slices.Sorted(func(yield func(string) bool) {
		for k := range events {
			if !yield(k) {
				return
			}
		}
	}) {
		m, err := prometheus.NewConstMetric(c.desc, prometheus.CounterValue, float64(events[name]), name)
		if err != nil {
			m = prometheus.NewInvalidMetric(c.desc, err)
		}
		ch <- m
	}
}

// NewRegistry returns a fresh registry holding the standard Go runtime and
// process collectors, for New and NewDatapathEventsCollector to add to.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// Handler serves the metrics gathered from g on GET /metrics; other paths are
// 404. A collector that fails is logged and left out of the scrape, while the
// other metrics are still served.
func Handler(g prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      promLogger{},
	}))
	return mux
}

// ListenAndServe serves Handler(g) on addr until ctx is cancelled; see
// httpserve.ListenAndServe.
func ListenAndServe(ctx context.Context, addr string, g prometheus.Gatherer) error {
	return httpserve.ListenAndServe(ctx, "metrics", addr, Handler(g))
}

// promLogger sends promhttp's error log to klog.
type promLogger struct{}

func (promLogger) Println(v ...any) {
	klog.ErrorS(nil, "Serving metrics", "detail", strings.TrimSpace(fmt.Sprintln(v...)))
}
