package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The core of TestEndToEnd's scenarios, run for each IP family on the
// dual-stack and IPv6-only clusters (testStack), in each mode, with the
// same checks: a Service's ClusterIP over TCP and UDP and its node port
// reach every backend from a pod on each node; connect loops see zero
// failures while the endpoints churn and while the proxy is rolled out
// (stopped and started again) under live sockets. On a dual-stack cluster
// a Service also goes from SingleStack to RequireDualStack and back.

// familyAddr is ip:port as the clients take it: [ip]:port for IPv6, which
// they dial from AF_INET6 sockets (see connects).
func familyAddr(ip netip.Addr, port int32) string {
	return netip.AddrPortFrom(ip, uint16(port)).String()
}

// familyScenarios runs the scenarios in mode, whose proxies run, in
// namespace ns of a cluster of stack.
func (e *env) familyScenarios(t *testing.T, ns, mode string, stack localcluster.Stack) {
	families := stack.Families()
	// Pods answering TCP on 80 and 8080 and UDP on 53, in each family of
	// the stack; a Service with a TCP and a UDP port and a node port,
	// RequireDualStack on a dual-stack cluster and PreferDualStack on a
	// single-stack one (where it gets the one family there is).
	e.addWeb(t, ns, "f-1", "node1", "f")
	e.addWeb(t, ns, "f-2", "node2", "f")
	policy := corev1.IPFamilyPolicyPreferDualStack
	if len(stack.Families()) == 2 {
		policy = corev1.IPFamilyPolicyRequireDualStack
	}
	svc := e.createFamilyService(t, ns, "f", "f", policy, corev1.ServiceTypeNodePort)
	if got := addrFamilies(t, svc.Spec.ClusterIPs); !slices.Equal(got, stack.Families()) {
		t.Fatalf("%s Service f: clusterIPs %v, want one per family of %v", policy, svc.Spec.ClusterIPs, stack.Families())
	}

	for _, f := range families {
		t.Run(f.String(), func(t *testing.T) {
			ip, _ := localcluster.ClusterIPOf(svc, f)
			t.Run("ClusterIP", func(t *testing.T) {
				e.expectBackends(t, familyAddr(ip, 80), "f-1", "f-2")
			})
			t.Run("UDP", func(t *testing.T) {
				for _, connected := range []bool{false, true} {
					e.expectUDPBackends(t, familyAddr(ip, 53), connected, "f-1", "f-2")
				}
			})
			t.Run("NodePort", func(t *testing.T) {
				for _, n := range e.c.Nodes {
					e.expectBackends(t, familyAddr(netip.MustParseAddr(n.IPOf(f)), svc.Spec.Ports[0].NodePort), "f-1", "f-2")
				}
			})
		})
	}
	t.Run("Churn", func(t *testing.T) { e.familyChurn(t, ns, mode, families) })
	t.Run("Rollout", func(t *testing.T) { e.familyRollout(t, mode, svc, families) })
	if len(families) == 2 {
		t.Run("FamilyChange", func(t *testing.T) { e.familyChange(t, ns, mode) })
	}
}

