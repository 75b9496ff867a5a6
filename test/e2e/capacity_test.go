package e2e

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// oneServiceTooBig runs the eBPF proxies with maps too small for one large
// Service. That Service is reported (an Event on it, a metric, a log line
// naming the flag) and every other Service keeps following changes; the
// proxies count the syncs as progress, so neither /healthz nor the
// liveness probe's /livez fails and nothing restarts them, however long it
// lasts. kube-proxy's kubeadm manifest has no liveness probe for fear of
// exactly this crash loop.
func (e *env) oneServiceTooBig(t *testing.T, ns string) {
	ctx := context.Background()
	const (
		capacity   = 48 // --bpf-backend-slots-max: backend and slot entries
		endpoints  = 60
		syncPeriod = 2 * time.Second
	)
	e.stopProxies(t)
	e.startProxiesWith(t, "ebpf", fmt.Sprintf("--bpf-backend-slots-max=%d", capacity), "--sync-period="+syncPeriod.String())
	t.Cleanup(func() {
		// The next scenarios run with the manifests' capacities.
		e.stopProxies(t)
		e.startProxies(t, "ebpf")
	})

	e.addWeb(t, ns, "b-1", "node1", "b")
	e.addWeb(t, ns, "b-2", "node2", "b")
	vip := e.createService(t, ns, "b", 80)
	e.expectBackends(t, vip+":80", "b-1", "b-2")

	// A selectorless Service whose hand-written slice has more endpoints
	// than the maps hold. Its ClusterIP, from the band the API server
	// allocates last, sorts before every other Service's, so the proxies
	// try it first in each sync: what it wrote before failing would starve
	// the Services created after it.
	big, err := e.c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "big"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.200", Ports: []corev1.ServicePort{{
			Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	name, port, proto := "http", int32(8080), corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "big-1", Labels: map[string]string{
			discoveryv1.LabelServiceName: "big", discoveryv1.LabelManagedBy: "e2e.kube-bpf-proxy"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
	}
	for i := range endpoints {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.244.200.%d", i+1)}})
	}
	if _, err := e.c.Client.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// Reported where an operator looks: on the Service, naming the flag.
	var last string
	if !eventually(30*time.Second, func() bool {
		list, err := e.c.Client.EventsV1().Events(ns).List(ctx, metav1.ListOptions{
			FieldSelector: "regarding.kind=Service,regarding.name=big"})
		if err != nil {
			last = err.Error()
			return false
		}
		for _, ev := range list.Items {
			last = fmt.Sprintf("%s %s %q", ev.Type, ev.Reason, ev.Note)
			if ev.Type == corev1.EventTypeWarning && ev.Reason == "ServicePortNotProgrammed" &&
				strings.Contains(ev.Note, "--bpf-backend-slots-max") && ev.Regarding.UID == big.UID {
				return true
			}
		}
		return false
	}) {
		t.Errorf("no Warning Event on Service big naming --bpf-backend-slots-max; last seen: %s", last)
	}
	const gauge = `kube_bpf_proxy_service_ports_not_programmed{ip_family="IPv4",reason="map-full"}`
	e.expectMetric(t, gauge, 1)

	// Longer than a health timeout (2 x --sync-period) with the Service
	// still failing: both endpoints stay good on both nodes.
	for deadline := time.Now().Add(3 * syncPeriod); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		for _, n := range e.c.Nodes {
			if !e.c.ProxyRunning(n.Name) {
				t.Fatalf("the proxy on %s exited; see %s", n.Name, e.c.ProxyLog(n.Name))
			}
			for _, path := range []string{"/healthz", "/livez"} {
				if code, body, err := e.c.ProxyGet(ctx, n.Name, localcluster.ProxyHealthzAddr, path); code != http.StatusOK {
					t.Fatalf("%s on %s answers %d %s (%v) while one Service does not fit: the liveness probe would restart it",
						path, n.Name, code, body, err)
				}
			}
		}
	}

	// Everything else keeps following the API.
	e.addWeb(t, ns, "b-3", "node1", "b")
	e.expectBackends(t, vip+":80", "b-1", "b-2", "b-3")
	if err := e.c.SetPodReady(ctx, ns, "b-1", false); err != nil {
		t.Fatal(err)
	}
	e.expectBackends(t, vip+":80", "b-2", "b-3")
	e.addWeb(t, ns, "b2-1", "node2", "b2")
	vip2 := e.createService(t, ns, "b2", 80)
	e.expectBackends(t, vip2+":80", "b2-1")

	// Gone, it is no longer reported.
	if err := e.c.Client.CoreV1().Services(ns).Delete(ctx, "big", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.expectMetric(t, gauge, 0)
}

// startProxiesWith starts both proxies as the manifests deploy them, with
// extra flags.
func (e *env) startProxiesWith(t *testing.T, mode string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	o := e.proxyOptions(t, mode)
	o.Args = append(o.Args, args...)
	for _, n := range e.c.Nodes {
		if err := e.c.StartProxy(ctx, n.Name, o); err != nil {
			t.Fatalf("starting the proxy on %s: %v", n.Name, err)
		}
	}
}

// expectMetric waits until series (a name with its labels, as /metrics
// prints it) has value on both nodes.
func (e *env) expectMetric(t *testing.T, series string, value float64) {
	t.Helper()
	e.expectMetricWhere(t, series, fmt.Sprint(value), func(v float64) bool { return v == value })
}
