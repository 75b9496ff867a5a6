package behaviour

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"

	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func TestMain(m *testing.M) { testnet.Main(m, nil) }

// mode is one datapath under test.
type mode struct {
	name string
	// open starts a new instance of the datapath of s's family for the
	// node of s, as a new proxy process would; instances of one test share
	// state in the kernel (pins, rules).
	open func(t *testing.T, s *setup) dataplane.Dataplane
	// openBoth starts the datapaths of both families for the node of
	// s4 and s6 (one setup per family on one topology), as a dual-stack
	// proxy does.
	openBoth func(t *testing.T, s4, s6 *setup) (dp4, dp6 dataplane.Dataplane)
	// cleanup removes the datapath, as --cleanup does.
	cleanup func(s *setup) error
	// leftovers describes what of the datapath is left on the node, ""
	// if nothing.
	leftovers func(t *testing.T, s *setup) string
	// distinct describes what only this mode leaves on the node (both
	// write iptables rules: the eBPF mode for traffic from outside), ""
	// if nothing: programs and pins, or ClusterIP rules.
	distinct func(t *testing.T, s *setup) string
	// takeover removes what the other mode left, as main's handover does
	// once this mode serves.
	takeover func(s *setup) error
	// fam is the IP family of the scenario's run: forEachMode sets it.
	fam ipFamily
	// socketLevel is true when the client pod's sockets are load-balanced
	// at connect() and sendmsg() rather than per packet: the eBPF mode,
	// unless its socket layer serves the node's namespace only (its pods
	// then get the iptables modes' behaviour, which every scenario asserts
	// for them).
	socketLevel bool
}

func ebpfMode() mode { return ebpfModeWith(false) }

// ebpfModeWith is the eBPF mode, with the socket layer confined to the
// node's network namespace if hostNetNSOnly
// (--bpf-socket-lb-host-netns-only): pods are then served per packet.
func ebpfModeWith(hostNetNSOnly bool) mode {
	name := "ebpf"
	if hostNetNSOnly {
		name = "ebpf-host-netns-only"
	}
	return mode{
		name:        name,
		socketLevel: !hostNetNSOnly,
		// As the proxy runs it (see layerEBPF).
		open: func(t *testing.T, s *setup) dataplane.Dataplane {
			t.Helper()
			dp := loadEBPF(t, s, hostNetNSOnly)
			if !s.fam.v6() {
				return layerEBPF(t, s, dp, dp, hostNetNSOnly)
			}
			// An IPv6 run serves through the IPv6 view of the programs,
			// as the proxy's IPv6 proxier does.
			v6, err := dp.IPv6()
			if err != nil {
				dp.Close()
				t.Fatalf("opening the eBPF datapath's IPv6 view: %v", err)
			}
			return closingAlso{layerEBPF(t, s, dp, v6, hostNetNSOnly), dp}
		},
		openBoth: func(t *testing.T, s4, s6 *setup) (dataplane.Dataplane, dataplane.Dataplane) {
			t.Helper()
			dp := loadEBPF(t, s4, hostNetNSOnly)
			v6, err := dp.IPv6()
			if err != nil {
				dp.Close()
				t.Fatalf("opening the eBPF datapath's IPv6 view: %v", err)
			}
			// As a dual-stack proxy: one set of programs, a view of them
			// and a packet layer per family.
			return layerEBPF(t, s4, dp, dp, hostNetNSOnly), layerEBPF(t, s6, dp, v6, hostNetNSOnly)
		},
		takeover: func(s *setup) error {
			return iptables.CleanupExcept(context.Background(), s.iptablesConfig(), s.packetsBackend)
		},
		cleanup: func(s *setup) error {
			return errors.Join(ebpf.Cleanup(s.bpffs), iptables.Cleanup(context.Background(), s.iptablesConfig()))
		},
		distinct: func(t *testing.T, s *setup) string { return bpfLeftovers(t, s) },
		leftovers: func(t *testing.T, s *setup) string {
			left := iptablesLeftovers(t, s)
			if b := bpfLeftovers(t, s); b != "" {
				left = append(left, b)
			}
			return strings.Join(left, ", ")
		},
	}
}

// loadEBPF loads the eBPF mode's programs for the node of s.
func loadEBPF(t *testing.T, s *setup, hostNetNSOnly bool) *ebpf.Dataplane {
	t.Helper()
	ecfg := s.ebpfConfig()
	ecfg.HostNetNSOnly = hostNetNSOnly
	dp, err := ebpf.New(ecfg)
	if err != nil {
		t.Fatalf("loading the eBPF datapath: %v", err)
	}
	return dp
}

