package metrics

import (
	"context"
	"math"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientmetrics "k8s.io/client-go/tools/metrics"
)

// RESTClient holds client-go's request metrics under the names, label names
// and buckets kube-proxy exports them with (component-base's restclient
// adapter, k8s.io/component-base/metrics/prometheus/restclient), on a
// registry of ours rather than the global one.
type RESTClient struct {
	requestLatency     *prometheus.HistogramVec
	requestSize        *prometheus.HistogramVec
	responseSize       *prometheus.HistogramVec
	rateLimiterLatency *prometheus.HistogramVec
	requestResult      *prometheus.CounterVec
	requestRetry       *prometheus.CounterVec

	execPluginCertTTL      prometheus.GaugeFunc
	execPluginCertRotation prometheus.Histogram
	execPluginCalls        *prometheus.CounterVec

	transportCacheEntries        prometheus.Gauge
	transportCreateCalls         *prometheus.CounterVec
	transportCAReloads           *prometheus.CounterVec
	transportCertRotationGCCalls prometheus.Counter
	transportCacheGCCalls        *prometheus.CounterVec

	expiryMu sync.Mutex
	expiry   *time.Time
}

// NewRESTClient creates client-go's metrics and registers them on reg.
// Hand Options() to client-go's metrics.Register to feed them.
func NewRESTClient(reg prometheus.Registerer) *RESTClient {
	latencyBuckets := []float64{0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0}
	// 64 bytes to 16 MiB, as kube-proxy's.
	sizeBuckets := []float64{64, 256, 512, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216}
	r := &RESTClient{
		requestLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rest_client_request_duration_seconds",
			Help:    "Request latency in seconds, by verb and host.",
			Buckets: latencyBuckets,
		}, []string{"verb", "host"}),
		requestSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rest_client_request_size_bytes",
			Help:    "Request size in bytes, by verb and host.",
			Buckets: sizeBuckets,
		}, []string{"verb", "host"}),
		responseSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rest_client_response_size_bytes",
			Help:    "Response size in bytes, by verb and host.",
			Buckets: sizeBuckets,
		}, []string{"verb", "host"}),
		rateLimiterLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rest_client_rate_limiter_duration_seconds",
			Help:    "Time requests waited for the client-side rate limiter, in seconds, by verb and host.",
			Buckets: latencyBuckets,
		}, []string{"verb", "host"}),
		requestResult: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rest_client_requests_total",
			Help: "HTTP requests to the API server, by status code, method and host.",
		}, []string{"code", "method", "host"}),
		requestRetry: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rest_client_request_retries_total",
			Help: "Retried requests, by status code, verb and host.",
		}, []string{"code", "verb", "host"}),
		execPluginCertRotation: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "rest_client_exec_plugin_certificate_rotation_age",
			Help: "Seconds the last client certificate of an auth exec plugin lived before it was rotated.",
			// 10 min, 30 min, 1 h, 4 h, 1 d, 1 week, 1, 3 and 6 months, 1 and 4 years.
			Buckets: []float64{600, 1800, 3600, 14400, 86400, 604800, 2592000, 7776000, 15552000, 31104000, 124416000},
		}),
		execPluginCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rest_client_exec_plugin_call_total",
			Help: "Calls to an auth exec plugin, by exit code and call status.",
		}, []string{"code", "call_status"}),
		transportCacheEntries: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rest_client_transport_cache_entries",
			Help: "Transports in client-go's internal cache.",
		}),
		transportCreateCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rest_client_transport_create_calls_total",
			Help: "Requests for a transport, by result: hit, miss, miss-gc or uncacheable.",
		}, []string{"result"}),
		transportCAReloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rest_client_transport_ca_reload_total",
			Help: "CA reload attempts, by result and reason.",
		}, []string{"result", "reason"}),
		transportCertRotationGCCalls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rest_client_transport_cert_rotation_gc_calls_total",
			Help: "Certificate rotation goroutines stopped when their transport was garbage collected.",
		}),
		transportCacheGCCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rest_client_transport_cache_gc_calls_total",
			Help: "Attempts to delete a garbage-collected transport from the cache, by result: deleted or skipped.",
		}, []string{"result"}),
	}
	r.execPluginCertTTL = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "rest_client_exec_plugin_ttl_seconds",
		Help: "Seconds until the shortest-lived client certificate of an auth exec plugin expires (negative once expired); +Inf without one.",
	}, r.certTTL)
	if reg != nil {
		reg.MustRegister(
			r.requestLatency, r.requestSize, r.responseSize, r.rateLimiterLatency,
			r.requestResult, r.requestRetry,
			r.execPluginCertTTL, r.execPluginCertRotation, r.execPluginCalls,
			r.transportCacheEntries, r.transportCreateCalls, r.transportCAReloads,
			r.transportCertRotationGCCalls, r.transportCacheGCCalls,
		)
	}
	return r
}

