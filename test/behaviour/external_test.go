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

// addrs are the setup's family's addresses for IPv4 addresses ss (see
// ipFamily.ip), sorted.
func (s *setup) addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, a := range ss {
		out = append(out, netip.MustParseAddr(s.fam.ip(a)))
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// node is what the proxy tells the datapath of the test's node, as
// --nodeport-addresses left unset does: node ports on every address of the
// family but loopback ones (127.0.0.1, ::1); extra names addresses (as
// IPv4 ones, see ipFamily.ip) added with AddNodeAddress or on the link of a
// further machine. The node's address towards pods is testnet's pod
// gateway over IPv4, its global NodeAddress6 over IPv6 (the pod links'
// fe80::1 is link-local: no node port answers there without a zone).
func (s *setup) node(extra ...string) model.NodeInfo {
	own := s.addrs(append([]string{nodeIP}, extra...)...)
	own = append(own, netip.MustParseAddr(s.fam.nodeAddr()))
	slices.SortFunc(own, netip.Addr.Compare)
	loopback := netip.MustParseAddr("127.0.0.1")
	if s.fam.v6() {
		loopback = netip.IPv6Loopback()
	}
	local := append([]netip.Addr{loopback}, own...)
	slices.SortFunc(local, netip.Addr.Compare)
	return model.NodeInfo{
		NodePortAddresses: own,
		AllLocalAddresses: true,
		LocalAddresses:    local,
		ServiceCIDRs:      []netip.Prefix{s.fam.prefix(serviceCIDR)},
	}
}

// addMachine adds a client machine outside the cluster (testnet's
// AddMachine) at the family's addresses for ip and nodeIP.
func (s *setup) addMachine(name, ip, nodeIP string) *testnet.Pod {
	return s.net.AddMachine(name, s.fam.ip(ip), s.fam.ip(nodeIP))
}

// host is the single-address prefix of the family's address for ip.
func (s *setup) host(ip string) netip.Prefix {
	a := netip.MustParseAddr(s.fam.ip(ip))
	return netip.PrefixFrom(a, a.BitLen())
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
		p := s.net.AddPod(fmt.Sprintf("src-%d", i), s.fam.ip(fmt.Sprintf("10.244.3.%d", i+1)))
		p.Start(false, testnet.Helper("serve", p.Name, s.fam.listen("tcp-src", 8081))...)
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
		outside := s.addMachine("outside", outsideIP, nodeIP)
		sp := exposed(s.web(s.backends(8080, s.pods...)...), model.External{NodePort: nodePort})
		s.sync(t, snapshotOn(s.node(), sp))
		all := names(s.pods)
		target := s.at(nodeIP, nodePort)
		s.forEachSocketFamily(t, func(t *testing.T, f socketFamily) {
			addr := target
			if f.tcp == "tcp6" { // an AF_INET6 socket to an IPv4 node port
				addr = fmt.Sprintf("[::ffff:%s]:%d", nodeIP, nodePort)
			}
			expectOK(t, "pod to node port", s.run(t, f.tcp, addr, "6"), all...)
		})
		expectOK(t, "pod to node port on the pod gateway", s.run(t, "tcp", netip.AddrPortFrom(netip.MustParseAddr(s.fam.nodeAddr()), nodePort).String(), "4"), all...)
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
		outside := s.addMachine("outside", outsideIP, nodeIP)
		stranger := s.addMachine("stranger", strangerIP, strangerNodeIP)
		all := names(s.pods)
		ext := exposed(s.web(s.backends(8080, s.pods...)...), model.External{
			ExternalIPs: s.addrs(externalIP), LoadBalancerIPs: s.addrs(loadBalancer)})
		guarded := exposed(apitest.ServicePort("default", "guarded", "http", model.TCP, s.at("10.96.0.11", 80), s.backends(8080, s.pods...)...),
			model.External{LoadBalancerIPs: s.addrs("203.0.113.11"), SourceRanges: []netip.Prefix{s.host(outsideIP)}})
		s.sync(t, snapshotOn(s.node(strangerNodeIP), ext, guarded))

		for _, a := range []string{s.at(externalIP, 80), s.at(loadBalancer, 80)} {
			expectOK(t, "outside to "+a, outside.Results("tcp", a, "4"), all...)
			expectOK(t, "pod to "+a, s.run(t, "tcp", a, "4"), all...)
		}
		expectOK(t, "allowed source to a guarded load balancer IP", outside.Results("tcp", s.at("203.0.113.11", 80), "4"), all...)
		// The stranger's network works: only the ranges keep it out.
		expectOK(t, "stranger to an unguarded load balancer IP", stranger.Results("tcp", s.at(loadBalancer, 80), "2"), all...)
		// What comes from outside the ranges is not translated (kube-proxy
		// then drops it in KUBE-PROXY-FIREWALL; this node, having no route
		// for the load balancer IP, answers network unreachable first).
		expectFail(t, "source outside the ranges", stranger.Results("tcp", s.at("203.0.113.11", 80), "2"))
	})
}

