package metrics

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	clientmetrics "k8s.io/client-go/tools/metrics"
)

// TestRESTClientMetrics makes real client-go requests and reads them back
// with kube-proxy's names and labels. client-go's Register works once per
// process: this is the only test of the package that calls it.
func TestRESTClientMetrics(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if strings.HasSuffix(r.URL.Path, "/missing") {
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}`))
			return
		}
		_, _ = w.Write([]byte(`{"kind":"Service","apiVersion":"v1","metadata":{"name":"web","namespace":"default"}}`))
	}))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")

	reg := prometheus.NewRegistry()
	rc := NewRESTClient(reg)
	clientmetrics.Register(rc.Options())
	client, err := kubernetes.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := client.CoreV1().Services("default").Get(ctx, "web", metav1.GetOptions{}); err != nil {
		t.Fatalf("GET web: %v", err)
	}
	if _, err := client.CoreV1().Services("default").Get(ctx, "missing", metav1.GetOptions{}); err == nil {
		t.Fatal("GET missing succeeded, want 404")
	}

	want := `
# HELP rest_client_requests_total HTTP requests to the API server, by status code, method and host.
# TYPE rest_client_requests_total counter
rest_client_requests_total{code="200",host="HOST",method="GET"} 1
rest_client_requests_total{code="404",host="HOST",method="GET"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(strings.ReplaceAll(want, "HOST", host)), "rest_client_requests_total"); err != nil {
		t.Error(err)
	}
	f := gather(t, reg, "rest_client_request_duration_seconds")
	if f == nil || len(f.GetMetric()) != 1 {
		t.Fatalf("rest_client_request_duration_seconds: %v, want one series", f)
	}
	m := f.GetMetric()[0]
	if got := labels(m); got != "host="+host+",verb=GET" {
		t.Errorf("duration labels %s, want host=%s,verb=GET", got, host)
	}
	var bounds []float64
	for _, b := range m.GetHistogram().GetBucket() {
		bounds = append(bounds, b.GetUpperBound())
	}
	if want := []float64{0.005, 0.025, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60}; !slices.Equal(bounds, want) {
		t.Errorf("duration buckets %v, want kube-proxy's %v", bounds, want)
	}
	if m.GetHistogram().GetSampleCount() != 2 {
		t.Errorf("%d durations observed, want 2", m.GetHistogram().GetSampleCount())
	}
	if f := gather(t, reg, "rest_client_response_size_bytes"); f == nil {
		t.Error("rest_client_response_size_bytes not observed")
	}
}

// The adapters' label names, fed directly (Register above already took the
// process's one registration).
func TestRESTClientAdapters(t *testing.T) {
	reg := prometheus.NewRegistry()
	o := NewRESTClient(reg).Options()
	ctx := context.Background()
	o.RequestRetry.IncrementRetry(ctx, "503", "GET", "api:6443")
	o.RateLimiterLatency.Observe(ctx, "LIST", url.URL{Host: "api:6443", Path: "/api/v1/services"}, 0)
	o.ExecPluginCalls.Increment(1, "plugin_execution_error")
	o.TransportCreateCalls.Increment("miss")
	o.TransportCAReloads.Increment("success", "rotated")
	o.TransportCacheEntries.Observe(2)
	want := map[string]string{
		"rest_client_request_retries_total":         "code=503,host=api:6443,verb=GET",
		"rest_client_rate_limiter_duration_seconds": "host=api:6443,verb=LIST",
		"rest_client_exec_plugin_call_total":        "call_status=plugin_execution_error,code=1",
		"rest_client_transport_create_calls_total":  "result=miss",
		"rest_client_transport_ca_reload_total":     "reason=rotated,result=success",
		"rest_client_transport_cache_entries":       "",
		"rest_client_exec_plugin_ttl_seconds":       "",
	}
	for name, wantLabels := range want {
		f := gather(t, reg, name)
		if f == nil || len(f.GetMetric()) != 1 {
			t.Errorf("%s: %v, want one series", name, f)
			continue
		}
		if got := labels(f.GetMetric()[0]); got != wantLabels {
			t.Errorf("%s: labels %q, want %q", name, got, wantLabels)
		}
	}
	if got := testutil.ToFloat64(prometheus.Collector(NewRESTClient(nil).execPluginCertTTL)); got <= 0 {
		t.Errorf("exec plugin TTL without a certificate = %v, want +Inf", got)
	}
}

func labels(m *dto.Metric) string {
	var parts []string
	for _, l := range m.GetLabel() {
		parts = append(parts, l.GetName()+"="+l.GetValue())
	}
	return strings.Join(parts, ",")
}
