package iptables

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/utils/ptr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// Traffic through the external frontends, on the real kernel: a node
// namespace with pods, a client machine on the node's network (outside the
// cluster), and this mode's rules in the node.

const (
	extNodeIP   = "192.168.77.1" // the node's address on the client's network
	extClientIP = "192.168.77.2"
	// The node's address towards pods: what masqueraded traffic comes
	// from.
	extMasqSrc = testnet.PodGateway
)

type extEnv struct {
	n      *testnet.Net
	ns     string
	d      *Dataplane
	tr     *model.Tracker
	node   model.NodeInfo
	podA   *testnet.Pod // on this node
	podB   *testnet.Pod // "on another node": remote for the model
	client *testnet.Pod // the client machine
}

func newExtEnv(t *testing.T, backend string, cfg Config) *extEnv {
	t.Helper()
	n := testnet.New(t)
	e := &extEnv{n: n, ns: "/run/netns/" + n.Node, tr: model.NewTracker(model.WithNodeName(testNode))}
	e.podA = n.AddPod("pod-a", "10.244.1.1")
	e.podB = n.AddPod("pod-b", "10.244.1.2")
	for _, p := range []*testnet.Pod{e.podA, e.podB} {
		p.Start(false, testnet.Helper("serve", p.Name, "tcp-src:8080", "udp:5353")...)
	}
	e.client = n.AddMachine("client", extClientIP, extNodeIP)
	e.node = model.NodeInfo{
		AllLocalAddresses: true,
		NodePortAddresses: []netip.Addr{netip.MustParseAddr(extMasqSrc), netip.MustParseAddr(extNodeIP)},
		LocalAddresses:    []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr(extMasqSrc), netip.MustParseAddr(extNodeIP)},
	}
	cfg.Backend, cfg.NetNS = backend, e.ns
	if !cfg.ClusterCIDR.IsValid() {
		cfg.ClusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	}
	e.d = open(t, cfg)
	return e
}

// sync applies the objects, through the model, in a full or partial sync.
func (e *extEnv) sync(t *testing.T, full bool, svcs []*v1.Service, slices ...*discoveryv1.EndpointSlice) {
	t.Helper()
	for _, s := range svcs {
		e.tr.UpsertService(s)
	}
	for _, s := range slices {
		e.tr.UpsertEndpointSlice(s)
	}
	snap := e.tr.Snapshot(full)
	snap.Node = e.node
	mustSync(t, e.d, snap)
}

// web is Service default/web on port 80 (target 8080), changed by opts.
func web(opts ...svcOpt) *v1.Service {
	return service("default", "web", "10.96.0.80", []v1.ServicePort{apitest.Port("", tcp, 80, 8080)}, opts...)
}

func webSlice(eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return slice("default", "web", "", tcp, 8080, eps...)
}

// answers runs n TCP connects from p to addr and returns, per answer, the
// pod that answered and the client address it saw ("pod-a src=..."), or
// the error.
func answers(t *testing.T, p *testnet.Pod, addr string, n int) []string {
	t.Helper()
	var out []string
	for _, l := range p.Results("tcp", addr, strconv.Itoa(n)) {
		if strings.HasPrefix(l, "ok ") {
			l, _, _ = strings.Cut(strings.TrimPrefix(l, "ok "), " peer=")
		}
		out = append(out, l)
	}
	return out
}

// tally counts answers.
func tally(lines []string) map[string]int {
	out := map[string]int{}
	for _, l := range lines {
		out[l]++
	}
	return out
}

// A NodePort and an external IP of an externalTrafficPolicy Cluster
// Service, from a machine outside the cluster: every endpoint answers,
// and sees the node's address (masqueraded, so that replies come back
// through the node); the node itself reaches the node port on 127.0.0.1.
func TestKernelNodePortAndExternalIPFromOutside(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			e := newExtEnv(t, b, Config{})
			e.sync(t, true, []*v1.Service{web(nodePorts(30080), externalIPs("203.0.113.10"))},
				webSlice(local(e.podA.IP.String()), remote(e.podB.IP.String())))
			want := map[string]bool{"pod-a src=" + extMasqSrc: true, "pod-b src=" + extMasqSrc: true}
			for _, addr := range []string{extNodeIP + ":30080", "203.0.113.10:80"} {
				got := tally(answers(t, e.client, addr, 20))
				for a := range got {
					if !want[a] {
						t.Errorf("%s from outside: answer %q, want pod-a or pod-b masqueraded to %s (all: %v)", addr, a, extMasqSrc, got)
					}
				}
				if len(got) != 2 {
					t.Errorf("%s from outside: answers %v, want both endpoints", addr, got)
				}
			}
			// Node ports on localhost, from the node's own network.
			host := e.n.HostNetwork()
			for _, a := range answers(t, host, "127.0.0.1:30080", 4) {
				if !strings.HasPrefix(a, "pod-") {
					t.Errorf("127.0.0.1:30080 from the node: %q", a)
				}
			}
		})
	}
}

