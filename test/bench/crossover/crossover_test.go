package crossover

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

// design is a synthetic crossover: latencies (seconds) made of a base, a
// large effect per node, a large effect per window shared by every node
// (a drift within each period and a jump between them: the machine's load,
// the order of the modes), the mode effect and independent noise.
type design struct {
	nodes       []string
	nodeEffect  map[string]float64
	firstModes  map[string]string // each node's mode in period 0; swapped in 1
	windows     int               // per period
	periodJump  float64           // added to every value of period 1
	drift       float64           // per window, within a period
	shock       float64           // sd of the shared per-window shock
	noise       float64           // sd of each node's own noise
	modeEffect  float64           // added to mode "ebpf"
	base        float64
	skipPeriod1 bool // only period 0, for the unbalanced case
}

func twoNodes(modeEffect float64) design {
	return design{
		nodes:      []string{"node1", "node2"},
		nodeEffect: map[string]float64{"node1": 0, "node2": 500e-6},
		firstModes: map[string]string{"node1": "ebpf", "node2": "iptables"},
		windows:    12,
		periodJump: 1e-3,
		drift:      20e-6,
		shock:      200e-6,
		noise:      30e-6,
		modeEffect: modeEffect,
		base:       1e-3,
	}
}

func (d design) observations(rng *rand.Rand) []Obs {
	var obs []Obs
	other := map[string]string{"ebpf": "iptables", "iptables": "ebpf"}
	periods := 2
	if d.skipPeriod1 {
		periods = 1
	}
	for p := range periods {
		for w := range d.windows {
			shared := d.base + float64(p)*d.periodJump + float64(w)*d.drift + rng.NormFloat64()*d.shock
			for _, n := range d.nodes {
				mode := d.firstModes[n]
				if p == 1 {
					mode = other[mode]
				}
				v := shared + d.nodeEffect[n] + rng.NormFloat64()*d.noise
				if mode == "ebpf" {
					v += d.modeEffect
				}
				obs = append(obs, Obs{Period: p, Window: p*1000 + w, Node: n, Mode: mode, Value: v})
			}
		}
	}
	return obs
}

// naiveSequential is what the sequential demo compared: one mode's values
// in period 0 against the other's in period 1, every node in the same mode
// (here: node1's ebpf values before the swap against its iptables values
// after).
func naiveSequential(obs []Obs) float64 {
	var e, i []float64
	for _, o := range obs {
		if o.Node != "node1" {
			continue
		}
		if o.Mode == "ebpf" {
			e = append(e, o.Value)
		} else {
			i = append(i, o.Value)
		}
	}
	me, _ := meanSD(e)
	mi, _ := meanSD(i)
	return me - mi
}

func TestEstimateRecoversTheModeEffect(t *testing.T) {
	four := twoNodes(-40e-6)
	four.nodes = []string{"a", "b", "c", "d"}
	four.nodeEffect = map[string]float64{"a": 0, "b": 700e-6, "c": -300e-6, "d": 150e-6}
	four.firstModes = map[string]string{"a": "ebpf", "b": "ebpf", "c": "iptables", "d": "iptables"}
	for _, c := range []struct {
		name string
		d    design
	}{
		{"two nodes, ebpf 40µs faster", twoNodes(-40e-6)},
		{"two nodes, ebpf 25µs slower", twoNodes(25e-6)},
		{"two nodes, no difference", twoNodes(0)},
		{"four nodes, two per mode", four},
	} {
		t.Run(c.name, func(t *testing.T) {
			obs := c.d.observations(rand.New(rand.NewPCG(1, 2)))
			r, err := Estimate(obs, "ebpf", "iptables", 0.95)
			if err != nil {
				t.Fatal(err)
			}
			if !r.Covers(c.d.modeEffect) {
				t.Errorf("95%% interval [%g, %g] misses the mode effect %g (estimate %g)", r.Low, r.High, c.d.modeEffect, r.Diff)
			}
			// The node and period effects (hundreds of µs) are gone:
			// the interval is about as wide as the noise allows.
			if w := r.High - r.Low; w > 60e-6 {
				t.Errorf("interval %g wide, want under 60µs with 30µs of noise per node and window", w)
			}
			if !r.Balanced {
				t.Error("a crossover with every node once in each mode reported as unbalanced")
			}
			if len(r.Periods) != 2 || r.Periods[0].Windows != c.d.windows || r.Periods[1].Windows != c.d.windows {
				t.Errorf("periods %+v, want 2 of %d windows", r.Periods, c.d.windows)
			}
			if len(r.Cells) != 2*len(c.d.nodes) {
				t.Errorf("%d cells, want one per node and period", len(r.Cells))
			}
			if c.d.modeEffect == 0 && !r.Covers(0) {
				t.Errorf("no mode effect, but the interval [%g, %g] excludes 0", r.Low, r.High)
			}
		})
	}
}

