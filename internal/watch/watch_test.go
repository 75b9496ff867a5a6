package watch

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	apiwatch "k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	discoveryv1client "k8s.io/client-go/kubernetes/typed/discovery/v1"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
)

// hangGuard bounds every wait so that a bug shows up as a failure instead of
// a hung test binary. It is not a performance expectation.
const hangGuard = 30 * time.Second

// event is one Handler call as the recorder saw it.
type event struct {
	op  string // "svc+", "svc-", "eps+", "eps-", "synced"
	key string // namespace/name, empty for synced
	obj metav1.Object
}

func (e event) String() string { return e.op + " " + e.key }

// recorder is a Handler that records every call in order.
type recorder struct {
	mu     sync.Mutex
	events []event
}

func (r *recorder) add(op string, obj metav1.Object) {
	e := event{op: op}
	if obj != nil {
		e.key = obj.GetNamespace() + "/" + obj.GetName()
		e.obj = obj
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
}

func (r *recorder) OnServiceUpsert(svc *v1.Service) { r.add("svc+", svc) }
func (r *recorder) OnServiceDelete(svc *v1.Service) { r.add("svc-", svc) }
func (r *recorder) OnEndpointSliceUpsert(s *discoveryv1.EndpointSlice) {
	r.add("eps+", s)
}
func (r *recorder) OnEndpointSliceDelete(s *discoveryv1.EndpointSlice) {
	r.add("eps-", s)
}

func (r *recorder) OnSynced() { r.add("synced", nil) }

func (r *recorder) snapshot() []event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// strings renders the events whose op is one of ops (all events if none).
func (r *recorder) strings(ops ...string) []string {
	var out []string
	for _, e := range r.snapshot() {
		if len(ops) == 0 || slices.Contains(ops, e.op) {
			out = append(out, e.String())
		}
	}
	return out
}

func (r *recorder) count(op, key string) int {
	n := 0
	for _, e := range r.snapshot() {
		if e.op == op && (key == "" || e.key == key) {
			n++
		}
	}
	return n
}

// eventually polls cond until it holds; conditions here become true as soon
// as the informers have delivered, so the guard only catches hangs.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	err := wait.PollUntilContextTimeout(t.Context(), 5*time.Millisecond, hangGuard, true,
		func(context.Context) (bool, error) { return cond(), nil })
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(hangGuard):
		t.Fatalf("waiting for %s: gave up after %v", what, hangGuard)
	}
}

// runResult is the outcome of a Run started by startWatcher.
type runResult struct {
	done chan struct{} // closed when Run has returned
	err  error         // Run's result, valid once done is closed
}

// wait blocks until Run returns (or the hang guard fires) and returns its
// result.
func (r *runResult) wait(t *testing.T) error {
	t.Helper()
	waitClosed(t, r.done, "Run to return")
	return r.err
}

// startWatcher runs w until the test ends (or until the returned cancel is
// called).
func startWatcher(t *testing.T, w *watcher) (context.CancelFunc, *runResult) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	res := &runResult{done: make(chan struct{})}
	go func() {
		defer close(res.done)
		res.err = w.run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		res.wait(t)
	})
	return cancel, res
}

func mustWatcher(t *testing.T, client kubernetes.Interface, h Handler) *watcher {
	t.Helper()
	w, err := newWatcher(client, h, 0)
	if err != nil {
		t.Fatalf("newWatcher: %v", err)
	}
	return w
}

func service(ns, name string, labels map[string]string) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec: v1.ServiceSpec{
			ClusterIP: "10.96.0.10",
			Ports:     []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80}},
		},
	}
}

func endpointSlice(ns, name, svcName string, labels map[string]string) *discoveryv1.EndpointSlice {
	l := map[string]string{discoveryv1.LabelServiceName: svcName}
	for k, v := range labels {
		l[k] = v
	}
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: l},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.1"}}},
	}
}

