package healthcheck

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

var (
	web = model.ServiceName{Namespace: "ns-1", Name: "web"}
	api = model.ServiceName{Namespace: "ns-2", Name: "api"}

	loopback  = netip.MustParseAddr("127.0.0.1")
	loopback2 = netip.MustParseAddr("127.0.0.2")
)

// answer is what a health check port said.
type answer struct {
	code   int
	header http.Header
	body   string
}

// wantBody is kube-proxy's body, written out independently of bodyFormat.
func wantBody(name model.ServiceName, count int, healthy bool) string {
	return strings.Join([]string{
		"{",
		"\t\"service\": {",
		fmt.Sprintf("\t\t\"namespace\": \"%s\",", name.Namespace),
		fmt.Sprintf("\t\t\"name\": \"%s\"", name.Name),
		"\t},",
		fmt.Sprintf("\t\"localEndpoints\": %d,", count),
		fmt.Sprintf("\t\"serviceProxyHealthy\": %t", healthy),
		"}",
	}, "\n")
}

// checkAnswer asserts a complete kube-proxy answer.
func checkAnswer(t *testing.T, got answer, name model.ServiceName, wantCode, count int, healthy bool) {
	t.Helper()
	if got.code != wantCode {
		t.Errorf("status %d, want %d (body %q)", got.code, wantCode, got.body)
	}
	if want := wantBody(name, count, healthy); got.body != want {
		t.Errorf("body\n%q\nwant\n%q", got.body, want)
	}
	var payload struct {
		Service struct {
			Namespace, Name string
		}
		LocalEndpoints      int
		ServiceProxyHealthy bool
	}
	if err := json.Unmarshal([]byte(got.body), &payload); err != nil {
		t.Errorf("body is not JSON: %v", err)
	} else if payload.Service.Namespace != name.Namespace || payload.Service.Name != name.Name ||
		payload.LocalEndpoints != count || payload.ServiceProxyHealthy != healthy {
		t.Errorf("payload %+v, want %s with %d endpoints, healthy %t", payload, name, count, healthy)
	}
	for h, want := range map[string]string{
		"Content-Type":                     "application/json",
		"X-Content-Type-Options":           "nosniff",
		"X-Load-Balancing-Endpoint-Weight": strconv.Itoa(count),
	} {
		if v := got.header.Values(h); len(v) != 1 || v[0] != want {
			t.Errorf("header %s: %q, want %q", h, v, want)
		}
	}
}

// client makes one connection per request, so that a closed port shows at
// the next request; dial lets a test dial from another network namespace.
func client(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Client {
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	// The timeout only keeps a broken test from hanging.
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, DialContext: dial}}
}

func ask(c *http.Client, method, url string) (answer, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return answer{}, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, err
	}
	return answer{code: resp.StatusCode, header: resp.Header, body: string(body)}, nil
}

func get(t *testing.T, addr netip.AddrPort) answer {
	t.Helper()
	a, err := ask(client(nil), http.MethodGet, "http://"+addr.String()+"/healthz")
	if err != nil {
		t.Fatalf("GET %s: %v", addr, err)
	}
	return a
}

// refused asserts that nothing listens at addr.
func refused(t *testing.T, addr netip.AddrPort) {
	t.Helper()
	c, err := net.Dial("tcp4", addr.String())
	if err == nil {
		c.Close()
		t.Fatalf("%s accepts connections, want it closed", addr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dialling %s: %v, want connection refused", addr, err)
	}
}

// freePort is a port nobody listens on now on loopback.
func freePort(t *testing.T) uint16 {
	t.Helper()
	return uint16(testnet.FreePort(t))
}

// newServer is a Server on 127.0.0.1 whose health the test sets, closed
// when the test ends.
func newServer(t *testing.T, cfg Config) (*Server, *atomic.Bool) {
	t.Helper()
	healthy := &atomic.Bool{}
	healthy.Store(true)
	if cfg.Healthy == nil {
		cfg.Healthy = healthy.Load
	}
	s := New(cfg)
	s.SetAddresses(false, []netip.Addr{loopback})
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("closing: %v", err)
		}
	})
	return s, healthy
}

