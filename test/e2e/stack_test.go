package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// TestLocalClusterDualStack checks the dual-stack local cluster the IPv6
// tests stand on: Nodes with a podCIDR and an InternalIP per family, pods
// with an address per family, a RequireDualStack Service with a ClusterIP
// per family and an EndpointSlice per family listing the pods' addresses
// of that family (made by the real EndpointSlice controller from the pods'
// status.podIPs), and raw connectivity, no proxy involved, pod to pod and
// node to pod over both families, on a node and across nodes. Then, in each
// mode, each ClusterIP of the dual-stack Service answers through the proxy
// from pods and from the nodes' own namespaces, and the core of
// TestEndToEnd's scenarios runs per family (familyScenarios): TCP, UDP,
// node ports, zero failures under endpoint churn and across a proxy
// rollout, and a Service changed from SingleStack to RequireDualStack and
// back.
func TestLocalClusterDualStack(t *testing.T) {
	testStack(t, localcluster.DualStack)
}

// TestLocalClusterIPv6Only checks the same on an IPv6-only cluster: every
// address is IPv6 (the default/kubernetes Service's ClusterIP and endpoint
// too), the Service is PreferDualStack and gets the one family there is,
// and the proxy starts and syncs in each mode without crashing.
func TestLocalClusterIPv6Only(t *testing.T) {
	testStack(t, localcluster.IPv6Only)
}