// createFamilyService creates Service name selecting app, with TCP port 80
// (to 80) and UDP port 53, of type typ, with the IP family policy policy.
func (e *env) createFamilyService(t *testing.T, ns, name, app string, policy corev1.IPFamilyPolicy, typ corev1.ServiceType) *corev1.Service {
	t.Helper()
	s := localcluster.NewService(localcluster.ServiceOptions{Namespace: ns, Name: name,
		Selector: map[string]string{"app": app}, Port: 80, Policy: policy})
	s.Spec.Type = typ
	s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53,
		TargetPort: intstr.FromInt32(53)})
	svc, err := e.c.Client.CoreV1().Services(ns).Create(context.Background(), s, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// familyChurn is churnUnderLoad with a connect loop per family on each
// node, all against one Service of every served family, through the same
// endpoint churn: zero failures.
func (e *env) familyChurn(t *testing.T, ns, mode string, families []model.IPFamily) {
	for i, node := range []string{"node1", "node2", "node1"} {
		e.addWeb(t, ns, fmt.Sprintf("c-%d", i+1), node, "c")
	}
	policy := corev1.IPFamilyPolicyPreferDualStack
	if len(families) == 2 {
		policy = corev1.IPFamilyPolicyRequireDualStack
	}
	svc := e.createFamilyService(t, ns, "c", "c", policy, corev1.ServiceTypeClusterIP)
	var loops []*clientLoop
	var addrs []string
	for _, f := range families {
		ip, _ := localcluster.ClusterIPOf(svc, f)
		addr := familyAddr(ip, 80)
		addrs = append(addrs, addr)
		e.expectBackends(t, addr, "c-1", "c-2", "c-3")
		loops = append(loops, e.startLoops(t, addr, 2*time.Millisecond)...)
	}
	if mode == "iptables" {
		// See loop.timeoutsPer1000, as in churnUnderLoad.
		for _, l := range loops {
			l.timeoutsPer1000 = 1
		}
	}
	e.churn(t, ns, "c", "c-1", "c-2")
	for _, addr := range addrs {
		e.expectBackends(t, addr, "c-1", "c-2", "c-3r2")
	}
	for _, l := range loops {
		l.assertAllOK(t, "churn")
	}
}

// familyRollout rolls the proxy out (each node's stopped with SIGTERM, a
// new one started from the DaemonSet) while, per family, a connect loop and
// a long-lived connected UDP socket (a stub resolver's) on each node use
// the Service: none of them sees a failure, and the UDP socket is never
// replaced.
func (e *env) familyRollout(t *testing.T, mode string, svc *corev1.Service, families []model.IPFamily) {
	var loops, resolvers []*clientLoop
	for _, f := range families {
		ip, _ := localcluster.ClusterIPOf(svc, f)
		loops = append(loops, e.startLoops(t, familyAddr(ip, 80), 5*time.Millisecond)...)
		resolvers = append(resolvers, e.startResolvers(t, familyAddr(ip, 53))...)
	}
	if mode == "iptables" {
		// See loop.timeoutsPer1000, as in killDashNine.
		for _, l := range loops {
			l.timeoutsPer1000 = 1
		}
	}
	time.Sleep(time.Second)
	for _, n := range e.c.Nodes {
		if _, err := e.c.SignalProxy(n.Name, syscall.SIGTERM, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(time.Second)
	for _, l := range append(slices.Clone(loops), resolvers...) {
		l.assertAllOK(t, "proxy stopped")
	}
	e.startProxies(t, mode)
	for _, f := range families {
		ip, _ := localcluster.ClusterIPOf(svc, f)
		e.expectBackends(t, familyAddr(ip, 80), "f-1", "f-2")
	}
	for _, l := range loops {
		l.assertAllOK(t, "after the rollout")
	}
	for _, r := range resolvers {
		lines := r.Settle()
		if len(lines) == 0 {
			t.Errorf("resolver in %s: no answer since the proxy stopped, want its first socket still answered", r.client)
		}
		for _, line := range lines {
			if !strings.HasPrefix(line, "ok ") || !strings.Contains(line, " gen=1 ") {
				t.Errorf("resolver in %s: %q, want every answer on its first socket", r.client, line)
				break
			}
		}
	}
}

// familyChange changes a Service from SingleStack (of the primary family,
// IPv4) to RequireDualStack and back: its IPv6 ClusterIP starts answering,
// then stops, while a connect loop to its IPv4 ClusterIP, and one from
// AF_INET6 sockets to that address as ::ffff:a.b.c.d, never fail.
func (e *env) familyChange(t *testing.T, ns, mode string) {
	ctx := context.Background()
	e.addWeb(t, ns, "m-1", "node1", "m")
	e.addWeb(t, ns, "m-2", "node2", "m")
	svc := e.createFamilyService(t, ns, "m", "m", corev1.IPFamilyPolicySingleStack, corev1.ServiceTypeClusterIP)
	if len(svc.Spec.ClusterIPs) != 1 {
		t.Fatalf("SingleStack Service m: clusterIPs %v", svc.Spec.ClusterIPs)
	}
	v4, ok := localcluster.ClusterIPOf(svc, model.IPv4)
	if !ok {
		t.Fatalf("SingleStack Service m: no IPv4 ClusterIP in %v", svc.Spec.ClusterIPs)
	}
	mapped := "[::ffff:" + v4.String() + "]:80"
	e.expectBackends(t, familyAddr(v4, 80), "m-1", "m-2")
	e.expectBackends(t, mapped, "m-1", "m-2")
	loops := e.startLoops(t, familyAddr(v4, 80), 5*time.Millisecond)
	loops = append(loops, e.startLoops(t, mapped, 5*time.Millisecond)...)
	if mode == "iptables" {
		for _, l := range loops {
			l.timeoutsPer1000 = 1
		}
	}

	setPolicy := func(p corev1.IPFamilyPolicy) *corev1.Service {
		t.Helper()
		s, err := e.c.Client.CoreV1().Services(ns).Get(ctx, "m", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Spec.IPFamilyPolicy = &p
		if s, err = e.c.Client.CoreV1().Services(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		return s
	}
	svc = setPolicy(corev1.IPFamilyPolicyRequireDualStack)
	v6, ok := localcluster.ClusterIPOf(svc, model.IPv6)
	if !ok {
		t.Fatalf("Service m made RequireDualStack: no IPv6 ClusterIP in %v", svc.Spec.ClusterIPs)
	}
	if got, _ := localcluster.ClusterIPOf(svc, model.IPv4); got != v4 {
		t.Fatalf("Service m made RequireDualStack: IPv4 ClusterIP %s, was %s", got, v4)
	}
	e.expectBackends(t, familyAddr(v6, 80), "m-1", "m-2")
	for _, l := range loops {
		l.assertAllOK(t, "made dual-stack")
	}

	// Back to SingleStack: the API server keeps the first family's
	// ClusterIP and releases the other.
	svc = setPolicy(corev1.IPFamilyPolicySingleStack)
	if len(svc.Spec.ClusterIPs) != 1 || svc.Spec.ClusterIPs[0] != v4.String() {
		t.Fatalf("Service m made SingleStack again: clusterIPs %v, want [%s]", svc.Spec.ClusterIPs, v4)
	}
	e.expectUnserved(t, familyAddr(v6, 80))
	e.expectBackends(t, familyAddr(v4, 80), "m-1", "m-2")
	for _, l := range loops {
		l.assertAllOK(t, "made single-stack again")
	}
}

// startResolvers starts a stub resolver (testnet's "resolve" helper: one
// connected UDP socket, kept) in the client pod of each node, querying
// addr; from an AF_INET6 socket for an address in brackets.
func (e *env) startResolvers(t *testing.T, addr string) []*clientLoop {
	t.Helper()
	args := []string{"resolve", addr, "pause=20ms"}
	if strings.HasPrefix(addr, "[") {
		args = append(args, "inet6")
	}
	return e.startHelperLoops(t, args...)
}

// expectUDPBackends waits until, from a client on each node, datagrams to
// addr (5 from each socket, connected or not; from an AF_INET socket, or
// an AF_INET6 one for an address in brackets) have been answered by every
// pod of want and by no other, and none failed. Each socket is one flow,
// which the iptables mode's conntrack keeps on one backend: the backends
// are collected over sockets.
func (e *env) expectUDPBackends(t *testing.T, addr string, connected bool, want ...string) {
	t.Helper()
	slices.Sort(want)
	args := []string{"udp", addr, "5"}
	if strings.HasPrefix(addr, "[") {
		args[0] = "udp6"
	}
	if connected {
		args = append(args, "connected")
	}
	for _, client := range e.clients {
		var last string
		seen := map[string]bool{}
		if !eventually(30*time.Second, func() bool {
			out, err := client.Output(context.Background(), testnet.Helper(args...)...)
			if err != nil {
				last = err.Error()
				return false
			}
			names, errs := backends(strings.Split(strings.TrimSpace(out), "\n"))
			last = fmt.Sprintf("backends %v, failures %v", names, errs)
			for _, n := range names {
				if !slices.Contains(want, n) {
					errs = append(errs, "answered by "+n)
				}
			}
			if len(errs) > 0 {
				clear(seen) // not programmed yet, or wrong: start over
				return false
			}
			for _, n := range names {
				seen[n] = true
			}
			return len(seen) == len(want)
		}) {
			t.Fatalf("UDP (connected: %v) from %s to %s: want backends %v, saw %v, last seen %s", connected, client.Name, addr, want, seen, last)
		}
	}
}

// preferDualStack is the mixed case of a single-stack IPv4 cluster: a
// PreferDualStack Service gets the one ClusterIP there is, IPv4, and is
// served, from AF_INET sockets and from AF_INET6 ones as ::ffff:a.b.c.d.
func (e *env) preferDualStack(t *testing.T, ns string) {
	e.addWeb(t, ns, "pd-1", "node1", "pd")
	e.addWeb(t, ns, "pd-2", "node2", "pd")
	svc := e.createFamilyService(t, ns, "pd", "pd", corev1.IPFamilyPolicyPreferDualStack, corev1.ServiceTypeClusterIP)
	if len(svc.Spec.ClusterIPs) != 1 || len(svc.Spec.IPFamilies) != 1 || svc.Spec.IPFamilies[0] != corev1.IPv4Protocol {
		t.Fatalf("PreferDualStack Service on an IPv4 cluster: clusterIPs %v, ipFamilies %v; want one IPv4", svc.Spec.ClusterIPs, svc.Spec.IPFamilies)
	}
	vip := svc.Spec.ClusterIP
	e.expectBackends(t, vip+":80", "pd-1", "pd-2")
	e.expectBackends(t, "[::ffff:"+vip+"]:80", "pd-1", "pd-2")
	e.expectUDPBackends(t, vip+":53", false, "pd-1", "pd-2")
}
