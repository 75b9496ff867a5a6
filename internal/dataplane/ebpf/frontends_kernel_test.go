package ebpf

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// nodeIP is the node's address in the test topology, on its end of every
// pod link; loopback is named for node ports too, as a user may.
const nodeIP = testnet.PodGateway

var kernelNode = model.NodeInfo{
	NodePortAddresses: addrs(nodeIP, "127.0.0.1"),
	LocalAddresses:    addrs(nodeIP, "127.0.0.1"),
	ServiceCIDRs:      []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")},
}

// mapped is addr ("ip:port") as an AF_INET6 socket names it.
func mapped(addr string) string {
	ap := netip.MustParseAddrPort(addr)
	return fmt.Sprintf("[::ffff:%s]:%d", ap.Addr(), ap.Port())
}

// assertAnswered fails the test unless every line is an answer from a
// server pod whose peer name is peer (the frontend the client asked for).
func assertAnswered(t *testing.T, what string, lines []string, peer string) {
	t.Helper()
	for _, l := range lines {
		if !strings.HasPrefix(l, "ok pod-") || !strings.Contains(l, " peer="+peer) {
			t.Errorf("%s: %q, want an answer from a pod with peer=%s", what, l, peer)
		}
	}
}

// eventDelta runs fn and returns how the datapath's event counters changed.
func eventDelta(t *testing.T, dp *Dataplane, fn func()) map[string]uint64 {
	t.Helper()
	before := events(t, dp)
	fn()
	after := events(t, dp)
	out := make(map[string]uint64)
	for name, v := range after {
		if d := v - before[name]; d != 0 {
			out[name] = d
		}
	}
	return out
}

// A socket in a pod or in the node's own network namespace reaches a
// Service by its NodePort on a node address, its external IPs that are the
// node's, and its LoadBalancer IPs, from AF_INET and AF_INET6 sockets; an
// external IP elsewhere and a LoadBalancer IP with source ranges are not
// translated (the node's iptables rules serve them), nor is 127.0.0.1 in a
// pod, which is the pod's own.
func TestKernelExternalFrontendsFromSockets(t *testing.T) {
	s := newKernelSetup(t, 2)
	web := withExternal(withNodePort(servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...), 30080),
		[]string{nodeIP, "192.0.2.1"}, []string{"192.0.2.10"})
	ranged := withExternal(servicePort("default", "ranged", "http", model.TCP, "10.96.0.11:80", s.backends(8080, s.pods...)...),
		nil, []string{"192.0.2.20"}, "203.0.113.0/24")
	dns := withNodePort(servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...), 30053)
	s.sync(t, onNode(kernelNode, true, web, ranged, dns))
	host := s.net.HostNetwork()
	// A server of the client pod's own on the node port, on its loopback.
	s.client.Start(false, testnet.Helper("serve", "client-self", "tcp:30080")...)

	np := nodeIP + ":30080"
	for _, c := range []struct {
		name   string
		client *testnet.Pod
		args   []string
		peer   string
		events map[string]uint64
	}{
		{"pod to a node address", s.client, []string{"tcp", np, "3"}, np,
			map[string]uint64{"connect_translated": 3, "nodeport_translated": 3, "reverse_translated": 3}},
		{"pod, AF_INET6 v4-mapped", s.client, []string{"tcp6", mapped(np), "2"}, mapped(np),
			map[string]uint64{"connect_translated": 2, "nodeport_translated": 2, "reverse_translated": 2}},
		{"node to a node address", host, []string{"tcp", np, "3"}, np,
			map[string]uint64{"connect_translated": 3, "nodeport_translated": 3, "reverse_translated": 3}},
		{"node, AF_INET6 v4-mapped", host, []string{"tcp6", mapped(np), "2"}, mapped(np),
			map[string]uint64{"connect_translated": 2, "nodeport_translated": 2, "reverse_translated": 2}},
		{"node to loopback, named by --nodeport-addresses", host, []string{"tcp", "127.0.0.1:30080", "2"}, "127.0.0.1:30080",
			map[string]uint64{"connect_translated": 2, "nodeport_translated": 2, "reverse_translated": 2}},
		{"node to loopback, AF_INET6", host, []string{"tcp6", mapped("127.0.0.1:30080"), "1"}, mapped("127.0.0.1:30080"),
			map[string]uint64{"connect_translated": 1, "nodeport_translated": 1, "reverse_translated": 1}},
		{"pod to a local external IP", s.client, []string{"tcp", nodeIP + ":80", "2"}, nodeIP + ":80",
			map[string]uint64{"connect_translated": 2, "external_translated": 2, "reverse_translated": 2}},
		{"pod to a LoadBalancer IP", s.client, []string{"tcp", "192.0.2.10:80", "2"}, "192.0.2.10:80",
			map[string]uint64{"connect_translated": 2, "external_translated": 2, "reverse_translated": 2}},
		{"node to a LoadBalancer IP", host, []string{"tcp", "192.0.2.10:80", "1"}, "192.0.2.10:80",
			map[string]uint64{"connect_translated": 1, "external_translated": 1, "reverse_translated": 1}},
		{"pod, unconnected UDP node port", s.client, []string{"udp", nodeIP + ":30053", "2"}, nodeIP + ":30053",
			map[string]uint64{"sendmsg_translated": 2, "nodeport_translated": 2, "reverse_translated": 2}},
		{"node, connected UDP node port from AF_INET6", host, []string{"udp6", mapped(nodeIP + ":30053"), "1", "connected"},
			mapped(nodeIP + ":30053"), nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			var lines []string
			got := eventDelta(t, s.dp, func() { lines = c.client.Results(c.args...) })
			assertAnswered(t, c.name, lines, c.peer)
			for name, want := range c.events {
				if got[name] != want {
					t.Errorf("events %v, want %s = %d", got, name, want)
				}
			}
		})
	}

	for _, c := range []struct {
		name, addr, want string
	}{
		{"pod's own loopback", "127.0.0.1:30080", "ok client-self "},
		{"an external IP that is not the node's", "192.0.2.1:80", "err "},
		{"a LoadBalancer IP with source ranges", "192.0.2.20:80", "err "},
	} {
		t.Run("not translated: "+c.name, func(t *testing.T) {
			var lines []string
			got := eventDelta(t, s.dp, func() { lines = s.client.Results("tcp", c.addr, "1") })
			if !strings.HasPrefix(lines[0], c.want) {
				t.Errorf("%s: %q, want %q...", c.addr, lines[0], c.want)
			}
			if got["connect_translated"] != 0 || got["refused_unknown_port"] != 0 || got["refused_unallocated_address"] != 0 {
				t.Errorf("%s: events %v, want it left alone", c.addr, got)
			}
		})
	}

	// The port's counters add up every frontend's connections.
	if c := portCounters(t, s.dp)[web.Name]; c.Connections < 18 {
		t.Errorf("web counted %+v, want every frontend's connections (18)", c)
	}
}

