package behaviour

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// Addresses the external scenarios use. The external IP and the load
// balancer IP are off the outside network, so the client machine sends
// them to the node as its default route, as a router or a load balancer
// in VIP mode (ipMode VIP) would.
const (
	nodePort     = 30080
	externalIP   = "198.51.100.10"
	loadBalancer = "203.0.113.10"
	// nodeIP is the node's address on the outside client's network.
	nodeIP    = "192.168.50.1"
	outsideIP = "192.168.50.2"
	// The stranger is on a network of its own with the node.
	strangerNodeIP = "192.168.51.1"
	strangerIP     = "192.168.51.2"
)

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// node is what the proxy tells the datapath of the test's node, as
// --nodeport-addresses left unset does: node ports on every address but
// loopback ones; extra names addresses added with AddNodeAddress or on the
// link of a further machine.
func node(extra ...string) model.NodeInfo {
	return model.NodeInfo{
		NodePortAddresses: addrs(append([]string{nodeIP, testnet.PodGateway}, extra...)...),
		AllLocalAddresses: true,
		LocalAddresses:    addrs(append([]string{"127.0.0.1", nodeIP, testnet.PodGateway}, extra...)...),
		ServiceCIDRs:      []netip.Prefix{netip.MustParsePrefix(serviceCIDR)},
	}
}

// snapshotOn is a full snapshot of ports on the test's node.
func snapshotOn(n model.NodeInfo, ports ...model.ServicePort) *model.Snapshot {
	snap := apitest.Snapshot(true, ports...)
	snap.Node = n
	return snap
}

// exposed returns sp with external frontends, its backends (local ones
// first: "local" is where the model says they run) split into this node's
// and the others.
func exposed(sp model.ServicePort, ext model.External, local ...string) model.ServicePort {
	sp.External = ext
	for _, l := range local {
		ap := netip.MustParseAddrPort(l)
		sp.Local = append(sp.Local, model.Backend{IP: ap.Addr(), Port: ap.Port()})
	}
	slices.SortFunc(sp.Local, model.Backend.Compare)
	return sp
}

// srcServers adds server pods that answer TCP 8081 with their name and the
// client address they see.
func (s *setup) srcServers(t *testing.T, n int) []*testnet.Pod {
	t.Helper()
	var pods []*testnet.Pod
	for i := range n {
		p := s.net.AddPod(fmt.Sprintf("src-%d", i), fmt.Sprintf("10.244.3.%d", i+1))
		p.Start(false, testnet.Helper("serve", p.Name, "tcp-src:8081")...)
		pods = append(pods, p)
	}
	return pods
}

// expectOK fails unless every line is an answer from one of allowed.
func expectOK(t *testing.T, what string, lines []string, allowed ...string) {
	t.Helper()
	if len(lines) == 0 {
		t.Errorf("%s: no answer", what)
	}
	testnet.AssertAllOK(t, what, lines, allowed...)
}

// expectFail fails unless every line is a failure.
func expectFail(t *testing.T, what string, lines []string) {
	t.Helper()
	for _, l := range lines {
		if strings.HasPrefix(l, "ok ") {
			t.Errorf("%s: answered, want a failure: %q", what, l)
		}
	}
}

func names(pods []*testnet.Pod) []string {
	var out []string
	for _, p := range pods {
		out = append(out, p.Name)
	}
	return out
}

// A NodePort Service answers on the node's addresses from a pod, from the
// node itself and from a machine outside the cluster.
func TestNodePortFromPodNodeAndOutside(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		outside := s.net.AddMachine("outside", outsideIP, nodeIP)
		sp := exposed(s.web(s.backends(8080, s.pods...)...), model.External{NodePort: nodePort})
		s.sync(t, snapshotOn(node(), sp))
		all := names(s.pods)
		target := fmt.Sprintf("%s:%d", nodeIP, nodePort)
		s.forEachSocketFamily(t, func(t *testing.T, f socketFamily) {
			addr := target
			if f.name == "AF_INET6" {
				addr = fmt.Sprintf("[::ffff:%s]:%d", nodeIP, nodePort)
			}
			expectOK(t, "pod to node port", s.run(t, f.tcp, addr, "6"), all...)
		})
		expectOK(t, "pod to node port on the pod gateway", s.run(t, "tcp", fmt.Sprintf("%s:%d", testnet.PodGateway, nodePort), "4"), all...)
		expectOK(t, "node to its node port", s.net.HostNetwork().Results("tcp", target, "4"), all...)
		expectOK(t, "outside to node port", outside.Results("tcp", target, "6"), all...)
		// The ClusterIP is served as before.
		expectOK(t, "ClusterIP", s.run(t, "tcp", s.at(vip, 80), "4"), all...)
	})
}

