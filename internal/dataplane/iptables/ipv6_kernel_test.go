package iptables

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The IPv6 proxy's rules with the real ip6tables, in a test's namespaces:
// the node's, and pods given an IPv6 address each besides testnet's IPv4
// one. The node is their router: its address on every pod link is
// v6Gateway, which is also the node port address the pods reach.
const (
	v6Gateway   = "fd00:10:244:ffff::fe"
	v6PodsRange = "fd00:10:244::/48"
)

// v6Env is a node with a client pod and two server pods over IPv6.
type v6Env struct {
	n       *testnet.Net
	ns      string
	client  *testnet.Pod
	servers []*testnet.Pod
	// ip6 is each pod's IPv6 address, by name.
	ip6 map[string]string
	d   *Dataplane
}

func nsRun(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// addIPv6 gives pod p address ip, routed through the node.
func addIPv6(t *testing.T, n *testnet.Net, p *testnet.Pod, ip string) {
	t.Helper()
	// nodad: the addresses are usable at once, not after duplicate
	// address detection.
	nsRun(t, "ip", "-n", n.Node, "-6", "addr", "add", v6Gateway+"/128", "dev", p.HostIf, "nodad")
	nsRun(t, "ip", "-n", n.Node, "-6", "route", "add", ip+"/128", "dev", p.HostIf)
	nsRun(t, "ip", "-n", p.NS, "-6", "addr", "add", ip+"/128", "dev", "eth0", "nodad")
	nsRun(t, "ip", "-n", p.NS, "-6", "route", "add", v6Gateway+"/128", "dev", "eth0")
	nsRun(t, "ip", "-n", p.NS, "-6", "route", "add", "default", "via", v6Gateway, "dev", "eth0")
	// The links' own link-local addresses still go through duplicate
	// address detection, and until it ends neighbour discovery on the
	// link stalls: the first connection would time out.
	for _, ns := range []string{n.Node, p.NS} {
		waitNoTentative(t, ns)
	}
}

// waitNoTentative waits until no IPv6 address of namespace ns is tentative.
func waitNoTentative(t *testing.T, ns string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := exec.Command("ip", "-n", ns, "-6", "addr", "show", "tentative").CombinedOutput()
		if err != nil {
			t.Fatalf("ip -n %s -6 addr show tentative: %v: %s", ns, err, out)
		}
		if len(strings.TrimSpace(string(out))) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("addresses of %s still tentative after 10s:\n%s", ns, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func newV6Env(t *testing.T, backend string) *v6Env {
	t.Helper()
	return newV6EnvWith(t, Config{Backend: backend})
}

// newV6EnvWith is newV6Env with the datapath's configuration (its family,
// namespace, pods' range and lock file are the environment's).
func newV6EnvWith(t *testing.T, cfg Config) *v6Env {
	t.Helper()
	n := testnet.New(t)
	e := &v6Env{n: n, ns: "/run/netns/" + n.Node, ip6: map[string]string{}}
	nsRun(t, "ip", "netns", "exec", n.Node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	// As the IPv4 ICMP limit testnet lifts: every refusal gets its
	// ICMPv6 error.
	nsRun(t, "ip", "netns", "exec", n.Node, "sysctl", "-qw", "net.ipv6.icmp.ratelimit=0")
	e.client = n.AddPod("client", "10.244.1.10")
	addIPv6(t, n, e.client, "fd00:10:244:1::10")
	e.ip6["client"] = "fd00:10:244:1::10"
	// The service range leads somewhere, so that packets to it reach
	// FORWARD, where a REJECT lives (an unroutable one is answered
	// "network unreachable" before): back to the client, which drops
	// what is not its own.
	nsRun(t, "ip", "-n", n.Node, "-6", "route", "add", "fd00:10:96::/112", "via", e.ip6["client"], "dev", e.client.HostIf)
	for i, name := range []string{"pod-a", "pod-b"} {
		p := n.AddPod(name, fmt.Sprintf("10.244.1.%d", i+1))
		ip := fmt.Sprintf("fd00:10:244:1::%d", i+1)
		addIPv6(t, n, p, ip)
		e.ip6[name] = ip
		p.Start(false, testnet.Helper("serve", p.Name, "tcp6:8080", "udp6:5353")...)
		e.servers = append(e.servers, p)
	}
	cfg.Family, cfg.NetNS, cfg.ClusterCIDR, cfg.LockFile = model.IPv6, e.ns, netip.MustParsePrefix(v6PodsRange), t.TempDir()+"/xtables.lock"
	e.d = open(t, cfg)
	return e
}

// node is the IPv6 node: node ports on every local address.
func (e *v6Env) node() model.NodeInfo {
	gw := netip.MustParseAddr(v6Gateway)
	return model.NodeInfo{AllLocalAddresses: true, NodePortAddresses: []netip.Addr{gw},
		LocalAddresses: []netip.Addr{netip.IPv6Loopback(), gw}}
}

func (e *v6Env) sync(t *testing.T, ports ...model.ServicePort) error {
	t.Helper()
	s := snap(true, ports...)
	s.Node = e.node()
	return e.d.Sync(context.Background(), s)
}

// v6Port is a TCP service port default/name on [vip]:80 with the named
// servers as endpoints (port 8080), and a node port if nodePort is set.
func (e *v6Env) v6Port(name, vip string, nodePort uint16, servers ...string) model.ServicePort {
	var backends []string
	for _, s := range servers {
		backends = append(backends, "["+e.ip6[s]+"]:8080")
	}
	p := sp(name, "", model.TCP, "["+vip+"]:80", backends...)
	// externalTrafficPolicy Cluster: the node port's endpoints are the
	// Cluster ones, which apitest fills.
	p.External.NodePort = nodePort
	return p
}

// ask6 makes n TCP connections from the client to addr over IPv6 and
// returns who answered each ("pod-a") or the error.
func (e *v6Env) ask6(t *testing.T, addr string, n int) []string {
	t.Helper()
	var out []string
	for _, l := range e.client.Results("tcp6", addr, fmt.Sprint(n)) {
		if strings.HasPrefix(l, "ok ") {
			l, _, _ = strings.Cut(strings.TrimPrefix(l, "ok "), " ")
		}
		out = append(out, l)
	}
	return out
}

func only(lines []string, want string) bool {
	return len(lines) > 0 && !slices.ContainsFunc(lines, func(l string) bool { return l != want })
}

// ClusterIP, node port, session affinity and a port without endpoints over
// real IPv6 with ip6tables, both backends; a restore the kernel refuses
// keeps the rules applied before, and the next sync applies the change.
func TestKernelIPv6Traffic(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			e := newV6Env(t, b)
			web := e.v6Port("web", "fd00:10:96::80", 30080, "pod-a")
			sticky := e.v6Port("sticky", "fd00:10:96::81", 0, "pod-a", "pod-b")
			sticky.Affinity = 10 * time.Minute
			empty := e.v6Port("empty", "fd00:10:96::82", 0)
			if err := e.sync(t, web, sticky, empty); err != nil {
				t.Fatal(err)
			}
			save := saveTables6(t, e.ns, b)
			// As ip6tables-save prints what was written: REJECT's IPv6
			// default, host addresses as /128, the recent match's
			// IPv6 mask.
			for _, want := range []string{"-A KUBE-SERVICES ! -d ::1/128 -m comment", "--reject-with icmp6-port-unreachable",
				"--to-destination [" + e.ip6["pod-a"] + "]:8080", "-s " + e.ip6["pod-a"] + "/128 -m comment",
				"--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource"} {
				if !strings.Contains(save, want) {
					t.Errorf("ip6tables-%s-save has no %q:\n%s", b, want, save)
				}
			}
			if strings.Contains(saveTables(t, e.ns, b), "KUBE-SERVICES") {
				t.Error("the IPv6 datapath wrote IPv4 rules")
			}

			if got := e.ask6(t, "[fd00:10:96::80]:80", 3); !only(got, "pod-a") {
				t.Errorf("ClusterIP over IPv6: %v, want pod-a", got)
			}
			if got := e.ask6(t, "["+v6Gateway+"]:30080", 3); !only(got, "pod-a") {
				t.Errorf("node port over IPv6: %v, want pod-a", got)
			}
			got := e.ask6(t, "[fd00:10:96::81]:80", 8)
			if !only(got, "pod-a") && !only(got, "pod-b") {
				t.Errorf("ClientIP affinity over IPv6: %v, want one pod for all", got)
			}
			if got := e.ask6(t, "[fd00:10:96::82]:80", 1); len(got) != 1 || !strings.Contains(got[0], "connection refused") {
				t.Errorf("a port without endpoints: %v, want connection refused (icmp6-port-unreachable)", got)
			}

			// Someone else's rule jumps to web's endpoint chain: moving
			// web to pod-b would delete that chain, which the kernel
			// refuses, so the restore fails and changes nothing.
			sep := endpointChain(web.Name, web.Backends[0])
			nsRun(t, "nsenter", "--net="+e.ns, "--", "ip6tables-"+b, "-t", "nat", "-N", "OTHER")
			nsRun(t, "nsenter", "--net="+e.ns, "--", "ip6tables-"+b, "-t", "nat", "-A", "OTHER", "-j", sep)
			moved := e.v6Port("web", "fd00:10:96::80", 30080, "pod-b")
			if err := e.sync(t, moved, sticky, empty); err == nil {
				t.Fatal("a sync deleting a chain in use succeeded")
			} else if !strings.Contains(err.Error(), "ip6tables-"+b+"-restore") {
				t.Errorf("the error does not name ip6tables-%s-restore: %v", b, err)
			}
			if got := e.ask6(t, "[fd00:10:96::80]:80", 3); !only(got, "pod-a") {
				t.Errorf("after the failed restore: %v, want pod-a, the rules applied before", got)
			}
			nsRun(t, "nsenter", "--net="+e.ns, "--", "ip6tables-"+b, "-t", "nat", "-F", "OTHER")
			if err := e.sync(t, moved, sticky, empty); err != nil {
				t.Fatal(err)
			}
			if got := e.ask6(t, "[fd00:10:96::80]:80", 3); !only(got, "pod-b") {
				t.Errorf("after the next sync: %v, want pod-b", got)
			}

			// Cleanup removes the ip6tables rules with the iptables ones.
			if err := Cleanup(context.Background(), Config{NetNS: e.ns}); err != nil {
				t.Fatal(err)
			}
			for _, c := range []string{"KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-PROXY-CANARY"} {
				if s := saveTables6(t, e.ns, b); strings.Contains(s, c) {
					t.Errorf("after Cleanup, ip6tables still has %s:\n%s", c, s)
				}
			}
		})
	}
}

func saveTables6(t *testing.T, ns, backend string) string {
	t.Helper()
	out, err := inNS(ns, "ip6tables-"+backend+"-save").Output()
	if err != nil {
		t.Fatalf("ip6tables-%s-save: %v", backend, err)
	}
	return string(out)
}

// A UDP client over IPv6 that keeps its source port across changes (a
// resolver's socket) reaches what the ClusterIP and the node port serve
// now: its flows begun before the Service had endpoints, and those to an
// endpoint that is gone, are deleted from the kernel's IPv6 conntrack
// table, as kube-proxy's IPv6 proxier does.
func TestKernelIPv6UDPStaleFlows(t *testing.T) {
	e := newV6Env(t, BackendNFT)
	dns := func(servers ...string) model.ServicePort {
		var backends []string
		for _, s := range servers {
			backends = append(backends, "["+e.ip6[s]+"]:5353")
		}
		p := sp("dns", "dns", model.UDP, "[fd00:10:96::53]:53", backends...)
		p.External.NodePort = 30053
		return p
	}
	// One socket each, kept for the whole test, in the client pod.
	var conns []*net.UDPConn
	for _, lport := range []int{40053, 40054} {
		var c *net.UDPConn
		err := netnsenter.Do("/run/netns/"+e.client.NS, func() error {
			var err error
			c, err = net.ListenUDP("udp6", &net.UDPAddr{IP: net.ParseIP(e.ip6["client"]), Port: lport})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
	}
	send := func(c *net.UDPConn, to string) string {
		t.Helper()
		if _, err := c.WriteToUDPAddrPort([]byte("hello"), netip.MustParseAddrPort(to)); err != nil {
			return "err " + err.Error()
		}
		buf := make([]byte, 512)
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return "err timeout"
			}
			return "err " + err.Error()
		}
		return string(buf[:n])
	}
	clusterIP, nodePort := conns[0], conns[1]
	vip, np := "[fd00:10:96::53]:53", "["+v6Gateway+"]:30053"

	if err := e.sync(t); err != nil {
		t.Fatal(err)
	}
	// Before the Service: the flows are the node's own (no answer).
	for c, to := range map[*net.UDPConn]string{clusterIP: vip, nodePort: np} {
		if got := send(c, to); !strings.HasPrefix(got, "err ") {
			t.Fatalf("to %s before the Service: %q, want no answer", to, got)
		}
	}
	if err := e.sync(t, dns("pod-a")); err != nil {
		t.Fatal(err)
	}
	// The node port's flow was the node's own (answered with an ICMPv6
	// error), the ClusterIP's routed back to the client untranslated.
	if ran, _, deleted := e.d.LastConntrackCleanup(); !ran || deleted != 2 {
		t.Errorf("the cleanup ran %v and deleted %d flows, want the two untranslated ones", ran, deleted)
	}
	for c, to := range map[*net.UDPConn]string{clusterIP: vip, nodePort: np} {
		if got := send(c, to); got != "pod-a" {
			t.Errorf("to %s once the Service has its endpoint: %q, want pod-a", to, got)
		}
	}
	if err := e.sync(t, dns("pod-b")); err != nil {
		t.Fatal(err)
	}
	for c, to := range map[*net.UDPConn]string{clusterIP: vip, nodePort: np} {
		if got := send(c, to); got != "pod-b" {
			t.Errorf("to %s after the endpoint moved: %q, want pod-b", to, got)
		}
	}
}

// The eBPF mode's IPv6 packet layer (the iptables datapath, external
// only): the node port over IPv6, no ClusterIP rule, and its canary, which
// the check lists with ip6tables.
func TestKernelIPv6PacketLayer(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			e := newV6EnvWith(t, Config{Backend: b, ExternalOnly: true})
			web := e.v6Port("web", "fd00:10:96::80", 30080, "pod-a")
			internal := e.v6Port("internal", "fd00:10:96::81", 0, "pod-b")
			if err := e.sync(t, web, internal); err != nil {
				t.Fatal(err)
			}
			if got := e.ask6(t, "["+v6Gateway+"]:30080", 3); !only(got, "pod-a") {
				t.Errorf("node port over IPv6: %v, want pod-a", got)
			}
			save := saveTables6(t, e.ns, b)
			if strings.Contains(save, "cluster IP") || strings.Contains(save, "default/internal") {
				t.Errorf("the packet layer has ClusterIP rules:\n%s", save)
			}
			ctx := context.Background()
			if ok, err := e.d.Intact(ctx); err != nil || !ok {
				t.Fatalf("Intact = %v, %v; want true", ok, err)
			}
			e.d.flushWait, e.d.flushPoll = time.Second, 10*time.Millisecond
			for _, table := range canaryTables(true) {
				nsRun(t, "nsenter", "--net="+e.ns, "--", "ip6tables-"+b, "-t", table, "-X", chainPacketsCanary)
			}
			if ok, err := e.d.Intact(ctx); err != nil || ok {
				t.Errorf("Intact after the canary went = %v, %v; want false", ok, err)
			}
		})
	}
}

// A pods' range of the other family (a single-stack --cluster-cidr given
// to both families' datapaths) detects nothing in this one, as kube-proxy's
// per-family detectors: an IPv4 range in ip6tables' input would fail every
// restore.
func TestKernelIPv6IgnoresAnIPv4PodRange(t *testing.T) {
	ns := nodeNS(t)
	d := open(t, Config{Family: model.IPv6, Backend: BackendNFT, NetNS: ns, ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16")})
	mustSync(t, d, snap(true, sp("a", "http", model.TCP, "[fd00::1]:80", "[fd00:1::1]:8080")))
	if save := saveTables6(t, ns, BackendNFT); strings.Contains(save, "10.244.0.0") || strings.Contains(save, "! -s") {
		t.Errorf("the IPv6 rules detect local traffic by an IPv4 range:\n%s", save)
	}
}