// TestAnswers follows one Service through kube-proxy's answers: 200 only
// with local endpoints and a healthy proxy, the count in the body and the
// weight header in every answer.
func TestAnswers(t *testing.T) {
	s, healthy := newServer(t, Config{})
	port := freePort(t)
	if err := s.SyncServices(map[model.ServiceName]uint16{web: port}); err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(loopback, port)
	steps := []struct {
		name     string
		local    map[model.ServiceName]int
		healthy  bool
		wantCode int
		want     int
	}{
		{name: "no endpoints synced yet", healthy: true, wantCode: 503, want: 0},
		{name: "three local endpoints", local: map[model.ServiceName]int{web: 3, api: 7}, healthy: true, wantCode: 200, want: 3},
		{name: "proxy unhealthy", local: map[model.ServiceName]int{web: 3}, healthy: false, wantCode: 503, want: 3},
		{name: "proxy healthy again", local: map[model.ServiceName]int{web: 3}, healthy: true, wantCode: 200, want: 3},
		{name: "zero local endpoints", local: map[model.ServiceName]int{web: 0}, healthy: true, wantCode: 503, want: 0},
		{name: "one local endpoint", local: map[model.ServiceName]int{web: 1}, healthy: true, wantCode: 200, want: 1},
		{name: "service absent from the counts", local: map[model.ServiceName]int{api: 5}, healthy: true, wantCode: 503, want: 0},
		{name: "unhealthy without endpoints", healthy: false, wantCode: 503, want: 0},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			s.SyncEndpoints(st.local)
			healthy.Store(st.healthy)
			checkAnswer(t, get(t, addr), web, st.wantCode, st.want, st.healthy)
		})
	}
}

// TestAnyRequest: kube-proxy's handler answers whatever the path and
// method, and load balancers probe various paths.
func TestAnyRequest(t *testing.T) {
	s, _ := newServer(t, Config{})
	port := freePort(t)
	if err := s.SyncServices(map[model.ServiceName]uint16{web: port}); err != nil {
		t.Fatal(err)
	}
	s.SyncEndpoints(map[model.ServiceName]int{web: 2})
	for _, req := range []struct{ method, path string }{
		{http.MethodGet, "/"}, {http.MethodGet, "/healthz"}, {http.MethodGet, "/some/probe?x=1"}, {http.MethodPost, "/healthz"},
	} {
		t.Run(req.method+" "+req.path, func(t *testing.T) {
			a, err := ask(client(nil), req.method, fmt.Sprintf("http://127.0.0.1:%d%s", port, req.path))
			if err != nil {
				t.Fatal(err)
			}
			checkAnswer(t, a, web, 200, 2, true)
		})
	}
	t.Run("HEAD", func(t *testing.T) {
		a, err := ask(client(nil), http.MethodHead, fmt.Sprintf("http://127.0.0.1:%d/healthz", port))
		if err != nil {
			t.Fatal(err)
		}
		if a.code != 200 || a.header.Get("X-Load-Balancing-Endpoint-Weight") != "2" || a.body != "" {
			t.Errorf("HEAD: %d %v %q, want 200, weight 2, no body", a.code, a.header, a.body)
		}
	})
}

// event is one recorded Event.
type event struct {
	ref                             v1.ObjectReference
	eventType, reason, action, note string
}

type recorder struct {
	mu     sync.Mutex
	events []event
}

func (r *recorder) Eventf(regarding runtime.Object, _ runtime.Object, eventType, reason, action, note string, args ...interface{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, event{ref: *regarding.(*v1.ObjectReference), eventType: eventType, reason: reason,
		action: action, note: fmt.Sprintf(note, args...)})
}

func (r *recorder) take() []event {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.events
	r.events = nil
	return out
}

// TestPortTaken: a port another process holds leaves that Service
// unserved, says so in an Event on it and in the error, serves the other
// Services, and is retried at every sync until it opens.
func TestPortTaken(t *testing.T) {
	rec := &recorder{}
	s, _ := newServer(t, Config{NodeName: "node-1", Recorder: rec,
		ServiceUID: func(n model.ServiceName) types.UID { return types.UID("uid-" + n.Name) }})
	squatter, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	taken := uint16(squatter.Addr().(*net.TCPAddr).Port)
	free := freePort(t)
	ports := map[model.ServiceName]uint16{web: taken, api: free}
	s.SyncEndpoints(map[model.ServiceName]int{web: 1, api: 2})

	for attempt := range 2 {
		err = s.SyncServices(ports)
		if err == nil || !strings.Contains(err.Error(), web.String()) || !strings.Contains(err.Error(), strconv.Itoa(int(taken))) ||
			strings.Contains(err.Error(), api.String()) {
			t.Fatalf("attempt %d: error %v, want one naming %s and port %d only", attempt, err, web, taken)
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			t.Errorf("attempt %d: error %v does not wrap EADDRINUSE", attempt, err)
		}
		evs := rec.take()
		if len(evs) != 1 {
			t.Fatalf("attempt %d: events %+v, want one", attempt, evs)
		}
		ev := evs[0]
		wantRef := v1.ObjectReference{APIVersion: "v1", Kind: "Service", Namespace: "ns-1", Name: "web", UID: "uid-web"}
		if ev.ref != wantRef || ev.eventType != v1.EventTypeWarning || ev.reason != "FailedToStartServiceHealthcheck" || ev.action != "Listen" {
			t.Errorf("attempt %d: event %+v", attempt, ev)
		}
		wantNote := fmt.Sprintf(`node node-1 failed to start healthcheck "ns-1/web" on port %d: `, taken)
		if !strings.HasPrefix(ev.note, wantNote) || !strings.Contains(ev.note, "address already in use") {
			t.Errorf("attempt %d: note %q, want %q followed by the error", attempt, ev.note, wantNote)
		}
		checkAnswer(t, get(t, netip.AddrPortFrom(loopback, free)), api, 200, 2, true)
	}

	// The other process lets go; the next sync opens the port.
	if err := squatter.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.SyncServices(ports); err != nil {
		t.Fatalf("after the port was freed: %v", err)
	}
	if evs := rec.take(); len(evs) != 0 {
		t.Errorf("events after success: %+v", evs)
	}
	checkAnswer(t, get(t, netip.AddrPortFrom(loopback, taken)), web, 200, 1, true)
	checkAnswer(t, get(t, netip.AddrPortFrom(loopback, free)), api, 200, 2, true)
}

