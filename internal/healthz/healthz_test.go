package healthz

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/httpserve"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC)

const timeout = 2 * time.Minute

type action int

const (
	queue action = iota
	update
	fail      // SyncFailed
	loopStart // SyncLoopStarted
	step
)

type op struct {
	action action
	d      time.Duration // for step
}

func TestProxyHealth(t *testing.T) {
	tests := []struct {
		name            string
		ops             []op
		wantOK          bool
		wantLive        bool
		wantLastUpdated time.Duration // offset from t0; -1 for never
	}{
		{name: "fresh", wantOK: true, wantLive: true, wantLastUpdated: -1},
		{name: "fresh after a long time", ops: []op{{step, time.Hour}}, wantOK: true, wantLive: true, wantLastUpdated: -1},
		{
			name:   "queued at start, timeout not reached",
			ops:    []op{{queue, 0}, {step, timeout - time.Nanosecond}},
			wantOK: true, wantLive: true, wantLastUpdated: -1,
		},
		{
			name:   "queued at start, first sync never done",
			ops:    []op{{queue, 0}, {step, timeout}},
			wantOK: false, wantLive: true, wantLastUpdated: -1,
		},
		{
			name:   "first sync done in time",
			ops:    []op{{queue, 0}, {step, time.Second}, {update, 0}, {step, time.Hour}},
			wantOK: true, wantLive: true, wantLastUpdated: time.Second,
		},
		{
			name:   "later queued updates do not move the oldest",
			ops:    []op{{queue, 0}, {step, time.Minute}, {queue, 0}, {step, time.Minute}, {queue, 0}},
			wantOK: false, wantLive: true, wantLastUpdated: -1,
		},
		{
			name: "sync after timeout recovers",
			ops: []op{
				{queue, 0}, {step, 3 * time.Minute},
				{update, 0},
			},
			wantOK: true, wantLive: true, wantLastUpdated: 3 * time.Minute,
		},
		{
			name: "queued after a sync, stuck since",
			ops: []op{
				{queue, 0}, {update, 0}, {step, time.Hour},
				{queue, 0}, {step, timeout},
			},
			wantOK: false, wantLive: true, wantLastUpdated: 0,
		},
		{
			name: "syncs keep up with a stream of changes",
			ops: []op{
				{queue, 0}, {step, time.Minute}, {update, 0},
				{queue, 0}, {step, time.Minute}, {update, 0},
				{queue, 0}, {step, time.Minute},
			},
			wantOK: true, wantLive: true, wantLastUpdated: 2 * time.Minute,
		},
		{
			name:   "loop started, first sync attempt never ends",
			ops:    []op{{queue, 0}, {loopStart, 0}, {step, timeout}},
			wantOK: false, wantLive: false, wantLastUpdated: -1,
		},
		{
			name:   "waiting for the informers is not stuck: the loop's clock starts with it",
			ops:    []op{{queue, 0}, {step, 10 * timeout}, {loopStart, 0}, {step, timeout - time.Nanosecond}},
			wantOK: false, wantLive: true, wantLastUpdated: -1,
		},
		{
			name: "every sync fails: unhealthy but live",
			ops: []op{
				{queue, 0}, {loopStart, 0},
				{step, time.Minute}, {fail, 0},
				{step, time.Minute}, {fail, 0},
				{step, time.Minute}, {fail, 0},
				{step, timeout - time.Nanosecond},
			},
			wantOK: false, wantLive: true, wantLastUpdated: -1,
		},
		{
			name: "a failed sync, then the next attempt never ends",
			ops: []op{
				{queue, 0}, {loopStart, 0},
				{step, time.Minute}, {fail, 0},
				{step, timeout},
			},
			wantOK: false, wantLive: false, wantLastUpdated: -1,
		},
		{
			name:   "idle loop with nothing waiting",
			ops:    []op{{queue, 0}, {loopStart, 0}, {update, 0}, {step, time.Hour}},
			wantOK: true, wantLive: true, wantLastUpdated: 0,
		},
		{
			name: "change queued after a long idle time, never synced",
			ops: []op{
				{queue, 0}, {loopStart, 0}, {update, 0}, {step, time.Hour},
				{queue, 0}, {step, timeout},
			},
			wantOK: false, wantLive: false, wantLastUpdated: 0,
		},
		{
			name: "change queued after a long idle time, within the timeout",
			ops: []op{
				{queue, 0}, {loopStart, 0}, {update, 0}, {step, time.Hour},
				{queue, 0}, {step, timeout - time.Nanosecond},
			},
			wantOK: true, wantLive: true, wantLastUpdated: 0,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clk := clocktesting.NewFakePassiveClock(t0)
			h := NewProxyHealth(timeout, clk)
			for _, o := range tc.ops {
				switch o.action {
				case queue:
					h.QueuedUpdate(model.IPv4)
				case update:
					h.Updated(model.IPv4)
				case fail:
					h.SyncFailed(model.IPv4)
				case loopStart:
					h.SyncLoopStarted(model.IPv4)
				case step:
					clk.SetTime(clk.Now().Add(o.d))
				}
			}
			ok, last, now := h.Healthy()
			if ok != tc.wantOK {
				t.Errorf("Healthy() ok = %v, want %v", ok, tc.wantOK)
			}
			live, liveLast, liveNow := h.Live()
			if live != tc.wantLive {
				t.Errorf("Live() ok = %v, want %v", live, tc.wantLive)
			}
			if !liveLast.Equal(last) || !liveNow.Equal(now) {
				t.Errorf("Live() times %v, %v differ from Healthy()'s %v, %v", liveLast, liveNow, last, now)
			}
			wantLast := time.Time{}
			if tc.wantLastUpdated >= 0 {
				wantLast = t0.Add(tc.wantLastUpdated)
			}
			if !last.Equal(wantLast) {
				t.Errorf("lastUpdated = %v, want %v", last, wantLast)
			}
			if !now.Equal(clk.Now()) {
				t.Errorf("currentTime = %v, want %v", now, clk.Now())
			}
		})
	}
}

