package report

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

const skipReason = "did not serve 10000 Services within 3m0s"

// syntheticRun has every contender at 0 and 10k Services, iptables-nft
// skipped at 10k. Its data is made so that, at 10k, ebpf's RSS target is
// met (40 MiB), its endpoint change target is not (p99 ~ 200 ms), and
// kube-proxy-iptables is 3x slower than ebpf at connecting.
func syntheticRun(t *testing.T) *results.Run {
	t.Helper()
	rng := rand.New(rand.NewSource(11))
	r := &results.Run{
		Started:    time.Date(2026, 12, 2, 5, 0, 0, 0, time.UTC),
		Duration:   27 * time.Minute,
		Command:    "go run ./hack/bench --out bench-out",
		Machine:    results.Machine{Kernel: "6.12.0", CPUModel: "Test CPU", CPUs: 2, MemoryBytes: 8 << 30, GoVersion: "go1.26", KubernetesVersion: "v1.36.3", IptablesVersion: "1.8.11", NftVersion: "1.1.1", ProxyVersion: "dev"},
		Topology:   results.Topology{Nodes: 2, ClientPods: 3, ServerPods: 12, EndpointsPerService: 10, Repetitions: 3},
		Contenders: results.AllContenders,
		Sizes:      []int{0, 10000},
	}
	slowdown := map[string]float64{
		results.Direct: 1, results.EBPF: 1, results.IptablesNFT: 1.2, results.IptablesLegacy: 1.3,
		results.KubeProxyIptables: 1.4, results.KubeProxyIptablesNFT: 1.25, results.KubeProxyNFTables: 1.1,
	}
	samples := func(n int, base float64) []float64 {
		s := make([]float64, n)
		for i := range s {
			s[i] = base * (1 + 0.1*rng.Float64())
		}
		return s
	}
	for _, size := range r.Sizes {
		for _, ct := range results.AllContenders {
			c := results.Cell{Contender: ct, Size: size, Elapsed: 90 * time.Second}
			if ct == results.IptablesNFT && size == 10000 {
				c.Skipped = skipReason
				c.Elapsed = 3 * time.Minute
				c.ControlPlane = results.ControlPlane{ColdStart: 3 * time.Minute, ColdStartTimedOut: true}
				r.Cells = append(r.Cells, c)
				continue
			}
			f := slowdown[ct]
			if size == 10000 && ct == results.KubeProxyIptables {
				f = 3
			}
			for _, w := range latencyWorkloads {
				p := results.Paired{Workload: w}
				for rep := 0; rep < 3; rep++ {
					x := results.Rep{Direct: samples(40, 50)}
					if ct != results.Direct {
						x.Service = samples(40, 50*f)
						x.ServiceErrors = rep
					}
					p.Reps = append(p.Reps, x)
				}
				c.Latency = append(c.Latency, p)
			}
			for rep := 0; rep < 3; rep++ {
				for _, w := range []string{results.ConnectRate, results.Stream} {
					targets := []string{results.TargetDirect, results.TargetService}
					if ct == results.Direct {
						targets = targets[:1]
					}
					for _, tg := range targets {
						ops := int64(20000 + rng.Intn(1000))
						if tg == results.TargetService {
							ops = int64(float64(ops) / f)
						}
						c.Rates = append(c.Rates, results.RatePhase{Workload: w, Rep: rep, Target: tg, Seconds: 2, Ops: ops,
							NodeCPUSeconds: 3.5 + rng.Float64(), ProxyCPUSeconds: 0.1 * rng.Float64()})
					}
				}
			}
			if ct != results.Direct {
				c.ControlPlane.ColdStart = time.Duration(500+rng.Intn(1000)) * time.Millisecond
				c.ControlPlane.BatchServices = 1000
				c.ControlPlane.BatchServed = time.Duration(300+rng.Intn(1000)) * time.Millisecond
				for i := 0; i < 20; i++ {
					base := 10 * time.Millisecond
					if ct == results.EBPF && size == 10000 {
						base = 200 * time.Millisecond
					}
					c.ControlPlane.EndpointChange = append(c.ControlPlane.EndpointChange, base+time.Duration(rng.Intn(5000))*time.Microsecond)
				}
				c.ControlPlane.NetworkProgramming = &results.Histogram{
					Count: 40, Sum: 3.1,
					Bounds:  []float64{0.01, 0.1, 1, math.Inf(1)},
					Buckets: []uint64{5, 30, 39, 40},
				}
				c.Proxy = results.ProxyUsage{RSSBytes: 40 << 20, CPUSeconds: 12.5}
			}
			r.Cells = append(r.Cells, c)
		}
	}
	r.Bulk = []results.BulkCreate{{Contender: results.EBPF, From: 0, To: 10000, Creating: 3 * time.Minute, Served: 800 * time.Millisecond}}
	return r
}