func TestInitialObjectsDeliveredBeforeSynced(t *testing.T) {
	client := fake.NewClientset(
		service("default", "a", nil),
		service("kube-system", "b", nil),
		endpointSlice("default", "a-1", "a", nil),
		endpointSlice("default", "a-2", "a", nil),
		endpointSlice("kube-system", "b-1", "b", nil),
	)
	rec := &recorder{}
	startWatcher(t, mustWatcher(t, client, rec))

	eventually(t, "OnSynced", func() bool { return rec.count("synced", "") > 0 })

	got := rec.strings()
	want := []string{
		"svc+ default/a", "svc+ kube-system/b",
		"eps+ default/a-1", "eps+ default/a-2", "eps+ kube-system/b-1",
	}
	syncedAt := slices.Index(got, "synced ")
	for _, w := range want {
		i := slices.Index(got, w)
		if i < 0 {
			t.Errorf("%q never delivered; events: %q", w, got)
		} else if i > syncedAt {
			t.Errorf("%q delivered after OnSynced; events: %q", w, got)
		}
	}
	if n := rec.count("synced", ""); n != 1 {
		t.Errorf("OnSynced called %d times, want 1", n)
	}
}

// listGate blocks EndpointSlice List calls until released. It blocks in a
// wrapper around the typed client rather than in a reactor: the fake
// clientset runs reactors with its one mutex held, so a blocking reactor
// would also stall the Services informer's list and watch (and the test's
// own calls), and the test could not tell the two caches apart.
type listGate struct {
	enterOnce sync.Once
	entered   chan struct{} // closed when the first List is waiting
	release   chan struct{} // close to let Lists through
}

func newListGate() *listGate {
	return &listGate{entered: make(chan struct{}), release: make(chan struct{})}
}

// gatedClient is the fake clientset with a gate in front of EndpointSlice
// List. It must embed *fake.Clientset (not just kubernetes.Interface) so that
// the fake's IsWatchListSemanticsUnSupported method is promoted: client-go
// v0.36 turns the WatchListClient feature on by default, and informers only
// fall back to List+Watch for clients that opt out that way. Without it the
// reflectors open a watch with sendInitialEvents, the fake never sends the
// bookmark that ends the initial events, and nothing ever syncs.
type gatedClient struct {
	*fake.Clientset
	gate *listGate
}

func (c *gatedClient) DiscoveryV1() discoveryv1client.DiscoveryV1Interface {
	return gatedDiscovery{DiscoveryV1Interface: c.Clientset.DiscoveryV1(), gate: c.gate}
}

type gatedDiscovery struct {
	discoveryv1client.DiscoveryV1Interface
	gate *listGate
}

func (d gatedDiscovery) EndpointSlices(ns string) discoveryv1client.EndpointSliceInterface {
	return gatedSlices{EndpointSliceInterface: d.DiscoveryV1Interface.EndpointSlices(ns), gate: d.gate}
}

type gatedSlices struct {
	discoveryv1client.EndpointSliceInterface
	gate *listGate
}

