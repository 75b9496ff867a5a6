package bench

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/diff"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// loadedObjects is what the API server returns for a background set.
type loadedObjects struct {
	services []corev1.Service
	slices   []discoveryv1.EndpointSlice
	ips      []networkingv1.IPAddress
}

// readLoaded reads ns's background Services, their slices and their
// IPAddresses from the API, in name order, without what differs between
// two creations of the same object (uid, resourceVersion, creation and
// managedFields times).
func readLoaded(t *testing.T, ctx context.Context, c kubernetes.Interface, ns string) loadedObjects {
	t.Helper()
	sel := metav1.ListOptions{LabelSelector: scaleSetLabel + "=" + setBackground}
	svcs, err := c.CoreV1().Services(ns).List(ctx, sel)
	if err != nil {
		t.Fatal(err)
	}
	slices, err := c.DiscoveryV1().EndpointSlices(ns).List(ctx, sel)
	if err != nil {
		t.Fatal(err)
	}
	ips, err := c.NetworkingV1().IPAddresses().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	clear := func(m *metav1.ObjectMeta) {
		m.UID, m.ResourceVersion, m.CreationTimestamp = "", "", metav1.Time{}
		for i := range m.ManagedFields {
			m.ManagedFields[i].Time = nil
		}
	}
	var out loadedObjects
	for _, s := range svcs.Items {
		clear(&s.ObjectMeta)
		out.services = append(out.services, s)
	}
	for _, s := range slices.Items {
		clear(&s.ObjectMeta)
		out.slices = append(out.slices, s)
	}
	for _, a := range ips.Items {
		if p := a.Spec.ParentRef; p != nil && p.Namespace == ns {
			clear(&a.ObjectMeta)
			out.ips = append(out.ips, a)
		}
	}
	sort.Slice(out.services, func(i, j int) bool { return out.services[i].Name < out.services[j].Name })
	sort.Slice(out.slices, func(i, j int) bool { return out.slices[i].Name < out.slices[j].Name })
	sort.Slice(out.ips, func(i, j int) bool { return out.ips[i].Name < out.ips[j].Name })
	return out
}

func upCluster(t *testing.T) *localcluster.Cluster {
	t.Helper()
	testnet.Require(t)
	kubeBin := os.Getenv("KUBE_BIN")
	if kubeBin == "" {
		t.Skip("KUBE_BIN is unset: set it to the directory hack/kube-build.sh prints")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := filepath.Join(t.TempDir(), "cluster")
	c, err := localcluster.Up(ctx, localcluster.Options{Dir: dir, KubeBin: kubeBin, Progress: t.Logf})
	if err != nil {
		t.Fatalf("starting the local cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			// Why the API server's informers lagged, if they did.
			b, _ := os.ReadFile(filepath.Join(dir, "logs", "kube-apiserver.log"))
			n := 0
			for _, l := range strings.Split(string(b), "\n") {
				if strings.Contains(l, "unresponsive") || strings.Contains(l, "too old") || strings.Contains(l, "repairip") || strings.Contains(l, "Timeout") {
					if n++; n <= 10 {
						t.Logf("kube-apiserver: %.300s", l)
					}
				}
			}
		}
		if err := localcluster.Down(dir); err != nil {
			t.Errorf("taking the cluster down: %v", err)
		}
	})
	return c
}

