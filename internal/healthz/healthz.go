// Package healthz serves kube-proxy compatible health endpoints.
//
// The proxy is healthy unless a change has been waiting for longer than a
// timeout without a successful sync of the datapath since. The sync loop calls
// QueuedUpdate whenever a Service or EndpointSlice change is recorded (and once
// at start, so that a proxy that never completes its first sync turns
// unhealthy), and Updated after every successful sync. /healthz and /livez
// answer 200 when healthy and 503 otherwise, with the same JSON body as
// kube-proxy, so existing probes and dashboards keep working.
package healthz

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/httpserve"
)

// ProxyHealth tracks whether queued changes reach the datapath in time. It is
// safe for concurrent use.
type ProxyHealth struct {
	timeout time.Duration
	clock   clock.PassiveClock

	mu sync.Mutex
	// oldestQueued is when the oldest change not yet synced was queued; zero
	// when nothing is pending.
	oldestQueued time.Time
	// lastUpdated is when the last successful sync finished; zero before the
	// first one.
	lastUpdated time.Time
}

// NewProxyHealth returns a ProxyHealth that reports unhealthy once a queued
// change has waited for timeout or longer. clk may be nil for the real clock.
func NewProxyHealth(timeout time.Duration, clk clock.PassiveClock) *ProxyHealth {
	if clk == nil {
		clk = clock.RealClock{}
	}
	return &ProxyHealth{timeout: timeout, clock: clk}
}

// QueuedUpdate records that a change is waiting to be synced. Only the oldest
// pending change counts: later calls before the next Updated do not move the
// time.
func (h *ProxyHealth) QueuedUpdate() {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.oldestQueued.IsZero() {
		h.oldestQueued = now
	}
}

// Updated records a successful sync: every change queued so far is now in the
// datapath.
func (h *ProxyHealth) Updated() {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.oldestQueued = time.Time{}
	h.lastUpdated = now
}

// Healthy reports whether no change has been pending for timeout or longer,
// when the last successful sync happened (zero if never) and the current time.
func (h *ProxyHealth) Healthy() (ok bool, lastUpdated, currentTime time.Time) {
	currentTime = h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	ok = h.oldestQueued.IsZero() || currentTime.Sub(h.oldestQueued) < h.timeout
	return ok, h.lastUpdated, currentTime
}

// status is the response body, field for field kube-proxy's.
type status struct {
	LastUpdated string `json:"lastUpdated"`
	CurrentTime string `json:"currentTime"`
}

// Handler serves GET (and HEAD) /healthz and /livez from h. Other paths are
// 404, other methods 405.
func Handler(h *ProxyHealth) http.Handler {
	mux := http.NewServeMux()
	serve := func(w http.ResponseWriter, _ *http.Request) {
		ok, lastUpdated, currentTime := h.Healthy()
		body, err := json.Marshal(status{
			LastUpdated: lastUpdated.Format(time.RFC3339Nano),
			CurrentTime: currentTime.Format(time.RFC3339Nano),
		})
		if err != nil {
			// Two strings cannot fail to marshal; keep the probe honest anyway.
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if ok {
			w.WriteHeader(http.StatusOK)
		} else {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		if _, err := w.Write(body); err != nil {
			klog.V(4).InfoS("Writing health response", "err", err)
		}
	}
	// A GET pattern also matches HEAD.
	mux.HandleFunc("GET /healthz", serve)
	mux.HandleFunc("GET /livez", serve)
	return mux
}

// ListenAndServe serves Handler(h) on addr until ctx is cancelled; see
// httpserve.ListenAndServe.
func ListenAndServe(ctx context.Context, addr string, h *ProxyHealth) error {
	return httpserve.ListenAndServe(ctx, "healthz", addr, Handler(h))
}
