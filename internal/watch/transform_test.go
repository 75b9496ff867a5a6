package watch

import (
	"fmt"
	"reflect"
	"runtime"
	"strconv"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/randfill"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// filled returns obj with every field set (random values), for a test to
// then give the fields the model reads meaningful ones: a field added to
// the API later is set too, so the transform is checked to drop it.
func filled[T any](t *testing.T, seed int64, obj *T) *T {
	t.Helper()
	randfill.NewWithSeed(seed).NilChance(0).NumElements(1, 2).Fill(obj)
	return obj
}

func fullService(t *testing.T) *v1.Service {
	svc := filled(t, 1, &v1.Service{})
	svc.Name, svc.Namespace, svc.UID, svc.ResourceVersion = "web", "shop", types.UID("uid-web"), "41"
	svc.Labels["app"] = "web"
	s := &svc.Spec
	s.Type = v1.ServiceTypeLoadBalancer
	s.ClusterIP, s.ClusterIPs = "10.96.0.10", []string{"10.96.0.10"}
	s.Ports = []v1.ServicePort{
		{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 30080, TargetPort: s.Ports[0].TargetPort, AppProtocol: s.Ports[0].AppProtocol},
		{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53, NodePort: 30053},
	}
	s.ExternalIPs = []string{"192.0.2.1", "192.0.2.2"}
	s.LoadBalancerSourceRanges = []string{"198.51.100.0/24"}
	s.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	s.HealthCheckNodePort = 32000
	local := v1.ServiceInternalTrafficPolicyLocal
	s.InternalTrafficPolicy = &local
	s.SessionAffinity = v1.ServiceAffinityClientIP
	timeout := int32(600)
	s.SessionAffinityConfig.ClientIP.TimeoutSeconds = &timeout
	vip, proxy := v1.LoadBalancerIPModeVIP, v1.LoadBalancerIPModeProxy
	ing := svc.Status.LoadBalancer.Ingress[0]
	ing.IP, ing.IPMode = "203.0.113.1", &vip
	svc.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{ing, {IP: "203.0.113.2", IPMode: &proxy}}
	return svc
}

func fullSlice(t *testing.T, trigger time.Time) *discoveryv1.EndpointSlice {
	s := filled(t, 2, &discoveryv1.EndpointSlice{})
	s.Name, s.Namespace, s.UID, s.ResourceVersion = "web-abcde", "shop", types.UID("uid-slice"), "42"
	s.Labels[discoveryv1.LabelServiceName] = "web"
	s.Annotations[v1.EndpointsLastChangeTriggerTime] = trigger.Format(time.RFC3339Nano)
	s.AddressType = discoveryv1.AddressTypeIPv4
	tcp, udp := v1.ProtocolTCP, v1.ProtocolUDP
	httpName, dnsName := "http", "dns"
	p8080, p5353 := int32(8080), int32(5353)
	s.Ports = []discoveryv1.EndpointPort{
		{Name: &httpName, Protocol: &tcp, Port: &p8080, AppProtocol: s.Ports[0].AppProtocol},
		{Name: &dnsName, Protocol: &udp, Port: &p5353},
	}
	yes, no := true, false
	nodeA, nodeB := "node-a", "node-b"
	base := s.Endpoints[0] // hostname, targetRef, zone, deprecatedTopology set
	ep := func(addr string, ready, serving, terminating *bool, node *string, zones, nodes []string) discoveryv1.Endpoint {
		e := base
		e.Addresses = []string{addr, "10.1.0.99"}
		e.Conditions = discoveryv1.EndpointConditions{Ready: ready, Serving: serving, Terminating: terminating}
		e.NodeName = node
		e.Hints = &discoveryv1.EndpointHints{}
		for _, z := range zones {
			e.Hints.ForZones = append(e.Hints.ForZones, discoveryv1.ForZone{Name: z})
		}
		for _, n := range nodes {
			e.Hints.ForNodes = append(e.Hints.ForNodes, discoveryv1.ForNode{Name: n})
		}
		return e
	}
	s.Endpoints = []discoveryv1.Endpoint{
		ep("10.1.0.1", &yes, &yes, &no, &nodeA, []string{"zone-a"}, nil),
		ep("10.1.0.2", &yes, &yes, &no, &nodeB, []string{"zone-b"}, []string{"node-b"}),
		ep("10.1.0.3", &no, &yes, &yes, &nodeA, []string{"zone-a"}, nil),
		ep("10.1.0.4", &no, &no, &no, &nodeB, nil, nil),
		ep("10.1.0.5", nil, nil, nil, nil, []string{"zone-a"}, []string{"node-a"}),
	}
	return s
}

// modelOf feeds svc and slice to a tracker on node-a in zone-a and returns
// what it would program, and what it reported.
func modelOf(t *testing.T, start time.Time, svc *v1.Service, slice *discoveryv1.EndpointSlice) (*model.Snapshot, []string, model.ChangeCounts) {
	t.Helper()
	var reports []string
	tr := model.NewTracker(model.WithNodeName("node-a"), model.WithStartTime(start), model.WithHostScopedReports(),
		model.WithOnSkipped(func(resource, reason string) { reports = append(reports, resource+"/"+reason) }))
	tr.SetZone("zone-a")
	tr.UpsertService(svc)
	tr.UpsertEndpointSlice(slice)
	return tr.Snapshot(true), reports, tr.ChangeCounts()
}

// TestTransformKeepsWhatTheModelReads checks that a Service and an
// EndpointSlice with every field set give the model the same result before
// and after Transform, and that the transform drops the rest.
func TestTransformKeepsWhatTheModelReads(t *testing.T) {
	start := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	trigger := start.Add(time.Hour)
	for _, tc := range []struct {
		name   string
		mutate func(*v1.Service, *discoveryv1.EndpointSlice)
	}{
		{"load balancer, local policies, affinity, topology hints", func(*v1.Service, *discoveryv1.EndpointSlice) {}},
		{"cluster policies, no affinity", func(svc *v1.Service, _ *discoveryv1.EndpointSlice) {
			svc.Spec.Type = v1.ServiceTypeNodePort
			svc.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyCluster
			svc.Spec.InternalTrafficPolicy = nil
			svc.Spec.SessionAffinity = v1.ServiceAffinityNone
		}},
		{"host-scoped external address reported", func(svc *v1.Service, _ *discoveryv1.EndpointSlice) {
			svc.Spec.ExternalIPs = append(svc.Spec.ExternalIPs, "127.0.0.1")
		}},
		{"malformed pieces reported", func(svc *v1.Service, s *discoveryv1.EndpointSlice) {
			svc.Spec.Ports = append(svc.Spec.Ports, v1.ServicePort{Name: "sctp", Protocol: v1.ProtocolSCTP, Port: 9})
			s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{"not-an-ip"}})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc, slice := fullService(t), fullSlice(t, trigger)
			tc.mutate(svc, slice)
			wantSnap, wantReports, wantCounts := modelOf(t, start, svc, slice)
			if len(wantSnap.Services) == 0 || len(wantSnap.TriggerTimes) == 0 {
				t.Fatalf("test objects give the model nothing to compare: %+v", wantSnap)
			}

			gotSvcObj, err := Transform(svc.DeepCopy())
			if err != nil {
				t.Fatal(err)
			}
			gotSliceObj, err := Transform(slice.DeepCopy())
			if err != nil {
				t.Fatal(err)
			}
			// The caches hold the compact forms; the handlers get them
			// expanded, which must give the trimmed objects.
			if _, ok := gotSvcObj.(*cachedService); !ok {
				t.Fatalf("Service cached as %T", gotSvcObj)
			}
			if _, ok := gotSliceObj.(*cachedSlice); !ok {
				t.Fatalf("EndpointSlice cached as %T", gotSliceObj)
			}
			gotSvc, _ := expandService(gotSvcObj)
			gotSlice, _ := expandSlice(gotSliceObj)
			if want := slimService(svc); !reflect.DeepEqual(gotSvc, want) {
				t.Errorf("cached Service expands to\n%+v\nwant the trimmed\n%+v", gotSvc, want)
			}
			if want := slimSlice(slice); !reflect.DeepEqual(gotSlice, want) {
				t.Errorf("cached EndpointSlice expands to\n%+v\nwant the trimmed\n%+v", gotSlice, want)
			}
			// client-go keys and indexes them by their metadata.
			for obj, want := range map[any]string{gotSvcObj: svc.Namespace + "/" + svc.Name, gotSliceObj: slice.Namespace + "/" + slice.Name} {
				if key, err := cache.MetaNamespaceKeyFunc(obj); err != nil || key != want {
					t.Errorf("key of %T: %q, %v; want %q", obj, key, err, want)
				}
			}
			gotSnap, gotReports, gotCounts := modelOf(t, start, gotSvc, gotSlice)
			if !reflect.DeepEqual(gotSnap, wantSnap) {
				t.Errorf("model of the transformed objects:\n%+v\nwant (of the originals):\n%+v", gotSnap, wantSnap)
			}
			if !reflect.DeepEqual(gotReports, wantReports) {
				t.Errorf("reports %v, want %v", gotReports, wantReports)
			}
			if gotCounts != wantCounts {
				t.Errorf("change counts %+v, want %+v", gotCounts, wantCounts)
			}

			// What the Proxier and the event handlers read besides.
			if gotSvc.UID != svc.UID || gotSvc.Spec.ClusterIP != svc.Spec.ClusterIP || gotSvc.ResourceVersion != svc.ResourceVersion {
				t.Errorf("UID, ClusterIP or resourceVersion lost: %+v", gotSvc.ObjectMeta)
			}
			if !Selector().Matches(labels.Set(gotSvc.Labels)) || !Selector().Matches(labels.Set(gotSlice.Labels)) {
				t.Errorf("transformed objects no longer match the selector: %v, %v", gotSvc.Labels, gotSlice.Labels)
			}

			// What it drops.
			for what, dropped := range map[string]bool{
				"Service managedFields":        len(gotSvc.ManagedFields) == 0,
				"EndpointSlice managedFields":  len(gotSlice.ManagedFields) == 0,
				"Service ownerReferences":      len(gotSvc.OwnerReferences) == 0,
				"Service selector":             len(gotSvc.Spec.Selector) == 0,
				"Service annotations":          len(gotSvc.Annotations) == 0,
				"Service other labels":         gotSvc.Labels["app"] == "",
				"Service conditions":           len(gotSvc.Status.Conditions) == 0,
				"Service ingress hostname":     gotSvc.Status.LoadBalancer.Ingress[0].Hostname == "",
				"slice other annotations":      len(gotSlice.Annotations) == 1,
				"slice other labels":           len(gotSlice.Labels) == 1,
				"endpoint targetRef":           gotSlice.Endpoints[0].TargetRef == nil,
				"endpoint hostname":            gotSlice.Endpoints[0].Hostname == nil,
				"endpoint zone":                gotSlice.Endpoints[0].Zone == nil,
				"endpoint deprecatedTopology":  gotSlice.Endpoints[0].DeprecatedTopology == nil,
				"endpoint addresses after one": len(gotSlice.Endpoints[0].Addresses) == 1,
				"slice port appProtocol":       gotSlice.Ports[0].AppProtocol == nil,
			} {
				if !dropped {
					t.Errorf("%s kept", what)
				}
			}

			// Idempotent, as client-go asks of a transform.
			again, _ := Transform(gotSvcObj)
			againSlice, _ := Transform(gotSliceObj)
			if again != gotSvcObj || againSlice != gotSliceObj {
				t.Error("transforming twice changed the objects")
			}
		})
	}
}