func (s gatedSlices) List(ctx context.Context, opts metav1.ListOptions) (*discoveryv1.EndpointSliceList, error) {
	s.gate.enterOnce.Do(func() { close(s.gate.entered) })
	select {
	case <-s.gate.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.EndpointSliceInterface.List(ctx, opts)
}

// TestNotSyncedBeforeBothCachesSync holds the EndpointSlice list back and
// checks that OnSynced waits for it. It runs in a synctest bubble so that
// "not yet" is a fact rather than a guess: synctest.Wait returns only when
// every goroutine of the informers and of Run is blocked, so an OnSynced that
// was going to come early has come by then.
func TestNotSyncedBeforeBothCachesSync(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		gate := newListGate()
		client := &gatedClient{
			Clientset: fake.NewClientset(
				service("default", "a", nil),
				endpointSlice("default", "a-1", "a", nil),
			),
			gate: gate,
		}
		rec := &recorder{}
		w := mustWatcher(t, client, rec)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- w.run(ctx) }()

		synctest.Wait()
		select {
		case <-gate.entered:
		default:
			t.Fatal("everything is idle but the EndpointSlice informer never listed")
		}
		if !w.svcReg.HasSynced() {
			t.Fatal("everything is idle but the Service handler has not synced")
		}
		if w.slices.HasSynced() {
			t.Fatal("EndpointSlice informer synced while its List was blocked")
		}
		if got, want := rec.strings(), []string{"svc+ default/a"}; !slices.Equal(got, want) {
			t.Fatalf("with EndpointSlices still listing, events = %q, want %q", got, want)
		}

		close(gate.release)
		synctest.Wait()
		want := []string{"svc+ default/a", "eps+ default/a-1", "synced "}
		if got := rec.strings(); !slices.Equal(got, want) {
			t.Fatalf("after the EndpointSlice list, events = %q, want %q", got, want)
		}

		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run after sync returned %v, want nil", err)
		}
	})
}

func TestRunReturnsCtxErrWhenCancelledBeforeSync(t *testing.T) {
	gate := newListGate() // never released
	client := &gatedClient{Clientset: fake.NewClientset(), gate: gate}
	rec := &recorder{}
	cancel, res := startWatcher(t, mustWatcher(t, client, rec))

	waitClosed(t, gate.entered, "the EndpointSlice informer to list")
	cancel()
	if err := res.wait(t); !errors.Is(err, context.Canceled) {
		t.Errorf("Run returned %v, want %v", err, context.Canceled)
	}
	if n := rec.count("synced", ""); n != 0 {
		t.Errorf("OnSynced called %d times before sync, want 0", n)
	}
}

func TestRunStopsOnCancel(t *testing.T) {
	client := fake.NewClientset(service("default", "a", nil))
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Run(ctx, client, rec, 0) }()

	eventually(t, "OnSynced", func() bool { return rec.count("synced", "") > 0 })
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run after sync returned %v, want nil", err)
		}
	case <-time.After(hangGuard):
		t.Fatal("Run did not return after cancellation")
	}
	// Run has returned, so the informers are down: nothing more arrives.
	before := len(rec.snapshot())
	if _, err := client.CoreV1().Services("default").Create(context.Background(),
		service("default", "late", nil), metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating Service: %v", err)
	}
	if after := len(rec.snapshot()); after != before {
		t.Errorf("handler called after Run returned: %q", rec.strings())
	}
}

func TestRunRejectsMissingArguments(t *testing.T) {
	ctx := t.Context()
	if err := Run(ctx, nil, &recorder{}, 0); err == nil {
		t.Error("Run with nil client: no error")
	}
	if err := Run(ctx, fake.NewClientset(), nil, 0); err == nil {
		t.Error("Run with nil handler: no error")
	}
}

func TestSelector(t *testing.T) {
	const want = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
	if got := Selector().String(); got != want {
		t.Errorf("Selector() = %q, want %q", got, want)
	}
}

// TestFakeClientsetSelectorSupport pins down what the fake clientset does
// with label selectors, which decides what TestLabelFiltering proves: List
// filters (so the initial list tests the server-side selector), Watch does
// not (so objects created later test the handler's own filter).
func TestFakeClientsetSelectorSupport(t *testing.T) {
	ctx := t.Context()
	client := fake.NewClientset(
		service("default", "plain", nil),
		service("default", "other", map[string]string{LabelServiceProxyName: "x"}),
	)
	opts := metav1.ListOptions{LabelSelector: Selector().String()}
	list, err := client.CoreV1().Services("").List(ctx, opts)
	if err != nil {
		t.Fatalf("listing Services: %v", err)
	}
	if len(list.Items) != 1 || list.Items[0].Name != "plain" {
		t.Errorf("fake List with selector returned %d items, want only %q", len(list.Items), "plain")
	}

	// Watch from the list's version, as a reflector does: without it the fake
	// replays every stored object, unfiltered.
	opts.ResourceVersion = list.ResourceVersion
	wi, err := client.CoreV1().Services("").Watch(ctx, opts)
	if err != nil {
		t.Fatalf("watching Services: %v", err)
	}
	defer wi.Stop()
	if _, err := client.CoreV1().Services("default").Create(ctx,
		service("default", "other2", map[string]string{LabelServiceProxyName: "x"}), metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating Service: %v", err)
	}
	select {
	case ev := <-wi.ResultChan():
		if svc, ok := ev.Object.(*v1.Service); !ok || svc.Name != "other2" {
			t.Errorf("unexpected watch event %v %T", ev.Type, ev.Object)
		}
	case <-time.After(hangGuard):
		t.Fatal("fake Watch filtered by label: TestLabelFiltering's watch phase no longer exercises the handler's filter")
	}
}

