package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// loadBalancerIP is a load balancer IP the tests write into Service
// status, as a cloud controller would, and route from the outside network
// to a node, as a load balancer in VIP mode (or a BGP/ARP announcer) would.
// Each mode's namespace gets its own: the other mode's Services stay, and
// two Services with one load balancer IP would take each other's traffic.
func loadBalancerIP(ns string, i int) string {
	base := 50
	if ns == "iptables" {
		base = 60
	}
	return fmt.Sprintf("203.0.113.%d", base+i)
}

// outside prepares a helper client on the machine outside the cluster.
func (e *env) outside(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", e.c.WANNetNS()}, testnet.Helper(args...)...)...)
}

// routeOutside sends the outside network's traffic for ip to node, and
// removes the route when the test ends.
func (e *env) routeOutside(t *testing.T, ip, node string) {
	t.Helper()
	wan := e.c.WANNetNS()
	if out, err := exec.Command("ip", "-n", wan, "route", "replace", ip+"/32", "via", e.c.WANAddress(node)).CombinedOutput(); err != nil {
		t.Fatalf("routing %s to %s: %v: %s", ip, node, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "-n", wan, "route", "del", ip+"/32").Run() })
}

// outsideConnects makes n connections from outside the cluster.
func (e *env) outsideConnects(addr string, n int) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := e.outside(ctx, "tcp", addr, fmt.Sprint(n)).Output()
	if err != nil {
		return nil, fmt.Errorf("tcp %s from outside: %w", addr, err)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n"), nil
}

// expectFromOutside waits until n connects from outside to addr all reach
// pods ok accepts.
func (e *env) expectFromOutside(t *testing.T, addr string, want string, ok func(lines []string) bool) {
	t.Helper()
	var last string
	if !eventually(30*time.Second, func() bool {
		lines, err := e.outsideConnects(addr, 10)
		if err != nil {
			last = err.Error()
			return false
		}
		last = strings.Join(lines, "; ")
		return ok(lines)
	}) {
		t.Fatalf("from outside to %s: %s; last seen %s", addr, want, last)
	}
}

func answeredBy(lines []string, pods ...string) bool {
	names, errs := backends(lines)
	if len(errs) > 0 {
		return false
	}
	for _, n := range names {
		if !slices.Contains(pods, n) {
			return false
		}
	}
	return len(names) > 0
}

// setLoadBalancerIPs writes a Service's status as a cloud controller does.
func (e *env) setLoadBalancerIPs(t *testing.T, ns, name string, ips ...string) {
	t.Helper()
	ctx := context.Background()
	svc, err := e.c.Client.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc.Status.LoadBalancer.Ingress = nil
	for _, ip := range ips {
		svc.Status.LoadBalancer.Ingress = append(svc.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip})
	}
	if _, err := e.c.Client.CoreV1().Services(ns).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// createExposed creates a Service of type typ selecting app, with policy
