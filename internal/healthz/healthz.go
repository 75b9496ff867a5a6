// Package healthz serves kube-proxy compatible health endpoints.
//
// /healthz says whether the datapath is being kept up to date, as
// kube-proxy's does: the proxy is healthy unless a change has been waiting
// for longer than a timeout without a sync that brought the datapath up to
// date since. The sync loop calls QueuedUpdate whenever a Service or
// EndpointSlice change is recorded (and once at start, so that a proxy that
// never completes its first sync turns unhealthy), and Updated after every
// sync that applied the desired state (one that left out only service ports
// that failed one by one, a full map for instance, counts).
//
// /livez says whether the process is worth restarting, which is narrower.
// A restart costs little (the datapath is pinned and keeps serving), but it
// cannot fix what lies outside the process: an unreachable API server, a
// map too small for the cluster, a kernel or another program refusing our
// writes. Restarting for those only adds a CrashLoopBackOff delay to the
// recovery. So /livez fails only when the sync loop is stuck: it has
// started, a change waits, and no sync attempt (successful or not) has
// ended for the timeout. The loop calls SyncLoopStarted when it starts and
// SyncFailed after each failed attempt. Before the loop starts (while the
// informers wait for the API server) the proxy is live.
//
// /healthz also answers 503 while the node is not eligible for traffic, as
// kube-proxy v1.36's: its Node is being deleted or carries the cluster
// autoscaler's ToBeDeletedByClusterAutoscaler taint (WithNodeEligible), so
// that cloud load balancers, which probe it, drain the node first.
//
// Both answer 200 or 503 with the same JSON body as kube-proxy, so existing
// probes and dashboards keep working.
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
	// loopStarted is set once the sync loop runs; lastAttempt is when it
	// started or last ended a sync attempt, whatever its outcome.
	loopStarted bool
	lastAttempt time.Time
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
	h.lastAttempt = now
}

// SyncFailed records a sync attempt that ended without bringing the
// datapath up to date: the queued changes still wait (for /healthz), but the
// sync loop is alive (for /livez).
func (h *ProxyHealth) SyncFailed() {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastAttempt = now
}

// SyncLoopStarted records that the sync loop runs: from now on /livez
// expects its attempts to end.
func (h *ProxyHealth) SyncLoopStarted() {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.loopStarted = true
	h.lastAttempt = now
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

// Live reports whether the sync loop is not stuck: it has not started yet,
// nothing waits for it, or it has ended an attempt (or started) less than
// timeout ago, or the change waiting was queued less than timeout ago. It
// returns lastUpdated and currentTime as Healthy does.
func (h *ProxyHealth) Live() (ok bool, lastUpdated, currentTime time.Time) {
	currentTime = h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	since := h.oldestQueued
	if h.lastAttempt.After(since) {
		since = h.lastAttempt
	}
	ok = !h.loopStarted || h.oldestQueued.IsZero() || currentTime.Sub(since) < h.timeout
	return ok, h.lastUpdated, currentTime
}

// status is the response body, field for field kube-proxy's (v1.36
// pkg/proxy/healthcheck ProxyHealth), for the one IP family served.
type status struct {
	// LastUpdated is, as kube-proxy's, the current time in a 200 answer
	// (older releases reported the last sync loop run, even without
	// changes) and the last successful sync in a 503 one.
	LastUpdated string `json:"lastUpdated"`
	CurrentTime string `json:"currentTime"`
	// NodeEligible is in /healthz answers only.
	NodeEligible *bool `json:"nodeEligible,omitempty"`
	// Healthy is the datapath's state (/healthz: kept up to date;
	// /livez: the sync loop not stuck), whatever NodeEligible says.
	Healthy bool `json:"healthy"`
	// Status holds it per IP family, once a sync has succeeded.
	Status map[string]familyStatus `json:"status,omitempty"`
}

type familyStatus struct {
	LastUpdated string `json:"lastUpdated"`
	Healthy     bool   `json:"healthy"`
}

// HandlerOption configures Handler.
type HandlerOption func(*handlerConfig)

type handlerConfig struct {
	healthz, livez func(code int)
	nodeEligible   func() bool
}

// WithCounts makes the handler tell healthz and livez the status code of
// every /healthz and /livez answer (200 or 503), for kube-proxy's
// kubeproxy_proxy_healthz_total and kubeproxy_proxy_livez_total.
func WithCounts(healthz, livez func(code int)) HandlerOption {
	return func(c *handlerConfig) { c.healthz, c.livez = healthz, livez }
}

// WithNodeEligible makes /healthz answer 503 while eligible says the node
// is not to take traffic (kube-proxy's NodeEligible: its Node is being
// deleted or tainted ToBeDeletedByClusterAutoscaler), so that cloud load
// balancers probing it drain the node before it goes. Without it the node
// is always eligible. /livez does not read it: a node being drained is no
// reason to restart the proxy.
func WithNodeEligible(eligible func() bool) HandlerOption {
	return func(c *handlerConfig) { c.nodeEligible = eligible }
}

// Handler serves GET (and HEAD) /healthz from h.Healthy and the node's
// eligibility, and /livez from h.Live. Other paths are 404, other methods
// 405.
func Handler(h *ProxyHealth, opts ...HandlerOption) http.Handler {
	c := handlerConfig{healthz: func(int) {}, livez: func(int) {}}
	for _, o := range opts {
		o(&c)
	}
	mux := http.NewServeMux()
	// A GET pattern also matches HEAD.
	mux.HandleFunc("GET /healthz", serveStatus(h.Healthy, c.nodeEligible, c.healthz))
	mux.HandleFunc("GET /livez", serveStatus(h.Live, nil, c.livez))
	return mux
}

// serveStatus answers 200 or 503 as check (and eligible, if set) says,
// with kube-proxy's body, and tells count the code.
func serveStatus(check func() (ok bool, lastUpdated, currentTime time.Time), eligible func() bool, count func(code int)) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		ok, lastUpdated, currentTime := check()
		st := status{CurrentTime: currentTime.Format(time.RFC3339Nano), Healthy: ok}
		serving := ok
		if eligible != nil {
			e := eligible()
			st.NodeEligible = &e
			serving = ok && e
		}
		if !lastUpdated.IsZero() {
			st.Status = map[string]familyStatus{"IPv4": {LastUpdated: lastUpdated.Format(time.RFC3339Nano), Healthy: ok}}
		}
		st.LastUpdated = lastUpdated.Format(time.RFC3339Nano)
		if serving {
			st.LastUpdated = st.CurrentTime
		}
		body, err := json.Marshal(st)
		if err != nil {
			// Strings and booleans cannot fail to marshal; keep the
			// probe honest anyway.
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		code := http.StatusOK
		if !serving {
			code = http.StatusServiceUnavailable
		}
		count(code)
		w.WriteHeader(code)
		if _, err := w.Write(body); err != nil {
			klog.V(4).InfoS("Writing health response", "err", err)
		}
	}
}

// ListenAndServe serves Handler(h) on addr until ctx is cancelled; see
// httpserve.ListenAndServe.
func ListenAndServe(ctx context.Context, addr string, h *ProxyHealth, opts ...HandlerOption) error {
	return httpserve.ListenAndServe(ctx, "healthz", addr, Handler(h, opts...))
}
