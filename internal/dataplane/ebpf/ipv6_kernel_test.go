package ebpf

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The IPv6 Services' datapath (Dataplane.IPv6), against the kernel. The
// backends are servers in the client pod itself, on an IPv6 address of its
// loopback (backendIP6) and a port each: the programs translate at
// connect() and sendmsg(), wherever the backend is, and a local address
// needs no IPv6 routes in the test topology. Not ::1: the socket cleanup
// rightly leaves a pod's sockets to its own loopback alone.

const (
	vip6       = "fd00:96::10"
	backendIP6 = "fd00:244::1"
)

// kernelNode6 serves node ports on an IPv6 address of the node's (fd00:ffff::1,
// which only the programs need to know) and on [::1], named for node ports
// too, as a user may.
var kernelNode6 = model.NodeInfo{
	NodePortAddresses: addrs("fd00:ffff::1", "::1"),
	LocalAddresses:    addrs("fd00:ffff::1", "::1"),
	ServiceCIDRs:      []netip.Prefix{netip.MustParsePrefix("fd00:96::/112")},
}

type ipv6Setup struct {
	*kernelSetup
	v6 dataplane.Dataplane
	// tcp and udp are the backends, "[backendIP6]:port", of pod-0 and pod-1.
	tcp, udp []string
}

func newIPv6Setup(t *testing.T) *ipv6Setup {
	t.Helper()
	s := &ipv6Setup{kernelSetup: newKernelSetup(t, 0)}
	v6, err := s.dp.IPv6()
	if err != nil {
		t.Fatalf("opening the IPv6 view: %v", err)
	}
	t.Cleanup(func() { v6.Close() })
	s.v6 = v6
	s.client.AddLoopbackAddress(backendIP6 + "/128")
	for i, ports := range [][2]string{{"18080", "15353"}, {"18081", "15354"}} {
		name := []string{"pod-0", "pod-1"}[i]
		s.client.Start(false, testnet.Helper("serve", name, "tcp6:"+ports[0], "udp6:"+ports[1])...)
		s.tcp = append(s.tcp, "["+backendIP6+"]:"+ports[0])
		s.udp = append(s.udp, "["+backendIP6+"]:"+ports[1])
	}
	return s
}

func (s *ipv6Setup) sync6(t *testing.T, snap *model.Snapshot) {
	t.Helper()
	if snap.Node.ServiceCIDRs == nil {
		snap.Node = kernelNode6
	}
	if err := s.v6.Sync(context.Background(), snap); err != nil {
		t.Fatalf("IPv6 sync: %v", err)
	}
	s.v6.(*ipv6View).waitSocketCleanup()
}

