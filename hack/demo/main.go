// Command demo shows kube-bpf-proxy on a real, local Kubernetes control
// plane (test/utils/localcluster): kube-apiserver, etcd and
// kube-controller-manager with two simulated nodes in network namespaces of
// their own. The proxy runs on both nodes as the DaemonSets of
// manifests/overlays/ab would run it, with the manifests' ServiceAccount and
// capabilities, from the image hack/image.sh builds (its root filesystem
// unpacked and entered as a runtime would, its entrypoint run: see
// localcluster.Image): one node in each mode, chosen by the Node label
// kube-bpf-proxy.io/desired-mode. The real EndpointSlice controller builds
// the slices it serves. Nothing leaves the namespaces the cluster makes.
//
// The latency probe compares the modes as a crossover A/B
// (docs/ab-testing.md): both nodes measure at the same time, one per mode,
// and swap modes halfway; the difference ebpf − iptables is paired by
// window and averaged over the two periods (test/bench/crossover), so neither
// the nodes' own differences nor the order in which the modes ran pass for
// the datapath's.
//
//	demo            the whole tour, then everything is removed
//	demo --keep     set up (cluster, node1 in ebpf and node2 in iptables mode, the web Service,
//	                the latency probe, Prometheus with a forwarder on 127.0.0.1:9090) and leave it running
//	demo --down     remove what --keep left
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodelabel"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/probe"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/crossover"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/ociimage"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// webService is what a user would apply: a Service in front of pods
// labelled app=web serving HTTP on 8080.
const webService = `apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
`

// period is how long the probe measures in each half of the crossover: at
// the manifests' 5 probes a second per client, about 150 requests per node
// and protocol. window is the crossover's unit: both nodes' means over one
// window make one paired difference (10 per period).
const (
	period = 30 * time.Second
	window = 3 * time.Second
)

// firstModes is each node's mode in the first period; they swap for the
// second.
var firstModes = map[string]string{"node1": "ebpf", "node2": "iptables"}

func otherMode(mode string) string {
	if mode == "ebpf" {
		return "iptables"
	}
	return "ebpf"
}

type demo struct {
	ctx context.Context
	c   *localcluster.Cluster
	dir string
	// binary is empty: every container runs from image, which takes its
	// place.
	binary string
	// image is the image archive (hack/image.sh).
	image string
	step  string
	// stack is the cluster's IP families (--stack).
	stack localcluster.Stack
	// vip is web's ClusterIP; clients holds the client pod of each node.
	vip     string
	clients map[string]*localcluster.Pod
	// promURL is Prometheus's address from this machine (--keep).
	promURL string
	// probeClients and probeServers are the latency probe's pods.
	probeClients, probeServers []*localcluster.Pod
	// modes is each node's current mode.
	modes map[string]string
	// obs are the crossover's values per measure: one per node and
	// window; periods holds each period's summary per mode, for the
	// secondary table.
	obs     map[string][]crossover.Obs
	periods [][]probe.Summary
	// windows counts the windows measured, to number them.
	windows int
}

