// Command demo shows kube-bpf-proxy on a real, local Kubernetes control
// plane (internal/localcluster): kube-apiserver, etcd and
// kube-controller-manager with two simulated nodes in network namespaces of
// their own. The proxy runs on both nodes as the DaemonSet would run it,
// with the manifests' ServiceAccount and capabilities; the real EndpointSlice
// controller builds the slices it serves. Nothing leaves the namespaces the
// cluster makes.
//
//	demo            the whole tour, then everything is removed
//	demo --keep     set up (cluster, proxies in ebpf mode, the web Service, the latency probe,
//	                Prometheus with a forwarder on 127.0.0.1:9090) and leave it running
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
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodelabel"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/probe"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/testnet"
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

// probeWindow is how long the probe measures each mode: at the manifests'
// 5 probes a second per client, about 150 requests per node and protocol.
const probeWindow = 30 * time.Second

type demo struct {
	ctx    context.Context
	c      *localcluster.Cluster
	dir    string
	binary string
	step   string
	// vip is web's ClusterIP; clients holds the client pod of each node.
	vip     string
	clients map[string]*localcluster.Pod
	// promURL is Prometheus's address from this machine (--keep).
	promURL string
	// probeClients and probeServers are the latency probe's pods;
	// measured holds its results per mode, for the closing table.
	probeClients, probeServers []*localcluster.Pod
	measured                   []probe.Summary
}