// TestDirectLoad checks the etcd loader against the API: the Services,
// slices and IPAddresses it writes are, as the API server returns them,
// the objects Populate creates through the API (but for uid,
// resourceVersion and times); an informer started before sees them
// arrive; the API server's ClusterIP repair loop finds nothing to repair;
// a Service created afterwards gets an address of its own; and deleting
// them through the API releases their addresses.
//
// KBP_BENCH_SCALE=10000,20000,50000 then loads those sizes in turn and
// logs the rate of each step (the numbers in docs/benchmarks.md, "Method").
func TestDirectLoad(t *testing.T) {
	c := upCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	bulk, err := BulkClient(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	direct := NewEtcdStore(c.EtcdHTTPClient(), localcluster.EtcdURL, localcluster.EtcdPrefix)
	defer direct.Close()
	const ns, n = "load", 50
	addrs := []netip.Addr{netip.MustParseAddr("10.244.2.50"), netip.MustParseAddr("10.244.2.51"), netip.MustParseAddr("10.244.2.52")}
	if err := ensureNamespace(ctx, bulk, ns); err != nil {
		t.Fatal(err)
	}

	// An informer from before the load: it must see the objects arrive
	// as watch events, as the proxies' do.
	f := informers.NewSharedInformerFactoryWithOptions(c.Client, 0, informers.WithNamespace(ns))
	svcInf, sliceInf := f.Core().V1().Services().Informer(), f.Discovery().V1().EndpointSlices().Informer()
	added := 0
	if _, err := svcInf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: func(any) { added++ }}); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	defer close(stop)
	f.Start(stop)
	if !cache.WaitForCacheSync(ctx.Done(), svcInf.HasSynced, sliceInf.HasSynced) {
		t.Fatal("informers did not sync")
	}

	last, err := Populate(ctx, bulk, direct, ns, n, 2, addrs, 9000, 4, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := backgroundClusterIP(model.IPv4, n-1).String() + ":9000"; last != want {
		t.Errorf("last = %q, want %q", last, want)
	}
	viaEtcd := readLoaded(t, ctx, bulk, ns)
	if len(viaEtcd.services) != n || len(viaEtcd.slices) != n || len(viaEtcd.ips) != n {
		t.Fatalf("after the direct load: %d Services, %d slices, %d IPAddresses, want %d each",
			len(viaEtcd.services), len(viaEtcd.slices), len(viaEtcd.ips), n)
	}
	var keys []string
	for _, p := range []string{"/services/specs/" + ns + "/", "/endpointslices/" + ns + "/"} {
		k, err := direct.keys(ctx, localcluster.EtcdPrefix+p)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k...)
	}
	if len(keys) != 2*n {
		t.Errorf("%d keys under the Services' and slices' prefixes, want %d", len(keys), 2*n)
	}
	if !eventually(30*time.Second, func() bool { return len(svcInf.GetStore().List()) == n && len(sliceInf.GetStore().List()) == n }) {
		t.Errorf("the informer holds %d Services and %d slices, want %d", len(svcInf.GetStore().List()), len(sliceInf.GetStore().List()), n)
	}

	// A Service created through the API now gets an address none of
	// them has.
	fresh, err := bulk.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "fresh"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range viaEtcd.ips {
		if a.Name == fresh.Spec.ClusterIP {
			t.Errorf("a new Service got ClusterIP %s, Service %s's", a.Name, a.Spec.ParentRef.Name)
		}
	}

	// The repair loop checks each Service and IPAddress as its informer
	// adds them: by the time the Service above exists it has seen the
	// load (same informer, earlier events). Give it a moment, then look
	// for its complaints.
	time.Sleep(5 * time.Second)
	repairEvents(t, ctx, bulk, ns)
	if err := bulk.CoreV1().Services(ns).Delete(ctx, "fresh", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// Deleted through the API, they release their addresses; created
	// again through the API, they are the same objects.
	if _, err := Populate(ctx, bulk, direct, ns, 0, 2, addrs, 9000, 4, nil); err != nil {
		t.Fatal(err)
	}
	if !eventually(30*time.Second, func() bool { return len(readLoaded(t, ctx, bulk, ns).ips) == 0 }) {
		t.Errorf("deleting the Services left %d IPAddresses", len(readLoaded(t, ctx, bulk, ns).ips))
	}
	if _, err := Populate(ctx, bulk, nil, ns, n, 2, addrs, 9000, 4, nil); err != nil {
		t.Fatal(err)
	}
	viaAPI := readLoaded(t, ctx, bulk, ns)
	for _, pair := range [][2]any{{viaAPI.services, viaEtcd.services}, {viaAPI.slices, viaEtcd.slices}, {viaAPI.ips, viaEtcd.ips}} {
		if !equality.Semantic.DeepEqual(pair[0], pair[1]) {
			t.Errorf("loaded through etcd (+) against created through the API (-):\n%s", diff.Diff(pair[0], pair[1]))
		}
	}

	if sizes := os.Getenv("KBP_BENCH_SCALE"); sizes != "" {
		// Free the addresses the scale run's Services ask for.
		if _, err := Populate(ctx, bulk, nil, ns, 0, 2, addrs, 9000, 4, nil); err != nil {
			t.Fatal(err)
		}
		direct.Logf = t.Logf
		scaleDirect(t, bulk, direct, sizes)
	}
}

// scaleDirect loads "bench-scale" to each of sizes (comma-separated,
// ascending) in turn, as the benchmark does, and logs each step's rate.
func scaleDirect(t *testing.T, bulk kubernetes.Interface, direct *EtcdStore, sizes string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	var addrs []netip.Addr
	for i := range 12 {
		addrs = append(addrs, netip.MustParseAddr(fmt.Sprintf("10.244.2.%d", i+1)))
	}
	from := 0
	for _, s := range strings.Split(sizes, ",") {
		size, err := strconv.Atoi(s)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if _, err := Populate(ctx, bulk, direct, "bench-scale", size, 10, addrs, 80, populateWorkers, nil); err != nil {
			t.Fatal(err)
		}
		d := time.Since(start)
		t.Logf("direct load %d -> %d Services x 10 endpoints: %s, %.0f Services/s", from, size, d.Round(time.Millisecond), float64(size-from)/d.Seconds())
		from = size
		repairEvents(t, ctx, bulk, "bench-scale")
	}
	// The repair loop deletes, as leaked, an address whose Service it has
	// not seen 60 s after the address's creation: look again once the
	// last load's addresses are past that grace.
	time.Sleep(65 * time.Second)
	repairEvents(t, ctx, bulk, "bench-scale")
}

// repairEvents reports the API server's ClusterIP repair loop's events
// on ns's Services and on IPAddresses.
func repairEvents(t *testing.T, ctx context.Context, c kubernetes.Interface, ns string) {
	t.Helper()
	n := 0
	for _, in := range []string{ns, metav1.NamespaceDefault} {
		events, err := c.EventsV1().Events(in).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range events.Items {
			if strings.HasPrefix(e.Reason, "ClusterIP") || strings.HasPrefix(e.Reason, "IPAddress") || e.Reason == "UnknownError" {
				if n++; n <= 5 {
					t.Errorf("repair loop event on %s/%s: %s: %s", e.Regarding.Kind, e.Regarding.Name, e.Reason, e.Note)
				}
			}
		}
	}
	if n > 5 {
		t.Errorf("... %d repair loop events in all", n)
	}
}

// idleCloser is a transport that counts the calls to close its idle
// connections.
type idleCloser struct {
	http.RoundTripper
	closed int
}

func (t *idleCloser) CloseIdleConnections() { t.closed++ }

// Closing the store closes its client's idle connections to etcd.
func TestEtcdStoreCloseClosesIdleConnections(t *testing.T) {
	tr := &idleCloser{RoundTripper: http.DefaultTransport}
	NewEtcdStore(&http.Client{Transport: tr}, "http://127.0.0.1:2379", "/registry").Close()
	if tr.closed != 1 {
		t.Errorf("idle connections closed %d times, want 1", tr.closed)
	}
}
