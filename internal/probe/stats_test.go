package probe

import (
	"bytes"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// fakeClient is a client's metrics fed with chosen round trips.
type fakeClient struct {
	reg *prometheus.Registry
	m   *clientMetrics
}

func newFakeClient() *fakeClient {
	reg := prometheus.NewRegistry()
	return &fakeClient{reg: reg, m: newClientMetrics(reg)}
}

func (f *fakeClient) observe(node, serverNode, mode, protocol string, rtt time.Duration, n int) {
	f.observeFamily(node, serverNode, mode, protocol, "IPv4", rtt, n)
}

func (f *fakeClient) observeFamily(node, serverNode, mode, protocol, family string, rtt time.Duration, n int) {
	c := &client{id: identity{node: node}, m: f.m}
	for range n {
		c.observe(serverNode, mode, protocol, family, rtt)
	}
}

// scrape renders the registry as /metrics does and parses it back.
func (f *fakeClient) scrape(t *testing.T) Scrape {
	t.Helper()
	fams, err := f.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range fams {
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
	}
	s, err := ParseScrape(&b)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func near(got, want time.Duration) bool { return math.Abs(float64(got-want)) <= 2 }

func TestSummarize(t *testing.T) {
	a, b := newFakeClient(), newFakeClient()
	// Before: samples that must not count.
	a.observe("node1", "node1", "ebpf", "tcp", 10*time.Millisecond, 10)
	b.observe("node2", "node1", "iptables", "tcp", 5*time.Millisecond, 3)
	before := []Scrape{a.scrape(t), b.scrape(t)}

	// ebpf/tcp, over two server nodes of client a: 50 at 30 µs (bucket
	// 25-50 µs) and 50 at 80 µs (bucket 75-100 µs). Mean 55 µs; each
	// sample 25 µs from it, so the sample variance is 625 µs² · 100/99.
	a.observe("node1", "node1", "ebpf", "tcp", 30*time.Microsecond, 30)
	a.observe("node1", "node2", "ebpf", "tcp", 30*time.Microsecond, 20)
	a.observe("node1", "node2", "ebpf", "tcp", 80*time.Microsecond, 50)
	// ebpf/udp: one sample, no spread to compute.
	a.observe("node1", "node2", "ebpf", "udp", time.Millisecond, 1)
	// iptables/tcp, from client b: 4 samples of 1, 2, 3, 4 ms; the
	// series is new in "after" for 1-2 ms... all in one series here.
	for _, ms := range []int{1, 2, 3, 4} {
		b.observe("node2", "node1", "iptables", "tcp", time.Duration(ms)*time.Millisecond, 1)
	}
	a.m.errors.WithLabelValues("node1", "ebpf", "tcp", KindRefused, "IPv4").Add(3)
	// Zeroed series of a mode no probe ran in: no row.
	(&client{id: identity{node: "node1"}, m: a.m}).zeroErrors(NoMode, model.IPv4)
	// The same client over the IPv6 ClusterIP of a dual-stack Service: a
	// row of its own, with its own error.
	a.observeFamily("node1", "node2", "ebpf", "tcp", "IPv6", 200*time.Microsecond, 2)
	a.m.errors.WithLabelValues("node1", "ebpf", "tcp", KindTimeout, "IPv6").Add(1)
	after := []Scrape{b.scrape(t), a.scrape(t)} // order does not matter

	got, err := Summarize(before, after)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 {
		t.Fatalf("got %d summaries, want 4: %+v", len(got), got)
	}
	sd := time.Duration(25e3 * math.Sqrt(100.0/99.0))
	want := []Summary{
		{Mode: "ebpf", Family: "IPv4", Protocol: "tcp", Requests: 100, Errors: 3, Mean: 55 * time.Microsecond,
			StdDev: sd, CI99: time.Duration(z99 * float64(sd) / 10),
			// Rank 50 is the top of the 25-50 µs bucket; rank 99 is 49/50
			// of the way through the 75-100 µs one.
			P50: 50 * time.Microsecond, P99: 99500 * time.Nanosecond},
		{Mode: "ebpf", Family: "IPv4", Protocol: "udp", Requests: 1, Mean: time.Millisecond,
			// 1 ms lies in the bucket ending at the first bound ≥ 1 ms.
			P50: bucketAt(time.Millisecond, 0.5), P99: bucketAt(time.Millisecond, 0.99)},
		// Mean 2.5 ms; sample variance (2.25+0.25+0.25+2.25)/3 ms².
		{Mode: "ebpf", Family: "IPv6", Protocol: "tcp", Requests: 2, Errors: 1, Mean: 200 * time.Microsecond},
		{Mode: "iptables", Family: "IPv4", Protocol: "tcp", Requests: 4, Mean: 2500 * time.Microsecond,
			StdDev: time.Duration(math.Sqrt(5.0/3.0) * 1e6), CI99: time.Duration(z99 * math.Sqrt(5.0/3.0) * 1e6 / 2)},
	}
	for i, w := range want {
		g := got[i]
		if g.Mode != w.Mode || g.Family != w.Family || g.Protocol != w.Protocol || g.Requests != w.Requests || g.Errors != w.Errors ||
			!near(g.Mean, w.Mean) || !near(g.StdDev, w.StdDev) || !near(g.CI99, w.CI99) {
			t.Errorf("summary %d = %+v\nwant %+v", i, g, w)
		}
		if w.P50 != 0 && (!near(g.P50, w.P50) || !near(g.P99, w.P99)) {
			t.Errorf("summary %d: p50 %s p99 %s, want %s and %s", i, g.P50, g.P99, w.P50, w.P99)
		}
	}
	// iptables: ranks 2 and 3.96 of 4 within the buckets holding 2 and
	// 4 ms: within their bucket bounds.
	ipt := got[3]
	if ipt.P50 <= 1500*time.Microsecond || ipt.P50 > 2*time.Millisecond*125/100 || ipt.P99 < 3*time.Millisecond || ipt.P99 > 5*time.Millisecond {
		t.Errorf("iptables p50 %s p99 %s: outside the buckets of 2 ms and 4 ms", ipt.P50, ipt.P99)
	}

	var table strings.Builder
	if err := WriteTable(&table, got); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"mode", "family", "IPv6", "ebpf", "iptables", "0.055 ms", "± 0.006 ms", "0.050 ms", "0.100 ms"} {
		if !strings.Contains(table.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, table.String())
		}
	}
}

