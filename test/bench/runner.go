package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/load"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/report"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// Namespaces of the benchmark's own objects and of the background
// Services.
const (
	benchNamespace      = "bench"
	backgroundNamespace = "bench-bg"
)

// Topology: the study's two nodes, three client pods and twelve servers.
// Each client measures against one server pod on the other node, through
// a Service of its own whose only endpoint is that pod, so that the pod IP
// and the ClusterIP reach the same socket and differ only by translation.
const (
	serverPods = 12
	// churnEvery is how often a background Service's endpoints change
	// while endpoint changes are timed ("while endpoints churn").
	churnEvery = 500 * time.Millisecond
)

var clientNodes = []string{"node1", "node2", "node1"}

// path is one client's way to its server: directly or through its
// Service.
type path struct {
	client *localcluster.Pod
	server *localcluster.Pod
	// direct is the server's pod IP and vip the path Service's ClusterIP,
	// both of the run's family (Config.Family).
	direct, vip netip.Addr
}

func (p path) targets(port int, viaService bool) []string {
	t := []string{net.JoinHostPort(p.direct.String(), strconv.Itoa(port))}
	if viaService {
		t = append(t, net.JoinHostPort(p.vip.String(), strconv.Itoa(port)))
	}
	return t
}

type runner struct {
	cfg Config
	c   *localcluster.Cluster
	api kubernetes.Interface
	// etcd is the background's direct loader; nil unless Config.Load is "etcd".
	etcd *EtcdStore
	prog *progress
	out  *results.Run

	servers []*localcluster.Pod
	paths   []path
	// churnVIP is the name port of the Service whose only endpoint the
	// endpoint-change timing moves between churnPods.
	churnVIP  string
	churnPods [2]*localcluster.Pod
	// lastBackground is the ClusterIP:port of the last background Service
	// created ("" with none).
	lastBackground  string
	backgroundCount int
	// failedAt holds, per contender, the size it could not serve.
	failedAt map[string]int
	// served holds, per contender, the last size it served and its cold
	// start there (Config.SkipProjected).
	served map[string]servedAt
}

type servedAt struct {
	size int
	cold time.Duration
}

func (r *runner) run(ctx context.Context) (*results.Run, error) {
	cfg := r.cfg
	r.failedAt = map[string]int{}
	r.served = map[string]servedAt{}
	r.out = &results.Run{
		Started: time.Now(), Command: cfg.Command, Quick: cfg.Quick,
		Machine:    describeMachine(cfg),
		Contenders: cfg.Contenders, Sizes: cfg.Sizes, Family: cfg.family().String(),
		Topology: results.Topology{Nodes: 2, ClientPods: len(clientNodes), ServerPods: serverPods,
			EndpointsPerService: cfg.EndpointsPerService, Repetitions: cfg.Repetitions},
	}
	r.prog = newProgress(cfg.Progress, 1+len(cfg.Sizes)*(1+len(cfg.Contenders)*stepsPerCell))
	defer r.prog.finish()

	err := r.measure(ctx)
	r.out.Duration = time.Since(r.out.Started)
	if werr := report.Write(cfg.OutDir, r.out); werr != nil {
		err = errors.Join(err, fmt.Errorf("writing the report: %w", werr))
	}
	if !cfg.Keep {
		if derr := r.teardown(); derr != nil {
			err = errors.Join(err, derr)
		}
	}
	return r.out, err
}

// stepsPerCell is the progress line's unit: a cell counts as this many
// steps (start, latency, rates, control plane, stop).
const stepsPerCell = 5

