package testnet

import (
	"fmt"
	"net/netip"
)

// AddMachine creates a "client machine" outside the cluster: a namespace on
// a network of its own with the node, which gets nodeIP/24 (/64 for IPv6) on its end (an
// address node ports answer on), the machine ip/24 and a default route
// through the node, so that external IPs and load balancer IPs lead to the
// node too, as from a machine on the node's LAN or a load balancer
// forwarding to it. Its processes never run in the test's cgroup: no
// socket program sees them, so what reaches a Service from there is served
// per packet, as traffic from another machine is. Give each machine a /24
// of its own: two links with one prefix would leave the node's replies to
// one of them on the other. ip and nodeIP are of one family; an IPv6
// machine (a /64 of its own) makes the node an IPv6 router.
func (n *Net) AddMachine(name, ip, nodeIP string) *Pod {
	n.t.Helper()
	addr, node := netip.MustParseAddr(ip), netip.MustParseAddr(nodeIP)
	bits, nodad := 24, []string{}
	if addr.Is6() {
		bits, nodad = 64, []string{"nodad"}
		n.enableIPv6()
	}
	if !netip.PrefixFrom(node, bits).Masked().Contains(addr) {
		n.t.Fatalf("machine address %s is not on %s/%d", ip, nodeIP, bits)
	}
	plen := fmt.Sprintf("/%d", bits)
	n.mu.Lock()
	idx := len(n.pods)
	n.mu.Unlock()
	hostIf := fmt.Sprintf("ext%d", idx)
	p := &Pod{net: n, Name: name, NS: n.Prefix + "-" + name, IP: addr, IPs: []netip.Addr{addr}, HostIf: hostIf, outside: true}
	n.mustRun("ip", "netns", "add", p.NS)
	n.mu.Lock()
	n.pods = append(n.pods, p)
	n.mu.Unlock()
	n.mustRun("ip", "-n", n.Node, "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", p.NS)
	n.mustRun(append([]string{"ip", "-n", n.Node, "addr", "add", nodeIP + plen, "dev", hostIf}, nodad...)...)
	n.mustRun("ip", "-n", n.Node, "link", "set", hostIf, "up")
	n.mustRun("ip", "-n", p.NS, "link", "set", "lo", "up")
	n.mustRun(append([]string{"ip", "-n", p.NS, "addr", "add", ip + plen, "dev", "eth0"}, nodad...)...)
	n.mustRun("ip", "-n", p.NS, "link", "set", "eth0", "up")
	n.mustRun("ip", "-n", p.NS, "route", "add", "default", "via", nodeIP, "dev", "eth0")
	return p
}

// AddNodeAddress gives the node another address (on its loopback device,
// as a load balancer IP or external IP assigned to the node would be), of
// either family.
func (n *Net) AddNodeAddress(ip string) {
	n.t.Helper()
	if netip.MustParseAddr(ip).Is6() {
		n.enableIPv6()
		n.mustRun("ip", "-n", n.Node, "addr", "add", ip+"/128", "dev", "lo", "nodad")
		return
	}
	n.mustRun("ip", "-n", n.Node, "addr", "add", ip+"/32", "dev", "lo")
}
