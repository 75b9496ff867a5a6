package ebpf

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

var scaleSnapshot = apitest.ScaleSnapshot

func benchConfig(b *testing.B) Config {
	n := testnet.New(b)
	return Config{
		BPFFSPath:   testnet.BPFFS(b),
		CgroupPath:  n.Cgroup,
		MaxServices: DefaultMaxServices,
		MaxBackends: DefaultMaxBackends,
		MaxSockets:  DefaultMaxRevNAT,
		NodeNetNS:   "/run/netns/" + n.Node,
		NetNSDirs:   []string{n.PodNetNSDir},
	}
}

func maxRSSMiB() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Maxrss) / 1024 // Linux reports KiB
}

// BenchmarkKernelFullSync programs 10k and 20k services x 10 endpoints into
// empty kernel maps (at the default capacities) per iteration: a cold
// node's first sync.
func BenchmarkKernelFullSync(b *testing.B) {
	for _, n := range []int{10000, 20000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			cfg := benchConfig(b)
			snap := scaleSnapshot(n, 10)
			ctx := context.Background()
			for b.Loop() {
				b.StopTimer()
				dp, err := New(cfg)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if err := dp.Sync(ctx, snap); err != nil {
					b.Fatal(err)
				}
				closeUntimed(b, dp, cfg)
			}
			b.ReportMetric(maxRSSMiB(), "peak-RSS-MiB")
		})
	}
}

// BenchmarkKernelOneEndpointChange replaces one endpoint of one service at
// 10k x 10, the common case of a pod being replaced. Each sync writes the
// new backend and its slot, the change connects see, then waits one grace
// period before it deletes the old backend: grace-ns/op is that wait.
func BenchmarkKernelOneEndpointChange(b *testing.B) {
	cfg := benchConfig(b)
	dp, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Close(); _ = Cleanup(cfg.BPFFSPath) })
	snap := scaleSnapshot(10000, 10)
	ctx := context.Background()
	if err := dp.Sync(ctx, snap); err != nil {
		b.Fatal(err)
	}
	variants := apitest.EndpointChange(snap, model.ServiceName{Namespace: "bench", Name: "svc-4242"})
	grace := &timedGrace{gracePeriod: dp.rec.grace}
	dp.rec.grace = grace
	i := 0
	for b.Loop() {
		if err := dp.Sync(ctx, variants[i%2]); err != nil {
			b.Fatal(err)
		}
		i++
	}
	b.ReportMetric(float64(grace.total.Nanoseconds())/float64(i), "grace-ns/op")
	b.ReportMetric(maxRSSMiB(), "peak-RSS-MiB")
}

// timedGrace adds up the time spent waiting for grace periods.
type timedGrace struct {
	gracePeriod
	total time.Duration
}

func (g *timedGrace) wait() error {
	start := time.Now()
	err := g.gracePeriod.wait()
	g.total += time.Since(start)
	return err
}