func main() {
	testnet.RunHelperIfRequested(nil)
	keep := flag.Bool("keep", false, "leave the cluster and the proxies running (make demo-up)")
	down := flag.Bool("down", false, "remove the cluster --keep left (make demo-down)")
	dir := flag.String("dir", "_output/demo-cluster", "cluster directory")
	kubeBin := flag.String("kube-bin", os.Getenv("KUBE_BIN"), "directory of the Kubernetes binaries (hack/kube-build.sh)")
	binary := flag.String("binary", "_output/kube-bpf-proxy", "the kube-bpf-proxy binary")
	clusterBinary := flag.String("cluster-binary", "_output/cluster", "hack/cluster's binary, whose forward command --keep runs")
	promListen := flag.String("prometheus-listen", envOr("KBP_PROMETHEUS_LISTEN", "127.0.0.1:9090"), "--keep: where Prometheus is reachable from this machine (a forwarder into node1's namespace)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	bin, _ := filepath.Abs(*binary)
	d := &demo{ctx: ctx, dir: *dir, binary: bin}
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
	c, err := localcluster.Up(d.ctx, localcluster.Options{Dir: d.dir, KubeBin: kubeBin,
		Progress: func(f string, a ...any) { d.logf(f, a...) }})
	d.c = c
	d.check(err)
	d.kubectl("get", "nodes", "-o", "wide")

	d.startProxies("ebpf")

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

// measure lets the probe run for window with the proxies in mode, and keeps
// what it measured in that mode for the closing table.
func (d *demo) measure(mode string, window time.Duration) {
	d.begin("Measuring for %s with the latency probe: ClusterIP round trips from both nodes, %s mode", window, mode)
	// The clients label each request with their node's mode label, which
	// the proxies write after their first sync: requests made before it
	// changed count for the other mode, and are left out of this one's row.
	for _, n := range d.c.Nodes {
		d.waitFor(n.Name+"'s label "+nodelabel.Label+"="+mode, func() bool {
			node, err := d.c.Client.CoreV1().Nodes().Get(d.ctx, n.Name, metav1.GetOptions{})
			return err == nil && node.Labels[nodelabel.Label] == mode
		})
	}
	time.Sleep(2 * time.Second) // the clients' watch of their Node
	before := d.scrapeProbeClients()
	select {
	case <-d.ctx.Done():
		d.fail(d.ctx.Err())
	case <-time.After(window):
	}
	sums, err := probe.Summarize(before, d.scrapeProbeClients())
	d.check(err)
	for _, s := range sums {
		if s.Mode == mode {
			d.measured = append(d.measured, s)
			d.logf("%s %s: %d requests, %d errors, mean %s", s.Mode, s.Protocol, s.Requests, s.Errors, s.Mean.Round(time.Microsecond))
		}
	}
}

// printMeasurements is the closing table: the probe's round trips through
// the ClusterIP in each mode.
func (d *demo) printMeasurements() {
	d.begin("Round trips through the ClusterIP measured by the latency probe, per mode (new TCP connection + HTTP GET; UDP request/reply)")
	var b strings.Builder
	d.check(probe.WriteTable(&b, d.measured))
	for _, l := range strings.Split(strings.TrimRight(b.String(), "\n"), "\n") {
		d.logf("%s", l)
	}
	d.logf("99%% CI: the mean's 99%% confidence interval (mean ± 2.576·σ/√n); p50/p99 interpolated in the histogram's buckets.")
	d.logf("Both nodes and all servers share this machine's CPUs: compare the modes' ratios, not absolute numbers.")
}

func (d *demo) tour() {
	d.begin("curl http://web/ (the ClusterIP) from a pod on each node: each connect() picks a backend in the kernel")
	d.curlFromEachNode(4)
	d.measure("ebpf", probeWindow)

	d.begin("Zero endpoints (every web pod unready): connect() is refused at once, not a timeout")
	d.setWebReady(false)
	d.waitRefused()
	d.showRefusal()

	d.begin("Restarting the proxies with --mode=iptables (SIGTERM: the eBPF datapath keeps serving until the rules do)")
	d.setWebReady(true)
	d.waitServed("web-")
	for _, n := range d.c.Nodes {
		took, err := d.c.SignalProxy(n.Name, syscall.SIGTERM, 5*time.Second)
		d.check(err)
		d.logf("%s: kube-bpf-proxy (ebpf) exited %s after SIGTERM", n.Name, took.Round(time.Millisecond))
	}
	d.startProxies("iptables")
	d.waitServed("web-")
	for _, n := range d.c.Nodes {
		var count int
		d.waitFor("the eBPF programs to go from "+n.Name, func() bool {
			var err error
			count, err = testnet.CountAttachedPrograms(n.Cgroup)
			d.check(err)
			return count == 0
		})
		d.logf("%s: eBPF programs attached now: %d", n.Name, count)
	}
	n1 := d.c.Nodes[0]
	save, err := exec.Command("ip", "netns", "exec", n1.NetNS, "iptables-nft-save", "-t", "nat").Output()
	d.check(err)
	d.logf("kube-proxy's rules for default/web in node1's nat table:")
	for _, l := range strings.Split(string(save), "\n") {
		if strings.Contains(l, "default/web") && (strings.HasPrefix(l, "-A KUBE-SERVICES") || strings.HasPrefix(l, "-A KUBE-SVC")) {
			d.logf("  %s", l)
		}
	}

	d.begin("curl http://web/ again, now through iptables DNAT")
	d.curlFromEachNode(4)
	d.measure("iptables", probeWindow)

	d.begin("iptables mode, zero endpoints: a REJECT rule answers, so connect() is refused too")
	d.setWebReady(false)
	d.waitRefused()
	d.showRefusal()
}

func (d *demo) startProxies(mode string) {
	d.begin("Installing manifests/overlays/%s as a user does: an overlay of your own that sets the API server's address", mode)
	overlay, err := d.c.ApplyOverlay(d.ctx, "manifests", mode)
	d.check(err)
	file := filepath.Join(overlay, "kustomization.yaml")
	b, err := os.ReadFile(file)
	d.check(err)
	d.logf("$ cat %s", file)
	for _, l := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		d.logf("%s", l)
	}
	d.logf("$ kubectl apply -k %s   (ServiceAccount, ClusterRole, the address's ConfigMap, DaemonSet)", overlay)

	d.begin("Running kube-bpf-proxy --mode=%s on node1 and node2 as the DaemonSet's pod would run", mode)
	d.logf("(no kubelet runs here, so the DaemonSet makes no pods: the demo runs the same binary on each node as a kubelet would,")
	d.logf(" with the ServiceAccount's token, the container's environment, args, mounts and capabilities, in the node's cgroup)")
	o, err := d.c.DaemonSetProxyOptions(d.ctx, d.binary)
	d.check(err)
	for _, n := range d.c.Nodes {
		d.check(d.c.StartProxy(d.ctx, n.Name, o))
		d.logf("%s: synced (log %s)", n.Name, d.c.ProxyLog(n.Name))
	}
}

func (d *demo) addPod(name, node string, labels map[string]string) *localcluster.Pod {
	p, err := d.c.AddPod(d.ctx, localcluster.PodSpec{Name: name, Node: node, Labels: labels,
		Command:   testnet.Helper("serve", name+" on "+node, "tcp:8080"),
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
		d.logf("from client-%s: curl http://%s/", node, d.vip)
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
		d.logf("from client-%s: %v (after %v)", node, err, time.Since(start).Round(time.Millisecond))
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
	fmt.Printf("\nThe demo cluster is up, kube-bpf-proxy (ebpf) serves on both nodes.\n")
	fmt.Printf("  kubeconfig: %s\n", d.c.AdminKubeconfig)
	fmt.Printf("  the API server (%s) lives in network namespace %s, so run kubectl there:\n", d.c.Server, d.c.Nodes[0].NetNS)
	fmt.Printf("    sudo ip netns exec %s %s --kubeconfig %s get endpointslices\n", d.c.Nodes[0].NetNS,
		filepath.Join(d.c.KubeBin, "kubectl"), d.c.AdminKubeconfig)
	fmt.Printf("  or through the helper (same kubectl version as the API server):\n")
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh kubectl get pods -o wide\n", d.dir)
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh exec client-node1 -- curl -s http://%s/\n", d.dir, d.vip)
	fmt.Printf("    sudo KBP_CLUSTER_DIR=%s hack/cluster.sh add-pod web-4 --node node1 --labels app=web\n", d.dir)
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
	}
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