// Node ports stay off 127.0.0.1 when told so; the node's own address
// still serves them.
func TestKernelNoLocalhostNodePorts(t *testing.T) {
	off := false
	e := newExtEnv(t, BackendNFT, Config{LocalhostNodePorts: &off})
	e.sync(t, true, []*v1.Service{web(nodePorts(30080))}, webSlice(local(e.podA.IP.String())))
	host := e.n.HostNetwork()
	if got := answers(t, host, "127.0.0.1:30080", 1); !strings.Contains(got[0], "connection refused") {
		t.Errorf("127.0.0.1:30080 with localhost node ports off: %q, want connection refused", got[0])
	}
	if got := answers(t, host, extNodeIP+":30080", 1); !strings.HasPrefix(got[0], "pod-a") {
		t.Errorf("the node's address: %q", got[0])
	}
}

// loadBalancerSourceRanges: a client outside them gets nothing from the
// load balancer IP; one inside is served. Node ports are not subject to
// them (kube-proxy's documented behaviour).
func TestKernelLoadBalancerSourceRanges(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			e := newExtEnv(t, b, Config{})
			allowed := e.n.AddMachine("allowed", "192.168.78.2", "192.168.78.1")
			e.node.LocalAddresses = append(e.node.LocalAddresses, netip.MustParseAddr("192.168.78.1"))
			e.sync(t, true, []*v1.Service{web(nodePorts(30080), loadBalancer("198.51.100.10"), sourceRanges("192.168.78.0/24"))},
				webSlice(local(e.podA.IP.String())))
			if got := answers(t, allowed, "198.51.100.10:80", 3); tally(got)["pod-a src="+extMasqSrc] != 3 {
				t.Errorf("client inside the source ranges: %v", got)
			}
			for _, a := range answers(t, e.client, "198.51.100.10:80", 2) {
				if !strings.HasPrefix(a, "err ") {
					t.Errorf("client outside the source ranges was served: %q", a)
				}
			}
			if got := answers(t, e.client, extNodeIP+":30080", 2); tally(got)["pod-a src="+extMasqSrc] != 2 {
				t.Errorf("the node port of a Service with source ranges, from outside them: %v", got)
			}
		})
	}
}

// externalTrafficPolicy Local: only this node's endpoint answers, and it
// sees the client's own address. With no endpoint here, outside clients
// get nothing, while pods of this node still reach the Service's
// endpoints elsewhere (kube-proxy's short-circuit).
func TestKernelExternalTrafficPolicyLocal(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			e := newExtEnv(t, b, Config{})
			svc := web(nodePorts(30080), loadBalancer("198.51.100.10"), externalLocal(32080))
			e.sync(t, true, []*v1.Service{svc}, webSlice(local(e.podA.IP.String()), remote(e.podB.IP.String())))
			for _, addr := range []string{extNodeIP + ":30080", "198.51.100.10:80"} {
				if got := answers(t, e.client, addr, 10); tally(got)["pod-a src="+extClientIP] != 10 {
					t.Errorf("%s under externalTrafficPolicy Local: %v, want pod-a seeing %s every time", addr, got, extClientIP)
				}
			}

			e.sync(t, false, nil, webSlice(remote(e.podB.IP.String())))
			for _, a := range answers(t, e.client, extNodeIP+":30080", 2) {
				if !strings.HasPrefix(a, "err ") {
					t.Errorf("no local endpoint, yet an outside client was served: %q", a)
				}
			}
			pod := e.n.AddPod("pod-c", "10.244.1.3")
			if got := answers(t, pod, extNodeIP+":30080", 3); tally(got)["pod-b src=10.244.1.3"] != 3 {
				t.Errorf("a pod of this node, no local endpoint: %v, want pod-b every time", got)
			}
		})
	}
}

