package probe

import (
	"fmt"
	"io"
	"math"
	"sort"
	"text/tabwriter"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Scrape is one client's /metrics, parsed.
type Scrape map[string]*dto.MetricFamily

// ParseScrape parses a /metrics body in the Prometheus text format.
func ParseScrape(r io.Reader) (Scrape, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parsing the probe's metrics: %w", err)
	}
	return Scrape(fams), nil
}

// Summary is what the probe measured between two scrapes for one mode, IP
// family and protocol, over every client and server node.
type Summary struct {
	Mode string
	// Family is the ip_family label: the family of the ClusterIP probed
	// ("IPv4", "IPv6"; "" for a client older than the label).
	Family   string
	Protocol string
	// Requests is the number of round trips measured.
	Requests uint64
	// Errors is the number of failed requests.
	Errors uint64
	// Mean is the mean round trip; CI99 the half-width of its 99 %
	// confidence interval (normal approximation, fine for the thousands of
	// samples a run takes).
	Mean, CI99 time.Duration
	// StdDev is the sample standard deviation, exact from the sum of
	// squares.
	StdDev time.Duration
	// P50 and P99 are interpolated in the histogram's buckets, as
	// PromQL's histogram_quantile does.
	P50, P99 time.Duration
}

// z99 is the standard normal quantile for a two-sided 99 % interval.
const z99 = 2.5758293035489004

// accumulator sums the round-trip series of one mode, family and protocol.
type accumulator struct {
	count, errors uint64
	sum, squares  float64
	// buckets: upper bound -> cumulative count.
	buckets map[float64]uint64
}

type summaryKey struct{ mode, family, protocol string }

func keyOf(m *dto.Metric) summaryKey {
	return summaryKey{label(m, "mode"), label(m, "ip_family"), label(m, "protocol")}
}

// Summarize computes, per mode, IP family and protocol, what the clients measured
// between the scrapes before and after (one of each per client, in any
// order: series are matched by their labels, and those of all clients and
// node pairs are added up). A series missing from before counts from zero;
// one whose count went down (a client restarted) is an error.
func Summarize(before, after []Scrape) ([]Summary, error) {
	acc := map[summaryKey]*accumulator{}
	get := func(k summaryKey) *accumulator {
		if acc[k] == nil {
			acc[k] = &accumulator{buckets: map[float64]uint64{}}
		}
		return acc[k]
	}
	old := byLabels(before, metricRoundTrip, metricSquared, metricErrors)
	for _, s := range after {
		if f := s[metricRoundTrip]; f != nil {
			for _, m := range f.GetMetric() {
				h := m.GetHistogram()
				var prev *dto.Histogram
				if o := old[metricRoundTrip+labelKey(m)]; o != nil {
					prev = o.GetHistogram()
				}
				if err := get(keyOf(m)).addDelta(prev, h); err != nil {
					return nil, fmt.Errorf("round trip of %s: %w", labelKey(m), err)
				}
			}
		}
		if f := s[metricSquared]; f != nil {
			for _, m := range f.GetMetric() {
				v := m.GetCounter().GetValue()
				if o := old[metricSquared+labelKey(m)]; o != nil {
					v -= o.GetCounter().GetValue()
				}
				get(keyOf(m)).squares += v
			}
		}
		if f := s[metricErrors]; f != nil {
			for _, m := range f.GetMetric() {
				v := m.GetCounter().GetValue()
				if o := old[metricErrors+labelKey(m)]; o != nil {
					v -= o.GetCounter().GetValue()
				}
				get(keyOf(m)).errors += uint64(math.Round(v))
			}
		}
	}
	out := make([]Summary, 0, len(acc))
	for k, a := range acc {
		if a.count == 0 && a.errors == 0 {
			continue // series at zero only: a mode no probe ran in
		}
		out = append(out, a.summary(k))
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Mode != out[j].Mode {
			return out[i].Mode < out[j].Mode
		}
		if out[i].Family != out[j].Family {
			return out[i].Family < out[j].Family
		}
		return out[i].Protocol < out[j].Protocol
	})
	return out, nil
}

func (a *accumulator) summary(k summaryKey) Summary {
	s := Summary{Mode: k.mode, Family: k.family, Protocol: k.protocol, Requests: a.count, Errors: a.errors}
	if a.count == 0 {
		return s
	}
	n := float64(a.count)
	mean := a.sum / n
	s.Mean = seconds(mean)
	if a.count > 1 {
		// Sample variance from the sums: (Σx² - n·mean²)/(n-1). Rounding
		// can make it slightly negative when every sample is equal.
		variance := math.Max(0, (a.squares-n*mean*mean)/(n-1))
		sd := math.Sqrt(variance)
		s.StdDev = seconds(sd)
		s.CI99 = seconds(z99 * sd / math.Sqrt(n))
	}
	s.P50 = seconds(a.quantile(0.5))
	s.P99 = seconds(a.quantile(0.99))
	return s
}

// quantile interpolates linearly inside the bucket holding rank q·count,
// from the bucket's lower bound (0 for the first), as histogram_quantile
// does; a rank in the +Inf bucket answers the highest finite bound.
func (a *accumulator) quantile(q float64) float64 {
	bounds := make([]float64, 0, len(a.buckets))
	for b := range a.buckets {
		bounds = append(bounds, b)
	}
	sort.Float64s(bounds)
	rank := q * float64(a.count)
	lower, below := 0.0, uint64(0)
	for _, upper := range bounds {
		cum := a.buckets[upper]
		if float64(cum) >= rank {
			if math.IsInf(upper, 1) {
				return lower
			}
			inBucket := float64(cum - below)
			if inBucket == 0 {
				return upper
			}
			return lower + (upper-lower)*(rank-float64(below))/inBucket
		}
		lower, below = upper, cum
	}
	// The text format always carries +Inf; without it, the top bound.
	return lower
}

