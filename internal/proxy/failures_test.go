package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/events"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/healthz"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

const mapFullMsg = "service map full: all 64 entries are in use; raise --bpf-service-ports-max"

// scriptedDataplane records snapshots and fails the service ports it is
// told to, one by one, as the eBPF reconciler does when a map is full; or
// the whole sync.
type scriptedDataplane struct {
	mu    sync.Mutex
	snaps []*model.Snapshot
	// failPorts maps a service port to the error programming it gets.
	failPorts map[model.ServicePortName]string
	// wholeErr fails the sync as a whole (SyncError.Err, or the error
	// itself when no port fails).
	wholeErr error
	synced   chan struct{}
}

func newScriptedDataplane() *scriptedDataplane {
	return &scriptedDataplane{failPorts: map[model.ServicePortName]string{}, synced: make(chan struct{}, 1000)}
}

func (d *scriptedDataplane) Sync(_ context.Context, snap *model.Snapshot) error {
	d.mu.Lock()
	defer func() {
		d.mu.Unlock()
		select {
		case d.synced <- struct{}{}:
		default:
		}
	}()
	d.snaps = append(d.snaps, snap)
	se := &dataplane.SyncError{Err: d.wholeErr}
	for _, ports := range snap.Services {
		for _, sp := range ports {
			if msg, ok := d.failPorts[sp.Name]; ok {
				se.Services = append(se.Services, &dataplane.ServiceError{
					Service: sp.Name, Frontend: sp.ClusterIP, Reason: dataplane.ReasonMapFull, Err: errors.New(msg),
				})
			}
		}
	}
	switch {
	case len(se.Services) > 0:
		return se
	case d.wholeErr != nil:
		return d.wholeErr
	}
	return nil
}

func (d *scriptedDataplane) Close() error { return nil }

func (d *scriptedDataplane) fail(port model.ServicePortName, msg string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if msg == "" {
		delete(d.failPorts, port)
	} else {
		d.failPorts[port] = msg
	}
}

func (d *scriptedDataplane) failWhole(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.wholeErr = err
}

func (d *scriptedDataplane) last() *model.Snapshot {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.snaps[len(d.snaps)-1]
}

// proxierHarness drives a Proxier's sync by hand on a fake clock, without
// its runner or informers.
type proxierHarness struct {
	t      *testing.T
	p      *Proxier
	dp     *scriptedDataplane
	clk    *clocktesting.FakeClock
	health *healthz.ProxyHealth
	m      *metrics.Metrics
	reg    *prometheus.Registry
	rec    *events.FakeRecorder
}

const (
	harnessSyncPeriod  = 30 * time.Second
	harnessRetryPeriod = time.Second
)

func newProxierHarness(t *testing.T) *proxierHarness {
	t.Helper()
	return newProxierHarnessFor(t, nil)
}

// newProxierHarnessFor is newProxierHarness with the scripted datapath
// wrapped by wrap (nil: as it is), for datapaths with optional methods.
func newProxierHarnessFor(t *testing.T, wrap func(*scriptedDataplane) dataplane.Dataplane) *proxierHarness {
	t.Helper()
	h := &proxierHarness{
		t:   t,
		dp:  newScriptedDataplane(),
		clk: clocktesting.NewFakeClock(t0),
		reg: prometheus.NewRegistry(),
		rec: events.NewFakeRecorder(1000),
	}
	h.m = metrics.New(h.reg)
	h.health = healthz.NewProxyHealth(2*harnessSyncPeriod, h.clk)
	h.health.QueuedUpdate(model.IPv4)
	var dp dataplane.Dataplane = h.dp
	if wrap != nil {
		dp = wrap(h.dp)
	}
	h.p = NewProxier(dp, h.m, h.health, Config{
		MinSyncPeriod: 0, SyncPeriod: harnessSyncPeriod, RetryPeriod: harnessRetryPeriod,
		Recorder: h.rec, NodeName: "node1",
	}, WithClock(h.clk))
	h.p.OnSynced()
	h.health.SyncLoopStarted(model.IPv4)
	t.Cleanup(h.p.retry.stop)
	t.Cleanup(h.p.busy.stop)
	return h
}