func (r *runner) measure(ctx context.Context) error {
	r.prog.begin("cluster", 0, "starting the control plane, pods and Services")
	if err := r.setUp(ctx); err != nil {
		return fmt.Errorf("setting up the cluster: %w", err)
	}
	r.prog.done(1)
	for i, size := range r.cfg.Sizes {
		r.prog.begin("cluster", size, "creating the background Services")
		if err := r.grow(ctx, size); err != nil {
			return fmt.Errorf("creating %d background Services: %w", size, err)
		}
		r.prog.done(1)
		for _, name := range order(r.cfg.Contenders, i) {
			cell := r.cell(ctx, name, size)
			r.out.Cells = append(r.out.Cells, cell)
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
	}
	return nil
}

// setUp starts the cluster, the server and client pods and the
// benchmark's own Services.
func (r *runner) setUp(ctx context.Context) error {
	o := localcluster.Options{Dir: r.cfg.ClusterDir, KubeBin: r.cfg.KubeBin}
	if r.cfg.family() == model.IPv6 {
		// An IPv6 Service range for the API server and IPv6 pod
		// addresses; IPv4 stays the primary family, so the control
		// plane and the node objects are as in the IPv4 runs.
		o.Stack = localcluster.DualStack
	}
	c, err := localcluster.Up(ctx, o)
	if err != nil {
		return err
	}
	r.c = c
	if r.api, err = BulkClient(c.Config); err != nil {
		return err
	}
	if r.cfg.Load == LoadEtcd {
		r.etcd = NewEtcdStore(c.EtcdHTTPClient(), localcluster.EtcdURL, localcluster.EtcdPrefix)
		r.etcd.Logf = r.prog.note
	}
	for _, ns := range []string{benchNamespace, backgroundNamespace} {
		if _, err := r.api.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating namespace %s: %w", ns, err)
		}
	}
	for i := range serverPods {
		name := fmt.Sprintf("server-%02d", i+1)
		node := c.Nodes[i%len(c.Nodes)].Name
		p, err := c.AddPod(ctx, localcluster.PodSpec{
			Namespace: benchNamespace, Name: name, Node: node,
			Labels:    map[string]string{"app": "bench-server"},
			Command:   []string{r.cfg.Self, "server", "--name", name},
			ReadyLine: load.ServerReadyLine,
		})
		if err != nil {
			return err
		}
		r.servers = append(r.servers, p)
	}
	// servers[i] is on node (i%2)+1: a client on node1 gets a server on
	// node2 and the other way round, each client its own.
	remote := map[string][]*localcluster.Pod{}
	for _, s := range r.servers {
		remote[s.Node] = append(remote[s.Node], s)
	}
	used := map[string]int{}
	for i, node := range clientNodes {
		p, err := c.AddPod(ctx, localcluster.PodSpec{Namespace: benchNamespace, Name: fmt.Sprintf("client-%d", i+1), Node: node})
		if err != nil {
			return err
		}
		if err := tuneClientNamespace(p); err != nil {
			return err
		}
		other := otherNode(node)
		srv := remote[other][used[other]]
		used[other]++
		vip, err := r.createSingleEndpointService(ctx, fmt.Sprintf("path-%d", i+1), srv)
		if err != nil {
			return err
		}
		r.paths = append(r.paths, path{client: p, server: srv, direct: srv.IPOf(r.cfg.family()), vip: vip})
	}
	// The churned Service moves between two servers on node2, seen from
	// client-1 on node1.
	r.churnPods = [2]*localcluster.Pod{remote["node2"][used["node2"]], remote["node2"][used["node2"]+1]}
	vip, err := r.createSingleEndpointService(ctx, "churn", r.churnPods[0])
	if err != nil {
		return err
	}
	r.churnVIP = net.JoinHostPort(vip.String(), strconv.Itoa(load.NamePort))
	return nil
}

func otherNode(n string) string {
	if n == "node1" {
		return "node2"
	}
	return "node1"
}

// tuneClientNamespace lets a client pod open tens of thousands of
// connections a cell: the whole port range, and TIME_WAIT ports reused for
// new connections (safe with timestamps, which Linux sends by default).
// Both settings belong to the pod's own network namespace.
func tuneClientNamespace(p *localcluster.Pod) error {
	for _, kv := range [][2]string{
		{"net.ipv4.ip_local_port_range", "1024 65535"},
		{"net.ipv4.tcp_tw_reuse", "1"},
	} {
		if out, err := exec.Command("ip", "netns", "exec", p.NetNS, "sysctl", "-q", "-w", kv[0]+"="+kv[1]).CombinedOutput(); err != nil {
			return fmt.Errorf("setting %s in pod %s: %w: %s", kv[0], p.Name, err, out)
		}
	}
	return nil
}

// benchPorts are every port of the benchmark's own Services, the same
// numbers on the pod and the ClusterIP.
var benchPorts = []corev1.ServicePort{
	{Name: "echo", Port: load.EchoPort, Protocol: corev1.ProtocolTCP},
	{Name: "sink", Port: load.SinkPort, Protocol: corev1.ProtocolTCP},
	{Name: "udp", Port: load.UDPEchoPort, Protocol: corev1.ProtocolUDP},
	{Name: "name", Port: load.NamePort, Protocol: corev1.ProtocolTCP},
}

