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
	"net/http/pprof"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/httpserve"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Values of the kind label of the sync metrics.
const (
	// SyncKindFull is a sync that rewrites the whole datapath state: the
	// first one, the one after a failed apply or a flush of the rules, and
	// the periodic ones (each --sync-period for a datapath of maps alone,
	// which no mode is: the eBPF mode has its packet layer; once
	// an hour, kube-proxy's FullSyncPeriod, where iptables rules are in
	// play).
	SyncKindFull = "full"
	// SyncKindPartial is a sync that writes only what changed.
	SyncKindPartial = "partial"
)

// Results of a periodic check of the datapath (DatapathChecksTotal).
const (
	CheckIntact  = "intact"
	CheckFlushed = "flushed"
	CheckError   = "error"
)

// IPFamily is the value of kube-proxy's ip_family label of the Metrics New
// returns; ForFamily gives the other family's. Each family's proxier
// records into its own, as each of kube-proxy's per-family proxiers does.
const IPFamily = "IPv4"

// Metrics holds the proxy's collectors. The fields may be used directly; the
// Record methods cover the common cases.
type Metrics struct {
	// family is the ip_family label value of every family-labelled series
	// this Metrics records (ForFamily).
	family string
	// SyncProxyRulesDuration observes how long each sync took, failed or
	// not.
	SyncProxyRulesDuration prometheus.Observer
	// SyncFullProxyRulesDuration and SyncPartialProxyRulesDuration split
	// SyncProxyRulesDuration by kind, as kube-proxy does: the two kinds cost
	// orders of magnitude apart, in the iptables mode above all.
	SyncFullProxyRulesDuration    prometheus.Observer
	SyncPartialProxyRulesDuration prometheus.Observer
	// IptablesRules is the number of rules per table after the last
	// iptables sync, unchanged ones included (iptables mode only).
	IptablesRules *prometheus.GaugeVec
	// IptablesRulesLast is the number of rules per table the last iptables
	// sync wrote (iptables mode only).
	IptablesRulesLast *prometheus.GaugeVec
	// IptablesRestoreFailures counts failed iptables-restore runs of the
	// syncs; nil until InitIptables (iptables mode only).
	IptablesRestoreFailures prometheus.Counter
	// IptablesPartialRestoreFailures counts failed partial syncs in the
	// iptables mode, each followed by a full one; nil until InitIptables.
	IptablesPartialRestoreFailures prometheus.Counter
	// ConntrackCleanupDuration and ConntrackCleanupDeleted time the stale
	// UDP conntrack cleanups of the iptables mode and count the entries
	// they deleted; nil until InitIptables.
	ConntrackCleanupDuration prometheus.Observer
	ConntrackCleanupDeleted  prometheus.Counter
	// SyncProxyRulesLastTimestamp is the Unix time of the last successful
	// sync.
	SyncProxyRulesLastTimestamp prometheus.Gauge
	// SyncProxyRulesLastQueuedTimestamp is the Unix time of the last change
	// queued for a sync.
	SyncProxyRulesLastQueuedTimestamp prometheus.Gauge
	// NetworkProgrammingDuration observes, for each EndpointSlice change,
	// the time from the change that triggered it (its
	// last-change-trigger-time annotation) to the sync that programmed it.
	NetworkProgrammingDuration prometheus.Observer
	// NoLocalEndpoints is kube-proxy's count of Services with a Local
	// traffic policy and no local endpoint, by traffic_policy.
	NoLocalEndpoints *prometheus.GaugeVec
	// ProxyHealthzTotal and ProxyLivezTotal count the answers of /healthz
	// and /livez by HTTP status code.
	ProxyHealthzTotal *prometheus.CounterVec
	ProxyLivezTotal   *prometheus.CounterVec

	// SyncsTotal counts sync attempts by kind (SyncKindFull, SyncKindPartial).
	SyncsTotal *prometheus.CounterVec
	// SyncFailuresTotal counts failed sync attempts by kind. A sync that
	// applied everything but some service ports that failed one by one is
	// not a failed sync: those ports are counted by ServicePortFailuresTotal.
	SyncFailuresTotal *prometheus.CounterVec
	// SyncLockTimeoutsTotal counts syncs that changed nothing because
	// another program held the xtables lock past --iptables-lock-wait
	// (dataplane.ErrBusy), in their restore or in the canary check before
	// it; each counts once. Their changes are retried with a backoff, not
	// in full. They count in SyncFailuresTotal too.
	SyncLockTimeoutsTotal prometheus.Counter
	// DatapathChecksTotal counts the periodic checks that a datapath's
	// state is still in place (the iptables rules' canary chains), by
	// result: CheckIntact, CheckFlushed (the next sync is full), CheckError.
	DatapathChecksTotal *prometheus.CounterVec
	// ServicePortsNotProgrammed is the number of service ports the datapath
	// could not program and is retrying, by reason (dataplane.Reason*).
	ServicePortsNotProgrammed *prometheus.GaugeVec
	// ServicePortFailuresTotal counts failed attempts to program one service
	// port, by reason: each retry that fails again counts.
	ServicePortFailuresTotal *prometheus.CounterVec
	// SkippedObjectsTotal counts Services and EndpointSlices (or parts of
	// them) ignored as malformed, and in the eBPF mode the Services whose
	// host-scoped external addresses its socket programs leave out
	// (model.ReasonHostScopedExternalIP), by resource and reason. Both labels must
	// come from small fixed sets, never from object names.
	SkippedObjectsTotal *prometheus.CounterVec
	// Services is the number of service ports programmed in the datapath.
	Services prometheus.Gauge
	// Backends is the number of backends programmed in the datapath.
	Backends prometheus.Gauge

	changes *changesCollector
	// The vectors of the family-labelled series, for ForFamily.
	syncDurationVec, syncFullDurationVec, syncPartialDurationVec *prometheus.HistogramVec
	lastTimestampVec, lastQueuedVec                              *prometheus.GaugeVec
	programmingVec                                               *prometheus.HistogramVec
	lockTimeoutsVec                                              *prometheus.CounterVec
	servicesVec, backendsVec                                     *prometheus.GaugeVec
	// Vectors whose children appear only in the iptables mode, as kube-proxy
	// registers these only there.
	iptablesRestoreFailuresVec, iptablesPartialRestoreFailuresVec *prometheus.CounterVec
	conntrackDurationVec                                          *prometheus.HistogramVec
	conntrackDeletedVec                                           *prometheus.CounterVec
}

