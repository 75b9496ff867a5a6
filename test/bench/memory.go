package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/probe"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// The memory measurement (`bench memory`): the eBPF mode's proxy, run as
// its DaemonSet's pod on one node of a local cluster holding N selectorless
// Services of E endpoints each, in several variants (binaries, GOGC,
// GOMEMLIMIT) one after the other against the same API server, so that
// loading the Services, which takes minutes, is paid once.

// MemoryVariant is one way of running the proxy.
type MemoryVariant struct {
	// Name labels the variant in the report.
	Name string
	// Binary is the kube-bpf-proxy binary.
	Binary string
	// Env is added to the DaemonSet container's environment
	// (GOGC=50, GOMEMLIMIT=80MiB).
	Env []corev1.EnvVar
	// Args are added to its flags. With --profiling, the heap profile is
	// saved beside the results (MemoryConfig.ProfileDir).
	Args []string
}

// ParseMemoryVariant parses NAME=BINARY[,VAR=VALUE|--flag...].
func ParseMemoryVariant(s string) (MemoryVariant, error) {
	parts := strings.Split(s, ",")
	name, bin, ok := strings.Cut(parts[0], "=")
	if !ok || name == "" || bin == "" {
		return MemoryVariant{}, fmt.Errorf("variant %q: want NAME=BINARY[,VAR=VALUE...]", s)
	}
	v := MemoryVariant{Name: name, Binary: bin}
	for _, kv := range parts[1:] {
		if strings.HasPrefix(kv, "--") {
			v.Args = append(v.Args, kv)
			continue
		}
		k, val, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return MemoryVariant{}, fmt.Errorf("variant %q: %q is not VAR=VALUE or --flag", s, kv)
		}
		v.Env = append(v.Env, corev1.EnvVar{Name: k, Value: val})
	}
	return v, nil
}

// MemoryConfig configures MeasureMemory.
type MemoryConfig struct {
	// ClusterDir is the local cluster's directory; a cluster already
	// there (bench memory --keep) is reused, its Services included.
	ClusterDir   string
	KubeBin      string
	ManifestsDir string
	// Services and Endpoints shape the background (10000 × 10).
	Services, Endpoints int
	// Variants run in order, each on a node with nothing programmed.
	Variants []MemoryVariant
	// Settle is how long a proxy runs after it first serves every Service
	// before it is measured: long enough for a periodic full sync.
	Settle time.Duration
	// ProfileDir, if set, receives NAME.heap, the heap profile of each
	// variant run with --profiling, taken with the measurement.
	ProfileDir string
	// Load is how the Services are created: LoadAPI (the default) or
	// LoadEtcd (written into etcd directly, for 20k and more).
	Load string
	// Keep leaves the cluster running.
	Keep     bool
	Progress io.Writer
}

// MemoryResult is one variant's measurement.
type MemoryResult struct {
	Variant MemoryVariant
	// Served is the time from launch until the proxy programmed every
	// Service.
	Served time.Duration
	// FullSync is the mean duration of its full syncs (metrics).
	FullSync time.Duration
	// FirstSync is the mean duration of the full syncs up to serving
	// every Service (the cold node's first, normally), LaterSync that of
	// the periodic ones during Settle; 0 if there was none.
	FirstSync, LaterSync time.Duration
	// HeapInuse is the Go heap's in-use spans (go_memstats_heap_inuse_bytes)
	// and GoSys all the memory the Go runtime obtained from the kernel
	// (go_memstats_sys_bytes), read after Settle.
	HeapInuse, GoSys int64
	// RSS is the process's resident set after Settle (VmRSS), Peak its
	// largest (VmHWM).
	RSS, Peak int64
	// Live is the heap's live bytes (go_memstats_heap_alloc_bytes right
	// after a collection), read once the heap profile has been taken;
	// 0 for a variant without --profiling.
	Live int64
}

// memoryNode runs the measured proxy.
const memoryNode = "node1"