func main() {
	testnet.RunHelperIfRequested(nil)
	keep := flag.Bool("keep", false, "leave the cluster and the proxies running (make demo-up)")
	down := flag.Bool("down", false, "remove the cluster --keep left (make demo-down)")
	dir := flag.String("dir", "_output/demo-cluster", "cluster directory")
	kubeBin := flag.String("kube-bin", os.Getenv("KUBE_BIN"), "directory of the Kubernetes binaries (hack/kube-build.sh)")
	image := flag.String("image", "_output/kube-bpf-proxy-image.tar", "the image archive the proxies and the probe run from (hack/image.sh)")
	clusterBinary := flag.String("cluster-binary", "_output/cluster", "hack/cluster's binary, whose forward command --keep runs")
	promListen := flag.String("prometheus-listen", envOr("KBP_PROMETHEUS_LISTEN", "127.0.0.1:9090"), "--keep: where Prometheus is reachable from this machine (a forwarder into node1's namespace)")
	stackFlag := flag.String("stack", envOr("KBP_DEMO_STACK", "ipv4"), "the cluster's IP families: ipv4, or dual-stack (every node and pod gets an IPv6 address too; the tour's Service stays IPv4)")
	flag.Parse()
	stack, err := localcluster.ParseStack(*stackFlag)
	if err == nil && stack == localcluster.IPv6Only {
		err = fmt.Errorf("--stack=ipv6: the tour's Service is IPv4; start an IPv6-only cluster with hack/cluster.sh up --stack ipv6")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	d := &demo{ctx: ctx, dir: *dir, image: *image, stack: stack, obs: map[string][]crossover.Obs{}}
	if *down {
		d.teardown()
		fmt.Println("Done: the demo cluster is gone.")
		return
	}
	d.up(*kubeBin)
	if *keep {
		cb, _ := filepath.Abs(*clusterBinary)
		d.startPrometheus(cb, *promListen)
		d.printAccess()
		return
	}
	d.tour()
	d.printMeasurements()
	d.begin("Tearing down: proxies (--cleanup), cluster processes, namespaces, cgroups, bpffs mounts")
	d.teardown()
	fmt.Println("\nDone. `make demo-up` keeps a cluster running to explore; `make test` runs every test.")
}

// begin starts a step: its title is printed and named again if it fails.
func (d *demo) begin(format string, args ...any) {
	d.step = fmt.Sprintf(format, args...)
	fmt.Printf("\n==> %s\n", d.step)
}

func (d *demo) logf(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }

// fail reports the failed step and where its logs are, removes everything,
// and exits.
func (d *demo) fail(err error) {
	fmt.Fprintf(os.Stderr, "\ndemo failed at step %q:\n  %v\n", d.step, err)
	if d.c != nil {
		fmt.Fprintf(os.Stderr, "  logs of every process of the cluster: %s\n", filepath.Join(d.c.Dir, "logs"))
	}
	d.teardown()
	os.Exit(1)
}

func (d *demo) check(err error) {
	if err != nil {
		d.fail(err)
	}
}

func (d *demo) up(kubeBin string) {
	d.begin("Starting a local Kubernetes cluster: etcd, kube-apiserver and kube-controller-manager %s, two nodes", kubeVersion(kubeBin))
	img := d.unpackImage()
	c, err := localcluster.Up(d.ctx, localcluster.Options{Dir: d.dir, KubeBin: kubeBin, Image: img, Stack: d.stack,
		Progress: func(f string, a ...any) { d.logf(f, a...) }})
	d.c = c
	d.check(err)
	d.kubectl("get", "nodes", "-o", "wide")

	d.startProxies()

	d.begin("Creating Service default/web (port 80 -> 8080) and 3 web pods over both nodes, plus a client pod on each node")
	cmd := d.c.KubectlCommand(d.ctx, d.c.AdminKubeconfig, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(webService)
	out, err := cmd.CombinedOutput()
	d.check(errWith(err, out))
	d.logf("%s", strings.TrimSpace(string(out)))
	vip, err := d.c.Kubectl(d.ctx, "get", "service", "web", "-o", "jsonpath={.spec.clusterIP}")
	d.check(err)
	d.vip = strings.TrimSpace(vip)
	for i, node := range []string{"node1", "node2", "node2"} {
		name := fmt.Sprintf("web-%d", i+1)
		d.addPod(name, node, map[string]string{"app": "web"})
	}
	d.clients = map[string]*localcluster.Pod{}
	for _, node := range []string{"node1", "node2"} {
		d.clients[node] = d.addPod("client-"+node, node, nil)
	}
	d.kubectl("get", "pods", "-o", "wide")
	d.waitServed("web-")
	d.kubectl("get", "endpointslices", "-l", "kubernetes.io/service-name=web")
	d.deployProbe()
}

// deployProbe installs manifests/probe as a user would and runs its pods:
// 12 servers behind Service kube-bpf-proxy-probe/probe-server, spread over
// the nodes, and a client on each node probing the ClusterIP over a new
// connection per request.
func (d *demo) deployProbe() {
	d.begin("Installing the latency probe (kubectl apply -k manifests/probe): 12 servers behind a Service, a client on each node")
	out, err := d.c.Kubectl(d.ctx, "apply", "-k", "manifests/probe")
	d.check(err)
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		d.logf("%s", l)
	}
	d.probeServers, err = d.c.StartDeployment(d.ctx, probeNamespace, "probe-server", d.binary, "Probe server ready")
	d.check(err)
	d.probeClients, err = d.c.StartDaemonSet(d.ctx, probeNamespace, "probe-client", d.binary, "Probe client ready")
	d.check(err)
	for _, p := range d.probeClients {
		d.logf("client %s on %s, metrics at %s:%s", p.Name, p.Node, p.IP, probeMetricsPort)
	}
}

const (
	probeNamespace   = "kube-bpf-proxy-probe"
	probeMetricsPort = "9090"
)

// scrapeProbeClients reads every probe client's /metrics.
func (d *demo) scrapeProbeClients() []probe.Scrape {
	var scrapes []probe.Scrape
	for _, p := range d.probeClients {
		code, body, err := d.c.NodeGet(d.ctx, p.Node, p.IP.String()+":"+probeMetricsPort, "/metrics")
		if err == nil && code != 200 {
			err = fmt.Errorf("GET /metrics of %s: status %d", p.Name, code)
		}
		d.check(err)
		s, err := probe.ParseScrape(strings.NewReader(body))
		d.check(err)
		scrapes = append(scrapes, s)
	}
	return scrapes
}

// waitModes waits until each node's proxy has recorded its mode on its
// Node (it does after its first sync), which the probe clients read to
// label their requests, and then for the clients' watch of their Node.
func (d *demo) waitModes() {
	for _, n := range d.c.Nodes {
		mode := d.modes[n.Name]
		d.waitFor(n.Name+"'s label "+nodelabel.Label+"="+mode, func() bool {
			node, err := d.c.Client.CoreV1().Nodes().Get(d.ctx, n.Name, metav1.GetOptions{})
			return err == nil && node.Labels[nodelabel.Label] == mode
		})
	}
	time.Sleep(2 * time.Second)
}

// measure is one period of the crossover: the probe runs for period with
// the nodes in their current modes, scraped every window. Each window
// gives each node's mean and median per measure, labelled with the mode
// its client recorded; the period's whole summary per mode is kept for
// the secondary table.
func (d *demo) measure(p int) {
	var split []string
	for _, n := range d.c.Nodes {
		split = append(split, n.Name+" "+d.modes[n.Name])
	}
	d.begin("Period %d of the A/B: measuring for %s with the latency probe, %s at the same time (a %s window at a time)",
		p+1, period, strings.Join(split, ", "), window)
	d.waitModes()
	first := d.scrapeProbeClients()
	prev := first
	start := time.Now()
	for i := 1; time.Duration(i)*window <= period; i++ {
		select {
		case <-d.ctx.Done():
			d.fail(d.ctx.Err())
		case <-time.After(time.Until(start.Add(time.Duration(i) * window))):
		}
		cur := d.scrapeProbeClients()
		rows, err := probe.SummarizeByNode(prev, cur)
		d.check(err)
		d.addWindow(p, rows)
		prev = cur
	}
	sums, err := probe.Summarize(first, prev)
	d.check(err)
	d.periods = append(d.periods, sums)
	for _, s := range sums {
		d.logf("%s %s %s: %d requests, %d errors, mean %s", s.Mode, s.Family, s.Protocol, s.Requests, s.Errors, s.Mean.Round(time.Microsecond))
	}
}

// addWindow keeps one window's values per node and measure. A node whose
// requests in the window carry two modes (its label changed within it) is
// left out of that window.
func (d *demo) addWindow(p int, rows []probe.NodeSummary) {
	d.windows++
	modes := map[[2]string]int{} // node, measure -> modes seen
	for _, r := range rows {
		modes[[2]string{r.Node, r.Measure}]++
	}
	for _, r := range rows {
		if modes[[2]string{r.Node, r.Measure}] > 1 {
			continue
		}
		for stat, v := range map[string]time.Duration{"mean": r.Mean, "p50": r.P50} {
			key := r.Measure + " " + stat
			d.obs[key] = append(d.obs[key], crossover.Obs{Period: p, Window: d.windows, Node: r.Node, Mode: r.Mode, Value: v.Seconds()})
		}
	}
}

// measures are the crossover's rows, in order.
var measures = []string{
	probe.MeasureTCPConnect + " mean", probe.MeasureTCPConnect + " p50",
	probe.MeasureTCPRoundTrip + " mean", probe.MeasureTCPRoundTrip + " p50",
	probe.MeasureUDPRoundTrip + " mean", probe.MeasureUDPRoundTrip + " p50",
}

// printMeasurements is the closing report: first the crossover's
// difference ebpf − iptables with its interval, then what each node
// measured in each period, then (secondary) each period's table per mode.
func (d *demo) printMeasurements() {
	d.begin("A/B result: ebpf − iptables through the ClusterIP, paired by %s window over both periods (95%% confidence interval)", window)
	ms := func(v float64) string { return fmt.Sprintf("%+.3f ms", v*1e3) }
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "measure\tebpf − iptables\t95% CI\tperiod 1\tperiod 2\twindows\t\tverdict")
	type named struct {
		measure string
		r       crossover.Result
	}
	var results []named
	for _, m := range measures {
		r, err := crossover.Estimate(d.obs[m], "ebpf", "iptables", 0.95)
		if err != nil {
			fmt.Fprintf(tw, "%s\t\t\t\t\t\t\t%v\n", m, err)
			continue
		}
		results = append(results, named{m, r})
		var per []string
		n := 0
		for _, p := range r.Periods {
			per = append(per, ms(p.Mean))
			n += p.Windows
		}
		for len(per) < 2 {
			per = append(per, "-")
		}
		fmt.Fprintf(tw, "%s\t%s\t[%s, %s]\t%s\t%s\t%d\t\t%s\n", m, ms(r.Diff), ms(r.Low), ms(r.High), per[0], per[1], n, verdict(r))
	}
	d.check(tw.Flush())
	d.printBlock(b.String())
	d.logf("period 1, 2: the mean of the windows' differences in each period; the node effect enters them with opposite signs")
	d.logf("and cancels in their average, while the two nodes' shared load cancels within each window (docs/ab-testing.md).")

	d.begin("What each node measured in each period (mean over its windows, ms)")
	b.Reset()
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	if len(results) > 0 {
		fmt.Fprint(tw, "measure\t")
		for _, c := range results[0].r.Cells {
			fmt.Fprintf(tw, "P%d %s %s\t", c.Period+1, c.Node, c.Mode)
		}
		fmt.Fprintln(tw)
		for _, x := range results {
			fmt.Fprintf(tw, "%s\t", x.measure)
			for _, c := range x.r.Cells {
				fmt.Fprintf(tw, "%.3f\t", c.Mean*1e3)
			}
			fmt.Fprintln(tw)
		}
	}
	d.check(tw.Flush())
	d.printBlock(b.String())

	d.begin("Secondary view: each period's round trips per mode (one node each; compare with care: nodes differ)")
	for i, sums := range d.periods {
		d.logf("period %d:", i+1)
		b.Reset()
		d.check(probe.WriteTable(&b, sums))
		d.printBlock(b.String())
	}
	d.logf("99%% CI: the mean's 99%% confidence interval (mean ± 2.576·σ/√n); p50/p99 interpolated in the histogram's buckets.")
	d.logf("Both nodes and all servers share this machine's CPUs: the A/B result above is the comparison to read.")
}