// ClientIP session affinity: a client keeps its endpoint, through the node
// port from outside and through the ClusterIP from a pod.
func TestKernelSessionAffinity(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			e := newExtEnv(t, b, Config{})
			e.sync(t, true, []*v1.Service{web(nodePorts(30080), clientIPAffinity(600))},
				webSlice(local(e.podA.IP.String()), remote(e.podB.IP.String())))
			pod := e.n.AddPod("pod-c", "10.244.1.3")
			for _, c := range []struct {
				from *testnet.Pod
				addr string
			}{{e.client, extNodeIP + ":30080"}, {pod, "10.96.0.80:80"}} {
				got := tally(answers(t, c.from, c.addr, 16))
				if len(got) != 1 {
					t.Errorf("%s from %s with ClientIP affinity: answers %v, want one endpoint", c.addr, c.from.Name, got)
				}
			}
		})
	}
}

// A UDP client that kept its source port across a change reaches what the
// node port serves now: flows begun before the Service had endpoints
// (answered by the node itself) and flows to an endpoint that is gone are
// deleted from conntrack, as kube-proxy does for node ports.
func TestKernelUDPNodePortStaleFlows(t *testing.T) {
	e := newExtEnv(t, BackendNFT, Config{})
	dns := func() *v1.Service {
		return service("default", "dns", "10.96.0.53", []v1.ServicePort{apitest.Port("dns", udp, 53, 5353)}, nodePorts(30053))
	}
	dnsSlice := func(ep discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
		return slice("default", "dns", "dns", udp, 5353, ep)
	}
	send := func() string {
		t.Helper()
		l := e.client.Results("udp", extNodeIP+":30053", "1", "lport=40053")[0]
		if strings.HasPrefix(l, "ok ") {
			l, _, _ = strings.Cut(strings.TrimPrefix(l, "ok "), " ")
		}
		return l
	}
	e.sync(t, true, nil)
	if got := send(); !strings.HasPrefix(got, "err ") {
		t.Fatalf("before the Service: %q, want an error", got)
	}
	e.sync(t, false, []*v1.Service{dns()}, dnsSlice(local(e.podA.IP.String())))
	if got := send(); got != "pod-a" {
		t.Errorf("after the Service got its endpoint: %q, want pod-a", got)
	}
	e.sync(t, false, nil, dnsSlice(remote(e.podB.IP.String())))
	if got := send(); got != "pod-b" {
		t.Errorf("after the endpoint moved: %q, want pod-b", got)
	}
}

// The eBPF mode's external datapath: node ports served from outside,
// nothing that matches a ClusterIP, no localhost node ports, no nfacct
// counters; its cleanup leaves the tables exactly as they were.
func TestKernelExternalOnly(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			e := newExtEnv(t, b, Config{ExternalOnly: true})
			if out, err := inNS(e.ns, "iptables-"+b, "-A", "FORWARD", "-s", "192.0.2.1", "-m", "comment", "--comment", "not ours", "-j", "ACCEPT").CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			before := rulesAndChains(saveTables(t, e.ns, b))
			other := service("default", "internal", "10.96.0.81", []v1.ServicePort{apitest.Port("", tcp, 80, 8080)})
			e.sync(t, true, []*v1.Service{web(nodePorts(30080)), other},
				webSlice(local(e.podA.IP.String())), slice("default", "internal", "", tcp, 8080, local(e.podA.IP.String())))
			save := saveTables(t, e.ns, b)
			for _, unwanted := range []string{"10.96.0.80", "10.96.0.81", "cluster IP", "internal", chainFirewall, "nfacct"} {
				if strings.Contains(save, unwanted) {
					t.Errorf("external-only rules contain %q:\n%s", unwanted, save)
				}
			}
			if !strings.Contains(save, "! -d 127.0.0.0/8") {
				t.Errorf("external-only rules serve node ports on 127.0.0.0/8:\n%s", save)
			}
			if got := answers(t, e.client, extNodeIP+":30080", 2); tally(got)["pod-a src="+extMasqSrc] != 2 {
				t.Errorf("node port from outside: %v", got)
			}
			if v, err := readSysctl(e.ns, sysctlRouteLocalnet); err != nil || v != 0 {
				t.Errorf("route_localnet %d (%v), want it left at 0", v, err)
			}
			if err := Cleanup(context.Background(), Config{NetNS: e.ns, ExternalOnly: true}); err != nil {
				t.Fatal(err)
			}
			if diff := lineDiff(before, rulesAndChains(saveTables(t, e.ns, b))); diff != "" {
				t.Errorf("cleanup left the tables otherwise than it found them (- before, + after):\n%s", diff)
			}
		})
	}
}

