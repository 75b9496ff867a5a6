package behaviour

import (
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/testnet"
)

// Applications on AF_INET6 sockets (IPV6_V6ONLY off, Java's default) reach
// IPv4 Services as ::ffff:VIP. The iptables modes see IPv4 packets either
// way; the eBPF mode must translate in the *6 socket hooks too.

// mappedVIP is the VIP as an AF_INET6 socket names it.
const mappedVIP = "[::ffff:" + vip + "]"

func TestInet6TCPSpreadsOverBackendsAndPeerIsTheMappedVIP(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 3)
		s.sync(t, apitest.Snapshot(true, web(s.backends(8080, s.pods...)...)))

		lines := s.run(t, "tcp6", mappedVIP+":80", "60")
		got := testnet.Tally(lines)
		for _, p := range s.pods {
			if got["ok "+p.Name] == 0 {
				t.Errorf("no connection reached %s in 60: %v", p.Name, got)
			}
		}
		if len(got) != 3 {
			t.Errorf("results other than the three backends: %v", got)
		}
		for _, l := range lines {
			if !strings.HasSuffix(l, "peer="+mappedVIP+":80") {
				t.Fatalf("getpeername did not return the v4-mapped VIP: %q", l)
			}
		}
	})
}

func TestInet6UDPOneBackendPerSocketRepliesFromTheMappedVIP(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 3)
		s.sync(t, apitest.Snapshot(true, dns(s.backends(5353, s.pods...)...)))
		for _, kind := range []string{"unconnected", "connected"} {
			t.Run(kind, func(t *testing.T) {
				args := []string{"udp6", mappedVIP + ":53", "10"}
				if kind == "connected" {
					args = append(args, "connected")
				}
				lines := s.run(t, args...)
				if got := testnet.Tally(lines); len(got) != 1 {
					t.Errorf("answers of one socket came from %d places, want 1: %v", len(got), got)
				}
				for _, l := range lines {
					if !strings.HasPrefix(l, "ok pod-") || !strings.HasSuffix(l, "peer="+mappedVIP+":53 from="+mappedVIP+":53") {
						t.Errorf("reply does not come from the v4-mapped VIP: %q", l)
					}
				}
			})
		}
		seen := map[string]bool{}
		for range 20 {
			for k := range testnet.Tally(s.run(t, "udp6", mappedVIP+":53", "1")) {
				seen[k] = true
			}
		}
		if len(seen) < 2 {
			t.Errorf("20 sockets all used one backend: %v", seen)
		}
	})
}

// As TestNoEndpointsRefusesAtOnce, from AF_INET6 sockets.
func TestInet6NoEndpointsRefusesAtOnce(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 0)
		s.sync(t, apitest.Snapshot(true,
			apitest.ServicePort("default", "empty", "http", model.TCP, vip+":80"),
			apitest.ServicePort("default", "empty", "dns", model.UDP, vip+":53")))

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
		expect([]string{"tcp6", mappedVIP + ":80", "3"}, "err connection refused", 3)
		if m.socketLevel {
			expect([]string{"udp6", mappedVIP + ":53", "3", "connected"}, "err connection refused", 1)
			expect([]string{"udp6", mappedVIP + ":53", "3"}, "err connection refused", 3)
			return
		}
		// Per packet, as for AF_INET sockets: see TestNoEndpointsRefusesAtOnce.
		expect([]string{"udp6", mappedVIP + ":53", "3", "connected"}, "err connection refused", 3)
		expect([]string{"udp6", mappedVIP + ":53", "1"}, "err timeout", 1)
	})
}

// Real IPv6 is not ours (yet): the *6 programs leave it alone. The server's
// address ends in the VIP's 32 bits and listens on the Service's port, so a
// program that looked at the last word alone would send the connect to a
// backend instead.
func TestInet6RealIPv6IsLeftAlone(t *testing.T) {
	s := newSetup(t, ebpfMode(), 2)
	s.sync(t, apitest.Snapshot(true,
		web(s.backends(8080, s.pods...)...),
		dns(s.backends(5353, s.pods...)...)))
	const lookalike = "fd00::a60:a" // ends in 10.96.0.10
	s.client.AddLoopbackAddress(lookalike + "/128")
	s.client.Start(false, testnet.Helper("serve", "ipv6-server", "tcp6:80", "udp6:53")...)
	dp := s.dp.(*ebpf.Dataplane)
	before, err := dp.Events()
	if err != nil {
		t.Fatal(err)
	}

	for _, addr := range []string{"[::1]", "[" + lookalike + "]"} {
		for _, c := range []struct {
			args []string
			want string
		}{
			{[]string{"tcp6", addr + ":80", "3"}, "ok ipv6-server peer=" + addr + ":80"},
			{[]string{"udp6", addr + ":53", "3"}, "ok ipv6-server peer=" + addr + ":53 from=" + addr + ":53"},
			{[]string{"udp6", addr + ":53", "3", "connected"}, "ok ipv6-server peer=" + addr + ":53 from=" + addr + ":53"},
		} {
			for _, l := range s.run(t, c.args...) {
				if l != c.want {
					t.Errorf("%v: got %q, want %q", c.args, l, c.want)
				}
			}
		}
	}
	after, err := dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	for name, n := range after {
		if n != before[name] {
			t.Errorf("counter %s went from %d to %d: real IPv6 was translated", name, before[name], n)
		}
	}
	// The programs are there and serve the v4-mapped VIP meanwhile.
	if got := testnet.Tally(s.run(t, "tcp6", mappedVIP+":80", "4")); got["ok pod-0"]+got["ok pod-1"] != 4 {
		t.Errorf("the v4-mapped VIP next to real IPv6: %v", got)
	}
}
