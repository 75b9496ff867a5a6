package report

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// Verdicts of a target.
const (
	metYes         = "yes"
	metNo          = "no"
	metNotMeasured = "not measured"
)

// target is one row of the targets table: the goals, judged on
// this run's data. They are goals, not assertions: the report states them.
type target struct {
	Goal, Measured, Met string
}

// Sizes the issue names its goals at.
const (
	goalSize     = 10000
	coldGoalSize = 20000
)

// judge accumulates per-size checks into one verdict: "yes" only if at
// least one check was made and all passed; "no" if any failed; "not
// measured" if none could be made.
type judge struct {
	parts        []string
	checked, bad int
}

func (j *judge) check(label string, ok bool, format string, args ...any) {
	j.checked++
	if !ok {
		j.bad++
	}
	j.parts = append(j.parts, label+": "+fmt.Sprintf(format, args...))
}

func (j *judge) missing(label, why string) {
	j.parts = append(j.parts, label+": "+why)
}

// fail records a check that could not be made where the goal demands it
// (a contender that did not reach a size it must be judged at).
func (j *judge) fail(label, why string) {
	j.checked++
	j.bad++
	j.missing(label, why)
}

// notReached records why contender has no measured cell at size: a
// failed check if it was tried there and did not get there (the goal is
// missed), "not measured" if the run has no such cell.
func (j *judge) notReached(ix *index, contender string, size int, why string) {
	if _, tried := ix.cells[cellKey{contender, size}]; tried {
		j.fail(sizeLabel(size), why)
		return
	}
	j.missing(sizeLabel(size), why)
}

func (j *judge) row(goal string) target {
	t := target{Goal: goal, Measured: strings.Join(j.parts, "; ")}
	switch {
	case j.checked == 0:
		t.Met = metNotMeasured
	case j.bad > 0:
		t.Met = metNo
	default:
		t.Met = metYes
	}
	if t.Measured == "" {
		t.Measured = "no data"
	}
	return t
}