// TestTransformKeepsOtherProxiesLabel: the foreign informer's handler
// selects on service-proxy-name and reads the ClusterIP.
func TestTransformKeepsOtherProxiesLabel(t *testing.T) {
	svc := fullService(t)
	svc.Labels[LabelServiceProxyName] = "other"
	got, _ := Transform(svc)
	g, _ := expandService(got)
	if !foreignSelector().Matches(labels.Set(g.Labels)) || g.Spec.ClusterIP != "10.96.0.10" {
		t.Errorf("foreign Service lost its label or ClusterIP: %v %q", g.Labels, g.Spec.ClusterIP)
	}
	headless := fullSlice(t, time.Now())
	headless.Labels[v1.IsHeadlessService] = ""
	h, _ := Transform(headless)
	hs, _ := expandSlice(h)
	if Selector().Matches(labels.Set(hs.Labels)) {
		t.Error("a headless Service's slice matches the selector once transformed")
	}
	if other, _ := Transform("not an API object"); other != "not an API object" {
		t.Errorf("an unknown object was changed: %v", other)
	}
}

// apiServerShaped returns Service i and its EndpointSlice of eps endpoints
// as the API server returns those `bench memory` creates (test/bench
// scale.go): with a UID, a creation time, a resourceVersion and the
// managedFields entry of the create.
func apiServerShaped(i, eps int) (*v1.Service, *discoveryv1.EndpointSlice) {
	name := fmt.Sprintf("bg-%05d", i)
	created := metav1.NewTime(time.Date(2026, 12, 5, 6, 0, 0, 0, time.UTC))
	meta := func(kind string, fields string) metav1.ObjectMeta {
		return metav1.ObjectMeta{
			Name: name, Namespace: "bench-bg", UID: types.UID(fmt.Sprintf("6b1f3c2e-%s-4a5b-9c8d-%012d", kind, i)),
			ResourceVersion: strconv.Itoa(100000 + 2*i), CreationTimestamp: created,
			ManagedFields: []metav1.ManagedFieldsEntry{{
				Manager: "bench", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1",
				Time: &created, FieldsType: "FieldsV1", FieldsV1: metav1.NewFieldsV1(fields),
			}},
		}
	}
	svc := &v1.Service{
		ObjectMeta: meta("svc", `{"f:metadata":{"f:labels":{".":{},"f:bench.kube-bpf-proxy.io/set":{}}},"f:spec":{"f:clusterIP":{},"f:internalTrafficPolicy":{},"f:ports":{".":{},"k:{\"port\":80,\"protocol\":\"TCP\"}":{".":{},"f:name":{},"f:port":{},"f:protocol":{},"f:targetPort":{}}},"f:sessionAffinity":{},"f:type":{}}}`),
		Spec: v1.ServiceSpec{
			Type: v1.ServiceTypeClusterIP, ClusterIP: fmt.Sprintf("10.96.%d.%d", 4+i/256, i%256),
			Ports:           []v1.ServicePort{{Name: "tcp", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(80)}},
			SessionAffinity: v1.ServiceAffinityNone, IPFamilies: []v1.IPFamily{v1.IPv4Protocol},
		},
	}
	svc.Spec.ClusterIPs = []string{svc.Spec.ClusterIP}
	single, cluster := v1.IPFamilyPolicySingleStack, v1.ServiceInternalTrafficPolicyCluster
	svc.Spec.IPFamilyPolicy, svc.Spec.InternalTrafficPolicy = &single, &cluster
	svc.Labels = map[string]string{"bench.kube-bpf-proxy.io/set": "background"}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  meta("eps", `{"f:addressType":{},"f:endpoints":{},"f:metadata":{"f:labels":{".":{},"f:bench.kube-bpf-proxy.io/set":{},"f:endpointslice.kubernetes.io/managed-by":{},"f:kubernetes.io/service-name":{}}},"f:ports":{}}`),
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	slice.Labels = map[string]string{discoveryv1.LabelServiceName: name, discoveryv1.LabelManagedBy: "bench.kube-bpf-proxy.io", "bench.kube-bpf-proxy.io/set": "background"}
	portName, proto, port := "tcp", v1.ProtocolTCP, int32(80)
	slice.Ports = []discoveryv1.EndpointPort{{Name: &portName, Protocol: &proto, Port: &port}}
	for j := range eps {
		k := i*eps + j
		ready, serving, terminating := true, true, false
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("10.%d.%d.%d", 128+k>>16, k>>8&255, k&255)},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating},
		})
	}
	return svc, slice
}

