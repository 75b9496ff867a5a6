package iptables

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
)

func flow(proto uint8, dst string, dport uint16, replySrc string, sport uint16) *netlink.ConntrackFlow {
	return &netlink.ConntrackFlow{
		Forward: netlink.IPTuple{Protocol: proto, SrcIP: net.ParseIP("10.244.0.100"), SrcPort: 40000, DstIP: net.ParseIP(dst), DstPort: dport},
		Reverse: netlink.IPTuple{Protocol: proto, SrcIP: net.ParseIP(replySrc), SrcPort: sport, DstIP: net.ParseIP("10.244.0.100"), DstPort: 40000},
	}
}

func TestStaleUDPMatchesOnlyFlowsOffTheServingEndpoints(t *testing.T) {
	s := newStaleUDP()
	// 10.244.1.3 is terminating and still serving: no new flows, but its
	// own are kept, as kube-proxy keeps them.
	dns := apitest.WithServing(sp("dns", "dns", model.UDP, "10.96.0.10:53", "10.244.1.1:5353"), "10.244.1.1:5353", "10.244.1.3:5353")
	s.add(dns.ClusterIP, model.AddrPortSet(dns.Serving))
	for _, c := range []struct {
		name string
		flow *netlink.ConntrackFlow
		want bool
	}{
		{"translated to the current backend", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.244.1.1", 5353), false},
		{"translated to a draining endpoint", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.244.1.3", 5353), false},
		{"translated to a removed backend", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.244.1.2", 5353), true},
		{"same pod, old target port", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.244.1.1", 53), true},
		{"never translated (began before the first endpoint)", flow(unix.IPPROTO_UDP, "10.96.0.10", 53, "10.96.0.10", 53), true},
		{"TCP to the same frontend", flow(unix.IPPROTO_TCP, "10.96.0.10", 53, "10.244.1.2", 5353), false},
		{"UDP to a frontend not checked", flow(unix.IPPROTO_UDP, "10.96.0.12", 53, "10.244.1.2", 53), false},
	} {
		if got := s.MatchConntrackFlow(c.flow); got != c.want {
			t.Errorf("%s: stale = %v, want %v", c.name, got, c.want)
		}
	}
}

// Which UDP frontends a sync checks: those whose serving endpoints changed
// or that are new, if they have any; on a full sync, all that have any.
// As kube-proxy, a frontend left without serving endpoints, or deleted,
// keeps its flows.
func TestStaleUDPFrontendsOfASync(t *testing.T) {
	a := sp("a", "dns", model.UDP, "10.96.0.1:53", "10.244.1.1:53")
	aMoved := sp("a", "dns", model.UDP, "10.96.0.1:53", "10.244.1.2:53")
	// a's endpoint stops taking new flows but still serves (terminating):
	// its flows stay, nothing to check.
	aDraining := apitest.WithServing(sp("a", "dns", model.UDP, "10.96.0.1:53"), "10.244.1.1:53")
	aEmpty := sp("a", "dns", model.UDP, "10.96.0.1:53")
	b := sp("b", "dns", model.UDP, "10.96.0.2:53", "10.244.1.3:53")
	c := sp("c", "http", model.TCP, "10.96.0.3:80", "10.244.1.4:80")
	e := sp("e", "dns", model.UDP, "10.96.0.5:53", "10.244.1.5:53")
	d := &Dataplane{applied: snap(true, a, b, c).Services}
	frontends := func(s *staleUDP) []string { return s.frontends() }
	for _, tc := range []struct {
		name string
		snap *model.Snapshot
		want []string
	}{
		{"a's backend replaced", snap(false, aMoved), []string{"10.96.0.1:53"}},
		{"a unchanged in a partial sync", snap(false, a), nil},
		{"a's endpoint draining", snap(false, aDraining), nil},
		{"a left without endpoints", snap(false, aEmpty), nil},
		{"b deleted", apitest.Deleted(snap(false), b.Name.ServiceName), nil},
		{"new service e", snap(false, e), []string{"10.96.0.5:53"}},
		{"TCP only", snap(false, c), nil},
		{"full sync checks every UDP frontend", snap(true, a, b, c), []string{"10.96.0.1:53", "10.96.0.2:53"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := frontends(d.staleUDP(tc.snap, nextState(d.applied, tc.snap, false)))
			if len(got) != len(tc.want) {
				t.Fatalf("checked %v, want %v", got, tc.want)
			}
			for _, w := range tc.want {
				found := false
				for _, g := range got {
					found = found || g == w
				}
				if !found {
					t.Errorf("checked %v, want %v", got, tc.want)
				}
			}
		})
	}
}

// udpExternal is a UDP service port with every kind of external frontend.
func udpExternal(nodePort uint16, backends ...string) model.ServicePort {
	s := sp("x", "dns", model.UDP, "10.96.0.9:53", backends...)
	s.External = model.External{NodePort: nodePort,
		ExternalIPs:     []netip.Addr{netip.MustParseAddr("192.0.2.1")},
		LoadBalancerIPs: []netip.Addr{netip.MustParseAddr("198.51.100.1")}}
	return s
}

// As kube-proxy, a UDP port's external frontends are checked with its
// ClusterIP: external IPs and load balancer IPs by address, the node port
// by port. A new frontend is checked even if the endpoints did not change
// (flows sent to it before were never translated). The external-only mode
// does not translate ClusterIPs, so it leaves their flows alone, unless it
// serves them for pods.
func TestStaleUDPExternalFrontends(t *testing.T) {
	all := []string{"10.96.0.9:53", "192.0.2.1:53", "198.51.100.1:53", "nodeport 30053"}
	for _, tc := range []struct {
		name         string
		applied      model.ServicePort
		next         model.ServicePort
		externalOnly bool
		noClusterIPs bool
		want         []string
	}{
		{"endpoints arrive", udpExternal(30053), udpExternal(30053, "10.244.1.1:53"), false, false, all},
		{"unchanged", udpExternal(30053, "10.244.1.1:53"), udpExternal(30053, "10.244.1.1:53"), false, false, nil},
		{"new node port", udpExternal(30053, "10.244.1.1:53"), udpExternal(30054, "10.244.1.1:53"), false, false, []string{"nodeport 30054"}},
		{"external only", udpExternal(30053), udpExternal(30053, "10.244.1.1:53"), true, true, all[1:]},
		// The packet layer serving pods' ClusterIP traffic translates
		// it per packet too: its flows are checked.
		{"external only with ClusterIPs", udpExternal(30053), udpExternal(30053, "10.244.1.1:53"), true, false, all},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &Dataplane{applied: snap(true, tc.applied).Services}
			d.opts.externalOnly, d.opts.noClusterIPs = tc.externalOnly, tc.noClusterIPs
			s := snap(false, tc.next)
			got := d.staleUDP(s, nextState(d.applied, s, tc.noClusterIPs)).frontends()
			slices.Sort(got)
			if !slices.Equal(got, tc.want) {
				t.Errorf("checked %v, want %v", got, tc.want)
			}
		})
	}
}

// As kube-proxy, a node port flow is matched by its destination port alone:
// the rules serve the port on every address the kernel deems local, VIPs a
// cloud installs as local routes (GCP) included, which are on no interface.
func TestStaleUDPNodePortFlows(t *testing.T) {
	// What a sync of a node with one interface address checks.
	d := &Dataplane{applied: snap(true, udpExternal(30053, "10.244.1.9:53")).Services}
	next := snap(false, udpExternal(30053, "10.244.1.1:53"))
	next.Node.LocalAddresses = []netip.Addr{netip.MustParseAddr("192.168.77.1")}
	s := d.staleUDP(next, nextState(d.applied, next, false))
	for _, c := range []struct {
		name string
		flow *netlink.ConntrackFlow
		want bool
	}{
		{"to the endpoint", flow(unix.IPPROTO_UDP, "192.168.77.1", 30053, "10.244.1.1", 53), false},
		{"never translated", flow(unix.IPPROTO_UDP, "192.168.77.1", 30053, "192.168.77.1", 30053), true},
		{"to a gone endpoint", flow(unix.IPPROTO_UDP, "192.168.77.1", 30053, "10.244.1.9", 53), true},
		{"via a VIP on a local route, to a gone endpoint", flow(unix.IPPROTO_UDP, "203.0.113.7", 30053, "10.244.1.9", 53), true},
		{"via a VIP on a local route, to the endpoint", flow(unix.IPPROTO_UDP, "203.0.113.7", 30053, "10.244.1.1", 53), false},
		{"another port", flow(unix.IPPROTO_UDP, "192.168.77.1", 30054, "10.244.1.9", 53), false},
		{"TCP to the node port", flow(unix.IPPROTO_TCP, "192.168.77.1", 30053, "10.244.1.9", 53), false},
	} {
		if got := s.MatchConntrackFlow(c.flow); got != c.want {
			t.Errorf("%s: stale = %v, want %v", c.name, got, c.want)
		}
	}
}