func TestLabelFiltering(t *testing.T) {
	proxyName := map[string]string{LabelServiceProxyName: "someone-else"}
	proxyNameEmpty := map[string]string{LabelServiceProxyName: ""}
	headless := map[string]string{v1.IsHeadlessService: ""}

	client := fake.NewClientset(
		service("default", "plain", nil),
		service("default", "other-proxy", proxyName),
		service("default", "other-proxy-empty", proxyNameEmpty),
		service("default", "headless-label", headless),
		endpointSlice("default", "plain-1", "plain", nil),
		endpointSlice("default", "other-proxy-1", "other-proxy", proxyName),
		endpointSlice("default", "headless-1", "headless", headless),
	)
	// Record the selector every list and watch is sent with.
	var mu sync.Mutex
	selectors := map[string][]string{} // "verb resource" -> selectors
	capture := func(a k8stesting.Action) (bool, runtime.Object, error) {
		var sel string
		switch a := a.(type) {
		case k8stesting.ListAction:
			sel = a.GetListRestrictions().Labels.String()
		case k8stesting.WatchAction:
			sel = a.GetWatchRestrictions().Labels.String()
		}
		mu.Lock()
		defer mu.Unlock()
		k := a.GetVerb() + " " + a.GetResource().Resource
		selectors[k] = append(selectors[k], sel)
		return false, nil, nil
	}
	client.PrependReactor("list", "*", capture)
	client.PrependWatchReactor("*", func(a k8stesting.Action) (bool, apiwatch.Interface, error) {
		capture(a)
		return false, nil, nil
	})

	rec := &recorder{}
	startWatcher(t, mustWatcher(t, client, rec))
	eventually(t, "OnSynced", func() bool { return rec.count("synced", "") > 0 })

	// Objects created now reach the informers through the fake's watch,
	// which ignores the selector: only the handler's own filter stands
	// between them and the Handler. Each kind's events arrive in order, so
	// once the trailing plain object is seen the excluded ones were handled.
	ctx := t.Context()
	svcs := client.CoreV1().Services("default")
	eps := client.DiscoveryV1().EndpointSlices("default")
	for _, s := range []*v1.Service{
		service("default", "late-other-proxy", proxyName),
		service("default", "late-headless-label", headless),
		service("default", "late-plain", nil),
	} {
		if _, err := svcs.Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating Service %s: %v", s.Name, err)
		}
	}
	for _, s := range []*discoveryv1.EndpointSlice{
		endpointSlice("default", "late-other-proxy-1", "other-proxy", proxyName),
		endpointSlice("default", "late-headless-1", "headless", headless),
		endpointSlice("default", "late-plain-1", "late-plain", nil),
	} {
		if _, err := eps.Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating EndpointSlice %s: %v", s.Name, err)
		}
	}
	// An excluded object that is deleted must not surface as a delete.
	if err := svcs.Delete(ctx, "late-other-proxy", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("deleting Service: %v", err)
	}
	if err := eps.Delete(ctx, "late-headless-1", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("deleting EndpointSlice: %v", err)
	}
	if _, err := svcs.Create(ctx, service("default", "last", nil), metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating Service: %v", err)
	}
	if _, err := eps.Create(ctx, endpointSlice("default", "last-1", "last", nil), metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating EndpointSlice: %v", err)
	}
	eventually(t, "the trailing objects", func() bool {
		return rec.count("svc+", "default/last") > 0 && rec.count("eps+", "default/last-1") > 0
	})

	wantSvc := []string{"svc+ default/plain", "svc+ default/late-plain", "svc+ default/last"}
	if got := rec.strings("svc+", "svc-"); !slices.Equal(got, wantSvc) {
		t.Errorf("Service events = %q, want %q", got, wantSvc)
	}
	wantEps := []string{"eps+ default/plain-1", "eps+ default/late-plain-1", "eps+ default/last-1"}
	if got := rec.strings("eps+", "eps-"); !slices.Equal(got, wantEps) {
		t.Errorf("EndpointSlice events = %q, want %q", got, wantEps)
	}

	mu.Lock()
	defer mu.Unlock()
	want := Selector().String()
	for _, k := range []string{"list services", "watch services", "list endpointslices", "watch endpointslices"} {
		got := selectors[k]
		if len(got) == 0 {
			t.Errorf("no %s request seen; requests: %v", k, selectors)
		}
		for _, s := range got {
			if s != want {
				t.Errorf("%s sent selector %q, want %q", k, s, want)
			}
		}
	}
}