// External IPs and load balancer IPs routed to the node are served from
// outside and from pods; loadBalancerSourceRanges keep out a client outside
// them.
func TestExternalAndLoadBalancerIPs(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		outside := s.net.AddMachine("outside", outsideIP, nodeIP)
		stranger := s.net.AddMachine("stranger", strangerIP, strangerNodeIP)
		all := names(s.pods)
		ext := exposed(s.web(s.backends(8080, s.pods...)...), model.External{
			ExternalIPs: addrs(externalIP), LoadBalancerIPs: addrs(loadBalancer)})
		guarded := exposed(apitest.ServicePort("default", "guarded", "http", model.TCP, "10.96.0.11:80", s.backends(8080, s.pods...)...),
			model.External{LoadBalancerIPs: addrs("203.0.113.11"), SourceRanges: []netip.Prefix{netip.MustParsePrefix(outsideIP + "/32")}})
		s.sync(t, snapshotOn(node(strangerNodeIP), ext, guarded))

		for _, a := range []string{externalIP + ":80", loadBalancer + ":80"} {
			expectOK(t, "outside to "+a, outside.Results("tcp", a, "4"), all...)
			expectOK(t, "pod to "+a, s.run(t, "tcp", a, "4"), all...)
		}
		expectOK(t, "allowed source to a guarded load balancer IP", outside.Results("tcp", "203.0.113.11:80", "4"), all...)
		// The stranger's network works: only the ranges keep it out.
		expectOK(t, "stranger to an unguarded load balancer IP", stranger.Results("tcp", loadBalancer+":80", "2"), all...)
		// What comes from outside the ranges is not translated (kube-proxy
		// then drops it in KUBE-PROXY-FIREWALL; this node, having no route
		// for the load balancer IP, answers network unreachable first).
		expectFail(t, "source outside the ranges", stranger.Results("tcp", "203.0.113.11:80", "2"))
	})
}

// An external IP that is one of the node's own addresses is served too; in
// the eBPF mode at connect(), like a node port.
func TestExternalIPOnTheNode(t *testing.T) {
	const onNode = "198.51.100.20"
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		s.net.AddNodeAddress(onNode)
		outside := s.net.AddMachine("outside", outsideIP, nodeIP)
		sp := exposed(s.web(s.backends(8080, s.pods...)...), model.External{ExternalIPs: addrs(onNode)})
		s.sync(t, snapshotOn(node(onNode), sp))
		all := names(s.pods)
		expectOK(t, "pod to the node's external IP", s.run(t, "tcp", onNode+":80", "4"), all...)
		expectOK(t, "node to its external IP", s.net.HostNetwork().Results("tcp", onNode+":80", "4"), all...)
		expectOK(t, "outside to the node's external IP", outside.Results("tcp", onNode+":80", "4"), all...)
	})
}

