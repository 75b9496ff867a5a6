// Command bench is `make bench` (see test/bench): every datapath side
// by side on a local cluster, with a markdown report, CSV samples and SVG
// plots.
//
//	bench [flags]                 measure and write the report
//	bench report DIR              rebuild DIR's report from its results.json
//	bench down [DIR]              remove the cluster --keep left running
//	bench memory [flags]          the eBPF mode's memory at N Services, per variant
//	bench server [flags]          the server every server pod runs
//	bench client WORKLOAD [flags] a client workload, run in a client pod
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/load"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/report"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func main() {
	testnet.RunHelperIfRequested(nil)
	closeInheritedOnExec()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) > 0 {
		switch args[0] {
		case "server":
			return load.ServerMain(ctx, args[1:], os.Stdout)
		case "client":
			return load.ClientMain(ctx, args[1:], os.Stdout)
		case "down":
			dir := "_output/bench-cluster"
			if len(args) > 1 {
				dir = args[1]
			}
			return localcluster.Down(dir)
		case "memory":
			return memory(ctx, args[1:])
		case "report":
			if len(args) != 2 {
				return errors.New("usage: bench report DIR")
			}
			r, err := report.Load(args[1])
			if err != nil {
				return err
			}
			return report.Write(args[1], r)
		}
	}
	return measure(ctx, args)
}