func targets(ix *index) []target {
	var out []target
	ebpf := results.EBPF

	// ebpf connect within 1.05x of direct at every size.
	{
		var j judge
		for _, size := range ix.sizes {
			c, why := ix.cell(ebpf, size)
			if c == nil {
				j.fail(sizeLabel(size), why)
				continue
			}
			l, ok := ix.latency(c, results.TCPConnect)
			if !ok || !l.P50OK || !l.P99OK {
				j.missing(sizeLabel(size), "no tcp-connect samples")
				continue
			}
			j.check(sizeLabel(size), l.P50 <= 1.05 && l.P99 <= 1.05, "p50 %s, p99 %s", fx(l.P50), fx(l.P99))
		}
		out = append(out, j.row("ebpf tcp-connect p50 and p99 (service/direct, same cell) ≤ 1.05x at every size"))
	}

	// Flat from the smallest to the largest size.
	{
		var j judge
		if len(ix.sizes) >= 2 {
			lo, hi := ix.sizes[0], ix.largestSize()
			a, b := ebpfConnectP50(ix, lo), ebpfConnectP50(ix, hi)
			if r, ok := ratio(b, a); ok {
				j.check(sizeLabel(hi)+"/"+sizeLabel(lo), r <= 1.05, "service p50 %s / %s = %s", us(b), us(a), fx(r))
			} else {
				j.missing(sizeLabel(hi)+"/"+sizeLabel(lo), "missing data")
			}
		}
		out = append(out, j.row("ebpf tcp-connect flat: service p50 at the largest size / at the smallest ≤ 1.05 (different cells: noise ~±5%)"))
	}

	// At 10k: 1.5x better than kube-proxy iptables, no worse than nftables.
	{
		var j judge
		e := ebpfConnectP50(ix, goalSize)
		k := connectP50(ix, results.KubeProxyIptables, goalSize)
		if r, ok := ratio(k, e); ok {
			j.check(sizeLabel(goalSize), r >= 1.5, "kube-proxy-iptables p50 %s / ebpf p50 %s = %s", us(k), us(e), fx(r))
		} else {
			j.missing(sizeLabel(goalSize), "missing data")
		}
		out = append(out, j.row("at 10k Services: kube-proxy-iptables tcp-connect p50 / ebpf p50 ≥ 1.5"))
	}
	{
		var j judge
		e := ebpfConnectP50(ix, goalSize)
		k := connectP50(ix, results.KubeProxyNFTables, goalSize)
		if r, ok := ratio(e, k); ok {
			j.check(sizeLabel(goalSize), r <= 1, "ebpf p50 %s / kube-proxy-nftables p50 %s = %s", us(e), us(k), fx(r))
		} else {
			j.missing(sizeLabel(goalSize), "missing data")
		}
		out = append(out, j.row("at 10k Services: ebpf tcp-connect p50 ≤ kube-proxy-nftables's"))
	}

	// Pod-to-pod under ebpf's rules.
	{
		var j judge
		for _, size := range ix.sizes {
			r, ok := directUnderRules(ix, ebpf, size, results.TCPConnect)
			if !ok {
				j.missing(sizeLabel(size), "missing data")
				continue
			}
			j.check(sizeLabel(size), r <= 1.05, "%s", fx(r))
		}
		out = append(out, j.row("pod-to-pod under ebpf's rules 1.00x of no rules: ebpf cell's direct tcp-connect p50 / direct cell's (different cells, so ≤ 1.05 counts as within noise)"))
	}

	// Rates.
	rateGoal := func(workload string, min float64, goal string) {
		var j judge
		for _, size := range ix.sizes {
			c, why := ix.cell(ebpf, size)
			if c == nil {
				j.fail(sizeLabel(size), why)
				continue
			}
			r, ok := rateOf(c, workload)
			if !ok || !r.RatioOK {
				j.missing(sizeLabel(size), "no "+workload+" phases")
				continue
			}
			j.check(sizeLabel(size), r.Ratio >= min, "%s (reps %s)", fx(r.Ratio), spreadText(r.Spread))
		}
		out = append(out, j.row(goal))
	}
	rateGoal(results.Stream, 0.98, "ebpf stream throughput service/direct ≥ 0.98 (same cell, phase-interleaved: sum bytes / sum seconds per target)")
	rateGoal(results.ConnectRate, 0.95, "ebpf connect rate service/direct ≥ 0.95 (same cell, phase-interleaved: sum connections / sum seconds per target)")
	{
		var j judge
		for _, size := range ix.sizes {
			e, ok := nodeCPUPer10k(ix, ebpf, size)
			if !ok {
				j.missing(sizeLabel(size), "no ebpf data")
				continue
			}
			var cmp []string
			good, have := true, false
			for _, kp := range []string{results.KubeProxyIptables, results.KubeProxyNFTables} {
				k, ok := nodeCPUPer10k(ix, kp, size)
				if !ok {
					cmp = append(cmp, kp+" no data")
					continue
				}
				have = true
				good = good && e <= k
				cmp = append(cmp, fmt.Sprintf("%s %.3f", kp, k))
			}
			if !have {
				j.missing(sizeLabel(size), fmt.Sprintf("ebpf %.3f, no upstream data", e))
				continue
			}
			j.check(sizeLabel(size), good, "ebpf %.3f vs %s", e, strings.Join(cmp, ", "))
		}
		out = append(out, j.row("ebpf node CPU s per 10k connections through the service ≤ both upstream kube-proxy modes' (same size)"))
	}

	// Control plane.
	{
		var j judge
		for _, b := range ix.run.Bulk {
			if b.Contender != ebpf {
				continue
			}
			what := fmt.Sprintf("%s → %s", sizeLabel(b.From), sizeLabel(b.To))
			if b.TimedOut {
				j.check(what, false, "never served (waited %s)", secs(b.Served))
				continue
			}
			j.check(what, b.Served <= 2*time.Second, "%d Services created in %s, the last served %s later", b.To-b.From, secs(b.Creating), secs(b.Served))
		}
		for _, size := range ix.sizes {
			c, why := ix.cell(ebpf, size)
			if c == nil {
				j.missing(sizeLabel(size), why)
				continue
			}
			if c.ControlPlane.BatchServices == 0 {
				j.missing(sizeLabel(size), "no batch")
				continue
			}
			d := c.ControlPlane.BatchServed
			j.check(sizeLabel(size), d <= 2*time.Second, "batch of %d Services served in %s", c.ControlPlane.BatchServices, secs(d))
		}
		out = append(out, j.row("ebpf: Services served within 2 s of their creation finishing (the issue: 10k; growths of the background Services made with ebpf running, and each cell's batch)"))
	}
	return out
}

