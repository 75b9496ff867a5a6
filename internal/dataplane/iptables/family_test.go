package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// The IPv6 cases are the IPv4 ones with every address mapped into IPv6 by
// to6: a.b.c.d becomes fd00:a:b:c::d (the decimal digits read as hex
// groups), 127.0.0.0/8 becomes ::1, 169.254.c.d fe80::c:d. The model
// hands each family's proxy that family's addresses alone; mapping its
// IPv4 snapshots keeps every kind of Service the IPv4 goldens have.
func to6(a netip.Addr) netip.Addr {
	if !a.Is4() {
		return a
	}
	b := a.As4()
	switch {
	case a.IsLoopback():
		return netip.IPv6Loopback()
	case b[0] == 169 && b[1] == 254:
		return netip.MustParseAddr(fmt.Sprintf("fe80::%d:%d", b[2], b[3]))
	}
	return netip.MustParseAddr(fmt.Sprintf("fd00:%d:%d:%d::%d", b[0], b[1], b[2], b[3]))
}

// prefixTo6 maps a.b.0.0/16 to fd00:a:b::/48, a.b.c.0/24 to
// fd00:a:b:c::/64, and a longer prefix to the mapped address's /(96+bits).
func prefixTo6(p netip.Prefix) netip.Prefix {
	bits := p.Bits()
	switch bits {
	case 8, 16, 24:
		bits = 16 + bits*2
	default:
		bits += 96
	}
	return netip.PrefixFrom(to6(p.Addr()), bits).Masked()
}

func backendsTo6(bs []model.Backend) []model.Backend {
	if bs == nil {
		return nil
	}
	out := make([]model.Backend, len(bs))
	for i, b := range bs {
		out[i] = model.Backend{IP: to6(b.IP), Port: b.Port}
	}
	slices.SortFunc(out, model.Backend.Compare)
	return out
}

