package metrics

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// DatapathCounters is implemented by a datapath that counts per service port
// and knows how full its maps are: the eBPF datapath. Both are read at
// scrape time.
type DatapathCounters interface {
	// ServicePortCounters returns the counters of each service port the
	// datapath holds, summed over CPUs; they only grow while the port
	// exists.
	ServicePortCounters() ([]dataplane.ServicePortCounters, error)
	// MapUsage returns the entries in use and the capacity of each map.
	MapUsage() ([]dataplane.MapUsage, error)
}

// datapathCountersCollector exports DatapathCounters.
type datapathCountersCollector struct {
	src DatapathCounters

	connections, datagrams, refused, reverse *prometheus.Desc
	mapEntries, mapCapacity                  *prometheus.Desc
}

// NewDatapathCountersCollector returns a collector of the per service port
// counters and the map fill of src:
//
//   - kube_bpf_proxy_service_{connections_translated,datagrams_translated,
//     refused,reverse_translations}_total{namespace,service,port,protocol};
//   - kube_bpf_proxy_bpf_map_entries{map} and kube_bpf_proxy_bpf_map_capacity{map}.
//
// A service port is exported only once one of its counters is non-zero: a
// node exports series only for the Services its own pods (and host
// processes) use, not for every Service of the cluster, so the series a
// node exports stay bounded by what it serves, never by clients or sockets.
// A read error is reported as an invalid metric of the families it concerns
// (the scrape reports it, the other families are still served), not as
// made-up values.
func NewDatapathCountersCollector(src DatapathCounters) prometheus.Collector {
	port := []string{"namespace", "service", "port", "protocol"}
	perMap := []string{"map"}
	return &datapathCountersCollector{
		src: src,
		connections: prometheus.NewDesc("kube_bpf_proxy_service_connections_translated_total",
			"Connections to a Service port translated to a backend at connect() (TCP, and UDP sockets that connect), by Service port.",
			port, nil),
		datagrams: prometheus.NewDesc("kube_bpf_proxy_service_datagrams_translated_total",
			"Datagrams to a Service port translated to a backend one by one at sendmsg() (UDP sockets that do not connect), by Service port.",
			port, nil),
		refused: prometheus.NewDesc("kube_bpf_proxy_service_refused_total",
			"Connects and datagrams to a Service port refused with ECONNREFUSED because it had no backend, by Service port.",
			port, nil),
		reverse: prometheus.NewDesc("kube_bpf_proxy_service_reverse_translations_total",
			"Received datagrams and getpeername() calls shown the Service port's address instead of the backend's, by Service port.",
			port, nil),
		mapEntries: prometheus.NewDesc("kube_bpf_proxy_bpf_map_entries",
			"Entries in use in each eBPF map; compare with kube_bpf_proxy_bpf_map_capacity.",
			perMap, nil),
		mapCapacity: prometheus.NewDesc("kube_bpf_proxy_bpf_map_capacity",
			"Capacity of each eBPF map in entries, set by the --bpf-*-max flags.",
			perMap, nil),
	}
}

func (c *datapathCountersCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.connections, c.datagrams, c.refused, c.reverse, c.mapEntries, c.mapCapacity} {
		ch <- d
	}
}

func (c *datapathCountersCollector) Collect(ch chan<- prometheus.Metric) {
	c.collectServicePorts(ch)
	c.collectMaps(ch)
}

func (c *datapathCountersCollector) collectServicePorts(ch chan<- prometheus.Metric) {
	counters, err := c.src.ServicePortCounters()
	if err != nil {
		for _, d := range []*prometheus.Desc{c.connections, c.datagrams, c.refused, c.reverse} {
			ch <- prometheus.NewInvalidMetric(d, fmt.Errorf("reading service port counters: %w", err))
		}
		return
	}
	// A port is held under one id per family (a dual-stack port has one in
	// each), and for a moment under two when its frontend changed and the
	// old one's removal failed: its ids are summed, so that the scrape
	// never has two series with one label set.
	byName := make(map[model.ServicePortName]dataplane.ServicePortCounters, len(counters))
	for _, p := range counters {
		sum := byName[p.Name]
		sum.Name = p.Name
		sum.Connections += p.Connections
		sum.Datagrams += p.Datagrams
		sum.Refused += p.Refused
		sum.ReverseTranslations += p.ReverseTranslations
		byName[p.Name] = sum
	}
	for _, p := range byName {
		if p.Connections == 0 && p.Datagrams == 0 && p.Refused == 0 && p.ReverseTranslations == 0 {
			continue
		}
		labels := []string{p.Name.Namespace, p.Name.Name, p.Name.Port, p.Name.Protocol.String()}
		for _, v := range []struct {
			desc  *prometheus.Desc
			value uint64
		}{
			{c.connections, p.Connections},
			{c.datagrams, p.Datagrams},
			{c.refused, p.Refused},
			{c.reverse, p.ReverseTranslations},
		} {
			ch <- constMetric(v.desc, prometheus.CounterValue, float64(v.value), labels...)
		}
	}
}

func (c *datapathCountersCollector) collectMaps(ch chan<- prometheus.Metric) {
	usage, err := c.src.MapUsage()
	if err != nil {
		for _, d := range []*prometheus.Desc{c.mapEntries, c.mapCapacity} {
			ch <- prometheus.NewInvalidMetric(d, fmt.Errorf("reading map usage: %w", err))
		}
		return
	}
	for _, u := range usage {
		ch <- constMetric(c.mapEntries, prometheus.GaugeValue, float64(u.Entries), u.Map)
		ch <- constMetric(c.mapCapacity, prometheus.GaugeValue, float64(u.Capacity), u.Map)
	}
}

// constMetric is prometheus.NewConstMetric, its error (a label value that
// is not UTF-8) reported as an invalid metric rather than a panic.
func constMetric(desc *prometheus.Desc, typ prometheus.ValueType, value float64, labels ...string) prometheus.Metric {
	m, err := prometheus.NewConstMetric(desc, typ, value, labels...)
	if err != nil {
		return prometheus.NewInvalidMetric(desc, err)
	}
	return m
}