// bucketAt interpolates quantile q of samples all equal to v, as the
// histogram sees them: spread evenly over v's bucket.
func bucketAt(v time.Duration, q float64) time.Duration {
	b := Buckets()
	lower := 0.0
	for _, upper := range b {
		if v.Seconds() <= upper {
			return seconds(lower + (upper-lower)*q)
		}
		lower = upper
	}
	return 0
}

func TestSummarizeClientRestart(t *testing.T) {
	a := newFakeClient()
	a.observe("node1", "node1", "ebpf", "tcp", time.Millisecond, 5)
	before := []Scrape{a.scrape(t)}
	after := []Scrape{newFakeClient().scrape(t)}
	newer := newFakeClient()
	newer.observe("node1", "node1", "ebpf", "tcp", time.Millisecond, 2)
	after = append(after, newer.scrape(t))
	if _, err := Summarize(before, after); err == nil || !strings.Contains(err.Error(), "restarted") {
		t.Errorf("Summarize over a restarted client: err %v, want one saying it restarted", err)
	}
}

func TestBuckets(t *testing.T) {
	b := Buckets()
	// 50 µs and 100 µs in different buckets, and adjacent bounds at most
	// 25 µs apart up to 200 µs.
	idx := func(v float64) int {
		for i, ub := range b {
			if v <= ub {
				return i
			}
		}
		return len(b)
	}
	if idx(50e-6) == idx(100e-6) || idx(50e-6) == idx(75e-6) {
		t.Errorf("50, 75 and 100 µs share buckets: %v", b[:10])
	}
	for i := 1; i < len(b); i++ {
		if b[i] <= b[i-1] {
			t.Fatalf("buckets not increasing at %d: %v", i, b)
		}
		if b[i] <= 200e-6 && b[i]-b[i-1] > 25e-6+1e-12 {
			t.Errorf("step %g to %g wider than 25 µs", b[i-1], b[i])
		}
	}
	if b[len(b)-1] != 10 {
		t.Errorf("last bucket %g, want 10 s", b[len(b)-1])
	}
}

