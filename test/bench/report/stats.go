package report

import (
	"math"
	"sort"
)

// z99 is the two-sided 99% quantile of the standard normal distribution.
// The confidence interval of the mean uses the normal approximation, which
// is sound for the thousands of samples a cell takes (a t quantile would
// differ in the third digit only below ~100 samples).
const z99 = 2.576

// Summary is the statistics of one sample.
//
// Stddev is the sample standard deviation (n-1 in the denominator). CI99 is
// the half-width of the 99% confidence interval of the mean, by the normal
// approximation: z=2.576 times Stddev/sqrt(N). The percentiles interpolate
// linearly between the two nearest order statistics (R's and numpy's
// default, "type 7": the p-quantile of sorted x[0..N-1] is at position
// p*(N-1)). An empty sample gives a zero Summary (N=0); callers check N.
type Summary struct {
	N                             int
	Mean, CI99, Stddev            float64
	Min, P50, P90, P99, P999, Max float64
}

// Summarize computes the Summary of samples; it does not modify them.
func Summarize(samples []float64) Summary {
	n := len(samples)
	if n == 0 {
		return Summary{}
	}
	s := append([]float64(nil), samples...)
	sort.Float64s(s)
	var sum float64
	for _, v := range s {
		sum += v
	}
	mean := sum / float64(n)
	var sd float64
	if n > 1 {
		// Two passes (sum of squared deviations from the mean) rather than
		// sum of squares minus square of sums: no cancellation for
		// latencies that are large compared with their spread.
		var ss float64
		for _, v := range s {
			d := v - mean
			ss += d * d
		}
		sd = math.Sqrt(ss / float64(n-1))
	}
	return Summary{
		N:      n,
		Mean:   mean,
		CI99:   z99 * sd / math.Sqrt(float64(n)),
		Stddev: sd,
		Min:    s[0],
		P50:    quantileSorted(s, 0.50),
		P90:    quantileSorted(s, 0.90),
		P99:    quantileSorted(s, 0.99),
		P999:   quantileSorted(s, 0.999),
		Max:    s[n-1],
	}
}

// quantileSorted is the linearly interpolated (type 7) q-quantile of an
// ascending, non-empty sample.
func quantileSorted(s []float64, q float64) float64 {
	if len(s) == 1 {
		return s[0]
	}
	h := q * float64(len(s)-1)
	lo := int(math.Floor(h))
	if lo >= len(s)-1 {
		return s[len(s)-1]
	}
	return s[lo] + (h-float64(lo))*(s[lo+1]-s[lo])
}

// histogramQuantile estimates the q-quantile of a Prometheus histogram the
// way PromQL's histogram_quantile does: find the bucket holding rank q*count
// and interpolate linearly between its lower and upper bound (the first
// bucket's lower bound is 0; a rank in the +Inf bucket answers the largest
// finite bound). ok is false for an empty or malformed histogram.
func histogramQuantile(q float64, bounds []float64, buckets []uint64) (v float64, ok bool) {
	if len(bounds) == 0 || len(bounds) != len(buckets) || q < 0 || q > 1 {
		return 0, false
	}
	total := buckets[len(buckets)-1]
	if total == 0 {
		return 0, false
	}
	rank := q * float64(total)
	i := sort.Search(len(buckets), func(i int) bool { return float64(buckets[i]) >= rank })
	if i >= len(buckets) {
		i = len(buckets) - 1
	}
	if math.IsInf(bounds[i], +1) {
		if i == 0 {
			return 0, false
		}
		return bounds[i-1], true
	}
	var lower float64
	var below uint64
	if i > 0 {
		lower, below = bounds[i-1], buckets[i-1]
	} else if bounds[0] <= 0 {
		return bounds[0], true
	}
	inBucket := float64(buckets[i] - below)
	if inBucket == 0 {
		return bounds[i], true
	}
	return lower + (bounds[i]-lower)*(rank-float64(below))/inBucket, true
}

// spread is the range of a set of ratios (one per repetition).
type spread struct {
	Min, Max float64
	N        int
}

// ratioSpread returns the min and max of num[i]/den[i] over the pairs where
// both are positive and finite.
func ratioSpread(num, den []float64) spread {
	sp := spread{Min: math.Inf(1), Max: math.Inf(-1)}
	for i := range num {
		if i >= len(den) {
			break
		}
		r, ok := ratio(num[i], den[i])
		if !ok {
			continue
		}
		sp.N++
		sp.Min = math.Min(sp.Min, r)
		sp.Max = math.Max(sp.Max, r)
	}
	if sp.N == 0 {
		return spread{}
	}
	return sp
}

// ratio is a/b when both are positive and finite.
func ratio(a, b float64) (float64, bool) {
	if !(a > 0) || !(b > 0) || math.IsInf(a, 0) || math.IsInf(b, 0) {
		return 0, false
	}
	return a / b, true
}
