package model

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const testNS = "ns"

// --- Services ---

type svcOpt func(*v1.Service)

// newSvc builds a ClusterIP Service in testNS.
func newSvc(name, clusterIP string, opts ...svcOpt) *v1.Service {
	s := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: name},
		Spec: v1.ServiceSpec{
			Type:      v1.ServiceTypeClusterIP,
			ClusterIP: clusterIP,
		},
	}
	if clusterIP != "" {
		s.Spec.ClusterIPs = []string{clusterIP}
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func withPorts(ports ...v1.ServicePort) svcOpt {
	return func(s *v1.Service) { s.Spec.Ports = append(s.Spec.Ports, ports...) }
}

func withClusterIPs(ips ...string) svcOpt {
	return func(s *v1.Service) {
		s.Spec.ClusterIPs = ips
		s.Spec.ClusterIP = ""
		if len(ips) > 0 {
			s.Spec.ClusterIP = ips[0]
		}
	}
}

func withType(t v1.ServiceType) svcOpt {
	return func(s *v1.Service) { s.Spec.Type = t }
}

func svcPort(name string, proto v1.Protocol, port int32) v1.ServicePort {
	return v1.ServicePort{Name: name, Protocol: proto, Port: port}
}

// --- EndpointSlices ---

type sliceOpt func(*discoveryv1.EndpointSlice)

// newSlice builds an IPv4 EndpointSlice in testNS belonging to service svc
// ("" for no service-name label).
func newSlice(name, svc string, opts ...sliceOpt) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: testNS, Name: name},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	if svc != "" {
		s.Labels = map[string]string{discoveryv1.LabelServiceName: svc}
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

func withSlicePorts(ports ...discoveryv1.EndpointPort) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) { s.Ports = append(s.Ports, ports...) }
}

func withEndpoints(eps ...discoveryv1.Endpoint) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) { s.Endpoints = append(s.Endpoints, eps...) }
}

func withAddressType(t discoveryv1.AddressType) sliceOpt {
	return func(s *discoveryv1.EndpointSlice) { s.AddressType = t }
}

func slicePortOf(name string, proto v1.Protocol, port int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port}
}

// cond is an endpoint condition: nil (unknown), yes or no.
type cond *bool

var (
	unknown cond = nil
	yes     cond = ptr(true)
	no      cond = ptr(false)
)

func ptr[T any](v T) *T { return &v }

// endpoint builds an endpoint with conditions ready, serving, terminating.
func endpoint(addr string, ready, serving, terminating cond) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses: []string{addr},
		Conditions: discoveryv1.EndpointConditions{
			Ready: ready, Serving: serving, Terminating: terminating,
		},
	}
}

// readyEP is a ready, serving, not terminating endpoint.
func readyEP(addr string) discoveryv1.Endpoint { return endpoint(addr, yes, yes, no) }

// --- Expected model values ---

func portName(svc, port string, proto Protocol) ServicePortName {
	return ServicePortName{ServiceName: ServiceName{Namespace: testNS, Name: svc}, Port: port, Protocol: proto}
}

func svcName(name string) ServiceName { return ServiceName{Namespace: testNS, Name: name} }

// sp builds an expected ServicePort; backends are "ip:port" strings. Its
// serving endpoints are its backends; withServing says otherwise.
func sp(svc, port string, proto Protocol, frontend string, backends ...string) ServicePort {
	fe := netip.MustParseAddrPort(frontend)
	p := ServicePort{
		Name:      portName(svc, port, proto),
		ClusterIP: Frontend{IP: fe.Addr(), Port: fe.Port(), Protocol: proto},
		Backends:  parseBackends(backends),
	}
	p.Serving = p.Backends
	return p
}

// withServing sets the serving endpoints of an expected ServicePort.
func withServing(p ServicePort, serving ...string) ServicePort {
	p.Serving = parseBackends(serving)
	return p
}

func parseBackends(addrs []string) []Backend {
	var out []Backend
	for _, b := range addrs {
		ap := netip.MustParseAddrPort(b)
		out = append(out, Backend{IP: ap.Addr(), Port: ap.Port()})
	}
	return out
}

// --- Reports ---

// recorder collects skip reports as "resource/reason".
type recorder struct {
	mu  sync.Mutex
	got []string
}