// sync runs one sync and returns its snapshot and error.
func (h *proxierHarness) sync() (*model.Snapshot, error) {
	h.t.Helper()
	err := h.p.sync(context.Background())
	return h.dp.last(), err
}

// syncOK runs one sync that must count as progress.
func (h *proxierHarness) syncOK() *model.Snapshot {
	h.t.Helper()
	snap, err := h.sync()
	if err != nil {
		h.t.Fatalf("sync: %v, want progress", err)
	}
	return snap
}

// events returns the Events recorded since the last call.
func (h *proxierHarness) events() []string {
	var out []string
	for {
		select {
		case e := <-h.rec.Events:
			out = append(out, e)
		default:
			return out
		}
	}
}

func (h *proxierHarness) gauge(reason string) float64 {
	return testutil.ToFloat64(h.m.ServicePortsNotProgrammed.WithLabelValues(reason, metrics.IPFamily))
}

func (h *proxierHarness) failures(reason string) float64 {
	return testutil.ToFloat64(h.m.ServicePortFailuresTotal.WithLabelValues(reason, metrics.IPFamily))
}

func (h *proxierHarness) checkHealth(what string, wantHealthy, wantLive bool) {
	h.t.Helper()
	if ok, _, _ := h.health.Healthy(); ok != wantHealthy {
		h.t.Errorf("%s: healthy = %v, want %v", what, ok, wantHealthy)
	}
	if ok, _, _ := h.health.Live(); ok != wantLive {
		h.t.Errorf("%s: live = %v, want %v", what, ok, wantLive)
	}
}

func svcName(name string) model.ServiceName {
	return model.ServiceName{Namespace: "default", Name: name}
}

func portOf(svc, port string, proto model.Protocol) model.ServicePortName {
	return model.ServicePortName{ServiceName: svcName(svc), Port: port, Protocol: proto}
}

func names(snap *model.Snapshot) []string {
	var out []string
	for n := range snap.Services {
		out = append(out, n.Name)
	}
	slices.Sort(out)
	return out
}

func udpPort(name string, port int32) v1.ServicePort {
	return v1.ServicePort{Name: name, Port: port, Protocol: v1.ProtocolUDP}
}

// TestProxierPartialFailureIsProgress: a sync that applied everything but
// some service ports keeps /healthz good however long it lasts; a sync
// that fails as a whole turns it bad after 2 x SyncPeriod, while /livez,
// whose attempts keep ending, stays good.
func TestProxierPartialFailureIsProgress(t *testing.T) {
	h := newProxierHarness(t)
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.p.OnServiceUpsert(service("default", "big", "10.96.0.11", tcpPort("http", 80, 8080)))
	h.dp.fail(portOf("big", "http", model.TCP), mapFullMsg)

	h.syncOK()
	start := h.clk.Now()
	// Changes keep coming and every sync leaves big out, for ten timeouts.
	for i := 0; h.clk.Since(start) < 10*2*harnessSyncPeriod; i++ {
		h.clk.Step(harnessSyncPeriod / 2)
		h.p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, fmt.Sprintf("10.244.0.%d", i%200+2)))
		h.syncOK()
		h.checkHealth(fmt.Sprintf("partial failures for %v", h.clk.Since(start)), true, true)
	}
	if got := testutil.ToFloat64(h.m.SyncProxyRulesLastTimestamp); got != float64(h.clk.Now().Unix()) {
		t.Errorf("last sync timestamp %v, want %v: a partial failure is a sync", got, h.clk.Now().Unix())
	}
	if got := testutil.ToFloat64(h.m.SyncFailuresTotal.WithLabelValues(metrics.SyncKindPartial, metrics.IPFamily)) +
		testutil.ToFloat64(h.m.SyncFailuresTotal.WithLabelValues(metrics.SyncKindFull, metrics.IPFamily)); got != 0 {
		t.Errorf("%v failed syncs counted, want 0", got)
	}

	// Now every sync fails as a whole: unhealthy once a change has waited
	// 2 x SyncPeriod, live all along.
	h.dp.failWhole(errors.New("injected failure"))
	failedAt := h.clk.Now()
	for h.clk.Since(failedAt) < 2*harnessSyncPeriod {
		h.p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, "10.244.1."+fmt.Sprint(h.clk.Since(failedAt)/time.Second+2)))
		if _, err := h.sync(); err == nil {
			t.Fatal("sync succeeded, want the injected failure")
		}
		h.checkHealth(fmt.Sprintf("whole failures for %v", h.clk.Since(failedAt)), true, true)
		h.clk.Step(harnessSyncPeriod / 2)
	}
	if _, err := h.sync(); err == nil {
		t.Fatal("sync succeeded, want the injected failure")
	}
	h.checkHealth("whole failures for 2 x SyncPeriod", false, true)
	if snap := h.dp.last(); !snap.Full {
		t.Error("the sync after a whole failure is not a full one")
	}
}

