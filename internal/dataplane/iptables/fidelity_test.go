package iptables

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// The iptables fidelity test: upstream kube-proxy v1.36.3 and this mode,
// each in a network namespace of its own that looks like the same node,
// render the same Services read from one real API server (so their
// ClusterIPs and allocated node ports are the same, and need no
// normalising); their iptables-save outputs must be the same but for the
// differences listed in allowedDifferences, each with its reason. Any other
// difference fails the test, with the lines that differ.
//
// The differences issue 12 found are closed, so they are not in the table:
// the option order of the jumps from the built-in chains, the nfacct match
// on KUBE-FORWARD's INVALID drop (and on the localhost node port rules),
// KUBE-FIREWALL's localnet guard with its jumps, and the KUBE-PROXY-CANARY
// chains. Not compared, for want of a setup: kube-proxy's large-cluster
// mode (above 1000 endpoints both leave the per-endpoint comments out, see
// TestLargeClusterDropsEndpointComments).
//
// IPv6: kube-proxy runs dual-stack wherever ip6tables and the kernel's
// IPv6 work, whatever the cluster, so its IPv6 proxier writes its rules
// into ip6tables beside the IPv4 ones; each variant also compares its
// ip6tables-save with that of this mode's IPv6 datapath (Config.Family),
// fed by an IPv6 Tracker from the same objects, in the same namespace.
// The control plane is single-stack IPv4, so the IPv6 rules hold no
// Service: what is compared is every chain, jump, canary, the
// KUBE-FORWARD, KUBE-POSTROUTING and KUBE-NODEPORTS rules (the jump that
// leaves ::1/128 out) and KUBE-FIREWALL without its IPv4 localnet guard.
// On a dual-stack control plane the same comparison covers IPv6 Services.

// allowedDifferences are the only ways the two dumps may differ. Each is
// applied to both dumps before they are compared.
var allowedDifferences = []struct {
	what, why string
	apply     func(*saveDump)
}{
	{
		"packet and byte counters",
		"they count the traffic each namespace happened to see, not rules",
		func(d *saveDump) { d.zeroCounters() },
	},
	{
		"the order of chain declarations",
		"iptables-nft-save lists chains in the order they were created, which is Go map order in kube-proxy",
		func(d *saveDump) { d.sortChains() },
	},
	{
		"the order of Services in the top-level chains (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES, KUBE-PROXY-FIREWALL)",
		"kube-proxy writes them in Go map order, different at every sync; the order of one Service's rules is kept and compared, " +
			"and so is the place of the jumps to KUBE-NODEPORTS, last in KUBE-SERVICES; among those jumps, one per node port " +
			"address, the order is kube-proxy's set of node addresses, also a Go map (seen both ways in runs of this test)",
		func(d *saveDump) { d.sortServices() },
	},
	{
		"the order of the loadBalancerSourceRanges rules in a KUBE-FW chain",
		"kube-proxy follows the Service's order, the model sorts the ranges (and drops duplicates); every one of them jumps to the " +
			"same KUBE-EXT chain, so their order changes nothing (external IPs and load balancer IPs, also sorted by the model, are " +
			"listed sorted in the test's Services, so a difference in their order fails the test)",
		func(d *saveDump) { d.sortSourceRanges() },
	},
}

// saveDump is an iptables-save output, by table.
type saveDump struct {
	tables []string
	chains map[string][]string            // table -> ":CHAIN POLICY [p:b]" lines
	rules  map[string]map[string][]string // table -> chain -> "-A CHAIN ..." lines, in order
}

func parseDump(out string) *saveDump {
	d := &saveDump{chains: map[string][]string{}, rules: map[string]map[string][]string{}}
	table := ""
	for _, l := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
			d.tables = append(d.tables, table)
			d.rules[table] = map[string][]string{}
		case strings.HasPrefix(l, ":"):
			d.chains[table] = append(d.chains[table], l)
		case strings.HasPrefix(l, "-A "):
			chain, _, _ := strings.Cut(l[3:], " ")
			d.rules[table][chain] = append(d.rules[table][chain], l)
		}
	}
	slices.Sort(d.tables)
	return d
}

