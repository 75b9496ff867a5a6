// Package apitest builds Service and EndpointSlice objects for tests and
// the demo, in the shape the API server and the EndpointSlice controller
// give them.
package apitest

import (
	"fmt"
	"net/netip"
	"slices"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Service is a ClusterIP Service with the given ports.
func Service(ns, name, clusterIP string, ports ...v1.ServicePort) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1.ServiceSpec{
			Type:       v1.ServiceTypeClusterIP,
			ClusterIP:  clusterIP,
			ClusterIPs: []string{clusterIP},
			Ports:      ports,
		},
	}
}

// Port is a Service port whose target port is targetPort.
func Port(name string, proto v1.Protocol, port, targetPort int32) v1.ServicePort {
	return v1.ServicePort{Name: name, Protocol: proto, Port: port, TargetPort: intstr.FromInt32(targetPort)}
}

// Slice is an IPv4 EndpointSlice of Service ns/svc.
func Slice(ns, svc, name string, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns,
			Name:      name,
			Labels:    map[string]string{discoveryv1.LabelServiceName: svc, discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io"},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       ports,
		Endpoints:   eps,
	}
}

// SlicePort is an EndpointSlice port.
func SlicePort(name string, proto v1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port}
}

// Ready is an endpoint that is ready and serving.
func Ready(addr string) discoveryv1.Endpoint { return endpoint(addr, true, true, false) }

// Terminating is an endpoint of a pod being deleted that still serves.
func Terminating(addr string) discoveryv1.Endpoint { return endpoint(addr, false, true, true) }

func endpoint(addr string, ready, serving, terminating bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating},
	}
}

// ReadyRange is n ready endpoints from base.0.1 upward, for large services.
func ReadyRange(base string, n int) []discoveryv1.Endpoint {
	out := make([]discoveryv1.Endpoint, n)
	for i := range n {
		out[i] = Ready(fmt.Sprintf("%s.%d.%d", base, i/250, i%250+1))
	}
	return out
}

// ServicePort is a model service port with frontend vip ("ip:port") and
// backends ("ip:port" each), sorted as the model sorts them.
func ServicePort(ns, name, port string, proto model.Protocol, vip string, backends ...string) model.ServicePort {
	fe := netip.MustParseAddrPort(vip)
	sp := model.ServicePort{
		Name:      model.ServicePortName{ServiceName: model.ServiceName{Namespace: ns, Name: name}, Port: port, Protocol: proto},
		ClusterIP: model.Frontend{IP: fe.Addr(), Port: fe.Port(), Protocol: proto},
	}
	for _, b := range backends {
		ap := netip.MustParseAddrPort(b)
		sp.Backends = append(sp.Backends, model.Backend{IP: ap.Addr(), Port: ap.Port()})
	}
	slices.SortFunc(sp.Backends, model.Backend.Compare)
	sp.Serving = sp.Backends // every serving endpoint is used
	// internalTrafficPolicy Cluster, no external frontend: the ClusterIP's
	// backends are the Cluster policy's, as the model computes them.
	sp.Cluster = sp.Backends
	sp.HasEndpoints = len(sp.Backends) > 0
	return sp
}

// WithServing returns sp with other serving endpoints ("ip:port" each)
// than its backends: endpoints that still serve but take no new
// connections (terminating, or not ready) are among them.
func WithServing(sp model.ServicePort, serving ...string) model.ServicePort {
	sp.Serving = nil
	for _, b := range serving {
		ap := netip.MustParseAddrPort(b)
		sp.Serving = append(sp.Serving, model.Backend{IP: ap.Addr(), Port: ap.Port()})
	}
	slices.SortFunc(sp.Serving, model.Backend.Compare)
	return sp
}

// Snapshot is a model snapshot of the given service ports.
func Snapshot(full bool, ports ...model.ServicePort) *model.Snapshot {
	s := &model.Snapshot{Full: full, Services: make(map[model.ServiceName][]model.ServicePort)}
	for _, p := range ports {
		s.Services[p.Name.ServiceName] = append(s.Services[p.Name.ServiceName], p)
	}
	return s
}

// Deleted marks services as gone in a partial snapshot.
func Deleted(s *model.Snapshot, names ...model.ServiceName) *model.Snapshot {
	for _, n := range names {
		s.Services[n] = nil
	}
	return s
}

// ScaleSnapshot is a full snapshot of n single-port TCP services with per
// endpoints each, all distinct: the benchmarks' cluster (10.96.0.0/16 for
// frontends, 10.128.0.0/10 for backends).
func ScaleSnapshot(n, per int) *model.Snapshot {
	snap := &model.Snapshot{Full: true, Services: make(map[model.ServiceName][]model.ServicePort, n)}
	for i := range n {
		name := model.ServiceName{Namespace: "bench", Name: fmt.Sprintf("svc-%d", i)}
		sp := model.ServicePort{
			Name: model.ServicePortName{ServiceName: name, Port: "http", Protocol: model.TCP},
			ClusterIP: model.Frontend{
				IP:   netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}),
				Port: 80, Protocol: model.TCP,
			},
		}
		for j := range per {
			k := i*per + j
			sp.Backends = append(sp.Backends, model.Backend{
				IP:   netip.AddrFrom4([4]byte{10, byte(128 + k>>16), byte(k >> 8), byte(k)}),
				Port: 8080,
			})
		}
		sp.Serving = sp.Backends
		sp.Cluster = sp.Backends
		sp.HasEndpoints = per > 0
		snap.Services[name] = []model.ServicePort{sp}
	}
	return snap
}

// EndpointChange returns two partial snapshots for the service port of
// service name in snap (from ScaleSnapshot): one replacing its first
// endpoint, one putting it back. Alternating them is the common change of a
// pod being replaced.
func EndpointChange(snap *model.Snapshot, name model.ServiceName) [2]*model.Snapshot {
	orig := snap.Services[name][0]
	changed := orig
	changed.Backends = append(slices.Clone(orig.Backends[1:]), model.Backend{IP: netip.MustParseAddr("10.250.0.1"), Port: 8080})
	slices.SortFunc(changed.Backends, model.Backend.Compare)
	changed.Serving = changed.Backends
	changed.Cluster = changed.Backends
	return [2]*model.Snapshot{
		{Services: map[model.ServiceName][]model.ServicePort{name: {changed}}},
		{Services: map[model.ServiceName][]model.ServicePort{name: {orig}}},
	}
}