// verdict says what the interval allows one to conclude.
func verdict(r crossover.Result) string {
	v := "no difference measured: 0 is within the interval"
	switch {
	case r.High < 0:
		v = fmt.Sprintf("ebpf faster, by %.3f to %.3f ms", -r.High*1e3, -r.Low*1e3)
	case r.Low > 0:
		v = fmt.Sprintf("ebpf slower, by %.3f to %.3f ms", r.Low*1e3, r.High*1e3)
	}
	if !r.Balanced {
		v += " (unbalanced: a node missed a mode, node effects may remain)"
	}
	return v
}

func (d *demo) printBlock(s string) {
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		d.logf("%s", l)
	}
}

func (d *demo) tour() {
	d.begin("curl http://web/ (the ClusterIP) from a pod on each node: on node1 connect() picks a backend in the kernel (ebpf), on node2 iptables DNATs it")
	d.curlFromEachNode(4)
	d.showDatapaths()
	d.measure(0)

	d.begin("Swapping the nodes' modes: relabel each node, one at a time; the DaemonSet controller moves it to the other DaemonSet")
	for _, n := range d.c.Nodes {
		mode := otherMode(d.modes[n.Name])
		d.kubectl("label", "node", n.Name, localcluster.DesiredModeLabel+"="+mode, "--overwrite")
		old := d.c.ProxyDaemonSet(n.Name)
		start := time.Now()
		ds, _, err := d.c.SyncProxy(d.ctx, n.Name, d.binary)
		d.check(err)
		d.modes[n.Name] = mode
		d.logf("%s: %s's pod deleted (SIGTERM: its datapath keeps serving until the new one does), %s's pod synced, %s after the label",
			n.Name, old, ds, time.Since(start).Round(time.Millisecond))
	}
	d.waitServed("web-")
	d.kubectl("get", "nodes", "-L", localcluster.DesiredModeLabel, "-L", nodelabel.Label)
	d.curlFromEachNode(2)
	d.showDatapaths()
	d.measure(1)

	d.begin("Zero endpoints (every web pod unready): connect() is refused at once in both modes, not a timeout")
	d.setWebReady(false)
	d.waitRefused()
	d.showRefusal()
}

