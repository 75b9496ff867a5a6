package model

import (
	"net/netip"
	"slices"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// withFamilies sets spec.ipFamilies and spec.ipFamilyPolicy, as the API
// server defaults them.
func withFamilies(policy v1.IPFamilyPolicy, families ...v1.IPFamily) svcOpt {
	return func(s *v1.Service) {
		s.Spec.IPFamilyPolicy = &policy
		s.Spec.IPFamilies = families
	}
}

func v6Slice(name, svc string, opts ...sliceOpt) *discoveryv1.EndpointSlice {
	return newSlice(name, svc, append([]sliceOpt{withAddressType(discoveryv1.AddressTypeIPv6)}, opts...)...)
}

// Each family's Tracker serves a Service on its ClusterIP of that family,
// with the EndpointSlices of that address type, as kube-proxy's per-family
// proxiers do; a malformed ClusterIP is reported by one family only, and so
// is a port problem, so a dual-stack proxy counts each once.
func TestServicePortsPerFamily(t *testing.T) {
	http := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	sp4 := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))
	v4, v6 := v1.IPv4Protocol, v1.IPv6Protocol
	single, prefer, require := v1.IPFamilyPolicySingleStack, v1.IPFamilyPolicyPreferDualStack, v1.IPFamilyPolicyRequireDualStack
	slices46 := []*discoveryv1.EndpointSlice{
		newSlice("a-4", "a", sp4, withEndpoints(readyEP("10.1.0.1"), readyEP("10.1.0.2"))),
		v6Slice("a-6", "a", sp4, withEndpoints(readyEP("fd01::2"), readyEP("fd01::1"))),
		newSlice("a-f", "a", sp4, withAddressType(discoveryv1.AddressTypeFQDN), withEndpoints(readyEP("a.example"))),
	}
	v4Ports := []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.2:8080")}
	v6Ports := []ServicePort{sp("a", "http", TCP, "[fd00::1]:80", "[fd01::1]:8080", "[fd01::2]:8080")}
	for _, tc := range []struct {
		name              string
		svc               *v1.Service
		want4, want6      []ServicePort
		reports4, report6 []string
	}{
		{
			name:  "SingleStack IPv4: the IPv6 Tracker does not serve it",
			svc:   newSvc("a", "10.0.0.1", http, withFamilies(single, v4)),
			want4: v4Ports,
		},
		{
			name:  "SingleStack IPv6: the IPv4 Tracker does not serve it, and does not report it",
			svc:   newSvc("a", "fd00::1", http, withFamilies(single, v6)),
			want6: v6Ports,
		},
		{
			name:  "PreferDualStack with one ClusterIP (single-stack cluster)",
			svc:   newSvc("a", "10.0.0.1", http, withFamilies(prefer, v4)),
			want4: v4Ports,
		},
		{
			name:  "PreferDualStack with two ClusterIPs, IPv6 first",
			svc:   newSvc("a", "", http, withClusterIPs("fd00::1", "10.0.0.1"), withFamilies(prefer, v6, v4)),
			want4: v4Ports, want6: v6Ports,
		},
		{
			name:  "RequireDualStack",
			svc:   newSvc("a", "", http, withClusterIPs("10.0.0.1", "fd00::1"), withFamilies(require, v4, v6)),
			want4: v4Ports, want6: v6Ports,
		},
		{
			name:  "no ipFamilies (an object older than dual-stack): the address decides",
			svc:   newSvc("a", "fd00::1", http),
			want6: v6Ports,
		},
		{
			name:     "malformed IPv4 ClusterIP: reported by the IPv4 Tracker only",
			svc:      newSvc("a", "", http, withClusterIPs("10.0.0.300", "fd00::1"), withFamilies(require, v4, v6)),
			want6:    v6Ports,
			reports4: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name:    "malformed IPv6 ClusterIP: reported by the IPv6 Tracker only",
			svc:     newSvc("a", "", http, withClusterIPs("10.0.0.1", "fd00::zz"), withFamilies(require, v4, v6)),
			want4:   v4Ports,
			report6: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name:    "unspecified IPv6 ClusterIP without ipFamilies: its own family reports it",
			svc:     newSvc("a", "", http, withClusterIPs("10.0.0.1", "::")),
			want4:   v4Ports,
			report6: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name:     "garbage without ipFamilies: the IPv4 Tracker reports it, as kube-proxy hands it to IPv4",
			svc:      newSvc("a", "bogus", http),
			reports4: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name:     "IPv4-mapped ClusterIP: served by neither, reported once",
			svc:      newSvc("a", "::ffff:10.0.0.1", http),
			reports4: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name: "headless dual-stack: neither",
			svc:  newSvc("a", "", http, withClusterIPs(v1.ClusterIPNone, v1.ClusterIPNone), withFamilies(require, v4, v6)),
		},
		{
			name: "port problems of a dual-stack Service reported by the first family's Tracker only",
			svc: newSvc("a", "", withPorts(svcPort("http", v1.ProtocolTCP, 80), svcPort("sctp", v1.ProtocolSCTP, 90),
				svcPort("big", v1.ProtocolTCP, 70000)), withClusterIPs("fd00::1", "10.0.0.1"), withFamilies(require, v6, v4)),
			want4:   v4Ports,
			want6:   v6Ports,
			report6: []string{svcRep + ReasonUnsupportedProtocol, svcRep + ReasonInvalidPort},
		},
		{
			name: "port problems reported by the other family when the first ClusterIP is malformed",
			svc: newSvc("a", "", withPorts(svcPort("http", v1.ProtocolTCP, 80), svcPort("sctp", v1.ProtocolSCTP, 90)),
				withClusterIPs("fd00::zz", "10.0.0.1"), withFamilies(require, v6, v4)),
			want4:    v4Ports,
			reports4: []string{svcRep + ReasonUnsupportedProtocol},
			report6:  []string{svcRep + ReasonInvalidClusterIP},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, c := range []struct {
				f       IPFamily
				want    []ServicePort
				reports []string
			}{{IPv4, tc.want4, tc.reports4}, {IPv6, tc.want6, tc.report6}} {
				rec := &recorder{}
				got := servicePortsOf(c.f, tc.svc, slices46, rec.report)
				if !deepEqualPorts(got, c.want) {
					t.Errorf("%s ports:\n got %s\nwant %s", c.f, dumpPorts(got), dumpPorts(c.want))
				}
				if r := rec.take(); !slices.Equal(r, slices.Sorted(slices.Values(c.reports))) {
					t.Errorf("%s reports %q, want %q", c.f, r, c.reports)
				}
			}
		})
	}
}

