package testnet

import "net/netip"

// Dual-stack and IPv6 pods. AddPod takes an address of either family (an
// IPv6 one makes an IPv6-only pod); AddAddress gives a pod an address of
// the other family too, making it dual-stack. The node's IPv6 side is set up
// on first use (enableIPv6), so IPv4-only tests run exactly the commands
// they always ran. IPv6 addresses are added with nodad, usable at once, and
// belong in fd00::/8 (unique local): nothing routes them out of the test's
// namespaces.

// PodGateway6 is the node's IPv6 address on every pod link: link-local,
// which an IPv6 default route needs no more than.
const PodGateway6 = "fe80::1"

// NodeAddress6 is the node's own global IPv6 address (on its loopback):
// the source of a hostNetwork client's IPv6 connections, as PodGateway is
// of its IPv4 ones.
const NodeAddress6 = "fd00:10:244:ffff::fe"

// enableIPv6 turns the node namespace into an IPv6 router, once: forwarding
// (all.forwarding also sets default's, for the pod links made later), no
// duplicate address detection on its links, ICMPv6 errors unlimited (as
// net.ipv4.icmp_ratelimit=0 for IPv4), and NodeAddress6.
func (n *Net) enableIPv6() {
	n.t.Helper()
	n.mu.Lock()
	done := n.ipv6
	n.ipv6 = true
	n.mu.Unlock()
	if done {
		return
	}
	n.mustRun("ip", "netns", "exec", n.Node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1",
		"net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.icmp.ratelimit=0")
	n.mustRun("ip", "-n", n.Node, "addr", "add", NodeAddress6+"/128", "dev", "lo", "nodad")
}

// addPodAddress gives pod p address ip (either family) on its eth0: the
// node's gateway address of that family on p's link, a host route to ip on
// the node, and the pod's default route of that family to the gateway.
// eth0 must be up on both ends already, or be brought up afterwards.
func (n *Net) addPodAddress(p *Pod, ip netip.Addr) {
	n.t.Helper()
	if ip.Is4() {
		n.mustRun("ip", "-n", n.Node, "addr", "add", PodGateway+"/32", "dev", p.HostIf)
		n.mustRun("ip", "-n", n.Node, "route", "add", ip.String()+"/32", "dev", p.HostIf)
		n.mustRun("ip", "-n", p.NS, "addr", "add", ip.String()+"/32", "dev", "eth0")
		n.mustRun("ip", "-n", p.NS, "route", "add", PodGateway, "dev", "eth0", "scope", "link")
		// Everything, the service range included, goes to the node, which
		// has routes to pods only: an untranslated VIP dies there.
		n.mustRun("ip", "-n", p.NS, "route", "add", "default", "via", PodGateway, "dev", "eth0")
		return
	}
	n.enableIPv6()
	n.mustRun("ip", "-n", n.Node, "addr", "add", PodGateway6+"/64", "dev", p.HostIf, "nodad")
	n.mustRun("ip", "-n", n.Node, "route", "add", ip.String()+"/128", "dev", p.HostIf)
	n.mustRun("ip", "-n", p.NS, "addr", "add", ip.String()+"/128", "dev", "eth0", "nodad")
	// A link-local gateway needs no route to it.
	n.mustRun("ip", "-n", p.NS, "route", "add", "default", "via", PodGateway6, "dev", "eth0")
}

// AddAddress gives the pod an address of the family it has none of yet,
// making it dual-stack (an IPv4 pod's IPv6 address, or the reverse):
// reachable from every pod with an address of that family. IPOf finds it.
func (p *Pod) AddAddress(ip string) {
	p.net.t.Helper()
	a := netip.MustParseAddr(ip)
	if p.IPOf(a.Is4()).IsValid() {
		p.net.t.Fatalf("pod %s already has an address of the family of %s", p.Name, ip)
	}
	p.net.addPodAddress(p, a)
	p.net.mu.Lock()
	p.IPs = append(p.addrs(), a)
	p.net.mu.Unlock()
}

// IPOf returns the pod's IPv4 address (v4) or IPv6 address (!v4); invalid
// if it has none of that family.
func (p *Pod) IPOf(v4 bool) netip.Addr {
	for _, a := range p.addrs() {
		if a.Is4() == v4 {
			return a
		}
	}
	return netip.Addr{}
}

// addrs are the pod's addresses: IP first.
func (p *Pod) addrs() []netip.Addr {
	if len(p.IPs) == 0 {
		return []netip.Addr{p.IP}
	}
	return p.IPs
}