// MeasureMemory measures every variant; it stops at the first variant that
// fails, returning the results so far.
func MeasureMemory(ctx context.Context, cfg MemoryConfig) (res []MemoryResult, err error) {
	logf := func(format string, args ...any) {
		if cfg.Progress != nil {
			fmt.Fprintf(cfg.Progress, "memory: "+format+"\n", args...)
		}
	}
	var c *localcluster.Cluster
	if _, serr := os.Stat(cfg.ClusterDir + "/state.json"); serr == nil {
		logf("reusing the cluster in %s", cfg.ClusterDir)
		c, err = localcluster.Open(cfg.ClusterDir)
	} else {
		logf("starting a cluster in %s", cfg.ClusterDir)
		c, err = localcluster.Up(ctx, localcluster.Options{Dir: cfg.ClusterDir, KubeBin: cfg.KubeBin})
	}
	if err != nil {
		return nil, err
	}
	if !cfg.Keep {
		defer func() {
			if derr := localcluster.Down(c.Dir); derr != nil {
				err = errors.Join(err, derr)
			}
		}()
	}
	api, err := BulkClient(c.Config)
	if err != nil {
		return nil, err
	}
	// Distinct endpoint addresses, as pods have: 10.128.0.0/10 is neither
	// the Service range nor the nodes' pod ranges.
	addrs := make([]netip.Addr, cfg.Services*cfg.Endpoints)
	for i := range addrs {
		addrs[i] = netip.AddrFrom4([4]byte{10, byte(128 + i>>16), byte(i >> 8), byte(i)})
	}
	var direct *EtcdStore
	if cfg.Load == LoadEtcd {
		direct = NewEtcdStore(c.EtcdHTTPClient(), localcluster.EtcdURL, localcluster.EtcdPrefix)
	}
	start := time.Now()
	logf("populating %d Services × %d endpoints", cfg.Services, cfg.Endpoints)
	if _, err := Populate(ctx, api, direct, backgroundNamespace, cfg.Services, cfg.Endpoints, addrs, 80, populateWorkers, nil); err != nil {
		return nil, err
	}
	logf("populated in %s", time.Since(start).Round(time.Second))
	if _, err := c.ApplyOverlay(ctx, cfg.ManifestsDir, "ebpf"); err != nil {
		return nil, err
	}
	for _, v := range cfg.Variants {
		logf("variant %s: %s %v", v.Name, v.Binary, v.Env)
		r, err := measureVariant(ctx, c, cfg, v)
		if err != nil {
			return res, fmt.Errorf("variant %s: %w", v.Name, err)
		}
		logf("variant %s: served in %s, heap in use %s, Go total %s, RSS %s (peak %s)", v.Name,
			r.Served.Round(time.Millisecond), mib(r.HeapInuse), mib(r.GoSys), mib(r.RSS), mib(r.Peak))
		res = append(res, r)
	}
	return res, nil
}