// externalTrafficPolicy Local: traffic from outside goes to this node's
// endpoints only and keeps the client's address; Cluster masquerades it so
// that replies come back through the node. Traffic from inside the cluster
// goes to every endpoint either way (kube-proxy's short circuit).
func TestExternalTrafficPolicy(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 0)
		outside := s.net.AddMachine("outside", outsideIP, nodeIP)
		pods := s.srcServers(t, 2)
		backends := s.backends(8081, pods...)
		local := exposed(apitest.ServicePort("default", "local", "http", model.TCP, "10.96.0.21:80", backends...),
			model.External{NodePort: 30081, LoadBalancerIPs: addrs("203.0.113.21"), PolicyLocal: true, HealthCheckNodePort: 31081}, backends[0])
		cluster := exposed(apitest.ServicePort("default", "cluster", "http", model.TCP, "10.96.0.22:80", backends...),
			model.External{NodePort: 30082})
		nowhere := exposed(apitest.ServicePort("default", "nowhere", "http", model.TCP, "10.96.0.23:80", backends...),
			model.External{NodePort: 30083, PolicyLocal: true, HealthCheckNodePort: 31083})
		s.sync(t, snapshotOn(node(), local, cluster, nowhere))

		for _, a := range []string{fmt.Sprintf("%s:30081", nodeIP), "203.0.113.21:80"} {
			lines := outside.Results("tcp", a, "6")
			expectOK(t, "eTP Local from outside to "+a, lines, pods[0].Name)
			for _, l := range lines {
				if !strings.Contains(l, "src="+outsideIP+" ") {
					t.Errorf("eTP Local: the backend did not see the client's address %s: %q", outsideIP, l)
				}
			}
		}
		lines := outside.Results("tcp", fmt.Sprintf("%s:30082", nodeIP), "6")
		expectOK(t, "eTP Cluster from outside", lines, names(pods)...)
		for _, l := range lines {
			if strings.Contains(l, "src="+outsideIP+" ") {
				t.Errorf("eTP Cluster: the client's address reached the backend unmasqueraded: %q", l)
			}
		}
		// From a pod: the socket layer translates before any packet, so the
		// backend sees the pod; kube-proxy's KUBE-EXT masquerades it.
		lines = s.run(t, "tcp", fmt.Sprintf("%s:30082", nodeIP), "4")
		expectOK(t, "eTP Cluster from a pod", lines, names(pods)...)
		for _, l := range lines {
			if seen := strings.Contains(l, "src="+s.client.IP.String()+" "); seen != m.socketLevel {
				t.Errorf("eTP Cluster from a pod: the pod's own address seen by the backend: %v, want %v: %q", seen, m.socketLevel, l)
			}
		}
		expectFail(t, "eTP Local without a local endpoint, from outside", outside.Results("tcp", fmt.Sprintf("%s:30083", nodeIP), "2"))
		expectOK(t, "eTP Local without a local endpoint, from a pod", s.run(t, "tcp", fmt.Sprintf("%s:30083", nodeIP), "4"), names(pods)...)
		expectOK(t, "eTP Local from the node", s.net.HostNetwork().Results("tcp", fmt.Sprintf("%s:30081", nodeIP), "6"), names(pods)...)
	})
}

// internalTrafficPolicy Local: the ClusterIP goes to this node's endpoints;
// with none here but some elsewhere, kube-proxy drops the traffic. The eBPF
// mode refuses the connect() at once instead: it decides before any packet
// exists, and a refusal tells the client what a drop makes it wait for.
func TestInternalTrafficPolicyLocal(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		all := s.backends(8080, s.pods...)
		withLocal := s.web(all...)
		withLocal.InternalLocal = true
		withLocal.Local = withLocal.Backends[:1]
		withLocal.Backends = withLocal.Local
		withLocal.Cluster = nil
		noneHere := apitest.ServicePort("default", "elsewhere", "http", model.TCP, "10.96.0.12:80", all...)
		noneHere.InternalLocal = true
		noneHere.Backends, noneHere.Cluster, noneHere.Local = nil, nil, nil
		s.sync(t, snapshotOn(node(), withLocal, noneHere))

		expectOK(t, "ITP Local", s.run(t, "tcp", s.at(vip, 80), "8"), s.pods[0].Name)
		lines := s.run(t, "tcp", "10.96.0.12:80", "2")
		if m.socketLevel {
			for _, l := range lines {
				if l != "err connection refused" {
					t.Errorf("ITP Local without a local endpoint: %q, want a refusal", l)
				}
			}
		} else {
			expectFail(t, "ITP Local without a local endpoint", lines)
		}
	})
}

// sticky returns sp with ClientIP session affinity.
func sticky(sp model.ServicePort, timeout time.Duration) model.ServicePort {
	sp.Affinity = timeout
	return sp
}

