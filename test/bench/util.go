package bench

import (
	"context"
	"fmt"
	"io"
	"math"
	"os/exec"
	"sort"
	"strings"

	dto "github.com/prometheus/client_model/go"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/probe"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// flushConntrack empties each node's connection tracking table, so that
// one cell's entries (TIME_WAIT ones live two minutes) do not fill or
// slow the next one's.
func (r *runner) flushConntrack(ctx context.Context) error {
	for _, n := range r.c.Nodes {
		out, err := exec.CommandContext(ctx, "ip", "netns", "exec", n.NetNS, "conntrack", "-F").CombinedOutput()
		// conntrack -F exits 1 with nothing to flush on some versions.
		if err != nil && len(out) > 0 && !isEmptyFlush(string(out)) {
			return fmt.Errorf("flushing %s's conntrack table: %w: %s", n.Name, err, out)
		}
	}
	return nil
}

func isEmptyFlush(out string) bool {
	return len(out) < 200 && strings.Contains(out, "flow entries have been deleted")
}

// parseHistogram reads one histogram from a /metrics body, its series
// summed over labels; an absent histogram is nil without error (a proxy
// that has not observed any yet may not export it).
func parseHistogram(r io.Reader, name string) (*results.Histogram, error) {
	fams, err := probe.ParseScrape(r)
	if err != nil {
		return nil, err
	}
	f, ok := fams[name]
	if !ok {
		return nil, nil
	}
	if f.GetType() != dto.MetricType_HISTOGRAM {
		return nil, fmt.Errorf("%s is a %s, not a histogram", name, f.GetType())
	}
	var h *results.Histogram
	for _, m := range f.GetMetric() {
		hm := m.GetHistogram()
		one := &results.Histogram{Count: hm.GetSampleCount(), Sum: hm.GetSampleSum()}
		for _, b := range hm.GetBucket() {
			one.Bounds = append(one.Bounds, b.GetUpperBound())
			one.Buckets = append(one.Buckets, b.GetCumulativeCount())
		}
		if len(one.Bounds) == 0 || !math.IsInf(one.Bounds[len(one.Bounds)-1], 1) {
			one.Bounds = append(one.Bounds, math.Inf(1))
			one.Buckets = append(one.Buckets, one.Count)
		}
		h = mergeHistograms(h, one)
	}
	return h, nil
}

// mergeHistograms adds b to a (either may be nil). Bounds present in one
// only are kept, with the other's cumulative count at the next lower bound
// it has, which is exact for cumulative buckets.
func mergeHistograms(a, b *results.Histogram) *results.Histogram {
	if a == nil {
		return b
	}
	if b == nil {
		return a
	}
	bounds := map[float64]bool{}
	for _, x := range a.Bounds {
		bounds[x] = true
	}
	for _, x := range b.Bounds {
		bounds[x] = true
	}
	out := &results.Histogram{Count: a.Count + b.Count, Sum: a.Sum + b.Sum}
	for x := range bounds {
		out.Bounds = append(out.Bounds, x)
	}
	sort.Float64s(out.Bounds)
	for _, x := range out.Bounds {
		out.Buckets = append(out.Buckets, cumulativeAt(a, x)+cumulativeAt(b, x))
	}
	return out
}

func cumulativeAt(h *results.Histogram, bound float64) uint64 {
	var c uint64
	for i, x := range h.Bounds {
		if x > bound {
			break
		}
		c = h.Buckets[i]
	}
	return c
}