var counters = regexp.MustCompile(`\[\d+:\d+\]`)

func (d *saveDump) zeroCounters() {
	for t, cs := range d.chains {
		for i, c := range cs {
			d.chains[t][i] = counters.ReplaceAllString(c, "[0:0]")
		}
	}
}

func (d *saveDump) sortChains() {
	for _, cs := range d.chains {
		slices.Sort(cs)
	}
}

// serviceKey is the service port a top-level rule is for: the first word
// of its comment ("ns/name:port cluster IP", "ns/name:port"). The jumps to
// KUBE-NODEPORTS sort last, among themselves by their text (their node
// port address).
var commentWord = regexp.MustCompile(`--comment "?([^" ]+)`)

func serviceKey(rule string) string {
	if strings.Contains(rule, "kubernetes service nodeports") {
		return "\xff" + rule
	}
	if m := commentWord.FindStringSubmatch(rule); m != nil {
		return m[1]
	}
	return ""
}

func (d *saveDump) sortServices() {
	for _, tc := range [][2]string{{"nat", chainServices}, {"nat", chainNodePorts}, {"filter", chainServices},
		{"filter", chainNodePorts}, {"filter", chainExternalServices}, {"filter", chainProxyFirewall}} {
		rules := d.rules[tc[0]][tc[1]]
		slices.SortStableFunc(rules, func(a, b string) int { return strings.Compare(serviceKey(a), serviceKey(b)) })
	}
}

func (d *saveDump) sortSourceRanges() {
	for chain, rules := range d.rules["nat"] {
		if strings.HasPrefix(chain, prefixFirewallChain) && len(rules) > 1 {
			slices.Sort(rules[:len(rules)-1])
		}
	}
}

// lines is the dump as comparable text: per table its chains, then each
// chain's rules, chains by name.
func (d *saveDump) lines() []string {
	var out []string
	for _, t := range d.tables {
		out = append(out, "*"+t)
		out = append(out, d.chains[t]...)
		names := make([]string, 0, len(d.rules[t]))
		for c := range d.rules[t] {
			names = append(names, c)
		}
		slices.Sort(names)
		for _, c := range names {
			out = append(out, d.rules[t][c]...)
		}
	}
	return out
}

// normalised applies every allowed difference.
func normalised(save string) []string {
	d := parseDump(save)
	for _, a := range allowedDifferences {
		a.apply(d)
	}
	return d.lines()
}

// lineDiff describes how two line lists differ: lines only in one of them,
// or, with the same lines, the first place where their order differs.
func lineDiff(upstream, ours []string) string {
	count := map[string]int{}
	for _, l := range upstream {
		count[l]++
	}
	for _, l := range ours {
		count[l]--
	}
	var b strings.Builder
	for _, l := range upstream {
		if count[l] > 0 {
			fmt.Fprintf(&b, "- %s\n", l)
			count[l]--
		}
	}
	for _, l := range ours {
		if count[l] < 0 {
			fmt.Fprintf(&b, "+ %s\n", l)
			count[l]++
		}
	}
	if b.Len() == 0 {
		for i := range upstream {
			if upstream[i] != ours[i] {
				fmt.Fprintf(&b, "the same lines in another order, from line %d:\n- %s\n+ %s\n", i+1, upstream[i], ours[i])
				break
			}
		}
	}
	return b.String()
}

// fidelityVariant is a kube-proxy configuration and ours.
type fidelityVariant struct {
	name string
	// backend is both proxies' iptables backend.
	backend string
	// args are kube-proxy's flags beyond those of every variant.
	args []string
	cfg  Config
	node model.NodeInfo
}

const (
	fidNodeIP  = "172.29.0.2"
	fidGateway = "172.29.0.1"
	// fidPodCIDR is the node's pod range, in the cluster's.
	fidPodCIDR = "10.244.7.0/24"
)