func measureVariant(ctx context.Context, c *localcluster.Cluster, cfg MemoryConfig, v MemoryVariant) (r MemoryResult, err error) {
	r.Variant = v
	o, err := c.DaemonSetProxyOptions(ctx, v.Binary)
	if err != nil {
		return r, err
	}
	ctr := &o.DaemonSet.Spec.Template.Spec.Containers[0]
	ctr.Env = append(ctr.Env, v.Env...)
	o.Args = append(ourArgsFor(results.EBPF, cfg.Services, cfg.Endpoints), v.Args...)
	launched := time.Now()
	if err := c.LaunchProxy(ctx, memoryNode, o); err != nil {
		return r, err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		serr := c.StopProxy(memoryNode, stopGrace)
		if serr == nil {
			serr = c.CleanupProxy(sctx, memoryNode, v.Binary, "--kubeconfig="+c.AdminKubeconfig, "--hostname-override="+memoryNode)
		}
		if serr == nil {
			if left, lerr := nodeLeftovers(sctx, c, memoryNode); lerr != nil {
				serr = lerr
			} else if len(left) > 0 {
				serr = fmt.Errorf("left on %s: %s", memoryNode, strings.Join(left, "; "))
			}
		}
		err = errors.Join(err, serr)
	}()
	// CPU profiles, where the proxy serves them (--profiling): the cold
	// start's first 10 s and most of the settle (a periodic full sync).
	profiled := make(chan struct{})
	defer func() { <-profiled }()
	go func() {
		defer close(profiled)
		if cfg.ProfileDir != "" {
			saveCPUProfile(ctx, c, cfg.ProfileDir, v.Name+".start.cpu", 10*time.Second, 3*time.Second)
		}
	}()
	var firstSum, firstN float64
	deadline := time.Now().Add(5 * time.Minute)
	for {
		if m, err := proxyMetrics(ctx, c); err == nil && m["kube_bpf_proxy_services"] >= float64(cfg.Services) {
			r.Served = time.Since(launched)
			firstSum, firstN = m[fullSyncSum], m[fullSyncCount]
			if firstN > 0 {
				r.FirstSync = time.Duration(firstSum / firstN * float64(time.Second))
			}
			break
		}
		if time.Now().After(deadline) {
			return r, fmt.Errorf("the proxy did not program %d Services within 5 minutes (log: %s)", cfg.Services, c.ProxyLog(memoryNode))
		}
		if _, ok := c.ProxyPID(memoryNode); !ok {
			return r, fmt.Errorf("the proxy exited (log: %s)", c.ProxyLog(memoryNode))
		}
		select {
		case <-ctx.Done():
			return r, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	settled := time.After(cfg.Settle)
	if cfg.ProfileDir != "" {
		// One CPU profile at a time: after the cold start's.
		select {
		case <-profiled:
		case <-settled:
			return r, errors.New("the cold start's CPU profile outlasted the settle")
		}
		if d := cfg.Settle - time.Since(launched.Add(r.Served)) - 3*time.Second; d >= time.Second {
			saveCPUProfile(ctx, c, cfg.ProfileDir, v.Name+".settle.cpu", d, 0)
		}
	}
	select {
	case <-ctx.Done():
		return r, ctx.Err()
	case <-settled:
	}
	m, err := proxyMetrics(ctx, c)
	if err != nil {
		return r, err
	}
	r.HeapInuse = int64(m["go_memstats_heap_inuse_bytes"])
	r.GoSys = int64(m["go_memstats_sys_bytes"])
	if n := m[fullSyncCount]; n > 0 {
		r.FullSync = time.Duration(m[fullSyncSum] / n * float64(time.Second))
	}
	if n := m[fullSyncCount] - firstN; n > 0 {
		r.LaterSync = time.Duration((m[fullSyncSum] - firstSum) / n * float64(time.Second))
	}
	pid, ok := c.ProxyPID(memoryNode)
	if !ok {
		return r, fmt.Errorf("the proxy exited (log: %s)", c.ProxyLog(memoryNode))
	}
	if r.RSS, r.Peak, err = residentSet(pid); err != nil {
		return r, err
	}
	if cfg.ProfileDir != "" && slices.Contains(v.Args, "--profiling") {
		// After the reading above: the profile's own work must not count.
		code, body, err := c.ProxyGet(ctx, memoryNode, localcluster.ProxyMetricsAddr, "/debug/pprof/heap?gc=1")
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("status %d", code)
		}
		if err == nil {
			err = os.WriteFile(filepath.Join(cfg.ProfileDir, v.Name+".heap"), []byte(body), 0o644)
		}
		if err != nil {
			return r, fmt.Errorf("saving the heap profile: %w", err)
		}
		if m, err := proxyMetrics(ctx, c); err == nil {
			r.Live = int64(m["go_memstats_heap_alloc_bytes"])
		}
	}
	return r, nil
}

const (
	fullSyncSum   = "kubeproxy_sync_full_proxy_rules_duration_seconds_sum"
	fullSyncCount = "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
)

// saveCPUProfile saves the proxy's CPU profile over d as dir/name, trying
// to start it for up to wait (the proxy may not listen yet). A proxy
// without /debug/pprof (no --profiling) leaves no file.
func saveCPUProfile(ctx context.Context, c *localcluster.Cluster, dir, name string, d, wait time.Duration) {
	until := time.Now().Add(wait)
	for {
		code, body, err := c.NodeGetTimeout(ctx, memoryNode, localcluster.ProxyMetricsAddr,
			fmt.Sprintf("/debug/pprof/profile?seconds=%d", int(d/time.Second)), d+10*time.Second)
		if err == nil && code == http.StatusOK {
			_ = os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644)
			return
		}
		if err == nil || time.Now().After(until) || ctx.Err() != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// proxyMetrics reads the node's proxy's samples (samples).
func proxyMetrics(ctx context.Context, c *localcluster.Cluster) (map[string]float64, error) {
	code, body, err := c.ProxyGet(ctx, memoryNode, localcluster.ProxyMetricsAddr, "/metrics")
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("/metrics: status %d", code)
	}
	scrape, err := probe.ParseScrape(strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	return samples(scrape), nil
}

// samples gives each family's first series's value, a histogram's or a
// summary's as its NAME_sum and NAME_count: the ones read here have no
// labels, or only constant ones (ip_family).
func samples(s probe.Scrape) map[string]float64 {
	m := map[string]float64{}
	for name, f := range s {
		if len(f.GetMetric()) == 0 {
			continue
		}
		x := f.GetMetric()[0]
		switch {
		case x.Histogram != nil:
			m[name+"_sum"], m[name+"_count"] = x.GetHistogram().GetSampleSum(), float64(x.GetHistogram().GetSampleCount())
		case x.Summary != nil:
			m[name+"_sum"], m[name+"_count"] = x.GetSummary().GetSampleSum(), float64(x.GetSummary().GetSampleCount())
		case x.Counter != nil:
			m[name] = x.GetCounter().GetValue()
		case x.Gauge != nil:
			m[name] = x.GetGauge().GetValue()
		case x.Untyped != nil:
			m[name] = x.GetUntyped().GetValue()
		}
	}
	return m
}

// residentSet reads a process's VmRSS and VmHWM.
func residentSet(pid int) (rss, peak int64, err error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, l := range strings.Split(string(status), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = kb * 1024
		case "VmHWM:":
			peak = kb * 1024
		}
	}
	return rss, peak, nil
}

func ms(d time.Duration) string {
	if d == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond))
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// MemoryTable renders results as a markdown table.
func MemoryTable(res []MemoryResult) string {
	var b strings.Builder
	b.WriteString("| variant | environment, flags | all served after | mean full sync | first full sync | later full syncs | heap in use | live heap | Go runtime total | RSS | peak RSS |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range res {
		var env []string
		for _, e := range r.Variant.Env {
			env = append(env, e.Name+"="+e.Value)
		}
		env = append(env, r.Variant.Args...)
		e := strings.Join(env, " ")
		if e == "" {
			e = "(none)"
		}
		live := "n/a"
		if r.Live > 0 {
			live = mib(r.Live)
		}
		fmt.Fprintf(&b, "| %s | %s | %.2f s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.Variant.Name, e,
			r.Served.Seconds(), ms(r.FullSync), ms(r.FirstSync), ms(r.LaterSync),
			mib(r.HeapInuse), live, mib(r.GoSys), mib(r.RSS), mib(r.Peak))
	}
	return b.String()
}
