package model

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// ep describes an endpoint for the policy tests: "10.0.0.1 local ready
// zones=zone-a,zone-b nodes=node-a" (words after the address in any order;
// ready, terminating-serving or not-ready; local puts it on testNode).
func ep(desc string) discoveryv1.Endpoint {
	words := strings.Fields(desc)
	e := readyEP(words[0])
	e.NodeName = ptr("node-other")
	for _, w := range words[1:] {
		switch {
		case w == "local":
			e.NodeName = ptr(testNode)
		case w == "terminating":
			e.Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}
		case w == "unready":
			e.Conditions = discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(false), Terminating: ptr(false)}
		case strings.HasPrefix(w, "zones="):
			if e.Hints == nil {
				e.Hints = &discoveryv1.EndpointHints{}
			}
			for _, z := range strings.Split(strings.TrimPrefix(w, "zones="), ",") {
				e.Hints.ForZones = append(e.Hints.ForZones, discoveryv1.ForZone{Name: z})
			}
		case strings.HasPrefix(w, "nodes="):
			if e.Hints == nil {
				e.Hints = &discoveryv1.EndpointHints{}
			}
			for _, n := range strings.Split(strings.TrimPrefix(w, "nodes="), ",") {
				e.Hints.ForNodes = append(e.Hints.ForNodes, discoveryv1.ForNode{Name: n})
			}
		default:
			panic("unknown endpoint word " + w)
		}
	}
	return e
}

func ips(bs []Backend) string {
	var out []string
	for _, b := range bs {
		out = append(out, b.IP.String())
	}
	return strings.Join(out, " ")
}