// New creates the collectors and registers them on reg. It panics if reg
// already holds collectors with the same names (calling New twice on one
// registry is a programming error). A nil reg registers nothing, which suits
// tests of other packages.
func New(reg prometheus.Registerer) *Metrics { return NewForFamily(reg, model.IPv4) }

// NewForFamily is New for a proxy whose first (or only) family is f: the
// Metrics it returns records under f, and only f's series are exported
// before anything is recorded.
func NewForFamily(reg prometheus.Registerer, f model.IPFamily) *Metrics {
	syncDuration := syncHistogram("kubeproxy_sync_proxy_rules_duration_seconds",
		"Time taken by each attempt to bring the datapath in line with the Services and EndpointSlices, in seconds.")
	syncFullDuration := syncHistogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
		"Time taken by each full sync of the datapath (the first, the periodic ones and those after a failure or a flush of the rules), in seconds.")
	syncPartialDuration := syncHistogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
		"Time taken by each partial sync of the datapath (changed Services only), in seconds.")
	lastTimestamp := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
		Help: "Unix time at which the datapath was last synced successfully.",
	}, []string{"ip_family"})
	lastQueued := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
		Help: "Unix time at which the last Service or EndpointSlice change was queued for a datapath sync.",
	}, []string{"ip_family"})
	programming := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "kubeproxy_network_programming_duration_seconds",
		Help: "Time from a change to a Pod or Service (an EndpointSlice's last-change-trigger-time) to the sync that programmed it, in seconds.",
		// kube-proxy's buckets: 0.25 s, 0.5 s, then 1 s steps to 59 s,
		// 5 s steps to 115 s, 30 s steps to 5 min.
		Buckets: slices.Concat(
			prometheus.LinearBuckets(0.25, 0.25, 2),
			prometheus.LinearBuckets(1, 1, 59),
			prometheus.LinearBuckets(60, 5, 12),
			prometheus.LinearBuckets(120, 30, 7)),
	}, []string{"ip_family"})
	restoreFailures := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
		Help: "Failed iptables-restore runs of the iptables mode's syncs.",
	}, []string{"ip_family"})
	partialRestoreFailures := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
		Help: "Failed partial syncs of the iptables mode, each followed by a full one.",
	}, []string{"ip_family"})
	conntrackDuration := syncHistogram("kubeproxy_conntrack_reconciler_sync_duration_seconds",
		"Time taken by each cleanup of stale UDP conntrack entries after a sync, in seconds.")
	conntrackDeleted := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kubeproxy_conntrack_reconciler_deleted_entries_total",
		Help: "Stale UDP conntrack entries deleted after syncs.",
	}, []string{"ip_family"})
	// This proxy's own series that are per family in nature (each
	// family's proxier syncs, checks, fails ports, skips objects and
	// holds a datapath of its own) carry ip_family too, as kube-proxy's
	// per-sync series do.
	m := &Metrics{
		IptablesRules: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kubeproxy_sync_proxy_rules_iptables_total",
			Help: "Rules of the iptables mode per table after the last sync, those a partial sync left unchanged included.",
		}, []string{"table", "ip_family"}),
		IptablesRulesLast: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kubeproxy_sync_proxy_rules_iptables_last",
			Help: "Rules of the iptables mode per table written by the last sync.",
		}, []string{"table", "ip_family"}),
		iptablesRestoreFailuresVec:        restoreFailures,
		conntrackDurationVec:              conntrackDuration,
		conntrackDeletedVec:               conntrackDeleted,
		iptablesPartialRestoreFailuresVec: partialRestoreFailures,
		syncDurationVec:                   syncDuration,
		syncFullDurationVec:               syncFullDuration,
		syncPartialDurationVec:            syncPartialDuration,
		lastTimestampVec:                  lastTimestamp,
		lastQueuedVec:                     lastQueued,
		programmingVec:                    programming,
		NoLocalEndpoints: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
			Help: "Service ports with a Local traffic policy and no endpoint on this node while the Service has some elsewhere, by traffic policy: their traffic from outside the node (external), or to the ClusterIP (internal), is dropped.",
		}, []string{"traffic_policy", "ip_family"}),
		ProxyHealthzTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kubeproxy_proxy_healthz_total",
			Help: "Answers of /healthz, by HTTP status code.",
		}, []string{"code"}),
		ProxyLivezTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kubeproxy_proxy_livez_total",
			Help: "Answers of /livez, by HTTP status code.",
		}, []string{"code"}),
		SyncsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_syncs_total",
			Help: "Datapath sync attempts, by kind: full (rewrite everything) or partial (changes only).",
		}, []string{"kind", "ip_family"}),
		SyncFailuresTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_sync_failures_total",
			Help: "Datapath sync attempts that failed, by kind. A failure makes the next sync a full one, unless the sync only found the xtables lock held (kube_bpf_proxy_sync_lock_timeouts_total).",
		}, []string{"kind", "ip_family"}),
		lockTimeoutsVec: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_sync_lock_timeouts_total",
			Help: "Datapath syncs that changed nothing because another program held the xtables lock past --iptables-lock-wait; their changes are retried with a backoff, up to --sync-period.",
		}, []string{"ip_family"}),
		DatapathChecksTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_datapath_checks_total",
			Help: "Periodic checks (each --sync-period) that the iptables rules are still in place (kube-proxy's canary chains), by result: intact, flushed (the next sync is a full one) or error.",
		}, []string{"result", "ip_family"}),
		ServicePortsNotProgrammed: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kube_bpf_proxy_service_ports_not_programmed",
			Help: "Service ports the datapath could not program and is retrying, by reason; every other port is kept up to date.",
		}, []string{"reason", "ip_family"}),
		ServicePortFailuresTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_service_port_failures_total",
			Help: "Failed attempts to program a single service port, by reason; each failed retry counts.",
		}, []string{"reason", "ip_family"}),
		SkippedObjectsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kube_bpf_proxy_skipped_objects_total",
			Help: "Malformed Service or EndpointSlice objects, or parts of them, left out of the datapath, and in the eBPF mode Services naming host-scoped external addresses, which its socket programs leave out, by resource and reason.",
		}, []string{"resource", "reason", "ip_family"}),
		servicesVec: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kube_bpf_proxy_services",
			Help: "Service ports currently programmed in the datapath.",
		}, []string{"ip_family"}),
		backendsVec: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kube_bpf_proxy_backends",
			Help: "Backends currently programmed in the datapath.",
		}, []string{"ip_family"}),
		changes: newChangesCollector(),
	}
	m.bind(f.String())
	for _, code := range []string{"200", "503"} {
		m.ProxyHealthzTotal.WithLabelValues(code)
		m.ProxyLivezTotal.WithLabelValues(code)
	}
	if reg != nil {
		reg.MustRegister(
			syncDuration,
			syncFullDuration,
			syncPartialDuration,
			m.IptablesRules,
			m.IptablesRulesLast,
			restoreFailures,
			partialRestoreFailures,
			conntrackDuration,
			conntrackDeleted,
			lastTimestamp,
			lastQueued,
			programming,
			m.NoLocalEndpoints,
			m.ProxyHealthzTotal,
			m.ProxyLivezTotal,
			m.changes,
			m.SyncsTotal,
			m.SyncFailuresTotal,
			m.lockTimeoutsVec,
			m.DatapathChecksTotal,
			m.ServicePortsNotProgrammed,
			m.ServicePortFailuresTotal,
			m.SkippedObjectsTotal,
			m.servicesVec,
			m.backendsVec,
		)
	}
	return m
}