// layerEBPF is the eBPF mode as the proxy runs it for the family of s:
// the socket layer (dp, or its IPv6 view), and iptables rules of that
// family for packets from outside the node at external frontends (and
// from pods to every frontend, if the socket layer leaves them). Closing
// it closes sockets.
func layerEBPF(t *testing.T, s *setup, dp *ebpf.Dataplane, sockets dataplane.Dataplane, hostNetNSOnly bool) *dataplane.Layered {
	t.Helper()
	cfg := s.iptablesConfig()
	cfg.ExternalOnly = true
	cfg.ClusterIPs = hostNetNSOnly
	packets, err := iptables.New(context.Background(), cfg)
	if err != nil {
		sockets.Close()
		t.Fatalf("starting the packet layer: %v", err)
	}
	s.packetsBackend = packets.Backend()
	l := &dataplane.Layered{Primary: sockets, Packets: packets}
	if hostNetNSOnly {
		l.PacketsServe = dp.ConfineToNodeNetNS
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// closingAlso is a datapath that also closes base when closed: the IPv6
// view's Layered and the programs' Dataplane under it, which a restart
// closes as a proxy process ending would.
type closingAlso struct {
	dataplane.Dataplane
	base io.Closer
}

func (c closingAlso) Close() error { return errors.Join(c.Dataplane.Close(), c.base.Close()) }

// Unwrap is the datapath under it, for socketLayer.
func (c closingAlso) Unwrap() dataplane.Dataplane { return c.Dataplane }

// bpfLeftovers describes the eBPF mode's programs and pins left, "" if none.
func bpfLeftovers(t *testing.T, s *setup) string {
	var left []string
	if n := testnet.AttachedPrograms(t, s.net.Cgroup); n > 0 {
		left = append(left, fmt.Sprintf("%d programs attached", n))
	}
	if _, err := os.Stat(s.bpffs); err == nil {
		left = append(left, "pin directory "+s.bpffs)
	}
	return strings.Join(left, ", ")
}

func iptablesMode(backend string) mode {
	m := mode{
		name: "iptables-" + backend,
		open: func(t *testing.T, s *setup) dataplane.Dataplane {
			t.Helper()
			cfg := s.iptablesConfig()
			cfg.Backend = backend
			dp, err := iptables.New(context.Background(), cfg)
			if err != nil {
				t.Fatalf("starting the iptables datapath: %v", err)
			}
			t.Cleanup(func() { dp.Close() })
			return dp
		},
		cleanup: func(s *setup) error { return iptables.Cleanup(context.Background(), s.iptablesConfig()) },
		leftovers: func(t *testing.T, s *setup) string {
			return strings.Join(iptablesLeftovers(t, s), "\n")
		},
		distinct: func(t *testing.T, s *setup) string {
			var left []string
			for _, l := range iptablesLeftovers(t, s) {
				// The ClusterIP rules: the eBPF mode's packet layer
				// writes none.
				if strings.Contains(l, " cluster IP\"") {
					left = append(left, l)
				}
			}
			return strings.Join(left, "\n")
		},
		takeover: func(s *setup) error { return ebpf.Cleanup(s.bpffs) },
	}
	// A dual-stack kube-proxy runs an iptables proxier per family.
	m.openBoth = func(t *testing.T, s4, s6 *setup) (dataplane.Dataplane, dataplane.Dataplane) {
		return m.open(t, s4), m.open(t, s6)
	}
	return m
}

// iptablesLeftovers lists the KUBE- rules of either backend in the node,
// in the tables of the setup's family (ip6tables for IPv6).
func iptablesLeftovers(t *testing.T, s *setup) []string {
	var left []string
	tool := "iptables-"
	if s.fam.v6() {
		tool = "ip6tables-"
	}
	for _, b := range []string{iptables.BackendNFT, iptables.BackendLegacy} {
		out, err := s.net.NodeCommand(context.Background(), tool+b+"-save").Output()
		if err != nil {
			t.Fatalf("%s%s-save: %v", tool, b, err)
		}
		if strings.Contains(string(out), "KUBE-") {
			left = append(left, b+" rules:\n"+string(out))
		}
	}
	return left
}

var modes = []mode{ebpfMode(), ebpfModeWith(true), iptablesMode(iptables.BackendNFT), iptablesMode(iptables.BackendLegacy)}

// forEachMode runs a scenario once per mode and IP family (subtests
// MODE/IPv4 and MODE/IPv6), each in a topology of its own: pods, Services
// and the datapath of that family only.
func forEachMode(t *testing.T, scenario func(t *testing.T, m mode)) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			forEachIPFamily(t, func(t *testing.T, f ipFamily) {
				m := m
				m.fam = f
				scenario(t, m)
			})
		})
	}
}

