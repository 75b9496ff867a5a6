package report

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// plotFiles names the SVG files written, for the markdown to embed.
type plotFiles struct {
	cdf               []sizedFile
	connectVsServices string
	histogram         string
	connectRate       string
	cpuPerConnection  string
	controlPlane      string
}

type sizedFile struct {
	size int
	name string
}

// contenderColors is the Okabe-Ito palette (distinguishable with the
// common colour-vision deficiencies), one fixed colour per contender so
// every plot uses the same one.
var contenderColors = map[string]color.RGBA{
	results.Direct:               {0, 0, 0, 255},
	results.EBPF:                 {0, 114, 178, 255},
	results.IptablesNFT:          {230, 159, 0, 255},
	results.IptablesLegacy:       {204, 121, 167, 255},
	results.KubeProxyIptables:    {213, 94, 0, 255},
	results.KubeProxyIptablesNFT: {86, 180, 233, 255},
	results.KubeProxyNFTables:    {0, 158, 115, 255},
}

// labelOf is a contender's legend label: the direct contender's figures
// are of the pod IP (it has no service path).
func labelOf(contender string) string {
	if contender == results.Direct {
		return contender + " (pod IP)"
	}
	return contender
}

func colorOf(contender string) color.Color {
	if c, ok := contenderColors[contender]; ok {
		return c
	}
	return color.RGBA{86, 180, 233, 255} // sky blue: a contender this package does not know
}

// Plot sizes.
const (
	plotW = 18 * vg.Centimeter
	plotH = 12 * vg.Centimeter
)

func newPlot(title, x, y string) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.Title.Padding = 3 * vg.Millimeter
	p.X.Label.Text = x
	p.Y.Label.Text = y
	p.Add(plotter.NewGrid())
	return p
}

// legendKey is one legend entry: a label in its contender's colour.
type legendKey struct {
	label string
	color color.Color
}

// keys collects legend entries once each, in the order first added.
type keys []legendKey

func (k *keys) add(label string, c color.Color) {
	for _, e := range *k {
		if e.label == label {
			return
		}
	}
	*k = append(*k, legendKey{label, c})
}

// legendW is the strip right of the plots that holds the legend: inside
// the data area it would hide data, whatever corner it took.
const legendW = 6.5 * vg.Centimeter

// savePlots saves one or more plots side by side, w wide together, in one
// SVG file, with one legend for all of them on the right (the colours are
// the same in every panel).
func savePlots(path string, w vg.Length, ks keys, ps ...*plot.Plot) error {
	c := vgsvg.New(w+legendW, plotH)
	dc := draw.New(c)
	area := draw.Crop(dc, 0, -legendW, 0, 0)
	if len(ps) == 1 {
		ps[0].Draw(area)
	} else {
		tiles := draw.Tiles{Rows: 1, Cols: len(ps), PadX: vg.Centimeter, PadTop: 2 * vg.Millimeter, PadBottom: 2 * vg.Millimeter, PadLeft: 2 * vg.Millimeter, PadRight: 2 * vg.Millimeter}
		canvases := plot.Align([][]*plot.Plot{ps}, tiles, area)
		for i, p := range ps {
			p.Draw(canvases[0][i])
		}
	}
	leg := plot.NewLegend()
	leg.Top, leg.Left = true, true
	leg.YOffs = -vg.Centimeter
	leg.TextStyle.Font.Size = vg.Points(10)
	for _, k := range ks {
		leg.Add(k.label, &plotter.Line{LineStyle: draw.LineStyle{Color: k.color, Width: vg.Points(4)}})
	}
	leg.Draw(draw.Crop(dc, w+4*vg.Millimeter, 0, 0, 0))

	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("creating plot %s: %w", path, err)
	}
	if _, err := c.WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("writing plot %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing plot %s: %w", path, err)
	}
	return nil
}