// TestProxierRetriesFailedServicePorts: a failed port's service is retried
// on its own after RetryPeriod, doubling, not with unrelated changes and
// not once it succeeds; an Event is recorded once per failure and once on
// recovery.
func TestProxierRetriesFailedServicePorts(t *testing.T) {
	h := newProxierHarness(t)
	big := service("default", "big", "10.96.0.11", tcpPort("http", 80, 8080), udpPort("dns", 53))
	big.UID = types.UID("uid-big")
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.p.OnServiceUpsert(big)
	bigHTTP := portOf("big", "http", model.TCP)
	h.dp.fail(bigHTTP, mapFullMsg)

	if snap := h.syncOK(); !snap.Full {
		t.Fatal("first sync is not full")
	}
	wantWarning := "Warning ServicePortNotProgrammed kube-bpf-proxy on node node1 could not program port \"http\" (10.96.0.11:80/TCP): " + mapFullMsg
	if ev := h.events(); len(ev) != 1 || !strings.HasPrefix(ev[0], wantWarning) {
		t.Errorf("events after the first failure:\n %q\nwant one starting with\n %q", ev, wantWarning)
	}
	if g, f := h.gauge(dataplane.ReasonMapFull), h.failures(dataplane.ReasonMapFull); g != 1 || f != 1 {
		t.Errorf("not programmed %v, failures %v; want 1, 1", g, f)
	}

	// An unrelated change before the retry is due: big is not in it.
	h.clk.Step(harnessRetryPeriod / 2)
	h.p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, "10.244.0.2"))
	if got := names(h.syncOK()); !slices.Equal(got, []string{"web"}) {
		t.Errorf("unrelated sync lists %v, want [web]", got)
	}

	// Retries come after 1s, 2s, 4s... each listing big alone, failing
	// again without a new Event.
	last := t0
	for i, delay := range []time.Duration{harnessRetryPeriod, 2 * harnessRetryPeriod, 4 * harnessRetryPeriod} {
		due := last.Add(delay)
		h.clk.SetTime(due.Add(-time.Millisecond))
		if got := names(h.syncOK()); len(got) != 0 {
			t.Errorf("retry %d: a sync 1ms before it is due lists %v", i, got)
		}
		if !h.clk.HasWaiters() {
			t.Errorf("retry %d: no timer set to trigger it", i)
		}
		h.clk.SetTime(due)
		snap := h.syncOK()
		if snap.Full || !slices.Equal(names(snap), []string{"big"}) {
			t.Errorf("retry %d: full=%v services %v, want a partial sync of big", i, snap.Full, names(snap))
		}
		last = due
	}
	if ev := h.events(); len(ev) != 0 {
		t.Errorf("retries failing the same way recorded events %q", ev)
	}
	if g, f := h.gauge(dataplane.ReasonMapFull), h.failures(dataplane.ReasonMapFull); g != 1 || f != 4 {
		t.Errorf("not programmed %v, failures %v; want 1, 4", g, f)
	}

	// A different error is a new failure: one more Warning.
	h.dp.fail(bigHTTP, "backend map full: all 256 entries are in use; raise --bpf-backend-slots-max")
	h.clk.SetTime(last.Add(8 * harnessRetryPeriod))
	last = h.clk.Now()
	h.syncOK()
	if ev := h.events(); len(ev) != 1 || !strings.Contains(ev[0], "raise --bpf-backend-slots-max") {
		t.Errorf("events after the error changed: %q, want one naming --bpf-backend-slots-max", ev)
	}

	// The backoff stops at SyncPeriod (the periodic full sync comes then
	// too).
	h.clk.SetTime(last.Add(16 * harnessRetryPeriod))
	last = h.clk.Now()
	h.syncOK()
	h.clk.SetTime(last.Add(harnessSyncPeriod - time.Millisecond))
	if got := names(h.syncOK()); len(got) != 0 {
		t.Errorf("a sync before the capped retry lists %v", got)
	}

	// It succeeds: one Normal Event, the gauge is back to zero, no timer
	// is left and later syncs leave big alone.
	h.dp.fail(bigHTTP, "")
	h.clk.SetTime(last.Add(harnessSyncPeriod))
	h.syncOK()
	wantNormal := `Normal ServicePortProgrammed kube-bpf-proxy on node node1 programmed port "http" (10.96.0.11:80/TCP) after failing`
	if ev := h.events(); !slices.Equal(ev, []string{wantNormal}) {
		t.Errorf("events on recovery:\n %q\nwant\n %q", ev, []string{wantNormal})
	}
	if g := h.gauge(dataplane.ReasonMapFull); g != 0 {
		t.Errorf("not programmed %v after recovery, want 0", g)
	}
	if h.clk.HasWaiters() {
		t.Error("a retry timer is left after recovery")
	}
	h.clk.Step(harnessSyncPeriod / 2)
	if got := names(h.syncOK()); len(got) != 0 {
		t.Errorf("a sync after recovery lists %v", got)
	}
	h.checkHealth("after all this", true, true)

	if got := h.p.serviceRef(svcName("big")).UID; got != "uid-big" {
		t.Errorf("Events point at UID %q, want the Service's", got)
	}
}