// ipFamily is the IP family a scenario runs in. Its addresses are written
// once, as IPv4 ones: ip gives the family's address for each.
type ipFamily struct {
	name  string
	model model.IPFamily
}

var ipFamilies = []ipFamily{{"IPv4", model.IPv4}, {"IPv6", model.IPv6}}

// forEachIPFamily runs a check once per IP family, as subtests IPv4 and
// IPv6. The two run in parallel: each has a topology of its own (network
// namespaces, cgroup and pins with random suffixes), and the suite's time
// is spent waiting far more than computing, so running both families
// costs little more time than running one did.
func forEachIPFamily(t *testing.T, check func(t *testing.T, f ipFamily)) {
	for _, f := range ipFamilies {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			check(t, f)
		})
	}
}

func (f ipFamily) v6() bool { return f.model == model.IPv6 }

// ip is the family's address for the scenario's IPv4 address v4: v4
// itself, or the IPv6 address whose groups spell its four numbers,
// fd00:A:B:C::D (10.244.1.1 is fd00:10:244:1::1), in fd00::/8 as testnet
// wants its IPv6 addresses.
func (f ipFamily) ip(v4 string) string {
	if !f.v6() {
		return v4
	}
	a := netip.MustParseAddr(v4).As4()
	return netip.MustParseAddr(fmt.Sprintf("fd00:%d:%d:%d::%d", a[0], a[1], a[2], a[3])).String()
}

// at is "ip:port" of the family's address for v4 ("[ip]:port" for IPv6).
func (f ipFamily) at(v4 string, port int) string {
	return netip.AddrPortFrom(netip.MustParseAddr(f.ip(v4)), uint16(port)).String()
}

// prefix is the family's prefix for IPv4 prefix v4, whose length is a
// multiple of 8: each IPv4 byte is an IPv6 group after fd00 (10.96.0.0/16
// is fd00:10:96::/48).
func (f ipFamily) prefix(v4 string) netip.Prefix {
	p := netip.MustParsePrefix(v4)
	if !f.v6() {
		return p
	}
	return netip.PrefixFrom(netip.MustParseAddr(f.ip(p.Addr().String())), 16+2*p.Bits())
}

// listen is the testnet serve helper's listen spec of proto ("tcp",
// "tcp-src", "udp") on port, on the family's sockets.
func (f ipFamily) listen(proto string, port int) string {
	if f.v6() {
		proto = strings.Replace(proto, "tcp", "tcp6", 1)
		proto = strings.Replace(proto, "udp", "udp6", 1)
	}
	return fmt.Sprintf("%s:%d", proto, port)
}

// nodeAddr is the node's address a pod sees connections masqueraded to
// (towards the pod: testnet's pod gateway over IPv4; over IPv6 the pod
// links have only the link-local fe80::1, and the kernel picks the node's
// global NodeAddress6).
func (f ipFamily) nodeAddr() string {
	if f.v6() {
		return testnet.NodeAddress6
	}
	return testnet.PodGateway
}

// setup is one scenario's topology: a node, a client pod, n server pods
// named pod-0.. serving their name on TCP 8080 and 9090 and UDP 5353.
type setup struct {
	fam ipFamily
	// vip is the family's VIP, bare (10.96.0.10, fd00:10:96::10).
	vip string
	// packetsBackend is the eBPF mode's packet layer's iptables backend.
	packetsBackend string
	net            *testnet.Net
	bpffs          string
	client         *testnet.Pod
	pods           []*testnet.Pod
	dp             dataplane.Dataplane
}

func newSetup(t *testing.T, m mode, servers int) *setup {
	t.Helper()
	s := newTopology(t, m.fam, servers)
	s.dp = m.open(t, s)
	return s
}