// What kube-proxy refuses is refused at connect(): a ClusterIP on a port
// its Service does not have, and an address of the Service CIDR that is no
// ClusterIP; an address outside the Service CIDRs, or a pod's, is left
// alone. Without known Service CIDRs only the ClusterIPs' other ports are.
func TestKernelRefusesUnknownPortsAndUnallocatedAddresses(t *testing.T) {
	s := newKernelSetup(t, 1)
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	dns := servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...)
	s.sync(t, onNode(kernelNode, true, web, dns))

	type attempt struct {
		name   string
		args   []string
		result string // every line starts with it
		event  string // the refusal counted once per line, "" for none
	}
	check := func(t *testing.T, attempts []attempt) {
		t.Helper()
		for _, a := range attempts {
			var lines []string
			got := eventDelta(t, s.dp, func() { lines = s.run(t, a.args...) })
			for _, l := range lines {
				if !strings.HasPrefix(l, a.result) {
					t.Errorf("%s: %q, want %q...", a.name, l, a.result)
				}
			}
			for _, e := range []string{"refused_unknown_port", "refused_unallocated_address", "refused_no_backend"} {
				want := uint64(0)
				if e == a.event {
					want = uint64(len(lines))
				}
				if got[e] != want {
					t.Errorf("%s: %s counted %d, want %d (events %v)", a.name, e, got[e], want, got)
				}
			}
		}
	}
	check(t, []attempt{
		{"a ClusterIP's port", []string{"tcp", vip + ":80", "2"}, "ok pod-0", ""},
		{"a ClusterIP's other port", []string{"tcp", vip + ":81", "2"}, "err connection refused", "refused_unknown_port"},
		{"the same from AF_INET6", []string{"tcp6", mapped(vip + ":81"), "1"}, "err connection refused", "refused_unknown_port"},
		{"another protocol on the port", []string{"udp", vip + ":80", "1"}, "err ", "refused_unknown_port"},
		{"unconnected UDP to a ClusterIP's other port", []string{"udp", "10.96.0.53:54", "1"}, "err ", "refused_unknown_port"},
		{"connected UDP to it", []string{"udp", "10.96.0.53:54", "1", "connected"}, "err ", "refused_unknown_port"},
		{"an unallocated address of the Service CIDR", []string{"tcp", "10.96.0.99:80", "2"}, "err connection refused", "refused_unallocated_address"},
		{"UDP to one", []string{"udp", "10.96.200.1:53", "1"}, "err ", "refused_unallocated_address"},
		{"a pod", []string{"tcp", s.pods[0].IP.String() + ":8080", "1"}, "ok pod-0", ""},
		{"outside the Service CIDR", []string{"tcp", "10.97.0.1:80", "1"}, "err ", ""},
	})
	// The refusals do not stop at the node: nothing reached the pods.

	unknown := kernelNode
	unknown.ServiceCIDRs = nil
	s.sync(t, onNode(unknown, true, web, dns))
	check(t, []attempt{
		{"Service CIDRs unknown: a ClusterIP's other port", []string{"tcp", vip + ":81", "1"}, "err connection refused", "refused_unknown_port"},
		{"Service CIDRs unknown: another address of the range", []string{"tcp", "10.96.0.99:80", "1"}, "err ", ""},
		{"Service CIDRs unknown: a ClusterIP's port", []string{"tcp", vip + ":80", "1"}, "ok pod-0", ""},
	})
}

