package probe

import (
	"math"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metric names, shared by the client, the server and Summarize.
const (
	metricConnect     = "kube_bpf_proxy_probe_connect_seconds"
	metricFirstByte   = "kube_bpf_proxy_probe_first_byte_seconds"
	metricRoundTrip   = "kube_bpf_proxy_probe_round_trip_seconds"
	metricSquared     = "kube_bpf_proxy_probe_round_trip_squared_seconds_total"
	metricErrors      = "kube_bpf_proxy_probe_errors_total"
	metricServerCount = "kube_bpf_proxy_probe_server_requests_total"
)

// Error kinds, the values of the errors counter's kind label.
const (
	KindRefused = "refused"
	KindTimeout = "timeout"
	KindReset   = "reset"
	KindOther   = "other"
)

// Buckets returns the latency buckets in seconds: 25 µs steps up to 200 µs,
// so that 50 µs and 100 µs fall in different buckets (the difference
// between two datapaths on one machine is of that order), then steps of
// x1.25 up to 10 s, which keeps the error of a p99 interpolated inside a
// bucket under 25 %.
func Buckets() []float64 {
	var b []float64
	for us := 25; us <= 200; us += 25 {
		b = append(b, float64(us)/1e6)
	}
	// Rounded to four significant digits, so the le labels read well.
	for k := 1; ; k++ {
		v := 200e-6 * math.Pow(1.25, float64(k))
		if v >= 10 {
			break
		}
		scale := math.Pow(10, math.Floor(math.Log10(v))-3)
		b = append(b, math.Round(v/scale)*scale)
	}
	return append(b, 10)
}

// clientMetrics are the client's series.
type clientMetrics struct {
	connect, firstByte, roundTrip *prometheus.HistogramVec
	squared, errors               *prometheus.CounterVec
}

func newClientMetrics(reg prometheus.Registerer) *clientMetrics {
	// ip_family is the family of the ClusterIP probed ("IPv4", "IPv6", as
	// kube-proxy spells its label): a dual-stack Service is probed on both.
	pair := []string{"client_node", "server_node", "mode", "ip_family"}
	m := &clientMetrics{
		connect: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricConnect,
			Help:    "Time to establish the probe's TCP connection to the Service's ClusterIP (connect() until the handshake completed), by client node, server node, the proxy mode of the client's node and the ClusterIP's family.",
			Buckets: Buckets(),
		}, pair),
		firstByte: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricFirstByte,
			Help:    "Time from the start of the probe's HTTP request (connect included) until the first byte of the response.",
			Buckets: Buckets(),
		}, pair),
		roundTrip: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricRoundTrip,
			Help:    "Whole round trip of one probe request through the Service's ClusterIP of family ip_family: protocol tcp is a new connection, an HTTP request and its full response; udp is a new socket, a datagram and its reply.",
			Buckets: Buckets(),
		}, []string{"client_node", "server_node", "mode", "protocol", "ip_family"}),
		squared: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricSquared,
			Help: "Sum of the squares of the round trips in seconds, so that the standard deviation is exact: sqrt(rate(squared)/rate(count) - (rate(sum)/rate(count))^2).",
		}, []string{"client_node", "server_node", "mode", "protocol", "ip_family"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricErrors,
			Help: "Probe requests that failed, by kind: refused (no endpoint: connection or datagram refused), timeout, reset (connection reset or closed early), other.",
		}, []string{"client_node", "mode", "protocol", "kind", "ip_family"}),
	}
	reg.MustRegister(m.connect, m.firstByte, m.roundTrip, m.squared, m.errors)
	return m
}

// newRegistry returns a registry with the Go and process collectors.
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}