// newTopology is newSetup's topology of family f, with no datapath.
func newTopology(t *testing.T, f ipFamily, servers int) *setup {
	t.Helper()
	n := testnet.New(t)
	s := &setup{net: n, bpffs: testnet.BPFFS(t), fam: f, vip: f.ip(vip)}
	s.client = n.AddPod("client", f.ip("10.244.0.100"))
	// The service range leads on to "the network", as a node's default
	// route does: a namespace that drops what it gets. A packet must be
	// routable to reach the FORWARD chain, where iptables REJECTs
	// Services without endpoints; an untranslated VIP times out there.
	s.net.RouteToPod(f.prefix(serviceCIDR).String(), n.AddPod("world", f.ip("10.244.254.1")))
	s.pods = s.addServers(servers)
	// Whatever a scenario leaves, nothing of either mode outlives it.
	t.Cleanup(func() {
		if err := ebpf.Cleanup(s.bpffs); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return s
}

// addServers adds n pods named pod-0.. at 10.244.1.1.. (in the setup's
// family), each serving its name on TCP 8080 and 9090 and UDP 5353.
func (s *setup) addServers(n int) []*testnet.Pod {
	if !s.fam.v6() {
		return s.net.AddServers(n)
	}
	var pods []*testnet.Pod
	for i := range n {
		p := s.net.AddPod(fmt.Sprintf("pod-%d", i), s.fam.ip(fmt.Sprintf("10.244.1.%d", i+1)))
		p.Start(false, testnet.Helper("serve", p.Name, "tcp6:8080", "udp6:5353", "tcp6:9090")...)
		pods = append(pods, p)
	}
	return pods
}

// at is "ip:port" of the setup's family's address for v4.
func (s *setup) at(v4 string, port int) string { return s.fam.at(v4, port) }

func (s *setup) ebpfConfig() ebpf.Config {
	return ebpf.Config{BPFFSPath: s.bpffs, CgroupPath: s.net.Cgroup, MaxServices: 1024, MaxBackends: 4096, MaxSockets: 4096,
		NodeNetNS: "/run/netns/" + s.net.Node, NetNSDirs: []string{s.net.PodNetNSDir}}
}

func (s *setup) iptablesConfig() iptables.Config {
	return iptables.Config{NetNS: "/run/netns/" + s.net.Node, Family: s.fam.model, ClusterCIDR: s.fam.prefix(podCIDR)}
}

func (s *setup) backends(port int, pods ...*testnet.Pod) []string {
	return testnet.Backends(port, pods...)
}

func (s *setup) sync(t *testing.T, snap *model.Snapshot) {
	t.Helper()
	if err := s.dp.Sync(context.Background(), snap); err != nil {
		t.Fatalf("sync: %v", err)
	}
}

// run runs a helper client in the client pod and returns its result lines.
func (s *setup) run(t *testing.T, args ...string) []string {
	t.Helper()
	return s.client.Results(args...)
}

const (
	vip         = "10.96.0.10"
	serviceCIDR = "10.96.0.0/16"
)

var (
	webName = model.ServiceName{Namespace: "default", Name: "web"}
	podCIDR = "10.244.0.0/16"
)

// web is Service default/web, TCP port 80 at the setup's VIP.
func (s *setup) web(backends ...string) model.ServicePort {
	return apitest.ServicePort("default", "web", "http", model.TCP, s.at(vip, 80), backends...)
}

// dns is Service kube-system/dns, UDP port 53 at the setup's VIP.
func (s *setup) dns(backends ...string) model.ServicePort {
	return apitest.ServicePort("kube-system", "dns", "dns", model.UDP, s.at(vip, 53), backends...)
}

// socketFamily is how a client reaches the VIP. An IPv4 VIP: an AF_INET
// socket by its address, an AF_INET6 one (IPV6_V6ONLY off, as Java's by
// default) as ::ffff:VIP, which runs the kernel's *6 socket hooks; the
// iptables modes see IPv4 packets either way, the eBPF mode must translate
// in both. An IPv6 VIP: an AF_INET6 socket by its address, the only way.
type socketFamily struct {
	name     string
	tcp, udp string // the testnet client helpers
	vip      string // the VIP as the socket names it, and as replies show it
}

// forEachSocketFamily runs a check once per socket family that reaches
// the setup's VIP.
func (s *setup) forEachSocketFamily(t *testing.T, check func(t *testing.T, f socketFamily)) {
	families := []socketFamily{
		{"AF_INET", "tcp", "udp", vip},
		{"AF_INET6", "tcp6", "udp6", mappedVIP},
	}
	if s.fam.v6() {
		// The tcp and udp helpers open AF_INET6 sockets for an IPv6 address.
		families = []socketFamily{{"AF_INET6", "tcp", "udp", "[" + s.vip + "]"}}
	}
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) { check(t, f) })
	}
}

