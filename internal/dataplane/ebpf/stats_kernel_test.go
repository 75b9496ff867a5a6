package ebpf

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// portCounters reads the datapath's counters by service port name.
func portCounters(t *testing.T, dp *Dataplane) map[model.ServicePortName]dataplane.ServicePortCounters {
	t.Helper()
	list, err := dp.ServicePortCounters()
	if err != nil {
		t.Fatalf("reading service port counters: %v", err)
	}
	out := make(map[model.ServicePortName]dataplane.ServicePortCounters, len(list))
	for _, c := range list {
		if _, dup := out[c.Name]; dup {
			t.Errorf("%v listed twice", c.Name)
		}
		out[c.Name] = c
	}
	return out
}

// counterDelta is what changed between two readings of one port.
func counterDelta(before, after dataplane.ServicePortCounters) dataplane.ServicePortCounters {
	return dataplane.ServicePortCounters{
		Name:                after.Name,
		Connections:         after.Connections - before.Connections,
		Datagrams:           after.Datagrams - before.Datagrams,
		Refused:             after.Refused - before.Refused,
		ReverseTranslations: after.ReverseTranslations - before.ReverseTranslations,
	}
}

func events(t *testing.T, dp *Dataplane) map[string]uint64 {
	t.Helper()
	e, err := dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// Each way a client reaches a Service is counted on that Service port, and
// on no other: per port, exactly what the global counters count for the
// same traffic.
func TestKernelCountsPerServicePort(t *testing.T) {
	s := newKernelSetup(t, 2)
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	dns := servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...)
	emptyTCP := servicePort("default", "empty", "http", model.TCP, "10.96.0.11:80")
	emptyUDP := servicePort("default", "empty", "dns", model.UDP, "10.96.0.11:53")
	idle := servicePort("default", "idle", "", model.TCP, "10.96.0.12:80", s.backends(8080, s.pods...)...)
	all := []model.ServicePort{web, dns, emptyTCP, emptyUDP, idle}
	s.sync(t, snapshot(true, all...))
	if got := portCounters(t, s.dp); len(got) != len(all) {
		t.Fatalf("counters of %d ports, want %d: %v", len(got), len(all), got)
	}

	dnsMapped := "[::ffff:10.96.0.53]:53"
	for _, c := range []struct {
		name string
		args []string
		// result is what every line the client prints starts with.
		result string
		port   model.ServicePortName
		// want is the port's change. Reverse translations of connected
		// UDP depend on how often the client asks for the peer name:
		// anyReverse wants them equal to the global count, and non-zero.
		want       dataplane.ServicePortCounters
		anyReverse bool
	}{
		{"tcp", []string{"tcp", vip + ":80", "5"}, "ok pod-", web.Name,
			dataplane.ServicePortCounters{Connections: 5, ReverseTranslations: 5}, false}, // getpeername after connect
		{"tcp from AF_INET6", []string{"tcp6", mappedVIP + ":80", "3"}, "ok pod-", web.Name,
			dataplane.ServicePortCounters{Connections: 3, ReverseTranslations: 3}, false},
		{"unconnected udp", []string{"udp", "10.96.0.53:53", "4"}, "ok pod-", dns.Name,
			dataplane.ServicePortCounters{Datagrams: 4, ReverseTranslations: 4}, false}, // recvmsg per reply
		{"connected udp", []string{"udp", "10.96.0.53:53", "3", "connected"}, "ok pod-", dns.Name,
			dataplane.ServicePortCounters{Connections: 1}, true},
		{"unconnected udp from AF_INET6", []string{"udp6", dnsMapped, "2"}, "ok pod-", dns.Name,
			dataplane.ServicePortCounters{Datagrams: 2, ReverseTranslations: 2}, false},
		{"connected udp from AF_INET6", []string{"udp6", dnsMapped, "2", "connected"}, "ok pod-", dns.Name,
			dataplane.ServicePortCounters{Connections: 1}, true},
		{"tcp refused", []string{"tcp", "10.96.0.11:80", "3"}, "err connection refused", emptyTCP.Name,
			dataplane.ServicePortCounters{Refused: 3}, false},
		{"udp refused", []string{"udp", "10.96.0.11:53", "2"}, "err ", emptyUDP.Name,
			dataplane.ServicePortCounters{Refused: 2}, false},
		{"connected udp refused", []string{"udp", "10.96.0.11:53", "1", "connected"}, "err ", emptyUDP.Name,
			dataplane.ServicePortCounters{Refused: 1}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			before, eventsBefore := portCounters(t, s.dp), events(t, s.dp)
			for _, l := range s.run(t, c.args...) {
				if !strings.HasPrefix(l, c.result) {
					t.Errorf("%q, want %q...", l, c.result)
				}
			}
			after, eventsAfter := portCounters(t, s.dp), events(t, s.dp)
			global := func(names ...string) uint64 {
				var n uint64
				for _, name := range names {
					n += eventsAfter[name] - eventsBefore[name]
				}
				return n
			}
			// The global counters of the same events, summed over ports:
			// only c.port sees traffic here.
			want := dataplane.ServicePortCounters{
				Name:                c.port,
				Connections:         global("connect_translated"),
				Datagrams:           global("sendmsg_translated"),
				Refused:             global("refused_no_backend", "refused_missing_slot", "refused_missing_backend"),
				ReverseTranslations: global("reverse_translated"),
			}
			got := counterDelta(before[c.port], after[c.port])
			if got != want {
				t.Errorf("%v counted %+v, the global counters %+v", c.port, got, want)
			}
			if c.anyReverse {
				c.want.ReverseTranslations = want.ReverseTranslations
				if want.ReverseTranslations == 0 {
					t.Error("no reverse translation counted")
				}
			}
			c.want.Name = c.port
			if got != c.want {
				t.Errorf("%v counted %+v, want %+v", c.port, got, c.want)
			}
			for name, a := range after {
				if name != c.port && a != before[name] {
					t.Errorf("%v counted %+v, want no change from %+v", name, a, before[name])
				}
			}
		})
	}
	if c := portCounters(t, s.dp)[idle.Name]; c != (dataplane.ServicePortCounters{Name: idle.Name}) {
		t.Errorf("a Service nobody used counted %+v", c)
	}

	// As the proxy exports them: the ports used, not the idle one.
	reg := prometheus.NewRegistry()
	reg.MustRegister(metrics.NewDatapathCountersCollector(s.dp))
	if n, err := testutil.GatherAndCount(reg, "kube_bpf_proxy_service_connections_translated_total"); err != nil || n != 4 {
		t.Errorf("%d connection series (%v), want 4: web, dns, and the two empty ports, not idle", n, err)
	}
	want := fmt.Sprintf(`
# HELP kube_bpf_proxy_service_refused_total Connects and datagrams to a Service port refused with ECONNREFUSED because it had no backend, by Service port.
# TYPE kube_bpf_proxy_service_refused_total counter
kube_bpf_proxy_service_refused_total{namespace="default",port="dns",protocol="UDP",service="empty"} 3
kube_bpf_proxy_service_refused_total{namespace="default",port="http",protocol="TCP",service="empty"} 3
kube_bpf_proxy_service_refused_total{namespace="default",port="http",protocol="TCP",service="web"} 0
kube_bpf_proxy_service_refused_total{namespace="kube-system",port="dns",protocol="UDP",service="dns"} 0
# HELP kube_bpf_proxy_bpf_map_entries Entries in use in each eBPF map; compare with kube_bpf_proxy_bpf_map_capacity.
# TYPE kube_bpf_proxy_bpf_map_entries gauge
kube_bpf_proxy_bpf_map_entries{map="affinity"} 0
kube_bpf_proxy_bpf_map_entries{map="affinity_match"} 0
kube_bpf_proxy_bpf_map_entries{map="backends"} 4
kube_bpf_proxy_bpf_map_entries{map="cluster_ips"} 4
kube_bpf_proxy_bpf_map_entries{map="revnat"} %d
kube_bpf_proxy_bpf_map_entries{map="service_stats"} 5
kube_bpf_proxy_bpf_map_entries{map="services"} 5
kube_bpf_proxy_bpf_map_entries{map="slots"} 6
`, s.dp.revnat.n)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"kube_bpf_proxy_service_refused_total", "kube_bpf_proxy_bpf_map_entries"); err != nil {
		t.Error(err)
	}
}