func TestUpdatesAndDeletes(t *testing.T) {
	client := fake.NewClientset(
		service("default", "a", nil),
		endpointSlice("default", "a-1", "a", nil),
	)
	rec := &recorder{}
	startWatcher(t, mustWatcher(t, client, rec))
	eventually(t, "OnSynced", func() bool { return rec.count("synced", "") > 0 })

	ctx := t.Context()
	svcs := client.CoreV1().Services("default")
	eps := client.DiscoveryV1().EndpointSlices("default")

	svc := service("default", "a", nil)
	svc.Spec.Ports[0].Port = 8080
	if _, err := svcs.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("updating Service: %v", err)
	}
	slice := endpointSlice("default", "a-1", "a", nil)
	slice.Endpoints[0].Addresses = []string{"10.0.0.2"}
	if _, err := eps.Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("updating EndpointSlice: %v", err)
	}
	// Gaining an excluding label is a delete, losing it again an upsert.
	svc = svc.DeepCopy()
	svc.Labels = map[string]string{LabelServiceProxyName: "other"}
	if _, err := svcs.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("labelling Service: %v", err)
	}
	svc = svc.DeepCopy()
	svc.Labels = nil
	if _, err := svcs.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("unlabelling Service: %v", err)
	}
	if err := svcs.Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("deleting Service: %v", err)
	}
	if err := eps.Delete(ctx, "a-1", metav1.DeleteOptions{}); err != nil {
		t.Fatalf("deleting EndpointSlice: %v", err)
	}

	eventually(t, "the deletes", func() bool {
		return rec.count("svc-", "default/a") >= 2 && rec.count("eps-", "default/a-1") == 1
	})
	wantSvc := []string{"svc+ default/a", "svc+ default/a", "svc- default/a", "svc+ default/a", "svc- default/a"}
	if got := rec.strings("svc+", "svc-"); !slices.Equal(got, wantSvc) {
		t.Errorf("Service events = %q, want %q", got, wantSvc)
	}
	wantEps := []string{"eps+ default/a-1", "eps+ default/a-1", "eps- default/a-1"}
	if got := rec.strings("eps+", "eps-"); !slices.Equal(got, wantEps) {
		t.Errorf("EndpointSlice events = %q, want %q", got, wantEps)
	}
	// The updates carry the new state.
	var ports []int32
	var addrs []string
	for _, e := range rec.snapshot() {
		switch o := e.obj.(type) {
		case *v1.Service:
			if e.op == "svc+" {
				ports = append(ports, o.Spec.Ports[0].Port)
			}
		case *discoveryv1.EndpointSlice:
			if e.op == "eps+" {
				addrs = append(addrs, o.Endpoints[0].Addresses[0])
			}
		}
	}
	if want := []int32{80, 8080, 8080}; !slices.Equal(ports, want) {
		t.Errorf("upserted Service ports = %v, want %v", ports, want)
	}
	if want := []string{"10.0.0.1", "10.0.0.2"}; !slices.Equal(addrs, want) {
		t.Errorf("upserted EndpointSlice addresses = %v, want %v", addrs, want)
	}
}