func TestTCPSpreadsOverBackendsAndPeerIsTheVIP(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 3)
		s.sync(t, apitest.Snapshot(true, s.web(s.backends(8080, s.pods...)...)))
		s.forEachSocketFamily(t, func(t *testing.T, f socketFamily) {
			lines := s.run(t, f.tcp, f.vip+":80", "60")
			got := testnet.Tally(lines)
			for _, p := range s.pods {
				if got["ok "+p.Name] == 0 {
					t.Errorf("no connection reached %s in 60: %v", p.Name, got)
				}
			}
			if len(got) != 3 {
				t.Errorf("results other than the three backends: %v", got)
			}
			// getpeername() answers the VIP: the eBPF mode translates it
			// back in getpeername4/6, the iptables mode never changes the
			// socket.
			for _, l := range lines {
				if !strings.HasSuffix(l, "peer="+f.vip+":80") {
					t.Fatalf("getpeername did not return the VIP: %q", l)
				}
			}
		})
	})
}

func TestUDPOneBackendPerSocketRepliesFromTheVIP(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 3)
		s.sync(t, apitest.Snapshot(true, s.dns(s.backends(5353, s.pods...)...)))
		s.forEachSocketFamily(t, func(t *testing.T, f socketFamily) {
			for _, kind := range []string{"unconnected", "connected"} {
				args := []string{f.udp, f.vip + ":53", "10"}
				if kind == "connected" {
					args = append(args, "connected")
				}
				lines := s.run(t, args...)
				// One backend per socket: conntrack keeps the flow's
				// translation; the eBPF mode hashes the socket.
				if got := testnet.Tally(lines); len(got) != 1 {
					t.Errorf("%s: answers of one socket came from %d places, want 1: %v", kind, len(got), got)
				}
				for _, l := range lines {
					if !strings.HasPrefix(l, "ok pod-") || !strings.HasSuffix(l, "peer="+f.vip+":53 from="+f.vip+":53") {
						t.Errorf("%s: reply does not come from the VIP: %q", kind, l)
					}
				}
			}
			seen := map[string]bool{}
			for range 20 {
				for k := range testnet.Tally(s.run(t, f.udp, f.vip+":53", "1")) {
					seen[k] = true
				}
			}
			if len(seen) < 2 {
				t.Errorf("20 sockets all used one backend: %v", seen)
			}
		})
	})
}

func TestDigThroughClusterIP(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 0)
		var dnsPods []*testnet.Pod
		for i := range 2 {
			p := s.net.AddPod(fmt.Sprintf("dns-%d", i), s.fam.ip(fmt.Sprintf("10.244.2.%d", i+1)))
			p.StartDNS("web.kbp.test", "10.96.7.7")
			dnsPods = append(dnsPods, p)
		}
		s.sync(t, apitest.Snapshot(true,
			apitest.ServicePort("kube-system", "dns", "dns", model.UDP, s.at(vip, 53), s.backends(53, dnsPods...)...),
			apitest.ServicePort("kube-system", "dns", "dns-tcp", model.TCP, s.at(vip, 53), s.backends(53, dnsPods...)...)))
		for _, transport := range []string{"+notcp", "+tcp"} {
			for range 5 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				out, err := s.client.Output(ctx, "dig", "@"+s.vip, "web.kbp.test", "A", transport, "+tries=1", "+timeout=2")
				cancel()
				if err != nil {
					t.Fatal(err)
				}
				if strings.Contains(out, "unexpected source") {
					t.Fatalf("dig %s saw the backend's address:\n%s", transport, out)
				}
				if !strings.Contains(out, "status: NOERROR") || !strings.Contains(out, "10.96.7.7") || !strings.Contains(out, "SERVER: "+s.vip+"#53") {
					t.Fatalf("dig %s did not get the answer from the VIP:\n%s", transport, out)
				}
			}
		}
	})
}

func TestSamePortTCPAndUDPAreDifferentServices(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		s.sync(t, apitest.Snapshot(true,
			apitest.ServicePort("default", "mixed", "tcp", model.TCP, s.at(vip, 53), s.backends(9090, s.pods[0])...),
			apitest.ServicePort("default", "mixed", "udp", model.UDP, s.at(vip, 53), s.backends(5353, s.pods[1])...)))
		if got := testnet.Tally(s.run(t, "tcp", s.at(vip, 53), "5")); got["ok pod-0"] != 5 {
			t.Errorf("TCP to :53 went elsewhere than pod-0:9090: %v", got)
		}
		if got := testnet.Tally(s.run(t, "udp", s.at(vip, 53), "5")); got["ok pod-1"] != 5 {
			t.Errorf("UDP to :53 went elsewhere than pod-1:5353: %v", got)
		}
	})
}

