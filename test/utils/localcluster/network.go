package localcluster

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strings"

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
// part way leaves nothing down cannot find.
func buildNetwork(st *state) error {
	wan := st.Name + "-wan"
	if err := addNetNS(st, wan); err != nil {
		return err
	}
	for i := range st.Nodes {
		n := &st.Nodes[i]
		if err := addNetNS(st, n.NetNS); err != nil {
			return err
		}
		wanIP := fmt.Sprintf("172.31.0.%d", 11+i)
		wanIf := fmt.Sprintf("node%d", i+1)
		if err := runAll(
			[]string{"ip", "netns", "exec", n.NetNS, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
			// A REJECT answers every attempt; the default limit of one ICMP
			// error a second per client would turn refusals into timeouts
			// when a client retries quickly.
			[]string{"ip", "netns", "exec", n.NetNS, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"},
			[]string{"ip", "-n", n.NetNS, "link", "add", "wan0", "type", "veth", "peer", "name", wanIf, "netns", wan},
			[]string{"ip", "-n", n.NetNS, "addr", "add", wanIP + "/24", "dev", "wan0"},
			[]string{"ip", "-n", n.NetNS, "link", "set", "wan0", "up"},
			[]string{"ip", "-n", wan, "link", "set", wanIf, "up"},
		); err != nil {
			return err
		}
		if i == 0 {
			if err := run("ip", "-n", wan, "addr", "add", "172.31.0.1/24", "dev", wanIf); err != nil {
				return err
			}
		} else {
			// The wan's address lives on its first link; the others join
			// the same subnet through a host route.
			if err := run("ip", "-n", wan, "route", "add", wanIP+"/32", "dev", wanIf); err != nil {
				return err
			}
		}
		if err := run("ip", "-n", n.NetNS, "route", "add", "default", "via", "172.31.0.1", "dev", "wan0", "onlink"); err != nil {
			return err
		}
	}
	// The node link: a veth per node pair (two nodes: one pair), eth0 on
	// each side, carrying the InternalIPs and the routes to the other
	// node's pod CIDR.
	if len(st.Nodes) != 2 {
		return fmt.Errorf("the local cluster has exactly two nodes, not %d", len(st.Nodes))
	}
	a, b := &st.Nodes[0], &st.Nodes[1]
	return runAll(
		[]string{"ip", "-n", a.NetNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b.NetNS},
		[]string{"ip", "-n", a.NetNS, "addr", "add", a.IP + "/24", "dev", "eth0"},
		[]string{"ip", "-n", b.NetNS, "addr", "add", b.IP + "/24", "dev", "eth0"},
		[]string{"ip", "-n", a.NetNS, "link", "set", "eth0", "up"},
		[]string{"ip", "-n", b.NetNS, "link", "set", "eth0", "up"},
		[]string{"ip", "-n", a.NetNS, "route", "add", b.PodCIDR, "via", b.IP, "dev", "eth0"},
		[]string{"ip", "-n", b.NetNS, "route", "add", a.PodCIDR, "via", a.IP, "dev", "eth0"},
	)
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

// WANAddress is a node's address on the wan link; "" for an unknown node.
func (c *Cluster) WANAddress(node string) string {
	for i, n := range c.Nodes {
		if n.Name == node {
			return fmt.Sprintf("172.31.0.%d", 11+i)
		}
	}
	return ""
}

// WANClientAddress is the address a client in WANNetNS connects from.
const WANClientAddress = "172.31.0.1"