func TestWriteAndLoad(t *testing.T) {
	r := syntheticRun(t)
	dir := t.TempDir()
	if err := Write(dir, r); err != nil {
		t.Fatalf("Write: %v", err)
	}

	mdBytes, err := os.ReadFile(filepath.Join(dir, ReportFile))
	if err != nil {
		t.Fatal(err)
	}
	md := string(mdBytes)
	for _, ct := range results.AllContenders {
		if !strings.Contains(md, "| "+ct+" |") {
			t.Errorf("report.md has no table row for %s", ct)
		}
	}
	if !strings.Contains(md, "did not reach 10k: "+skipReason) {
		t.Errorf("report.md does not give the skipped cell's reason")
	}
	if !strings.Contains(md, r.Command) {
		t.Errorf("report.md does not give the command")
	}
	verdict := func(goal string) string {
		t.Helper()
		for _, line := range strings.Split(md, "\n") {
			if strings.HasPrefix(line, "| "+goal) {
				cells := strings.Split(strings.Trim(line, "| "), " | ")
				return cells[len(cells)-1]
			}
		}
		t.Fatalf("report.md has no target row %q", goal)
		return ""
	}
	for goal, want := range map[string]string{
		"ebpf proxy RSS at 10k Services below 100 MiB":                          metYes,
		"ebpf: an endpoint change observed by a client within 50 ms at p99":     metNo,
		"at 10k Services: kube-proxy-iptables tcp-connect p50 / ebpf p50 ≥ 1.5": metYes,
		"ebpf cold node serves every Service within 2 s of the proxy's start":   metNotMeasured,
		"ebpf: Services served within 2 s of their creation finishing":          metYes,
	} {
		if got := verdict(goal); got != want {
			t.Errorf("target %q: met = %q, want %q", goal, got, want)
		}
	}
	if !strings.Contains(md, "not measured at 20k, nearest 10k") {
		t.Errorf("the cold start target does not say it was not measured at 20k")
	}

	// Every CSV: the header, then one row per sample (phase, metric value, cell).
	var latencyN, ratesN, cpN int
	for _, c := range r.Cells {
		for _, p := range c.Latency {
			for _, rep := range p.Reps {
				latencyN += len(rep.Direct) + len(rep.Service)
			}
		}
		ratesN += len(c.Rates)
		cp := c.ControlPlane
		if cp.ColdStart > 0 {
			cpN++
		}
		if cp.BatchServices > 0 {
			cpN++
		}
		cpN += len(cp.EndpointChange)
		if cp.NetworkProgramming != nil {
			cpN += 2
		}
	}
	for _, tc := range []struct {
		file   string
		header []string
		rows   int
	}{
		{LatencyCSV, latencyHeader, latencyN},
		{RatesCSV, ratesHeader, ratesN},
		{ControlPlaneCSV, controlPlaneHeader, cpN},
		{CellsCSV, cellsHeader, len(r.Cells)},
	} {
		f, err := os.Open(filepath.Join(dir, tc.file))
		if err != nil {
			t.Fatal(err)
		}
		recs, err := csv.NewReader(f).ReadAll()
		f.Close()
		if err != nil {
			t.Fatalf("parsing %s: %v", tc.file, err)
		}
		if len(recs) == 0 || !reflect.DeepEqual(recs[0], tc.header) {
			t.Errorf("%s header = %v, want %v", tc.file, recs[:min(1, len(recs))], tc.header)
		}
		if got := len(recs) - 1; got != tc.rows {
			t.Errorf("%s has %d rows, want %d", tc.file, got, tc.rows)
		}
	}
	if latencyN == 0 || ratesN == 0 || cpN == 0 {
		t.Fatal("the synthetic run has no samples")
	}

	// Every plot exists, is well-formed XML with an <svg> element, and the
	// report embeds it.
	for _, name := range []string{"cdf-tcp-connect-0.svg", "cdf-tcp-connect-10k.svg", "connect-vs-services.svg",
		"histogram-tcp-crr.svg", "connect-rate.svg", "cpu-per-connection.svg", "control-plane.svg"} {
		checkSVG(t, filepath.Join(dir, name))
		if !strings.Contains(md, "]("+name+")") {
			t.Errorf("report.md does not embed %s", name)
		}
	}

	// results.json round-trips.
	got, err := Load(dir)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	js, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var want results.Run
	if err := json.Unmarshal(js, &want); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, &want) {
		t.Errorf("Load(dir) differs from the run written")
	}

	// Rendering is deterministic: a second Write gives the same bytes.
	dir2 := t.TempDir()
	if err := Write(dir2, got); err != nil {
		t.Fatalf("Write of the loaded run: %v", err)
	}
	for _, name := range []string{ReportFile, LatencyCSV, ControlPlaneCSV, "connect-vs-services.svg"} {
		a, _ := os.ReadFile(filepath.Join(dir, name))
		b, _ := os.ReadFile(filepath.Join(dir2, name))
		if !bytes.Equal(a, b) {
			t.Errorf("%s differs between two writes of the same run", name)
		}
	}
}