// writePlots writes every plot the run has data for into dir.
func writePlots(dir string, ix *index) (plotFiles, error) {
	var pf plotFiles
	for _, size := range ix.sizes {
		name := fmt.Sprintf("cdf-%s-%s.svg", results.TCPConnect, sizeLabel(size))
		ok, err := cdfPlot(filepath.Join(dir, name), ix, size)
		if err != nil {
			return pf, err
		}
		if ok {
			pf.cdf = append(pf.cdf, sizedFile{size, name})
		}
	}
	steps := []struct {
		name string
		dst  *string
		fn   func(string, *index) (bool, error)
	}{
		{"connect-vs-services.svg", &pf.connectVsServices, connectVsServicesPlot},
		{"histogram-tcp-crr.svg", &pf.histogram, histogramPlot},
		{"connect-rate.svg", &pf.connectRate, func(p string, ix *index) (bool, error) {
			return ratePlot(p, ix, "new connections per second, service path", "connections/s", connectRateValue)
		}},
		{"cpu-per-connection.svg", &pf.cpuPerConnection, func(p string, ix *index) (bool, error) {
			return ratePlot(p, ix, "node CPU per 10k connections, service path", "node CPU seconds per 10k connections", nodeCPUPer10k)
		}},
		{"control-plane.svg", &pf.controlPlane, controlPlanePlot},
	}
	for _, s := range steps {
		ok, err := s.fn(filepath.Join(dir, s.name), ix)
		if err != nil {
			return pf, err
		}
		if ok {
			*s.dst = s.name
		}
	}
	return pf, nil
}

// cdfPoints samples the empirical CDF of sorted at at most 400 quantiles,
// cut at xmax, to keep the SVG small.
func cdfPoints(sorted []float64, xmax float64) plotter.XYs {
	const n = 400
	var xys plotter.XYs
	for k := 0; k <= n; k++ {
		q := float64(k) / n
		x := quantileSorted(sorted, q)
		if x > xmax {
			break
		}
		xys = append(xys, plotter.XY{X: x, Y: q})
	}
	return xys
}

type series struct {
	label   string
	color   color.Color
	samples []float64 // sorted
}

// connectSeries is the tcp-connect service samples of every contender at
// a size, and the direct contender's pod-IP samples.
func latencySeries(ix *index, size int, workload string) []series {
	var out []series
	for _, ct := range ix.contenders {
		c, _ := ix.cell(ct, size)
		if c == nil {
			continue
		}
		l, ok := ix.latency(c, workload)
		if !ok {
			continue
		}
		s, label := l.service, ct
		if ct == results.Direct {
			s, label = l.direct, labelOf(ct)
		}
		if len(s) == 0 {
			continue
		}
		s = append([]float64(nil), s...)
		sort.Float64s(s)
		out = append(out, series{label, colorOf(ct), s})
	}
	return out
}

func cdfPlot(path string, ix *index, size int) (bool, error) {
	ss := latencySeries(ix, size, results.TCPConnect)
	if len(ss) == 0 {
		return false, nil
	}
	// The tail past p99.9 would squash the body of every curve into the
	// left edge: cut the X axis at the largest p99.9.
	var xmax float64
	for _, s := range ss {
		xmax = math.Max(xmax, quantileSorted(s.samples, 0.999))
	}
	p := newPlot(fmt.Sprintf("tcp-connect latency CDF, service path, %s Services (cut at the largest p99.9)", sizeLabel(size)),
		"connect latency (µs, log scale)", "fraction of samples ≤ x")
	// Log X: the bodies of the curves, where the contenders differ by
	// microseconds, and their tails, milliseconds out, both stay readable.
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	var ks keys
	for _, s := range ss {
		l, err := plotter.NewLine(cdfPoints(s.samples, xmax))
		if err != nil {
			return false, fmt.Errorf("plotting the CDF of %s: %w", s.label, err)
		}
		l.Color = s.color
		l.Width = vg.Points(1.5)
		p.Add(l)
		ks.add(s.label, s.color)
	}
	p.Y.Min, p.Y.Max = 0, 1
	return true, savePlots(path, plotW, ks, p)
}

// sizeAxis sets a log X axis over the run's sizes. 0 Services cannot sit
// on a log axis: it is drawn one decade left of the smallest non-zero size
// and labelled "0".
func sizeAxis(p *plot.Plot, sizes []int) func(int) float64 {
	zero := 1.0
	for _, s := range sizes {
		if s > 0 {
			zero = float64(s) / 10
			break
		}
	}
	x := func(s int) float64 {
		if s <= 0 {
			return zero
		}
		return float64(s)
	}
	var ticks plot.ConstantTicks
	for _, s := range sizes {
		ticks = append(ticks, plot.Tick{Value: x(s), Label: sizeLabel(s)})
	}
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = ticks
	if len(sizes) > 0 {
		p.X.Min = x(sizes[0]) / 1.5
		p.X.Max = x(sizes[len(sizes)-1]) * 1.5
	}
	p.X.Label.Text = "background Services (log scale)"
	return x
}