// A full sync finds every jump it made: none is inserted twice, and the
// older form of a jump (the comment first, before issue 12) is replaced.
func TestKernelJumpsConverge(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			ns := nodeNS(t)
			old := []string{"iptables-" + b, "-t", "nat", "-I", "PREROUTING", "1", "-m", "comment", "--comment", "kubernetes service portals", "-j", chainServices}
			if out, err := inNS(ns, "iptables-"+b, "-t", "nat", "-N", chainServices).CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			if out, err := inNS(ns, old...).CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			d := open(t, Config{Backend: b, NetNS: ns})
			s := snap(true, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080"))
			s.Node = model.NodeInfo{AllLocalAddresses: true}
			mustSync(t, d, s)
			missing, stale := checkJumps(parseSave([]byte(saveTables(t, ns, b))), jumpsFor(false))
			if len(missing) > 0 || len(stale) > 0 {
				t.Errorf("after a full sync: missing %v, stale %v", missing, stale)
			}
			mustSync(t, d, s)
			save := saveTables(t, ns, b)
			if n := strings.Count(save, "-j "+chainServices+"\n"); n != 4 {
				t.Errorf("%d jumps to KUBE-SERVICES, want 4 (nat PREROUTING and OUTPUT, filter FORWARD and OUTPUT):\n%s", n, save)
			}
			if strings.Contains(save, `-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`) &&
				strings.Count(save, "-A PREROUTING ") != 1 {
				t.Errorf("the old jump is still there:\n%s", save)
			}
			if !strings.Contains(save, "-A INPUT -j KUBE-FIREWALL") {
				t.Errorf("no jump to KUBE-FIREWALL:\n%s", save)
			}
		})
	}
}

// Cleanup leaves KUBE-FIREWALL when it holds its guard (kubelet keeps the
// same, and route_localnet stays set), and removes it when it is empty.
func TestKernelCleanupAndKubeFirewall(t *testing.T) {
	for _, c := range []struct {
		name      string
		localhost bool
		kept      bool
	}{{"guarding route_localnet", true, true}, {"empty", false, false}} {
		t.Run(c.name, func(t *testing.T) {
			ns := nodeNS(t)
			d := open(t, Config{Backend: BackendNFT, NetNS: ns, LocalhostNodePorts: &c.localhost})
			s := snap(true, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080"))
			s.Node = model.NodeInfo{AllLocalAddresses: true}
			mustSync(t, d, s)
			if err := Cleanup(context.Background(), Config{NetNS: ns}); err != nil {
				t.Fatal(err)
			}
			save := saveTables(t, ns, BackendNFT)
			if got := strings.Contains(save, chainFirewall); got != c.kept {
				t.Errorf("KUBE-FIREWALL left: %v, want %v:\n%s", got, c.kept, save)
			}
			if strings.Contains(strings.ReplaceAll(save, chainFirewall, ""), "KUBE-") {
				t.Errorf("other chains of ours left:\n%s", save)
			}
			out, _ := exec.Command("nsenter", "--net="+ns, "--", "cat", "/proc/sys/net/ipv4/conf/all/route_localnet").Output()
			if want := map[bool]string{true: "1", false: "0"}[c.localhost]; strings.TrimSpace(string(out)) != want {
				t.Errorf("route_localnet %q, want %s", out, want)
			}
		})
	}
}

// rulesAndChains is what a dump holds beyond empty built-in tables: rules,
// chains of someone's, and built-in chains whose policy is not ACCEPT. A
// table the iptables commands made to hold rules stays when they are
// gone (the legacy backend cannot remove one).
func rulesAndChains(save string) []string {
	var out []string
	for _, l := range normalised(save) {
		name, rest, _ := strings.Cut(strings.TrimPrefix(l, ":"), " ")
		builtin := strings.ToUpper(name) == name && !strings.Contains(name, "-")
		switch {
		case strings.HasPrefix(l, "*"):
		case strings.HasPrefix(l, ":") && builtin && strings.HasPrefix(rest, "ACCEPT "):
		default:
			out = append(out, l)
		}
	}
	return out
}

// Partial syncs keep the external chains right: a Service that loses its
// external frontends loses its KUBE-EXT, KUBE-SVL and KUBE-FW chains and its
// firewall rules, an untouched one keeps them, and the rule counts stay
// those of the tables.
func TestKernelPartialSyncExternalChains(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			e := newExtEnv(t, b, Config{})
			lb := func(name, ip, lbIP string, opts ...svcOpt) *v1.Service {
				return service("default", name, ip, []v1.ServicePort{apitest.Port("", tcp, 80, 8080)},
					append([]svcOpt{loadBalancer(lbIP), sourceRanges("192.168.77.0/24"), externalLocal(32000)}, opts...)...)
			}
			a, other := lb("a", "10.96.0.1", "198.51.100.1", nodePorts(30001)), lb("b", "10.96.0.2", "198.51.100.2", nodePorts(30002))
			e.sync(t, true, []*v1.Service{a, other},
				slice("default", "a", "", tcp, 8080, local(e.podA.IP.String())), slice("default", "b", "", tcp, 8080, local(e.podB.IP.String())))
			aName := model.ServicePortName{ServiceName: model.ServiceName{Namespace: "default", Name: "a"}, Protocol: model.TCP}
			bName := aName
			bName.Name = "b"
			save := saveTables(t, e.ns, b)
			for _, c := range []string{prefixExternalChain, prefixLocalChain, prefixFirewallChain} {
				for _, n := range []model.ServicePortName{aName, bName} {
					if !strings.Contains(save, ":"+c+portHash(n)) {
						t.Fatalf("no %s chain for %s:\n%s", c, n, save)
					}
				}
			}
			if got := tally(answers(t, e.client, "198.51.100.1:80", 2)); got["pod-a src="+extClientIP] != 2 {
				t.Errorf("a's load balancer IP: %v", got)
			}

			// a becomes a plain ClusterIP Service.
			e.sync(t, false, []*v1.Service{service("default", "a", "10.96.0.1", []v1.ServicePort{apitest.Port("", tcp, 80, 8080)})})
			save = saveTables(t, e.ns, b)
			for _, c := range []string{prefixExternalChain, prefixLocalChain, prefixFirewallChain} {
				if strings.Contains(save, c+portHash(aName)) {
					t.Errorf("a's %s chain is left:\n%s", c, save)
				}
				if !strings.Contains(save, ":"+c+portHash(bName)) {
					t.Errorf("untouched b lost its %s chain:\n%s", c, save)
				}
			}
			if strings.Contains(save, "198.51.100.1") || strings.Contains(save, "dport 30001") {
				t.Errorf("a's external frontends are left:\n%s", save)
			}
			tables := parseSave([]byte(save))
			for table, n := range e.d.RuleCounts() {
				ours := 0
				for _, r := range tables[table].rules {
					chain, _, _ := strings.Cut(strings.TrimPrefix(r, "-A "), " ")
					if ownedChain(chain) || chain == chainFirewall {
						ours++
					}
				}
				if ours != n {
					t.Errorf("%s: counted %d rules, the table holds %d", table, n, ours)
				}
			}
			if got := tally(answers(t, e.client, "198.51.100.2:80", 2)); got["pod-b src="+extClientIP] != 2 {
				t.Errorf("untouched b's load balancer IP: %v", got)
			}
		})
	}
}