func TestHandler(t *testing.T) {
	clk := clocktesting.NewFakePassiveClock(t0)
	h := NewProxyHealth(timeout, clk)
	// counted and want hold the answers counted per "path code", as
	// kube-proxy's kubeproxy_proxy_{healthz,livez}_total count them.
	var mu sync.Mutex
	counted, want := map[string]int{}, map[string]int{}
	counter := func(path string) func(int) {
		return func(code int) {
			mu.Lock()
			defer mu.Unlock()
			counted[fmt.Sprintf("%s %d", path, code)]++
		}
	}
	var eligible atomic.Bool
	eligible.Store(true)
	srv := httptest.NewServer(Handler(h, WithCounts(counter("/healthz"), counter("/livez")), WithNodeEligible(eligible.Load)))
	t.Cleanup(srv.Close)

	type check struct {
		method, path string
		wantCode     int
	}
	probes := func(healthz, livez int) []check {
		return []check{
			{http.MethodGet, "/healthz", healthz},
			{http.MethodGet, "/livez", livez},
			{http.MethodHead, "/healthz", healthz},
			{http.MethodHead, "/livez", livez},
		}
	}
	ok, unavailable := http.StatusOK, http.StatusServiceUnavailable
	tests := []struct {
		name            string
		before          func()
		checks          []check
		wantLastUpdated time.Time
		// ineligible: the node is not eligible, the datapath healthy.
		ineligible bool
	}{
		{
			name:   "healthy at start",
			before: func() {},
			checks: probes(ok, ok),
		},
		{
			name:   "first sync pending, within timeout",
			before: func() { h.QueuedUpdate(model.IPv4); clk.SetTime(t0.Add(time.Minute)) },
			checks: probes(ok, ok),
		},
		{
			name:   "first sync pending past timeout, sync loop not started: unhealthy, live",
			before: func() { clk.SetTime(t0.Add(timeout)) },
			checks: probes(unavailable, ok),
		},
		{
			name:   "sync loop started, its first attempt stuck",
			before: func() { h.SyncLoopStarted(model.IPv4); clk.SetTime(clk.Now().Add(timeout)) },
			checks: probes(unavailable, unavailable),
		},
		{
			name:   "a failed attempt: unhealthy, live",
			before: func() { h.SyncFailed(model.IPv4) },
			checks: probes(unavailable, ok),
		},
		{
			name:            "synced",
			before:          func() { clk.SetTime(clk.Now().Add(time.Second)); h.Updated(model.IPv4) },
			checks:          probes(ok, ok),
			wantLastUpdated: t0.Add(2*timeout + time.Second),
		},
		{
			name:            "stuck again",
			before:          func() { h.QueuedUpdate(model.IPv4); clk.SetTime(clk.Now().Add(timeout)) },
			checks:          probes(unavailable, unavailable),
			wantLastUpdated: t0.Add(2*timeout + time.Second),
		},
		{
			// kube-proxy v1.36: a Node being deleted, or tainted by the
			// cluster autoscaler, fails /healthz for load balancers to
			// drain it; /livez does not care.
			name:            "node not eligible",
			before:          func() { h.Updated(model.IPv4); eligible.Store(false) },
			checks:          probes(unavailable, ok),
			wantLastUpdated: t0.Add(3*timeout + time.Second),
			ineligible:      true,
		},
		{
			name:            "eligible again",
			before:          func() { eligible.Store(true) },
			checks:          probes(ok, ok),
			wantLastUpdated: t0.Add(3*timeout + time.Second),
		},
		{
			name:   "unknown paths and methods",
			before: func() {},
			checks: []check{
				{http.MethodGet, "/", http.StatusNotFound},
				{http.MethodGet, "/healthz/", http.StatusNotFound},
				{http.MethodGet, "/readyz", http.StatusNotFound},
				{http.MethodPost, "/healthz", http.StatusMethodNotAllowed},
			},
		},
	}
	// The cases run in order: each one moves the same health state on.
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.before()
			for _, c := range tc.checks {
				if c.wantCode == http.StatusOK || c.wantCode == http.StatusServiceUnavailable {
					want[fmt.Sprintf("%s %d", c.path, c.wantCode)]++
				}
				req, err := http.NewRequest(c.method, srv.URL+c.path, nil)
				if err != nil {
					t.Fatal(err)
				}
				resp, err := srv.Client().Do(req)
				if err != nil {
					t.Fatalf("%s %s: %v", c.method, c.path, err)
				}
				var body map[string]any
				decodeErr := json.NewDecoder(resp.Body).Decode(&body)
				_ = resp.Body.Close()
				if resp.StatusCode != c.wantCode {
					t.Errorf("%s %s: status %d, want %d", c.method, c.path, resp.StatusCode, c.wantCode)
				}
				if c.wantCode != http.StatusOK && c.wantCode != http.StatusServiceUnavailable {
					continue
				}
				if got := resp.Header.Get("Content-Type"); got != "application/json" {
					t.Errorf("%s %s: Content-Type %q", c.method, c.path, got)
				}
				if got := resp.Header.Get("X-Content-Type-Options"); got != "nosniff" {
					t.Errorf("%s %s: X-Content-Type-Options %q", c.method, c.path, got)
				}
				if c.method == http.MethodHead {
					continue
				}
				if decodeErr != nil {
					t.Fatalf("%s %s: decoding body: %v", c.method, c.path, decodeErr)
				}
				// kube-proxy's body: lastUpdated is the current time in a
				// 200 answer; healthy is the datapath's state, whatever
				// nodeEligible says; status is per IP family, once synced.
				now := clk.Now().Format(time.RFC3339Nano)
				healthy := c.wantCode == http.StatusOK || (tc.ineligible && c.path == "/healthz")
				want := map[string]any{
					"lastUpdated": tc.wantLastUpdated.Format(time.RFC3339Nano),
					"currentTime": now,
					"healthy":     healthy,
				}
				if c.wantCode == http.StatusOK {
					want["lastUpdated"] = now
				}
				if c.path == "/healthz" {
					want["nodeEligible"] = !tc.ineligible
				}
				if !tc.wantLastUpdated.IsZero() {
					want["status"] = map[string]any{"IPv4": map[string]any{
						"lastUpdated": tc.wantLastUpdated.Format(time.RFC3339Nano), "healthy": healthy}}
				}
				if !reflect.DeepEqual(body, want) {
					t.Errorf("%s %s: body %v, want %v", c.method, c.path, body, want)
				}
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	if !maps.Equal(counted, want) {
		t.Errorf("answers counted %v, want %v", counted, want)
	}
}

func TestServedUntilCancel(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	errc := make(chan error, 1)
	go func() { errc <- httpserve.Serve(ctx, "healthz", ln, Handler(NewProxyHealth(timeout, nil))) }()

	resp, err := http.Get("http://" + ln.Addr().String() + "/livez")
	if err != nil {
		t.Fatalf("GET /livez: %v", err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /livez: status %d, want 200", resp.StatusCode)
	}

	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("Serve returned %v after cancel, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("server did not stop after its context was cancelled")
	}
}

func TestListenAndServeStopsOnCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	errc := make(chan error, 1)
	go func() { errc <- ListenAndServe(ctx, "127.0.0.1:0", NewProxyHealth(timeout, nil)) }()
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("ListenAndServe returned %v after cancel, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("ListenAndServe did not return after its context was cancelled")
	}
}

// On a dual-stack node each family's proxier reports on its own, as in
// kube-proxy's ProxyHealthServer: one family's stale change is enough to
// make /healthz fail, the body lists each family that has synced, and the
// top-level lastUpdated of a 503 is the latest sync of any family.
func TestHandlerPerFamily(t *testing.T) {
	clk := clocktesting.NewFakePassiveClock(t0)
	h := NewProxyHealth(timeout, clk)
	srv := httptest.NewServer(Handler(h))
	t.Cleanup(srv.Close)
	get := func() (int, status) {
		t.Helper()
		resp, err := http.Get(srv.URL + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var st status
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, st
	}
	for _, f := range model.Families {
		h.QueuedUpdate(f)
		h.SyncLoopStarted(f)
	}
	clk.SetTime(t0.Add(time.Second))
	h.Updated(model.IPv4)
	// IPv6's first sync has not succeeded within the timeout.
	clk.SetTime(t0.Add(timeout))
	code, st := get()
	if code != http.StatusServiceUnavailable || st.Healthy {
		t.Errorf("IPv6 stale: %d healthy=%v, want 503 unhealthy", code, st.Healthy)
	}
	if want := t0.Add(time.Second).Format(time.RFC3339Nano); st.LastUpdated != want {
		t.Errorf("lastUpdated %q, want IPv4's sync %q", st.LastUpdated, want)
	}
	if got := st.Status["IPv4"]; !got.Healthy || len(st.Status) != 1 {
		t.Errorf("status %+v, want IPv4 alone (IPv6 never synced), healthy", st.Status)
	}

	clk.SetTime(t0.Add(timeout + time.Second))
	h.Updated(model.IPv6)
	h.QueuedUpdate(model.IPv4)
	clk.SetTime(t0.Add(3 * timeout))
	code, st = get()
	if code != http.StatusServiceUnavailable || st.Status["IPv4"].Healthy || !st.Status["IPv6"].Healthy {
		t.Errorf("IPv4 stale: %d %+v, want 503, IPv4 unhealthy, IPv6 healthy", code, st.Status)
	}
	if want := t0.Add(timeout + time.Second).Format(time.RFC3339Nano); st.LastUpdated != want || st.Status["IPv6"].LastUpdated != want {
		t.Errorf("lastUpdated %q (IPv6 %q), want IPv6's sync %q", st.LastUpdated, st.Status["IPv6"].LastUpdated, want)
	}

	h.Updated(model.IPv4)
	if code, st = get(); code != http.StatusOK || !st.Healthy || len(st.Status) != 2 {
		t.Errorf("both synced: %d %+v, want 200 and both families", code, st)
	}
}