// showDatapaths shows each node's datapath: the eBPF programs attached in
// its cgroup (none once a node has left the ebpf mode: it waits for that),
// and on the iptables node kube-proxy's rules for default/web.
func (d *demo) showDatapaths() {
	for _, n := range d.c.Nodes {
		mode := d.modes[n.Name]
		var count int
		d.waitFor("the eBPF programs of "+n.Name+" to match its mode", func() bool {
			var err error
			count, err = testnet.CountAttachedPrograms(n.Cgroup)
			d.check(err)
			return (count > 0) == (mode == "ebpf")
		})
		d.logf("%s (%s): eBPF programs attached: %d", n.Name, mode, count)
		if mode != "iptables" {
			continue
		}
		save, err := exec.Command("ip", "netns", "exec", n.NetNS, "iptables-nft-save", "-t", "nat").Output()
		d.check(err)
		var rules []string
		for _, l := range strings.Split(string(save), "\n") {
			if strings.Contains(l, "default/web") && (strings.HasPrefix(l, "-A KUBE-SERVICES") || strings.HasPrefix(l, "-A KUBE-SVC")) {
				rules = append(rules, l)
			}
		}
		d.logf("%s (%s): kube-proxy's rules for default/web in its nat table:", n.Name, mode)
		for _, l := range rules {
			d.logf("  %s", l)
		}
	}
}

