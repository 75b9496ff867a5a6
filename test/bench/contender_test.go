package bench

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func TestMain(m *testing.M) { testnet.Main(m, nil) }

// repoRoot is the repository, from this package's directory.
const repoRoot = "../.."

const (
	serverPort = 8080
	bgNS       = "bench-background"
)

// benchEnv is a cluster with one server pod on node2 and one client pod on
// node1 (so every contender's path crosses nodes, through the Node
// addresses kube-proxy reads).
type benchEnv struct {
	c              *localcluster.Cluster
	binary         string
	kubeProxy      string
	server, client *localcluster.Pod
}

func newBenchEnv(t *testing.T) *benchEnv {
	t.Helper()
	testnet.Require(t)
	kubeBin := os.Getenv("KUBE_BIN")
	if kubeBin == "" {
		t.Skip("KUBE_BIN is unset: set it to the directory hack/kube-build.sh prints (it also builds kube-proxy)")
	}
	kubeProxy := filepath.Join(kubeBin, "kube-proxy")
	if _, err := os.Stat(kubeProxy); err != nil {
		t.Skipf("%v: hack/kube-build.sh builds kube-proxy", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	binary := filepath.Join(t.TempDir(), "kube-bpf-proxy")
	if out, err := exec.Command("go", "build", "-o", binary, repoRoot+"/cmd/kube-bpf-proxy").CombinedOutput(); err != nil {
		t.Fatalf("building kube-bpf-proxy: %v\n%s", err, out)
	}
	dir := filepath.Join(t.TempDir(), "cluster")
	c, err := localcluster.Up(ctx, localcluster.Options{Dir: dir, KubeBin: kubeBin, Progress: t.Logf})
	if err != nil {
		t.Fatalf("starting the local cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(dir, "logs", "*proxy*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				if len(b) > 4000 {
					b = b[len(b)-4000:]
				}
				t.Logf("--- tail of %s:\n%s", l, b)
			}
		}
		if err := localcluster.Down(dir); err != nil {
			t.Errorf("taking the cluster down: %v", err)
		}
	})
	e := &benchEnv{c: c, binary: binary, kubeProxy: kubeProxy}
	if e.server, err = c.AddPod(ctx, localcluster.PodSpec{Name: "server", Node: "node2",
		Command: testnet.Helper("serve", "server", fmt.Sprintf("tcp:%d", serverPort)), ReadyLine: "ready"}); err != nil {
		t.Fatal(err)
	}
	if e.client, err = c.AddPod(ctx, localcluster.PodSpec{Name: "client", Node: "node1",
		Command: testnet.Helper("serve", "client", "tcp:80"), ReadyLine: "ready"}); err != nil {
		t.Fatal(err)
	}
	return e
}

// connect makes one connection from the client pod and returns its result
// line ("ok NAME peer=ADDR" or "err MESSAGE").
func (e *benchEnv) connect(ctx context.Context, addr string) string {
	out, err := e.client.Output(ctx, testnet.Helper("tcp", addr, "1")...)
	if err != nil {
		return "err " + err.Error()
	}
	return strings.TrimSpace(out)
}

