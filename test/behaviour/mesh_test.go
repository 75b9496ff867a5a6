package behaviour

import (
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// sidecarPort is where the client pod's mesh sidecar listens (Istio's
// outbound capture port).
const sidecarPort = 15001

// A service mesh sidecar (Istio, Linkerd) captures a pod's outbound TCP with
// an iptables REDIRECT in the pod's own namespace and routes each
// connection by its original destination (SO_ORIGINAL_DST). The eBPF
// mode's connect4 runs before that rule: by default it has already
// replaced the ClusterIP with a backend's pod IP, which the sidecar sees
// (and routes as passthrough traffic: no mTLS, no routing policy). With
// --bpf-socket-lb-host-netns-only the pod's sockets are left alone: the
// sidecar sees the ClusterIP, and its own connection to it is served per
// packet by the packet layer's ClusterIP rules. The node's own sockets are
// still translated at connect(). Each restart with the other value
// converges at its first full sync, as the proxy's would, with no gap
// before it: a restart into the confined mode leaves pods translated at
// connect() until the packet layer has the ClusterIP rules.
func TestMeshSidecarSeesTheServiceAddress(t *testing.T) {
	forEachIPFamily(t, meshSidecarSeesTheServiceAddress)
}

func meshSidecarSeesTheServiceAddress(t *testing.T, f ipFamily) {
	withFamily := func(m mode) mode {
		m.fam = f
		return m
	}
	s := newSetup(t, withFamily(ebpfModeWith(false)), 2)
	snap := apitest.Snapshot(true, s.web(s.backends(8080, s.pods...)...))
	s.sync(t, snap)
	s.client.RedirectToSidecar(sidecarPort)
	log := filepath.Join(t.TempDir(), "sidecar.log")
	s.client.Start(true, testnet.Helper("sidecar", strconv.Itoa(sidecarPort), log)...)

	podIPs := map[string]bool{}
	for _, p := range s.pods {
		podIPs[netip.AddrPortFrom(p.IP, 8080).String()] = true
	}
	// connect runs one client connection through the sidecar and returns
	// the original destination the sidecar read for it.
	seen := 0
	connect := func(t *testing.T) string {
		t.Helper()
		lines := s.run(t, "tcp", s.at(vip, 80), "1")
		if len(lines) != 1 || !strings.HasPrefix(lines[0], "ok pod-") {
			t.Fatalf("the connection through the sidecar did not reach a backend: %q", lines)
		}
		data, err := os.ReadFile(log)
		if err != nil {
			t.Fatal(err)
		}
		all := strings.Split(strings.TrimSpace(string(data)), "\n")
		if len(all) != seen+1 {
			t.Fatalf("the sidecar saw %d connections, want %d: %q", len(all), seen+1, all)
		}
		seen++
		return strings.TrimPrefix(all[len(all)-1], "orig=")
	}
	clusterIPRules := func(t *testing.T) bool {
		t.Helper()
		for _, l := range iptablesLeftovers(t, s) {
			if strings.Contains(l, "-d "+s.host(vip).String()) && strings.Contains(l, " cluster IP\"") {
				return true
			}
		}
		return false
	}
	// restart starts m as a new proxy process would; before its first
	// sync, the client still reaches a backend through the sidecar, and
	// the sidecar sees the original destination wantBefore ("" for any
	// backend's pod IP).
	restart := func(t *testing.T, m mode, wantBefore string) {
		t.Helper()
		s.dp.Close()
		s.dp = m.open(t, s)
		orig := connect(t)
		if (wantBefore == "" && !podIPs[orig]) || (wantBefore != "" && orig != wantBefore) {
			t.Errorf("before the first sync, the sidecar saw %s as the original destination, want %q (\"\": a pod IP)", orig, wantBefore)
		}
		s.sync(t, snap)
	}

	t.Run("default", func(t *testing.T) {
		if orig := connect(t); !podIPs[orig] {
			t.Errorf("the sidecar saw %s as the original destination, want a backend's pod IP (connect4 translated first)", orig)
		}
		if clusterIPRules(t) {
			t.Error("the packet layer has ClusterIP rules without --bpf-socket-lb-host-netns-only")
		}
	})

	t.Run("host netns only", func(t *testing.T) {
		// Pods stay translated at socket level until the packet layer
		// has the ClusterIP rules.
		restart(t, withFamily(ebpfModeWith(true)), "")
		if !clusterIPRules(t) {
			t.Fatal("the packet layer has no rule for the ClusterIP")
		}
		// The sidecar forwards to the ClusterIP it read: the packet
		// layer serves its connection, which reached a backend above.
		if orig := connect(t); orig != s.at(vip, 80) {
			t.Errorf("the sidecar saw %s as the original destination, want the ClusterIP %s", orig, s.at(vip, 80))
		}
		// The node's own sockets are still translated at connect().
		before := connectTranslated(t, s)
		lines := s.net.HostNetwork().Results("tcp", s.at(vip, 80), "3")
		if got := testnet.Tally(lines); got["ok pod-0"]+got["ok pod-1"] != 3 {
			t.Errorf("connections from the node's namespace: %v", got)
		}
		if after := connectTranslated(t, s); after-before != 3 {
			t.Errorf("connect_translated rose by %d for 3 connections from the node's namespace, want 3", after-before)
		}
	})

	t.Run("host netns only again", func(t *testing.T) {
		// Confined from the start: the previous run's rules serve.
		restart(t, withFamily(ebpfModeWith(true)), s.at(vip, 80))
		if orig := connect(t); orig != s.at(vip, 80) {
			t.Errorf("the sidecar saw %s as the original destination, want the ClusterIP %s", orig, s.at(vip, 80))
		}
	})

	t.Run("back to default", func(t *testing.T) {
		restart(t, withFamily(ebpfModeWith(false)), "")
		if clusterIPRules(t) {
			t.Error("the ClusterIP rules outlived the first full sync without --bpf-socket-lb-host-netns-only")
		}
		if orig := connect(t); !podIPs[orig] {
			t.Errorf("the sidecar saw %s as the original destination, want a backend's pod IP", orig)
		}
	})
}

// connectTranslated reads the socket layer's connect_translated counter.
func connectTranslated(t *testing.T, s *setup) uint64 {
	t.Helper()
	return datapathEvents(t, s)["connect_translated"]
}

// With the socket layer confined to the node's namespace, a pod's
// connected UDP socket to a ClusterIP was never translated: it is served
// per packet (conntrack), and is no stale socket. The socket cleanup,
// which destroys sockets connected to the ClusterIP itself (they connected
// before the Service existed, and the socket layer will never see them
// again), must leave it alone: a resolver would otherwise lose its socket
// at every full sync.
func TestHostNetNSOnlyKeepsPodsConnectedUDPSockets(t *testing.T) {
	forEachIPFamily(t, hostNetNSOnlyKeepsPodsConnectedUDPSockets)
}

func hostNetNSOnlyKeepsPodsConnectedUDPSockets(t *testing.T, f ipFamily) {
	m := ebpfModeWith(true)
	m.fam = f
	s := newSetup(t, m, 1)
	snap := apitest.Snapshot(true, s.dns(s.backends(5353, s.pods...)...))
	s.sync(t, snap)
	r := s.client.StartResolver(s.at(vip, 53))
	defer r.Stop()
	before := parseResolverResults(t, r.Take(3))
	allAnswered(t, "before the full syncs", before, s.pods...)
	for range 3 {
		s.sync(t, snap)
	}
	after := parseResolverResults(t, r.Take(3))
	allAnswered(t, "after the full syncs", after, s.pods...)
	for _, res := range after {
		if res.Gen != 1 {
			t.Fatalf("the resolver needed a new socket: %s", resultLines(after))
		}
	}
}