func TestProxierFailedPortOfDeletedService(t *testing.T) {
	h := newProxierHarness(t)
	big := service("default", "big", "10.96.0.11", tcpPort("http", 80, 8080))
	h.p.OnServiceUpsert(big)
	h.dp.fail(portOf("big", "http", model.TCP), mapFullMsg)
	h.syncOK()
	h.events()

	h.p.OnServiceDelete(big)
	if got := names(h.syncOK()); !slices.Equal(got, []string{"big"}) {
		t.Errorf("sync after delete lists %v", got)
	}
	if g := h.gauge(dataplane.ReasonMapFull); g != 0 {
		t.Errorf("not programmed %v after the Service is gone, want 0", g)
	}
	if ev := h.events(); len(ev) != 0 {
		t.Errorf("events for a deleted Service: %q", ev)
	}
	if h.clk.HasWaiters() {
		t.Error("a retry timer is left for a deleted Service")
	}
}

func TestProxierWholeFailureKeepsPortFailures(t *testing.T) {
	h := newProxierHarness(t)
	h.p.OnServiceUpsert(service("default", "big", "10.96.0.11", tcpPort("http", 80, 8080)))
	h.p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	h.dp.fail(portOf("big", "http", model.TCP), mapFullMsg)
	h.dp.failWhole(errors.New("link gone"))

	// A SyncError with Err set fails the sync; the port it lists is
	// reported all the same.
	if _, err := h.sync(); err == nil || !strings.Contains(err.Error(), "link gone") {
		t.Fatalf("sync: %v, want the whole failure", err)
	}
	if ev := h.events(); len(ev) != 1 || !strings.Contains(ev[0], "ServicePortNotProgrammed") {
		t.Errorf("events: %q", ev)
	}
	// The next full sync fails as a whole without listing big: nothing
	// is known of it, so it stays failed, without a recovery Event.
	h.dp.fail(portOf("big", "http", model.TCP), "")
	if _, err := h.sync(); err == nil {
		t.Fatal("sync succeeded")
	}
	if g := h.gauge(dataplane.ReasonMapFull); g != 1 {
		t.Errorf("not programmed %v after a whole failure, want 1", g)
	}
	h.dp.failWhole(nil)
	if snap := h.syncOK(); !snap.Full {
		t.Error("sync after a whole failure is not full")
	}
	if ev := h.events(); len(ev) != 1 || !strings.HasPrefix(ev[0], "Normal ServicePortProgrammed") {
		t.Errorf("events after the full sync: %q", ev)
	}
}