// TestEventHandler drives the adapter directly with what client-go may hand
// it, including tombstones and objects of the wrong type.
func TestEventHandler(t *testing.T) {
	plain := service("ns", "plain", nil)
	other := service("ns", "other", map[string]string{LabelServiceProxyName: "x"})
	headless := service("ns", "headless", map[string]string{v1.IsHeadlessService: ""})
	slice := endpointSlice("ns", "s", "plain", nil)

	// Each case runs with the objects as the API returns them and in the
	// form the informers cache (Transform).
	for _, cached := range []bool{false, true} {
		c := func(o any) any {
			if !cached {
				return o
			}
			out, err := Transform(o)
			if err != nil {
				t.Fatal(err)
			}
			return out
		}
		cases := []struct {
			name string
			call func(h cache.ResourceEventHandler)
			want []string
		}{
			{"add", func(h cache.ResourceEventHandler) { h.OnAdd(c(plain), false) }, []string{"svc+ ns/plain"}},
			{"add in initial list", func(h cache.ResourceEventHandler) { h.OnAdd(c(plain), true) }, []string{"svc+ ns/plain"}},
			{"add other proxy", func(h cache.ResourceEventHandler) { h.OnAdd(c(other), false) }, nil},
			{"add headless label", func(h cache.ResourceEventHandler) { h.OnAdd(c(headless), false) }, nil},
			{"add wrong type", func(h cache.ResourceEventHandler) { h.OnAdd(c(slice), false) }, nil},
			{"add nil", func(h cache.ResourceEventHandler) { h.OnAdd(nil, false) }, nil},
			{"add typed nil", func(h cache.ResourceEventHandler) { h.OnAdd((*v1.Service)(nil), false) }, nil},
			{"add string", func(h cache.ResourceEventHandler) { h.OnAdd("ns/plain", false) }, nil},
			{"update", func(h cache.ResourceEventHandler) { h.OnUpdate(c(plain), c(plain)) }, []string{"svc+ ns/plain"}},
			{"update wrong new type", func(h cache.ResourceEventHandler) { h.OnUpdate(c(plain), c(slice)) }, nil},
			{"update wrong old type", func(h cache.ResourceEventHandler) { h.OnUpdate(c(slice), c(plain)) }, []string{"svc+ ns/plain"}},
			{"update becomes excluded", func(h cache.ResourceEventHandler) {
				h.OnUpdate(c(service("ns", "other", nil)), c(other))
			}, []string{"svc- ns/other"}},
			{"update stays excluded", func(h cache.ResourceEventHandler) { h.OnUpdate(c(other), c(other)) }, nil},
			{"update becomes included", func(h cache.ResourceEventHandler) {
				h.OnUpdate(c(other), c(service("ns", "other", nil)))
			}, []string{"svc+ ns/other"}},
			{"update excluded, unknown old", func(h cache.ResourceEventHandler) { h.OnUpdate(nil, c(other)) }, []string{"svc- ns/other"}},
			{"delete", func(h cache.ResourceEventHandler) { h.OnDelete(c(plain)) }, []string{"svc- ns/plain"}},
			{"delete excluded", func(h cache.ResourceEventHandler) { h.OnDelete(c(other)) }, nil},
			{"delete wrong type", func(h cache.ResourceEventHandler) { h.OnDelete(c(slice)) }, nil},
			{"delete nil", func(h cache.ResourceEventHandler) { h.OnDelete(nil) }, nil},
			{"tombstone", func(h cache.ResourceEventHandler) {
				h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/plain", Obj: plain})
			}, []string{"svc- ns/plain"}},
			{"tombstone of excluded", func(h cache.ResourceEventHandler) {
				h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/other", Obj: other})
			}, nil},
			{"tombstone wrong type", func(h cache.ResourceEventHandler) {
				h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/s", Obj: slice})
			}, nil},
			{"tombstone nil", func(h cache.ResourceEventHandler) {
				h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/x"})
			}, nil},
			{"tombstone typed nil", func(h cache.ResourceEventHandler) {
				h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/x", Obj: c((*v1.Service)(nil))})
			}, nil},
		}
		for _, tc := range cases {
			t.Run(fmt.Sprintf("%s cached=%v", tc.name, cached), func(t *testing.T) {
				rec := &recorder{}
				h := &eventHandler[*v1.Service]{
					kind:     "Service",
					selector: Selector(),
					expand:   expandService,
					upsert:   rec.OnServiceUpsert,
					remove:   rec.OnServiceDelete,
				}
				tc.call(h)
				if got := rec.strings(); !slices.Equal(got, tc.want) {
					t.Errorf("events = %q, want %q", got, tc.want)
				}
			})
		}
	}
}

