package iptables

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The benchmarks' cluster is the eBPF benchmarks' (apitest.ScaleSnapshot):
// 10k Services x 10 endpoints, so `make bench` puts the modes side by side.
// KBP_BENCH_SERVICES_<BACKEND> (NFT, LEGACY) sets another count: with
// iptables-nft 1.8.9, restore --noflush grows faster than linearly with
// the number of chains, and one full sync at 10k takes many minutes.
const benchServices, benchEndpoints = 10000, 10

func servicesFor(b *testing.B, backend string) int {
	env := "KBP_BENCH_SERVICES_" + strings.ToUpper(backend)
	v := os.Getenv(env)
	if v == "" {
		return benchServices
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive count", env, v)
	}
	return n
}

// eachBackend runs a benchmark per backend, named by backend and size.
func eachBackend(b *testing.B, fn func(b *testing.B, backend string, services int)) {
	for _, backend := range backends {
		n := servicesFor(b, backend)
		b.Run(fmt.Sprintf("%s/services=%d", backend, n), func(b *testing.B) { fn(b, backend, n) })
	}
}

func maxRSSMiB() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Maxrss) / 1024 // Linux reports KiB
}

// BenchmarkRender is the Go side of a full sync: the restore input for 10k
// x 10, without applying it.
func BenchmarkRender(b *testing.B) {
	services := flatten(apitest.ScaleSnapshot(benchServices, benchEndpoints).Services)
	in := renderInput{services: services, node: benchNode, chains: chainsToWrite(services, false, all)}
	var buf bytes.Buffer
	var st renderStats
	for b.Loop() {
		buf.Reset()
		st = render(&buf, defaultOpts, in)
	}
	b.ReportMetric(float64(buf.Len())/(1<<20), "input-MiB")
	b.ReportMetric(float64(st.natRules+st.filterRules), "rules")
}

// BenchmarkRenderPartial is the Go side of a one-Service partial sync at 10k
// x 10: KUBE-SERVICES whole, one Service's chains.
func BenchmarkRenderPartial(b *testing.B) {
	changed := model.ServiceName{Namespace: "bench", Name: "svc-4242"}
	services := flatten(apitest.ScaleSnapshot(benchServices, benchEndpoints).Services)
	in := renderInput{services: services, node: benchNode, chains: chainsToWrite(services, false, func(sp *model.ServicePort) bool { return sp.Name.ServiceName == changed })}
	var buf bytes.Buffer
	for b.Loop() {
		buf.Reset()
		render(&buf, defaultOpts, in)
	}
	b.ReportMetric(float64(buf.Len())/(1<<20), "input-MiB")
}