// A reverse translation whose Service went meanwhile is counted globally
// only: the UDP socket keeps its reverse entry, but the frontend it names
// is no Service port any more.
func TestKernelReverseTranslationOfRemovedServiceCountsNoPort(t *testing.T) {
	s := newKernelSetup(t, 1)
	dns := servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...)
	s.sync(t, snapshot(true, dns))
	// A resolver keeps one connected socket, sending now and then.
	loop := s.client.StartResolver("10.96.0.53:53")
	defer loop.Stop()
	testnet.AssertAllOK(t, "resolving", loop.Take(3), "pod-0")
	stats := openPinned(t, s.cfg.BPFFSPath, lbMapKbpSvcStats)
	id := s.dp.rec.frontends[dns.ClusterIP].group.id

	// The Service goes; its counters go with its id. A reply still comes
	// back from the backend to the socket (the socket is not ours to
	// destroy for a deleted Service) and is translated, counted globally.
	s.sync(t, snapshot(true))
	var perCPU []lbSvcStats
	if err := stats.Lookup(&id, &perCPU); err == nil {
		t.Fatalf("the removed Service's id %d still has counters", id)
	}
	before := events(t, s.dp)["reverse_translated"]
	loop.Take(3)
	if after := events(t, s.dp)["reverse_translated"]; after <= before {
		t.Fatalf("reverse translations %d -> %d: the test wants replies to the removed Service's socket", before, after)
	}
	if got := portCounters(t, s.dp); len(got) != 0 {
		t.Errorf("counters of removed ports: %v", got)
	}
	n := 0
	err := newPerCPUMap(stats, lbMapKbpSvcStats).Iterate(func(uint32, lbSvcStats) error { n++; return nil })
	if err != nil || n != 0 {
		t.Errorf("the counters map holds %d entries (%v), want 0", n, err)
	}
}

