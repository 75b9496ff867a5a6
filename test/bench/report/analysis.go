package report

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// cellKey finds a cell by contender and size.
type cellKey struct {
	contender string
	size      int
}

// index is a Run arranged for rendering: contenders in results.AllContenders
// order (unknown names after them, sorted), sizes ascending, and cells by
// key. Everything iterates over these slices, never over a map, so the
// output is deterministic.
type index struct {
	run        *results.Run
	contenders []string
	sizes      []int
	cells      map[cellKey]*results.Cell
	// latencies caches latencyOf: the tables, targets and plots ask for
	// the same cell's workload several times, and each answer sorts
	// every sample.
	latencies map[latencyKey]latencyEntry
}

type latencyKey struct {
	cell     *results.Cell
	workload string
}

type latencyEntry struct {
	l  latency
	ok bool
}

// latency is latencyOf, computed once per cell and workload.
func (ix *index) latency(c *results.Cell, workload string) (latency, bool) {
	k := latencyKey{c, workload}
	if e, ok := ix.latencies[k]; ok {
		return e.l, e.ok
	}
	l, ok := latencyOf(c, workload)
	ix.latencies[k] = latencyEntry{l, ok}
	return l, ok
}

func newIndex(r *results.Run) *index {
	ix := &index{run: r, cells: make(map[cellKey]*results.Cell), latencies: make(map[latencyKey]latencyEntry)}
	seenC := make(map[string]bool)
	seenS := make(map[int]bool)
	for _, c := range r.Contenders {
		seenC[c] = true
	}
	for _, s := range r.Sizes {
		seenS[s] = true
	}
	for i := range r.Cells {
		c := &r.Cells[i]
		seenC[c.Contender] = true
		seenS[c.Size] = true
		// A repeated cell (should not happen) keeps the first one: the
		// report must not change with the order of a map.
		if _, dup := ix.cells[cellKey{c.Contender, c.Size}]; !dup {
			ix.cells[cellKey{c.Contender, c.Size}] = c
		}
	}
	for _, c := range results.AllContenders {
		if seenC[c] {
			ix.contenders = append(ix.contenders, c)
			delete(seenC, c)
		}
	}
	var rest []string
	for c := range seenC {
		rest = append(rest, c)
	}
	sort.Strings(rest)
	ix.contenders = append(ix.contenders, rest...)
	for s := range seenS {
		ix.sizes = append(ix.sizes, s)
	}
	sort.Ints(ix.sizes)
	return ix
}

// cell returns the measured cell, or nil and why there is none.
func (ix *index) cell(contender string, size int) (*results.Cell, string) {
	c, ok := ix.cells[cellKey{contender, size}]
	if !ok {
		return nil, "no cell recorded"
	}
	if c.Skipped != "" {
		return nil, skippedText(c, size)
	}
	return c, ""
}

// skippedText says why a skipped cell has no data: a contender that does
// not serve the run's IP family (its reason starts "not available") was
// never tried, any other did not reach the size.
func skippedText(c *results.Cell, size int) string {
	if strings.HasPrefix(c.Skipped, "not available") {
		return c.Skipped
	}
	return fmt.Sprintf("did not reach %s: %s", sizeLabel(size), c.Skipped)
}

// largestSize is the largest size in the run, -1 without sizes.
func (ix *index) largestSize() int {
	if len(ix.sizes) == 0 {
		return -1
	}
	return ix.sizes[len(ix.sizes)-1]
}

// latency is one latency workload of one cell, pooled across repetitions.
type latency struct {
	Service, Direct             Summary
	ServiceErrors, DirectErrors int
	// Ratios of the pooled service and direct percentiles, and their
	// range across repetitions.
	P50, P99             float64
	P50OK, P99OK         bool
	P50Spread, P99Spread spread
	// service and direct are the pooled samples, for the plots.
	service, direct []float64
}

func latencyOf(c *results.Cell, workload string) (latency, bool) {
	var p *results.Paired
	for i := range c.Latency {
		if c.Latency[i].Workload == workload {
			p = &c.Latency[i]
			break
		}
	}
	if p == nil {
		return latency{}, false
	}
	var l latency
	var s50, d50, s99, d99 []float64
	for _, rep := range p.Reps {
		l.service = append(l.service, rep.Service...)
		l.direct = append(l.direct, rep.Direct...)
		l.ServiceErrors += rep.ServiceErrors
		l.DirectErrors += rep.DirectErrors
		rs, rd := Summarize(rep.Service), Summarize(rep.Direct)
		s50, d50 = append(s50, rs.P50), append(d50, rd.P50)
		s99, d99 = append(s99, rs.P99), append(d99, rd.P99)
	}
	l.Service, l.Direct = Summarize(l.service), Summarize(l.direct)
	l.P50, l.P50OK = ratio(l.Service.P50, l.Direct.P50)
	l.P99, l.P99OK = ratio(l.Service.P99, l.Direct.P99)
	l.P50Spread, l.P99Spread = ratioSpread(s50, d50), ratioSpread(s99, d99)
	return l, true
}

// rateSide is the sums of one target's phases.
type rateSide struct {
	Seconds, NodeCPU, ProxyCPU float64
	Ops, Errors                int64
}

func (s *rateSide) add(ph results.RatePhase) {
	s.Seconds += ph.Seconds
	s.Ops += ph.Ops
	s.Errors += ph.Errors
	s.NodeCPU += ph.NodeCPUSeconds
	s.ProxyCPU += ph.ProxyCPUSeconds
}

func (s rateSide) rate() float64 {
	if s.Seconds <= 0 {
		return 0
	}
	return float64(s.Ops) / s.Seconds
}

// per is CPU seconds per unit ops (per 10k connections, per GB).
func per(cpu float64, ops int64, unit float64) (float64, bool) {
	if ops <= 0 {
		return 0, false
	}
	return cpu / (float64(ops) / unit), true
}

// rate is one rate workload of one cell: sums over the phases (sum ops /
// sum seconds per target) and the service/direct ratio per repetition.
type rate struct {
	Service, Direct rateSide
	Ratio           float64
	RatioOK         bool
	Spread          spread
	phases          int
}

func rateOf(c *results.Cell, workload string) (rate, bool) {
	var r rate
	reps := make(map[int]*[2]rateSide)
	var repOrder []int
	for _, ph := range c.Rates {
		if ph.Workload != workload {
			continue
		}
		r.phases++
		var side *rateSide
		i := 0
		switch ph.Target {
		case results.TargetService:
			side = &r.Service
		case results.TargetDirect:
			side, i = &r.Direct, 1
		default:
			continue
		}
		rs, ok := reps[ph.Rep]
		if !ok {
			rs = new([2]rateSide)
			reps[ph.Rep] = rs
			repOrder = append(repOrder, ph.Rep)
		}
		side.add(ph)
		rs[i].add(ph)
	}
	if r.phases == 0 {
		return rate{}, false
	}
	sort.Ints(repOrder)
	var num, den []float64
	for _, k := range repOrder {
		num = append(num, reps[k][0].rate())
		den = append(den, reps[k][1].rate())
	}
	r.Ratio, r.RatioOK = ratio(r.Service.rate(), r.Direct.rate())
	r.Spread = ratioSpread(num, den)
	return r, true
}

// durations converts to seconds.
func seconds(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = d.Seconds()
	}
	return out
}

// sizeLabel writes a Service count the way the issue does: 0, 1k, 10k.
func sizeLabel(n int) string {
	if n >= 1000 && n%1000 == 0 {
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprintf("%d", n)
}