// scaleTargets are issue 18's goals for the control plane at 10k to 50k
// Services: our iptables mode on each backend no slower than upstream's
// iptables mode on the same backend, and the eBPF mode's memory,
// endpoint-change and cold-start targets.
func scaleTargets(ix *index) []target {
	var out []target
	ebpf := results.EBPF
	for _, pair := range [][2]string{
		{results.IptablesLegacy, results.KubeProxyIptables},
		{results.IptablesNFT, results.KubeProxyIptablesNFT},
	} {
		out = append(out, noSlowerThan(ix, pair[0], pair[1], goalSize))
	}
	{
		var j judge
		judged := false
		var nearest string
		for _, size := range ix.sizes {
			c, ok := ix.cells[cellKey{ebpf, size}]
			if !ok {
				continue
			}
			cp := c.ControlPlane
			text := secs(cp.ColdStart)
			if cp.ColdStartTimedOut {
				text = "not served after " + text
			} else if cp.ColdStart == 0 {
				if c.Skipped != "" && size >= coldGoalSize && !judged {
					// Stopped at a smaller size: not tried here.
					judged = true
					j.fail(sizeLabel(size), "did not reach "+sizeLabel(size)+": "+c.Skipped)
				}
				continue
			}
			if size >= coldGoalSize && !judged {
				judged = true
				j.check(sizeLabel(size), !cp.ColdStartTimedOut && cp.ColdStart <= 2*time.Second, "%s", text)
				continue
			}
			j.missing(sizeLabel(size), text)
			nearest = sizeLabel(size)
		}
		if !judged {
			msg := "not measured at 20k"
			if nearest != "" {
				msg += ", nearest " + nearest
			}
			if ix.largestSize() >= coldGoalSize {
				msg += " (no ebpf cell at 20k or more)"
			} else {
				msg += " (the run has no size of 20k or more: " + coldGoalOption + ")"
			}
			j.parts = append([]string{msg}, j.parts...)
		}
		out = append(out, j.row("ebpf cold node serves every Service within 2 s of the proxy's start with 20k Services (judged at the smallest size ≥ 20k)"))
	}
	{
		var j judge
		if c, why := ix.cell(ebpf, goalSize); c == nil {
			j.notReached(ix, ebpf, goalSize, why)
		} else if s := Summarize(seconds(c.ControlPlane.EndpointChange)); s.N == 0 {
			j.missing(sizeLabel(goalSize), "no endpoint changes")
		} else {
			j.check(sizeLabel(goalSize), s.P99 <= 0.050, "p99 %s (n=%d)", ms(s.P99), s.N)
		}
		out = append(out, j.row("ebpf: an endpoint change observed by a client within 50 ms at p99, at 10k Services"))
	}
	{
		var j judge
		if c, why := ix.cell(ebpf, goalSize); c == nil {
			j.notReached(ix, ebpf, goalSize, why)
		} else if c.Proxy.RSSBytes == 0 {
			j.missing(sizeLabel(goalSize), "RSS not recorded")
		} else {
			j.check(sizeLabel(goalSize), c.Proxy.RSSBytes < 100<<20, "%s (%d endpoints per Service)", mib(c.Proxy.RSSBytes), ix.run.Topology.EndpointsPerService)
		}
		out = append(out, j.row("ebpf proxy RSS at 10k Services below 100 MiB"))
	}
	return out
}