// TestPortTakenOnOneAddress: a Service listens on all its addresses or on
// none, so that a retry starts afresh and no address is left half served.
func TestPortTakenOnOneAddress(t *testing.T) {
	s, _ := newServer(t, Config{})
	squatter, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close()
	port := uint16(squatter.Addr().(*net.TCPAddr).Port)
	s.SetAddresses(false, []netip.Addr{loopback, loopback2})
	if err := s.SyncServices(map[model.ServiceName]uint16{web: port}); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("error %v, want EADDRINUSE", err)
	}
	refused(t, netip.AddrPortFrom(loopback, port))
	squatter.Close()
	if err := s.SyncServices(map[model.ServiceName]uint16{web: port}); err != nil {
		t.Fatal(err)
	}
	for _, ip := range []netip.Addr{loopback, loopback2} {
		checkAnswer(t, get(t, netip.AddrPortFrom(ip, port)), web, 503, 0, true)
	}
}

// TestChanges: ports close when their Service goes or moves to another
// port or address, and the counts follow the Service, not its port.
func TestChanges(t *testing.T) {
	s, _ := newServer(t, Config{})
	p1, p2, p3 := freePort(t), freePort(t), freePort(t)
	at := func(ip netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(ip, port) }
	sync := func(ports map[model.ServiceName]uint16) {
		t.Helper()
		if err := s.SyncServices(ports); err != nil {
			t.Fatal(err)
		}
	}
	sync(map[model.ServiceName]uint16{web: p1, api: p2})
	s.SyncEndpoints(map[model.ServiceName]int{web: 4, api: 1})
	checkAnswer(t, get(t, at(loopback, p1)), web, 200, 4, true)
	checkAnswer(t, get(t, at(loopback, p2)), api, 200, 1, true)
	// Listening on the node port addresses only: not on 127.0.0.2.
	refused(t, at(loopback2, p1))

	t.Run("unchanged sync keeps serving", func(t *testing.T) {
		sync(map[model.ServiceName]uint16{web: p1, api: p2})
		checkAnswer(t, get(t, at(loopback, p1)), web, 200, 4, true)
	})
	t.Run("service removed", func(t *testing.T) {
		sync(map[model.ServiceName]uint16{web: p1})
		refused(t, at(loopback, p2))
		checkAnswer(t, get(t, at(loopback, p1)), web, 200, 4, true)
	})
	t.Run("port changed", func(t *testing.T) {
		sync(map[model.ServiceName]uint16{web: p3})
		refused(t, at(loopback, p1))
		checkAnswer(t, get(t, at(loopback, p3)), web, 200, 4, true)
	})
	t.Run("port moves to another service in one sync", func(t *testing.T) {
		sync(map[model.ServiceName]uint16{api: p3})
		checkAnswer(t, get(t, at(loopback, p3)), api, 200, 1, true)
	})
	t.Run("addresses changed", func(t *testing.T) {
		s.SetAddresses(false, []netip.Addr{loopback2})
		sync(map[model.ServiceName]uint16{api: p3})
		refused(t, at(loopback, p3))
		checkAnswer(t, get(t, at(loopback2, p3)), api, 200, 1, true)
	})
	t.Run("addresses added", func(t *testing.T) {
		s.SetAddresses(false, []netip.Addr{loopback2, loopback, loopback2})
		sync(map[model.ServiceName]uint16{api: p3})
		checkAnswer(t, get(t, at(loopback, p3)), api, 200, 1, true)
		checkAnswer(t, get(t, at(loopback2, p3)), api, 200, 1, true)
	})
	t.Run("no address matches", func(t *testing.T) {
		s.SetAddresses(false, nil)
		sync(map[model.ServiceName]uint16{api: p3})
		refused(t, at(loopback, p3))
		refused(t, at(loopback2, p3))
	})
	t.Run("every service removed", func(t *testing.T) {
		s.SetAddresses(false, []netip.Addr{loopback})
		sync(map[model.ServiceName]uint16{api: p3})
		get(t, at(loopback, p3))
		sync(nil)
		refused(t, at(loopback, p3))
	})
	t.Run("closed", func(t *testing.T) {
		sync(map[model.ServiceName]uint16{web: p1})
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		refused(t, at(loopback, p1))
		if err := s.SyncServices(map[model.ServiceName]uint16{web: p1}); err == nil {
			t.Error("SyncServices after Close succeeded")
		}
		refused(t, at(loopback, p1))
	})
}

