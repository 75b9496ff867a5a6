// Package healthz serves kube-proxy compatible health endpoints.
//
// /healthz says whether the datapath is being kept up to date, as
// kube-proxy's does: the proxy is healthy unless a change has been waiting
// for longer than a timeout without a sync that brought the datapath up to
// date since. Each IP family's proxier reports on its own (a dual-stack
// node runs two, as kube-proxy does), and one family's stale change is
// enough to fail /healthz. The sync loop calls QueuedUpdate whenever a Service or
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
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// ProxyHealth tracks whether queued changes reach the datapath in time, per
// IP family, as kube-proxy's ProxyHealthServer does: each family's proxier
// reports its own queued changes and syncs, and the proxy is unhealthy as
// soon as one family's oldest pending change has waited for the timeout.
// It is safe for concurrent use.
type ProxyHealth struct {
	timeout time.Duration
	clock   clock.PassiveClock

	mu       sync.Mutex
	families map[model.IPFamily]*familyHealth
}

// familyHealth is one family's proxier's state.
type familyHealth struct {
	// oldestQueued is when the oldest change not yet synced was queued;
	// zero when nothing is pending.
	oldestQueued time.Time
	// lastUpdated is when the last successful sync finished; zero before
	// the first one.
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
	return &ProxyHealth{timeout: timeout, clock: clk, families: map[model.IPFamily]*familyHealth{}}
}

// family returns f's state, creating it. Call with mu held.
func (h *ProxyHealth) family(f model.IPFamily) *familyHealth {
	fh := h.families[f]
	if fh == nil {
		fh = &familyHealth{}
		h.families[f] = fh
	}
	return fh
}

// QueuedUpdate records that a change is waiting to be synced by f's
// proxier. Only the oldest pending change counts: later calls before the
// next Updated do not move the time.
func (h *ProxyHealth) QueuedUpdate(f model.IPFamily) {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if fh := h.family(f); fh.oldestQueued.IsZero() {
		fh.oldestQueued = now
	}
}

// Updated records a successful sync of f's proxier: every change it had
// queued so far is now in its datapath.
func (h *ProxyHealth) Updated(f model.IPFamily) {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	fh := h.family(f)
	fh.oldestQueued = time.Time{}
	fh.lastUpdated = now
	fh.lastAttempt = now
}

// SyncFailed records a sync attempt of f's proxier that ended without
// bringing its datapath up to date: the queued changes still wait (for
// /healthz), but the sync loop is alive (for /livez).
func (h *ProxyHealth) SyncFailed(f model.IPFamily) {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.family(f).lastAttempt = now
}

// SyncLoopStarted records that f's sync loop runs: from now on /livez
// expects its attempts to end.
func (h *ProxyHealth) SyncLoopStarted(f model.IPFamily) {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	fh := h.family(f)
	fh.loopStarted = true
	fh.lastAttempt = now
}

// Health is what /healthz and /livez report, as kube-proxy's ProxyHealth.
type Health struct {
	// Healthy holds when every family is.
	Healthy bool
	// LastUpdated is the latest successful sync of any family (zero if
	// none).
	LastUpdated time.Time
	CurrentTime time.Time
	// Families holds each family that has synced.
	Families map[model.IPFamily]FamilyHealth
}

// FamilyHealth is one family's part of Health.
type FamilyHealth struct {
	LastUpdated time.Time
	Healthy     bool
}

// Health reports, per family and overall, whether no change has been
// pending for timeout or longer.
func (h *ProxyHealth) Health() Health {
	return h.report(func(fh *familyHealth, now time.Time) bool {
		return fh.oldestQueued.IsZero() || now.Sub(fh.oldestQueued) < h.timeout
	})
}

// Liveness reports, per family and overall, whether the sync loop is not
// stuck: it has not started yet, nothing waits for it, or it has ended an
// attempt (or started) less than timeout ago, or the change waiting was
// queued less than timeout ago.
func (h *ProxyHealth) Liveness() Health {
	return h.report(func(fh *familyHealth, now time.Time) bool {
		since := fh.oldestQueued
		if fh.lastAttempt.After(since) {
			since = fh.lastAttempt
		}
		return !fh.loopStarted || fh.oldestQueued.IsZero() || now.Sub(since) < h.timeout
	})
}

func (h *ProxyHealth) report(ok func(*familyHealth, time.Time) bool) Health {
	now := h.clock.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	r := Health{Healthy: true, CurrentTime: now, Families: map[model.IPFamily]FamilyHealth{}}
	for f, fh := range h.families {
		good := ok(fh, now)
		r.Healthy = r.Healthy && good
		if fh.lastUpdated.After(r.LastUpdated) {
			r.LastUpdated = fh.lastUpdated
		}
		// As kube-proxy, a family is listed once it has synced. Unlike
		// kube-proxy's, a family that never has still counts: one
		// whose first sync never succeeds makes the proxy unhealthy.
		if !fh.lastUpdated.IsZero() {
			r.Families[f] = FamilyHealth{LastUpdated: fh.lastUpdated, Healthy: good}
		}
	}
	return r
}

// Healthy reports whether no family has had a change pending for timeout
// or longer, when the last successful sync of any family happened (zero if
// never) and the current time.
func (h *ProxyHealth) Healthy() (ok bool, lastUpdated, currentTime time.Time) {
	r := h.Health()
	return r.Healthy, r.LastUpdated, r.CurrentTime
}

// Live is Liveness's verdict, with lastUpdated and currentTime as Healthy.
func (h *ProxyHealth) Live() (ok bool, lastUpdated, currentTime time.Time) {
	r := h.Liveness()
	return r.Healthy, r.LastUpdated, r.CurrentTime
}

// status is the response body, field for field kube-proxy's (v1.36
// pkg/proxy/healthcheck ProxyHealth).
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
	// Status holds it per IP family ("IPv4", "IPv6"), once that family
	// has synced.
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
	mux.HandleFunc("GET /healthz", serveStatus(h.Health, c.nodeEligible, c.healthz))
	mux.HandleFunc("GET /livez", serveStatus(h.Liveness, nil, c.livez))
	return mux
}

// serveStatus answers 200 or 503 as check (and eligible, if set) says,
// with kube-proxy's body, and tells count the code.
func serveStatus(check func() Health, eligible func() bool, count func(code int)) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		r := check()
		ok, lastUpdated, currentTime := r.Healthy, r.LastUpdated, r.CurrentTime
		st := status{CurrentTime: currentTime.Format(time.RFC3339Nano), Healthy: ok}
		serving := ok
		if eligible != nil {
			e := eligible()
			st.NodeEligible = &e
			serving = ok && e
		}
		if len(r.Families) > 0 {
			st.Status = make(map[string]familyStatus, len(r.Families))
			for f, fh := range r.Families {
				st.Status[f.String()] = familyStatus{LastUpdated: fh.LastUpdated.Format(time.RFC3339Nano), Healthy: fh.Healthy}
			}
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
