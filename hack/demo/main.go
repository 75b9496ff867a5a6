// Command demo shows kube-bpf-proxy's eBPF datapath for real on one machine:
// pods are network namespaces, the programs attach to a cgroup of the demo's
// own, and the proxy's pipeline (informers, model, runner, BPF maps) runs
// against an in-memory API server stand-in, in which the demo plays the
// EndpointSlice controller. Nothing leaves the namespaces it creates, and
// everything is removed at the end, also on failure.
package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/proxy"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/testnet"
)

// demo implements testnet.T for a program: failures end it after cleanup.
type demo struct {
	cleanups []func()
}

func (d *demo) Helper()                         {}
func (d *demo) Logf(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }
func (d *demo) Errorf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "demo: "+format+"\n", args...)
}
func (d *demo) Fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "demo failed: "+format+"\n", args...)
	d.teardown()
	os.Exit(1)
}
func (d *demo) Skip(args ...any) { d.Fatalf("%s", fmt.Sprint(args...)) }
func (d *demo) Cleanup(f func()) { d.cleanups = append(d.cleanups, f) }
func (d *demo) TempDir() string {
	dir, err := os.MkdirTemp("", "kbp-demo-")
	if err != nil {
		d.Fatalf("%v", err)
	}
	d.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (d *demo) teardown() {
	for i := len(d.cleanups) - 1; i >= 0; i-- {
		d.cleanups[i]()
	}
	d.cleanups = nil
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }

func main() {
	testnet.RunHelperIfRequested(nil)
	klog.InitFlags(nil) // quiet unless -v is given
	d := &demo{}
	defer d.teardown()
	ctx, cancel := context.WithCancel(context.Background())
	d.Cleanup(cancel)

	step("Building the topology: a node namespace, a client pod, 3 web pods and 2 DNS pods (no route out)")
	net := testnet.New(d)
	client := net.AddPod("client", "10.244.0.100")
	// The service range leads on to "the network", as a node's default route
	// does: here a namespace that drops everything it gets.
	net.RouteToPod("10.96.0.0/16", net.AddPod("world", "10.244.254.1"))
	var web []string
	for i := range 3 {
		p := net.AddPod(fmt.Sprintf("web-%d", i), fmt.Sprintf("10.244.1.%d", i+1))
		p.Start(false, testnet.Helper("serve", p.Name, "tcp:8080")...)
		web = append(web, p.IP.String())
		d.Logf("%s at %s serving HTTP on :8080", p.Name, p.IP)
	}
	var dns []string
	for i := range 2 {
		p := net.AddPod(fmt.Sprintf("dns-%d", i), fmt.Sprintf("10.244.2.%d", i+1))
		p.StartDNS("web.default.svc.cluster.local", "10.96.0.10")
		dns = append(dns, p.IP.String())
		d.Logf("%s at %s running dnsmasq on :53", p.Name, p.IP)
	}

	step("Loading the eBPF datapath into the demo's cgroup %s", net.Cgroup)
	bpffs := testnet.BPFFS(d)
	dp, err := ebpf.New(ebpf.Config{BPFFSPath: bpffs, CgroupPath: net.Cgroup,
		MaxServices: ebpf.DefaultMaxServices, MaxBackends: ebpf.DefaultMaxBackends, MaxSockets: ebpf.DefaultMaxRevNAT})
	if err != nil {
		d.Fatalf("%v", err)
	}
	// A restart closes the datapath once; teardown may close it again.
	closeEBPF := sync.OnceFunc(func() { dp.Close() })
	d.Cleanup(func() {
		closeEBPF()
		if err := ebpf.Cleanup(bpffs); err != nil {
			d.Errorf("cleanup: %v", err)
		}
	})
	show(d, "bpftool", "cgroup", "show", net.Cgroup)

	step("Starting the proxy pipeline against an in-memory API (the local cluster comes with the next milestone)")
	api := fake.NewClientset()
	stopEBPF := runProxy(ctx, d, api, dp)

	step("Creating Service default/web (10.96.0.10:80 -> 3 pods :8080) and kube-system/dns (10.96.0.53:53 UDP+TCP -> 2 pods)")
	apply(ctx, d, api, service("default", "web", "10.96.0.10", port("http", v1.ProtocolTCP, 80, 8080)),
		slice("default", "web", []v1.ServicePort{port("http", v1.ProtocolTCP, 80, 8080)}, web...))
	dnsPorts := []v1.ServicePort{port("dns", v1.ProtocolUDP, 53, 53), port("dns-tcp", v1.ProtocolTCP, 53, 53)}
	apply(ctx, d, api, service("kube-system", "dns", "10.96.0.53", dnsPorts...), slice("kube-system", "dns", dnsPorts, dns...))
	// Each change reaches the datapath with the next sync: wait for both.
	waitFor(d, func() bool { out, _ := curl(ctx, client); return strings.HasPrefix(out, "web-") })
	waitFor(d, func() bool {
		out, err := client.Output(ctx, "dig", "@10.96.0.53", "web.default.svc.cluster.local", "+short", "+tries=1", "+timeout=1")
		return err == nil && strings.TrimSpace(out) == "10.96.0.10"
	})

	step("curl http://10.96.0.10/ from the client pod, 6 times: each connect() picks a backend in the kernel")
	for range 6 {
		out, err := curl(ctx, client)
		d.Logf("answered by %s%v", out, errSuffix(err))
	}

	step("dig @10.96.0.53 web.default.svc.cluster.local: UDP goes to a dnsmasq pod, the reply comes back from the VIP")
	for _, transport := range []string{"+notcp", "+tcp"} {
		out, err := client.Output(ctx, "dig", "@10.96.0.53", "web.default.svc.cluster.local", transport, "+tries=1", "+timeout=2")
		if err != nil {
			d.Fatalf("dig: %v", err)
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "IN\tA") && !strings.HasPrefix(l, ";") || strings.HasPrefix(l, ";; SERVER") {
				d.Logf("%s  %s", transport, strings.TrimSpace(l))
			}
		}
	}

	step("Scaling web to zero endpoints: connect() is refused at once (ECONNREFUSED), no timeout")
	apply(ctx, d, api, nil, slice("default", "web", []v1.ServicePort{port("http", v1.ProtocolTCP, 80, 8080)}))
	waitFor(d, func() bool { return connect(ctx, d, client) == "err connection refused" })
	start := time.Now()
	_, err = curl(ctx, client)
	d.Logf("%v (after %v)", err, time.Since(start).Round(time.Millisecond))
	d.Logf("connect(): %s", connect(ctx, d, client))

	step("Deleting Service web: the VIP is no longer translated and dies inside the demo namespaces")
	_ = api.CoreV1().Services("default").Delete(ctx, "web", metav1.DeleteOptions{})
	_ = api.DiscoveryV1().EndpointSlices("default").Delete(ctx, "web", metav1.DeleteOptions{})
	waitFor(d, func() bool { return connect(ctx, d, client) != "err connection refused" })
	d.Logf("connect(): %s (the demo's service range leads to a namespace that drops everything)", connect(ctx, d, client))

	step("Datapath counters (per-CPU, summed; the same numbers /metrics exports)")
	events, err := dp.Events()
	if err != nil {
		d.Fatalf("%v", err)
	}
	names := make([]string, 0, len(events))
	for n := range events {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		d.Logf("%-28s %d", n, events[n])
	}

	step("Restarting the proxy with --mode=iptables: kube-proxy's rules in the node namespace; the eBPF programs go once the rules serve")
	// As the process exiting would: the pinned programs keep serving.
	stopEBPF()
	closeEBPF()
	apply(ctx, d, api, service("default", "web", "10.96.0.10", port("http", v1.ProtocolTCP, 80, 8080)),
		slice("default", "web", []v1.ServicePort{port("http", v1.ProtocolTCP, 80, 8080)}, web...))
	iptCfg := iptables.Config{Backend: iptables.BackendAuto, NetNS: "/run/netns/" + net.Node, ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16")}
	ipt, err := iptables.New(ctx, iptCfg)
	if err != nil {
		d.Fatalf("%v", err)
	}
	d.Cleanup(func() {
		ipt.Close()
		if err := iptables.Cleanup(context.Background(), iptCfg); err != nil {
			d.Errorf("cleanup: %v", err)
		}
	})
	d.Logf("iptables backend: %s (auto: the one the node already uses)", ipt.Backend())
	runProxy(ctx, d, api, dataplane.WithHandover(ipt, "ebpf", func(context.Context) error { return ebpf.Cleanup(bpffs) }))
	waitFor(d, func() bool { out, _ := curl(ctx, client); return strings.HasPrefix(out, "web-") })
	waitFor(d, func() bool { return testnet.AttachedPrograms(d, net.Cgroup) == 0 })
	d.Logf("eBPF programs attached to the demo cgroup now: %d", testnet.AttachedPrograms(d, net.Cgroup))
	save, err := net.NodeCommand(ctx, "iptables-"+ipt.Backend()+"-save", "-t", "nat").Output()
	if err != nil {
		d.Fatalf("iptables-save: %v", err)
	}
	for _, l := range strings.Split(string(save), "\n") {
		if strings.Contains(l, "default/web") {
			d.Logf("%s", l)
		}
	}
	for range 6 {
		out, err := curl(ctx, client)
		d.Logf("answered by %s%v", out, errSuffix(err))
	}

	step("iptables mode, zero endpoints: REJECT with icmp-port-unreachable, so connect() is refused too")
	apply(ctx, d, api, nil, slice("default", "web", []v1.ServicePort{port("http", v1.ProtocolTCP, 80, 8080)}))
	waitFor(d, func() bool { return connect(ctx, d, client) == "err connection refused" })
	d.Logf("connect(): %s", connect(ctx, d, client))

	step("Tearing down: rules, programs, pins, namespaces and cgroup")
	d.teardown()
	fmt.Println("\nDone. Run `make test` for the full test suite.")
}

// runProxy runs the proxy pipeline on dp until the returned function (or
// the demo's teardown) stops it.
func runProxy(ctx context.Context, d *demo, api *fake.Clientset, dp dataplane.Dataplane) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := proxy.Run(ctx, api, dp, proxy.Config{MinSyncPeriod: 100 * time.Millisecond,
			SyncPeriod: 30 * time.Second, RetryPeriod: time.Second,
			HealthzBindAddress: "127.0.0.1:0", MetricsBindAddress: "127.0.0.1:0"}); err != nil {
			d.Errorf("proxy: %v", err)
		}
	}()
	stop = func() { cancel(); <-done }
	// Cleanups run last first: the proxy stops before its datapath closes.
	d.Cleanup(stop)
	return stop
}

