package behaviour

import (
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// Applications on AF_INET6 sockets (IPV6_V6ONLY off, Java's default) reach
// IPv4 Services as ::ffff:VIP: the scenarios that take a socketFamily run
// from both kinds of socket.

// mappedVIP is the VIP as an AF_INET6 socket names it.
const mappedVIP = "[::ffff:" + vip + "]"

// A real IPv6 destination that is no Service's is left alone by the *6
// programs. IPv4: the IPv4 datapath's Services are reached from AF_INET6
// sockets as ::ffff:VIP, and the server's address ends in the VIP's 32
// bits, so a program that looked at the last word alone would send the
// connect to a backend instead. IPv6: the IPv6 datapath's (its view of the
// programs), and the server's address differs from the VIP in its first
// group only, so a program that compared part of the address would. Both
// listen on the Services' ports; ::1 is left alone too.
func TestInet6RealIPv6IsLeftAlone(t *testing.T) {
	forEachIPFamily(t, func(t *testing.T, f ipFamily) {
		m := ebpfMode()
		m.fam = f
		s := newSetup(t, m, 2)
		s.sync(t, apitest.Snapshot(true,
			s.web(s.backends(8080, s.pods...)...),
			s.dns(s.backends(5353, s.pods...)...)))
		lookalike := "fd00::a60:a" // ends in 10.96.0.10
		if f.v6() {
			lookalike = "fd01:10:96::10" // the VIP is fd00:10:96::10
		}
		s.client.AddLoopbackAddress(lookalike + "/128")
		s.client.Start(false, testnet.Helper("serve", "ipv6-server", "tcp6:80", "udp6:53")...)
		dp := socketLayer(s.dp).(interface {
			Events() (map[string]uint64, error)
		})
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
				t.Errorf("counter %s went from %d to %d: an address that is no Service's was translated", name, before[name], n)
			}
		}
		// The programs are there and serve the VIP meanwhile: v4-mapped
		// for an IPv4 Service, as itself for an IPv6 one.
		target := mappedVIP + ":80"
		if f.v6() {
			target = s.at(vip, 80)
		}
		if got := testnet.Tally(s.run(t, "tcp6", target, "4")); got["ok pod-0"]+got["ok pod-1"] != 4 {
			t.Errorf("the VIP next to real IPv6: %v", got)
		}
	})
}
