package localcluster

import (
	"slices"
	"strings"
	"testing"
)

func TestStackRanges(t *testing.T) {
	for _, tc := range []struct {
		stack                    Stack
		services, cluster, nodes []string
		kubernetes               string
	}{
		{IPv4Only, []string{"10.96.0.0/16"}, []string{"10.244.0.0/16"}, []string{"172.30.0.11", "10.244.1.0/24"}, "10.96.0.1"},
		{DualStack, []string{"10.96.0.0/16", "fd00:96::/112"}, []string{"10.244.0.0/16", "fd00:244::/48"},
			[]string{"172.30.0.11", "10.244.1.0/24", "fd00:30::11", "fd00:244:0:1::/64"}, "10.96.0.1"},
		{IPv6Only, []string{"fd00:96::/112"}, []string{"fd00:244::/48"}, []string{"fd00:30::11", "fd00:244:0:1::/64"}, "fd00:96::1"},
	} {
		t.Run(tc.stack.String(), func(t *testing.T) {
			if got, err := ParseStack(tc.stack.String()); err != nil || got != tc.stack {
				t.Errorf("ParseStack(%q) = %q, %v", tc.stack.String(), got, err)
			}
			if got := tc.stack.ServiceCIDRs(); !slices.Equal(got, tc.services) {
				t.Errorf("service CIDRs %v, want %v", got, tc.services)
			}
			if got := tc.stack.ClusterCIDRs(); !slices.Equal(got, tc.cluster) {
				t.Errorf("cluster CIDRs %v, want %v", got, tc.cluster)
			}
			if got := tc.stack.KubernetesServiceIP(); got != tc.kubernetes {
				t.Errorf("kubernetes ClusterIP %s, want %s", got, tc.kubernetes)
			}
			var node []string
			for _, f := range tc.stack.Families() {
				node = append(node, nodeAddr(f, 0), podCIDR(f, 0))
			}
			if !slices.Equal(node, tc.nodes) {
				t.Errorf("node1: %v, want %v", node, tc.nodes)
			}
		})
	}
	if _, err := ParseStack("ipv5"); err == nil {
		t.Error("ParseStack(ipv5) took it")
	}
}

// An IPv4 pod is linked exactly as before the stacks existed; a dual-stack
// one gets the IPv6 twin of each step, its addresses without DAD.
func TestPodLinkCommands(t *testing.T) {
	join := func(cmds [][]string) string {
		var lines []string
		for _, c := range cmds {
			lines = append(lines, strings.Join(c, " "))
		}
		return strings.Join(lines, "\n")
	}
	v4 := &pod{NetNS: "kbp-node1-10", IP: "10.244.1.10", HostIf: "pod10"}
	want := `ip -n kbp-node1 link add pod10 type veth peer name eth0 netns kbp-node1-10
ip -n kbp-node1 addr add 169.254.1.1/32 dev pod10
ip -n kbp-node1 link set pod10 up
ip -n kbp-node1 route add 10.244.1.10/32 dev pod10
ip -n kbp-node1-10 addr add 10.244.1.10/32 dev eth0
ip -n kbp-node1-10 link set eth0 up
ip -n kbp-node1-10 route add 169.254.1.1 dev eth0 scope link
ip -n kbp-node1-10 route add default via 169.254.1.1 dev eth0`
	if got := join(podLinkCommands("kbp-node1", v4)); got != want {
		t.Errorf("IPv4 pod:\n%s\nwant\n%s", got, want)
	}
	v4.IPs = []string{"10.244.1.10"}
	if got := join(podLinkCommands("kbp-node1", v4)); got != want {
		t.Errorf("IPv4 pod with IPs:\n%s\nwant\n%s", got, want)
	}

	ds := &pod{NetNS: "kbp-node1-10", IP: "10.244.1.10", IPs: []string{"10.244.1.10", podAddr("fd00:244:0:1::/64", 10)}, HostIf: "pod10"}
	want = `ip -n kbp-node1 link add pod10 type veth peer name eth0 netns kbp-node1-10
ip -n kbp-node1 addr add 169.254.1.1/32 dev pod10
ip -n kbp-node1 addr add fe80::1/64 dev pod10 nodad
ip -n kbp-node1 link set pod10 up
ip -n kbp-node1 route add 10.244.1.10/32 dev pod10
ip -n kbp-node1 route add fd00:244:0:1::a/128 dev pod10
ip -n kbp-node1-10 addr add 10.244.1.10/32 dev eth0
ip -n kbp-node1-10 addr add fd00:244:0:1::a/128 dev eth0 nodad
ip -n kbp-node1-10 link set eth0 up
ip -n kbp-node1-10 route add 169.254.1.1 dev eth0 scope link
ip -n kbp-node1-10 route add default via 169.254.1.1 dev eth0
ip -n kbp-node1-10 route add default via fe80::1 dev eth0`
	if got := join(podLinkCommands("kbp-node1", ds)); got != want {
		t.Errorf("dual-stack pod:\n%s\nwant\n%s", got, want)
	}
}

// The iptables mode's --cluster-cidr: one per family of the stack, the
// primary first.
func TestOverlayClusterCIDRPerStack(t *testing.T) {
	for _, tc := range []struct {
		stack Stack
		want  string
	}{
		{IPv4Only, ClusterCIDR},
		{DualStack, ClusterCIDR + "," + ClusterCIDR6},
		{IPv6Only, ClusterCIDR6},
	} {
		c := &Cluster{Name: "kbptest", Stack: tc.stack, Nodes: []NodeInfo{{Name: "node1", IP: nodeAddr(tc.stack.Families()[0], 0)}}}
		got := c.Overlay("../../../manifests/overlays/iptables", "iptables")
		if !strings.Contains(got, "KUBERNETES_SERVICE_HOST="+c.Nodes[0].IP+"\n") {
			t.Errorf("%s: the overlay does not set the API server's address %s:\n%s", tc.stack, c.Nodes[0].IP, got)
		}
		if !strings.Contains(got, "value: --cluster-cidr="+tc.want+"\n") {
			t.Errorf("%s: want --cluster-cidr=%s:\n%s", tc.stack, tc.want, got)
		}
	}
}
