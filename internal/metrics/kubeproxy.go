package metrics

import (
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// changesCollector exports kube-proxy's change counters from the change
// trackers, read at scrape time: each tracker keeps them under its own
// lock, so a scrape never sees a pending count out of step with its total.
// They have no ip_family label, as kube-proxy's: on a dual-stack node they
// sum the two families' trackers, which is what kube-proxy's counters hold
// too (each of its per-family trackers counts every event).
type changesCollector struct {
	mu      sync.Mutex
	sources map[string]func() model.ChangeCounts

	endpointPending, endpointTotal, servicePending, serviceTotal *prometheus.Desc
}

func newChangesCollector() *changesCollector {
	return &changesCollector{
		sources: make(map[string]func() model.ChangeCounts),
		endpointPending: prometheus.NewDesc("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
			"EndpointSlice events that changed a slice since the last sync.", nil, nil),
		endpointTotal: prometheus.NewDesc("kubeproxy_sync_proxy_rules_endpoint_changes_total",
			"EndpointSlice events seen, changed or not.", nil, nil),
		servicePending: prometheus.NewDesc("kubeproxy_sync_proxy_rules_service_changes_pending",
			"Services whose served spec changed since the last sync.", nil, nil),
		serviceTotal: prometheus.NewDesc("kubeproxy_sync_proxy_rules_service_changes_total",
			"Service events seen, changed or not.", nil, nil),
	}
}

func (c *changesCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.endpointPending
	ch <- c.endpointTotal
	ch <- c.servicePending
	ch <- c.serviceTotal
}

func (c *changesCollector) Collect(ch chan<- prometheus.Metric) {
	var counts model.ChangeCounts
	c.mu.Lock()
	sources := slices.Collect(maps.Values(c.sources))
	c.mu.Unlock()
	for _, f := range sources {
		n := f()
		counts.PendingEndpointChanges += n.PendingEndpointChanges
		counts.EndpointChanges += n.EndpointChanges
		counts.PendingServices += n.PendingServices
		counts.ServiceChanges += n.ServiceChanges
	}
	ch <- prometheus.MustNewConstMetric(c.endpointPending, prometheus.GaugeValue, float64(counts.PendingEndpointChanges))
	ch <- prometheus.MustNewConstMetric(c.endpointTotal, prometheus.CounterValue, float64(counts.EndpointChanges))
	ch <- prometheus.MustNewConstMetric(c.servicePending, prometheus.GaugeValue, float64(counts.PendingServices))
	ch <- prometheus.MustNewConstMetric(c.serviceTotal, prometheus.CounterValue, float64(counts.ServiceChanges))
}

// SetChangeSource makes the change counters read f, the tracker of m's
// family, at each scrape, adding the other families'; until it is called
// they are 0.
func (m *Metrics) SetChangeSource(f func() model.ChangeCounts) {
	m.changes.mu.Lock()
	defer m.changes.mu.Unlock()
	m.changes.sources[m.family] = f
}

// ObserveNetworkProgramming records, for each trigger time, the time from it
// to now: the changes it stands for are programmed now.
func (m *Metrics) ObserveNetworkProgramming(now time.Time, triggers map[model.ServiceName][]time.Time) {
	for _, times := range triggers {
		for _, t := range times {
			m.NetworkProgrammingDuration.Observe(now.Sub(t).Seconds())
		}
	}
}

// HealthCounts returns the functions that count /healthz and /livez answers
// by HTTP status code, for healthz.WithCounts.
func (m *Metrics) HealthCounts() (healthz, livez func(code int)) {
	count := func(v *prometheus.CounterVec) func(int) {
		return func(code int) {
			switch code {
			case 200:
				v.WithLabelValues("200").Inc()
			case 503:
				v.WithLabelValues("503").Inc()
			default:
				// Not an answer of the check; kube-proxy counts only these two.
			}
		}
	}
	return count(m.ProxyHealthzTotal), count(m.ProxyLivezTotal)
}

// RegisterInfo registers kube_bpf_proxy_info, always 1, whose labels say
// which mode serves this node, with which iptables backend (in the ebpf
// mode, its packet layer's), and which build: a dashboard joins any series to it to split
// by mode.
func RegisterInfo(reg prometheus.Registerer, mode, iptablesBackend, version string) {
	info := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "kube_bpf_proxy_info",
		Help: "Always 1; its labels say the datapath mode, the iptables backend (none in ebpf mode) and the version running.",
		ConstLabels: prometheus.Labels{
			"mode":             mode,
			"iptables_backend": iptablesBackend,
			"version":          version,
		},
	})
	info.Set(1)
	reg.MustRegister(info)
}

// NFAcctSource reads kube-proxy's nfacct packet counters: the packets the
// iptables rules dropped as conntrack INVALID, and those accepted on node
// ports of 127.0.0.1; ok is false when they cannot be read.
type NFAcctSource func() (invalidDropped, localhostNodePorts uint64, ok bool)

// nfacctCollector exports kube-proxy's two nfacct counters, read from the
// kernel at scrape time as kube-proxy reads them.
type nfacctCollector struct {
	read                     NFAcctSource
	invalidDropped, accepted *prometheus.Desc
}

// NewNFAcctCollector returns a collector of kube-proxy's nfacct counters
// (iptables mode).
func NewNFAcctCollector(read NFAcctSource) prometheus.Collector {
	return &nfacctCollector{
		read: read,
		invalidDropped: prometheus.NewDesc("kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
			"Packets dropped by the iptables rules because conntrack marked them INVALID.", nil, nil),
		accepted: prometheus.NewDesc("kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
			"Packets accepted on node ports of the loopback interface.", nil, nil),
	}
}

func (c *nfacctCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.invalidDropped
	ch <- c.accepted
}

func (c *nfacctCollector) Collect(ch chan<- prometheus.Metric) {
	invalid, accepted, ok := c.read()
	if !ok {
		return
	}
	ch <- prometheus.MustNewConstMetric(c.invalidDropped, prometheus.CounterValue, float64(invalid))
	ch <- prometheus.MustNewConstMetric(c.accepted, prometheus.CounterValue, float64(accepted))
}
