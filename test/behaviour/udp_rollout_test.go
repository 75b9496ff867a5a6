package behaviour

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// Long-lived UDP clients (resolvers in nginx, HAProxy, Envoy, c-ares;
// statsd clients) keep one socket and retry on it after a timeout. When
// the backend they are pinned to goes away, the iptables mode deletes the
// flow's conntrack entries so that the next datagram is balanced again; the
// eBPF mode, which translated the socket at connect(), destroys the socket
// so that the client opens a new one.

// vanish makes pods unreachable without a word, as pods that are gone
// from a remote node are: the node routes their addresses to void, a
// namespace that drops what it gets without answering.
func (s *setup) vanish(t *testing.T, void *testnet.Pod, pods ...*testnet.Pod) {
	t.Helper()
	for _, p := range pods {
		cmd := s.net.NodeCommand(context.Background(), "ip", "route", "replace", netip.PrefixFrom(p.IP, p.IP.BitLen()).String(),
			"via", void.IP.String(), "dev", void.HostIf, "onlink")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("making %s vanish: %v: %s", p.Name, err, out)
		}
	}
}

func parseResolverResults(t *testing.T, lines []string) []testnet.ResolverResult {
	t.Helper()
	out := make([]testnet.ResolverResult, 0, len(lines))
	for _, l := range lines {
		r, err := testnet.ParseResolverResult(l)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func podNames(pods []*testnet.Pod) []string {
	var names []string
	for _, p := range pods {
		names = append(names, p.Name)
	}
	return names
}

// untilServed collects a resolver's results until the last streak of them
// are answers from the given pods, and fails the test if that takes more
// than max results.
func untilServed(t *testing.T, phase string, r *testnet.Loop, by []*testnet.Pod, streak, max int) []testnet.ResolverResult {
	t.Helper()
	names := podNames(by)
	var out []testnet.ResolverResult
	for {
		out = append(out, parseResolverResults(t, r.Take(1))...)
		run := 0
		for i := len(out) - 1; i >= 0 && slices.Contains(names, out[i].Backend); i-- {
			run++
		}
		if run >= streak {
			return out
		}
		if len(out) > max {
			t.Fatalf("%s: %d queries and still not answered by %v %d times in a row:\n%s",
				phase, len(out), names, streak, resultLines(out))
		}
	}
}

func resultLines(rs []testnet.ResolverResult) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString("  " + r.Line + "\n")
	}
	return b.String()
}

func failures(rs []testnet.ResolverResult) []testnet.ResolverResult {
	var out []testnet.ResolverResult
	for _, r := range rs {
		if r.Err != "" {
			out = append(out, r)
		}
	}
	return out
}

// allAnswered fails the test unless every result is an answer from one of
// the pods.
func allAnswered(t *testing.T, phase string, rs []testnet.ResolverResult, by ...*testnet.Pod) {
	t.Helper()
	names := podNames(by)
	for _, r := range rs {
		if !slices.Contains(names, r.Backend) {
			t.Fatalf("%s: %q, want answers from %v only:\n%s", phase, r.Line, names, resultLines(rs))
		}
	}
}

// A CoreDNS rollout under resolvers holding one connected socket each, in
// a pod (AF_INET, and AF_INET6 reaching the VIP as ::ffff:VIP, as Java
// does) and in a hostNetwork pod (the node's namespace): two backends; two
// new ones join (surge); the old ones terminate, serving while they drain,
// then leave the endpoints and vanish. Twice, so that every backend is
// replaced and the sockets that replaced the first ones are replaced too.
// Each replaced socket may cost its client one query.
func TestUDPConnectedClientFollowsRollout(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 6)
		void := s.net.AddPod("void", s.fam.ip("10.244.253.1"))
		waves := [][]*testnet.Pod{s.pods[0:2], s.pods[2:4], s.pods[4:6]}
		s.sync(t, apitest.Snapshot(true, s.dns(s.backends(5353, waves[0]...)...)))
		clients := []struct {
			name string
			pod  *testnet.Pod
			args []string
		}{
			{"client", s.client, []string{s.at(vip, 53)}},
			{"client (AF_INET6)", s.client, []string{"[::ffff:" + vip + "]:53", "inet6"}},
			{"host network", s.net.HostNetwork(), []string{s.at(vip, 53)}},
		}
		if s.fam.v6() {
			// An IPv6 VIP has one way in, an AF_INET6 socket: "client" is it.
			clients = slices.Delete(clients, 1, 2)
		}
		resolvers := make([]*testnet.Loop, len(clients))
		for i, c := range clients {
			resolvers[i] = c.pod.StartResolver(c.args[0], c.args[1:]...)
			defer resolvers[i].Stop()
		}
		each := func(fn func(name string, r *testnet.Loop)) {
			for i, r := range resolvers {
				fn(clients[i].name, r)
			}
		}
		each(func(client string, r *testnet.Loop) {
			allAnswered(t, client+", before the rollout", parseResolverResults(t, r.Take(10)), waves[0]...)
		})

		for wave := 1; wave < len(waves); wave++ {
			old, next := waves[wave-1], waves[wave]
			both := append(slices.Clone(old), next...)
			phase := func(client, what string) string { return fmt.Sprintf("%s, wave %d, %s", client, wave, what) }

			s.sync(t, apitest.Snapshot(false, s.dns(s.backends(5353, both...)...)))
			each(func(client string, r *testnet.Loop) {
				allAnswered(t, phase(client, "surge"), parseResolverResults(t, append(r.Settle(), r.Take(10)...)), both...)
			})

			// Terminating but serving: new sockets go to the new pods,
			// the established ones drain where they are.
			s.sync(t, apitest.Snapshot(false, apitest.WithServing(s.dns(s.backends(5353, next...)...), s.backends(5353, both...)...)))
			each(func(client string, r *testnet.Loop) {
				allAnswered(t, phase(client, "drain"), parseResolverResults(t, append(r.Settle(), r.Take(10)...)), both...)
			})

			s.sync(t, apitest.Snapshot(false, s.dns(s.backends(5353, next...)...)))
			s.vanish(t, void, old...)
			each(func(client string, r *testnet.Loop) {
				results := parseResolverResults(t, r.Settle())
				results = append(results, untilServed(t, phase(client, "after the old pods left"), r, next, 5, 20)...)
				if f := failures(results); len(f) > 1 {
					t.Errorf("%s: %d failed queries for one replaced socket, want at most 1:\n%s",
						phase(client, "after the old pods left"), len(f), resultLines(results))
				}
			})
		}
		if m.socketLevel {
			// One socket replaced per client and wave: the servers hold
			// unconnected sockets only.
			if got, want := datapathEvents(t, s)["udp_sockets_destroyed"], uint64(len(clients)*(len(waves)-1)); got != want {
				t.Errorf("udp_sockets_destroyed = %d, want %d", got, want)
			}
		}
	})
}