func testStack(t *testing.T, stack localcluster.Stack) {
	c := newStackCluster(t, stack)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	families := stack.Families()

	t.Run("Nodes", func(t *testing.T) {
		for _, n := range c.Nodes {
			node, err := c.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := cidrFamilies(t, node.Spec.PodCIDRs); !slices.Equal(got, families) {
				t.Errorf("Node %s: spec.podCIDRs %v are of families %v, want %v", n.Name, node.Spec.PodCIDRs, got, families)
			}
			if node.Spec.PodCIDR != node.Spec.PodCIDRs[0] {
				t.Errorf("Node %s: spec.podCIDR %s is not the first of spec.podCIDRs %v", n.Name, node.Spec.PodCIDR, node.Spec.PodCIDRs)
			}
			var internal []string
			for _, a := range node.Status.Addresses {
				if a.Type == corev1.NodeInternalIP {
					internal = append(internal, a.Address)
				}
			}
			if got := addrFamilies(t, internal); !slices.Equal(got, families) {
				t.Errorf("Node %s: InternalIPs %v are of families %v, want %v", n.Name, internal, got, families)
			}
		}
	})

	// The kubernetes Service takes the first address of the primary range,
	// and its endpoint is the API server's --advertise-address, of that
	// family.
	t.Run("KubernetesService", func(t *testing.T) {
		svc, err := c.Client.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if svc.Spec.ClusterIP != stack.KubernetesServiceIP() {
			t.Errorf("default/kubernetes ClusterIP %s, want %s", svc.Spec.ClusterIP, stack.KubernetesServiceIP())
		}
		waitSlices(ctx, t, c, "default", "kubernetes", families[0], []string{c.Nodes[0].IP})
	})

	// A backend on each node, and a client on each node, all serving both
	// families.
	var webs, clients []*localcluster.Pod
	for _, n := range c.Nodes {
		for _, role := range []string{"web", "client"} {
			name := role + "-" + n.Name
			p, err := c.AddPod(ctx, localcluster.PodSpec{Name: name, Node: n.Name, Labels: map[string]string{"app": role},
				Command: stack.ServeArgs(name, "tcp:80"), ReadyLine: "ready"})
			if err != nil {
				t.Fatal(err)
			}
			if role == "web" {
				webs = append(webs, p)
			} else {
				clients = append(clients, p)
			}
		}
	}

	t.Run("PodIPs", func(t *testing.T) {
		for _, p := range append(slices.Clone(webs), clients...) {
			if got := addrFamilies(t, addrStrings(p.IPs)); !slices.Equal(got, families) {
				t.Errorf("pod %s: addresses %v, want one per family of %v", p.Name, p.IPs, families)
			}
			obj, err := c.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			var status []string
			for _, ip := range obj.Status.PodIPs {
				status = append(status, ip.IP)
			}
			if !slices.Equal(status, addrStrings(p.IPs)) || obj.Status.PodIP != p.IP.String() {
				t.Errorf("pod %s: status.podIPs %v, podIP %s; want %v, %s", p.Name, status, obj.Status.PodIP, p.IPs, p.IP)
			}
		}
	})

	// The Service: RequireDualStack on a dual-stack cluster, the default
	// (SingleStack of the primary family) on a single-stack one.
	o := localcluster.ServiceOptions{Namespace: "default", Name: "web", Selector: map[string]string{"app": "web"}, Port: 80}
	if len(families) == 2 {
		o.Policy = corev1.IPFamilyPolicyRequireDualStack
	}
	svc, err := c.Client.CoreV1().Services("default").Create(ctx, localcluster.NewService(o), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	clusterIPs := map[model.IPFamily]netip.Addr{}
	t.Run("ClusterIPs", func(t *testing.T) {
		if got := addrFamilies(t, svc.Spec.ClusterIPs); !slices.Equal(got, families) {
			t.Fatalf("Service web: clusterIPs %v, want one per family of %v", svc.Spec.ClusterIPs, families)
		}
		for _, f := range families {
			ip, ok := localcluster.ClusterIPOf(svc, f)
			if !ok {
				t.Fatalf("Service web: no %s ClusterIP in %v", f, svc.Spec.ClusterIPs)
			}
			clusterIPs[f] = ip
		}
	})
	t.Run("EndpointSlices", func(t *testing.T) {
		for _, f := range families {
			var want []string
			for _, p := range webs {
				want = append(want, p.IPOf(f).String())
			}
			waitSlices(ctx, t, c, "default", "web", f, want)
		}
	})

	// Raw connectivity, no proxy: from a pod and from a node's namespace,
	// to a backend on the same node and on the other one, per family.
	t.Run("Connectivity", func(t *testing.T) {
		for _, f := range families {
			for _, b := range webs {
				addr := netip.AddrPortFrom(b.IPOf(f), 80)
				for _, cl := range clients {
					lines, err := cl.Connect(ctx, addr, 1)
					expectAnswer(t, fmt.Sprintf("%s: pod %s to pod %s at %s", f, cl.Name, b.Name, addr), lines, err, b.Name)
				}
				for _, n := range c.Nodes {
					lines, err := c.NodeConnect(ctx, n.Name, addr, 1)
					expectAnswer(t, fmt.Sprintf("%s: node %s to pod %s at %s", f, n.Name, b.Name, addr), lines, err, b.Name)
				}
			}
		}
	})
	if t.Failed() {
		return
	}

	e := &env{c: c, clients: clients}
	var want []string
	for _, b := range webs {
		want = append(want, b.Name)
	}
	slices.Sort(want)
	for _, mode := range []string{"ebpf", "iptables"} {
		t.Run(mode, func(t *testing.T) {
			// Starts the proxies and waits for their first sync (the mode
			// label they set on their Node after it).
			e.startProxies(t, mode)
			for _, f := range stack.Families() {
				addr, _ := localcluster.ServiceAddr(svc, f)
				e.expectBackends(t, addr.String(), want...)
				// And from each node's own namespace, as a hostNetwork
				// client.
				for _, n := range c.Nodes {
					var last string
					if !eventually(30*time.Second, func() bool {
						lines, err := c.NodeConnect(ctx, n.Name, addr, 10)
						if err != nil {
							last = err.Error()
							return false
						}
						names, errs := backends(lines)
						last = fmt.Sprintf("backends %v, failures %v", names, errs)
						return slices.Equal(names, want) && len(errs) == 0
					}) {
						t.Errorf("%s: from node %s to %s: want backends %v, last seen %s", f, n.Name, addr, want, last)
					}
				}
			}
			if !t.Failed() {
				e.familyScenarios(t, e.namespace(t, mode), mode, stack)
			}
			for _, n := range c.Nodes {
				if !c.ProxyRunning(n.Name) {
					t.Errorf("the proxy on %s exited; see %s", n.Name, c.ProxyLog(n.Name))
				}
			}
			if t.Failed() && keepOnFailure() {
				return
			}
			e.cleanupProxies(t, mode)
		})
	}
}

// waitSlices waits until the Service's EndpointSlices of family f list
// exactly the addresses want (in any order), all ready.
func waitSlices(ctx context.Context, t *testing.T, c *localcluster.Cluster, ns, svc string, f model.IPFamily, want []string) {
	t.Helper()
	want = slices.Sorted(slices.Values(want))
	var last []string
	if !eventually(30*time.Second, func() bool {
		list, err := c.Client.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
		if err != nil {
			return false
		}
		last = nil
		for _, s := range list.Items {
			if string(s.AddressType) != f.String() {
				continue
			}
			for _, ep := range s.Endpoints {
				if ep.Conditions.Ready != nil && *ep.Conditions.Ready {
					last = append(last, ep.Addresses...)
				}
			}
		}
		slices.Sort(last)
		return slices.Equal(last, want)
	}) {
		t.Errorf("Service %s/%s: %s EndpointSlices list ready %v, want %v", ns, svc, f, last, want)
	}
}

// expectAnswer checks one connection's result line says name answered.
func expectAnswer(t *testing.T, what string, lines []string, err error, name string) {
	t.Helper()
	if err != nil {
		t.Errorf("%s: %v", what, err)
		return
	}
	if len(lines) != 1 {
		t.Errorf("%s: got %q, want one answer from %s", what, lines, name)
		return
	}
	if f := strings.Fields(lines[0]); len(f) < 2 || f[0] != "ok" || f[1] != name {
		t.Errorf("%s: got %q, want an answer from %s", what, lines[0], name)
	}
}

func addrStrings(addrs []netip.Addr) []string {
	var s []string
	for _, a := range addrs {
		s = append(s, a.String())
	}
	return s
}

func addrFamilies(t *testing.T, addrs []string) []model.IPFamily {
	t.Helper()
	var fs []model.IPFamily
	for _, s := range addrs {
		a, err := netip.ParseAddr(s)
		if err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		fs = append(fs, model.FamilyOf(a))
	}
	return fs
}

func cidrFamilies(t *testing.T, cidrs []string) []model.IPFamily {
	t.Helper()
	var fs []model.IPFamily
	for _, s := range cidrs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		fs = append(fs, model.FamilyOf(p.Addr()))
	}
	return fs
}