// An IPv6 slice's endpoints must be IPv6, and not IPv4-mapped (validation
// refuses those, and kube-proxy would write the IPv4 address they carry into
// ip6tables rules); only the IPv6 Tracker looks at them.
func TestIPv6SliceEndpoints(t *testing.T) {
	svc := newSvc("a", "fd00::1", withPorts(svcPort("http", v1.ProtocolTCP, 80)))
	slice := v6Slice("a-1", "a", withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)), withEndpoints(
		readyEP("fd01::1"),
		readyEP("2001:db8::5"),
		readyEP("10.1.0.1"),        // IPv4 in an IPv6 slice
		readyEP("::ffff:10.1.0.1"), // IPv4-mapped
		readyEP("::"),
		readyEP("fe80::1%eth0"),
		readyEP("fd01::zz"),
	))
	rec := &recorder{}
	got := servicePortsOf(IPv6, svc, []*discoveryv1.EndpointSlice{slice}, rec.report)
	checkPorts(t, got, []ServicePort{sp("a", "http", TCP, "[fd00::1]:80", "[2001:db8::5]:8080", "[fd01::1]:8080")})
	want := slices.Repeat([]string{sliceRep + ReasonInvalidEndpointIP}, 5)
	checkReports(t, rec, want)
	// The IPv4 Tracker ignores the slice outright: no report.
	if convertSlice(slice, testNode, IPv4, rec.report) != nil {
		t.Error("the IPv4 Tracker kept an IPv6 slice")
	}
	checkReports(t, rec, nil)
}