// BenchmarkKernelRestore reads 10k x 10 back from the kernel maps, as a
// restarted proxy does, and as a full sync does to repair drift.
func BenchmarkKernelRestore(b *testing.B) {
	dp := benchDatapath(b, 10000, 10)
	for b.Loop() {
		if err := dp.rec.restore(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkKernelGracePeriod is what one wait costs in each way the kernel
// offers; a sync with deletions pays it once.
func BenchmarkKernelGracePeriod(b *testing.B) {
	outer, inner, err := newMapInMap()
	if err != nil {
		b.Fatal(err)
	}
	defer outer.Close()
	defer inner.Close()
	ways := []struct {
		name string
		g    *rcuGracePeriod
	}{
		{"membarrier", &rcuGracePeriod{membarrier: true}},
		{"map-in-map", &rcuGracePeriod{outer: outer, inner: inner}},
	}
	for _, w := range ways {
		b.Run(w.name, func(b *testing.B) {
			for b.Loop() {
				if err := w.g.wait(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkKernelCountersCost measures what a change to the programs costs
// per call, against a baseline build of them, in one run: the connect4,
// getpeername4, sendmsg4 and recvmsg4 links are switched between the two
// builds (bpf_link_update, in place) before each batch of TCP connects and
// unconnected UDP requests from a client pod, the builds alternating, and each program's run time comes from the kernel's BPF run
// statistics, which count only the program. The baseline is an object file
// of an earlier lb.c, loaded against this datapath's maps:
//
//	git show REV:internal/dataplane/ebpf/lb_bpfel.o > /tmp/base.o
//	KBP_BASELINE_OBJ=/tmp/base.o go test -run - -bench KernelCountersCost ./internal/dataplane/ebpf
//
// Each iteration is one batch of 200 connects and 200 UDP requests to
// Services per build, and one of 200 connects to a pod directly, which is
// no Service's: its metrics are named <hook>-direct-...
//
// A baseline whose maps differ from this build's is loaded with its own
// copy of each map it has and this build lacks, or has in another shape.
func BenchmarkKernelCountersCost(b *testing.B) {
	path := os.Getenv("KBP_BASELINE_OBJ")
	if path == "" {
		b.Skip("set KBP_BASELINE_OBJ to a baseline lb_bpfel.o")
	}
	s := newKernelSetup(b, 2)
	// The Service CIDR is known, as it is on a node: connects that are no
	// Service's are checked against it.
	s.sync(b, onNode(kernelNode, true, servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...),
		servicePort("default", "dns", "dns", model.UDP, vip+":53", s.backends(5353, s.pods...)...)))
	spec, err := ebpf.LoadCollectionSpec(path)
	if err != nil {
		b.Fatal(err)
	}
	o := &s.dp.kernel.objs
	replacements := map[string]*ebpf.Map{}
	for name, m := range map[string]*ebpf.Map{lbMapKbpServices: o.KbpServices, lbMapKbpSlots: o.KbpSlots,
		lbMapKbpBackends: o.KbpBackends, lbMapKbpRevnat: o.KbpRevnat, lbMapKbpStats: o.KbpStats, lbMapKbpSvcStats: o.KbpSvcStats,
		lbMapKbpAffinity: o.KbpAffinity, lbMapKbpAffMatch: o.KbpAffMatch, lbMapKbpClusterIps: o.KbpClusterIps,
		lbMapKbpSvcRanges: o.KbpSvcRanges, lbMapKbpNode: o.KbpNode} {
		if ms, ok := spec.Maps[name]; ok {
			ms.MaxEntries = m.MaxEntries()
			ms.Pinning = ebpf.PinNone
			replacements[name] = m
		}
	}
	for _, ms := range spec.Maps {
		ms.Pinning = ebpf.PinNone
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: replacements})
	if err != nil {
		b.Fatalf("loading the baseline: %v", err)
	}
	defer coll.Close()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatal(err)
	}
	defer stats.Close()

	type hook struct {
		name string
		link interface{ Update(*ebpf.Program) error }
		// progs[0] is the baseline, progs[1] this build.
		progs [2]*ebpf.Program
	}
	var hooks []*hook
	for i, p := range programs {
		if !slices.Contains([]string{"connect4", "getpeername4", "sendmsg4", "recvmsg4"}, p.name) {
			continue
		}
		base := coll.Programs["kbp_"+p.name]
		if base == nil {
			b.Fatalf("the baseline has no kbp_%s", p.name)
		}
		hooks = append(hooks, &hook{name: p.name, link: s.dp.kernel.links[i], progs: [2]*ebpf.Program{base, p.prog(o)}})
	}
	runStats := func(p *ebpf.Program) (ns, runs uint64) {
		st, err := p.Stats()
		if err != nil {
			b.Fatal(err)
		}
		return uint64(st.Runtime), st.RunCount
	}
	// Each workload is measured apart: connects to Services, and connects
	// to a pod directly, which is no Service's (most of what a node
	// connects to), so that the cost a change adds to the path every
	// other connect takes shows on its own.
	workloads := []struct {
		name string // "" for the Services, as the metrics were named first
		run  func()
	}{
		{"", func() {
			if got := testnet.Tally(s.run(b, "tcp", vip+":80", "200")); got["ok pod-0"]+got["ok pod-1"] != 200 {
				b.Fatalf("connects: %v", got)
			}
			for _, l := range s.run(b, "udp", vip+":53", "200") {
				if !strings.HasPrefix(l, "ok pod-") {
					b.Fatalf("udp: %q", l)
				}
			}
		}},
		{"direct", func() {
			if got := testnet.Tally(s.run(b, "tcp", s.pods[0].IP.String()+":8080", "200")); got["ok pod-0"] != 200 {
				b.Fatalf("direct connects: %v", got)
			}
		}},
	}
	type stat struct {
		// ns and runs add up each build's runs.
		ns, runs [2]uint64
		// deltas are this build's ns/run minus the baseline's, per round:
		// their median is robust to rounds that other load slowed.
		deltas []float64
	}
	measured := make(map[string]*stat) // by hook and workload
	key := func(h *hook, workload string) string {
		if workload == "" {
			return h.name
		}
		return h.name + "-" + workload
	}
	round := 0
	for b.Loop() {
		for _, w := range workloads {
			perRun := make([][2]float64, len(hooks))
			for k := range 2 {
				build := (round + k) % 2 // alternate which build goes first
				var ns0, runs0 []uint64
				for _, h := range hooks {
					if err := h.link.Update(h.progs[build]); err != nil {
						b.Fatal(err)
					}
					ns, runs := runStats(h.progs[build])
					ns0, runs0 = append(ns0, ns), append(runs0, runs)
				}
				w.run()
				for i, h := range hooks {
					ns, runs := runStats(h.progs[build])
					st := measured[key(h, w.name)]
					if st == nil {
						st = &stat{}
						measured[key(h, w.name)] = st
					}
					st.ns[build] += ns - ns0[i]
					st.runs[build] += runs - runs0[i]
					perRun[i][build] = float64(ns-ns0[i]) / float64(max(runs-runs0[i], 1))
				}
			}
			for i, h := range hooks {
				st := measured[key(h, w.name)]
				st.deltas = append(st.deltas, perRun[i][1]-perRun[i][0])
			}
		}
		round++
	}
	for _, name := range slices.Sorted(maps.Keys(measured)) {
		st := measured[name]
		if st.runs[0] == 0 || st.runs[1] == 0 {
			continue // a hook the workload does not run
		}
		for build, which := range []string{"baseline", "this"} {
			b.ReportMetric(float64(st.ns[build])/float64(st.runs[build]), fmt.Sprintf("%s-%s-ns/run", name, which))
		}
		slices.Sort(st.deltas)
		b.ReportMetric(st.deltas[len(st.deltas)/2], name+"-median-delta-ns/run")
	}
}

// benchDatapath loads a datapath for b, removed when b ends, holding
// services x backends.
func benchDatapath(b *testing.B, services, backends int) *Dataplane {
	b.Helper()
	cfg := benchConfig(b)
	dp, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Close(); _ = Cleanup(cfg.BPFFSPath) })
	if err := dp.Sync(context.Background(), scaleSnapshot(services, backends)); err != nil {
		b.Fatal(err)
	}
	return dp
}

// BenchmarkKernelNew loads and attaches the datapath on a node with nothing
// pinned, the part of a cold start before the first sync that does not
// need the API server.
func BenchmarkKernelNew(b *testing.B) {
	cfg := benchConfig(b)
	for b.Loop() {
		dp, err := New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		closeUntimed(b, dp, cfg)
	}
}

// closeUntimed closes dp and removes its pins with the timer stopped, so
// that a benchmark loop times only what it means to.
func closeUntimed(b *testing.B, dp *Dataplane, cfg Config) {
	b.Helper()
	b.StopTimer()
	dp.Close()
	if err := Cleanup(cfg.BPFFSPath); err != nil {
		b.Fatal(err)
	}
	b.StartTimer()
}
