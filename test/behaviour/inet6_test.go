package behaviour

import (
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// Applications on AF_INET6 sockets (IPV6_V6ONLY off, Java's default) reach
// IPv4 Services as ::ffff:VIP: the scenarios that take a socketFamily run
// from both kinds of socket.

// mappedVIP is the VIP as an AF_INET6 socket names it.
const mappedVIP = "[::ffff:" + vip + "]"

// Real IPv6 is not ours (yet): the *6 programs leave it alone. The server's
// address ends in the VIP's 32 bits and listens on the Service's port, so a
// program that looked at the last word alone would send the connect to a
// backend instead.
func TestInet6RealIPv6IsLeftAlone(t *testing.T) {
	s := newSetup(t, ebpfMode(), 2)
	s.sync(t, apitest.Snapshot(true,
		s.web(s.backends(8080, s.pods...)...),
		s.dns(s.backends(5353, s.pods...)...)))
	const lookalike = "fd00::a60:a" // ends in 10.96.0.10
	s.client.AddLoopbackAddress(lookalike + "/128")
	s.client.Start(false, testnet.Helper("serve", "ipv6-server", "tcp6:80", "udp6:53")...)
	dp := socketLayer(s.dp).(*ebpf.Dataplane)
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