// as its externalTrafficPolicy, and returns it as created.
func (e *env) createExposed(t *testing.T, ns, name, app string, typ corev1.ServiceType, policy corev1.ServiceExternalTrafficPolicy) *corev1.Service {
	t.Helper()
	svc, err := e.c.Client.CoreV1().Services(ns).Create(context.Background(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{
			Type:                  typ,
			Selector:              map[string]string{"app": app},
			ExternalTrafficPolicy: policy,
			Ports:                 []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// A NodePort Service and a LoadBalancer Service are reached from outside
// the cluster through each node, with no failed connect while their
// endpoints churn.
func (e *env) externalUnderChurn(t *testing.T, ns string) {
	lbViaNode1, lbViaNode2 := loadBalancerIP(ns, 1), loadBalancerIP(ns, 2)
	for i, node := range []string{"node1", "node2", "node1"} {
		e.addWeb(t, ns, fmt.Sprintf("x-%d", i+1), node, "x")
	}
	np := e.createExposed(t, ns, "x-nodeport", "x", corev1.ServiceTypeNodePort, corev1.ServiceExternalTrafficPolicyCluster)
	lb := e.createExposed(t, ns, "x-lb", "x", corev1.ServiceTypeLoadBalancer, corev1.ServiceExternalTrafficPolicyCluster)
	e.setLoadBalancerIPs(t, ns, lb.Name, lbViaNode1, lbViaNode2)
	e.routeOutside(t, lbViaNode1, "node1")
	e.routeOutside(t, lbViaNode2, "node2")

	nodePort := np.Spec.Ports[0].NodePort
	targets := []string{
		fmt.Sprintf("%s:%d", e.c.WANAddress("node1"), nodePort),
		fmt.Sprintf("%s:%d", e.c.WANAddress("node2"), nodePort),
		lbViaNode1 + ":80",
		lbViaNode2 + ":80",
	}
	all := []string{"x-1", "x-2", "x-3"}
	for _, a := range targets {
		e.expectFromOutside(t, a, "every connect answered by x-*", func(lines []string) bool { return answeredBy(lines, all...) })
	}
	// A pod reaches the node port and the load balancer IPs too.
	e.expectBackends(t, fmt.Sprintf("%s:%d", e.c.Nodes[1].IP, nodePort), all...)
	e.expectBackends(t, lbViaNode1+":80", all...)

	var loops []*clientLoop
	for _, a := range targets {
		l := testnet.StartLoopCommand(t, e.outside(context.Background(), "loop", a, "2ms"))
		// Packets from outside take the per-packet path in both modes:
		// conntrack and DNAT, as in the iptables mode's ClusterIP loops
		// (see clientLoop.timeoutsPer1000).
		loops = append(loops, &clientLoop{Loop: l, client: "outside->" + a, timeoutsPer1000: 1})
	}
	e.churn(t, ns, "x", "x-1")
	for _, l := range loops {
		l.assertAllOK(t, "external churn")
	}
}

// healthCheck asks a node's health check node port, from outside, what a
// load balancer asks it.
func (e *env) healthCheck(node string, port int32) (code int, localEndpoints int, err error) {
	var resp *http.Response
	err = netnsenter.Do("/run/netns/"+e.c.WANNetNS(), func() error {
		// The socket is made here, in the outside namespace; the HTTP
		// exchange may run on any thread after.
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("%s:%d", e.c.WANAddress(node), port), 3*time.Second)
		if err != nil {
			return err
		}
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(context.Context, string, string) (net.Conn, error) { return conn, nil },
		}}
		resp, err = client.Get("http://health/")
		return err
	})
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, 0, err
	}
	var answer struct {
		LocalEndpoints int `json:"localEndpoints"`
	}
	if err := json.Unmarshal(body, &answer); err != nil {
		return 0, 0, fmt.Errorf("health check answer %q: %w", body, err)
	}
	if w := resp.Header.Get("X-Load-Balancing-Endpoint-Weight"); w != fmt.Sprint(answer.LocalEndpoints) {
		return 0, 0, fmt.Errorf("X-Load-Balancing-Endpoint-Weight %q with %d local endpoints", w, answer.LocalEndpoints)
	}
	return resp.StatusCode, answer.LocalEndpoints, nil
}

// expectHealth waits until each node's health check answers want (HTTP
// status per node, local endpoints 1 where 200).
func (e *env) expectHealth(t *testing.T, port int32, want map[string]int) {
	t.Helper()
	for node, code := range want {
		var last string
		if !eventually(30*time.Second, func() bool {
			got, local, err := e.healthCheck(node, port)
			if err != nil {
				last = err.Error()
				return false
			}
			last = fmt.Sprintf("%d with %d local endpoints", got, local)
			return got == code && (code != http.StatusOK || local == 1) && (code == http.StatusOK || local == 0)
		}) {
			t.Fatalf("health check node port %d on %s: want %d, last %s", port, node, code, last)
		}
	}
}

