package ebpf

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/testnet"
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

// BenchmarkKernelFullSync programs 10k services x 10 endpoints into empty
// kernel maps (at the default capacities) per iteration.
func BenchmarkKernelFullSync(b *testing.B) {
	cfg := benchConfig(b)
	snap := scaleSnapshot(10000, 10)
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
		b.StopTimer()
		dp.Close()
		if err := Cleanup(cfg.BPFFSPath); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(maxRSSMiB(), "peak-RSS-MiB")
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
	cfg := benchConfig(b)
	dp, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Close(); _ = Cleanup(cfg.BPFFSPath) })
	if err := dp.Sync(context.Background(), scaleSnapshot(10000, 10)); err != nil {
		b.Fatal(err)
	}
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