// Options returns the adapters for client-go's metrics.Register. That
// registration is once per process (a sync.Once in client-go): main calls it
// once, and tests feed the adapters directly.
//
// kube-proxy registers the DNS resolver latency and the exec plugin policy
// adapters with client-go but never exports their metrics; they are left
// out here too.
func (r *RESTClient) Options() clientmetrics.RegisterOpts {
	return clientmetrics.RegisterOpts{
		ClientCertExpiry:             expiryAdapter{r},
		ClientCertRotationAge:        durationAdapter{r.execPluginCertRotation},
		RequestLatency:               latencyAdapter{r.requestLatency},
		RequestSize:                  sizeAdapter{r.requestSize},
		ResponseSize:                 sizeAdapter{r.responseSize},
		RateLimiterLatency:           latencyAdapter{r.rateLimiterLatency},
		RequestResult:                resultAdapter{r.requestResult},
		RequestRetry:                 resultAdapter{r.requestRetry},
		ExecPluginCalls:              callsAdapter{r.execPluginCalls},
		TransportCacheEntries:        gaugeAdapter{r.transportCacheEntries},
		TransportCreateCalls:         counterVecAdapter{r.transportCreateCalls},
		TransportCAReloads:           caReloadsAdapter{r.transportCAReloads},
		TransportCertRotationGCCalls: counterAdapter{r.transportCertRotationGCCalls},
		TransportCacheGCCalls:        counterVecAdapter{r.transportCacheGCCalls},
	}
}

func (r *RESTClient) certTTL() float64 {
	r.expiryMu.Lock()
	defer r.expiryMu.Unlock()
	if r.expiry == nil {
		return math.Inf(1)
	}
	return time.Until(*r.expiry).Seconds()
}

type expiryAdapter struct{ r *RESTClient }

func (a expiryAdapter) Set(expiry *time.Time) {
	a.r.expiryMu.Lock()
	defer a.r.expiryMu.Unlock()
	a.r.expiry = expiry
}

type durationAdapter struct{ h prometheus.Histogram }

func (a durationAdapter) Observe(d time.Duration) { a.h.Observe(d.Seconds()) }

// latencyAdapter labels by the URL's host only, never its path: a path
// names objects, which would make the series unbounded.
type latencyAdapter struct{ v *prometheus.HistogramVec }

func (a latencyAdapter) Observe(_ context.Context, verb string, u url.URL, latency time.Duration) {
	a.v.WithLabelValues(verb, u.Host).Observe(latency.Seconds())
}

type sizeAdapter struct{ v *prometheus.HistogramVec }

func (a sizeAdapter) Observe(_ context.Context, verb, host string, size float64) {
	a.v.WithLabelValues(verb, host).Observe(size)
}

// resultAdapter serves both RequestResult (code, method, host) and
// RequestRetry (code, verb, host): the same three values in the same order.
type resultAdapter struct{ v *prometheus.CounterVec }

func (a resultAdapter) Increment(_ context.Context, code, method, host string) {
	a.v.WithLabelValues(code, method, host).Inc()
}

func (a resultAdapter) IncrementRetry(_ context.Context, code, method, host string) {
	a.v.WithLabelValues(code, method, host).Inc()
}

type callsAdapter struct{ v *prometheus.CounterVec }

func (a callsAdapter) Increment(exitCode int, callStatus string) {
	a.v.WithLabelValues(strconv.Itoa(exitCode), callStatus).Inc()
}

type gaugeAdapter struct{ g prometheus.Gauge }

func (a gaugeAdapter) Observe(value int) { a.g.Set(float64(value)) }

type counterVecAdapter struct{ v *prometheus.CounterVec }

func (a counterVecAdapter) Increment(result string) { a.v.WithLabelValues(result).Inc() }

type caReloadsAdapter struct{ v *prometheus.CounterVec }

func (a caReloadsAdapter) Increment(result, reason string) { a.v.WithLabelValues(result, reason).Inc() }

type counterAdapter struct{ c prometheus.Counter }

func (a counterAdapter) Increment() { a.c.Inc() }