// An external IP that is one of the node's own addresses is served too; in
// the eBPF mode at connect(), like a node port.
func TestExternalIPOnTheNode(t *testing.T) {
	const onNode = "198.51.100.20"
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		s.net.AddNodeAddress(s.fam.ip(onNode))
		outside := s.addMachine("outside", outsideIP, nodeIP)
		sp := exposed(s.web(s.backends(8080, s.pods...)...), model.External{ExternalIPs: s.addrs(onNode)})
		s.sync(t, snapshotOn(s.node(onNode), sp))
		all := names(s.pods)
		expectOK(t, "pod to the node's external IP", s.run(t, "tcp", s.at(onNode, 80), "4"), all...)
		expectOK(t, "node to its external IP", s.net.HostNetwork().Results("tcp", s.at(onNode, 80), "4"), all...)
		expectOK(t, "outside to the node's external IP", outside.Results("tcp", s.at(onNode, 80), "4"), all...)
	})
}

// externalTrafficPolicy Local: traffic from outside goes to this node's
// endpoints only and keeps the client's address; Cluster masquerades it so
// that replies come back through the node. Traffic from inside the cluster
// goes to every endpoint either way (kube-proxy's short circuit).
func TestExternalTrafficPolicy(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 0)
		outside := s.addMachine("outside", outsideIP, nodeIP)
		pods := s.srcServers(t, 2)
		backends := s.backends(8081, pods...)
		local := exposed(apitest.ServicePort("default", "local", "http", model.TCP, s.at("10.96.0.21", 80), backends...),
			model.External{NodePort: 30081, LoadBalancerIPs: s.addrs("203.0.113.21"), PolicyLocal: true, HealthCheckNodePort: 31081}, backends[0])
		cluster := exposed(apitest.ServicePort("default", "cluster", "http", model.TCP, s.at("10.96.0.22", 80), backends...),
			model.External{NodePort: 30082})
		nowhere := exposed(apitest.ServicePort("default", "nowhere", "http", model.TCP, s.at("10.96.0.23", 80), backends...),
			model.External{NodePort: 30083, PolicyLocal: true, HealthCheckNodePort: 31083})
		s.sync(t, snapshotOn(s.node(), local, cluster, nowhere))

		for _, a := range []string{s.at(nodeIP, 30081), s.at("203.0.113.21", 80)} {
			lines := outside.Results("tcp", a, "6")
			expectOK(t, "eTP Local from outside to "+a, lines, pods[0].Name)
			for _, l := range lines {
				if !strings.Contains(l, "src="+s.fam.ip(outsideIP)+" ") {
					t.Errorf("eTP Local: the backend did not see the client's address %s: %q", s.fam.ip(outsideIP), l)
				}
			}
		}
		lines := outside.Results("tcp", s.at(nodeIP, 30082), "6")
		expectOK(t, "eTP Cluster from outside", lines, names(pods)...)
		for _, l := range lines {
			if strings.Contains(l, "src="+s.fam.ip(outsideIP)+" ") {
				t.Errorf("eTP Cluster: the client's address reached the backend unmasqueraded: %q", l)
			}
		}
		// From a pod: the socket layer translates before any packet, so the
		// backend sees the pod; kube-proxy's KUBE-EXT masquerades it.
		lines = s.run(t, "tcp", s.at(nodeIP, 30082), "4")
		expectOK(t, "eTP Cluster from a pod", lines, names(pods)...)
		for _, l := range lines {
			if seen := strings.Contains(l, "src="+s.client.IP.String()+" "); seen != m.socketLevel {
				t.Errorf("eTP Cluster from a pod: the pod's own address seen by the backend: %v, want %v: %q", seen, m.socketLevel, l)
			}
		}
		expectFail(t, "eTP Local without a local endpoint, from outside", outside.Results("tcp", s.at(nodeIP, 30083), "2"))
		expectOK(t, "eTP Local without a local endpoint, from a pod", s.run(t, "tcp", s.at(nodeIP, 30083), "4"), names(pods)...)
		expectOK(t, "eTP Local from the node", s.net.HostNetwork().Results("tcp", s.at(nodeIP, 30081), "6"), names(pods)...)
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
		noneHere := apitest.ServicePort("default", "elsewhere", "http", model.TCP, s.at("10.96.0.12", 80), all...)
		noneHere.InternalLocal = true
		noneHere.Backends, noneHere.Cluster, noneHere.Local = nil, nil, nil
		s.sync(t, snapshotOn(s.node(), withLocal, noneHere))

		expectOK(t, "ITP Local", s.run(t, "tcp", s.at(vip, 80), "8"), s.pods[0].Name)
		lines := s.run(t, "tcp", s.at("10.96.0.12", 80), "2")
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
		outside := s.addMachine("outside", outsideIP, nodeIP)
		all := s.backends(8080, s.pods...)
		long := exposed(sticky(s.web(all...), time.Hour), model.External{NodePort: nodePort})
		short := sticky(apitest.ServicePort("default", "short", "http", model.TCP, s.at("10.96.0.13", 80), all...), 2*time.Second)
		s.sync(t, snapshotOn(s.node(), long, short))

		for what, lines := range map[string][]string{
			"pod to ClusterIP":      s.run(t, "tcp", s.at(vip, 80), "20"),
			"outside to node port":  outside.Results("tcp", s.at(nodeIP, nodePort), "20"),
			"node to its node port": s.net.HostNetwork().Results("tcp", s.at(nodeIP, nodePort), "20"),
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
				rest = append(rest, netip.AddrPortFrom(p.IP, 8080).String())
			}
		}
		s.sync(t, snapshotOn(s.node(), exposed(sticky(s.web(rest...), time.Hour), model.External{NodePort: nodePort}), short))
		if got := testnet.Tally(s.run(t, "tcp", s.at(vip, 80), "10")); len(got) != 1 || first[firstKey(got)] != 0 {
			t.Errorf("after its backend left, the client reached %v (it was on %v)", got, first)
		}

		// Expiry: idle for longer than the timeout, a client may be sent
		// elsewhere. Each round is one connection after an idle spell;
		// with three backends, ten rounds all on one is a 1 in 20k chance.
		seen := map[string]bool{}
		for range 10 {
			for k := range testnet.Tally(s.run(t, "tcp", s.at("10.96.0.13", 80), "1")) {
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
		s.sync(t, snapshotOn(s.node(), s.web(s.backends(8080, s.pods...)...)))
		for _, a := range []string{s.at(vip, 81), s.at("10.96.0.99", 80)} {
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
		outside := s.addMachine("outside", outsideIP, nodeIP)
		s.sync(t, snapshotOn(s.node(), s.web(s.backends(8080, s.pods...)...)))
		lines := outside.Results("tcp", s.at(vip, 80), "2")
		if m.socketLevel {
			expectFail(t, "eBPF mode: ClusterIP from outside", lines)
			return
		}
		expectOK(t, m.name+": ClusterIP from outside", lines, names(s.pods)...)
	})
}