func TestParseScrapeRejectsGarbage(t *testing.T) {
	if _, err := ParseScrape(strings.NewReader("not { metrics\n")); err == nil {
		t.Error("ParseScrape accepted garbage")
	}
}

// SummarizeByNode keeps each client node and mode apart (a crossover's
// cells), adds up the server nodes and the IP families, and reads the
// connect histogram too.
func TestSummarizeByNode(t *testing.T) {
	a, b := newFakeClient(), newFakeClient()
	a.observe("node1", "node1", "ebpf", "tcp", 10*time.Millisecond, 10)
	before := []Scrape{a.scrape(t), b.scrape(t)}
	// node1 (ebpf): tcp 40 µs x 3 to node1 and 40 µs x 1 to node2, udp 1 ms.
	a.observe("node1", "node1", "ebpf", "tcp", 40*time.Microsecond, 3)
	// A dual-stack Service's IPv6 ClusterIP: added up with the IPv4 one.
	a.observeFamily("node1", "node2", "ebpf", "tcp", "IPv6", 40*time.Microsecond, 1)
	a.observe("node1", "node2", "ebpf", "udp", time.Millisecond, 2)
	a.m.connect.WithLabelValues("node1", "node2", "ebpf", "IPv4").Observe(20e-6)
	a.m.connect.WithLabelValues("node1", "node1", "ebpf", "IPv6").Observe(30e-6)
	// node2 measured in two modes in the window (its proxy was swapped):
	// one row per mode.
	b.observe("node2", "node1", "iptables", "tcp", 2*time.Millisecond, 2)
	b.observe("node2", "node1", "ebpf", "tcp", 4*time.Millisecond, 1)
	after := []Scrape{b.scrape(t), a.scrape(t)}

	got, err := SummarizeByNode(before, after)
	if err != nil {
		t.Fatal(err)
	}
	want := []NodeSummary{
		{Node: "node1", Mode: "ebpf", Measure: MeasureTCPConnect, Requests: 2, Mean: 25 * time.Microsecond},
		{Node: "node1", Mode: "ebpf", Measure: MeasureTCPRoundTrip, Requests: 4, Mean: 40 * time.Microsecond},
		{Node: "node2", Mode: "ebpf", Measure: MeasureTCPRoundTrip, Requests: 1, Mean: 4 * time.Millisecond},
		{Node: "node2", Mode: "iptables", Measure: MeasureTCPRoundTrip, Requests: 2, Mean: 2 * time.Millisecond},
		{Node: "node1", Mode: "ebpf", Measure: MeasureUDPRoundTrip, Requests: 2, Mean: time.Millisecond},
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	for i, w := range want {
		g := got[i]
		if g.Node != w.Node || g.Mode != w.Mode || g.Measure != w.Measure || g.Requests != w.Requests || !near(g.Mean, w.Mean) {
			t.Errorf("row %d: %+v, want %+v", i, g, w)
		}
	}
	// 4 samples at 40 µs, in bucket 25-50 µs: the median interpolated at
	// rank 2 of 4 is 37.5 µs.
	if p50 := got[1].P50; !near(p50, 37500*time.Nanosecond) {
		t.Errorf("tcp p50 of node1 %v, want 37.5µs", p50)
	}
	if _, err := SummarizeByNode(after, before); err == nil || !strings.Contains(err.Error(), "restarted") {
		t.Errorf("counts going down: err %v, want one saying a client restarted", err)
	}
}