// startProxies installs manifests/overlays/ab and runs, on each node, the
// pod of the DaemonSet its desired-mode label selects.
func (d *demo) startProxies() {
	d.begin("Labelling the nodes for an A/B: node1 %s=%s, node2 %s=%s", localcluster.DesiredModeLabel, firstModes["node1"],
		localcluster.DesiredModeLabel, firstModes["node2"])
	d.modes = map[string]string{}
	for _, n := range d.c.Nodes {
		d.modes[n.Name] = firstModes[n.Name]
		d.kubectl("label", "node", n.Name, localcluster.DesiredModeLabel+"="+d.modes[n.Name], "--overwrite")
	}

	d.begin("Installing manifests/overlays/ab as a user does: one DaemonSet per mode, selected by that label, in an overlay of your own that sets the API server's address")
	overlay, err := d.c.ApplyOverlay(d.ctx, "manifests", "ab")
	d.check(err)
	file := filepath.Join(overlay, "kustomization.yaml")
	b, err := os.ReadFile(file)
	d.check(err)
	d.logf("$ cat %s", file)
	d.printBlock(string(b))
	d.logf("$ kubectl apply -k %s   (ServiceAccount, ClusterRole, the address's ConfigMap, DaemonSets %s and %s)", overlay,
		localcluster.ABDaemonSets["ebpf"], localcluster.ABDaemonSets["iptables"])

	d.begin("Running on each node the pod of the DaemonSet that selects it, as the DaemonSet controller and a kubelet would")
	d.logf("(no kubelet runs here, so the DaemonSets make no pods: the demo runs the image on each node as a kubelet and a runtime would,")
	d.logf(" chrooted into its root filesystem, from its entrypoint, with the ServiceAccount's token, the container's environment,")
	d.logf(" args, mounts and capabilities, in the node's cgroup)")
	for _, n := range d.c.Nodes {
		ds, _, err := d.c.SyncProxy(d.ctx, n.Name, d.binary)
		d.check(err)
		d.logf("%s: %s synced (log %s)", n.Name, ds, d.c.ProxyLog(n.Name))
	}
	d.waitModes()
	d.kubectl("get", "nodes", "-L", localcluster.DesiredModeLabel, "-L", nodelabel.Label)
}

func (d *demo) addPod(name, node string, labels map[string]string) *localcluster.Pod {
	p, err := d.c.AddPod(d.ctx, localcluster.PodSpec{Name: name, Node: node, Labels: labels,
		Command:   d.c.Stack.ServeArgs(name+" on "+node, "tcp:8080"),
		ReadyLine: "ready"})
	d.check(err)
	d.logf("pod %s on %s at %s", p.Name, p.Node, p.IP)
	return p
}