// TestConcurrentSyncs runs probes against syncs that change counts, ports
// and health, for the race detector; every answer must be a whole one.
func TestConcurrentSyncs(t *testing.T) {
	var healthy atomic.Bool
	s, _ := newServer(t, Config{Healthy: healthy.Load})
	p1, p2 := freePort(t), freePort(t)
	if err := s.SyncServices(map[model.ServiceName]uint16{web: p1, api: p2}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var answers atomic.Int64
	for _, port := range []uint16{p1, p1, p2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := client(nil)
			for ctx.Err() == nil {
				a, err := ask(c, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/", port))
				if err != nil {
					// The port is closed and reopened below.
					continue
				}
				answers.Add(1)
				if a.code != 200 && a.code != 503 {
					t.Errorf("status %d", a.code)
				}
				if a.body != "" && !json.Valid([]byte(a.body)) {
					t.Errorf("body %q", a.body)
				}
			}
		}()
	}
	for i := range 300 {
		healthy.Store(i%3 != 0)
		s.SyncEndpoints(map[model.ServiceName]int{web: i % 4, api: i % 2})
		ports := map[model.ServiceName]uint16{web: p1, api: p2}
		if i%50 == 49 {
			delete(ports, api)
		}
		if err := s.SyncServices(ports); err != nil {
			t.Error(err)
		}
		if i%100 == 0 {
			// Let the probes through between bursts of syncs.
			for n := answers.Load(); answers.Load() < n+10; {
				time.Sleep(time.Millisecond)
			}
		}
	}
	cancel()
	wg.Wait()
}

// On a dual-stack node each family's proxier syncs its own Services and
// counts: a dual-stack Service's port listens in both families (tcp4 and
// tcp6 side by side, on the wildcard addresses here) and a probe is
// answered with the local endpoints of the family it arrived in, as by
// kube-proxy's two per-family servers; an IPv6-only Service's port
// listens on IPv6 alone.
func TestPerFamily(t *testing.T) {
	s := New(Config{})
	t.Cleanup(func() { s.Close() })
	loop6 := netip.MustParseAddr("::1")
	s.SetAddressesFor(model.IPv4, true, nil)
	s.SetAddressesFor(model.IPv6, true, nil)
	port, port6 := freePort(t), freePort(t)
	if err := s.SyncServicesFor(model.IPv4, map[model.ServiceName]uint16{web: port}); err != nil {
		t.Fatal(err)
	}
	if err := s.SyncServicesFor(model.IPv6, map[model.ServiceName]uint16{web: port, api: port6}); err != nil {
		t.Fatal(err)
	}
	s.SyncEndpointsFor(model.IPv4, map[model.ServiceName]int{web: 2})
	s.SyncEndpointsFor(model.IPv6, map[model.ServiceName]int{api: 1})
	checkAnswer(t, get(t, netip.AddrPortFrom(loopback, port)), web, 200, 2, true)
	checkAnswer(t, get(t, netip.AddrPortFrom(loop6, port)), web, 503, 0, true)
	checkAnswer(t, get(t, netip.AddrPortFrom(loop6, port6)), api, 200, 1, true)
	refused(t, netip.AddrPortFrom(loopback, port6))

	// IPv4's proxier drops the Service: its IPv6 port stays.
	if err := s.SyncServicesFor(model.IPv4, nil); err != nil {
		t.Fatal(err)
	}
	refused(t, netip.AddrPortFrom(loopback, port))
	checkAnswer(t, get(t, netip.AddrPortFrom(loop6, port)), web, 503, 0, true)
}