// internalTrafficPolicy Local on a node without a local endpoint, while
// others have some: kube-proxy drops the ClusterIP's traffic (clients time
// out); a socket is refused at once, counted apart from a Service without
// endpoints. Its node port, reached from the same pod, goes to the
// cluster's endpoints, as kube-proxy sends traffic from the node and its
// pods.
func TestKernelNoLocalEndpointRefused(t *testing.T) {
	s := newKernelSetup(t, 2)
	local := internalLocal(servicePort("default", "local", "http", model.TCP, vip+":80"), nil, s.backends(8080, s.pods...)...)
	local.External.NodePort = 30080
	s.sync(t, onNode(kernelNode, true, local))

	var lines []string
	got := eventDelta(t, s.dp, func() { lines = s.run(t, "tcp", vip+":80", "3") })
	for _, l := range lines {
		if l != "err connection refused" {
			t.Errorf("ClusterIP: %q, want connection refused", l)
		}
	}
	if got["refused_no_local_endpoint"] != 3 || got["refused_no_backend"] != 0 {
		t.Errorf("events %v, want refused_no_local_endpoint = 3 and no refused_no_backend", got)
	}
	if c := portCounters(t, s.dp)[local.Name]; c.Refused != 3 {
		t.Errorf("the port counted %+v, want 3 refused", c)
	}
	assertAnswered(t, "node port", s.run(t, "tcp", nodeIP+":30080", "4"), nodeIP+":30080")

	// A local endpoint appears: the ClusterIP serves it alone.
	withLocal := internalLocal(servicePort("default", "local", "http", model.TCP, vip+":80"), s.backends(8080, s.pods[1]),
		s.backends(8080, s.pods...)...)
	withLocal.External = local.External
	s.sync(t, onNode(kernelNode, false, withLocal))
	testnet.AssertAllOK(t, "ClusterIP with a local endpoint", s.run(t, "tcp", vip+":80", "6"), "pod-1")
}