// A Service without endpoints refuses at once instead of timing out.
func TestNoEndpointsRefusesAtOnce(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 0)
		s.sync(t, apitest.Snapshot(true,
			apitest.ServicePort("default", "empty", "http", model.TCP, s.at(vip, 80)),
			apitest.ServicePort("default", "empty", "dns", model.UDP, s.at(vip, 53))))
		s.forEachSocketFamily(t, func(t *testing.T, f socketFamily) {
			expect := func(args []string, want string, n int) {
				t.Helper()
				lines := s.run(t, args...)
				if len(lines) != n {
					t.Errorf("%v: %d results %q, want %d", args, len(lines), lines, n)
				}
				for _, l := range lines {
					if l != want {
						t.Errorf("%v: got %q, want %q", args, l, want)
					}
				}
			}
			// TCP: connect() fails with ECONNREFUSED in both modes (the eBPF
			// program sets it; iptables REJECTs with icmp-port-unreachable).
			expect([]string{f.tcp, f.vip + ":80", "3"}, "err connection refused", 3)
			if m.socketLevel {
				// connect() of a UDP socket is refused, which ends the
				// client; so is every sendmsg() of an unconnected one.
				expect([]string{f.udp, f.vip + ":53", "3", "connected"}, "err connection refused", 1)
				expect([]string{f.udp, f.vip + ":53", "3"}, "err connection refused", 3)
				return
			}
			// Differs by nature: iptables acts on packets. A UDP connect()
			// sends nothing and succeeds; the REJECT's ICMP error then fails
			// each read of the connected socket. Linux reports ICMP errors
			// only to connected UDP sockets (or with IP_RECVERR), so an
			// unconnected one waits out its own timeout, as with kube-proxy.
			expect([]string{f.udp, f.vip + ":53", "3", "connected"}, "err connection refused", 3)
			t.Log("iptables: an unconnected UDP socket is not told of the REJECT and times out (Linux reports ICMP errors only to connected sockets)")
			expect([]string{f.udp, f.vip + ":53", "1"}, "err timeout", 1)
		})
	})
}

// Endpoints change while a client connects in a loop: no connect fails.
func TestChurnLosesNoConnect(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 3)
		all := s.backends(8080, s.pods...)
		s.sync(t, apitest.Snapshot(true, s.web(all...)))
		loop := s.client.StartLoop(s.at(vip, 80))
		defer loop.Stop()

		for round := range 3 {
			testnet.AssertAllOK(t, fmt.Sprintf("round %d with 3", round), loop.Take(20), "pod-0", "pod-1", "pod-2")
			s.sync(t, apitest.Snapshot(false, s.web(all[1])))
			// Connects under way during the sync may still reach a
			// removed backend; none may fail. Then only pod-1 answers.
			testnet.AssertAllOK(t, fmt.Sprintf("round %d, scaling to 1", round), loop.Settle(), "pod-0", "pod-1", "pod-2")
			testnet.AssertAllOK(t, fmt.Sprintf("round %d with 1", round), loop.Take(20), "pod-1")
			s.sync(t, apitest.Snapshot(false, s.web(all...)))
			testnet.AssertAllOK(t, fmt.Sprintf("round %d, scaling to 3", round), loop.Settle(), "pod-0", "pod-1", "pod-2")
		}

		// A deleted Service is no longer known: the VIP dies in the
		// namespaces. Re-creating it serves again.
		s.sync(t, apitest.Deleted(apitest.Snapshot(false), webName))
		loop.Settle()
		if l := loop.Take(1); strings.HasPrefix(l[0], "ok ") {
			t.Errorf("deleted Service still served: %q", l[0])
		}
		s.sync(t, apitest.Snapshot(false, s.web(all...)))
		loop.Settle()
		testnet.AssertAllOK(t, "re-created", loop.Take(20), "pod-0", "pod-1", "pod-2")
	})
}