func curl(ctx context.Context, client *testnet.Pod) (string, error) {
	out, err := client.Output(ctx, "curl", "-sS", "--max-time", "2", "http://10.96.0.10/")
	if err != nil {
		if i := strings.Index(err.Error(), "curl:"); i >= 0 {
			return "", fmt.Errorf("%s", strings.TrimSpace(err.Error()[i:]))
		}
		return "", err
	}
	return strings.TrimSpace(out), nil
}

// connect makes one TCP connect to the web VIP with the test helper, which
// reports the errno, unlike curl.
func connect(ctx context.Context, d *demo, client *testnet.Pod) string {
	out, err := client.Output(ctx, testnet.Helper("tcp", "10.96.0.10:80", "1")...)
	if err != nil {
		d.Fatalf("%v", err)
	}
	return strings.TrimSpace(out)
}

func errSuffix(err error) string {
	if err != nil {
		return " (error: " + err.Error() + ")"
	}
	return ""
}

// waitFor polls cond until the datapath has caught up with the last change.
func waitFor(d *demo, cond func() bool) {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		if cond() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.Fatalf("the datapath did not converge within 30s")
}

func show(d *demo, args ...string) {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		d.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		d.Logf("%s", l)
	}
}

func port(name string, proto v1.Protocol, port, target int32) v1.ServicePort {
	return v1.ServicePort{Name: name, Protocol: proto, Port: port, TargetPort: intstr.FromInt32(target)}
}

func service(ns, name, ip string, ports ...v1.ServicePort) *v1.Service {
	return &v1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: v1.ServiceSpec{Type: v1.ServiceTypeClusterIP, ClusterIP: ip, ClusterIPs: []string{ip}, Ports: ports}}
}

// slice is the EndpointSlice the controller would write for a Service
// whose ports are ports, with ready endpoints at ips.
func slice(ns, svc string, ports []v1.ServicePort, ips ...string) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: svc, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, p := range ports {
		s.Ports = append(s.Ports, discoveryv1.EndpointPort{Name: ptr.To(p.Name), Port: ptr.To(p.TargetPort.IntVal), Protocol: ptr.To(p.Protocol)})
	}
	for _, ip := range ips {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	return s
}

// apply creates or updates a Service and its EndpointSlice.
func apply(ctx context.Context, d *demo, api *fake.Clientset, svc *v1.Service, s *discoveryv1.EndpointSlice) {
	if svc != nil {
		if _, err := api.CoreV1().Services(svc.Namespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			d.Fatalf("creating Service: %v", err)
		}
	}
	if _, err := api.DiscoveryV1().EndpointSlices(s.Namespace).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		if _, err := api.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			d.Fatalf("writing EndpointSlice: %v", err)
		}
	}
}
