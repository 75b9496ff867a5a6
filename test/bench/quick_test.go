package bench_test

import (
	"bytes"
	"encoding/csv"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/report"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// TestQuickBench runs `make bench QUICK=1` as a user does (hack/bench.sh:
// deps, the cached Kubernetes build, the binaries, the run) into a
// directory of its own, so that the benchmark never rots: every
// contender must be started, serve, be measured by every workload and be
// cleaned away, and the report must hold all of it. It asserts what was
// measured and that it is whole, never how fast: timings are the report's
// business, not a test's.
func TestQuickBench(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, cgroups, BPF (make test runs it as root)")
	}
	if testing.Short() {
		t.Skip("takes about 5 minutes")
	}
	dir := t.TempDir()
	out := filepath.Join(dir, "report")
	cluster := filepath.Join(dir, "cluster")
	cmd := exec.Command("hack/bench.sh", "--out", out, "--cluster-dir", cluster)
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), "QUICK=1")
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	err := cmd.Run()
	t.Cleanup(func() {
		// The run removes its cluster; if it crashed, remove it here.
		if _, serr := os.Stat(filepath.Join(cluster, "state.json")); serr == nil {
			_ = exec.Command(filepath.Join("../..", "_output", "bench"), "down", cluster).Run()
		}
	})
	if err != nil {
		t.Fatalf("make bench QUICK=1: %v\n%s", err, tail(log.String(), 8000))
	}
	t.Logf("make bench QUICK=1:\n%s", tail(log.String(), 4000))

	run, err := report.Load(out)
	if err != nil {
		t.Fatal(err)
	}
	// The report names the command that reproduces it.
	if want := "QUICK=1 hack/bench.sh --out " + out + " --cluster-dir " + cluster; !run.Quick || run.Command != want {
		t.Errorf("run recorded as quick=%v command %q, want %q", run.Quick, run.Command, want)
	}
	cells := map[string]results.Cell{}
	for _, c := range run.Cells {
		cells[c.Contender+"/"+itoa(c.Size)] = c
	}
	for _, size := range run.Sizes {
		for _, name := range results.AllContenders {
			c, ok := cells[name+"/"+itoa(size)]
			if !ok {
				t.Errorf("%s at %d Services: no cell", name, size)
				continue
			}
			checkCell(t, run, c)
		}
	}

	md, err := os.ReadFile(filepath.Join(out, "report.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range results.AllContenders {
		if !strings.Contains(string(md), name) {
			t.Errorf("report.md never names %s", name)
		}
	}
	svgs, _ := filepath.Glob(filepath.Join(out, "*.svg"))
	if len(svgs) < 5 {
		t.Errorf("%d plots, want the CDFs, connect-vs-services, histogram, rates and control plane", len(svgs))
	}
	for _, f := range svgs {
		b, _ := os.ReadFile(f)
		if !bytes.Contains(b, []byte("<svg")) {
			t.Errorf("%s is not an SVG", f)
		}
		if !strings.Contains(string(md), filepath.Base(f)) {
			t.Errorf("report.md does not show %s", filepath.Base(f))
		}
	}
	// Every latency sample is in latency.csv, so anyone can re-plot.
	want := 0
	for _, c := range run.Cells {
		for _, p := range c.Latency {
			for _, r := range p.Reps {
				want += len(r.Direct) + len(r.Service)
			}
		}
	}
	f, err := os.Open(filepath.Join(out, "latency.csv"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows)-1 != want {
		t.Errorf("latency.csv has %d samples, the run measured %d", len(rows)-1, want)
	}

	// Nothing of the run is left on the machine.
	if _, err := os.Stat(filepath.Join(cluster, "state.json")); err == nil {
		t.Errorf("the cluster in %s was not taken down", cluster)
	}
}

// checkCell asserts one cell measured everything its contender can.
func checkCell(t *testing.T, run *results.Run, c results.Cell) {
	t.Helper()
	id := c.Contender + " at " + itoa(c.Size) + " Services"
	if c.Skipped != "" {
		t.Errorf("%s: %s", id, c.Skipped)
		return
	}
	if c.Incomplete != "" {
		t.Errorf("%s: incomplete: %s", id, c.Incomplete)
	}
	direct := c.Contender == results.Direct
	upstream := strings.HasPrefix(c.Contender, "kube-proxy-")
	workloads := map[string]bool{}
	for _, p := range c.Latency {
		workloads[p.Workload] = true
		if len(p.Reps) != run.Topology.Repetitions {
			t.Errorf("%s: %s has %d repetitions, want %d", id, p.Workload, len(p.Reps), run.Topology.Repetitions)
		}
		for i, r := range p.Reps {
			if len(r.Direct) == 0 {
				t.Errorf("%s: %s rep %d: no direct sample", id, p.Workload, i)
			}
			switch {
			case direct && len(r.Service) > 0:
				t.Errorf("%s: %s rep %d: %d samples through a ClusterIP no proxy serves", id, p.Workload, i, len(r.Service))
			case !direct && len(r.Service) == 0:
				t.Errorf("%s: %s rep %d: no sample through the ClusterIP", id, p.Workload, i)
			}
			// One of our datapaths that loses more than 1 % of its
			// requests is broken, not slow. Upstream's losses are a
			// measurement the report shows (CI once saw upstream
			// iptables-nft lose 4 of 200 connects at 500 Services);
			// only losing most of them says the harness set it up wrong.
			n := len(r.Service) + r.ServiceErrors
			switch {
			case upstream && r.ServiceErrors*2 > n:
				t.Errorf("%s: %s rep %d: %d of %d requests through the ClusterIP failed: upstream never served it", id, p.Workload, i, r.ServiceErrors, n)
			case upstream && r.ServiceErrors > 0:
				t.Logf("%s: %s rep %d: %d of %d requests through the ClusterIP failed (upstream's, reported)", id, p.Workload, i, r.ServiceErrors, n)
			case r.ServiceErrors*100 > n:
				t.Errorf("%s: %s rep %d: %d of %d requests through the ClusterIP failed", id, p.Workload, i, r.ServiceErrors, n)
			}
		}
	}
	for _, w := range []string{results.TCPConnect, results.TCPCRR, results.TCPRR, results.UDPConnected, results.UDPUnconnected} {
		if !workloads[w] {
			t.Errorf("%s: no %s", id, w)
		}
	}
	ops := map[string]int64{}
	for _, p := range c.Rates {
		ops[p.Workload+"/"+p.Target] += p.Ops
		if p.NodeCPUSeconds <= 0 {
			t.Errorf("%s: %s phase %s rep %d: no CPU time measured", id, p.Workload, p.Target, p.Rep)
		}
	}
	for _, w := range []string{results.ConnectRate, results.Stream} {
		if ops[w+"/"+results.TargetDirect] == 0 {
			t.Errorf("%s: %s: nothing direct", id, w)
		}
		if got := ops[w+"/"+results.TargetService]; direct != (got == 0) {
			t.Errorf("%s: %s: %d through the ClusterIP", id, w, got)
		}
	}
	if direct {
		return
	}
	cp := c.ControlPlane
	if cp.ColdStart <= 0 {
		t.Errorf("%s: no cold start time", id)
	}
	if cp.BatchServed <= 0 || cp.BatchServices == 0 {
		t.Errorf("%s: batch of %d Services served after %s", id, cp.BatchServices, cp.BatchServed)
	}
	if len(cp.EndpointChange) == 0 {
		t.Errorf("%s: no endpoint change timed", id)
	}
	if cp.NetworkProgramming == nil || cp.NetworkProgramming.Count == 0 {
		t.Errorf("%s: no kubeproxy_network_programming_duration_seconds observation (%+v)", id, cp.NetworkProgramming)
	}
	if c.Proxy.RSSBytes <= 0 || c.Proxy.CPUSeconds <= 0 {
		t.Errorf("%s: proxy usage %+v", id, c.Proxy)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