func checkSVG(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Errorf("plot: %v", err)
		return
	}
	defer f.Close()
	d := xml.NewDecoder(f)
	found := false
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Errorf("%s is not well-formed XML: %v", filepath.Base(path), err)
			return
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "svg" {
			found = true
		}
	}
	if !found {
		t.Errorf("%s has no <svg> element", filepath.Base(path))
	}
}

func TestLoadMissing(t *testing.T) {
	if _, err := Load(t.TempDir()); err == nil {
		t.Fatal("Load of an empty directory succeeded")
	}
}

func TestWriteEmptyRun(t *testing.T) {
	// A run that measured nothing (every cell failed before measuring)
	// still gets a report saying so, and no plots.
	r := &results.Run{
		Contenders: []string{results.Direct, results.EBPF},
		Sizes:      []int{0},
		Cells:      []results.Cell{{Contender: results.EBPF, Size: 0, Skipped: "proxy did not start", Elapsed: time.Second}},
	}
	dir := t.TempDir()
	if err := Write(dir, r); err != nil {
		t.Fatalf("Write: %v", err)
	}
	md, err := os.ReadFile(filepath.Join(dir, ReportFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| direct | 0 | no cell recorded |", "did not reach 0: proxy did not start", "| ebpf proxy RSS at 10k Services below 100 MiB | 10k: no cell recorded | not measured |"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("report.md lacks %q", want)
		}
	}
	if svgs, _ := filepath.Glob(filepath.Join(dir, "*.svg")); len(svgs) != 0 {
		t.Errorf("plots without data: %v", svgs)
	}
}

