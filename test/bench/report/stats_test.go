package report

import (
	"math"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func TestSummarize(t *testing.T) {
	oneTo100 := make([]float64, 100)
	for i := range oneTo100 {
		oneTo100[i] = float64(100 - i) // descending: Summarize must sort
	}
	sd4 := math.Sqrt(5.0 / 3)
	sd100 := math.Sqrt(100 * 101 / 12.0)
	for _, tc := range []struct {
		name string
		in   []float64
		want Summary
	}{
		{"empty", nil, Summary{}},
		{"one", []float64{5}, Summary{N: 1, Mean: 5, Min: 5, P50: 5, P90: 5, P99: 5, P999: 5, Max: 5}},
		{"four, linear interpolation", []float64{4, 1, 3, 2}, Summary{
			N: 4, Mean: 2.5, Stddev: sd4, CI99: 2.576 * sd4 / 2,
			Min: 1, P50: 2.5, P90: 3.7, P99: 3.97, P999: 3.997, Max: 4}},
		{"1..100", oneTo100, Summary{
			N: 100, Mean: 50.5, Stddev: sd100, CI99: 2.576 * sd100 / 10,
			Min: 1, P50: 50.5, P90: 90.1, P99: 99.01, P999: 99.901, Max: 100}},
		{"constant", []float64{7, 7, 7}, Summary{N: 3, Mean: 7, Min: 7, P50: 7, P90: 7, P99: 7, P999: 7, Max: 7}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := append([]float64(nil), tc.in...)
			got := Summarize(in)
			g := []float64{float64(got.N), got.Mean, got.CI99, got.Stddev, got.Min, got.P50, got.P90, got.P99, got.P999, got.Max}
			w := []float64{float64(tc.want.N), tc.want.Mean, tc.want.CI99, tc.want.Stddev, tc.want.Min, tc.want.P50, tc.want.P90, tc.want.P99, tc.want.P999, tc.want.Max}
			for i := range g {
				if !near(g[i], w[i]) {
					t.Fatalf("Summarize(%v) = %+v, want %+v", tc.in, got, tc.want)
				}
			}
			for i := range in {
				if in[i] != tc.in[i] {
					t.Fatalf("Summarize modified its input: %v", in)
				}
			}
		})
	}
}

func TestHistogramQuantile(t *testing.T) {
	inf := math.Inf(1)
	bounds := []float64{0.1, 0.2, 0.5, inf}
	for _, tc := range []struct {
		name    string
		q       float64
		bounds  []float64
		buckets []uint64
		want    float64
		ok      bool
	}{
		{"median in second bucket", 0.5, bounds, []uint64{10, 30, 40, 40}, 0.15, true},
		{"rank at first bucket's top", 0.25, bounds, []uint64{10, 30, 40, 40}, 0.1, true},
		{"first bucket from 0", 0.1, bounds, []uint64{10, 30, 40, 40}, 0.04, true},
		{"p99 in third bucket", 0.99, bounds, []uint64{10, 30, 40, 40}, 0.488, true},
		{"rank in +Inf bucket answers the largest finite bound", 0.99, bounds, []uint64{10, 30, 40, 50}, 0.5, true},
		{"skips empty buckets", 0.5, bounds, []uint64{0, 0, 10, 10}, 0.35, true},
		{"empty histogram", 0.5, bounds, []uint64{0, 0, 0, 0}, 0, false},
		{"lengths differ", 0.5, bounds, []uint64{1, 2}, 0, false},
		{"q out of range", 1.5, bounds, []uint64{10, 30, 40, 40}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := histogramQuantile(tc.q, tc.bounds, tc.buckets)
			if ok != tc.ok || (ok && !near(got, tc.want)) {
				t.Fatalf("histogramQuantile(%v) = %v, %v; want %v, %v", tc.q, got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestRatioSpread(t *testing.T) {
	for _, tc := range []struct {
		name     string
		num, den []float64
		want     spread
		text     string
	}{
		{"three reps", []float64{2, 3, 4}, []float64{2, 2, 2}, spread{Min: 1, Max: 2, N: 3}, "1.000–2.000"},
		{"zero and missing skipped", []float64{2, 0, 6, 1}, []float64{4, 1, 0}, spread{Min: 0.5, Max: 0.5, N: 1}, "0.500–0.500"},
		{"none", nil, nil, spread{}, "n/a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := ratioSpread(tc.num, tc.den)
			if got != tc.want {
				t.Fatalf("ratioSpread = %+v, want %+v", got, tc.want)
			}
			if s := spreadText(got); s != tc.text {
				t.Fatalf("spreadText = %q, want %q", s, tc.text)
			}
		})
	}
}

func TestLatencyAndRateRatios(t *testing.T) {
	c := &results.Cell{
		Latency: []results.Paired{{Workload: results.TCPConnect, Reps: []results.Rep{
			{Direct: []float64{10, 10, 10}, Service: []float64{11, 11, 11}, ServiceErrors: 1},
			{Direct: []float64{10, 10, 10}, Service: []float64{13, 13, 13}, DirectErrors: 2},
		}}},
		Rates: []results.RatePhase{
			{Workload: results.ConnectRate, Rep: 0, Target: results.TargetDirect, Seconds: 1, Ops: 1000, NodeCPUSeconds: 2},
			{Workload: results.ConnectRate, Rep: 0, Target: results.TargetService, Seconds: 1, Ops: 900, NodeCPUSeconds: 2},
			{Workload: results.ConnectRate, Rep: 1, Target: results.TargetService, Seconds: 2, Ops: 1600, NodeCPUSeconds: 2},
			{Workload: results.ConnectRate, Rep: 1, Target: results.TargetDirect, Seconds: 2, Ops: 2000, NodeCPUSeconds: 2},
			{Workload: results.Stream, Rep: 0, Target: results.TargetDirect, Seconds: 1, Ops: 5},
		},
	}
	l, ok := latencyOf(c, results.TCPConnect)
	if !ok {
		t.Fatal("latencyOf found no tcp-connect")
	}
	// Pooled service samples 11,11,11,13,13,13: p50 12.
	if !near(l.P50, 1.2) || l.P50Spread.N != 2 || !near(l.P50Spread.Min, 1.1) || !near(l.P50Spread.Max, 1.3) {
		t.Fatalf("p50 ratio %v spread %+v, want 1.2 and 1.1–1.3", l.P50, l.P50Spread)
	}
	if l.ServiceErrors != 1 || l.DirectErrors != 2 || l.Service.N != 6 {
		t.Fatalf("errors %d/%d N %d, want 1/2 6", l.ServiceErrors, l.DirectErrors, l.Service.N)
	}
	if _, ok := latencyOf(c, results.TCPRR); ok {
		t.Fatal("latencyOf found a workload the cell does not have")
	}
	r, ok := rateOf(c, results.ConnectRate)
	if !ok {
		t.Fatal("rateOf found no connect rate")
	}
	// Sum ops / sum seconds: 2500/3 over 3000/3.
	if !near(r.Ratio, 2500.0/3000) || !near(r.Spread.Min, 0.8) || !near(r.Spread.Max, 0.9) {
		t.Fatalf("rate ratio %v spread %+v, want 0.8333 and 0.8–0.9", r.Ratio, r.Spread)
	}
	if v, _ := per(r.Service.NodeCPU, r.Service.Ops, 1e4); !near(v, 4/0.25) {
		t.Fatalf("node CPU per 10k = %v, want 16", v)
	}
}