// ForFamily returns the Metrics of another IP family's proxier: the same
// collectors, recording under ip_family="IPv4" or "IPv6". The series
// without that label (the /healthz and /livez answers, kube-proxy's change
// counters, summed over the families' trackers) are shared.
func (m *Metrics) ForFamily(f model.IPFamily) *Metrics {
	c := *m
	c.IptablesRestoreFailures, c.IptablesPartialRestoreFailures = nil, nil
	c.ConntrackCleanupDuration, c.ConntrackCleanupDeleted = nil, nil
	c.bind(f.String())
	return &c
}

// Family is the ip_family label value m records under.
func (m *Metrics) Family() string { return m.family }

// bind points m's family-labelled fields at family's series, and exports
// the series of every label value at zero, so that rate() and absence
// alerts see a zero rather than no series. (kube-proxy creates its
// children on first use; a zero is what a query over them means.)
func (m *Metrics) bind(family string) {
	m.family = family
	labels := prometheus.Labels{"ip_family": family}
	m.SyncProxyRulesDuration = m.syncDurationVec.With(labels)
	m.SyncFullProxyRulesDuration = m.syncFullDurationVec.With(labels)
	m.SyncPartialProxyRulesDuration = m.syncPartialDurationVec.With(labels)
	m.SyncProxyRulesLastTimestamp = m.lastTimestampVec.With(labels)
	m.SyncProxyRulesLastQueuedTimestamp = m.lastQueuedVec.With(labels)
	m.NetworkProgrammingDuration = m.programmingVec.With(labels)
	m.SyncLockTimeoutsTotal = m.lockTimeoutsVec.With(labels)
	m.Services = m.servicesVec.With(labels)
	m.Backends = m.backendsVec.With(labels)
	for _, kind := range []string{SyncKindFull, SyncKindPartial} {
		m.SyncsTotal.WithLabelValues(kind, family)
		m.SyncFailuresTotal.WithLabelValues(kind, family)
	}
	for _, result := range []string{CheckIntact, CheckFlushed, CheckError} {
		m.DatapathChecksTotal.WithLabelValues(result, family)
	}
	for _, policy := range []string{"internal", "external"} {
		m.NoLocalEndpoints.WithLabelValues(policy, family)
	}
}