func TestKernelIPv6ClusterIP(t *testing.T) {
	s := newIPv6Setup(t)
	web := servicePort("default", "web", "http", model.TCP, "["+vip6+"]:80", s.tcp...)
	dns := servicePort("kube-system", "dns", "dns", model.UDP, "["+vip6+"]:53", s.udp...)
	s.sync6(t, snapshot(true, web, dns))
	front := "[" + vip6 + "]"

	lines := s.run(t, "tcp6", front+":80", "20")
	assertAnswered(t, "tcp6", lines, front+":80")
	if got := testnet.Tally(lines); got["ok pod-0"] == 0 || got["ok pod-1"] == 0 {
		t.Errorf("20 connects went to %v, want both backends", got)
	}
	for _, l := range s.run(t, "udp6", front+":53", "3") {
		if !strings.HasPrefix(l, "ok pod-") || !strings.HasSuffix(l, "from="+front+":53") {
			t.Errorf("unconnected udp6 (sendmsg6): %q, want an answer from %s", l, front+":53")
		}
	}
	for _, l := range s.run(t, "udp6", front+":53", "3", "connected") {
		if !strings.HasPrefix(l, "ok pod-") || !strings.HasSuffix(l, "peer="+front+":53 from="+front+":53") {
			t.Errorf("connected udp6: %q, want peer and source %s", l, front+":53")
		}
	}

	// The counters of both families come from the IPv4 Dataplane.
	got := map[string]dataplane.ServicePortCounters{}
	counters, err := s.dp.ServicePortCounters()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range counters {
		got[c.Name.Name] = c
	}
	if c := got["web"]; c.Connections != 20 || c.ReverseTranslations != 20 {
		t.Errorf("web counters %+v, want 20 connections and 20 reverse translations", c)
	}
	if c := got["dns"]; c.Datagrams != 3 || c.Connections != 1 {
		t.Errorf("dns counters %+v, want 3 datagrams and 1 connection", c)
	}
	usage, err := s.dp.MapUsage()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]int{}
	for _, u := range usage {
		found[u.Map] = u.Entries
	}
	if found["ipv6_services"] != 2 || found["ipv6_backends"] != 4 || found["services"] != 0 {
		t.Errorf("map usage %v, want 2 IPv6 frontends, 4 IPv6 backends and no IPv4 frontend", found)
	}
	// A node serving IPv6 alone has only the view to ask: it answers as
	// the Dataplane does.
	view, ok := s.v6.(interface {
		ServicePortCounters() ([]dataplane.ServicePortCounters, error)
		MapUsage() ([]dataplane.MapUsage, error)
		Events() (map[string]uint64, error)
	})
	if !ok {
		t.Fatal("the IPv6 view exports no counters: an IPv6-only node would have no eBPF metrics")
	}
	if viewCounters, err := view.ServicePortCounters(); err != nil || len(viewCounters) != len(counters) {
		t.Errorf("the view's counters: %d, %v; want the Dataplane's %d", len(viewCounters), err, len(counters))
	}
	if viewUsage, err := view.MapUsage(); err != nil || len(viewUsage) != len(usage) {
		t.Errorf("the view's map usage: %d, %v; want the Dataplane's %d", len(viewUsage), err, len(usage))
	}
	if events, err := view.Events(); err != nil || events["connect_translated"] == 0 {
		t.Errorf("the view's events: %v, %v; want the connects counted", events, err)
	}
}

func TestKernelIPv6AffinityNodePortAndRefusals(t *testing.T) {
	s := newIPv6Setup(t)
	front := "[" + vip6 + "]"
	web := withNodePort(withAffinity(servicePort("default", "web", "http", model.TCP, front+":80", s.tcp...), time.Hour), 30080)
	empty := servicePort("default", "empty", "http", model.TCP, "[fd00:96::11]:80")
	s.sync6(t, snapshot(true, web, empty))

	lines := s.run(t, "tcp6", front+":80", "10")
	assertAnswered(t, "affinity", lines, front+":80")
	if got := testnet.Tally(lines); len(got) != 1 {
		t.Errorf("10 connects with affinity went to %v, want one backend", got)
	}
	np := "[fd00:ffff::1]:30080"
	assertAnswered(t, "node port", s.run(t, "tcp6", np, "4"), np)

	for _, c := range []struct{ name, addr, reason string }{
		{"no backend", "[fd00:96::11]:80", "refused_no_backend"},
		{"unknown port of a ClusterIP", front + ":81", "refused_unknown_port"},
		{"unallocated Service address", "[fd00:96::99]:80", "refused_unallocated_address"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// Before Linux 5.18 (no bpf_set_retval) a refusal is EPERM.
			want := "err connection refused"
			if !s.dp.kernel.kernel.SetRetval {
				want = "err operation not permitted"
			}
			var lines []string
			delta := eventDelta(t, s.dp, func() { lines = s.run(t, "tcp6", c.addr, "1") })
			if len(lines) != 1 || lines[0] != want {
				t.Errorf("connect to %s: %q, want %q", c.addr, lines, want)
			}
			if delta[c.reason] != 1 {
				t.Errorf("events %v, want one %s", delta, c.reason)
			}
		})
	}
	// An address outside the Service CIDRs is no Service's: left alone
	// (and, with no IPv6 route out of the pod, unreachable).
	delta := eventDelta(t, s.dp, func() { s.run(t, "tcp6", "[fd00:97::1]:80", "1") })
	for name := range delta {
		if strings.HasPrefix(name, "refused") {
			t.Errorf("a connect outside the Service CIDRs was refused: %v", delta)
		}
	}
}