func fidelityVariants() []fidelityVariant {
	nodeIP := netip.MustParseAddr(fidNodeIP)
	loopback := netip.MustParseAddr("127.0.0.1")
	all := model.NodeInfo{AllLocalAddresses: true, NodePortAddresses: []netip.Addr{nodeIP}, LocalAddresses: []netip.Addr{loopback, nodeIP}}
	listed := model.NodeInfo{NodePortAddresses: []netip.Addr{loopback, nodeIP}, LocalAddresses: all.LocalAddresses}
	off := false
	clusterCIDR := netip.MustParsePrefix(localcluster.ClusterCIDR)
	return []fidelityVariant{
		{
			// kube-proxy as kubeadm runs it.
			name:    "defaults",
			backend: BackendNFT,
			args:    []string{"--cluster-cidr=" + localcluster.ClusterCIDR},
			cfg:     Config{ClusterCIDR: clusterCIDR},
			node:    all,
		},
		{
			// Node ports on listed addresses, 127.0.0.1 among them; no
			// pod range (no masquerading by source, no short-circuit of
			// pods), everything masqueraded.
			name:    "nodeport-addresses-masquerade-all",
			backend: BackendNFT,
			args:    []string{"--nodeport-addresses=127.0.0.0/8,172.29.0.0/16", "--masquerade-all"},
			cfg:     Config{MasqueradeAll: true},
			node:    listed,
		},
		{
			// No node ports on localhost: no route_localnet, an empty
			// KUBE-FIREWALL for kubelet.
			name:    "no-localhost-nodeports",
			backend: BackendNFT,
			args:    []string{"--cluster-cidr=" + localcluster.ClusterCIDR, "--iptables-localhost-nodeports=false"},
			cfg:     Config{ClusterCIDR: clusterCIDR, LocalhostNodePorts: &off},
			node:    all,
		},
		{
			// --detect-local-mode by interface: pods' traffic told by
			// the bridge, or the name prefix of the interface, it comes
			// in on (-i cbr0, -i veth+), not by its source.
			name:    "detect-local-bridge",
			backend: BackendNFT,
			args:    []string{"--detect-local-mode=BridgeInterface", "--pod-bridge-interface=cbr0"},
			cfg:     Config{LocalTraffic: LocalByBridge("cbr0")},
			node:    all,
		},
		{
			// The Node's spec.podCIDRs, which kube-proxy reads at start.
			name:    "detect-local-node-cidr",
			backend: BackendNFT,
			args:    []string{"--detect-local-mode=NodeCIDR"},
			cfg:     Config{LocalTraffic: LocalByCIDR(netip.MustParsePrefix(fidPodCIDR))},
			node:    all,
		},
		{
			name:    "detect-local-interface-prefix",
			backend: BackendNFT,
			args:    []string{"--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=veth"},
			cfg:     Config{LocalTraffic: LocalByInterfacePrefix("veth")},
			node:    all,
		},
		{
			// The legacy backend (x_tables), as on nodes that still use
			// it: kube-proxy runs whichever iptables is first on its PATH.
			name:    "legacy",
			backend: BackendLegacy,
			args:    []string{"--cluster-cidr=" + localcluster.ClusterCIDR},
			cfg:     Config{ClusterCIDR: clusterCIDR},
			node:    all,
		},
	}
}