// syncHistogram is a sync-duration histogram with kube-proxy's buckets:
// 1 ms doubling up to about 16 s.
func syncHistogram(name, help string) *prometheus.HistogramVec {
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    name,
		Help:    help,
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 15),
	}, []string{"ip_family"})
}

// InitIptables exports the series kube-proxy has only in its iptables mode,
// at zero. Call it once, before the first sync, when the datapath is
// iptables.
func (m *Metrics) InitIptables() {
	m.IptablesRestoreFailures = m.iptablesRestoreFailuresVec.WithLabelValues(m.family)
	m.IptablesPartialRestoreFailures = m.iptablesPartialRestoreFailuresVec.WithLabelValues(m.family)
	m.ConntrackCleanupDuration = m.conntrackDurationVec.WithLabelValues(m.family)
	m.ConntrackCleanupDeleted = m.conntrackDeletedVec.WithLabelValues(m.family)
}

// RecordConntrackCleanup records one stale UDP conntrack cleanup of the
// iptables mode, as kube-proxy's conntrack reconciler metrics.
func (m *Metrics) RecordConntrackCleanup(took time.Duration, deleted uint) {
	if m.ConntrackCleanupDuration == nil {
		return
	}
	m.ConntrackCleanupDuration.Observe(took.Seconds())
	m.ConntrackCleanupDeleted.Add(float64(deleted))
}