func measure(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	quick := fs.Bool("quick", false, "the reduced run the tests make (make bench QUICK=1): every contender and workload at 0 and 500 Services, few samples, about 5 minutes")
	large := fs.Bool("large", false, "the full run at 0, 1k, 10k, 20k and 50k Services (make bench LARGE=1)")
	out := fs.String("out", "", "report directory (default _output/bench-report, or _output/bench-quick with --quick)")
	clusterDir := fs.String("cluster-dir", "_output/bench-cluster", "the local cluster's directory")
	kubeBin := fs.String("kube-bin", os.Getenv("KUBE_BIN"), "directory of the Kubernetes binaries and upstream kube-proxy (hack/kube-build.sh prints it)")
	binary := fs.String("binary", "_output/kube-bpf-proxy", "the kube-bpf-proxy binary")
	manifests := fs.String("manifests", "manifests", "the repository's manifests directory")
	contenders := fs.String("contenders", "", "comma-separated contenders (default all: "+strings.Join(results.AllContenders, ",")+")")
	sizes := fs.String("sizes", "", "comma-separated background Service counts, ascending (default 0,1000,10000; quick 0,500; large 0,1000,10000,20000,50000)")
	endpoints := fs.Int("endpoints", 0, "endpoints of each background Service (default 10)")
	controlPlane := fs.Bool("control-plane-only", false, "skip the latency and rate workloads: time only the cold start, endpoint changes under churn and the batch of new Services")
	workloadsUpTo := fs.Int("workloads-up-to", -1, "the largest Service count at which the iptables and nftables contenders run the latency and rate workloads; above it they time the control plane only (default: every size; 10000 with --large; 0: every size)")
	changes := fs.Int("endpoint-changes", 0, "timed endpoint changes per cell (default 20, quick 4); more give a steadier p99")
	load := fs.String("load", "", "how the background Services are created: api (through the API, the default; about 3 hours for 50k, the API server's ClusterIP allocator being the limit) or etcd (written into the API server's etcd: minutes for 50k; the default with --large; docs/benchmarks.md, \"Method\")")
	keep := fs.Bool("keep", false, "leave the cluster running afterwards (remove it with: bench down)")
	family := fs.String("family", "ipv4", "the IP family measured: ipv4, or ipv6 (the IPv6 rows: a dual-stack cluster, IPv6 Services and pod addresses, the tcp-connect, UDP and connection-rate workloads only; with --load=api)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if *quick && *large {
		return errors.New("--quick and --large: pick one")
	}
	cfg := bench.FullConfig()
	switch {
	case *quick:
		cfg = bench.QuickConfig()
	case *large:
		cfg = bench.LargeConfig()
	}
	if *contenders != "" {
		cfg.Contenders = strings.Split(*contenders, ",")
	}
	if *sizes != "" {
		cfg.Sizes = nil
		for _, s := range strings.Split(*sizes, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil {
				return fmt.Errorf("--sizes: %q is not a number", s)
			}
			cfg.Sizes = append(cfg.Sizes, n)
		}
	}
	if *load != "" {
		cfg.Load = *load // checked with the rest of cfg
	}
	if *endpoints > 0 {
		cfg.EndpointsPerService = *endpoints
	}
	if *changes > 0 {
		cfg.EndpointChanges = *changes
		// Each change takes at least its 200 ms pause: the budget grows
		// with the count asked for.
		cfg.EndpointChangeBudget = max(cfg.EndpointChangeBudget, time.Duration(*changes)*time.Second)
	}
	switch strings.ToLower(*family) {
	case "ipv4", "4":
		cfg.Family = model.IPv4
	case "ipv6", "6":
		cfg.Family = model.IPv6
		if *load == "" {
			cfg.Load = bench.LoadAPI // the etcd loader writes IPv4 Services only
		}
	default:
		return fmt.Errorf("--family: %q: want ipv4 or ipv6", *family)
	}
	cfg.ControlPlaneOnly = *controlPlane
	if *workloadsUpTo >= 0 {
		cfg.WorkloadsUpTo = *workloadsUpTo
	}
	if *out == "" {
		*out = "_output/bench-report"
		if *quick {
			*out = "_output/bench-quick"
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	abs := func(p string) string {
		a, err := filepath.Abs(p)
		if err != nil {
			return p
		}
		return a
	}
	cfg.ClusterDir, cfg.OutDir, cfg.KubeBin = abs(*clusterDir), abs(*out), *kubeBin
	cfg.Binary, cfg.Self, cfg.ManifestsDir = abs(*binary), self, abs(*manifests)
	cfg.Keep = *keep
	cfg.Progress = os.Stderr
	cfg.Command = commandLine(*quick, *large, args)

	start := time.Now()
	_, err = bench.Run(ctx, cfg)
	fmt.Fprintf(os.Stderr, "\nreport: %s (%s)\n", filepath.Join(cfg.OutDir, "report.md"), time.Since(start).Round(time.Second))
	return err
}

// commandLine is the command a reader runs to measure the same: make's,
// with the flags given.
func commandLine(quick, large bool, args []string) string {
	var extra []string
	for i := 0; i < len(args); i++ {
		a := strings.TrimLeft(args[i], "-")
		switch {
		case a == "quick" || a == "large" || strings.HasPrefix(a, "kube-bin="):
			continue
		case a == "kube-bin":
			i++ // and its value
			continue
		}
		extra = append(extra, args[i])
	}
	env := ""
	switch {
	case quick:
		env = "QUICK=1"
	case large:
		env = "LARGE=1"
	}
	cmd := "make bench"
	if env != "" {
		cmd += " " + env
	}
	if len(extra) > 0 {
		cmd = "hack/bench.sh " + strings.Join(extra, " ")
		if env != "" {
			cmd = env + " " + cmd
		}
	}
	return cmd
}

// memory is `bench memory`: the eBPF mode's heap, Go runtime total and RSS
// with --services Services of --endpoints endpoints, for each --variant,
// all against one loaded API server.
func memory(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench memory", flag.ContinueOnError)
	clusterDir := fs.String("cluster-dir", "_output/memory-cluster", "the local cluster's directory; a cluster left there by --keep is reused")
	kubeBin := fs.String("kube-bin", os.Getenv("KUBE_BIN"), "directory of the Kubernetes binaries (hack/kube-build.sh prints it)")
	manifests := fs.String("manifests", "manifests", "the repository's manifests directory")
	services := fs.Int("services", 10000, "background Services")
	endpoints := fs.Int("endpoints", 10, "endpoints of each Service, all distinct addresses")
	settle := fs.Duration("settle", 40*time.Second, "how long each proxy runs after it serves every Service before it is measured (past one periodic full sync)")
	keep := fs.Bool("keep", false, "leave the cluster and its Services running afterwards (remove it with: bench down DIR)")
	loadWith := fs.String("load", bench.LoadAPI, "how the Services are created: api (through the API) or etcd (written into the API server's etcd: 20k in under a minute)")
	profiles := fs.String("profiles", "", "directory for the profiles of each variant run with --profiling: its heap (NAME.heap) and its CPU during the start (NAME.start.cpu) and the settle (NAME.settle.cpu)")
	var variants []bench.MemoryVariant
	fs.Func("variant", "NAME=BINARY[,VAR=VALUE|--flag...]: a proxy to measure, with extra environment (GOGC=50,GOMEMLIMIT=80MiB) and flags (--profiling); repeat for more (default: default=_output/kube-bpf-proxy)", func(s string) error {
		v, err := bench.ParseMemoryVariant(s)
		if err == nil {
			variants = append(variants, v)
		}
		return err
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *loadWith != bench.LoadAPI && *loadWith != bench.LoadEtcd {
		return fmt.Errorf("--load %q: want %s or %s", *loadWith, bench.LoadAPI, bench.LoadEtcd)
	}
	if len(variants) == 0 {
		variants = []bench.MemoryVariant{{Name: "default", Binary: "_output/kube-bpf-proxy"}}
	}
	abs := func(p string) string {
		a, err := filepath.Abs(p)
		if err != nil {
			return p
		}
		return a
	}
	for i := range variants {
		variants[i].Binary = abs(variants[i].Binary)
	}
	res, err := bench.MeasureMemory(ctx, bench.MemoryConfig{
		ClusterDir: abs(*clusterDir), KubeBin: *kubeBin, ManifestsDir: abs(*manifests),
		Services: *services, Endpoints: *endpoints, Variants: variants, Settle: *settle,
		Keep: *keep, Progress: os.Stderr, ProfileDir: *profiles, Load: *loadWith,
	})
	fmt.Printf("%d Services × %d endpoints, ebpf mode on one node, measured %s after serving every Service\n\n", *services, *endpoints, *settle)
	fmt.Print(bench.MemoryTable(res))
	return err
}

// closeInheritedOnExec marks every descriptor this process inherited beyond
// the standard three close-on-exec. Run as `flock LOCK bench ...`, the lock's
// descriptor is one of them: the control plane and pods it starts, which
// --keep leaves running, would otherwise hold the lock long after the
// benchmark ended.
func closeInheritedOnExec() {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			syscall.CloseOnExec(fd)
		}
	}
}