// TestKernelFidelity compares this mode's rules with upstream kube-proxy's
// for every kind of Service (kindsOfServices, and the API server's own
// kubernetes Service). It starts a control plane (tens of seconds).
func TestKernelFidelity(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a control plane and upstream kube-proxy")
	}
	c := fidelityCluster(t)
	kubeProxy := filepath.Join(c.KubeBin, "kube-proxy")
	if _, err := os.Stat(kubeProxy); err != nil {
		t.Fatalf("upstream kube-proxy: %v (hack/kube-build.sh builds it)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	createFidelityObjects(ctx, t, c)
	services, slices := readBack(ctx, t, c)

	for _, v := range fidelityVariants() {
		t.Run(v.name, func(t *testing.T) {
			upstream, upstream6 := upstreamRules(t, c, kubeProxy, v, services)
			ours, ours6 := ourRules(ctx, t, c, v, services, slices)
			if diff := lineDiff(normalised(upstream), normalised(ours)); diff != "" {
				t.Errorf("our rules differ from kube-proxy's beyond the allowed differences (- kube-proxy, + ours):\n%s", diff)
				t.Logf("kube-proxy's iptables-save:\n%s\nours:\n%s", upstream, ours)
			}
			if diff := lineDiff(normalised(upstream6), normalised(ours6)); diff != "" {
				t.Errorf("our IPv6 rules differ from kube-proxy's beyond the allowed differences (- kube-proxy, + ours):\n%s", diff)
				t.Logf("kube-proxy's ip6tables-save:\n%s\nours:\n%s", upstream6, ours6)
			}
		})
	}
}

// fidelityCluster starts a control plane for the test, removed when it
// ends. $KUBE_BIN names the Kubernetes binaries; without it
// hack/kube-build.sh builds them (minutes the first time, then cached).
func fidelityCluster(t *testing.T) *localcluster.Cluster {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and iptables")
	}
	kubeBin := os.Getenv("KUBE_BIN")
	if kubeBin == "" {
		out, err := exec.Command("../../../hack/kube-build.sh").Output()
		if err != nil {
			t.Fatalf("hack/kube-build.sh: %v", err)
		}
		kubeBin = strings.TrimSpace(string(out))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := filepath.Join(t.TempDir(), "cluster")
	c, err := localcluster.Up(ctx, localcluster.Options{Dir: dir, KubeBin: kubeBin, Progress: t.Logf})
	if err != nil {
		t.Fatalf("starting the control plane: %v", err)
	}
	t.Cleanup(func() {
		if err := localcluster.Down(dir); err != nil {
			t.Errorf("taking the control plane down: %v", err)
		}
	})
	return c
}

// createFidelityObjects creates the node the proxies run as (with its
// address, which kube-proxy reads for its firewall rules), the Services
// with their load balancer status, as a cloud controller writes it, and
// their EndpointSlices, managed by the test.
func createFidelityObjects(ctx context.Context, t *testing.T, c *localcluster.Cluster) {
	t.Helper()
	cs := c.Client
	node, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode,
		Labels: map[string]string{"kubernetes.io/hostname": testNode, "kubernetes.io/os": "linux"}},
		// Read by --detect-local-mode=NodeCIDR only.
		Spec: corev1.NodeSpec{PodCIDR: fidPodCIDR, PodCIDRs: []string{fidPodCIDR}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fidNodeIP}, {Type: corev1.NodeHostName, Address: testNode}}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "fid"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svcs, eps := kindsOfServices()
	for _, s := range svcs {
		status := s.Status
		created, err := cs.CoreV1().Services(s.Namespace).Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("creating Service %s: %v", s.Name, err)
		}
		if len(status.LoadBalancer.Ingress) > 0 {
			created.Status = status
			if _, err := cs.CoreV1().Services(s.Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
				t.Fatalf("writing the load balancer status of %s: %v", s.Name, err)
			}
		}
	}
	for _, e := range eps {
		// Not the EndpointSlice controller's: the Services have no
		// selector, and the slices are the test's.
		e.Labels[discoveryv1.LabelManagedBy] = "kube-bpf-proxy-fidelity-test"
		if _, err := cs.DiscoveryV1().EndpointSlices(e.Namespace).Create(ctx, e, metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating EndpointSlice %s: %v", e.Name, err)
		}
	}
}

// readBack lists every Service and EndpointSlice, as both proxies see them
// (with the node ports and health check node ports the API server
// allocated, and the kubernetes Service).
func readBack(ctx context.Context, t *testing.T, c *localcluster.Cluster) ([]corev1.Service, []discoveryv1.EndpointSlice) {
	t.Helper()
	svcs, err := c.Client.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	eps, err := c.Client.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return svcs.Items, eps.Items
}