// External IPs, load balancer IPs and source ranges go to the family they
// are of, as kube-proxy's service port info filters them per proxier.
func TestExternalPerFamily(t *testing.T) {
	addrs := func(ss ...string) []netip.Addr {
		var out []netip.Addr
		for _, s := range ss {
			out = append(out, netip.MustParseAddr(s))
		}
		return out
	}
	prefixes := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	lb := func(ranges []string, ext []string, ingress ...string) *v1.Service {
		return newSvc("lb", "", withType(v1.ServiceTypeLoadBalancer),
			withPorts(v1.ServicePort{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 30080}),
			withClusterIPs("10.96.0.20", "fd00::20"),
			withFamilies(v1.IPFamilyPolicyRequireDualStack, v1.IPv4Protocol, v1.IPv6Protocol),
			func(s *v1.Service) {
				s.Spec.LoadBalancerSourceRanges = ranges
				s.Spec.ExternalIPs = ext
				for _, ip := range ingress {
					s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, v1.LoadBalancerIngress{IP: ip})
				}
			})
	}
	for _, tc := range []struct {
		name                 string
		svc                  *v1.Service
		ext4, ext6, lb4, lb6 []netip.Addr
		src4, src6           []netip.Prefix
	}{
		{
			name: "addresses and ranges of both families split",
			svc: lb([]string{"198.51.100.0/24", "2001:db8:1::/48", " 203.0.113.7/32"},
				[]string{"192.0.2.9", "2001:db8::9", "192.0.2.7", "2001:db8::7"}, "203.0.113.10", "2001:db8::10"),
			ext4: addrs("192.0.2.7", "192.0.2.9"), ext6: addrs("2001:db8::7", "2001:db8::9"),
			lb4: addrs("203.0.113.10"), lb6: addrs("2001:db8::10"),
			src4: prefixes("198.51.100.0/24", "203.0.113.7/32"), src6: prefixes("2001:db8:1::/48"),
		},
		{
			name: "::/0 opens IPv6 only; IPv4 keeps its ranges",
			svc:  lb([]string{"10.0.0.0/8", "::/0"}, nil, "203.0.113.10", "2001:db8::10"),
			lb4:  addrs("203.0.113.10"), lb6: addrs("2001:db8::10"),
			src4: prefixes("10.0.0.0/8"),
		},
		{
			name: "0.0.0.0/0 opens IPv4 only",
			svc:  lb([]string{"0.0.0.0/0", "2001:db8:1::/48"}, nil, "203.0.113.10", "2001:db8::10"),
			lb4:  addrs("203.0.113.10"), lb6: addrs("2001:db8::10"),
			src6: prefixes("2001:db8:1::/48"),
		},
		{
			name: "ranges of IPv4 only: the IPv6 load balancer IP allows every source, as kube-proxy's IPv6 proxier",
			svc:  lb([]string{"10.0.0.0/8"}, nil, "203.0.113.10", "2001:db8::10"),
			lb4:  addrs("203.0.113.10"), lb6: addrs("2001:db8::10"),
			src4: prefixes("10.0.0.0/8"),
		},
		{
			name: "IPv4-mapped addresses and ranges are the IPv4 ones they carry, as net.IP reads them",
			svc:  lb([]string{"::ffff:10.0.0.0/104"}, []string{"::ffff:192.0.2.9"}, "::ffff:203.0.113.10"),
			ext4: addrs("192.0.2.9"), lb4: addrs("203.0.113.10"), src4: prefixes("10.0.0.0/8"),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, c := range []struct {
				f        IPFamily
				ext, lbs []netip.Addr
				src      []netip.Prefix
			}{{IPv4, tc.ext4, tc.lb4, tc.src4}, {IPv6, tc.ext6, tc.lb6, tc.src6}} {
				ports := servicePortsOf(c.f, tc.svc, nil, nil)
				if len(ports) != 1 {
					t.Fatalf("%s: %d ports", c.f, len(ports))
				}
				e := ports[0].External
				if !slices.Equal(e.ExternalIPs, c.ext) || !slices.Equal(e.LoadBalancerIPs, c.lbs) || !slices.Equal(e.SourceRanges, c.src) {
					t.Errorf("%s: external %v lb %v ranges %v, want %v %v %v", c.f, e.ExternalIPs, e.LoadBalancerIPs, e.SourceRanges, c.ext, c.lbs, c.src)
				}
				if e.NodePort != 30080 {
					t.Errorf("%s: node port %d", c.f, e.NodePort)
				}
			}
		})
	}
}