// createSingleEndpointService makes a selectorless Service with the
// benchmark's ports whose slice (written here, as a controller would)
// holds one endpoint: pod. In an IPv6 run it is SingleStack IPv6.
func (r *runner) createSingleEndpointService(ctx context.Context, name string, pod *localcluster.Pod) (netip.Addr, error) {
	ports := make([]corev1.ServicePort, len(benchPorts))
	for i, p := range benchPorts {
		p.TargetPort = intstr.FromInt32(p.Port)
		ports[i] = p
	}
	spec := corev1.ServiceSpec{Ports: ports}
	if f := r.cfg.family(); f == model.IPv6 {
		spec.IPFamilyPolicy = ptr.To(corev1.IPFamilyPolicySingleStack)
		spec.IPFamilies = []corev1.IPFamily{corev1.IPFamily(f.String())}
	}
	svc, err := r.api.CoreV1().Services(benchNamespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       spec,
	}, metav1.CreateOptions{})
	if err != nil {
		return netip.Addr{}, fmt.Errorf("creating Service %s: %w", name, err)
	}
	if _, err := r.api.DiscoveryV1().EndpointSlices(benchNamespace).Create(ctx, singleEndpointSlice(name, pod, r.cfg.family()), metav1.CreateOptions{}); err != nil {
		return netip.Addr{}, fmt.Errorf("creating Service %s's EndpointSlice: %w", name, err)
	}
	return netip.ParseAddr(svc.Spec.ClusterIP)
}

// singleEndpointSlice is the slice of family f whose one endpoint is pod.
func singleEndpointSlice(service string, pod *localcluster.Pod, f model.IPFamily) *discoveryv1.EndpointSlice {
	var ports []discoveryv1.EndpointPort
	for _, p := range benchPorts {
		ports = append(ports, discoveryv1.EndpointPort{Name: ptr.To(p.Name), Port: ptr.To(p.Port), Protocol: ptr.To(p.Protocol)})
	}
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:   service,
			Labels: map[string]string{discoveryv1.LabelServiceName: service, discoveryv1.LabelManagedBy: "bench.kube-bpf-proxy.io"},
		},
		AddressType: f.AddressType(),
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{pod.IPOf(f).String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
			NodeName:   ptr.To(pod.Node),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name},
		}},
		Ports: ports,
	}
}

// moveChurned points the churned Service's slice at pod; it returns when
// the API server has answered.
func (r *runner) moveChurned(ctx context.Context, pod *localcluster.Pod) error {
	s := singleEndpointSlice("churn", pod, r.cfg.family())
	cur, err := r.api.DiscoveryV1().EndpointSlices(benchNamespace).Get(ctx, "churn", metav1.GetOptions{})
	if err != nil {
		return err
	}
	s.ResourceVersion = cur.ResourceVersion
	// The trigger time kube-proxy's network programming latency starts
	// from, as the EndpointSlice controller writes it.
	s.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: time.Now().UTC().Format(time.RFC3339Nano)}
	_, err = r.api.DiscoveryV1().EndpointSlices(benchNamespace).Update(ctx, s, metav1.UpdateOptions{})
	return err
}

func (r *runner) serverAddrs() []netip.Addr {
	var a []netip.Addr
	for _, s := range r.servers {
		a = append(a, s.IPOf(r.cfg.family()))
	}
	return a
}