// TestBulkCreationJudged: a growth of the background Services served late
// fails the creation target even when every cell's batch met it, and the
// report lists the growth.
func TestBulkCreationJudged(t *testing.T) {
	r := syntheticRun(t)
	r.Bulk = append(r.Bulk, results.BulkCreate{Contender: results.EBPF, From: 0, To: 10000, Creating: time.Minute, Served: 3 * time.Second})
	dir := t.TempDir()
	if err := Write(dir, r); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, ReportFile))
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	var row string
	for _, line := range strings.Split(md, "\n") {
		if strings.HasPrefix(line, "| ebpf: Services served within 2 s of their creation finishing") {
			row = line
		}
	}
	if !strings.HasSuffix(row, "| no |") {
		t.Errorf("a growth served after 3 s is judged %q", row)
	}
	if !strings.Contains(md, "| ebpf | 0 → 10k | 10000 | 60.00 s | 3.00 s |") {
		t.Errorf("report.md does not list the growth:\n%s", md)
	}
}

// TestIncompleteCellKeepsItsData: a cell measured but with a failed step
// is shown with its measurements, and listed with the step that failed.
func TestIncompleteCellKeepsItsData(t *testing.T) {
	r := syntheticRun(t)
	var cell *results.Cell
	for i := range r.Cells {
		if r.Cells[i].Contender == results.IptablesLegacy && r.Cells[i].Skipped == "" {
			cell = &r.Cells[i]
			break
		}
	}
	if cell == nil {
		t.Fatal("no iptables-legacy cell in the synthetic run")
	}
	cell.Incomplete = "endpoint changes: never observed"
	dir := t.TempDir()
	if err := Write(dir, r); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, ReportFile))
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	if !strings.Contains(md, "measured, but incomplete: endpoint changes: never observed") {
		t.Error("the incomplete cell is not listed with its reason")
	}
	for _, line := range strings.Split(md, "\n") {
		if strings.HasPrefix(line, "| iptables-legacy | IPv4 | service |") {
			return // its latency rows are shown
		}
	}
	t.Error("the incomplete cell's measurements are not shown")
}

// An IPv6 run's rows say IPv6 in their family column, the header says
// which family the run measured, and a contender that does not serve
// IPv6 is listed with its reason, not as failing to reach a size.
func TestIPv6RunRows(t *testing.T) {
	r := syntheticRun(t)
	r.Family = "IPv6"
	why := "not available over IPv6: the eBPF mode's IPv6 datapath is not built yet (issue 20)"
	for i := range r.Cells {
		r.Cells[i].Family = "IPv6"
		if r.Cells[i].Contender == results.EBPF {
			r.Cells[i] = results.Cell{Contender: results.EBPF, Family: "IPv6", Size: r.Cells[i].Size, Skipped: why}
		}
	}
	dir := t.TempDir()
	if err := Write(dir, r); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, ReportFile))
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	if !strings.Contains(md, "- IP family: IPv6") {
		t.Error("the header does not name the IP family")
	}
	if !strings.Contains(md, "| iptables-legacy | IPv6 | service |") {
		t.Error("no latency row of iptables-legacy with the family IPv6")
	}
	if !strings.Contains(md, "| ebpf | IPv6 | "+why) {
		t.Error("ebpf's rows do not give the reason it is not available")
	}
	if !strings.Contains(md, "Stream (tcp-stream):\n\n") {
		t.Error("the synthetic run's stream table is missing")
	}
	if strings.Contains(md, "did not reach 0: not available") {
		t.Error("a contender that does not serve the family is reported as not reaching a size")
	}
	csv, err := os.ReadFile(filepath.Join(dir, CellsCSV))
	if err != nil {
		t.Fatal(err)
	}
	if lines := strings.Split(strings.TrimSpace(string(csv)), "\n"); !strings.HasSuffix(lines[0], ",family") || !strings.HasSuffix(lines[1], ",IPv6") {
		t.Errorf("cells.csv has no family column: %q, %q", lines[0], lines[1])
	}
}
