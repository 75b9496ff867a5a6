package testnet

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
)

// BridgeGatewayBits is the prefix length of a bridge's network
// (AddBridgedPod): the bridge holds the network's last address.
const BridgeGatewayBits = 24

// AddBridgedPod creates a pod namespace with address ip whose veth's node
// end is a port of bridge (created on first use, as bridge CNI plugins
// such as kubenet's cbr0 do), instead of a routed veth of its own: the
// node sees the pod's packets come in on the bridge. The bridge gets the
// last address of ip's /24, the pod's default gateway.
func (n *Net) AddBridgedPod(name, ip, bridge string) *Pod {
	n.t.Helper()
	addr := netip.MustParseAddr(ip)
	network := netip.PrefixFrom(addr, BridgeGatewayBits).Masked()
	gw := network.Addr().As4()
	gw[3] = 254
	gateway := netip.AddrFrom4(gw).String()
	if err := exec.Command("ip", "-n", n.Node, "link", "show", bridge).Run(); err != nil {
		n.mustRun("ip", "-n", n.Node, "link", "add", bridge, "type", "bridge")
		n.mustRun("ip", "-n", n.Node, "addr", "add", fmt.Sprintf("%s/%d", gateway, BridgeGatewayBits), "dev", bridge)
		n.mustRun("ip", "-n", n.Node, "link", "set", bridge, "up")
	}
	n.mu.Lock()
	idx := len(n.pods)
	n.mu.Unlock()
	hostIf := fmt.Sprintf("brp%d", idx)
	p := &Pod{net: n, Name: name, NS: n.Prefix + "-" + name, IP: addr, HostIf: hostIf}
	n.mustRun("ip", "netns", "add", p.NS)
	n.mu.Lock()
	n.pods = append(n.pods, p)
	n.mu.Unlock()
	if err := os.Symlink("/run/netns/"+p.NS, filepath.Join(n.PodNetNSDir, p.NS)); err != nil {
		n.t.Fatalf("%v", err)
	}
	n.mustRun("ip", "-n", n.Node, "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", p.NS)
	n.mustRun("ip", "-n", n.Node, "link", "set", hostIf, "master", bridge)
	n.mustRun("ip", "-n", n.Node, "link", "set", hostIf, "up")
	n.mustRun("ip", "-n", p.NS, "link", "set", "lo", "up")
	n.mustRun("ip", "-n", p.NS, "addr", "add", fmt.Sprintf("%s/%d", ip, BridgeGatewayBits), "dev", "eth0")
	n.mustRun("ip", "-n", p.NS, "link", "set", "eth0", "up")
	n.mustRun("ip", "-n", p.NS, "route", "add", "default", "via", gateway, "dev", "eth0")
	return p
}