// TestContenders runs every contender in turn over 50 background Services:
// each one's client reaches the last Service, exports kube-proxy's sync
// histogram, and leaves nothing behind.
func TestContenders(t *testing.T) {
	e := newBenchEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	bulk, err := BulkClient(e.c.Config)
	if err != nil {
		t.Fatal(err)
	}
	addrs := []netip.Addr{e.server.IP}
	last, err := Populate(ctx, bulk, nil, bgNS, 50, 1, addrs, serverPort, 8, nil)
	if err != nil {
		t.Fatal(err)
	}
	direct := netip.AddrPortFrom(e.server.IP, serverPort).String()
	if got := e.connect(ctx, direct); !strings.HasPrefix(got, "ok server") {
		t.Fatalf("the server pod at %s is not reachable directly: %s", direct, got)
	}

	// What kube-proxy may write machine-wide: nf_conntrack_max (only
	// from the initial namespace; --conntrack-max-per-core=0 keeps it
	// away) and the conntrack hash size.
	machineSysctls := []string{"/proc/sys/net/netfilter/nf_conntrack_max", "/sys/module/nf_conntrack/parameters/hashsize"}
	machineBefore := readFiles(t, machineSysctls)

	o := ContenderOptions{Binary: e.binary, KubeProxy: e.kubeProxy, ManifestsDir: filepath.Join(repoRoot, "manifests")}
	for _, name := range results.AllContenders {
		t.Run(name, func(t *testing.T) {
			k, err := NewContender(e.c, name, o)
			if err != nil {
				t.Fatal(err)
			}
			if k.Name() != name {
				t.Errorf("Name() = %q, want %q", k.Name(), name)
			}
			started := time.Now()
			if err := k.Start(ctx); err != nil {
				t.Fatal(err)
			}
			stopped := false
			t.Cleanup(func() {
				if !stopped {
					_ = k.Stop(context.Background())
				}
			})
			if name == results.Direct {
				if len(k.PIDs()) != 0 || k.MetricsAddr() != "" {
					t.Errorf("direct: PIDs %v, MetricsAddr %q: want none", k.PIDs(), k.MetricsAddr())
				}
				if got := e.connect(ctx, last); strings.HasPrefix(got, "ok") {
					t.Errorf("direct: the ClusterIP %s is served with no proxy: %s", last, got)
				}
			} else {
				var got string
				if !eventually(90*time.Second, func() bool {
					got = e.connect(ctx, last)
					return strings.HasPrefix(got, "ok server")
				}) {
					t.Fatalf("%s: the client never reached the last Service %s; last: %s", name, last, got)
				}
				t.Logf("%s: the last of 50 Services served %s after Start", name, time.Since(started).Round(10*time.Millisecond))
				e.checkRunning(ctx, t, k)
				for _, n := range e.c.Nodes {
					out, err := e.c.NodeOutput(ctx, n.Name, "sh", "-c", "grep -H . /proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established "+
						"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait /proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal "+
						"/proc/sys/net/ipv4/conf/all/route_localnet")
					if err != nil {
						t.Error(err)
					}
					t.Logf("%s: sysctls in %s's namespace:\n%s", name, n.Name, out)
				}
			}
			if after := readFiles(t, machineSysctls); fmt.Sprint(after) != fmt.Sprint(machineBefore) {
				t.Errorf("%s changed the machine's %v from %v to %v", name, machineSysctls, machineBefore, after)
			}
			stopped = true
			if err := k.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			for _, n := range e.c.Nodes {
				out, err := e.c.NodeOutput(ctx, n.Name, "cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
					"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait", "/proc/sys/net/ipv4/conf/all/route_localnet")
				if err != nil {
					t.Error(err)
				} else if got := strings.Fields(out); fmt.Sprint(got) != "[432000 60 0]" {
					t.Errorf("after Stop, %s's conntrack timeouts and route_localnet are %v, want a new namespace's [432000 60 0]", n.Name, got)
				}
			}
			if len(k.PIDs()) != 0 {
				t.Errorf("after Stop: PIDs %v", k.PIDs())
			}
			if got := e.connect(ctx, last); strings.HasPrefix(got, "ok") {
				t.Errorf("after Stop: the ClusterIP %s is still served: %s", last, got)
			}
		})
	}
}

// checkRunning checks a proxy contender's processes and metrics on every
// node.
func (e *benchEnv) checkRunning(ctx context.Context, t *testing.T, k Contender) {
	t.Helper()
	pids := k.PIDs()
	for _, n := range e.c.Nodes {
		pid, ok := pids[n.Name]
		if !ok {
			t.Errorf("no PID on %s: %v", n.Name, pids)
			continue
		}
		// The PID is the proxy itself, not a wrapper (nsenter, unshare
		// and the mount script exec it).
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil {
			t.Errorf("PID %d on %s: %v", pid, n.Name, err)
		} else if want := map[bool]string{true: "kube-proxy", false: "kube-bpf-proxy"}[strings.HasPrefix(k.Name(), "kube-proxy")]; filepath.Base(exe) != want {
			t.Errorf("PID %d on %s runs %s, want %s", pid, n.Name, exe, want)
		}
		// The histogram has a sample (and so a series) once the node's
		// proxy has synced, which the client on node1 does not wait for.
		var last string
		if !eventually(30*time.Second, func() bool {
			code, body, err := e.c.NodeGet(ctx, n.Name, k.MetricsAddr(), "/metrics")
			last = fmt.Sprintf("status %d, error %v", code, err)
			return err == nil && code == 200 && strings.Contains(body, "kubeproxy_sync_proxy_rules_duration_seconds_count")
		}) {
			t.Errorf("GET /metrics on %s at %s: no kubeproxy_sync_proxy_rules_duration_seconds (last: %s)", n.Name, k.MetricsAddr(), last)
		}
	}
}