// A connected IPv6 UDP socket translated to a backend that leaves is found
// in the IPv6 reverse map and destroyed (sock_diag, AF_INET6).
func TestKernelIPv6StaleUDPSocketDestroyed(t *testing.T) {
	s := newIPv6Setup(t)
	addr := "[" + vip6 + "]:53"
	dns := func(backends ...string) *model.Snapshot {
		return snapshot(true, servicePort("kube-system", "dns", "dns", model.UDP, addr, backends...))
	}
	s.sync6(t, dns(s.udp[0]))
	idle := startIdleUDP(t, s.kernelSetup, addr, true)
	if got := idle.do(t, "query"); got != "ok pod-0 from="+addr {
		t.Fatalf("query: %q, want an answer from pod-0 shown as %s", got, addr)
	}
	before := events(t, s.dp)
	s.sync6(t, dns(s.udp[1]))
	after := events(t, s.dp)
	if d := after[eventUDPSocketsDestroyed] - before[eventUDPSocketsDestroyed]; d != 1 {
		t.Errorf("%d sockets destroyed when pod-0 left, want the idle one", d)
	}
	if got := idle.do(t, "query"); !strings.HasPrefix(got, "err ") {
		t.Errorf("idle socket after its backend left: %q, want an error (destroyed)", got)
	}
}