// Session affinity: a client namespace sticks to one backend per Service
// port, whichever frontend or socket family it uses, TCP and UDP, across
// a restart of the proxy; when its backend goes it picks another and
// sticks to that; and once it has been idle longer than the timeout it
// picks afresh. Timings are not asserted: expiry is only said to make a
// new pick possible, which the test sees happen for some client over a
// few rounds.
func TestKernelSessionAffinity(t *testing.T) {
	s := newKernelSetup(t, 4)
	clients := []*testnet.Pod{s.client, s.net.AddPod("client-1", "10.244.0.101"), s.net.AddPod("client-2", "10.244.0.102")}
	web := func(timeout time.Duration, pods ...*testnet.Pod) model.ServicePort {
		return withAffinity(withNodePort(servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, pods...)...), 30080), timeout)
	}
	dns := withAffinity(servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...), time.Hour)
	s.sync(t, onNode(kernelNode, true, web(time.Hour, s.pods...), dns))

	// backendOf runs a client and returns the one backend all its lines
	// name, failing the test if they name more or fail.
	backendOf := func(c *testnet.Pod, what string, args ...string) string {
		t.Helper()
		tally := testnet.Tally(c.Results(args...))
		if len(tally) != 1 {
			t.Fatalf("%s from %s: %v, want one backend", what, c.Name, tally)
		}
		for k := range tally {
			if !strings.HasPrefix(k, "ok pod-") {
				t.Fatalf("%s from %s: %v", what, c.Name, tally)
			}
			return strings.TrimPrefix(k, "ok ")
		}
		return ""
	}
	sticky := make(map[*testnet.Pod]string)
	hits := eventDelta(t, s.dp, func() {
		for _, c := range clients {
			sticky[c] = backendOf(c, "ClusterIP", "tcp", vip+":80", "8")
			if b := backendOf(c, "node port", "tcp", nodeIP+":30080", "4"); b != sticky[c] {
				t.Errorf("%s: the node port went to %s, the ClusterIP to %s: one Service port, one affinity", c.Name, b, sticky[c])
			}
			if b := backendOf(c, "AF_INET6", "tcp6", mapped(vip+":80"), "2"); b != sticky[c] {
				t.Errorf("%s: AF_INET6 went to %s, AF_INET to %s", c.Name, b, sticky[c])
			}
		}
	})["affinity_hit"]
	if hits < uint64(len(clients)*13) {
		t.Errorf("affinity_hit counted %d, want at least %d", hits, len(clients)*13)
	}
	// UDP: each request from a new socket, each datagram one sendmsg.
	udp := backendOf(s.client, "UDP", "udp", "10.96.0.53:53", "1")
	for range 4 {
		if b := backendOf(s.client, "UDP", "udp", "10.96.0.53:53", "2"); b != udp {
			t.Errorf("UDP from a new socket went to %s, the first to %s", b, udp)
		}
	}

	// The proxy restarts: affinity is kept in the pinned map.
	s.dp.Close()
	s.dp = s.open(t)
	s.sync(t, onNode(kernelNode, true, web(time.Hour, s.pods...), dns))
	for _, c := range clients {
		if b := backendOf(c, "after a restart", "tcp", vip+":80", "3"); b != sticky[c] {
			t.Errorf("%s: after a restart went to %s, before to %s", c.Name, b, sticky[c])
		}
	}

	// The first client's backend goes: it picks another, and keeps it; a
	// client whose backend stays keeps it.
	removed := sticky[s.client]
	var rest []*testnet.Pod
	for _, p := range s.pods {
		if p.Name != removed {
			rest = append(rest, p)
		}
	}
	s.sync(t, onNode(kernelNode, false, web(time.Hour, rest...), dns))
	for _, c := range clients {
		b := backendOf(c, "after a backend went", "tcp", vip+":80", "6")
		switch {
		case b == removed:
			t.Errorf("%s still goes to the removed %s", c.Name, b)
		case sticky[c] != removed && b != sticky[c]:
			t.Errorf("%s went to %s after another backend went, before to %s", c.Name, b, sticky[c])
		}
		sticky[c] = b
	}

	// A short timeout: idle longer than it, a client may pick another.
	s.sync(t, onNode(kernelNode, false, web(2*time.Second, rest...), dns))
	for _, c := range clients {
		sticky[c] = backendOf(c, "with a short timeout", "tcp", vip+":80", "1")
	}
	for round := 1; ; round++ {
		// Whole seconds: three apart is more than two for any start.
		time.Sleep(3500 * time.Millisecond)
		changed := false
		for _, c := range clients {
			b := backendOf(c, "after the timeout", "tcp", vip+":80", "1")
			changed = changed || b != sticky[c]
			sticky[c] = b
		}
		if changed {
			t.Logf("a new pick after the timeout in round %d", round)
			break
		}
		if round == 8 {
			t.Fatalf("%d rounds past the timeout, no client picked another backend", round)
		}
	}

	// Cleanup removes the affinity map with the rest.
	s.dp.Close()
	if err := Cleanup(s.cfg.BPFFSPath); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.cfg.BPFFSPath, lbMapKbpAffinity)); !os.IsNotExist(err) {
		t.Errorf("the affinity map is still pinned after cleanup: %v", err)
	}
}

