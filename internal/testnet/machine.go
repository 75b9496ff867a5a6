package testnet

import (
	"fmt"
	"net/netip"
)

// AddMachine creates a namespace outside the cluster that reaches the node
// over a link of its own: a client machine on the node's network. The node
// gets nodeIP/24 on its end (an address node ports answer on), the machine
// ip/24 and a default route through the node, so that external IPs and
// load balancer IPs lead to the node too. It is a Pod for running clients.
func (n *Net) AddMachine(name, ip, nodeIP string) *Pod {
	n.t.Helper()
	n.mu.Lock()
	idx := len(n.pods)
	n.mu.Unlock()
	hostIf := fmt.Sprintf("ext%d", idx)
	p := &Pod{net: n, Name: name, NS: n.Prefix + "-" + name, IP: netip.MustParseAddr(ip), HostIf: hostIf}
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