// coldGoalOption says how a run gets the 20k size the cold-start goal is
// judged at.
const coldGoalOption = "run with --sizes=0,1000,10000,20000 or add 20000 to --sizes"

// crossCellTolerance is how much slower than upstream ours may measure and
// still count as no slower: the two are different cells, minutes apart,
// whose noise here is about ±5%.
const crossCellTolerance = 1.05

// noSlowerThan judges ours against upstream at size on the three control
// plane measures: the cold node, an endpoint change under churn (p50 and
// p99) and a batch of new Services. A contender that did not reach the
// size loses to one that did; where neither did, the row says where each
// stopped.
func noSlowerThan(ix *index, ours, upstream string, size int) target {
	goal := fmt.Sprintf("at %s Services: %s no slower than %s on the cold node, an endpoint change under churn (p50 and p99) and a batch of new Services (each ≤ %.2fx: different cells)",
		sizeLabel(size), ours, upstream, crossCellTolerance)
	var j judge
	if !slices.Contains(ix.sizes, size) {
		j.missing(sizeLabel(size), "the run has no "+sizeLabel(size)+" size")
		return j.row(goal)
	}
	co, whyO := ix.cell(ours, size)
	cu, whyU := ix.cell(upstream, size)
	_, triedU := ix.cells[cellKey{upstream, size}]
	switch {
	case co == nil && cu == nil:
		j.missing("neither served "+sizeLabel(size), ours+" "+ix.reach(ours).text()+"; "+upstream+" "+ix.reach(upstream).text())
		return j.row(goal)
	case co == nil:
		if _, tried := ix.cells[cellKey{ours, size}]; !tried {
			j.missing(ours, whyO)
			return j.row(goal)
		}
		j.fail(ours, ix.reach(ours).text()+", while "+upstream+" served "+sizeLabel(size))
		return j.row(goal)
	case cu == nil && !triedU:
		j.missing(upstream, whyU)
		return j.row(goal)
	case cu == nil:
		j.check(ours, true, "served %s Services (cold node %s), while %s %s", sizeLabel(size), secs(co.ControlPlane.ColdStart), upstream, ix.reach(upstream).text())
		return j.row(goal)
	}
	o, u := co.ControlPlane, cu.ControlPlane
	within := func(a, b float64) (float64, bool) {
		r, ok := ratio(a, b)
		return r, ok && r <= crossCellTolerance
	}
	if r, ok := within(o.ColdStart.Seconds(), u.ColdStart.Seconds()); r > 0 {
		j.check("cold node", ok, "%s / %s = %s", secs(o.ColdStart), secs(u.ColdStart), fx(r))
	} else {
		j.missing("cold node", "not timed")
	}
	so, su := Summarize(seconds(o.EndpointChange)), Summarize(seconds(u.EndpointChange))
	switch {
	case o.EndpointChangeTimedOut:
		j.check("endpoint change", false, "a change %s made was never seen", ours)
	case u.EndpointChangeTimedOut && so.N > 0:
		j.check("endpoint change", true, "p99 %s, while a change %s made was never seen", ms(so.P99), upstream)
	case so.N == 0 || su.N == 0:
		j.missing("endpoint change", "no changes timed")
	default:
		r50, ok50 := within(so.P50, su.P50)
		r99, ok99 := within(so.P99, su.P99)
		j.check("endpoint change", ok50 && ok99, "p50 %s / %s = %s, p99 %s / %s = %s",
			ms(so.P50), ms(su.P50), fx(r50), ms(so.P99), ms(su.P99), fx(r99))
	}
	switch {
	case o.BatchServices == 0 || u.BatchServices == 0:
		j.missing("batch", "no batch")
	case o.BatchTimedOut:
		j.check("batch", false, "%d Services not served after %s", o.BatchServices, secs(o.BatchServed))
	case u.BatchTimedOut:
		j.check("batch", true, "%d Services in %s, while %s's were not served after %s", o.BatchServices, secs(o.BatchServed), upstream, secs(u.BatchServed))
	default:
		r, ok := within(o.BatchServed.Seconds(), u.BatchServed.Seconds())
		if r == 0 {
			// Served at once: a zero is no slower than anything.
			ok = o.BatchServed <= u.BatchServed
		}
		j.check("batch", ok, "%d Services %s / %s = %s", o.BatchServices, secs(o.BatchServed), secs(u.BatchServed), fx(r))
	}
	return j.row(goal)
}