// The datapath keeps serving while the proxy is down, and a new process
// converges on what changed meanwhile.
func TestRestartKeepsServingAndConverges(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		other := apitest.ServicePort("default", "other", "http", model.TCP, s.at("10.96.0.11", 80), s.backends(9090, s.pods[0])...)
		gone := apitest.ServicePort("default", "gone", "http", model.TCP, s.at("10.96.0.12", 80), s.backends(9090, s.pods[1])...)
		udp := s.dns(s.backends(5353, s.pods...)...)
		s.sync(t, apitest.Snapshot(true, s.web(s.backends(8080, s.pods...)...), gone, udp))
		loop := s.client.StartLoop(s.at(vip, 80))
		// A socket that lives across the restart, as a resolver's does: it
		// keeps its backend and its replies keep showing the VIP.
		resolver := s.client.StartResolver(s.at(vip, 53))
		defer resolver.Stop()
		s.dp.Close()
		testnet.AssertAllOK(t, "while down", loop.Take(30), "pod-0", "pod-1")

		s.dp = m.open(t, s)
		s.sync(t, apitest.Snapshot(true, s.web(s.backends(8080, s.pods[1])...), other, udp))
		loop.Settle()
		testnet.AssertAllOK(t, "after restart", loop.Take(20), "pod-1")
		loop.Stop()
		resolver.Settle()
		for _, l := range resolver.Take(10) {
			r, err := testnet.ParseResolverResult(l)
			if err != nil {
				t.Fatal(err)
			}
			if r.Backend == "" || r.Gen != 1 || r.From != s.at(vip, 53) {
				t.Errorf("a resolver's socket across the restart: %q, want answers from the VIP on its first socket", l)
			}
		}
		if got := testnet.Tally(s.run(t, "tcp", s.at("10.96.0.11", 80), "3")); got["ok pod-0"] != 3 {
			t.Errorf("service created while down: %v", got)
		}
		if l := s.run(t, "tcp", s.at("10.96.0.12", 80), "1")[0]; strings.HasPrefix(l, "ok ") {
			t.Errorf("service deleted while down still served: %q", l)
		}
	})
}

func TestCleanupRemovesEverything(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 1)
		s.sync(t, apitest.Snapshot(true, s.web(s.backends(8080, s.pods...)...), s.dns()))
		if left := m.leftovers(t, s); left == "" {
			t.Fatal("nothing of the datapath found before cleanup: the check cannot fail")
		}
		s.dp.Close()
		if err := m.cleanup(s); err != nil {
			t.Fatal(err)
		}
		if left := m.leftovers(t, s); left != "" {
			t.Errorf("left after cleanup: %s", left)
		}
		if l := s.run(t, "tcp", s.at(vip, 80), "1")[0]; strings.HasPrefix(l, "ok ") {
			t.Errorf("VIP still served after cleanup: %q", l)
		}
	})
}

// A pod reaching itself through its own Service.
func TestHairpin(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 0)
		s.client.Start(false, testnet.Helper("serve", "client", s.fam.listen("tcp", 8080))...)
		s.sync(t, apitest.Snapshot(true, s.web(s.backends(8080, s.client)...)))
		// iptables DNATs the packet back out to the pod it came from, so it
		// must also masquerade it (KUBE-SEP's -s rule), or the pod would
		// see its own address as the source and drop the packet. The eBPF
		// mode connects the socket to the pod's own address directly.
		if got := testnet.Tally(s.run(t, "tcp", s.at(vip, 80), "5")); got["ok client"] != 5 {
			t.Errorf("pod through its own Service: %v", got)
		}
	})
}

// ClusterIP traffic from outside the cluster CIDR is masqueraded in the
// iptables mode, so that the reply comes back through the node that
// translated it; pod-to-pod traffic keeps its source. The eBPF mode
// connects the socket to the pod directly: nothing is translated on the
// way, so nothing needs masquerading and every pod sees the real client.
func TestMasqueradeFromOutsideClusterCIDR(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 1)
		s.pods[0].Start(false, testnet.Helper("serve", "pod-0", s.fam.listen("tcp-src", 8081))...)
		outside := s.net.AddPod("outside", s.fam.ip("192.168.77.1"))
		s.sync(t, apitest.Snapshot(true, s.web(s.backends(8081, s.pods[0])...)))
		seen := func(client *testnet.Pod) string {
			t.Helper()
			out := client.Results("tcp", s.at(vip, 80), "1")[0]
			f := strings.Fields(out)
			if len(f) < 3 || f[0] != "ok" || !strings.HasPrefix(f[2], "src=") {
				t.Fatalf("from %s: %q", client.Name, out)
			}
			return strings.TrimPrefix(f[2], "src=")
		}
		if got := seen(s.client); got != s.client.IP.String() {
			t.Errorf("a pod in the cluster CIDR was seen as %s, want its own address %s", got, s.client.IP)
		}
		want := s.fam.nodeAddr() // the node's address towards the backend
		if m.socketLevel {
			want = outside.IP.String()
		}
		if got := seen(outside); got != want {
			t.Errorf("a client outside the cluster CIDR was seen as %s, want %s", got, want)
		}
	})
}