func benchDataplane(b *testing.B, backend string) (*Dataplane, Config) {
	cfg := Config{Backend: backend, NetNS: "/run/netns/" + testnet.New(b).Node, ClusterCIDR: netip.MustParsePrefix("10.128.0.0/10")}
	d, err := New(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	return d, cfg
}

// syncedBenchDataplane is a datapath holding the benchmark cluster of the
// given size, and that cluster's snapshot.
func syncedBenchDataplane(b *testing.B, backend string, services int) (*Dataplane, *model.Snapshot) {
	d, _ := benchDataplane(b, backend)
	snap := apitest.ScaleSnapshot(services, benchEndpoints)
	if err := d.Sync(context.Background(), snap); err != nil {
		b.Fatal(err)
	}
	return d, snap
}

// BenchmarkKernelFullSync renders and applies 10k x 10 into empty tables.
func BenchmarkKernelFullSync(b *testing.B) {
	eachBackend(b, func(b *testing.B, backend string, services int) {
		d, cfg := benchDataplane(b, backend)
		snap := apitest.ScaleSnapshot(services, benchEndpoints)
		ctx := context.Background()
		for b.Loop() {
			if err := d.Sync(ctx, snap); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if err := Cleanup(ctx, cfg); err != nil {
				b.Fatal(err)
			}
			d.applied = nil
			b.StartTimer()
		}
		b.ReportMetric(maxRSSMiB(), "peak-RSS-MiB")
	})
}

// BenchmarkKernelFullResync is a full sync with 10k x 10 already in place
// (once per hour, after a failure, after a flush): read back, rewrite all.
func BenchmarkKernelFullResync(b *testing.B) {
	eachBackend(b, func(b *testing.B, backend string, services int) {
		d, snap := syncedBenchDataplane(b, backend, services)
		ctx := context.Background()
		for b.Loop() {
			if err := d.Sync(ctx, snap); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkKernelPeriodicSync is what each --sync-period without changes
// costs the datapath at 10k x 10: the canary check, and a sync with
// nothing to write.
func BenchmarkKernelPeriodicSync(b *testing.B) {
	eachBackend(b, func(b *testing.B, backend string, services int) {
		d, _ := syncedBenchDataplane(b, backend, services)
		ctx := context.Background()
		empty := &model.Snapshot{}
		for b.Loop() {
			if ok, err := d.Intact(ctx); !ok || err != nil {
				b.Fatalf("Intact: %v, %v", ok, err)
			}
			if err := d.Sync(ctx, empty); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkKernelOneEndpointChange replaces one endpoint of one Service at
// 10k x 10: a partial sync, which still rewrites KUBE-SERVICES whole.
func BenchmarkKernelOneEndpointChange(b *testing.B) {
	eachBackend(b, func(b *testing.B, backend string, services int) {
		d, snap := syncedBenchDataplane(b, backend, services)
		ctx := context.Background()
		variants := apitest.EndpointChange(snap, model.ServiceName{Namespace: "bench", Name: fmt.Sprintf("svc-%d", services/2)})
		i := 0
		for b.Loop() {
			if err := d.Sync(ctx, variants[i%2]); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}

// benchNode serves node ports on every local address, as kube-proxy by
// default.
var benchNode = model.NodeInfo{AllLocalAddresses: true}

// BenchmarkKernelPacketLayerOneEndpointChange is the eBPF mode's packet
// layer (ExternalOnly, ClusterIPs left to the socket layer) given a partial
// snapshot that replaces one endpoint of a ClusterIP-only Service at 10k x
// 10: every eBPF-mode sync of such a change pays it.
func BenchmarkKernelPacketLayerOneEndpointChange(b *testing.B) {
	eachBackend(b, func(b *testing.B, backend string, services int) {
		cfg := Config{Backend: backend, NetNS: "/run/netns/" + testnet.New(b).Node, ClusterCIDR: netip.MustParsePrefix("10.128.0.0/10"), ExternalOnly: true}
		d, err := New(context.Background(), cfg)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { d.Close() })
		snap := apitest.ScaleSnapshot(services, benchEndpoints)
		ctx := context.Background()
		if err := d.Sync(ctx, snap); err != nil {
			b.Fatal(err)
		}
		variants := apitest.EndpointChange(snap, model.ServiceName{Namespace: "bench", Name: fmt.Sprintf("svc-%d", services/2)})
		i := 0
		for b.Loop() {
			if err := d.Sync(ctx, variants[i%2]); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}

// BenchmarkKernelPacketLayerFirstSync is the eBPF mode's packet layer's
// part of a cold node's first sync at 10k x 10 ClusterIP Services: it reads
// the tables back and writes its few rules, and serves none of them.
func BenchmarkKernelPacketLayerFirstSync(b *testing.B) {
	eachBackend(b, func(b *testing.B, backend string, services int) {
		cfg := Config{Backend: backend, NetNS: "/run/netns/" + testnet.New(b).Node, ClusterCIDR: netip.MustParsePrefix("10.128.0.0/10"), ExternalOnly: true}
		snap := apitest.ScaleSnapshot(services, benchEndpoints)
		ctx := context.Background()
		for b.Loop() {
			b.StopTimer()
			d, err := New(ctx, cfg)
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if err := d.Sync(ctx, snap); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if err := Cleanup(ctx, cfg); err != nil {
				b.Fatal(err)
			}
			d.Close()
			b.StartTimer()
		}
	})
}