// An id released (a grace period after its Service went) and handed to
// another Service port counts from zero.
func TestKernelReusedServiceIDCountsFromZero(t *testing.T) {
	// Two ids: the third port created takes the one released.
	s := newKernelSetup(t, 1, func(c *Config) { c.MaxServices = 2 })
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	first := servicePort("default", "first", "http", model.TCP, "10.96.0.11:80", s.backends(8080, s.pods...)...)
	s.sync(t, snapshot(true, web, first))
	s.run(t, "tcp", "10.96.0.11:80", "4")
	id := s.dp.rec.frontends[first.ClusterIP].group.id
	if c := portCounters(t, s.dp)[first.Name]; c.Connections != 4 {
		t.Fatalf("first counted %+v, want 4 connections", c)
	}

	s.sync(t, snapshot(true, web))
	second := servicePort("default", "second", "http", model.TCP, "10.96.0.12:80", s.backends(8080, s.pods...)...)
	s.sync(t, snapshot(true, web, second))
	if got := s.dp.rec.frontends[second.ClusterIP].group.id; got != id {
		t.Fatalf("second has id %d, want the released id %d", got, id)
	}
	counters := portCounters(t, s.dp)
	if c := counters[second.Name]; c != (dataplane.ServicePortCounters{Name: second.Name}) {
		t.Errorf("second starts at %+v, want zero", c)
	}
	if _, ok := counters[first.Name]; ok {
		t.Error("the removed port is still listed")
	}
	s.run(t, "tcp", "10.96.0.12:80", "2")
	if c := portCounters(t, s.dp)[second.Name]; c.Connections != 2 {
		t.Errorf("second counted %+v, want 2 connections", c)
	}
}

// Counters survive a restart of the proxy (a new Dataplane on the same
// pins), also one that resizes the maps; before the first sync the ports
// have no names and are not listed.
func TestKernelRestartKeepsCounters(t *testing.T) {
	s := newKernelSetup(t, 2)
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	dns := servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...)
	snap := snapshot(true, web, dns)
	s.sync(t, snap)
	s.run(t, "tcp", vip+":80", "6")
	s.run(t, "udp", "10.96.0.53:53", "3")
	before := portCounters(t, s.dp)
	if before[web.Name].Connections != 6 || before[dns.Name].Datagrams != 3 {
		t.Fatalf("counted %v", before)
	}

	for _, restart := range []struct {
		name      string
		configure func(*Config)
	}{
		{"same capacity", func(*Config) {}},
		{"maps resized", func(c *Config) { c.MaxServices *= 2; c.MaxBackends *= 2 }},
	} {
		s.dp.Close()
		restart.configure(&s.cfg)
		s.dp = s.open(t)
		if got := portCounters(t, s.dp); len(got) != 0 {
			t.Errorf("%s: ports listed before the first sync: %v", restart.name, got)
		}
		s.sync(t, snap)
		if got := portCounters(t, s.dp); got[web.Name] != before[web.Name] || got[dns.Name] != before[dns.Name] {
			t.Errorf("%s: counters after restart %v, want %v", restart.name, got, before)
		}
	}
	if got := pinnedCapacity(t, s.cfg.BPFFSPath, lbMapKbpSvcStats); got != s.cfg.MaxServices {
		t.Errorf("pinned counters map holds %d entries, want %d", got, s.cfg.MaxServices)
	}
	s.run(t, "tcp", vip+":80", "1")
	if got := portCounters(t, s.dp)[web.Name].Connections; got != 7 {
		t.Errorf("web connections after restarts and one more: %d, want 7", got)
	}
}