// BenchmarkInformerCacheHeap reports the heap the informers' stores hold
// at 10k Services × 10 endpoints, shaped as the API server returns them,
// without and with Transform (cache-MiB).
func BenchmarkInformerCacheHeap(b *testing.B) {
	for _, tc := range []struct {
		name      string
		transform cache.TransformFunc
	}{{"whole objects", nil}, {"transformed", Transform}} {
		b.Run(tc.name, func(b *testing.B) {
			var heap float64
			for b.Loop() {
				runtime.GC()
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				opts := []cache.StoreOption{}
				if tc.transform != nil {
					opts = append(opts, cache.WithTransformer(tc.transform))
				}
				svcs := cache.NewStore(cache.MetaNamespaceKeyFunc, opts...)
				slices := cache.NewStore(cache.MetaNamespaceKeyFunc, opts...)
				for i := range 10000 {
					svc, slice := apiServerShaped(i, 10)
					if err := svcs.Add(svc); err != nil {
						b.Fatal(err)
					}
					if err := slices.Add(slice); err != nil {
						b.Fatal(err)
					}
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				heap = float64(after.HeapAlloc-before.HeapAlloc) / (1 << 20)
				runtime.KeepAlive(svcs)
				runtime.KeepAlive(slices)
			}
			b.ReportMetric(heap, "cache-MiB")
		})
	}
}

// TestCompactSliceAddresses: an endpoint's first address comes back from
// the cached form exactly as it was, whatever its form.
func TestCompactSliceAddresses(t *testing.T) {
	for _, addrs := range [][]string{
		nil, {}, {"10.1.2.3"}, {"10.1.2.3", "10.1.2.4"}, {"010.1.2.3"}, {"10.1.2.3 "}, {"::ffff:10.1.2.3"},
		{"fd00::1"}, {"FD00::1"}, {""}, {"not-an-ip"}, {"0.0.0.0"}, {"255.255.255.255"},
	} {
		node := "node-a"
		s := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "s", Namespace: "ns"},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints:   []discoveryv1.Endpoint{{Addresses: addrs, NodeName: &node}, {Addresses: addrs}},
		}
		got, _ := expandSlice(compactSlice(s))
		if want := slimSlice(s); !reflect.DeepEqual(got, want) {
			t.Errorf("addresses %q: expanded %+v, want %+v", addrs, got.Endpoints, want.Endpoints)
		}
	}
}
