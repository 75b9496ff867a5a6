package report

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// latencyWorkloads is the order the report shows them in.
var latencyWorkloads = []string{results.TCPConnect, results.TCPCRR, results.TCPRR, results.UDPConnected, results.UDPUnconnected}

// Formatting helpers: one place decides the units and digits.
func fx(r float64) string { return fmt.Sprintf("%.3fx", r) }
func us(v float64) string { return fmt.Sprintf("%.1f µs", v) }
func ms(sec float64) string {
	return fmt.Sprintf("%.1f ms", sec*1e3)
}
func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
func mib(b int64) string          { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func spreadText(sp spread) string {
	if sp.N == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.3f–%.3f", sp.Min, sp.Max)
}

func ratioText(v float64, ok bool) string {
	if !ok {
		return "n/a"
	}
	return fx(v)
}

// mdEscape keeps free text (reasons, commands) from breaking a table.
func mdEscape(s string) string {
	s = strings.ReplaceAll(s, "|", `\|`)
	return strings.ReplaceAll(s, "\n", " ")
}

// mdWriter writes markdown, remembering the first error so the rendering
// code stays readable; Write checks it once.
type mdWriter struct {
	w   io.Writer
	err error
}

func (m *mdWriter) f(format string, args ...any) {
	if m.err != nil {
		return
	}
	_, m.err = fmt.Fprintf(m.w, format, args...)
}

func (m *mdWriter) table(header []string, rows [][]string) {
	m.f("| %s |\n", strings.Join(header, " | "))
	seps := make([]string, len(header))
	for i := range seps {
		seps[i] = "---"
	}
	m.f("| %s |\n", strings.Join(seps, " | "))
	for _, r := range rows {
		cells := make([]string, len(r))
		for i, c := range r {
			cells[i] = mdEscape(c)
		}
		m.f("| %s |\n", strings.Join(cells, " | "))
	}
	m.f("\n")
}

func writeMarkdown(w io.Writer, ix *index, plots plotFiles) error {
	m := &mdWriter{w: w}
	r := ix.run
	writeHeader(m, r, ix)
	m.f("## Targets\n\n")
	m.f("The issue's goals, judged on this run (goals, not assertions). \"not measured\" means the run has no data to judge it by (a size not run, a cell skipped).\n\n")
	var rows [][]string
	for _, t := range targets(ix) {
		rows = append(rows, []string{t.Goal, t.Measured, t.Met})
	}
	m.table([]string{"goal", "measured", "met"}, rows)

	writeScale(m, ix)
	writeLatency(m, ix, plots)
	writeRates(m, ix, plots)
	writeControlPlane(m, ix, plots)
	writeSkipped(m, ix)
	writeFiles(m, plots)
	return m.err
}

func writeHeader(m *mdWriter, r *results.Run, ix *index) {
	m.f("# Benchmark report\n\n")
	quick := ""
	if r.Quick {
		quick = " (quick run: reduced matrix)"
	}
	m.f("- Date: %s\n- Duration: %s%s\n", r.Started.UTC().Format(time.RFC3339), r.Duration.Round(time.Second), quick)
	m.f("- Command: `%s`\n", strings.ReplaceAll(r.Command, "`", "'"))
	mc := r.Machine
	m.f("- Machine: %s, %d CPUs, %.1f GiB memory, kernel %s\n", mc.CPUModel, mc.CPUs, float64(mc.MemoryBytes)/(1<<30), mc.Kernel)
	m.f("- Versions: Go %s, Kubernetes %s, iptables %s, nft %s, kube-bpf-proxy %s\n", mc.GoVersion, mc.KubernetesVersion, mc.IptablesVersion, mc.NftVersion, mc.ProxyVersion)
	t := r.Topology
	m.f("- Topology: %d nodes, %d client pods, %d server pods; background Services with %d endpoints each; %d repetitions of each workload per cell\n", t.Nodes, t.ClientPods, t.ServerPods, t.EndpointsPerService, t.Repetitions)
	sizes := make([]string, len(ix.sizes))
	for i, s := range ix.sizes {
		sizes[i] = sizeLabel(s)
	}
	m.f("- Contenders: %s; background Services: %s\n", strings.Join(ix.contenders, ", "), strings.Join(sizes, ", "))
	fam := results.FamilyOf(r.Family)
	if fam == "IPv6" {
		fam += ": a dual-stack cluster; the benchmark's and the background Services are SingleStack IPv6 with IPv6 slices, clients reach the pods' IPv6 addresses and the IPv6 ClusterIPs; tcp-connect (and tcp-crr), UDP and the connection rate only"
	}
	m.f("- IP family: %s\n\n", fam)
	m.f("%s", "**How to read.** Every ratio is service/direct measured in the same cell (one contender at one number of background Services): "+
		"latency samples alternate the pod IP (direct) and the ClusterIP (service) sample by sample, rate phases alternate target phase by phase, "+
		"so both sides of a ratio saw the same machine at the same time. The ratio shown is of the pooled samples; \"spread\" is the min–max of the "+
		"same ratio taken per repetition. Comparisons across cells (to kube-proxy, \"direct under rules\", across sizes) are between different cells "+
		"and carry that run-to-run noise (~±5% here). Lower is better for latency and CPU, higher for rates. Latencies are in microseconds; "+
		"percentiles interpolate linearly between order statistics; ± is the half-width of the 99% confidence interval of the mean "+
		"(normal approximation, z=2.576); stddev uses n-1.\n\n")
}

// writeScale is issue 18's view of the run: at 10k Services, each
// contender's cold node, endpoint change under churn, batch of new
// Services and memory, how far each got, and the targets judged.
func writeScale(m *mdWriter, ix *index) {
	m.f("## At %s Services: the control plane\n\n", sizeLabel(goalSize))
	if !slices.Contains(ix.sizes, goalSize) {
		m.f("The run has no %s size.\n\n", sizeLabel(goalSize))
	} else {
		m.f("Each contender on nodes with nothing programmed, %s background Services of %d endpoints: the cold node (until a client reached the last Service), an endpoint move while other Services' endpoints churn (API answer until a client reached the new endpoint), a batch of new Services created with the proxies running (until a client reached the last), and the larger of the two proxies' resident set. \"How far it got\" is over the whole run: a contender that did not serve a size within the run's time-out stops there and is not tried at larger ones.\n\n",
			sizeLabel(goalSize), ix.run.Topology.EndpointsPerService)
		var rows [][]string
		for _, ct := range ix.contenders {
			if ct == results.Direct {
				continue
			}
			reach := ix.reach(ct).text()
			c, why := ix.cell(ct, goalSize)
			if c == nil {
				cold := ""
				if sc, ok := ix.cells[cellKey{ct, goalSize}]; ok && sc.ControlPlane.ColdStartTimedOut {
					cold = "not served after " + secs(sc.ControlPlane.ColdStart)
				}
				rows = append(rows, []string{ct, cold, why, "", "", reach})
				continue
			}
			cp := c.ControlPlane
			ec := endpointChangeText(cp)
			batch := "n/a"
			if cp.BatchServices > 0 {
				batch = fmt.Sprintf("%d in %s", cp.BatchServices, secs(cp.BatchServed))
				if cp.BatchTimedOut {
					batch = fmt.Sprintf("%d not served after %s", cp.BatchServices, secs(cp.BatchServed))
				}
			}
			rows = append(rows, []string{ct, secs(cp.ColdStart), ec, batch, rssText(c.Proxy), reach})
		}
		m.table([]string{"contender", "cold node", "endpoint change p50 / p99 (churn)", "new Services served", "proxy RSS", "how far it got"}, rows)
	}
	m.f("### Issue 18's targets\n\n")
	var rows [][]string
	for _, t := range scaleTargets(ix) {
		rows = append(rows, []string{t.Goal, t.Measured, t.Met})
	}
	m.table([]string{"goal", "measured", "met"}, rows)
}

func writeLatency(m *mdWriter, ix *index, plots plotFiles) {
	m.f("## Latency\n\n")
	for _, f := range plots.cdf {
		m.f("![tcp-connect latency CDF, %s Services](%s)\n\n", sizeLabel(f.size), f.name)
	}
	if plots.connectVsServices != "" {
		m.f("![tcp-connect p50 and p99 against Service count](%s)\n\n", plots.connectVsServices)
	}
	if plots.histogram != "" {
		m.f("![tcp-crr round-trip histogram](%s)\n\n", plots.histogram)
	}
	header := []string{"contender", "family", "path", "p50", "p90", "p99", "p99.9", "mean ± CI99", "stddev", "N", "errors",
		"p50 service/direct (spread)", "p99 service/direct (spread)", "p50 / kube-proxy-iptables", "p50 / kube-proxy-nftables", "direct under rules"}
	fam := results.FamilyOf(ix.run.Family)
	for _, w := range latencyWorkloads {
		for _, size := range ix.sizes {
			var rows [][]string
			kpi := latencyP50(ix, results.KubeProxyIptables, size, w)
			kpn := latencyP50(ix, results.KubeProxyNFTables, size, w)
			have := false
			for _, ct := range ix.contenders {
				c, why := ix.cell(ct, size)
				if c == nil {
					rows = append(rows, []string{ct, fam, why, "", "", "", "", "", "", "", "", "", "", "", "", ""})
					continue
				}
				l, ok := ix.latency(c, w)
				if !ok {
					rows = append(rows, []string{ct, fam, "not measured", "", "", "", "", "", "", "", "", "", "", "", "", ""})
					continue
				}
				have = true
				if l.Service.N > 0 {
					vi, oki := ratio(l.Service.P50, kpi)
					vn, okn := ratio(l.Service.P50, kpn)
					row := append([]string{ct, fam, "service"}, summaryCells(l.Service, l.ServiceErrors)...)
					row = append(row,
						ratioText(l.P50, l.P50OK)+" ("+spreadText(l.P50Spread)+")",
						ratioText(l.P99, l.P99OK)+" ("+spreadText(l.P99Spread)+")",
						ratioText(vi, oki), ratioText(vn, okn), "")
					rows = append(rows, row)
				}
				dur, okd := directUnderRules(ix, ct, size, w)
				row := append([]string{ct, fam, "direct"}, summaryCells(l.Direct, l.DirectErrors)...)
				rows = append(rows, append(row, "", "", "", "", ratioText(dur, okd)))
			}
			if !have {
				continue
			}
			m.f("### %s, %s Services\n\n", w, sizeLabel(size))
			m.table(header, rows)
		}
	}
}

func summaryCells(s Summary, errors int) []string {
	if s.N == 0 {
		return []string{"", "", "", "", "", "", "0", fmt.Sprint(errors)}
	}
	f := func(v float64) string { return fmt.Sprintf("%.1f", v) }
	return []string{f(s.P50), f(s.P90), f(s.P99), f(s.P999), f(s.Mean) + " ± " + f(s.CI99), f(s.Stddev), fmt.Sprint(s.N), fmt.Sprint(errors)}
}

// latencyP50 is a contender's service p50 of a workload at a size, 0 if
// not measured.
func latencyP50(ix *index, contender string, size int, workload string) float64 {
	c, _ := ix.cell(contender, size)
	if c == nil {
		return 0
	}
	l, ok := ix.latency(c, workload)
	if !ok {
		return 0
	}
	return l.Service.P50
}

func writeRates(m *mdWriter, ix *index, plots plotFiles) {
	m.f("## Rates\n\n")
	m.f("Sums over the phases of each target: rate = sum of connections (bytes) / sum of seconds. Node CPU is the whole machine's (clients, servers, kernel datapath, proxies), from /proc/stat; proxy CPU is the proxies' processes'. The direct contender has no service phases.\n\n")
	if plots.connectRate != "" {
		m.f("![connections per second](%s)\n\n![node CPU per 10k connections](%s)\n\n", plots.connectRate, plots.cpuPerConnection)
	}
	f := func(v float64, ok bool, format string) string {
		if !ok {
			return "n/a"
		}
		return fmt.Sprintf(format, v)
	}
	fam := results.FamilyOf(ix.run.Family)
	for _, size := range ix.sizes {
		m.f("### %s Services\n\n", sizeLabel(size))
		var conn, stream [][]string
		streamMeasured := false
		for _, ct := range ix.contenders {
			c, why := ix.cell(ct, size)
			if c == nil {
				conn = append(conn, []string{ct, fam, why, "", "", "", "", "", "", "", ""})
				stream = append(stream, []string{ct, fam, why, "", "", "", "", "", ""})
				continue
			}
			if r, ok := rateOf(c, results.ConnectRate); ok {
				ns, oks := per(r.Service.NodeCPU, r.Service.Ops, 1e4)
				nd, okd := per(r.Direct.NodeCPU, r.Direct.Ops, 1e4)
				ps, okps := per(r.Service.ProxyCPU, r.Service.Ops, 1e4)
				pd, okpd := per(r.Direct.ProxyCPU, r.Direct.Ops, 1e4)
				conn = append(conn, []string{ct, fam,
					f(r.Service.rate(), r.Service.Seconds > 0, "%.0f"), f(r.Direct.rate(), r.Direct.Seconds > 0, "%.0f"),
					ratioText(r.Ratio, r.RatioOK), spreadText(r.Spread),
					f(ns, oks, "%.3f"), f(nd, okd, "%.3f"), f(ps, okps, "%.3f"), f(pd, okpd, "%.3f"),
					fmt.Sprint(r.Service.Errors + r.Direct.Errors)})
			} else {
				conn = append(conn, []string{ct, fam, "not measured", "", "", "", "", "", "", "", ""})
			}
			if r, ok := rateOf(c, results.Stream); ok {
				streamMeasured = true
				gs, gd := r.Service.rate()*8/1e9, r.Direct.rate()*8/1e9
				ns, oks := per(r.Service.NodeCPU, r.Service.Ops, 1e9)
				nd, okd := per(r.Direct.NodeCPU, r.Direct.Ops, 1e9)
				stream = append(stream, []string{ct, fam,
					f(gs, r.Service.Seconds > 0, "%.2f"), f(gd, r.Direct.Seconds > 0, "%.2f"),
					ratioText(r.Ratio, r.RatioOK) + " (" + spreadText(r.Spread) + ")",
					f(ns, oks, "%.3f"), f(nd, okd, "%.3f"), fmt.Sprint(r.Service.Errors + r.Direct.Errors)})
			} else {
				stream = append(stream, []string{ct, fam, "not measured", "", "", "", "", ""})
			}
		}
		m.f("Connect rate (%s):\n\n", results.ConnectRate)
		m.table([]string{"contender", "family", "service conn/s", "direct conn/s", "ratio", "spread", "node CPU s/10k conn service", "node CPU s/10k conn direct", "proxy CPU s/10k conn service", "proxy CPU s/10k conn direct", "errors"}, conn)
		if !streamMeasured {
			// An IPv6 run measures the connection rate only.
			m.f("Stream (%s): not measured in this run.\n\n", results.Stream)
			continue
		}
		m.f("Stream (%s):\n\n", results.Stream)
		m.table([]string{"contender", "family", "service Gbit/s", "direct Gbit/s", "ratio (spread)", "node CPU s/GB service", "node CPU s/GB direct", "errors"}, stream)
	}
}

func writeControlPlane(m *mdWriter, ix *index, plots plotFiles) {
	m.f("## Control plane\n\n")
	m.f("Cold start: proxies started on nodes with nothing programmed until a client reached the last background Service. Batch: Services created with the proxies running, until a client reached the last. Endpoint change: API answer to a client reaching the new endpoint, while other endpoints churn. Network programming: the proxies' own kubeproxy_network_programming_duration_seconds, quantiles estimated from the buckets by linear interpolation inside the bucket (as PromQL's histogram_quantile).\n\n")
	if plots.controlPlane != "" {
		m.f("![control-plane latency against Service count](%s)\n\n", plots.controlPlane)
	}
	if len(ix.run.Bulk) > 0 {
		m.f("### The background Services growing, a proxy running\n\n")
		m.f("Each growth of the background Services, created through the API with the contender's proxies running on both nodes: the creation's wall time, and the time from its end until a client on node1 first reached the last Service created.\n\n")
		var rows [][]string
		for _, b := range ix.run.Bulk {
			served := secs(b.Served)
			if b.TimedOut {
				served = "not served after " + served
			}
			rows = append(rows, []string{b.Contender, sizeLabel(b.From) + " → " + sizeLabel(b.To), fmt.Sprint(b.To - b.From), secs(b.Creating), served})
		}
		m.table([]string{"contender", "Services", "created", "creation took", "last served after"}, rows)
	}
	for _, size := range ix.sizes {
		m.f("### %s Services\n\n", sizeLabel(size))
		var rows [][]string
		for _, ct := range ix.contenders {
			c, ok := ix.cells[cellKey{ct, size}]
			if !ok {
				rows = append(rows, []string{ct, "no cell recorded", "", "", "", "", ""})
				continue
			}
			cp := c.ControlPlane
			cold := "n/a"
			if cp.ColdStartTimedOut {
				cold = "not served after " + secs(cp.ColdStart)
			} else if cp.ColdStart > 0 {
				cold = secs(cp.ColdStart)
			}
			if c.Skipped != "" {
				rows = append(rows, []string{ct, cold, skippedText(c, size), "", "", "", ""})
				continue
			}
			batch := "n/a"
			if cp.BatchServices > 0 {
				batch = fmt.Sprintf("%s (%d Services)", secs(cp.BatchServed), cp.BatchServices)
				if cp.BatchTimedOut {
					batch = "not served after " + batch
				}
			}
			ec := endpointChangeText(cp)
			np := "not exported"
			if h := cp.NetworkProgramming; h != nil {
				p50, ok50 := histogramQuantile(0.5, h.Bounds, h.Buckets)
				p99, ok99 := histogramQuantile(0.99, h.Bounds, h.Buckets)
				if ok50 && ok99 {
					np = fmt.Sprintf("%s / %s (count %d)", ms(p50), ms(p99), h.Count)
				} else {
					np = fmt.Sprintf("no observations (count %d)", h.Count)
				}
			}
			rows = append(rows, []string{ct, cold, batch, ec, np, rssText(c.Proxy), fmt.Sprintf("%.2f", c.Proxy.CPUSeconds)})
		}
		m.table([]string{"contender", "cold start", "batch served", "endpoint change p50 / p99", "network programming p50 / p99", "proxy RSS", "proxy CPU s"}, rows)
	}
}

func writeSkipped(m *mdWriter, ix *index) {
	m.f("## Skipped, missing and incomplete cells\n\n")
	var rows [][]string
	for _, size := range ix.sizes {
		for _, ct := range ix.contenders {
			c, ok := ix.cells[cellKey{ct, size}]
			switch {
			case !ok:
				rows = append(rows, []string{ct, sizeLabel(size), "no cell recorded", ""})
			case c.Skipped != "":
				rows = append(rows, []string{ct, sizeLabel(size), skippedText(c, size), secs(c.Elapsed)})
			case c.Incomplete != "":
				rows = append(rows, []string{ct, sizeLabel(size), "measured, but incomplete: " + c.Incomplete, secs(c.Elapsed)})
			}
		}
	}
	if len(rows) == 0 {
		m.f("None: every contender was measured at every size.\n\n")
		return
	}
	m.table([]string{"contender", "size", "reason", "elapsed"}, rows)
}

func writeFiles(m *mdWriter, plots plotFiles) {
	m.f("## Files\n\n")
	m.f("Raw data beside this report: `latency.csv` (every latency sample: contender,size,workload,rep,target,index,microseconds; rep and index count from 0), " +
		"`rates.csv` (every rate phase), `control-plane.csv` (contender,size,metric,index,seconds), `cells.csv` (one row per cell) and `results.json` (the whole run; `bench report <dir>` rebuilds this report from it).\n")
	if plots.connectVsServices != "" {
		m.f("\nIn the plots against Service count the X axis is logarithmic; 0 Services is drawn one decade left of the smallest non-zero size and labelled 0.\n")
	}
}

func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

// endpointChangeText is a cell's endpoint change p50 / p99, and whether a
// change was never seen.
func endpointChangeText(cp results.ControlPlane) string {
	ec := "n/a"
	if s := Summarize(seconds(cp.EndpointChange)); s.N > 0 {
		ec = fmt.Sprintf("%s / %s (n=%d)", ms(s.P50), ms(s.P99), s.N)
	}
	if cp.EndpointChangeTimedOut {
		ec += "; then a change never seen"
	}
	return ec
}

// rssText is the proxy's resident set, n/a where not measured.
func rssText(p results.ProxyUsage) string {
	if p.RSSBytes > 0 {
		return mib(p.RSSBytes)
	}
	return "n/a"
}