// A datapath pinned by a version without the counters map (simulated by
// removing its pin) is taken over: the map is created, the ports served
// get counters, and they count.
func TestKernelRestartCreatesMissingCountersMap(t *testing.T) {
	s := newKernelSetup(t, 2)
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	snap := snapshot(true, web)
	s.sync(t, snap)
	s.dp.Close()
	if err := os.Remove(filepath.Join(s.cfg.BPFFSPath, lbMapKbpSvcStats)); err != nil {
		t.Fatal(err)
	}
	s.dp = s.open(t)
	s.sync(t, snap)
	s.run(t, "tcp", vip+":80", "3")
	if c := portCounters(t, s.dp)[web.Name]; c.Connections != 3 {
		t.Errorf("web counted %+v, want 3 connections", c)
	}
}

// The map fill reported is what the maps hold, and their capacities.
func TestKernelMapUsageMatchesMaps(t *testing.T) {
	s := newKernelSetup(t, 2)
	now := time.Unix(1000, 0)
	s.dp.revnat.now = func() time.Time { return now }
	s.sync(t, snapshot(true,
		servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...),
		servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...),
		servicePort("default", "empty", "http", model.TCP, "10.96.0.11:80")))
	// Open translated sockets hold a reverse entry each: the helper's
	// connected socket and one more.
	c := startIdleUDP(t, s, "10.96.0.53:53", false)
	if got := c.do(t, "hold 1"); got != "held 1 1" {
		t.Fatalf("one more socket: %q", got)
	}

	check := func(phase string) {
		t.Helper()
		usage, err := s.dp.MapUsage()
		if err != nil {
			t.Fatal(err)
		}
		o := &s.dp.kernel.objs
		want := map[string][2]int{}
		for name, m := range map[string]*ebpf.Map{"services": o.KbpServices, "slots": o.KbpSlots,
			"backends": o.KbpBackends, "revnat": o.KbpRevnat, "service_stats": o.KbpSvcStats,
			"affinity": o.KbpAffinity, "affinity_match": o.KbpAffMatch, "cluster_ips": o.KbpClusterIps} {
			n := 0
			var k, v []byte
			if m == o.KbpSvcStats {
				var perCPU []lbSvcStats
				var id uint32
				it := m.Iterate()
				for it.Next(&id, &perCPU) {
					n++
				}
				if err := it.Err(); err != nil {
					t.Fatal(err)
				}
			} else {
				it := m.Iterate()
				for it.Next(&k, &v) {
					n++
				}
				if err := it.Err(); err != nil {
					t.Fatal(err)
				}
			}
			want[name] = [2]int{n, int(m.MaxEntries())}
		}
		got := map[string][2]int{}
		for _, u := range usage {
			got[u.Map] = [2]int{u.Entries, u.Capacity}
		}
		if len(got) != len(want) || len(usage) != len(want) {
			t.Fatalf("%s: usage %v, want the maps %v", phase, got, want)
		}
		for name, w := range want {
			if got[name] != w {
				t.Errorf("%s: %s reported (entries, capacity) %v, the map holds %v", phase, name, got[name], w)
			}
		}
	}
	check("after sync")
	if got := pinnedCapacity(t, s.cfg.BPFFSPath, lbMapKbpSvcStats); got != s.cfg.MaxServices {
		t.Errorf("counters map capacity %d, want --%s %d", got, FlagMaxServices, s.cfg.MaxServices)
	}

	// The reverse map's count is reused for a while, then taken again.
	usage := func() int {
		u, err := s.dp.MapUsage()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range u {
			if m.Map == "revnat" {
				return m.Entries
			}
		}
		t.Fatal("no revnat usage")
		return 0
	}
	cached := usage()
	if got := c.do(t, "hold 1"); got != "held 1 1" {
		t.Fatalf("one more socket: %q", got)
	}
	if got := usage(); got != cached {
		t.Errorf("revnat count within its cache period: %d, want the cached %d", got, cached)
	}
	now = now.Add(revnatCountTTL)
	if got := usage(); got != cached+1 {
		t.Errorf("revnat count after its cache period: %d, want %d", got, cached+1)
	}
	check("after more sockets")
}

// What a scrape costs on a busy node: the counters of 10k service ports.
func BenchmarkKernelServicePortCounters(b *testing.B) {
	dp := benchDatapath(b, 10000, 10)
	for b.Loop() {
		list, err := dp.ServicePortCounters()
		if err != nil || len(list) != 10000 {
			b.Fatalf("%d ports, %v", len(list), err)
		}
	}
}
