package ebpf

import (
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// TestKernelFeatures is the eBPF mode's feature list, one subtest each, on
// one datapath: the subset `make kernels` and TestKernelMatrix run on every
// kernel of the matrix (test/utils/kernelvm), so each subtest stays short.
// A subtest that works differently on this kernel than on the newest logs
// "KBP-FEATURE <name> degraded: <why>", which the matrix shows as degraded.
func TestKernelFeatures(t *testing.T) {
	s := newKernelSetup(t, 2)
	const (
		emptyVIP    = "10.96.0.11"
		affinityVIP = "10.96.0.12"
	)
	s.sync(t, snapshot(true,
		servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...),
		servicePort("default", "dns", "dns", model.UDP, vip+":53", s.backends(5353, s.pods...)...),
		servicePort("default", "empty", "http", model.TCP, emptyVIP+":80"),
		withAffinity(servicePort("default", "sticky", "http", model.TCP, affinityVIP+":80", s.backends(8080, s.pods...)...), time.Hour)))
	kernel := s.dp.kernel.kernel
	t.Logf("kernel %s: bpf_set_retval %v, bpf_ktime_get_coarse_ns %v, SO_NETNS_COOKIE %v", kernel.Release, kernel.SetRetval, kernel.KtimeCoarse, kernel.NetnsCookie)

	// expect runs a client and checks that every line is an answer from a
	// backend that ends in suffix.
	expect := func(t *testing.T, suffix string, args ...string) {
		t.Helper()
		lines := s.run(t, args...)
		if len(lines) == 0 {
			t.Fatalf("%v: no result", args)
		}
		for _, l := range lines {
			if !strings.HasPrefix(l, "ok pod-") || !strings.HasSuffix(l, suffix) {
				t.Errorf("%v: %q, want an answer from a pod ending in %q", args, l, suffix)
			}
		}
	}

	t.Run("load", func(t *testing.T) {
		if len(s.dp.kernel.links) != len(programs) {
			t.Errorf("%d programs attached, want %d", len(s.dp.kernel.links), len(programs))
		}
		for _, p := range programs {
			info, err := p.prog(&s.dp.kernel.objs).Info()
			if err != nil {
				t.Errorf("%s: %v", p.name, err)
				continue
			}
			t.Logf("%s: %s", p.name, info.Name)
		}
	})
	t.Run("node-netns", func(t *testing.T) {
		var node lbNodeConfig
		if err := s.dp.kernel.objs.KbpNode.Lookup(uint32(0), &node); err != nil {
			t.Fatal(err)
		}
		switch {
		case kernel.NetnsCookie && node.NetnsCookie == 0:
			t.Error("the kernel tells network namespace cookies, but the programs were not told the node's")
		case !kernel.NetnsCookie && node.NetnsCookie != 0:
			t.Errorf("node cookie %d written on a kernel without SO_NETNS_COOKIE", node.NetnsCookie)
		case !kernel.NetnsCookie:
			t.Logf("KBP-FEATURE node-netns degraded: the node's sockets are not told apart, loopback node ports not served at socket level (SO_NETNS_COOKIE, Linux 5.14)")
		}
	})
	t.Run("connect4", func(t *testing.T) {
		expect(t, "", "tcp", vip+":80", "4")
	})
	t.Run("getpeername4", func(t *testing.T) {
		expect(t, "peer="+vip+":80", "tcp", vip+":80", "2")
	})
	t.Run("sendmsg4", func(t *testing.T) {
		expect(t, "", "udp", vip+":53", "2")
	})
	t.Run("recvmsg4", func(t *testing.T) {
		expect(t, "from="+vip+":53", "udp", vip+":53", "2")
	})
	t.Run("connect6", func(t *testing.T) {
		expect(t, "", "tcp6", mappedVIP+":80", "2")
	})
	t.Run("getpeername6", func(t *testing.T) {
		expect(t, "peer="+mappedVIP+":80", "tcp6", mappedVIP+":80", "2")
	})
	t.Run("recvmsg6", func(t *testing.T) {
		expect(t, "from="+mappedVIP+":53", "udp6", mappedVIP+":53", "2")
	})
	t.Run("affinity", func(t *testing.T) {
		tally := testnet.Tally(s.run(t, "tcp", affinityVIP+":80", "6"))
		if len(tally) != 1 {
			t.Errorf("6 connects with ClientIP affinity went to %v, want one backend", tally)
		}
	})
	t.Run("refusal", func(t *testing.T) {
		want := "err connection refused"
		if !kernel.SetRetval {
			want = "err operation not permitted"
		}
		before, err := s.dp.Events()
		if err != nil {
			t.Fatal(err)
		}
		if got := testnet.Tally(s.run(t, "tcp", emptyVIP+":80", "2")); got[want] != 2 {
			t.Errorf("connects to a Service without endpoints: %v, want 2 %q", got, want)
		}
		after, err := s.dp.Events()
		if err != nil {
			t.Fatal(err)
		}
		if n := after["refused_with_eperm"] - before["refused_with_eperm"]; kernel.SetRetval && n != 0 || !kernel.SetRetval && n != 2 {
			t.Errorf("refused_with_eperm counted %d", n)
		}
		if !kernel.SetRetval {
			t.Logf("KBP-FEATURE refusal degraded: EPERM instead of ECONNREFUSED (no bpf_set_retval, Linux 5.18)")
		}
	})
	t.Run("sock_release", func(t *testing.T) {
		count := func() int {
			t.Helper()
			n, err := countEntries[uint64, lbSockRevnat](s.dp.kernel.objs.KbpRevnat)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
		expect(t, "", "tcp", vip+":80", "3")
		expect(t, "", "udp", vip+":53", "2", "connected")
		expect(t, "", "udp", vip+":53", "2")
		// The clients have exited: every socket's reverse entry went
		// with it, connected or not, these and the subtests' above.
		if n := count(); n != 0 {
			t.Errorf("%d reverse entries after every socket closed, want 0", n)
		}
	})

	// Last: the datapath stays confined.
	t.Run("host-netns-only", func(t *testing.T) {
		if err := s.dp.ConfineToNodeNetNS(); err != nil {
			t.Fatal(err)
		}
		before, err := s.dp.Events()
		if err != nil {
			t.Fatal(err)
		}
		// A pod's connects are neither translated nor refused: the
		// packet layer's (absent here) rules would serve them, and the
		// test pod has no route for a VIP.
		for _, l := range append(s.run(t, "tcp", vip+":80", "2"), s.run(t, "tcp", emptyVIP+":80", "1")...) {
			if strings.HasPrefix(l, "ok pod-") || strings.Contains(l, "refused") || strings.Contains(l, "not permitted") {
				t.Errorf("a pod's connect with the socket layer confined: %q, want it left alone", l)
			}
		}
		node := s.net.HostNetwork().Results("tcp", vip+":80", "2")
		after, err := s.dp.Events()
		if err != nil {
			t.Fatal(err)
		}
		translated := after["connect_translated"] - before["connect_translated"]
		if kernel.NetnsCookie {
			for _, l := range node {
				if !strings.HasPrefix(l, "ok pod-") {
					t.Errorf("the node's connect with the socket layer confined: %q, want a backend", l)
				}
			}
			if translated != 2 {
				t.Errorf("connect_translated rose by %d, want 2: the node's connects only", translated)
			}
			return
		}
		// The node's namespace is unknown to the programs: its sockets
		// go to the packet layer too (fail-safe, at its cost).
		if translated != 0 {
			t.Errorf("connect_translated rose by %d, want 0 without the node's cookie", translated)
		}
		t.Logf("KBP-FEATURE host-netns-only degraded: the node's sockets too are left to the packet layer (SO_NETNS_COOKIE, Linux 5.14)")
	})
}

// The variant older kernels get, loaded here: the same features, a refusal
// failing with EPERM, and affinity on the exact clock. The kernel matrix
// proves the same on the kernels that lack the helpers.
func TestKernelVariantForOlderKernels(t *testing.T) {
	s := newKernelSetup(t, 2, func(c *Config) {
		c.withoutFeatures = func(k *Kernel) { k.SetRetval, k.KtimeCoarse = false, false }
	})
	s.sync(t, snapshot(true,
		servicePort("default", "empty", "http", model.TCP, "10.96.0.11:80"),
		withAffinity(servicePort("default", "sticky", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...), time.Hour)))
	if got := testnet.Tally(s.run(t, "tcp", "10.96.0.11:80", "3")); got["err operation not permitted"] != 3 {
		t.Errorf("connects to a Service without endpoints: %v, want 3 refused with EPERM", got)
	}
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "6")); len(got) != 1 {
		t.Errorf("6 connects with ClientIP affinity went to %v, want one backend", got)
	}
	events, err := s.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	if events["refused_with_eperm"] != 3 || events["refused_no_backend"] != 3 || events["affinity_hit"] != 5 {
		t.Errorf("events %v, want refused_with_eperm = refused_no_backend = 3, affinity_hit = 5", events)
	}
}