func (r *recorder) report(resource, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, resource+"/"+reason)
}

func (r *recorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	got := r.got
	r.got = nil
	slices.Sort(got)
	return got
}

func checkReports(t *testing.T, r *recorder, want []string) {
	t.Helper()
	got := r.take()
	want = slices.Sorted(slices.Values(want))
	if !slices.Equal(got, want) {
		t.Errorf("reports:\n got %q\nwant %q", got, want)
	}
}

// --- Comparison ---

func dumpPorts(ports []ServicePort) string {
	if ports == nil {
		return "<nil>"
	}
	var b strings.Builder
	for _, p := range ports {
		fmt.Fprintf(&b, "\n  %s %s -> %v", p.Name, p.ClusterIP, p.Backends)
		if p.Backends != nil && len(p.Backends) == 0 {
			b.WriteString(" (empty, not nil)")
		}
		if !slices.Equal(p.Serving, p.Backends) || (p.Serving == nil) != (p.Backends == nil) {
			fmt.Fprintf(&b, " serving %v", p.Serving)
		}
	}
	return b.String()
}

func dumpServices(m map[ServiceName][]ServicePort) string {
	names := make([]ServiceName, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b ServiceName) int { return strings.Compare(a.String(), b.String()) })
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "\n %s:%s", n, strings.ReplaceAll(dumpPorts(m[n]), "\n", "\n "))
	}
	if len(names) == 0 {
		b.WriteString(" <none>")
	}
	return b.String()
}

// checkPorts compares port lists exactly, nil-ness of Backends included:
// the model promises nil, never empty, for no backends.
func checkPorts(t *testing.T, got, want []ServicePort) {
	t.Helper()
	if !deepEqualPorts(got, want) {
		t.Errorf("ports:\n got %s\nwant %s", dumpPorts(got), dumpPorts(want))
	}
}

func checkServices(t *testing.T, what string, got, want map[ServiceName][]ServicePort) {
	t.Helper()
	ok := len(got) == len(want)
	for n, w := range want {
		g, present := got[n]
		ok = ok && present && deepEqualPorts(g, w)
	}
	if !ok {
		t.Errorf("%s:\n got%s\nwant%s", what, dumpServices(got), dumpServices(want))
	}
}

func deepEqualPorts(a, b []ServicePort) bool {
	if (a == nil) != (b == nil) || len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Name != b[i].Name || a[i].ClusterIP != b[i].ClusterIP ||
			(a[i].Backends == nil) != (b[i].Backends == nil) || !slices.Equal(a[i].Backends, b[i].Backends) ||
			(a[i].Serving == nil) != (b[i].Serving == nil) || !slices.Equal(a[i].Serving, b[i].Serving) {
			return false
		}
	}
	return true
}

// servicePorts computes a Service's ports from the Service and the
// EndpointSlices that belong to it, as the Tracker does, without tracking:
// the conversion tests' entry point. Slices that name another Service are
// ignored. report may be nil.
func servicePorts(svc *v1.Service, endpointSlices []*discoveryv1.EndpointSlice, report ReportFunc) []ServicePort {
	return servicePortsOf(IPv4, svc, endpointSlices, report)
}

// servicePortsOf is servicePorts for the Tracker of family f.
func servicePortsOf(f IPFamily, svc *v1.Service, endpointSlices []*discoveryv1.EndpointSlice, report ReportFunc) []ServicePort {
	if report == nil {
		report = func(string, string) {}
	}
	info := convertService(svc, f, false, report)
	if info == nil {
		return nil
	}
	name := ServiceName{Namespace: svc.Namespace, Name: svc.Name}
	infos := make([]*sliceInfo, 0, len(endpointSlices))
	for _, s := range endpointSlices {
		if si := convertSlice(s, testNode, f, report); si != nil && si.service == name {
			infos = append(infos, si)
		}
	}
	var scratch []candidate
	return computePorts(info, func(f func(*sliceInfo)) {
		for _, si := range infos {
			f(si)
		}
	}, Topology{NodeName: testNode, Zone: testZone}, &scratch)
}

// hasPending reports whether a partial snapshot would list any service.
func (t *Tracker) hasPending() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.pending) > 0
}

// testNode and testZone are where buildPorts computes from.
const (
	testNode = "node-a"
	testZone = "zone-a"
)