// A Local LoadBalancer Service without any external frontend yet (its
// load balancer has no address in the status) has its health check node
// port accepted in both modes, the eBPF mode's packet layer included,
// which writes no chain for it; the Service gaining a load balancer IP,
// then losing it, goes through partial syncs that the real restore takes.
func TestKernelHealthCheckNodePortWithoutFrontends(t *testing.T) {
	for _, externalOnly := range []bool{false, true} {
		t.Run(fmt.Sprintf("externalOnly=%v", externalOnly), func(t *testing.T) {
			e := newExtEnv(t, BackendNFT, Config{ExternalOnly: externalOnly})
			noNodePorts := func(s *v1.Service) { s.Spec.AllocateLoadBalancerNodePorts = ptr.To(false) }
			pending := web(loadBalancer(), externalLocal(32080), noNodePorts)
			eps := webSlice(local(e.podA.IP.String()))
			accept := `-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web health check node port" -m tcp --dport 32080 -j ACCEPT`
			check := func(what string, wantLB bool) {
				t.Helper()
				save := saveTables(t, e.ns, BackendNFT)
				if !strings.Contains(save, accept) {
					t.Errorf("%s: no ACCEPT of the health check node port:\n%s", what, save)
				}
				if got := strings.Contains(save, "198.51.100.10"); got != wantLB {
					t.Errorf("%s: load balancer IP in the rules %v, want %v:\n%s", what, got, wantLB, save)
				}
			}
			e.sync(t, true, []*v1.Service{pending}, eps)
			check("no frontend", false)
			e.sync(t, false, []*v1.Service{web(loadBalancer("198.51.100.10"), externalLocal(32080), noNodePorts)})
			check("load balancer IP given", true)
			if got := answers(t, e.client, "198.51.100.10:80", 2); tally(got)["pod-a src="+extClientIP] != 2 {
				t.Errorf("load balancer IP from outside: %v", got)
			}
			e.sync(t, false, []*v1.Service{pending})
			check("load balancer IP gone", false)
			e.sync(t, true, nil)
			check("full sync", false)
		})
	}
}