func TestEndpointSliceEventHandlerTombstone(t *testing.T) {
	rec := &recorder{}
	h := &eventHandler[*discoveryv1.EndpointSlice]{
		kind:     "EndpointSlice",
		selector: Selector(),
		expand:   expandSlice,
		upsert:   rec.OnEndpointSliceUpsert,
		remove:   rec.OnEndpointSliceDelete,
	}
	h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/s", Obj: endpointSlice("ns", "s", "svc", nil)})
	h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/svc", Obj: service("ns", "svc", nil)})
	cached, _ := Transform(endpointSlice("ns", "s2", "svc", nil))
	h.OnDelete(cache.DeletedFinalStateUnknown{Key: "ns/s2", Obj: cached})
	want := []string{"eps- ns/s", "eps- ns/s2"}
	if got := rec.strings(); !slices.Equal(got, want) {
		t.Errorf("events = %q, want %q", got, want)
	}
}

// foreignRecorder also wants the Services another proxy serves.
type foreignRecorder struct{ recorder }

func (r *foreignRecorder) OnForeignServiceUpsert(svc *v1.Service) { r.add("foreign+", svc) }
func (r *foreignRecorder) OnForeignServiceDelete(svc *v1.Service) { r.add("foreign-", svc) }

// A handler that wants them is told of the Services another proxy serves,
// before OnSynced, and never of them as its own.
func TestForeignServicesDeliveredApart(t *testing.T) {
	other := map[string]string{LabelServiceProxyName: "other"}
	client := fake.NewClientset(service("default", "ours", nil), service("default", "theirs", other))
	rec := &foreignRecorder{}
	startWatcher(t, mustWatcher(t, client, rec))
	eventually(t, "OnSynced", func() bool { return rec.count("synced", "") > 0 })
	got := rec.strings()
	syncedAt := slices.Index(got, "synced ")
	for _, w := range []string{"svc+ default/ours", "foreign+ default/theirs"} {
		if i := slices.Index(got, w); i < 0 || i > syncedAt {
			t.Errorf("%q not delivered before OnSynced; events: %q", w, got)
		}
	}
	for _, no := range []string{"svc+ default/theirs", "foreign+ default/ours"} {
		if slices.Contains(got, no) {
			t.Errorf("%q delivered; events: %q", no, got)
		}
	}
	if err := client.CoreV1().Services("default").Delete(context.Background(), "theirs", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "foreign delete", func() bool { return rec.count("foreign-", "default/theirs") > 0 })
}