func (d *demo) curl(node string) (string, error) {
	out, err := d.clients[node].Output(d.ctx, "curl", "-sS", "--max-time", "2", "http://"+d.vip+"/")
	if err != nil {
		if i := strings.Index(err.Error(), "curl:"); i >= 0 {
			return "", fmt.Errorf("%s", strings.TrimSpace(err.Error()[i:]))
		}
		return "", err
	}
	return strings.TrimSpace(out), nil
}

func (d *demo) curlFromEachNode(n int) {
	for _, node := range []string{"node1", "node2"} {
		d.logf("from client-%s (%s mode): curl http://%s/", node, d.modes[node], d.vip)
		for range n {
			out, err := d.curl(node)
			if err != nil {
				d.logf("  %v", err)
				continue
			}
			d.logf("  answered by %s", out)
		}
	}
}

func (d *demo) setWebReady(ready bool) {
	for i := range 3 {
		d.check(d.c.SetPodReady(d.ctx, "default", fmt.Sprintf("web-%d", i+1), ready))
	}
	d.logf("web-1, web-2, web-3 Ready=%v (written through the pods' status, as a kubelet would)", ready)
}

// connect is one TCP connect to the web VIP by the test helper, which
// names the errno, unlike curl.
func (d *demo) connect(node string) string {
	out, err := d.clients[node].Output(d.ctx, testnet.Helper("tcp", d.vip+":80", "1")...)
	d.check(err)
	return strings.TrimSpace(out)
}

func (d *demo) waitServed(prefix string) {
	for _, node := range []string{"node1", "node2"} {
		d.waitFor("web to answer from "+node, func() bool { out, _ := d.curl(node); return strings.HasPrefix(out, prefix) })
	}
}

func (d *demo) waitRefused() {
	for _, node := range []string{"node1", "node2"} {
		d.waitFor("a refusal on "+node, func() bool { return d.connect(node) == "err connection refused" })
	}
}

func (d *demo) showRefusal() {
	for _, node := range []string{"node1", "node2"} {
		start := time.Now()
		_, err := d.curl(node)
		d.logf("from client-%s (%s mode): %v (after %v)", node, d.modes[node], err, time.Since(start).Round(time.Millisecond))
	}
}

