package testnet

import (
	"fmt"
	"net/netip"
)

// AddMachine creates a "client machine" outside the cluster: a namespace on
// a network of its own with the node, which gets nodeIP/24 on its end (an
// address node ports answer on), the machine ip/24 and a default route
// through the node, so that external IPs and load balancer IPs lead to the
// node too, as from a machine on the node's LAN or a load balancer
// forwarding to it. Its processes never run in the test's cgroup: no
// socket program sees them, so what reaches a Service from there is served
// per packet, as traffic from another machine is. Give each machine a /24
// of its own: two links with one prefix would leave the node's replies to
// one of them on the other.
func (n *Net) AddMachine(name, ip, nodeIP string) *Pod {
	n.t.Helper()
	addr, node := netip.MustParseAddr(ip), netip.MustParseAddr(nodeIP)
	if !netip.PrefixFrom(node, 24).Masked().Contains(addr) {
		n.t.Fatalf("machine address %s is not on %s/24", ip, nodeIP)
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
	n.mustRun("ip", "-n", n.Node, "addr", "add", nodeIP+"/24", "dev", hostIf)
	n.mustRun("ip", "-n", n.Node, "link", "set", hostIf, "up")
	n.mustRun("ip", "-n", p.NS, "link", "set", "lo", "up")
	n.mustRun("ip", "-n", p.NS, "addr", "add", ip+"/24", "dev", "eth0")
	n.mustRun("ip", "-n", p.NS, "link", "set", "eth0", "up")
	n.mustRun("ip", "-n", p.NS, "route", "add", "default", "via", nodeIP, "dev", "eth0")
	return p
}

// AddNodeAddress gives the node another address (on its loopback device,
// as a load balancer IP or external IP assigned to the node would be).
func (n *Net) AddNodeAddress(ip string) {
	n.t.Helper()
	n.mustRun("ip", "-n", n.Node, "addr", "add", ip+"/32", "dev", "lo")
}