// fidelityNetNS makes a network namespace that looks like the node: lo,
// and eth0 with the node's address. If peer is set, eth0's other end is in
// that namespace, with the gateway's address, so that the namespace
// reaches what peer reaches (the API server); else it stays inside.
func fidelityNetNS(t *testing.T, name, peer string) string {
	t.Helper()
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("removing namespace %s: %v: %s", name, err, out)
		}
	})
	run("ip", "-n", name, "link", "set", "lo", "up")
	if peer != "" {
		// The peer's end would go with this namespace, but only once the
		// kernel has dismantled it, after `ip netns del` returns: the
		// next variant's would find it still there.
		run("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "fid0", "netns", peer)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "-n", peer, "link", "del", "fid0").CombinedOutput(); err != nil {
				t.Errorf("removing fid0 from %s: %v: %s", peer, err, out)
			}
		})
		run("ip", "-n", peer, "addr", "add", fidGateway+"/24", "dev", "fid0")
		run("ip", "-n", peer, "link", "set", "fid0", "up")
	} else {
		run("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
		run("ip", "-n", name, "link", "set", "peer0", "up")
	}
	run("ip", "-n", name, "addr", "add", fidNodeIP+"/24", "dev", "eth0")
	run("ip", "-n", name, "link", "set", "eth0", "up")
	if peer != "" {
		run("ip", "-n", name, "route", "add", "default", "via", fidGateway)
	}
	return "/run/netns/" + name
}

// upstreamRules runs kube-proxy in a namespace of its own until it has
// synced every Service, and returns its iptables-save and ip6tables-save.
func upstreamRules(t *testing.T, c *localcluster.Cluster, kubeProxy string, v fidelityVariant, services []corev1.Service) (string, string) {
	t.Helper()
	ns := fidelityNetNS(t, c.Name+"-kp", c.Nodes[0].NetNS)
	dir := t.TempDir()
	logPath := filepath.Join(dir, "kube-proxy.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	args := append([]string{"--net=" + ns, "--", kubeProxy,
		"--kubeconfig=" + c.AdminKubeconfig,
		"--hostname-override=" + testNode,
		"--proxy-mode=iptables",
		// It would set nf_conntrack_max, which only the machine's
		// namespace can, and which every namespace shares.
		"--conntrack-max-per-core=0",
		"--metrics-bind-address=127.0.0.1:10249",
		"--healthz-bind-address=0.0.0.0:10256",
		"--v=2",
	}, v.args...)
	cmd := exec.Command("nsenter", args...)
	cmd.Env = []string{"PATH=" + backendPath(t, v.backend), "HOME=/root", "XTABLES_LOCKFILE=" + filepath.Join(dir, "xtables.lock")}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// In the control plane's cgroup, so that taking it down kills
	// kube-proxy too if this test could not.
	cg, err := unix.Open(filepath.Join(c.Cgroup, "system"), unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cg)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cg, Pdeathsig: syscall.SIGKILL}
	// Its IPv6 proxier syncs with the IPv4 one (the same events).
	names := servicePortNames(services)
	return awaitUpstream(t, cmd, ns, v.backend, logPath, time.Minute, func(save, save6 string) bool {
		return containsAll(save, names) && strings.Contains(save6, chainNodePorts)
	}, nil)
}

// awaitUpstream starts kube-proxy (cmd, logging to logPath) and returns the
// iptables-save and ip6tables-save of its namespace ns once synced accepts
// them and they stayed the same for one more poll (2 s: kube-proxy's
// --iptables-min-sync-period is 1 s). If kube-proxy exits, or timeout
// passes, it fails the test with both dumps, what more says (if not nil)
// and the end of kube-proxy's log. kube-proxy is killed when the test ends.
func awaitUpstream(t *testing.T, cmd *exec.Cmd, ns, backend, logPath string, timeout time.Duration,
	synced func(save, save6 string) bool, more func() string) (string, string) {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting kube-proxy: %v", err)
	}
	// Registered after the namespace's removal, so it runs before it.
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	var save, save6, last string
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		time.Sleep(2 * time.Second)
		save, save6 = iptablesSave(t, ns, backend), ip6tablesSave(t, ns, backend)
		// Timestamps and counters change without a sync.
		stable := strings.Join(normalised(save), "\n") + strings.Join(normalised(save6), "\n")
		if stable == last && synced(save, save6) {
			return save, save6
		}
		last = stable
		if cmd.ProcessState != nil || syscall.Kill(cmd.Process.Pid, 0) != nil {
			break
		}
	}
	log, _ := os.ReadFile(logPath)
	if len(log) > 8000 {
		log = log[len(log)-8000:]
	}
	extra := ""
	if more != nil {
		extra = more() + "\n"
	}
	t.Fatalf("kube-proxy did not sync every Service; its rules:\n%s\n%s\n%sthe end of its log:\n%s", save, save6, extra, log)
	return "", ""
}