func (d *demo) waitFor(what string, ok func() bool) {
	deadline := time.Now().Add(90 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			d.fail(fmt.Errorf("waited 90s for %s", what))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (d *demo) kubectl(args ...string) {
	out, err := d.c.Kubectl(d.ctx, args...)
	d.check(err)
	d.logf("$ kubectl %s", strings.Join(args, " "))
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		d.logf("%s", l)
	}
}

// startPrometheus starts Prometheus in node1's namespace, scraping both
// proxies (job kube-proxy) and evaluating the shipped alerting rules, and a
// forwarder on this machine's loopback into it: a way in, no route out.
func (d *demo) startPrometheus(clusterBinary, listen string) {
	d.begin("Starting Prometheus (Debian's) in %s, scraping both proxies as job kube-proxy, with a forwarder on %s", d.c.Nodes[0].NetNS, listen)
	var probeTargets []localcluster.ScrapeTarget
	for _, p := range append(append([]*localcluster.Pod{}, d.probeClients...), d.probeServers...) {
		probeTargets = append(probeTargets, localcluster.ScrapeTarget{
			Address: p.IP.String() + ":" + probeMetricsPort,
			Labels:  map[string]string{"instance": p.Name, "pod": p.Name, "node": p.Node, "namespace": p.Namespace},
		})
	}
	d.check(d.c.StartPrometheus(d.ctx, localcluster.PrometheusOptions{
		RuleFiles:    []string{"manifests/monitoring/prometheus/kube-bpf-proxy-rules.yaml"},
		ProbeTargets: probeTargets,
	}))
	d.check(d.c.StartForwarder("forward-prometheus", []string{clusterBinary, "--dir", d.c.Dir, "forward",
		"--listen", listen, "--to", localcluster.PrometheusAddr, "--node", d.c.Nodes[0].Name}))
	d.promURL = "http://" + listen
	d.waitFor("Prometheus through the forwarder on "+listen, func() bool {
		resp, err := http.Get(d.promURL + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

func (d *demo) printAccess() {
	fmt.Printf("\nThe demo cluster is up: kube-bpf-proxy serves node1 in ebpf mode and node2 in iptables mode (manifests/overlays/ab).\n")
	fmt.Printf("  kubeconfig: %s\n", d.c.AdminKubeconfig)
	fmt.Printf("  the API server (%s) lives in network namespace %s, so run kubectl there:\n", d.c.Server, d.c.Nodes[0].NetNS)
	fmt.Printf("    sudo ip netns exec %s %s --kubeconfig %s get endpointslices\n", d.c.Nodes[0].NetNS,
		filepath.Join(d.c.KubeBin, "kubectl"), d.c.AdminKubeconfig)
	fmt.Printf("  or through the helper (same kubectl version as the API server):\n")
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh kubectl get pods -o wide\n", d.dir)
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh exec client-node1 -- curl -s http://%s/\n", d.dir, d.vip)
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh add-pod web-4 --node node1 --labels app=web\n", d.dir)
	fmt.Printf("  swap a node's mode, as the A/B does halfway (docs/ab-testing.md):\n")
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh kubectl label node node1 %s=iptables --overwrite\n", d.dir, localcluster.DesiredModeLabel)
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh proxy sync --node node1   (what the DaemonSet controller and kubelet would do)\n", d.dir)
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh kubectl get nodes -L %s -L %s\n", d.dir, localcluster.DesiredModeLabel, nodelabel.Label)
	if d.promURL != "" {
		fmt.Printf("  Prometheus: %s (in %s, forwarded to this machine's loopback; jobs kube-proxy and kube-bpf-proxy-probe, the shipped alerting rules)\n",
			d.promURL, d.c.Nodes[0].NetNS)
		fmt.Printf("  Grafana dashboards: in your Grafana, add %s as a Prometheus data source, then Dashboards > New > Import:\n", d.promURL)
		files, _ := filepath.Glob("manifests/monitoring/dashboards/*.json")
		for _, f := range files {
			fmt.Printf("    %-55s %s\n", f, dashboardTitle(f))
		}
	}
	fmt.Printf("  logs: %s\n", filepath.Join(d.c.Dir, "logs"))
	fmt.Printf("  remove it all: sudo make demo-down\n")
}

// teardown removes the proxies' datapaths and the cluster; it is safe on a
// half-made or absent cluster.
func (d *demo) teardown() {
	c, err := localcluster.Open(d.dir)
	if err != nil {
		if d.c == nil {
			return // nothing was made
		}
		c = d.c
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, n := range c.Nodes {
		if c.ProxyRunning(n.Name) {
			_, _ = c.SignalProxy(n.Name, syscall.SIGTERM, 10*time.Second)
		}
		if err := c.CleanupProxy(ctx, n.Name, d.binary); err != nil {
			fmt.Fprintln(os.Stderr, "demo: teardown:", err)
		}
	}
	if err := localcluster.Down(c.Dir); err != nil {
		fmt.Fprintln(os.Stderr, "demo: teardown:", err)
		return
	}
	if c.Image != nil {
		_ = os.RemoveAll(filepath.Dir(c.Image.Root))
	}
}

// unpackImage checks the image archive and unpacks it into a new directory
// of the cluster's, which teardown removes.
func (d *demo) unpackImage() *localcluster.Image {
	d.logf("image %s, unpacked as a runtime would", d.image)
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		d.fail(err)
	}
	dir, err := os.MkdirTemp(d.dir, "image-")
	if err != nil {
		d.fail(err)
	}
	root := filepath.Join(dir, "rootfs")
	entrypoint, err := ociimage.Unpacked(d.image, root)
	if err != nil {
		_ = os.RemoveAll(dir)
		d.fail(fmt.Errorf("unpacking the image (make image builds it): %w", err))
	}
	return &localcluster.Image{Root: root, Entrypoint: entrypoint}
}

func kubeVersion(kubeBin string) string {
	out, err := exec.Command(filepath.Join(kubeBin, "kube-apiserver"), "--version").Output()
	if err != nil {
		return "(version unknown)"
	}
	return strings.TrimPrefix(strings.TrimSpace(string(out)), "Kubernetes ")
}

func errWith(err error, out []byte) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
}

// dashboardTitle reads a dashboard JSON's title, for the import lines.
func dashboardTitle(file string) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return ""
	}
	var d struct {
		Title string `json:"title"`
	}
	if json.Unmarshal(b, &d) != nil {
		return ""
	}
	return fmt.Sprintf("%q", d.Title)
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