// The cases follow kube-proxy's CategorizeEndpoints (pkg/proxy/topology.go)
// and its tests: which endpoints each policy uses, given hints and where
// the endpoints run.
func TestEndpointSelectionPoliciesAndTopology(t *testing.T) {
	local := v1.ServiceInternalTrafficPolicyLocal
	for _, tc := range []struct {
		name          string
		opts          []svcOpt
		eps           []string
		backends      string // ClusterIP traffic
		cluster       string
		local         string
		external      string
		hasEndpoints  bool
		internalLocal bool
	}{
		{name: "no hints: every ready endpoint",
			eps:      []string{"10.0.0.1", "10.0.0.2 local", "10.0.0.3 unready"},
			backends: "10.0.0.1 10.0.0.2", cluster: "10.0.0.1 10.0.0.2", hasEndpoints: true},
		{name: "zone hints for our zone",
			eps:      []string{"10.0.0.1 zones=zone-a", "10.0.0.2 zones=zone-b", "10.0.0.3 zones=zone-a,zone-b"},
			backends: "10.0.0.1 10.0.0.3", cluster: "10.0.0.1 10.0.0.3", hasEndpoints: true},
		{name: "one ready endpoint without a hint: hints ignored",
			eps:      []string{"10.0.0.1 zones=zone-a", "10.0.0.2", "10.0.0.3 unready"},
			backends: "10.0.0.1 10.0.0.2", cluster: "10.0.0.1 10.0.0.2", hasEndpoints: true},
		{name: "an unready endpoint without a hint does not disable hints",
			eps:      []string{"10.0.0.1 zones=zone-a", "10.0.0.2 zones=zone-b", "10.0.0.3 unready"},
			backends: "10.0.0.1", cluster: "10.0.0.1", hasEndpoints: true},
		{name: "no endpoint hinted for our zone: every endpoint",
			eps:      []string{"10.0.0.1 zones=zone-b", "10.0.0.2 zones=zone-c"},
			backends: "10.0.0.1 10.0.0.2", cluster: "10.0.0.1 10.0.0.2", hasEndpoints: true},
		{name: "node hints for our node win over zone hints",
			eps:      []string{"10.0.0.1 zones=zone-a nodes=node-a", "10.0.0.2 zones=zone-a nodes=node-b"},
			backends: "10.0.0.1", cluster: "10.0.0.1", hasEndpoints: true},
		{name: "node hints not for our node: zone hints",
			eps:      []string{"10.0.0.1 zones=zone-a nodes=node-b", "10.0.0.2 zones=zone-b nodes=node-c"},
			backends: "10.0.0.1", cluster: "10.0.0.1", hasEndpoints: true},
		{name: "only terminating endpoints: the serving ones, topology ignored",
			eps:      []string{"10.0.0.1 terminating zones=zone-b", "10.0.0.2 unready"},
			backends: "10.0.0.1", cluster: "10.0.0.1", hasEndpoints: true},
		{name: "internal Local with local endpoints",
			opts:     []svcOpt{func(s *v1.Service) { s.Spec.InternalTrafficPolicy = &local }},
			eps:      []string{"10.0.0.1", "10.0.0.2 local"},
			backends: "10.0.0.2", local: "10.0.0.2", hasEndpoints: true, internalLocal: true},
		{name: "internal Local, endpoints elsewhere only: none, but some exist",
			opts:         []svcOpt{func(s *v1.Service) { s.Spec.InternalTrafficPolicy = &local }},
			eps:          []string{"10.0.0.1"},
			hasEndpoints: true, internalLocal: true},
		{name: "internal Local, the local one terminating: used",
			opts:     []svcOpt{func(s *v1.Service) { s.Spec.InternalTrafficPolicy = &local }},
			eps:      []string{"10.0.0.1", "10.0.0.2 local terminating"},
			backends: "10.0.0.2", local: "10.0.0.2", hasEndpoints: true, internalLocal: true},
		{name: "external Local NodePort: cluster for the ClusterIP, local for outside",
			opts: []svcOpt{withType(v1.ServiceTypeNodePort), func(s *v1.Service) {
				s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
				s.Spec.Ports[0].NodePort = 30080
			}},
			eps:      []string{"10.0.0.1", "10.0.0.2 local"},
			backends: "10.0.0.1 10.0.0.2", cluster: "10.0.0.1 10.0.0.2", local: "10.0.0.2", external: "10.0.0.2", hasEndpoints: true},
		{name: "external Local and internal Local: cluster kept for the short circuit",
			opts: []svcOpt{withType(v1.ServiceTypeNodePort), func(s *v1.Service) {
				s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
				s.Spec.InternalTrafficPolicy = &local
				s.Spec.Ports[0].NodePort = 30080
			}},
			eps:      []string{"10.0.0.1", "10.0.0.2 local"},
			backends: "10.0.0.2", cluster: "10.0.0.1 10.0.0.2", local: "10.0.0.2", external: "10.0.0.2", hasEndpoints: true, internalLocal: true},
		{name: "external Local on a ClusterIP Service is no policy",
			opts:     []svcOpt{func(s *v1.Service) { s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal }},
			eps:      []string{"10.0.0.1", "10.0.0.2 local"},
			backends: "10.0.0.1 10.0.0.2", cluster: "10.0.0.1 10.0.0.2", hasEndpoints: true},
		{name: "no endpoints", eps: []string{"10.0.0.1 unready"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := newSvc("web", "10.96.0.10", append([]svcOpt{withPorts(svcPort("http", v1.ProtocolTCP, 80))}, tc.opts...)...)
			var eps []discoveryv1.Endpoint
			for _, d := range tc.eps {
				eps = append(eps, ep(d))
			}
			ports := servicePorts(svc, []*discoveryv1.EndpointSlice{newSlice("web-1", "web",
				withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)), withEndpoints(eps...))}, nil)
			if len(ports) != 1 {
				t.Fatalf("%d ports", len(ports))
			}
			p := ports[0]
			for _, c := range []struct {
				what      string
				got, want string
			}{
				{"backends", ips(p.Backends), tc.backends},
				{"cluster", ips(p.Cluster), tc.cluster},
				{"local", ips(p.Local), tc.local},
				{"external", ips(p.ExternalBackends()), tc.external},
			} {
				if c.got != c.want {
					t.Errorf("%s: got %q, want %q", c.what, c.got, c.want)
				}
			}
			if p.HasEndpoints != tc.hasEndpoints || p.InternalLocal != tc.internalLocal {
				t.Errorf("hasEndpoints %v internalLocal %v, want %v %v", p.HasEndpoints, p.InternalLocal, tc.hasEndpoints, tc.internalLocal)
			}
		})
	}
}

