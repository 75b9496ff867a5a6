package localcluster

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
)

// The cluster's addresses. Nodes sit on one link (their InternalIPs) and a
// second one to a "wan" namespace that stands for the network outside: it
// forwards nothing, so traffic to an address nobody serves dies there, as on
// a network where it leads nowhere, and never leaves the cluster.
const (
	nodeSubnet = "172.30.0.0/24"
	wanSubnet  = "172.31.0.0/24"
	// podGateway is the node's address on every pod link (the pod's
	// default gateway), as CNI plugins that route per pod do it.
	podGateway = "169.254.1.1"
	// ServiceCIDR is the API server's --service-cluster-ip-range.
	ServiceCIDR = "10.96.0.0/16"
	// ClusterCIDR holds every node's pod CIDR.
	ClusterCIDR = "10.244.0.0/16"
	// apiServerPort is kube-apiserver's --secure-port, on the first node's
	// InternalIP, as kubeadm sets it up.
	apiServerPort = "6443"
)

func netnsPath(name string) string { return "/run/netns/" + name }

// run runs a command and returns its error with its output.
func run(args ...string) error {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// runAll runs commands in order and stops at the first failure.
func runAll(cmds ...[]string) error {
	for _, c := range cmds {
		if err := run(c...); err != nil {
			return err
		}
	}
	return nil
}

// buildNetwork creates the wan and node namespaces and links them. Each
// namespace is recorded in st before anything is put in it, so a failure
// part way leaves nothing down cannot find. Each family of the cluster's
// stack gets its addresses and routes; IPv6 addresses are added with nodad,
// usable at once rather than after duplicate address detection's second.
func buildNetwork(st *state) error {
	has6 := st.Stack.Has(model.IPv6)
	wan := st.Name + "-wan"
	if err := addNetNS(st, wan); err != nil {
		return err
	}
	for i := range st.Nodes {
		n := &st.Nodes[i]
		if err := addNetNS(st, n.NetNS); err != nil {
			return err
		}
		wanIf := fmt.Sprintf("node%d", i+1)
		if err := runAll(
			[]string{"ip", "netns", "exec", n.NetNS, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
			// A REJECT answers every attempt; the default limit of one ICMP
			// error a second per client would turn refusals into timeouts
			// when a client retries quickly.
			[]string{"ip", "netns", "exec", n.NetNS, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"},
		); err != nil {
			return err
		}
		if has6 {
			// The same for IPv6 (all.forwarding also sets default's, for
			// the pod links made later), and no duplicate address
			// detection on the links made later either.
			if err := run("ip", "netns", "exec", n.NetNS, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1",
				"net.ipv6.icmp.ratelimit=0", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"); err != nil {
				return err
			}
		}
		if err := runAll(
			[]string{"ip", "-n", n.NetNS, "link", "add", "wan0", "type", "veth", "peer", "name", wanIf, "netns", wan},
		); err != nil {
			return err
		}
		for _, f := range st.Stack.Families() {
			if err := run(addrAdd(n.NetNS, f, wanAddr(f, i)+linkBits(f), "wan0")...); err != nil {
				return err
			}
		}
		if err := runAll(
			[]string{"ip", "-n", n.NetNS, "link", "set", "wan0", "up"},
			[]string{"ip", "-n", wan, "link", "set", wanIf, "up"},
		); err != nil {
			return err
		}
		for _, f := range st.Stack.Families() {
			gw := WANClientAddress
			if f == model.IPv6 {
				gw = WANClientAddress6
			}
			if i == 0 {
				if err := run(addrAdd(wan, f, gw+linkBits(f), wanIf)...); err != nil {
					return err
				}
			} else {
				// The wan's address lives on its first link; the others join
				// the same subnet through a host route.
				if err := run("ip", "-n", wan, "route", "add", wanAddr(f, i)+hostBits(f), "dev", wanIf); err != nil {
					return err
				}
			}
			if err := run("ip", "-n", n.NetNS, "route", "add", "default", "via", gw, "dev", "wan0", "onlink"); err != nil {
				return err
			}
		}
	}
	// The node link: a veth per node pair (two nodes: one pair), eth0 on
	// each side, carrying the InternalIPs and the routes to the other
	// node's pod CIDRs.
	if len(st.Nodes) != 2 {
		return fmt.Errorf("the local cluster has exactly two nodes, not %d", len(st.Nodes))
	}
	a, b := &st.Nodes[0], &st.Nodes[1]
	cmds := [][]string{{"ip", "-n", a.NetNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b.NetNS}}
	for _, f := range st.Stack.Families() {
		cmds = append(cmds,
			addrAdd(a.NetNS, f, a.IPOf(f)+linkBits(f), "eth0"),
			addrAdd(b.NetNS, f, b.IPOf(f)+linkBits(f), "eth0"))
	}
	cmds = append(cmds,
		[]string{"ip", "-n", a.NetNS, "link", "set", "eth0", "up"},
		[]string{"ip", "-n", b.NetNS, "link", "set", "eth0", "up"})
	for _, f := range st.Stack.Families() {
		cmds = append(cmds,
			[]string{"ip", "-n", a.NetNS, "route", "add", ofFamily(b.AllPodCIDRs(), f), "via", b.IPOf(f), "dev", "eth0"},
			[]string{"ip", "-n", b.NetNS, "route", "add", ofFamily(a.AllPodCIDRs(), f), "via", a.IPOf(f), "dev", "eth0"})
	}
	return runAll(cmds...)
}

// addrAdd is the command that adds addr (with its prefix length) to dev in
// namespace ns: an IPv6 one with nodad, usable at once.
func addrAdd(ns string, f model.IPFamily, addr, dev string) []string {
	cmd := []string{"ip", "-n", ns, "addr", "add", addr, "dev", dev}
	if f == model.IPv6 {
		cmd = append(cmd, "nodad")
	}
	return cmd
}

func addNetNS(st *state, name string) error {
	if err := run("ip", "netns", "add", name); err != nil {
		return err
	}
	st.Namespaces = append(st.Namespaces, name)
	return run("ip", "-n", name, "link", "set", "lo", "up")
}

// dialIn returns a dialer whose sockets live in network namespace ns: the
// API server listens inside the first node's namespace, with no route to it
// from the machine's own, and a socket keeps the namespace it was created
// in.
func dialIn(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := netnsenter.Do(netnsPath(ns), func() (err error) {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		if err != nil && c != nil {
			c.Close()
			c = nil
		}
		return c, err
	}
}

// WANNetNS is the namespace standing for the network outside the cluster:
// a client there is a machine outside, whose packets reach a node through
// its wan0 link (WANAddress) with no socket program of any node seeing
// them.
func (c *Cluster) WANNetNS() string { return c.Name + "-wan" }

// WANAddress is a node's address on the wan link, of the cluster's
// primary family; "" for an unknown node.
func (c *Cluster) WANAddress(node string) string {
	return c.WANAddressOf(node, c.Families()[0])
}

// WANAddressOf is a node's address of family f on the wan link; "" for an
// unknown node or a family the cluster does not run.
func (c *Cluster) WANAddressOf(node string, f model.IPFamily) string {
	if !c.Stack.Has(f) {
		return ""
	}
	for i, n := range c.Nodes {
		if n.Name == node {
			return wanAddr(f, i)
		}
	}
	return ""
}

// WANClientAddress is the address a client in WANNetNS connects from
// (WANClientAddress6 over IPv6).
const WANClientAddress = "172.31.0.1"