// A Service changed from SingleStack to dual-stack appears in the IPv6
// Tracker, and disappears when changed back; the IPv4 Tracker serves it
// throughout, unchanged.
func TestSingleToDualStackAndBack(t *testing.T) {
	tr4, tr6 := NewTracker(WithFamily(IPv4)), NewTracker(WithFamily(IPv6))
	http := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	sp4 := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))
	single := newSvc("a", "10.0.0.1", http, withFamilies(v1.IPFamilyPolicySingleStack, v1.IPv4Protocol))
	dual := newSvc("a", "", http, withClusterIPs("10.0.0.1", "fd00::1"),
		withFamilies(v1.IPFamilyPolicyPreferDualStack, v1.IPv4Protocol, v1.IPv6Protocol))
	want4 := []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080")}
	want6 := []ServicePort{sp("a", "http", TCP, "[fd00::1]:80", "[fd01::1]:8080")}
	both := func(f func(*Tracker) bool) (bool, bool) { return f(tr4), f(tr6) }

	both(func(t *Tracker) bool { return t.UpsertService(single) })
	// The EndpointSlice controller writes an IPv6 slice once the Service
	// has an IPv6 ClusterIP; here it comes first, before the Service has
	// one: the IPv6 Tracker keeps it, serving nothing yet.
	both(func(t *Tracker) bool {
		return t.UpsertEndpointSlice(newSlice("a-4", "a", sp4, withEndpoints(readyEP("10.1.0.1"))))
	})
	if c4, c6 := both(func(t *Tracker) bool {
		return t.UpsertEndpointSlice(v6Slice("a-6", "a", sp4, withEndpoints(readyEP("fd01::1"))))
	}); c4 || c6 {
		t.Errorf("IPv6 slice of a SingleStack IPv4 Service changed something: %v %v", c4, c6)
	}
	checkServices(t, "IPv4 single", tr4.Snapshot(true).Services, services{svcName("a"): want4})
	checkServices(t, "IPv6 single", tr6.Snapshot(true).Services, services{})

	if c4, c6 := both(func(t *Tracker) bool { return t.UpsertService(dual) }); c4 || !c6 {
		t.Errorf("to dual-stack: changed %v %v, want false true", c4, c6)
	}
	checkServices(t, "IPv6 partial after dual", tr6.Snapshot(false).Services, services{svcName("a"): want6})
	checkServices(t, "IPv4 partial after dual", tr4.Snapshot(false).Services, services{})
	checkServices(t, "IPv6 full after dual", tr6.Snapshot(true).Services, services{svcName("a"): want6})

	if c4, c6 := both(func(t *Tracker) bool { return t.UpsertService(single) }); c4 || !c6 {
		t.Errorf("back to single-stack: changed %v %v, want false true", c4, c6)
	}
	checkServices(t, "IPv6 partial after single", tr6.Snapshot(false).Services, services{svcName("a"): nil})
	checkServices(t, "IPv6 full after single", tr6.Snapshot(true).Services, services{})
	checkServices(t, "IPv4 full after single", tr4.Snapshot(true).Services, services{svcName("a"): want4})
}

// Each family's change counts hold the EndpointSlices of its address type
// only, as kube-proxy's per-family endpoints change trackers count them.
func TestChangeCountsPerFamily(t *testing.T) {
	tr4, tr6 := NewTracker(WithFamily(IPv4)), NewTracker(WithFamily(IPv6))
	for _, tr := range []*Tracker{tr4, tr6} {
		tr.UpsertService(newSvc("a", "", withPorts(svcPort("http", v1.ProtocolTCP, 80)), withClusterIPs("10.0.0.1", "fd00::1")))
		tr.UpsertEndpointSlice(newSlice("a-4", "a", withEndpoints(readyEP("10.1.0.1")), withVersion("1")))
		tr.UpsertEndpointSlice(v6Slice("a-6", "a", withEndpoints(readyEP("fd01::1")), withVersion("1")))
		tr.UpsertEndpointSlice(v6Slice("a-6", "a", withEndpoints(readyEP("fd01::2")), withVersion("2")))
		tr.UpsertEndpointSlice(newSlice("a-f", "a", withAddressType(discoveryv1.AddressTypeFQDN), withVersion("1")))
		tr.DeleteEndpointSlice(v6Slice("a-6", "a", withVersion("2")))
	}
	checkCounts(t, tr4, ChangeCounts{ServiceChanges: 1, EndpointChanges: 1, PendingEndpointChanges: 1, PendingServices: 1})
	checkCounts(t, tr6, ChangeCounts{ServiceChanges: 1, EndpointChanges: 3, PendingEndpointChanges: 3, PendingServices: 1})
}