// grow makes the background Services number size. With ebpf in the run,
// its proxies run meanwhile and a client times the last one served after
// the creation finished: the issue's "N Services served within 2 s of
// their creation finishing", measured where creating them costs minutes
// and so cannot be repeated for every contender.
func (r *runner) grow(ctx context.Context, size int) error {
	from := r.backgroundCount
	withEBPF := size > from && slices.Contains(r.cfg.Contenders, results.EBPF)
	var ct Contender
	if withEBPF {
		var err error
		ct, err = NewContender(r.c, results.EBPF, ContenderOptions{
			Binary: r.cfg.Binary, KubeProxy: filepath.Join(r.cfg.KubeBin, "kube-proxy"), ManifestsDir: r.cfg.ManifestsDir,
			ExtraArgs: ourArgsFor(results.EBPF, size+r.cfg.BatchServices, r.cfg.EndpointsPerService),
		})
		if err == nil {
			err = ct.Start(ctx)
		}
		if err == nil {
			_, err = r.coldStart(ctx, time.Now(), r.cfg.SyncTimeout(from))
		}
		if err != nil {
			r.prog.note("ebpf could not be started for the growth to %d Services (not timed): %v", size, err)
			withEBPF = false
		}
	}
	if ct != nil {
		defer func() {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
			defer cancel()
			if err := ct.Stop(sctx); err != nil {
				r.prog.note("stopping ebpf after the growth to %d: %v", size, err)
			}
		}()
	}
	start := time.Now()
	if err := r.populate(ctx, size); err != nil {
		return err
	}
	created := time.Now()
	r.prog.note("%d background Services (%d endpoints each) in place in %s", size, r.cfg.EndpointsPerService, created.Sub(start).Round(time.Millisecond))
	if withEBPF && r.lastBackground != "" {
		b := results.BulkCreate{Contender: results.EBPF, From: from, To: size, Creating: created.Sub(start)}
		at, err := r.poll(ctx, r.paths[0], []string{r.lastBackground}, r.cfg.SyncTimeout(size))
		if err != nil {
			b.TimedOut, b.Served = true, time.Since(created)
		} else {
			b.Served = max(at.Sub(created), 0)
		}
		r.out.Bulk = append(r.out.Bulk, b)
		r.prog.note("ebpf served the last of them %s after the creation finished", b.Served.Round(time.Millisecond))
	}
	// Before the contenders: the first one's cold start must not share
	// the CPU with the control plane digesting the new objects.
	r.settle(ctx)
	return nil
}

func (r *runner) populate(ctx context.Context, size int) error {
	last, err := Populate(ctx, r.api, r.etcd, backgroundNamespace, size, r.cfg.EndpointsPerService, r.serverAddrs(), load.EchoPort, populateWorkers, nil)
	if err != nil {
		return err
	}
	r.lastBackground = last
	r.backgroundCount = size
	return nil
}

const populateWorkers = 32

// churn changes background Services' endpoints every churnEvery until ctx
// ends: the endpoint-change timing runs "while endpoints churn", as on a
// busy cluster, so each sync has other changes to program too.
func (r *runner) churn(ctx context.Context, size int) {
	if size == 0 {
		return
	}
	t := time.NewTicker(churnEvery)
	defer t.Stop()
	addrs := r.serverAddrs()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := ChurnOne(ctx, r.api, backgroundNamespace, rand.IntN(size), addrs); err != nil && ctx.Err() == nil {
			r.prog.note("churning a background Service: %v", err)
		}
	}
}

func (r *runner) teardown() error {
	if r.etcd != nil {
		r.etcd.Close()
	}
	if r.c == nil {
		return nil
	}
	return localcluster.Down(r.c.Dir)
}

// proxyUsage reads the proxies' resident set and CPU time.
func proxyUsage(pids map[string]int) (results.ProxyUsage, error) {
	var u results.ProxyUsage
	var errs []error
	for node, pid := range pids {
		rss, cpu, err := processUsage(pid)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s's proxy (pid %d): %w", node, pid, err))
			continue
		}
		u.RSSBytes = max(u.RSSBytes, rss)
		u.CPUSeconds += cpu
	}
	return u, errors.Join(errs...)
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's times: 100 on
// every Linux architecture Go supports (the kernel fixes it for the ABI).
const clockTicks = 100

func processUsage(pid int) (rssBytes int64, cpuSeconds float64, err error) {
	rssBytes, _, err = residentSet(pid)
	if err != nil {
		return 0, 0, err
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Fields after the command, which is in parentheses and may hold
	// spaces: utime and stime are the 14th and 15th of the whole line.
	s := string(stat)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return rssBytes, (ut + st) / clockTicks, nil
}

func describeMachine(cfg Config) results.Machine {
	m := results.Machine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				m.MemoryBytes = kb * 1024
			}
		}
	}
	first := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).Output()
		if err != nil {
			return ""
		}
		return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	m.KubernetesVersion = strings.TrimPrefix(first(filepath.Join(cfg.KubeBin, "kube-apiserver"), "--version"), "Kubernetes ")
	m.IptablesVersion = first("iptables-legacy", "--version") + "; " + first("iptables-nft", "--version")
	m.NftVersion = first("nft", "--version")
	m.ProxyVersion = first(cfg.Binary, "--version")
	return m
}

// waitGroup runs fns in parallel and returns their errors joined.
func parallel(fns ...func() error) error {
	var wg sync.WaitGroup
	errs := make([]error, len(fns))
	for i, fn := range fns {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = fn() }()
	}
	wg.Wait()
	return errors.Join(errs...)
}