// reach is how far a contender got in the run: the largest size it
// served, and the size it stopped at and why.
type reach struct {
	served    int // -1: none
	stoppedAt int // -1: never stopped
	why       string
}

func (ix *index) reach(contender string) reach {
	r := reach{served: -1, stoppedAt: -1}
	for _, size := range ix.sizes {
		c, ok := ix.cells[cellKey{contender, size}]
		if !ok {
			continue
		}
		if c.Skipped == "" {
			r.served = size
			continue
		}
		r.stoppedAt, r.why = size, c.Skipped
		break
	}
	return r
}

// text is the reach in words: "stopped at 10k (served up to 1k
// Services): did not serve …", or "served every size up to 50k Services".
func (r reach) text() string {
	upTo := "no size"
	if r.served >= 0 {
		upTo = "up to " + sizeLabel(r.served) + " Services"
	}
	if r.stoppedAt < 0 {
		if r.served < 0 {
			return "was not run"
		}
		return "served every size " + upTo
	}
	return fmt.Sprintf("stopped at %s (served %s): %s", sizeLabel(r.stoppedAt), upTo, r.why)
}

// connectP50 is a contender's tcp-connect service p50 at a size, 0 if not
// measured.
func connectP50(ix *index, contender string, size int) float64 {
	c, _ := ix.cell(contender, size)
	if c == nil {
		return 0
	}
	l, ok := ix.latency(c, results.TCPConnect)
	if !ok {
		return 0
	}
	return l.Service.P50
}

func ebpfConnectP50(ix *index, size int) float64 { return connectP50(ix, results.EBPF, size) }

// directUnderRules is a contender's cell's direct p50 over the direct
// contender's direct p50 at the same size.
func directUnderRules(ix *index, contender string, size int, workload string) (float64, bool) {
	c, _ := ix.cell(contender, size)
	d, _ := ix.cell(results.Direct, size)
	if c == nil || d == nil {
		return 0, false
	}
	lc, ok1 := ix.latency(c, workload)
	ld, ok2 := ix.latency(d, workload)
	if !ok1 || !ok2 {
		return 0, false
	}
	return ratio(lc.Direct.P50, ld.Direct.P50)
}

// nodeCPUPer10k is a contender's node CPU seconds per 10k connections
// through the service (through the pod IP for the direct contender, which
// has no service phases).
func nodeCPUPer10k(ix *index, contender string, size int) (float64, bool) {
	side, ok := connectRateShown(ix, contender, size)
	if !ok {
		return 0, false
	}
	return per(side.NodeCPU, side.Ops, 1e4)
}

// connectRateShown is the side of a cell's connection-rate workload the
// report shows for its contender: through the service, or through the pod
// IP for the direct contender, which has no service phases.
func connectRateShown(ix *index, contender string, size int) (rateSide, bool) {
	c, _ := ix.cell(contender, size)
	if c == nil {
		return rateSide{}, false
	}
	r, ok := rateOf(c, results.ConnectRate)
	if !ok {
		return rateSide{}, false
	}
	if contender == results.Direct {
		return r.Direct, true
	}
	return r.Service, true
}