// TestPopulate checks the Services Populate and CreateBatch make, and that
// Populate converges on the count asked for in both directions.
func TestPopulate(t *testing.T) {
	e := newBenchEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bulk, err := BulkClient(e.c.Config)
	if err != nil {
		t.Fatal(err)
	}
	addrs := []netip.Addr{netip.MustParseAddr("10.244.2.50"), netip.MustParseAddr("10.244.2.51"), netip.MustParseAddr("10.244.2.52")}
	count := func() int {
		l, err := listSet(ctx, bulk, bgNS, setBackground, false)
		if err != nil {
			t.Fatal(err)
		}
		return len(l)
	}
	for _, tc := range []struct {
		name string
		n    int
	}{{"create", 30}, {"shrink", 20}, {"grow", 25}, {"same", 25}} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			last, err := Populate(ctx, bulk, nil, bgNS, tc.n, 2, addrs, 9000, 4, func(done, total int) { calls++ })
			if err != nil {
				t.Fatal(err)
			}
			if got := count(); got != tc.n {
				t.Errorf("%d Services, want %d", got, tc.n)
			}
			svc, err := bulk.CoreV1().Services(bgNS).Get(ctx, backgroundName(tc.n-1), metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if want := svc.Spec.ClusterIP + ":9000"; last != want {
				t.Errorf("last = %q, want %q", last, want)
			}
			if tc.name == "same" && calls != 0 {
				t.Errorf("nothing to do, but progress was called %d times", calls)
			}
		})
	}
	// The round robin: bg-00001's endpoints are the third and first
	// address.
	slice, err := bulk.DiscoveryV1().EndpointSlices(bgNS).Get(ctx, "bg-00001", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, ep := range slice.Endpoints {
		got = append(got, ep.Addresses[0])
	}
	if want := []string{"10.244.2.52", "10.244.2.50"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("bg-00001's endpoints %v, want %v", got, want)
	}

	vips, err := CreateBatch(ctx, bulk, bgNS, 5, 1, addrs, 9000, 4)
	if err != nil {
		t.Fatal(err)
	}
	if len(vips) != 5 || vips[4] == "" {
		t.Fatalf("CreateBatch returned %v", vips)
	}
	if err := DeleteBatch(ctx, bulk, bgNS, 4); err != nil {
		t.Fatal(err)
	}
	if l, err := listSet(ctx, bulk, bgNS, setBatch, false); err != nil || len(l) != 0 {
		t.Errorf("after DeleteBatch: %v %v", l, err)
	}
	if got := count(); got != 25 {
		t.Errorf("DeleteBatch touched the background: %d left, want 25", got)
	}

	// The timing this machine gives, for the report (KBP_BENCH_SCALE=N).
	if n := os.Getenv("KBP_BENCH_SCALE"); n != "" {
		var size int
		fmt.Sscan(n, &size)
		// Its own time: 10k Services take minutes on 2 shared cores.
		ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
		defer cancel()
		start := time.Now()
		if _, err := Populate(ctx, bulk, nil, "bench-scale", size, 10, []netip.Addr{
			netip.MustParseAddr("10.244.2.1"), netip.MustParseAddr("10.244.2.2"), netip.MustParseAddr("10.244.2.3"),
			netip.MustParseAddr("10.244.2.4"), netip.MustParseAddr("10.244.2.5"), netip.MustParseAddr("10.244.2.6"),
			netip.MustParseAddr("10.244.2.7"), netip.MustParseAddr("10.244.2.8"), netip.MustParseAddr("10.244.2.9"),
			netip.MustParseAddr("10.244.2.10"), netip.MustParseAddr("10.244.2.11"), netip.MustParseAddr("10.244.2.12"),
		}, 80, 32, nil); err != nil {
			t.Fatal(err)
		}
		t.Logf("Populate: %d Services x 10 endpoints in %s", size, time.Since(start).Round(time.Millisecond))
	}
}

// readFiles returns the contents of files (sysctls).
func readFiles(t *testing.T, files []string) []string {
	t.Helper()
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, strings.TrimSpace(string(b)))
	}
	return out
}

func eventually(timeout time.Duration, ok func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if ok() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestBackgroundClusterIP: the background's addresses stay inside the
// cluster's service range, above the static band and distinct.
func TestBackgroundClusterIP(t *testing.T) {
	cidr := netip.MustParsePrefix(localcluster.ServiceCIDR)
	seen := map[netip.Addr]bool{}
	for _, i := range []int{0, 1, 255, 256, 59999} {
		a := backgroundClusterIP(model.IPv4, i)
		if !cidr.Contains(a) || seen[a] {
			t.Errorf("Service %d: %s (in %s: %v, repeated: %v)", i, a, cidr, cidr.Contains(a), seen[a])
		}
		seen[a] = true
	}
	if got := backgroundClusterIP(model.IPv4, 0).String(); got != "10.96.4.0" {
		t.Errorf("first address %s, want 10.96.4.0 (above the static band)", got)
	}
	if got := backgroundClusterIP(model.IPv4, 59999).String(); got != "10.96.238.95" {
		t.Errorf("last address %s, want 10.96.238.95", got)
	}
	// The IPv6 rows' twins, in the IPv6 Service range.
	cidr6 := netip.MustParsePrefix(localcluster.ServiceCIDR6)
	for i, want := range map[int]string{0: "fd00:96::400", 59999: "fd00:96::ee5f"} {
		if got := backgroundClusterIP(model.IPv6, i); got.String() != want || !cidr6.Contains(got) {
			t.Errorf("IPv6 Service %d: %s, want %s in %s", i, got, want, cidr6)
		}
	}
}
