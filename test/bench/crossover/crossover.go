// Package crossover estimates the difference between two datapath modes from
// a crossover A/B: the nodes are split between the modes, measured at the
// same time, and swap modes halfway (AB/BA), so that neither the nodes' own
// differences nor what changes over time (other load on the machine, caches
// warming, the order in which the modes ran) can pass for the modes'.
//
// The unit of replication is a window: a short interval (seconds) in which
// every node measured something. Within a window the two modes ran at the
// same time, so the window's paired difference
//
//	d = mean over A's nodes − mean over B's nodes
//
// holds no time effect. It still holds the nodes' effect, with one sign in
// the first period and the other after the swap; the estimate is therefore
// the mean of the periods' mean differences, each period weighed equally,
// where the node effect cancels (exactly when each node spends as many
// periods in each mode). Its confidence interval is Welch's t interval on
// those period means: the variance is Σ s_p²/n_p over the periods divided
// by P², with Welch–Satterthwaite's degrees of freedom.
//
// Windows are assumed independent; latency noise correlated over longer
// than a window makes the interval too narrow, so keep windows no shorter
// than the noise's memory (seconds, on a machine; a minute on a cluster).
package crossover

import (
	"errors"
	"fmt"
	"math"
	"sort"
)

// Obs is one node's statistic (a mean latency, a median: any number whose
// difference between the modes is wanted) in one window.
type Obs struct {
	// Period is the crossover period: the nodes keep their modes within
	// one, and swap between them.
	Period int
	// Window identifies the interval the value comes from; the nodes
	// measured in the same window were measured at the same time.
	Window int
	Node   string
	Mode   string
	Value  float64
}

// Cell is what a node measured in one period: the mean of its windows'
// values.
type Cell struct {
	Period  int
	Node    string
	Mode    string
	Windows int
	Mean    float64
}

// Period is one period's paired differences.
type Period struct {
	Period int
	// Windows is the number of windows with both modes measured.
	Windows int
	// Mean and StdDev are those of the windows' differences A − B.
	Mean, StdDev float64
}

// Result is the estimated difference A − B and its interval.
type Result struct {
	A, B string
	// Level is the interval's confidence, e.g. 0.95.
	Level float64
	// Diff is the estimate of A − B; [Low, High] its confidence interval,
	// from Welch's t with DF degrees of freedom.
	Diff, Low, High, DF float64
	Periods             []Period
	Cells               []Cell
	// Balanced is true when every node was measured in each mode in the
	// same number of periods: only then does the node effect cancel.
	Balanced bool
}

// Covers reports whether the interval holds v.
func (r Result) Covers(v float64) bool { return r.Low <= v && v <= r.High }

// Estimate computes A − B from obs (see the package comment). A window
// counts when it has at least one node in each mode; values of other modes
// and windows in which a node's mode is not A or B are ignored. Every period
// needs two such windows at least, for its variance.
func Estimate(obs []Obs, a, b string, level float64) (Result, error) {
	if a == b {
		return Result{}, fmt.Errorf("comparing mode %q with itself", a)
	}
	if !(level > 0 && level < 1) {
		return Result{}, fmt.Errorf("confidence level %g: want a value between 0 and 1", level)
	}
	type wkey struct{ period, window int }
	type side struct {
		sum float64
		n   int
	}
	windows := map[wkey]map[string]*side{} // mode -> sum of its nodes' values
	type ckey struct {
		period     int
		node, mode string
	}
	cells := map[ckey]*side{}
	for _, o := range obs {
		if o.Mode != a && o.Mode != b {
			continue
		}
		if math.IsNaN(o.Value) || math.IsInf(o.Value, 0) {
			return Result{}, fmt.Errorf("period %d, window %d, node %s: value %g", o.Period, o.Window, o.Node, o.Value)
		}
		k := wkey{o.Period, o.Window}
		if windows[k] == nil {
			windows[k] = map[string]*side{a: {}, b: {}}
		}
		s := windows[k][o.Mode]
		s.sum += o.Value
		s.n++
		ck := ckey{o.Period, o.Node, o.Mode}
		if cells[ck] == nil {
			cells[ck] = &side{}
		}
		cells[ck].sum += o.Value
		cells[ck].n++
	}
	diffs := map[int][]float64{}
	for k, w := range windows {
		if w[a].n == 0 || w[b].n == 0 {
			continue
		}
		diffs[k.period] = append(diffs[k.period], w[a].sum/float64(w[a].n)-w[b].sum/float64(w[b].n))
	}
	if len(diffs) == 0 {
		return Result{}, errors.New("no window measured both modes at the same time")
	}
	r := Result{A: a, B: b, Level: level}
	var variance, dfDenom float64
	for p, d := range diffs {
		if len(d) < 2 {
			return Result{}, fmt.Errorf("period %d has %d window with both modes: want 2 at least, for its variance", p, len(d))
		}
		mean, sd := meanSD(d)
		r.Periods = append(r.Periods, Period{Period: p, Windows: len(d), Mean: mean, StdDev: sd})
		n := float64(len(d))
		v := sd * sd / n
		variance += v
		dfDenom += v * v / (n - 1)
	}
	sort.Slice(r.Periods, func(i, j int) bool { return r.Periods[i].Period < r.Periods[j].Period })
	for _, p := range r.Periods {
		r.Diff += p.Mean
	}
	np := float64(len(r.Periods))
	r.Diff /= np
	variance /= np * np
	// Welch–Satterthwaite: (Σv)² / Σ v²/(n-1), the np² cancels. With no
	// spread at all the t quantile is moot: the interval is the point.
	r.DF = math.Inf(1)
	if dfDenom > 0 {
		r.DF = math.Pow(variance*np*np, 2) / dfDenom
	}
	half := StudentTQuantile(0.5+level/2, r.DF) * math.Sqrt(variance)
	r.Low, r.High = r.Diff-half, r.Diff+half

	modes := map[string]map[string]int{} // node -> mode -> periods
	for k, s := range cells {
		r.Cells = append(r.Cells, Cell{Period: k.period, Node: k.node, Mode: k.mode, Windows: s.n, Mean: s.sum / float64(s.n)})
		if modes[k.node] == nil {
			modes[k.node] = map[string]int{}
		}
		modes[k.node][k.mode]++
	}
	sort.Slice(r.Cells, func(i, j int) bool {
		if r.Cells[i].Period != r.Cells[j].Period {
			return r.Cells[i].Period < r.Cells[j].Period
		}
		if r.Cells[i].Node != r.Cells[j].Node {
			return r.Cells[i].Node < r.Cells[j].Node
		}
		return r.Cells[i].Mode < r.Cells[j].Mode
	})
	r.Balanced = true
	for _, m := range modes {
		if m[a] != m[b] {
			r.Balanced = false
		}
	}
	return r, nil
}

// meanSD returns the mean and the sample standard deviation of x.
func meanSD(x []float64) (mean, sd float64) {
	for _, v := range x {
		mean += v
	}
	mean /= float64(len(x))
	var ss float64
	for _, v := range x {
		ss += (v - mean) * (v - mean)
	}
	return mean, math.Sqrt(ss / float64(len(x)-1))
}