// addSizeLines adds one line with points per contender; value returns
// false where the contender has no figure at that size.
func addSizeLines(p *plot.Plot, ix *index, ks *keys, contenders []string, value func(ct string, size int) (float64, bool)) (bool, error) {
	x := sizeAxis(p, ix.sizes)
	have := false
	for _, ct := range contenders {
		var xys plotter.XYs
		for _, size := range ix.sizes {
			if v, ok := value(ct, size); ok && finite(v) {
				xys = append(xys, plotter.XY{X: x(size), Y: v})
			}
		}
		if len(xys) == 0 {
			continue
		}
		have = true
		l, pts, err := plotter.NewLinePoints(xys)
		if err != nil {
			return false, fmt.Errorf("plotting %s: %w", ct, err)
		}
		l.Color, pts.Color = colorOf(ct), colorOf(ct)
		l.Width = vg.Points(1.5)
		p.Add(l, pts)
		ks.add(labelOf(ct), colorOf(ct))
	}
	p.Y.Min = 0
	return have, nil
}

func connectVsServicesPlot(path string, ix *index) (bool, error) {
	var ps []*plot.Plot
	var ks keys
	have := false
	for _, q := range []struct {
		name string
		get  func(Summary) float64
	}{{"p50", func(s Summary) float64 { return s.P50 }}, {"p99", func(s Summary) float64 { return s.P99 }}} {
		p := newPlot("tcp-connect "+q.name+", service path", "", "connect latency (µs)")
		ok, err := addSizeLines(p, ix, &ks, ix.contenders, func(ct string, size int) (float64, bool) {
			c, _ := ix.cell(ct, size)
			if c == nil {
				return 0, false
			}
			l, ok := ix.latency(c, results.TCPConnect)
			if !ok {
				return 0, false
			}
			s := l.Service
			if ct == results.Direct {
				s = l.Direct
			}
			return q.get(s), s.N > 0
		})
		if err != nil {
			return false, err
		}
		have = have || ok
		ps = append(ps, p)
	}
	if !have {
		return false, nil
	}
	return true, savePlots(path, 2*plotW*4/5, ks, ps...)
}

// histogramSize is the largest size at which most (at least half) of the
// contenders have tcp-crr samples; failing that, the size with the most.
func histogramSize(ix *index) (int, []series) {
	bestN, bestSize := 0, -1
	var best []series
	for i := len(ix.sizes) - 1; i >= 0; i-- {
		ss := latencySeries(ix, ix.sizes[i], results.TCPCRR)
		if 2*len(ss) >= len(ix.contenders) && len(ss) > 0 {
			return ix.sizes[i], ss
		}
		if len(ss) > bestN {
			bestN, bestSize, best = len(ss), ix.sizes[i], ss
		}
	}
	return bestSize, best
}

func histogramPlot(path string, ix *index) (bool, error) {
	size, ss := histogramSize(ix)
	if len(ss) == 0 {
		return false, nil
	}
	// Shared bins from the smallest sample to the largest p99 (the tail
	// beyond would leave the body in a few bins), each contender's counts
	// as a fraction of its samples so different N compare.
	lo, hi := math.Inf(1), 0.0
	for _, s := range ss {
		lo = math.Min(lo, s.samples[0])
		hi = math.Max(hi, quantileSorted(s.samples, 0.99))
	}
	if !(hi > lo) {
		hi = lo + 1
	}
	const bins = 60
	width := (hi - lo) / bins
	p := newPlot(fmt.Sprintf("tcp-crr round trip, service path, %s Services (cut at the largest p99)", sizeLabel(size)),
		"connect + request + response + close (µs)", "fraction of samples per bin")
	var ks keys
	for _, s := range ss {
		counts := make([]float64, bins)
		for _, v := range s.samples {
			b := int((v - lo) / width)
			if b >= bins || b < 0 {
				continue
			}
			counts[b]++
		}
		xys := make(plotter.XYs, 0, bins+1)
		for b, n := range counts {
			xys = append(xys, plotter.XY{X: lo + float64(b)*width, Y: n / float64(len(s.samples))})
		}
		xys = append(xys, plotter.XY{X: hi, Y: xys[len(xys)-1].Y})
		l, err := plotter.NewLine(xys)
		if err != nil {
			return false, fmt.Errorf("plotting the histogram of %s: %w", s.label, err)
		}
		l.StepStyle = plotter.PostStep
		l.Color = s.color
		l.Width = vg.Points(1.5)
		p.Add(l)
		ks.add(s.label, s.color)
	}
	p.Y.Min = 0
	return true, savePlots(path, plotW, ks, p)
}