func addrsTo6(as []netip.Addr) []netip.Addr {
	if as == nil {
		return nil
	}
	out := make([]netip.Addr, len(as))
	for i, a := range as {
		out[i] = to6(a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// snapshotTo6 is snap with every address mapped by to6.
func snapshotTo6(snap *model.Snapshot) *model.Snapshot {
	out := *snap
	out.Services = make(map[model.ServiceName][]model.ServicePort, len(snap.Services))
	for name, ports := range snap.Services {
		for _, sp := range ports {
			sp.ClusterIP.IP = to6(sp.ClusterIP.IP)
			sp.Backends, sp.Serving = backendsTo6(sp.Backends), backendsTo6(sp.Serving)
			sp.Cluster, sp.Local = backendsTo6(sp.Cluster), backendsTo6(sp.Local)
			sp.HealthCheckLocal = backendsTo6(sp.HealthCheckLocal)
			e := &sp.External
			e.ExternalIPs, e.LoadBalancerIPs = addrsTo6(e.ExternalIPs), addrsTo6(e.LoadBalancerIPs)
			if e.SourceRanges != nil {
				var rs []netip.Prefix
				for _, r := range e.SourceRanges {
					rs = append(rs, prefixTo6(r))
				}
				slices.SortFunc(rs, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
				e.SourceRanges = rs
			}
			out.Services[name] = append(out.Services[name], sp)
		}
	}
	out.Node = nodeTo6(snap.Node)
	return &out
}

func nodeTo6(n model.NodeInfo) model.NodeInfo {
	n.NodePortAddresses = addrsTo6(n.NodePortAddresses)
	n.LocalAddresses = addrsTo6(n.LocalAddresses)
	return n
}

func TestTo6(t *testing.T) {
	for in, want := range map[string]string{"10.96.10.1": "fd00:10:96:10::1", "127.0.0.53": "::1", "169.254.10.15": "fe80::10:15", "172.29.0.2": "fd00:172:29::2"} {
		if got := to6(netip.MustParseAddr(in)).String(); got != want {
			t.Errorf("to6(%s) = %s, want %s", in, got, want)
		}
	}
	for in, want := range map[string]string{"203.0.113.0/24": "fd00:203:0:113::/64", "172.29.0.0/16": "fd00:172:29::/48", "203.0.113.128/25": "fd00:203:0:113::100/121"} {
		if got := prefixTo6(netip.MustParsePrefix(in)).String(); got != want {
			t.Errorf("prefixTo6(%s) = %s, want %s", in, got, want)
		}
	}
}

// An address of the other family would fail the whole restore: it is left
// out and counted, a port whose ClusterIP is of the other family whole,
// and load balancer IPs whose every source range was of the other family
// are left out rather than opened to every source.
func TestOtherFamilyAddressesAreLeftOut(t *testing.T) {
	d := &Dataplane{family: model.IPv6, events: map[string]uint64{}}
	good := sp("good", "http", model.TCP, "[fd00::1]:80", "[fd00:1::1]:8080")
	mixed := sp("mixed", "http", model.TCP, "[fd00::2]:80", "[fd00:1::2]:8080", "10.244.0.2:8080")
	mixed.External.ExternalIPs = []netip.Addr{netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("2001:db8::2")}
	ranges := sp("ranges", "http", model.TCP, "[fd00::3]:80", "[fd00:1::3]:8080")
	ranges.External.LoadBalancerIPs = []netip.Addr{netip.MustParseAddr("2001:db8::3")}
	ranges.External.SourceRanges = []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}
	wrong := sp("wrong", "http", model.TCP, "10.96.0.4:80", "10.244.0.4:8080")
	in := snap(true, good, mixed, ranges, wrong)
	in.Node = model.NodeInfo{NodePortAddresses: []netip.Addr{netip.MustParseAddr("172.29.0.2"), netip.MustParseAddr("fd00:172:29::2")}}
	out := d.ofFamily(in)

	if got := out.Services[good.Name.ServiceName]; len(got) != 1 || !slices.Equal(got[0].Backends, good.Backends) {
		t.Errorf("good port changed: %+v", got)
	}
	m := out.Services[mixed.Name.ServiceName][0]
	if len(m.Backends) != 1 || m.Backends[0].IP != netip.MustParseAddr("fd00:1::2") || len(m.Serving) != 1 || len(m.Cluster) != 1 {
		t.Errorf("mixed port's backends = %v, serving %v, cluster %v: want the IPv6 one alone", m.Backends, m.Serving, m.Cluster)
	}
	if !slices.Equal(m.External.ExternalIPs, []netip.Addr{netip.MustParseAddr("2001:db8::2")}) {
		t.Errorf("mixed port's external IPs = %v", m.External.ExternalIPs)
	}
	if r := out.Services[ranges.Name.ServiceName][0]; r.External.LoadBalancerIPs != nil || r.External.SourceRanges != nil {
		t.Errorf("ranges port keeps LB IPs %v and ranges %v: want neither", r.External.LoadBalancerIPs, r.External.SourceRanges)
	}
	if w := out.Services[wrong.Name.ServiceName]; len(w) != 0 {
		t.Errorf("an IPv4 ClusterIP is kept in the IPv6 rules: %+v", w)
	}
	if !slices.Equal(out.Node.NodePortAddresses, []netip.Addr{netip.MustParseAddr("fd00:172:29::2")}) {
		t.Errorf("node port addresses = %v", out.Node.NodePortAddresses)
	}
	if len(in.Services[mixed.Name.ServiceName][0].Backends) != 2 {
		t.Error("the caller's snapshot was changed")
	}
	if got := d.events["other_family_address_skipped"]; got != 4 {
		t.Errorf("other_family_address_skipped = %d, want 4 (three ports, the node)", got)
	}
	// A snapshot of the family alone is handed on as it is.
	clean := snap(true, good)
	if d.ofFamily(clean) != clean {
		t.Error("a snapshot of the datapath's family was copied")
	}
}
