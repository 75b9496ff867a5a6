package testnet

import (
	"fmt"
	"net/netip"
)

// NodeIP is the node's address on the network outside the cluster that
// AddOutside builds: the address node ports, external IPs and load balancer
// traffic arrive at.
const NodeIP = "192.168.50.1"

// outsidePrefixLen is the length of the outside network's prefix.
const outsidePrefixLen = 24

// AddOutside creates a "client machine": a namespace on a network of its
// own with the node (NodeIP), whose traffic to anything else goes to the
// node as its default route, like a machine on the node's LAN or a load
// balancer forwarding to it. Its processes never run in the test's cgroup:
// no socket program sees them, so what reaches a Service from there is
// served per packet, as traffic from another machine is. ip must be in
// NodeIP's /24. Its name must be unique in the test.
func (n *Net) AddOutside(name, ip string) *Pod {
	n.t.Helper()
	addr := netip.MustParseAddr(ip)
	if !netip.PrefixFrom(netip.MustParseAddr(NodeIP), outsidePrefixLen).Masked().Contains(addr) {
		n.t.Fatalf("outside client address %s is not on %s/%d", ip, NodeIP, outsidePrefixLen)
	}
	n.mu.Lock()
	idx := len(n.pods)
	n.mu.Unlock()
	hostIf := fmt.Sprintf("ext%d", idx)
	p := &Pod{net: n, Name: name, NS: n.Prefix + "-" + name, IP: addr, HostIf: hostIf, outside: true}
	n.mustRun("ip", "netns", "add", p.NS)
	n.mu.Lock()
	n.pods = append(n.pods, p)
	n.mu.Unlock()
	n.mustRun("ip", "-n", n.Node, "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", p.NS)
	n.mustRun("ip", "-n", n.Node, "addr", "add", fmt.Sprintf("%s/%d", NodeIP, outsidePrefixLen), "dev", hostIf)
	n.mustRun("ip", "-n", n.Node, "link", "set", hostIf, "up")
	n.mustRun("ip", "-n", p.NS, "link", "set", "lo", "up")
	n.mustRun("ip", "-n", p.NS, "addr", "add", fmt.Sprintf("%s/%d", ip, outsidePrefixLen), "dev", "eth0")
	n.mustRun("ip", "-n", p.NS, "link", "set", "eth0", "up")
	n.mustRun("ip", "-n", p.NS, "route", "add", "default", "via", NodeIP, "dev", "eth0")
	return p
}

// AddNodeAddress gives the node another address (on its loopback device,
// as a load balancer IP or external IP assigned to the node would be).
func (n *Net) AddNodeAddress(ip string) {
	n.t.Helper()
	n.mustRun("ip", "-n", n.Node, "addr", "add", ip+"/32", "dev", "lo")
}