// ClientIP affinity: every connection of a client goes to one backend
// until the affinity has not been used for its timeout. kube-proxy keys it
// on the source address; the eBPF mode, deciding at connect() before there
// is one, on the client's network namespace, which is a pod's address.
func TestSessionAffinity(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 3)
		outside := s.net.AddMachine("outside", outsideIP, nodeIP)
		all := s.backends(8080, s.pods...)
		long := exposed(sticky(s.web(all...), time.Hour), model.External{NodePort: nodePort})
		short := sticky(apitest.ServicePort("default", "short", "http", model.TCP, "10.96.0.13:80", all...), 2*time.Second)
		s.sync(t, snapshotOn(node(), long, short))

		for what, lines := range map[string][]string{
			"pod to ClusterIP":      s.run(t, "tcp", s.at(vip, 80), "20"),
			"outside to node port":  outside.Results("tcp", fmt.Sprintf("%s:%d", nodeIP, nodePort), "20"),
			"node to its node port": s.net.HostNetwork().Results("tcp", fmt.Sprintf("%s:%d", nodeIP, nodePort), "20"),
		} {
			if got := testnet.Tally(lines); len(got) != 1 {
				t.Errorf("%s: a sticky client reached %v, want one backend", what, got)
			}
		}

		// The sticky backend goes: the client moves to another, and stays.
		first := testnet.Tally(s.run(t, "tcp", s.at(vip, 80), "1"))
		var rest []string
		for _, p := range s.pods {
			if first["ok "+p.Name] == 0 {
				rest = append(rest, fmt.Sprintf("%s:8080", p.IP))
			}
		}
		s.sync(t, snapshotOn(node(), exposed(sticky(s.web(rest...), time.Hour), model.External{NodePort: nodePort}), short))
		if got := testnet.Tally(s.run(t, "tcp", s.at(vip, 80), "10")); len(got) != 1 || first[firstKey(got)] != 0 {
			t.Errorf("after its backend left, the client reached %v (it was on %v)", got, first)
		}

		// Expiry: idle for longer than the timeout, a client may be sent
		// elsewhere. Each round is one connection after an idle spell;
		// with three backends, ten rounds all on one is a 1 in 20k chance.
		seen := map[string]bool{}
		for range 10 {
			for k := range testnet.Tally(s.run(t, "tcp", "10.96.0.13:80", "1")) {
				seen[k] = true
			}
			if len(seen) > 1 {
				break
			}
			time.Sleep(2500 * time.Millisecond)
		}
		if len(seen) < 2 {
			t.Errorf("affinity of 2s never expired over ten idle spells of 2.5s: %v", seen)
		}
	})
}

func firstKey(m map[string]int) string {
	for k := range m {
		return k
	}
	return ""
}

// A ClusterIP on a port its Service lacks, and an address of the Service
// range no Service holds, are refused at once in the eBPF mode (as
// kube-proxy's nftables mode rejects the first and drops the second);
// kube-proxy's iptables mode, and ours, let them through to the network,
// where they die.
func TestUnknownPortAndUnallocatedAddress(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 1)
		s.sync(t, snapshotOn(node(), s.web(s.backends(8080, s.pods...)...)))
		for _, a := range []string{s.at(vip, 81), "10.96.0.99:80"} {
			lines := s.run(t, "tcp", a, "2")
			if m.socketLevel {
				for _, l := range lines {
					if l != "err connection refused" {
						t.Errorf("%s: %q, want a refusal at once", a, l)
					}
				}
				continue
			}
			expectFail(t, a, lines)
		}
	})
}

// A packet for a ClusterIP that no socket on the node sent (a machine that
// routes the Service range to the node, a VM guest with its own kernel):
// kube-proxy translates it per packet, masquerading sources outside the
// cluster CIDR. The eBPF mode decides at connect() on the node's sockets
// only; its packet layer serves external frontends, not ClusterIPs, so
// such a packet is not translated and dies where the Service range leads.
// With the socket layer confined to the node's namespace, the packet layer
// has the ClusterIP rules, which serve it as kube-proxy's do.
func TestClusterIPRoutedFromOutside(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		outside := s.net.AddMachine("outside", outsideIP, nodeIP)
		s.sync(t, snapshotOn(node(), s.web(s.backends(8080, s.pods...)...)))
		lines := outside.Results("tcp", s.at(vip, 80), "2")
		if m.socketLevel {
			expectFail(t, "eBPF mode: ClusterIP from outside", lines)
			return
		}
		expectOK(t, m.name+": ClusterIP from outside", lines, names(s.pods)...)
	})
}