func TestProxierEventBudget(t *testing.T) {
	h := newProxierHarness(t)
	n := maxEventsPerSync + 5
	for i := range n {
		name := fmt.Sprintf("svc-%02d", i)
		h.p.OnServiceUpsert(service("default", name, fmt.Sprintf("10.96.1.%d", i+1), tcpPort("http", 80, 8080)))
		h.dp.fail(portOf(name, "http", model.TCP), mapFullMsg)
	}
	h.syncOK()
	if ev := h.events(); len(ev) != maxEventsPerSync {
		t.Errorf("first sync recorded %d events, want %d", len(ev), maxEventsPerSync)
	}
	if g := h.gauge(dataplane.ReasonMapFull); g != float64(n) {
		t.Errorf("not programmed %v, want %d: metrics are not budgeted", g, n)
	}
	h.clk.Step(harnessRetryPeriod)
	h.syncOK()
	ev := h.events()
	if len(ev) != 5 {
		t.Errorf("the retry recorded %d events, want the 5 left", len(ev))
	}
	for _, e := range ev {
		if !strings.Contains(e, "10.96.1.") || !strings.HasPrefix(e, "Warning") {
			t.Errorf("unexpected event %q", e)
		}
	}
}

// TestProxierHealthzThroughPartialFailures runs the whole proxy: /healthz
// and /livez answer 200 while one Service's port keeps failing on its own
// for many timeouts, the failure is retried until it succeeds, and the
// metrics and Events say so.
func TestProxierHealthzThroughPartialFailures(t *testing.T) {
	client := fake.NewClientset(
		service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)),
		service("default", "big", "10.96.0.11", tcpPort("http", 80, 8080)),
	)
	dp := newScriptedDataplane()
	bigHTTP := portOf("big", "http", model.TCP)
	dp.fail(bigHTTP, mapFullMsg)
	rec := events.NewFakeRecorder(100)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	healthzAddr, metricsAddr := testnet.FreeAddr(t), testnet.FreeAddr(t)
	const syncPeriod = 50 * time.Millisecond
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, client, dp, Config{
			MinSyncPeriod: 5 * time.Millisecond, SyncPeriod: syncPeriod, RetryPeriod: 5 * time.Millisecond,
			HealthzBindAddress: healthzAddr, MetricsBindAddress: metricsAddr, Recorder: rec, NodeName: "node1",
		})
	}()

	// Wait until the failure has lasted many health timeouts (2 x
	// syncPeriod), over at least five retries (partial syncs of big alone
	// first, then, with the backoff at syncPeriod, full ones).
	retries := -1
	var firstSync time.Time
	for retries < 5 || time.Since(firstSync) < 10*2*syncPeriod {
		select {
		case <-dp.synced:
		case <-time.After(30 * time.Second):
			t.Fatalf("no sync within 30s (%d retries)", retries)
		}
		if firstSync.IsZero() {
			firstSync = time.Now()
		}
		if snap := dp.last(); len(snap.Services[bigHTTP.ServiceName]) > 0 {
			retries++
		}
	}
	for _, path := range []string{"/healthz", "/livez"} {
		if code, body := get(t, "http://"+healthzAddr+path); code != http.StatusOK || !strings.Contains(body, `"lastUpdated"`) {
			t.Errorf("%s = %d %s while only one port fails, want 200", path, code, body)
		}
	}
	_, text := get(t, "http://"+metricsAddr+"/metrics")
	for _, want := range []string{
		`kube_bpf_proxy_service_ports_not_programmed{ip_family="IPv4",reason="map-full"} 1`,
		`kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="full"} 0`,
		`kube_bpf_proxy_sync_failures_total{ip_family="IPv4",kind="partial"} 0`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if !strings.Contains(text, `kube_bpf_proxy_service_port_failures_total{ip_family="IPv4",reason="map-full"} `) {
		t.Error("/metrics lacks the failure counter")
	}

	// The port fits again: the next retry programs it, and the retries stop.
	dp.fail(bigHTTP, "")
	deadline := time.After(30 * time.Second)
	for {
		_, text = get(t, "http://"+metricsAddr+"/metrics")
		if strings.Contains(text, `kube_bpf_proxy_service_ports_not_programmed{ip_family="IPv4",reason="map-full"} 0`) {
			break
		}
		select {
		case <-deadline:
			t.Fatal("the failed port was never programmed")
		case <-time.After(10 * time.Millisecond):
		}
	}
	var got []string
	for len(rec.Events) > 0 {
		got = append(got, <-rec.Events)
	}
	if len(got) != 2 || !strings.HasPrefix(got[0], "Warning ServicePortNotProgrammed") || !strings.HasPrefix(got[1], "Normal ServicePortProgrammed") {
		t.Errorf("events %q, want one Warning and one Normal", got)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// TestProxierEventsReachTheAPI uses client-go's real events.k8s.io
// recorder, as main does: the Warning lands in the Service's namespace,
// regarding the Service by UID (which kubectl describe matches on).
func TestProxierEventsReachTheAPI(t *testing.T) {
	client := fake.NewClientset()
	b := events.NewBroadcaster(&events.EventSinkImpl{Interface: client.EventsV1()})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := b.StartRecordingToSinkWithContext(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Shutdown)

	h := newProxierHarness(t)
	h.p.events = b.NewRecorder(scheme.Scheme, "kube-bpf-proxy")
	big := service("shop", "big", "10.96.0.11", tcpPort("http", 80, 8080))
	big.UID = "uid-big"
	h.p.OnServiceUpsert(big)
	h.dp.fail(model.ServicePortName{ServiceName: model.ServiceName{Namespace: "shop", Name: "big"}, Port: "http", Protocol: model.TCP}, mapFullMsg)
	h.syncOK()

	deadline := time.Now().Add(30 * time.Second)
	for {
		list, err := client.EventsV1().Events("shop").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(list.Items) > 0 {
			e := list.Items[0]
			r := e.Regarding
			if len(list.Items) != 1 || r.Kind != "Service" || r.Name != "big" || r.Namespace != "shop" || r.UID != "uid-big" ||
				e.Type != v1.EventTypeWarning || e.Reason != eventReasonNotProgrammed || e.ReportingController != "kube-bpf-proxy" ||
				!strings.Contains(e.Note, "raise --bpf-service-ports-max") {
				t.Errorf("events %+v", list.Items)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no Event within 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A sync that found the xtables lock held tried none of the ports whose
// retry was due: their backoff does not grow, and their retry comes in
// the next sync that gets the lock, the doubled delay counted from it.
func TestProxierLockTimeoutKeepsPortBackoff(t *testing.T) {
	h := newProxierHarness(t)
	h.p.OnServiceUpsert(service("default", "big", "10.96.0.11", tcpPort("http", 80, 8080)))
	bigHTTP := portOf("big", "http", model.TCP)
	h.dp.fail(bigHTTP, mapFullMsg)
	h.syncOK() // fails big's port: retry due in 1s

	// The retry finds the lock held: nothing tried.
	h.clk.SetTime(t0.Add(harnessRetryPeriod))
	h.dp.fail(bigHTTP, "")
	h.dp.failWhole(fmt.Errorf("restore: %w", dataplane.ErrBusy))
	if _, err := h.sync(); err != nil {
		t.Fatal(err)
	}
	// The lock free a backoff later: big is tried, and fails again.
	h.dp.fail(bigHTTP, mapFullMsg)
	h.dp.failWhole(nil)
	h.clk.SetTime(t0.Add(2 * harnessRetryPeriod))
	if snap := h.syncOK(); !slices.Contains(names(snap), "big") {
		t.Fatalf("sync after the lock was free lists %v, want big", names(snap))
	}
	// That was its first real retry: the next comes 2 RetryPeriods after
	// it, not 2 after the busy sync (which tried nothing).
	h.clk.SetTime(t0.Add(3 * harnessRetryPeriod))
	if snap := h.syncOK(); len(names(snap)) != 0 {
		t.Errorf("sync 1 RetryPeriod after the retry lists %v, want nothing: the busy sync was counted as a retry", names(snap))
	}
	h.clk.SetTime(t0.Add(4 * harnessRetryPeriod))
	if snap := h.syncOK(); !slices.Equal(names(snap), []string{"big"}) {
		t.Errorf("sync when the second retry is due lists %v, want [big]: the lock time-out grew the port's backoff", names(snap))
	}
}