// servicePortNames are the service ports' names as kube-proxy's rule
// comments write them ("ns/name:port", "ns/name" for an unnamed port).
func servicePortNames(services []corev1.Service) []string {
	var names []string
	for _, s := range services {
		for _, p := range s.Spec.Ports {
			name := s.Namespace + "/" + s.Name
			if p.Name != "" {
				name += ":" + p.Name
			}
			names = append(names, name)
		}
	}
	return names
}

// containsAll says whether dump names every one of names.
func containsAll(dump string, names []string) bool {
	return !slices.ContainsFunc(names, func(n string) bool { return !strings.Contains(dump, n) })
}

// ourRules syncs this mode's IPv4 and IPv6 datapaths, fed what the model
// makes of the same objects, into a namespace of their own, as kube-proxy's
// two proxiers, and returns their iptables-save and ip6tables-save.
func ourRules(ctx context.Context, t *testing.T, c *localcluster.Cluster, v fidelityVariant, services []corev1.Service, eps []discoveryv1.EndpointSlice) (string, string) {
	t.Helper()
	ns := fidelityNetNS(t, c.Name+"-ours", "")
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	for _, f := range model.Families {
		tr := model.NewTracker(model.WithNodeName(testNode), model.WithFamily(f), model.WithOnSkipped(func(resource, reason string) {
			t.Errorf("the %v model skipped a %s: %s", f, resource, reason)
		}))
		for i := range services {
			tr.UpsertService(&services[i])
		}
		for i := range eps {
			tr.UpsertEndpointSlice(&eps[i])
		}
		snap := tr.Snapshot(true)
		snap.Node = v.node
		cfg := v.cfg
		cfg.Family, cfg.Backend, cfg.NetNS, cfg.LockFile = f, v.backend, ns, lock
		if f == model.IPv6 {
			// No variant names an IPv6 range in --nodeport-addresses:
			// kube-proxy's IPv6 proxier serves node ports on every
			// local IPv6 address then (::/0), as the node information
			// of the IPv6 family says.
			snap.Node = model.NodeInfo{AllLocalAddresses: true, LocalAddresses: []netip.Addr{netip.IPv6Loopback()}}
		}
		d, err := New(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		// Twice: the second full sync finds everything in place and must
		// leave it as it is (no jump inserted twice, no chain lost).
		for range 2 {
			if err := d.Sync(ctx, snap); err != nil {
				t.Fatal(err)
			}
		}
		d.Close()
	}
	return iptablesSave(t, ns, v.backend), ip6tablesSave(t, ns, v.backend)
}

func ip6tablesSave(t *testing.T, ns, backend string) string {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command("nsenter", "--net="+ns, "--", "ip6tables-"+backend+"-save")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("ip6tables-%s-save in %s: %v: %s", backend, ns, err, stderr.String())
	}
	return string(out)
}

func iptablesSave(t *testing.T, ns, backend string) string {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command("nsenter", "--net="+ns, "--", "iptables-"+backend+"-save")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("iptables-%s-save in %s: %v: %s", backend, ns, err, stderr.String())
	}
	return string(out)
}

// backendPath is a PATH whose iptables commands are the backend's: the
// machine's own for nft (its default), a directory of links to
// xtables-legacy-multi for legacy, as kube-proxy's image switches them.
func backendPath(t *testing.T, backend string) string {
	t.Helper()
	const system = "/usr/sbin:/usr/bin:/sbin:/bin"
	if backend == BackendNFT {
		return system
	}
	multi, err := exec.LookPath("xtables-legacy-multi")
	if err != nil {
		t.Fatalf("the legacy backend: %v", err)
	}
	dir := t.TempDir()
	for _, name := range []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"} {
		if err := os.Symlink(multi, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return dir + ":" + system
}