func seconds(s float64) time.Duration { return time.Duration(math.Round(s * float64(time.Second))) }

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// byLabels indexes the series of the named families in scrapes by name and
// labels (labelKey), to match each series of a later scrape with its own.
func byLabels(scrapes []Scrape, names ...string) map[string]*dto.Metric {
	out := map[string]*dto.Metric{}
	for _, s := range scrapes {
		for _, name := range names {
			for _, m := range s[name].GetMetric() {
				out[name+labelKey(m)] = m
			}
		}
	}
	return out
}

// labelKey identifies a series within its family.
func labelKey(m *dto.Metric) string {
	pairs := make([]string, 0, len(m.GetLabel()))
	for _, l := range m.GetLabel() {
		pairs = append(pairs, l.GetName()+"="+l.GetValue())
	}
	sort.Strings(pairs)
	return fmt.Sprint(pairs)
}

// WriteTable prints summaries as the demo's table.
func WriteTable(w io.Writer, summaries []Summary) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tfamily\tprotocol\trequests\terrors\tmean\t99% CI\tstd dev\tp50\tp99\t")
	ms := func(d time.Duration) string { return fmt.Sprintf("%.3f ms", float64(d)/float64(time.Millisecond)) }
	for _, s := range summaries {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t± %s\t%s\t%s\t%s\t\n", s.Mode, s.Family, s.Protocol, s.Requests, s.Errors,
			ms(s.Mean), ms(s.CI99), ms(s.StdDev), ms(s.P50), ms(s.P99))
	}
	return tw.Flush()
}

// Measures of NodeSummary.
const (
	MeasureTCPConnect   = "tcp connect"
	MeasureTCPRoundTrip = "tcp round trip"
	MeasureUDPRoundTrip = "udp round trip"
)

// NodeSummary is what the client on one node measured between two scrapes
// in one mode: a crossover A/B's value for one node and window.
type NodeSummary struct {
	Node, Mode string
	// Measure is MeasureTCPConnect (the connect histogram), or
	// MeasureTCPRoundTrip or MeasureUDPRoundTrip (the round trip's).
	Measure  string
	Requests uint64
	// Mean is exact (the histogram's sum over its count); P50 is
	// interpolated in the buckets, as in Summary.
	Mean, P50 time.Duration
}

type nodeKey struct{ node, mode, measure string }

// SummarizeByNode computes, per client node, mode and measure, what the
// clients measured between the scrapes before and after (matched by their
// labels, as in Summarize; every server node and both IP families of a
// dual-stack Service added up: each node probes both in either mode, so
// the crossover's comparison holds). Series at zero are left out.
func SummarizeByNode(before, after []Scrape) ([]NodeSummary, error) {
	acc := map[nodeKey]*accumulator{}
	old := byLabels(before, metricRoundTrip, metricConnect)
	for _, s := range after {
		for _, name := range []string{metricRoundTrip, metricConnect} {
			f := s[name]
			if f == nil {
				continue
			}
			for _, m := range f.GetMetric() {
				measure := MeasureTCPConnect
				if name == metricRoundTrip {
					measure = label(m, "protocol") + " round trip"
				}
				k := nodeKey{label(m, "client_node"), label(m, "mode"), measure}
				if acc[k] == nil {
					acc[k] = &accumulator{buckets: map[float64]uint64{}}
				}
				var prev *dto.Histogram
				if o := old[name+labelKey(m)]; o != nil {
					prev = o.GetHistogram()
				}
				if err := acc[k].addDelta(prev, m.GetHistogram()); err != nil {
					return nil, fmt.Errorf("%s of %s: %w", name, labelKey(m), err)
				}
			}
		}
	}
	var out []NodeSummary
	for k, a := range acc {
		if a.count == 0 {
			continue
		}
		out = append(out, NodeSummary{Node: k.node, Mode: k.mode, Measure: k.measure, Requests: a.count,
			Mean: seconds(a.sum / float64(a.count)), P50: seconds(a.quantile(0.5))})
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Measure != b.Measure {
			return a.Measure < b.Measure
		}
		if a.Node != b.Node {
			return a.Node < b.Node
		}
		return a.Mode < b.Mode
	})
	return out, nil
}

// addDelta adds what histogram h counted since prev (nil: since zero).
func (a *accumulator) addDelta(prev, h *dto.Histogram) error {
	if h.GetSampleCount() < prev.GetSampleCount() {
		return fmt.Errorf("count went down from %d to %d: a client restarted between the scrapes", prev.GetSampleCount(), h.GetSampleCount())
	}
	a.count += h.GetSampleCount() - prev.GetSampleCount()
	a.sum += h.GetSampleSum() - prev.GetSampleSum()
	prevBuckets := map[float64]uint64{}
	for _, b := range prev.GetBucket() {
		prevBuckets[b.GetUpperBound()] = b.GetCumulativeCount()
	}
	for _, b := range h.GetBucket() {
		a.buckets[b.GetUpperBound()] += b.GetCumulativeCount() - prevBuckets[b.GetUpperBound()]
	}
	return nil
}