// externalTrafficPolicy Local: the health check node port follows the
// local endpoints as the pod moves between nodes, and a client outside is
// seen by the pod with its own address.
func (e *env) externalTrafficLocal(t *testing.T, ns string) {
	ctx := context.Background()
	lbLocal := loadBalancerIP(ns, 3)
	add := func(name, node string) {
		t.Helper()
		if _, err := e.c.AddPod(ctx, localcluster.PodSpec{
			Namespace: ns, Name: name, Node: node, Labels: map[string]string{"app": "h"},
			Command: testnet.Helper("serve", name, "tcp-src:80"), ReadyLine: "ready",
		}); err != nil {
			t.Fatal(err)
		}
	}
	add("h-1", "node1")
	svc := e.createExposed(t, ns, "h", "h", corev1.ServiceTypeLoadBalancer, corev1.ServiceExternalTrafficPolicyLocal)
	e.setLoadBalancerIPs(t, ns, svc.Name, lbLocal)
	hc := svc.Spec.HealthCheckNodePort
	if hc == 0 {
		t.Fatal("the API server allocated no health check node port")
	}
	e.expectHealth(t, hc, map[string]int{"node1": http.StatusOK, "node2": http.StatusServiceUnavailable})

	e.routeOutside(t, lbLocal, "node1")
	e.expectFromOutside(t, lbLocal+":80", "h-1 seeing the client's own address", func(lines []string) bool {
		for _, l := range lines {
			if !strings.HasPrefix(l, "ok h-1 src="+localcluster.WANClientAddress+" ") {
				return false
			}
		}
		return len(lines) > 0
	})
	nodePort := svc.Spec.Ports[0].NodePort
	e.expectFromOutside(t, fmt.Sprintf("%s:%d", e.c.WANAddress("node1"), nodePort), "h-1 by node1's node port",
		func(lines []string) bool { return answeredBy(lines, "h-1") })

	// The pod moves to node2: the health checks follow.
	add("h-2", "node2")
	if err := e.c.DeletePod(ctx, ns, "h-1", 0); err != nil {
		t.Fatal(err)
	}
	e.expectHealth(t, hc, map[string]int{"node1": http.StatusServiceUnavailable, "node2": http.StatusOK})
	e.routeOutside(t, lbLocal, "node2")
	e.expectFromOutside(t, lbLocal+":80", "h-2 through node2", func(lines []string) bool { return answeredBy(lines, "h-2") })
	// Inside the cluster the Service still answers from either node.
	e.expectBackends(t, lbLocal+":80", "h-2")
}

// expectFrom waits until 20 connects from one client reach exactly the
// pods want.
func (e *env) expectFrom(t *testing.T, client *localcluster.Pod, addr string, want ...string) {
	t.Helper()
	slices.Sort(want)
	var last string
	if !eventually(30*time.Second, func() bool {
		lines, err := connects(context.Background(), client, addr, 20)
		if err != nil {
			last = err.Error()
			return false
		}
		names, errs := backends(lines)
		last = fmt.Sprintf("backends %v, failures %v", names, errs)
		return slices.Equal(names, want) && len(errs) == 0
	}) {
		t.Fatalf("from %s to %s: want %v, last seen %s", client.Name, addr, want, last)
	}
}

// trafficDistribution: the real EndpointSlice controller writes zone (and
// node) hints, and each node's proxy, knowing its zone from its Node's
// label, keeps its clients in their zone; when a zone loses its endpoints
// they go to the others (kube-proxy's fallback).
func (e *env) trafficDistribution(t *testing.T, ns string) {
	ctx := context.Background()
	for _, dist := range []string{corev1.ServiceTrafficDistributionPreferSameZone, corev1.ServiceTrafficDistributionPreferSameNode} {
		app := strings.ToLower(dist)
		e.addWeb(t, ns, app+"-1", "node1", app)
		e.addWeb(t, ns, app+"-2", "node2", app)
		d := dist
		svc, err := e.c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: app},
			Spec: corev1.ServiceSpec{
				Selector:            map[string]string{"app": app},
				TrafficDistribution: &d,
				Ports:               []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(80), Protocol: corev1.ProtocolTCP}},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		addr := svc.Spec.ClusterIP + ":80"
		// node1 is in zone-a, node2 in zone-b: one node per zone.
		e.expectFrom(t, e.clients[0], addr, app+"-1")
		e.expectFrom(t, e.clients[1], addr, app+"-2")
		if err := e.c.DeletePod(ctx, ns, app+"-1", 0); err != nil {
			t.Fatal(err)
		}
		e.expectFrom(t, e.clients[0], addr, app+"-2")
		e.expectFrom(t, e.clients[1], addr, app+"-2")
	}
}