func TestHostScopedIPv6(t *testing.T) {
	for _, c := range []struct {
		ip   string
		want bool
	}{
		{"::1", true}, {"fe80::1", true}, {"febf:ffff::1", true}, {"ff02::1", true}, {"ff05::2", true}, {"::", true},
		{"::ffff:169.254.169.254", true}, {"::ffff:0.0.0.0", true}, {"::ffff:255.255.255.255", true},
		{"fd00::1", false}, {"2001:db8::1", false}, {"fec0::1", false}, {"::ffff:10.0.0.1", false}, {"64:ff9b::a00:1", false},
	} {
		if got := HostScoped(netip.MustParseAddr(c.ip)); got != c.want {
			t.Errorf("HostScoped(%s) = %v, want %v", c.ip, got, c.want)
		}
	}
	// The IPv6 Tracker reports a Service naming an IPv6 host-scoped
	// address, the IPv4 Tracker one naming an IPv4 one: a dual-stack
	// proxy reports each address's Service once.
	svc := newSvc("h", "", withPorts(svcPort("http", v1.ProtocolTCP, 80)), withClusterIPs("10.0.0.1", "fd00::1"),
		func(s *v1.Service) { s.Spec.ExternalIPs = []string{"fe80::1", "192.0.2.1"} })
	for _, c := range []struct {
		f    IPFamily
		want []string
	}{{IPv4, nil}, {IPv6, []string{svcRep + ReasonHostScopedExternalIP}}} {
		rec := &recorder{}
		NewTracker(WithFamily(c.f), WithHostScopedReports(), WithOnSkipped(rec.report)).UpsertService(svc)
		checkReports(t, rec, c.want)
	}
}

// Two conversions of an IPv6 slice compare equal, and differ when only an
// endpoint's address differs (the Tracker keeps a slice change that comes
// before its Service only if what it keeps of the slice changed).
func TestConvertedIPv6SlicesCompareByAddress(t *testing.T) {
	port := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))
	mk := func(addr string) *sliceInfo {
		return convertSlice(v6Slice("s1", "svc", port, withEndpoints(readyEP(addr))), testNode, IPv6, func(string, string) {})
	}
	if a, b := mk("fd01::1"), mk("fd01::1"); !equalSliceInfo(a, b) {
		t.Error("the same IPv6 slice converted twice compares unequal")
	}
	if a, b := mk("fd01::1"), mk("fd01::2"); equalSliceInfo(a, b) {
		t.Error("IPv6 slices whose endpoint addresses differ compare equal")
	}
}

// A single-stack proxy runs one Tracker: it reports the port problems of a
// dual-stack Service whose first family is the other one, which a
// dual-stack proxy leaves to that family's Tracker.
func TestSoleFamilyReportsPortProblems(t *testing.T) {
	svc := newSvc("a", "", withPorts(svcPort("http", v1.ProtocolTCP, 80), svcPort("sctp", v1.ProtocolSCTP, 90)),
		withClusterIPs("fd00::1", "10.0.0.1"), withFamilies(v1.IPFamilyPolicyRequireDualStack, v1.IPv6Protocol, v1.IPv4Protocol))
	for _, tc := range []struct {
		sole bool
		want []string
	}{{false, nil}, {true, []string{svcRep + ReasonUnsupportedProtocol}}} {
		rec := &recorder{}
		opts := []TrackerOption{WithFamily(IPv4), WithOnSkipped(rec.report)}
		if tc.sole {
			opts = append(opts, WithSoleFamily())
		}
		NewTracker(opts...).UpsertService(svc)
		if got := rec.take(); !slices.Equal(got, tc.want) {
			t.Errorf("sole %v: IPv4 Tracker reports %q, want %q", tc.sole, got, tc.want)
		}
	}
}
