package ebpf

import (
	"maps"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// mappedVIP is the VIP as an AF_INET6 socket names it.
const mappedVIP = "[::ffff:" + vip + "]"

// Which program the kernel runs for each way an AF_INET6 socket reaches an
// IPv4 Service, by the programs' run counts: what bpf/lb.c's header says.
func TestKernelHooksPerPath(t *testing.T) {
	s := newKernelSetup(t, 2)
	s.sync(t, snapshot(true,
		servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...),
		servicePort("default", "dns", "dns", model.UDP, vip+":53", s.backends(5353, s.pods...)...)))
	// Run counts are kept while some process holds this (Linux 5.8+).
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Fatalf("enabling BPF run statistics: %v", err)
	}
	defer stats.Close()
	runCounts := func() map[string]uint64 {
		t.Helper()
		out := map[string]uint64{}
		for _, p := range programs {
			st, err := p.prog(&s.dp.kernel.objs).Stats()
			if err != nil {
				t.Fatal(err)
			}
			out[p.name] = st.RunCount
		}
		return out
	}

	for _, c := range []struct {
		name string
		args []string
		peer string // what every result line ends with
		runs map[string]uint64
	}{{
		name: "tcp6",
		args: []string{"tcp6", mappedVIP + ":80", "1"},
		peer: "peer=" + mappedVIP + ":80",
		runs: map[string]uint64{"connect6": 1, "getpeername6": 1, "sock_release": 1},
	}, {
		name: "udp6 unconnected: sendmsg4, udpv6_sendmsg passes it a sockaddr_in",
		args: []string{"udp6", mappedVIP + ":53", "2"},
		peer: "from=" + mappedVIP + ":53",
		runs: map[string]uint64{"sendmsg4": 2, "recvmsg6": 2, "sock_release": 1},
	}, {
		name: "udp6 connected: each send runs sendmsg4 too, with the backend",
		args: []string{"udp6", mappedVIP + ":53", "2", "connected"},
		peer: "peer=" + mappedVIP + ":53 from=" + mappedVIP + ":53",
		runs: map[string]uint64{"connect6": 1, "sendmsg4": 2, "recvmsg6": 2, "getpeername6": 2, "sock_release": 1},
	}, {
		name: "udp6 connected with a sockaddr_in",
		args: []string{"udp6", mappedVIP + ":53", "1", "connected", "inet4addr"},
		peer: "peer=" + mappedVIP + ":53 from=" + mappedVIP + ":53",
		runs: map[string]uint64{"connect4": 1, "sendmsg4": 1, "recvmsg6": 1, "getpeername6": 1, "sock_release": 1},
	}, {
		name: "tcp from AF_INET, for comparison",
		args: []string{"tcp", vip + ":80", "1"},
		peer: "peer=" + vip + ":80",
		runs: map[string]uint64{"connect4": 1, "getpeername4": 1, "sock_release": 1},
	}} {
		t.Run(c.name, func(t *testing.T) {
			before := runCounts()
			for _, l := range s.run(t, c.args...) {
				if !strings.HasPrefix(l, "ok pod-") || !strings.HasSuffix(l, c.peer) {
					t.Errorf("%q, want an answer from a pod ending in %q", l, c.peer)
				}
			}
			ran := map[string]uint64{}
			for name, n := range runCounts() {
				if n != before[name] {
					ran[name] = n - before[name]
				}
			}
			if !maps.Equal(ran, c.runs) {
				t.Errorf("programs run %v, want %v", ran, c.runs)
			}
		})
	}
}
