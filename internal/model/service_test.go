package model

import (
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

const (
	svcRep   = ResourceService + "/"
	sliceRep = ResourceEndpointSlice + "/"
)

func TestServicePorts(t *testing.T) {
	httpPort := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	httpSlicePort := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))

	tests := []struct {
		name        string
		svc         *v1.Service
		slices      []*discoveryv1.EndpointSlice
		want        []ServicePort
		wantReports []string
	}{
		{
			name: "single port, ready endpoints sorted",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.3"), readyEP("10.1.0.1"), readyEP("10.1.0.2"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080")},
		},
		{
			name: "no slices: port served with no backends",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80")},
		},
		{
			name: "unnamed port, empty protocols default to TCP",
			svc:  newSvc("a", "10.0.0.1", withPorts(svcPort("", "", 80))),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a",
					withSlicePorts(discoveryv1.EndpointPort{Port: ptr(int32(8080))}),
					withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{sp("a", "", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
		},
		{
			name: "multi-port service with named target ports, sorted by name",
			svc: newSvc("a", "10.0.0.1", withPorts(
				svcPort("metrics", v1.ProtocolTCP, 9090),
				svcPort("http", v1.ProtocolTCP, 80),
			)),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a",
					withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080), slicePortOf("metrics", v1.ProtocolTCP, 9100)),
					withEndpoints(readyEP("10.1.0.1"), readyEP("10.1.0.2"))),
			},
			want: []ServicePort{
				sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.2:8080"),
				sp("a", "metrics", TCP, "10.0.0.1:9090", "10.1.0.1:9100", "10.1.0.2:9100"),
			},
		},
		{
			name: "named target port resolving to different numbers in different slices",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-v1", "a", withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)), withEndpoints(readyEP("10.1.0.2"))),
				newSlice("a-v2", "a", withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8081)), withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8081", "10.1.0.2:8080")},
		},
		{
			name: "same IP behind two target ports is two backends",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-v1", "a", withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8081)), withEndpoints(readyEP("10.1.0.1"))),
				newSlice("a-v2", "a", withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)), withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.1:8081")},
		},
		{
			name: "several slices merged",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.4"), readyEP("10.1.0.1"))),
				newSlice("a-2", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.3"))),
				newSlice("a-3", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.2"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080", "10.1.0.4:8080")},
		},
		{
			name: "duplicate endpoint across slices: one backend, ready if any copy is ready",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(endpoint("10.1.0.1", no, no, no), readyEP("10.1.0.2"))),
				newSlice("a-2", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"), readyEP("10.1.0.2"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.2:8080")},
		},
		{
			name: "duplicate endpoint within a slice: one backend",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"), readyEP("10.1.0.1"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
		},
		{
			name: "duplicate endpoint, no copy ready: fallback if any copy is serving and terminating",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(endpoint("10.1.0.1", no, no, yes), endpoint("10.1.0.2", no, no, no))),
				newSlice("a-2", "a", httpSlicePort, withEndpoints(endpoint("10.1.0.1", no, yes, yes))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
		},
		{
			name: "none ready: serving and terminating endpoints used",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(
					endpoint("10.1.0.1", no, yes, yes),     // serving, terminating: used
					endpoint("10.1.0.2", no, no, yes),      // terminating, not serving
					endpoint("10.1.0.3", no, no, no),       // not ready, not terminating
					endpoint("10.1.0.4", no, yes, no),      // serving but not terminating (inconsistent)
					endpoint("10.1.0.5", no, yes, unknown), // unknown terminating means not terminating
				)),
				newSlice("a-2", "a", httpSlicePort, withEndpoints(endpoint("10.1.0.6", no, yes, yes))),
			},
			// Serving endpoints keep their established flows, used or
			// not.
			want: []ServicePort{withServing(sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.6:8080"),
				"10.1.0.1:8080", "10.1.0.4:8080", "10.1.0.5:8080", "10.1.0.6:8080")},
		},
		{
			name: "some ready: terminating endpoints ignored",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(endpoint("10.1.0.1", no, yes, yes))),
				newSlice("a-2", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.2"))),
			},
			// The draining endpoint still serves its established flows.
			want: []ServicePort{withServing(sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.2:8080"), "10.1.0.1:8080", "10.1.0.2:8080")},
		},
		{
			name: "none ready nor serving-terminating: no backends",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(endpoint("10.1.0.1", no, no, yes), endpoint("10.1.0.2", no, no, unknown))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80")},
		},
		{
			// kube-proxy reads an unset serving condition as true, like an
			// unset ready: not ready and not terminating, such an endpoint
			// takes no new connections but keeps its flows.
			name: "not ready, unknown serving, not terminating: serving only",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(endpoint("10.1.0.2", no, unknown, unknown))),
			},
			want: []ServicePort{withServing(sp("a", "http", TCP, "10.0.0.1:80"), "10.1.0.2:8080")},
		},
		{
			name: "nil conditions: ready",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(
					endpoint("10.1.0.1", unknown, unknown, unknown),
					endpoint("10.1.0.2", no, yes, yes), // fallback only, ignored since 10.1.0.1 is ready
				)),
			},
			want: []ServicePort{withServing(sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080"), "10.1.0.1:8080", "10.1.0.2:8080")},
		},
		{
			// A hand-written slice of a draining pod: kube-proxy reads the
			// unset serving condition as true, so it is the terminating
			// fallback when nothing is ready.
			name: "not ready, unknown serving, terminating: the fallback",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(endpoint("10.1.0.1", no, unknown, yes))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
		},
		{
			name: "endpoint with several addresses uses the first",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(discoveryv1.Endpoint{Addresses: []string{"10.1.0.2", "10.1.0.1"}})),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.2:8080")},
		},
		{
			name:   "headless",
			svc:    newSvc("a", v1.ClusterIPNone, httpPort),
			slices: []*discoveryv1.EndpointSlice{newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1")))},
		},
		{
			name: "ExternalName",
			svc:  newSvc("a", "", httpPort, withType(v1.ServiceTypeExternalName)),
		},
		{
			name: "ExternalName with a ClusterIP left over",
			svc:  newSvc("a", "10.0.0.1", httpPort, withType(v1.ServiceTypeExternalName)),
		},
		{
			name: "no ClusterIP",
			svc:  newSvc("a", "", httpPort),
		},
		{
			name: "ClusterIP only in the legacy field",
			svc:  newSvc("a", "", httpPort, func(s *v1.Service) { s.Spec.ClusterIP = "10.0.0.1" }),
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80")},
		},
		{
			name:   "IPv6-only service ignored without report",
			svc:    newSvc("a", "fd00::1", httpPort),
			slices: []*discoveryv1.EndpointSlice{newSlice("a-1", "a", httpSlicePort, withAddressType(discoveryv1.AddressTypeIPv6), withEndpoints(readyEP("fd01::1")))},
		},
		{
			name: "dual-stack service with IPv4 secondary served on IPv4",
			svc:  newSvc("a", "", httpPort, withClusterIPs("fd00::1", "10.0.0.1")),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-v6", "a", httpSlicePort, withAddressType(discoveryv1.AddressTypeIPv6), withEndpoints(readyEP("fd01::1"))),
				newSlice("a-v4", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
		},
		{
			name: "IPv6 and FQDN slices ignored",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-v6", "a", httpSlicePort, withAddressType(discoveryv1.AddressTypeIPv6), withEndpoints(readyEP("fd01::1"))),
				newSlice("a-fqdn", "a", httpSlicePort, withAddressType(discoveryv1.AddressTypeFQDN), withEndpoints(readyEP("pod.example.com"))),
				newSlice("a-v4", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
		},
		{
			name: "slices without service label or of another service ignored",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("x-1", "", httpSlicePort, withEndpoints(readyEP("10.1.0.9"))),
				newSlice("b-1", "b", httpSlicePort, withEndpoints(readyEP("10.1.0.8"))),
				newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"))),
				nil,
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
		},
		{
			name: "SCTP port skipped, TCP port of the same service served",
			svc: newSvc("a", "10.0.0.1", withPorts(
				svcPort("sctp", v1.ProtocolSCTP, 9000),
				svcPort("http", v1.ProtocolTCP, 80),
			)),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a",
					withSlicePorts(slicePortOf("sctp", v1.ProtocolSCTP, 9000), slicePortOf("http", v1.ProtocolTCP, 8080)),
					withEndpoints(readyEP("10.1.0.1"))),
			},
			want:        []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
			wantReports: []string{svcRep + ReasonUnsupportedProtocol},
		},
		{
			name:        "only SCTP ports: nothing to serve",
			svc:         newSvc("a", "10.0.0.1", withPorts(svcPort("sctp", v1.ProtocolSCTP, 9000))),
			wantReports: []string{svcRep + ReasonUnsupportedProtocol},
		},
		{
			name: "no ports: nothing to serve",
			svc:  newSvc("a", "10.0.0.1"),
		},
		{
			name: "TCP and UDP on the same port number are two service ports",
			svc: newSvc("dns", "10.0.0.10", withPorts(
				svcPort("dns-udp", v1.ProtocolUDP, 53),
				svcPort("dns-tcp", v1.ProtocolTCP, 53),
			)),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("dns-1", "dns",
					withSlicePorts(slicePortOf("dns-udp", v1.ProtocolUDP, 5353), slicePortOf("dns-tcp", v1.ProtocolTCP, 5354)),
					withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{
				sp("dns", "dns-tcp", TCP, "10.0.0.10:53", "10.1.0.1:5354"),
				sp("dns", "dns-udp", UDP, "10.0.0.10:53", "10.1.0.1:5353"),
			},
		},
		{
			name: "same name, two protocols: matched by name and protocol, sorted TCP first",
			svc: newSvc("dns", "10.0.0.10", withPorts(
				svcPort("dns", v1.ProtocolUDP, 53),
				svcPort("dns", v1.ProtocolTCP, 53),
			)),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("dns-1", "dns",
					withSlicePorts(slicePortOf("dns", v1.ProtocolUDP, 5353), slicePortOf("dns", v1.ProtocolTCP, 5354)),
					withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{
				sp("dns", "dns", TCP, "10.0.0.10:53", "10.1.0.1:5354"),
				sp("dns", "dns", UDP, "10.0.0.10:53", "10.1.0.1:5353"),
			},
		},
		{
			name: "slice port of the wrong protocol does not match",
			svc:  newSvc("a", "10.0.0.1", withPorts(svcPort("dns", v1.ProtocolUDP, 53))),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", withSlicePorts(slicePortOf("dns", v1.ProtocolTCP, 53)), withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{sp("a", "dns", UDP, "10.0.0.1:53")},
		},
		{
			name: "port name mismatch: no backends, not reported",
			svc:  newSvc("a", "10.0.0.1", withPorts(svcPort("web", v1.ProtocolTCP, 80))),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"))),
			},
			want: []ServicePort{sp("a", "web", TCP, "10.0.0.1:80")},
		},
		{
			name:        "malformed ClusterIP",
			svc:         newSvc("a", "10.0.0.300", httpPort),
			wantReports: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name:        "unspecified ClusterIP",
			svc:         newSvc("a", "0.0.0.0", httpPort),
			wantReports: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name:        "malformed primary ClusterIP, valid IPv4 secondary used",
			svc:         newSvc("a", "", httpPort, withClusterIPs("not-an-ip", "10.0.0.1")),
			want:        []ServicePort{sp("a", "http", TCP, "10.0.0.1:80")},
			wantReports: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name: "port 0 and 70000 skipped, other port served",
			svc: newSvc("a", "10.0.0.1", withPorts(
				svcPort("zero", v1.ProtocolTCP, 0),
				svcPort("http", v1.ProtocolTCP, 80),
				svcPort("big", v1.ProtocolUDP, 70000),
				svcPort("neg", v1.ProtocolUDP, -1),
			)),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"))),
			},
			want:        []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
			wantReports: []string{svcRep + ReasonInvalidPort, svcRep + ReasonInvalidPort, svcRep + ReasonInvalidPort},
		},
		{
			name: "duplicate service ports: later ones skipped",
			svc: newSvc("a", "10.0.0.1", withPorts(
				svcPort("http", v1.ProtocolTCP, 80),
				svcPort("http", v1.ProtocolTCP, 81), // same name and protocol
				svcPort("alt", v1.ProtocolTCP, 80),  // same port and protocol
			)),
			want:        []ServicePort{sp("a", "http", TCP, "10.0.0.1:80")},
			wantReports: []string{svcRep + ReasonDuplicatePort, svcRep + ReasonDuplicatePort},
		},
		{
			name: "malformed endpoint addresses skipped, others used",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a", httpSlicePort, withEndpoints(
					readyEP("10.1.0.300"),
					readyEP("10.1.0.1"),
					readyEP("fd01::1"),         // IPv6 in an IPv4 slice
					readyEP("::ffff:10.1.0.5"), // IPv4-mapped IPv6 is not IPv4
					readyEP(""),
					discoveryv1.Endpoint{}, // no address at all
					readyEP("0.0.0.0"),
				)),
				newSlice("a-2", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.2"))),
			},
			want: []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.2:8080")},
			wantReports: []string{
				sliceRep + ReasonInvalidEndpointIP, sliceRep + ReasonInvalidEndpointIP, sliceRep + ReasonInvalidEndpointIP,
				sliceRep + ReasonInvalidEndpointIP, sliceRep + ReasonInvalidEndpointIP, sliceRep + ReasonInvalidEndpointIP,
			},
		},
		{
			name: "malformed slice ports skipped, other ports and slices used",
			svc: newSvc("a", "10.0.0.1", withPorts(
				svcPort("http", v1.ProtocolTCP, 80),
				svcPort("metrics", v1.ProtocolTCP, 9090),
			)),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a",
					withSlicePorts(
						discoveryv1.EndpointPort{Name: ptr("http"), Protocol: ptr(v1.ProtocolTCP)}, // nil port
						slicePortOf("metrics", v1.ProtocolTCP, 9100),
					),
					withEndpoints(readyEP("10.1.0.1"))),
				newSlice("a-2", "a",
					withSlicePorts(
						slicePortOf("http", v1.ProtocolTCP, 0),
						slicePortOf("metrics", v1.ProtocolTCP, 70000),
					),
					withEndpoints(readyEP("10.1.0.2"))),
				newSlice("a-3", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.3"))),
			},
			want: []ServicePort{
				sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.3:8080"),
				sp("a", "metrics", TCP, "10.0.0.1:9090", "10.1.0.1:9100"),
			},
			wantReports: []string{
				sliceRep + ReasonInvalidEndpointPort, sliceRep + ReasonInvalidEndpointPort, sliceRep + ReasonInvalidEndpointPort,
			},
		},
		{
			name: "duplicate slice port: first one wins",
			svc:  newSvc("a", "10.0.0.1", httpPort),
			slices: []*discoveryv1.EndpointSlice{
				newSlice("a-1", "a",
					withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080), slicePortOf("http", v1.ProtocolTCP, 8081)),
					withEndpoints(readyEP("10.1.0.1"))),
			},
			want:        []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")},
			wantReports: []string{sliceRep + ReasonDuplicatePort},
		},
		{
			name: "nil service",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			got := servicePorts(tc.svc, tc.slices, rec.report)
			checkPorts(t, got, tc.want)
			checkReports(t, rec, tc.wantReports)
		})
	}
}

func TestServicePortsNilReport(t *testing.T) {
	// A nil report function must not crash on malformed input.
	got := servicePorts(newSvc("a", "10.0.0.1", withPorts(svcPort("x", v1.ProtocolSCTP, 1), svcPort("y", v1.ProtocolTCP, 0))), nil, nil)
	checkPorts(t, got, nil)
}