// A datapath pinned by a version with fewer events has a smaller counters
// map: it grows, keeping the counts, and the new events count.
func TestKernelEventsMapGrows(t *testing.T) {
	s := newKernelSetup(t, 1)
	web := withNodePort(servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...), 30080)
	s.sync(t, onNode(kernelNode, true, web))
	s.dp.Close()

	// The previous version's map: 8 events, 5 connects counted on CPU 0.
	path := filepath.Join(s.cfg.BPFFSPath, lbMapKbpStats)
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: lbMapKbpStats, Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Put(uint32(lbStatIndexSTAT_CONNECT_TRANSLATED), []uint64{5}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(path); err != nil {
		t.Fatal(err)
	}

	s.dp = s.open(t)
	if got := pinnedCapacity(t, s.cfg.BPFFSPath, lbMapKbpStats); got != uint32(lbStatIndexSTAT_MAX) {
		t.Errorf("the pinned events map holds %d, want %d", got, lbStatIndexSTAT_MAX)
	}
	if got := events(t, s.dp)["connect_translated"]; got != 5 {
		t.Errorf("connect_translated = %d after the upgrade, want the 5 counted before", got)
	}
	got := eventDelta(t, s.dp, func() { assertAnswered(t, "node port", s.run(t, "tcp", nodeIP+":30080", "2"), nodeIP+":30080") })
	if got["nodeport_translated"] != 2 || got["connect_translated"] != 2 {
		t.Errorf("events %v, want 2 connects through the node port", got)
	}
}

// A Service naming 127.0.0.1 as an external IP (a local address of the
// node's) and 127.0.0.53 as a load balancer IP takes nothing from a pod's
// loopback: the pod's own listener answers, untranslated, as with
// kube-proxy, whose rules a pod's loopback traffic never reaches.
func TestKernelHostScopedExternalAddressesStayThePods(t *testing.T) {
	s := newKernelSetup(t, 1)
	hostile := withExternal(servicePort("default", "hostile", "http", model.TCP, "10.96.0.12:9091", s.backends(8080, s.pods...)...),
		[]string{"127.0.0.1", "169.254.1.1"}, []string{"127.0.0.53"})
	s.sync(t, onNode(kernelNode, true, hostile))
	s.client.Start(false, testnet.Helper("serve", "client-self", "tcp:9091")...)
	for _, addr := range []string{"127.0.0.1:9091", "127.0.0.53:9091"} {
		t.Run(addr, func(t *testing.T) {
			var lines []string
			got := eventDelta(t, s.dp, func() { lines = s.client.Results("tcp", addr, "2") })
			for _, l := range lines {
				if !strings.HasPrefix(l, "ok client-self ") {
					t.Errorf("%s: %q, want the pod's own listener", addr, l)
				}
			}
			if got["connect_translated"] != 0 || got["external_translated"] != 0 {
				t.Errorf("%s: events %v, want it left alone", addr, got)
			}
		})
	}
	// The ClusterIP still serves.
	assertAnswered(t, "ClusterIP", s.client.Results("tcp", "10.96.0.12:9091", "1"), "10.96.0.12:9091")
}

// The ClusterIP of a Service another proxy serves is left alone at
// connect(), any port, as kube-proxy leaves it for that proxy: not
// refused as an unallocated address of the Service CIDR, not translated.
func TestKernelForeignClusterIPLeftAlone(t *testing.T) {
	s := newKernelSetup(t, 1)
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	node := kernelNode
	node.ForeignClusterIPs = addrs("10.96.0.77")
	s.sync(t, onNode(node, true, web))
	for _, args := range [][]string{{"tcp", "10.96.0.77:80", "1"}, {"tcp", "10.96.0.77:81", "1"}, {"udp", "10.96.0.77:53", "1", "connected"}} {
		var lines []string
		got := eventDelta(t, s.dp, func() { lines = s.run(t, args...) })
		for _, l := range lines {
			if !strings.HasPrefix(l, "err ") || strings.Contains(l, "connection refused") {
				t.Errorf("%v: %q, want it left alone (dying untranslated in the test network)", args, l)
			}
		}
		if len(got) != 0 {
			t.Errorf("%v: events %v, want none: neither refused nor translated", args, got)
		}
	}
	// Once it is no other proxy's, it is an unallocated address again.
	s.sync(t, onNode(kernelNode, true, web))
	got := eventDelta(t, s.dp, func() { s.run(t, "tcp", "10.96.0.77:80", "1") })
	if got["refused_unallocated_address"] != 1 {
		t.Errorf("events %v, want one refused_unallocated_address", got)
	}
}