func connectRateValue(ix *index, ct string, size int) (float64, bool) {
	side, ok := connectRateShown(ix, ct, size)
	return side.rate(), ok && side.Seconds > 0
}

// ratePlot draws grouped bars: one group per size, one bar per contender
// (a missing bar is a contender without data at that size; the report's
// tables say why).
func ratePlot(path string, ix *index, title, ylabel string, value func(*index, string, int) (float64, bool)) (bool, error) {
	p := newPlot(title, "background Services", ylabel)
	var ks keys
	n := len(ix.contenders)
	barW := vg.Length(math.Min(12, 120/float64(n*len(ix.sizes)+1))) * vg.Millimeter / 2
	have := false
	for i, ct := range ix.contenders {
		vs := make(plotter.Values, len(ix.sizes))
		has := false
		for j, size := range ix.sizes {
			if v, ok := value(ix, ct, size); ok && finite(v) {
				vs[j], has = v, true
			}
		}
		if !has {
			continue
		}
		have = true
		b, err := plotter.NewBarChart(vs, barW)
		if err != nil {
			return false, fmt.Errorf("plotting %s: %w", ct, err)
		}
		b.Color = colorOf(ct)
		b.LineStyle.Width = 0
		b.Offset = vg.Length(float64(i)-float64(n-1)/2) * barW
		p.Add(b)
		ks.add(labelOf(ct), colorOf(ct))
	}
	if !have {
		return false, nil
	}
	labels := make([]string, len(ix.sizes))
	for i, s := range ix.sizes {
		labels[i] = sizeLabel(s)
	}
	p.NominalX(labels...)
	p.Y.Min = 0
	return true, savePlots(path, plotW, ks, p)
}

func controlPlanePlot(path string, ix *index) (bool, error) {
	// Direct has no proxy: nothing to program.
	var cts []string
	for _, ct := range ix.contenders {
		if ct != results.Direct {
			cts = append(cts, ct)
		}
	}
	measured := func(ct string, size int) *results.Cell {
		c, _ := ix.cell(ct, size)
		return c
	}
	panels := []struct {
		title, y string
		get      func(ct string, size int) (float64, bool)
	}{
		{"cold start until the last Service is served", "seconds", func(ct string, size int) (float64, bool) {
			c, ok := ix.cells[cellKey{ct, size}]
			if !ok || c.ControlPlane.ColdStartTimedOut || c.ControlPlane.ColdStart <= 0 {
				return 0, false
			}
			return c.ControlPlane.ColdStart.Seconds(), true
		}},
		{"batch created until served", "seconds", func(ct string, size int) (float64, bool) {
			c := measured(ct, size)
			if c == nil || c.ControlPlane.BatchServices == 0 {
				return 0, false
			}
			return c.ControlPlane.BatchServed.Seconds(), true
		}},
		{"endpoint change observed, p99", "milliseconds", func(ct string, size int) (float64, bool) {
			c := measured(ct, size)
			if c == nil {
				return 0, false
			}
			s := Summarize(seconds(c.ControlPlane.EndpointChange))
			return s.P99 * 1e3, s.N > 0
		}},
	}
	var ps []*plot.Plot
	var ks keys
	have := false
	for _, pn := range panels {
		p := newPlot(pn.title, "", pn.y)
		ok, err := addSizeLines(p, ix, &ks, cts, pn.get)
		if err != nil {
			return false, err
		}
		have = have || ok
		ps = append(ps, p)
	}
	if !have {
		return false, nil
	}
	return true, savePlots(path, 2*plotW, ks, ps...)
}