// The sequential comparison the demo used to make is off by the period
// effect; the crossover is not.
func TestSequentialComparisonIsConfounded(t *testing.T) {
	d := twoNodes(0)
	obs := d.observations(rand.New(rand.NewPCG(3, 4)))
	if naive := naiveSequential(obs); math.Abs(naive) < 500e-6 {
		t.Fatalf("the synthetic data's period effect does not show in the sequential comparison (%g): the test proves nothing", naive)
	}
	r, err := Estimate(obs, "ebpf", "iptables", 0.95)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Covers(0) {
		t.Errorf("no mode effect, but the crossover's interval [%g, %g] excludes 0", r.Low, r.High)
	}
}

// Over many experiments, the 95 % interval holds the true effect about 95 %
// of the time, with large node and period effects and few windows.
func TestEstimateCoverage(t *testing.T) {
	const runs = 2000
	for _, windows := range []int{3, 12} {
		d := twoNodes(-40e-6)
		d.windows = windows
		rng := rand.New(rand.NewPCG(5, uint64(windows)))
		covered := 0
		for range runs {
			r, err := Estimate(d.observations(rng), "ebpf", "iptables", 0.95)
			if err != nil {
				t.Fatal(err)
			}
			if r.Covers(d.modeEffect) {
				covered++
			}
		}
		// Binomial sd at 95 %, 2000 runs: 0.5 %; allow 4 of them.
		if got := float64(covered) / runs; got < 0.93 || got > 0.97 {
			t.Errorf("%d windows per period: the 95%% interval covered the effect in %.1f%% of %d runs", windows, 100*got, runs)
		}
	}
}

func TestEstimateErrorsAndBalance(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	d := twoNodes(0)
	d.windows = 1
	if _, err := Estimate(d.observations(rng), "ebpf", "iptables", 0.95); err == nil || !strings.Contains(err.Error(), "want 2 at least") {
		t.Errorf("one window per period: err %v, want a request for two", err)
	}
	if _, err := Estimate(nil, "ebpf", "iptables", 0.95); err == nil {
		t.Error("no observations: no error")
	}
	// Only one node ever measured: no window has both modes.
	d = twoNodes(0)
	var one []Obs
	for _, o := range d.observations(rng) {
		if o.Node == "node1" {
			one = append(one, o)
		}
	}
	if _, err := Estimate(one, "ebpf", "iptables", 0.95); err == nil {
		t.Error("no window with both modes: no error")
	}
	if _, err := Estimate(d.observations(rng), "ebpf", "ebpf", 0.95); err == nil {
		t.Error("a mode against itself: no error")
	}
	if _, err := Estimate(d.observations(rng), "ebpf", "iptables", 1); err == nil {
		t.Error("level 1: no error")
	}
	bad := d.observations(rng)
	bad[3].Value = math.NaN()
	if _, err := Estimate(bad, "ebpf", "iptables", 0.95); err == nil {
		t.Error("a NaN value: no error")
	}
	// No swap: the node effect does not cancel, and the result says so.
	d.skipPeriod1 = true
	r, err := Estimate(d.observations(rng), "ebpf", "iptables", 0.95)
	if err != nil {
		t.Fatal(err)
	}
	if r.Balanced {
		t.Error("one period, no swap: reported as balanced")
	}
	// Values of another mode are ignored.
	d.skipPeriod1 = false
	obs := append(d.observations(rng), Obs{Period: 0, Window: 0, Node: "node3", Mode: "none", Value: 1})
	if r, err := Estimate(obs, "ebpf", "iptables", 0.95); err != nil || len(r.Cells) != 4 {
		t.Errorf("a third mode's value: cells %d, err %v; want it ignored", len(r.Cells), err)
	}
}

func TestStudentTQuantile(t *testing.T) {
	for _, c := range []struct{ p, df, want float64 }{
		{0.975, 1, 12.706204736},
		{0.975, 2, 4.302652730},
		{0.975, 10, 2.228138852},
		{0.995, 10, 3.169272673},
		{0.975, 30, 2.042272456},
		{0.975, 2.5, 3.574654842}, // fractional, as Welch's are (the incomplete beta function)
		{0.025, 10, -2.228138852},
		{0.975, math.Inf(1), 1.959963985},
		{0.5, 7, 0},
	} {
		got := StudentTQuantile(c.p, c.df)
		if math.Abs(got-c.want) > 1e-5*math.Max(1, math.Abs(c.want)) {
			t.Errorf("t quantile p=%g df=%g: %.9f, want %.9f", c.p, c.df, got, c.want)
		}
	}
	if !math.IsNaN(StudentTQuantile(1, 3)) || !math.IsNaN(StudentTQuantile(0.9, 0)) {
		t.Error("out-of-range arguments: want NaN")
	}
}