func datapathEvents(t *testing.T, s *setup) map[string]uint64 {
	t.Helper()
	dp, ok := socketLayer(s.dp).(interface {
		Events() (map[string]uint64, error)
	})
	if !ok {
		t.Fatalf("%T has no event counters", s.dp)
	}
	events, err := dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	return events
}

// A socket connected to a VIP before its Service existed was never
// translated (eBPF) or has an untranslated conntrack entry (iptables); it
// must get through once the Service has an endpoint.
func TestUDPSocketConnectedBeforeServiceGetsThrough(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 1)
		s.sync(t, apitest.Snapshot(true))
		r := s.client.StartResolver(s.at(vip, 53), "timeout=1s")
		defer r.Stop()
		for _, res := range parseResolverResults(t, r.Take(2)) {
			if res.Err != "timeout" {
				t.Fatalf("before the Service exists: %q, want a timeout", res.Line)
			}
		}

		s.sync(t, apitest.Snapshot(false, s.dns(s.backends(5353, s.pods[0])...)))
		before := parseResolverResults(t, r.Settle())
		after := untilServed(t, "once the Service exists", r, s.pods[:1], 5, 20)
		// Queries sent before the sync time out; one more may fail as the
		// socket is replaced.
		var failed []testnet.ResolverResult
		for _, res := range failures(before) {
			if res.Err != "timeout" {
				failed = append(failed, res)
			}
		}
		failed = append(failed, failures(after)...)
		if len(failed) > 1 {
			t.Errorf("%d queries failed once the Service existed, want at most 1:\n%s",
				len(failed), resultLines(append(before, after...)))
		}
		for _, res := range after {
			if res.Backend != "" && res.From != s.at(vip, 53) {
				t.Errorf("answer not from the VIP: %q", res.Line)
			}
		}
	})
}

// An unconnected socket is balanced at each sendmsg() (eBPF) or has its
// conntrack entry deleted (iptables): it follows a removed backend without
// being destroyed, so its source port, which a server may know the client
// by, never changes.
func TestUDPUnconnectedSocketKeepsItsPortAcrossBackendRemoval(t *testing.T) {
	forEachMode(t, func(t *testing.T, m mode) {
		s := newSetup(t, m, 2)
		void := s.net.AddPod("void", s.fam.ip("10.244.253.1"))
		s.sync(t, apitest.Snapshot(true, s.dns(s.backends(5353, s.pods...)...)))
		r := s.client.StartResolver(s.at(vip, 53), "unconnected")
		defer r.Stop()
		results := parseResolverResults(t, r.Take(5))
		allAnswered(t, "before", results, s.pods...)
		var gone *testnet.Pod
		for _, p := range s.pods {
			if results[len(results)-1].Backend == p.Name {
				gone = p
			}
		}
		stays := s.pods[0]
		if gone == stays {
			stays = s.pods[1]
		}

		s.sync(t, apitest.Snapshot(false, s.dns(s.backends(5353, stays)...)))
		s.vanish(t, void, gone)
		results = append(results, parseResolverResults(t, r.Settle())...)
		results = append(results, untilServed(t, "after "+gone.Name+" left", r, []*testnet.Pod{stays}, 5, 20)...)
		if f := failures(results); len(f) > 1 {
			t.Errorf("%d failed queries, want at most 1:\n%s", len(f), resultLines(results))
		}
		for _, res := range results {
			if res.Gen != 1 || res.LPort != results[0].LPort {
				t.Fatalf("the unconnected socket was replaced or changed its port (was %d): %q\n%s",
					results[0].LPort, res.Line, resultLines(results))
			}
		}
	})
}

// socketLayer unwraps a datapath to its innermost layer (the eBPF mode's
// socket layer, under its packet layer), whose counters the tests read.
func socketLayer(dp dataplane.Dataplane) dataplane.Dataplane {
	for {
		u, ok := dp.(interface{ Unwrap() dataplane.Dataplane })
		if !ok {
			return dp
		}
		dp = u.Unwrap()
	}
}