// kube-bpf-proxy inspect reads the IPv6 frontends from the pins; a
// datapath pinned by a version without IPv6 maps is read (IPv4 alone) and
// adopted, its IPv6 maps created at start.
func TestKernelIPv6PinsReadAndUpgradeFromIPv4Only(t *testing.T) {
	s := newIPv6Setup(t)
	front := "[" + vip6 + "]"
	s.sync6(t, snapshot(true, servicePort("default", "web", "http", model.TCP, front+":80", s.tcp...)))
	pinned, err := ReadPinned(s.cfg.BPFFSPath)
	if err != nil {
		t.Fatal(err)
	}
	if len(pinned.Groups) != 1 || pinned.Groups[0].Family != model.IPv6 ||
		pinned.Groups[0].Frontends[0].Frontend.String() != front+":80/TCP" || len(pinned.Groups[0].Backends) != 2 {
		t.Errorf("pinned groups %+v, want the IPv6 ClusterIP with its 2 backends", pinned.Groups)
	}

	// As an earlier version leaves the pins: no kbp6_* map, no sendmsg6
	// link.
	s.v6.Close()
	s.dp.Close()
	for _, m := range pinnedMaps {
		if strings.HasPrefix(m.name, "kbp6_") {
			if err := os.Remove(filepath.Join(s.cfg.BPFFSPath, m.name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.Remove(filepath.Join(s.cfg.BPFFSPath, linksDir, "sendmsg6")); err != nil {
		t.Fatal(err)
	}
	if pinned, err := ReadPinned(s.cfg.BPFFSPath); err != nil || len(pinned.Groups) != 0 {
		t.Fatalf("reading IPv4-only pins: %v, %+v; want no group and no error", err, pinned)
	}
	dp, err := New(s.cfg)
	if err != nil {
		t.Fatalf("adopting IPv4-only pins: %v", err)
	}
	defer dp.Close()
	v6, err := dp.IPv6()
	if err != nil {
		t.Fatal(err)
	}
	defer v6.Close()
	snap := snapshot(true, servicePort("default", "web", "http", model.TCP, front+":80", s.tcp...),
		servicePort("kube-system", "dns", "dns", model.UDP, front+":53", s.udp...))
	snap.Node = kernelNode6
	if err := v6.Sync(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	assertAnswered(t, "after the upgrade", s.run(t, "tcp6", front+":80", "2"), front+":80")
	// sendmsg6, which the earlier version did not attach, is.
	for _, l := range s.run(t, "udp6", front+":53", "2") {
		if !strings.HasPrefix(l, "ok pod-") || !strings.HasSuffix(l, "from="+front+":53") {
			t.Errorf("unconnected udp6 after the upgrade: %q, want an answer from %s", l, front+":53")
		}
	}
}

// A node port on [::1] serves the node's own sockets only, a pod's ::1
// being the pod's; --bpf-socket-lb-host-netns-only leaves a pod's IPv6
// connects alone, neither translated nor refused, and still serves the
// node's.
func TestKernelIPv6NodeNetNS(t *testing.T) {
	s := newIPv6Setup(t)
	if !s.dp.kernel.kernel.NetnsCookie {
		t.Skip("the node's sockets are told apart by SO_NETNS_COOKIE (Linux 5.14)")
	}
	host := s.net.HostNetwork()
	const nodeBackend = "fd00:245::1"
	host.AddLoopbackAddress(nodeBackend + "/128")
	host.Start(false, testnet.Helper("serve", "pod-node", "tcp6:18090")...)
	s.client.Start(false, testnet.Helper("serve", "client-self", "tcp6:30080")...)
	front := "[" + vip6 + "]"
	web := withNodePort(servicePort("default", "web", "http", model.TCP, front+":80", "["+nodeBackend+"]:18090"), 30080)
	s.sync6(t, snapshot(true, web))

	assertAnswered(t, "node to [::1] node port", host.Results("tcp6", "[::1]:30080", "2"), "[::1]:30080")
	for _, l := range s.run(t, "tcp6", "[::1]:30080", "2") {
		if !strings.HasPrefix(l, "ok client-self ") {
			t.Errorf("pod to its own [::1]:30080: %q, want its own server", l)
		}
	}

	if err := s.dp.ConfineToNodeNetNS(); err != nil {
		t.Fatal(err)
	}
	delta := eventDelta(t, s.dp, func() {
		for _, l := range append(s.run(t, "tcp6", front+":80", "1"), s.run(t, "tcp6", "[fd00:96::99]:80", "1")...) {
			if strings.HasPrefix(l, "ok ") || strings.Contains(l, "refused") || strings.Contains(l, "not permitted") {
				t.Errorf("a pod's IPv6 connect with the socket layer confined: %q, want it left alone", l)
			}
		}
	})
	for name := range delta {
		if strings.HasPrefix(name, "refused") || name == "connect_translated" {
			t.Errorf("a pod's IPv6 connects with the socket layer confined counted %v", delta)
		}
	}
	assertAnswered(t, "node with the socket layer confined", host.Results("tcp6", front+":80", "2"), front+":80")
}

// A capacity change resizes the IPv6 maps too, carrying their entries
// over: nothing is rewritten, and a connected IPv6 UDP socket's replies
// still show the frontend (its kbp6_revnat entry came along).
func TestKernelIPv6CapacityChangeResizesPinnedMaps(t *testing.T) {
	s := newIPv6Setup(t)
	front := "[" + vip6 + "]"
	snap := snapshot(true, servicePort("default", "web", "http", model.TCP, front+":80", s.tcp...),
		servicePort("kube-system", "dns", "dns", model.UDP, front+":53", s.udp[0]))
	s.sync6(t, snap)
	idle := startIdleUDP(t, s.kernelSetup, front+":53", true)
	if got := idle.do(t, "query"); got != "ok pod-0 from="+front+":53" {
		t.Fatalf("query: %q", got)
	}
	s.v6.Close()
	s.dp.Close()

	s.cfg.MaxServices *= 2
	s.cfg.MaxBackends *= 2
	s.cfg.MaxSockets *= 2
	resized := s.open(t)
	v6, err := resized.IPv6()
	if err != nil {
		t.Fatal(err)
	}
	defer v6.Close()
	counting := &countingMaps{}
	view := v6.(*ipv6View)
	view.rec.maps = counting.wrap(view.rec.maps)
	snap.Node = kernelNode6
	if err := v6.Sync(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	if counting.ops != 0 {
		t.Errorf("resized IPv6 maps needed %d writes, want 0 (entries must be carried over)", counting.ops)
	}
	for name, want := range map[string]uint32{lbMapKbp6Services: s.cfg.withDefaults().MaxFrontends,
		lbMapKbp6Backends: s.cfg.MaxBackends, lbMapKbp6Revnat: s.cfg.MaxSockets} {
		if got := pinnedCapacity(t, s.cfg.BPFFSPath, name); got != want {
			t.Errorf("pinned %s holds %d entries, want %d", name, got, want)
		}
	}
	if got := idle.do(t, "query"); got != "ok pod-0 from="+front+":53" {
		t.Errorf("query on the socket connected before the resize: %q, want an answer shown from %s", got, front+":53")
	}
	assertAnswered(t, "after the resize", s.run(t, "tcp6", front+":80", "4"), front+":80")
}