// A UDP client that keeps its source port (as resolvers retrying do) must
// follow endpoint changes: in iptables mode that needs the conntrack
// entries of removed backends deleted; the eBPF mode picks a backend at
// every sendmsg() of an unconnected socket.
func TestUDPFlowFollowsRemovedBackend(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		s.sync(t, apitest.Snapshot(true, s.dns(s.backends(5353, s.pods...)...)))
		const lport = "lport=40053"
		first := testnet.Tally(s.run(t, "udp", s.at(vip, 53), "3", lport))
		var used, other *testnet.Pod
		switch {
		case first["ok pod-0"] == 3:
			used, other = s.pods[0], s.pods[1]
		case first["ok pod-1"] == 3:
			used, other = s.pods[1], s.pods[0]
		default:
			t.Fatalf("first requests: %v, want all three from one pod", first)
		}
		s.sync(t, apitest.Snapshot(false, s.dns(s.backends(5353, other)...)))
		if got := testnet.Tally(s.run(t, "udp", s.at(vip, 53), "3", lport)); got["ok "+other.Name] != 3 {
			t.Errorf("after %s was removed, the same flow got %v, want %s only", used.Name, got, other.Name)
		}
	})
}

// A UDP client whose first packets left before its Service had endpoints
// (here: before it existed, routed on to the network, which drops them) must reach
// the first endpoint once there is one: in iptables mode the untranslated
// conntrack entry would otherwise keep the flow off the DNAT rules for as
// long as the client keeps sending.
func TestUDPFlowReachesFirstEndpoint(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 1)
		s.sync(t, apitest.Snapshot(true))
		const lport = "lport=40054"
		if got := s.run(t, "udp", s.at(vip, 53), "1", lport); got[0] != "err timeout" {
			t.Fatalf("before the Service exists: %q, want a timeout", got)
		}
		s.sync(t, apitest.Snapshot(false, s.dns(s.backends(5353, s.pods[0])...)))
		if got := testnet.Tally(s.run(t, "udp", s.at(vip, 53), "3", lport)); got["ok pod-0"] != 3 {
			t.Errorf("the flow that started before the first endpoint: %v, want pod-0 only", got)
		}
	})
}

// Switching modes is make-before-break: the new mode serves before the old
// one is removed, a client connecting in a loop sees no failure, and
// nothing of the old mode is left.
func TestModeSwitchBothWays(t *testing.T) {
	for _, c := range []struct{ from, to mode }{
		{ebpfMode(), iptablesMode(iptables.BackendNFT)},
		{ebpfMode(), iptablesMode(iptables.BackendLegacy)},
		{iptablesMode(iptables.BackendNFT), ebpfMode()},
		{iptablesMode(iptables.BackendLegacy), ebpfMode()},
	} {
		t.Run(c.from.name+"-to-"+c.to.name, func(t *testing.T) {
			forEachIPFamily(t, func(t *testing.T, f ipFamily) {
				// A copy each: the families run in parallel.
				from, to := c.from, c.to
				from.fam, to.fam = f, f
				modeSwitch(t, from, to)
			})
		})
	}
}

// modeSwitch switches a node from one mode to the other, as main does.
func modeSwitch(t *testing.T, from, to mode) {
	s := newSetup(t, from, 2)
	snap := apitest.Snapshot(true, s.web(s.backends(8080, s.pods...)...))
	s.sync(t, snap)
	loop := s.client.StartLoop(s.at(vip, 80))
	defer loop.Stop()
	testnet.AssertAllOK(t, "before", loop.Take(20), "pod-0", "pod-1")
	s.dp.Close()

	// What main does: the new mode, wrapped to remove the old one once it
	// serves.
	s.dp = dataplane.WithHandover(to.open(t, s), from.name, func(context.Context) error { return to.takeover(s) })
	s.sync(t, snap)
	testnet.AssertAllOK(t, "across the switch", loop.Settle(), "pod-0", "pod-1")
	testnet.AssertAllOK(t, "after", loop.Take(20), "pod-0", "pod-1")
	if left := from.distinct(t, s); left != "" {
		t.Errorf("left of %s after switching to %s: %s", from.name, to.name, left)
	}
	if left := to.distinct(t, s); left == "" {
		t.Errorf("nothing of %s found after switching to it", to.name)
	}
}
