package proxy

import (
	"context"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/testnet"
)

// TestKernelPipelineConvergesAcrossRestart runs the whole pipeline (informers,
// tracker, runner, datapath) against the real kernel in both modes: a
// Service becomes reachable; while the proxy is down a Service is deleted
// and another created; the next start takes the datapath over and converges.
func TestKernelPipelineConvergesAcrossRestart(t *testing.T) {
	for _, mode := range []string{"ebpf", "iptables"} {
		t.Run(mode, func(t *testing.T) { testPipelineConvergesAcrossRestart(t, mode) })
	}
}

func testPipelineConvergesAcrossRestart(t *testing.T, mode string) {
	n := testnet.New(t)
	client := n.AddPod("client", "10.244.0.100")
	var ips []string
	for _, p := range n.AddServers(2) {
		ips = append(ips, p.IP.String())
	}
	cfg := ebpf.Config{BPFFSPath: testnet.BPFFS(t), CgroupPath: n.Cgroup, MaxServices: 64, MaxBackends: 256, MaxSockets: 256,
		NodeNetNS: "/run/netns/" + n.Node, NetNSDirs: []string{n.PodNetNSDir}}
	t.Cleanup(func() { _ = ebpf.Cleanup(cfg.BPFFSPath) })

	api := fake.NewClientset(
		service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)),
		slice("default", "web-1", "web", "http", 8080, ips...),
		service("default", "old", "10.96.0.11", tcpPort("http", 80, 8080)),
		slice("default", "old-1", "old", "http", 8080, ips[0]),
	)
	startProxy := func() *running {
		var dp dataplane.Dataplane
		var err error
		if mode == "ebpf" {
			dp, err = ebpf.New(cfg)
		} else {
			dp, err = iptables.New(context.Background(), iptables.Config{Backend: iptables.BackendNFT, NetNS: "/run/netns/" + n.Node})
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.Close() })
		return start(t, api, dp)
	}
	connect := func(addr string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := client.Output(ctx, testnet.Helper("tcp", addr, "1")...)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	eventually := func(what, addr string, ok func(string) bool) {
		t.Helper()
		var last string
		for range 100 {
			if last = connect(addr); ok(last) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("%s: last result %q", what, last)
	}
	served := func(s string) bool { return strings.HasPrefix(s, "ok pod-") }

	first := startProxy()
	eventually("web served", "10.96.0.10:80", served)
	eventually("old served", "10.96.0.11:80", served)
	first.stop(t)

	// While the proxy is down: the datapath keeps serving, and the API moves on.
	if got := connect("10.96.0.10:80"); !served(got) {
		t.Errorf("web while the proxy is down: %q", got)
	}
	ctx := context.Background()
	if err := api.CoreV1().Services("default").Delete(ctx, "old", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := api.CoreV1().Services("default").Create(ctx, service("default", "new", "10.96.0.12", tcpPort("http", 80, 8080)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := api.DiscoveryV1().EndpointSlices("default").Create(ctx, slice("default", "new-1", "new", "http", 8080, ips[1]), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	startProxy()
	eventually("new Service served after restart", "10.96.0.12:80", func(s string) bool { return s == "ok pod-1 peer=10.96.0.12:80" })
	eventually("deleted Service gone after restart", "10.96.0.11:80", func(s string) bool { return !served(s) })
	if got := connect("10.96.0.10:80"); !served(got) {
		t.Errorf("web after restart: %q", got)
	}
}