// AddIptablesRestoreFailures counts n failed iptables-restore runs.
func (m *Metrics) AddIptablesRestoreFailures(n uint64) {
	if m.IptablesRestoreFailures != nil && n > 0 {
		m.IptablesRestoreFailures.Add(float64(n))
	}
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
	m.SyncsTotal.WithLabelValues(kind, m.family).Inc()
	if err != nil {
		m.SyncFailuresTotal.WithLabelValues(kind, m.family).Inc()
		// kube-proxy's iptables mode counts every failed partial sync
		// here, whatever failed in it: each one falls back to a full sync.
		if kind == SyncKindPartial && m.IptablesPartialRestoreFailures != nil {
			m.IptablesPartialRestoreFailures.Inc()
		}
		return
	}
	m.SyncProxyRulesLastTimestamp.Set(unixSeconds(end))
}

// SetIptablesRules records the rules per table ("nat", "filter") after an
// iptables sync: all of them, and those the sync wrote.
func (m *Metrics) SetIptablesRules(total, written map[string]int) {
	for table, n := range total {
		m.IptablesRules.WithLabelValues(table, m.family).Set(float64(n))
	}
	for table, n := range written {
		m.IptablesRulesLast.WithLabelValues(table, m.family).Set(float64(n))
	}
}

// RecordQueued records that a change was queued for a sync at t.
func (m *Metrics) RecordQueued(t time.Time) {
	m.SyncProxyRulesLastQueuedTimestamp.Set(unixSeconds(t))
}

// RecordSkipped counts one object of resource left out for reason.
func (m *Metrics) RecordSkipped(resource, reason string) {
	m.SkippedObjectsTotal.WithLabelValues(resource, reason, m.family).Inc()
}

// InitServicePortReasons exports the service port failure metrics at zero
// for each reason, so that alerts see a zero rather than no series.
func (m *Metrics) InitServicePortReasons(reasons []string) {
	for _, r := range reasons {
		m.ServicePortsNotProgrammed.WithLabelValues(r, m.family)
		m.ServicePortFailuresTotal.WithLabelValues(r, m.family)
	}
}

// RecordServicePortFailure counts one failed attempt to program a service
// port.
func (m *Metrics) RecordServicePortFailure(reason string) {
	m.ServicePortFailuresTotal.WithLabelValues(reason, m.family).Inc()
}

// SetServicePortsNotProgrammed records how many service ports wait for a
// retry, by reason. Reasons absent from byReason keep their value: pass
// every reason, with its zeros.
func (m *Metrics) SetServicePortsNotProgrammed(byReason map[string]int) {
	for r, n := range byReason {
		m.ServicePortsNotProgrammed.WithLabelValues(r, m.family).Set(float64(n))
	}
}

// SetNoLocalEndpoints sets kube-proxy's no-local-endpoints gauges.
func (m *Metrics) SetNoLocalEndpoints(internal, external int) {
	m.NoLocalEndpoints.WithLabelValues("internal", m.family).Set(float64(internal))
	m.NoLocalEndpoints.WithLabelValues("external", m.family).Set(float64(external))
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
			"Events counted by the datapath, by event: in ebpf mode connections translated (ClusterIPs, node ports, external IPs, affinity hits) or refused (no backend, no local endpoint, unknown port, unallocated address); in iptables mode failed restores and conntrack entries deleted.",
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
	return handler(g, false)
}

func handler(g prometheus.Gatherer, profiling bool) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      promLogger{},
	}))
	if profiling {
		// kube-proxy's --profiling: Go's profiles on the metrics server.
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// ListenAndServe serves Handler(g) on addr until ctx is cancelled, with
// /debug/pprof/ too if profiling; see httpserve.ListenAndServe.
func ListenAndServe(ctx context.Context, addr string, g prometheus.Gatherer, profiling bool) error {
	return httpserve.ListenAndServe(ctx, "metrics", addr, handler(g, profiling))
}

// promLogger sends promhttp's error log to klog.
type promLogger struct{}

func (promLogger) Println(v ...any) {
	klog.ErrorS(nil, "Serving metrics", "detail", strings.TrimSpace(fmt.Sprintln(v...)))
}

// RecordLockTimeout counts a sync that changed nothing because another
// program held the xtables lock.
func (m *Metrics) RecordLockTimeout() { m.SyncLockTimeoutsTotal.Inc() }

// RecordCheck counts a periodic check of the datapath by its result.
func (m *Metrics) RecordCheck(result string) {
	m.DatapathChecksTotal.WithLabelValues(result, m.family).Inc()
}