func TestExternalFrontendsAndAffinity(t *testing.T) {
	proxyMode, vipMode := v1.LoadBalancerIPModeProxy, v1.LoadBalancerIPModeVIP
	svc := newSvc("lb", "10.96.0.20", withType(v1.ServiceTypeLoadBalancer), withPorts(
		v1.ServicePort{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 30080},
		v1.ServicePort{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53, NodePort: 30053}),
		func(s *v1.Service) {
			s.Spec.ExternalIPs = []string{"192.0.2.9", "2001:db8::1", "192.0.2.7", "192.0.2.9"}
			s.Spec.LoadBalancerSourceRanges = []string{" 198.51.100.0/24", "203.0.113.7/32", "2001:db8::/32"}
			s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
			s.Spec.HealthCheckNodePort = 31000
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptr(int32(60))}}
			s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{
				{IP: "203.0.113.10"}, {IP: "203.0.113.11", IPMode: &proxyMode},
				{IP: "203.0.113.12", IPMode: &vipMode}, {Hostname: "lb.example"}}
		})
	ports := servicePorts(svc, nil, nil)
	if len(ports) != 2 {
		t.Fatalf("%d ports", len(ports))
	}
	want := External{
		ExternalIPs:         []netip.Addr{netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("192.0.2.9")},
		LoadBalancerIPs:     []netip.Addr{netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("203.0.113.12")},
		SourceRanges:        []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("203.0.113.7/32")},
		PolicyLocal:         true,
		HealthCheckNodePort: 31000,
	}
	for _, p := range ports {
		w := want
		w.NodePort = map[string]uint16{"http": 30080, "dns": 30053}[p.Name.Port]
		if !p.External.Equal(w) {
			t.Errorf("%s: external %+v, want %+v", p.Name, p.External, w)
		}
		if p.Affinity != time.Minute {
			t.Errorf("%s: affinity %v", p.Name, p.Affinity)
		}
	}
	// 0.0.0.0/0 among the ranges allows everyone, as no range does.
	svc.Spec.LoadBalancerSourceRanges = append(svc.Spec.LoadBalancerSourceRanges, "0.0.0.0/0")
	svc.Spec.SessionAffinityConfig = nil
	for _, p := range servicePorts(svc, nil, nil) {
		if p.External.SourceRanges != nil {
			t.Errorf("0.0.0.0/0 kept ranges %v", p.External.SourceRanges)
		}
		if p.Affinity != DefaultAffinityTimeout {
			t.Errorf("affinity without config: %v", p.Affinity)
		}
	}
}

// A change of the node's zone re-selects the endpoints of every Service.
func TestTrackerFollowsTheZone(t *testing.T) {
	tr := NewTracker(WithNodeName(testNode))
	tr.UpsertService(newSvc("web", "10.96.0.10", withPorts(svcPort("http", v1.ProtocolTCP, 80))))
	tr.UpsertEndpointSlice(newSlice("web-1", "web", withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)),
		withEndpoints(ep("10.0.0.1 zones=zone-a"), ep("10.0.0.2 zones=zone-b"))))
	backends := func() string {
		return ips(tr.Snapshot(true).Services[svcName("web")][0].Backends)
	}
	if got := backends(); got != "10.0.0.1 10.0.0.2" {
		t.Errorf("zone unknown: %q, want both", got)
	}
	if !tr.SetZone("zone-b") {
		t.Error("zone change reported no change")
	}
	if got := backends(); got != "10.0.0.2" {
		t.Errorf("zone-b: %q", got)
	}
	snap := tr.Snapshot(false)
	if len(snap.Services) != 0 {
		t.Errorf("pending after a full snapshot: %v", snap.Services)
	}
	if tr.SetZone("zone-b") {
		t.Error("same zone reported as a change")
	}
	tr.SetZone("zone-a")
	if got := ips(tr.Snapshot(false).Services[svcName("web")][0].Backends); got != "10.0.0.1" {
		t.Errorf("partial snapshot after the zone moved: %q", got)
	}
}

// Snapshots share nothing with the Tracker, and keep the lists that alias
// Backends aliased.
func TestSnapshotCopiesPolicyLists(t *testing.T) {
	local := v1.ServiceInternalTrafficPolicyLocal
	tr := NewTracker(WithNodeName(testNode))
	tr.UpsertService(newSvc("web", "10.96.0.10", withType(v1.ServiceTypeNodePort), withPorts(
		v1.ServicePort{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 30080}),
		func(s *v1.Service) { s.Spec.InternalTrafficPolicy = &local; s.Spec.ExternalIPs = []string{"192.0.2.1"} }))
	tr.UpsertEndpointSlice(newSlice("web-1", "web", withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)),
		withEndpoints(ep("10.0.0.1"), ep("10.0.0.2 local"))))
	a := tr.Snapshot(true).Services[svcName("web")][0]
	if &a.Local[0] != &a.Backends[0] {
		t.Error("Local not aliased to Backends in the copy")
	}
	a.Cluster[0].Port = 1
	a.External.ExternalIPs[0] = netip.MustParseAddr("192.0.2.99")
	b := tr.Snapshot(true).Services[svcName("web")][0]
	if b.Cluster[0].Port != 8080 || b.External.ExternalIPs[0].String() != "192.0.2.1" {
		t.Errorf("a snapshot's change reached the Tracker: %v %v", b.Cluster, b.External.ExternalIPs)
	}
	if ips(b.Cluster) != "10.0.0.1 10.0.0.2" {
		t.Errorf("cluster %v", b.Cluster)
	}
}
