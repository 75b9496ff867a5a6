package proxy

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/healthz"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
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

// recordingErrors keeps the error of each sync of the datapath it wraps.
type recordingErrors struct {
	dataplane.Dataplane
	snaps []*model.Snapshot
	errs  []error
}

func (r *recordingErrors) Sync(ctx context.Context, snap *model.Snapshot) error {
	err := r.Dataplane.Sync(ctx, snap)
	r.snaps = append(r.snaps, snap)
	r.errs = append(r.errs, err)
	return err
}

func (r *recordingErrors) Unwrap() dataplane.Dataplane { return r.Dataplane }

// A sync that finds the xtables lock held (iptables-legacy, with a lock
// file of the test's own that the test holds) changes nothing and is not
// a failure that loses state: the rules applied before keep serving, and
// once the lock is free the next sync applies the same changes, partially.
func TestKernelLockTimeoutKeepsServing(t *testing.T) {
	n := testnet.New(t)
	client := n.AddPod("client", "10.244.0.100")
	servers := n.AddServers(2)
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	ipt, err := iptables.New(context.Background(), iptables.Config{Backend: iptables.BackendLegacy,
		NetNS: "/run/netns/" + n.Node, LockFile: lock, LockWait: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ipt.Close() })
	dp := &recordingErrors{Dataplane: ipt}
	m := metrics.New(prometheus.NewRegistry())
	clk := clocktesting.NewFakeClock(t0)
	health := healthz.NewProxyHealth(time.Minute, clk)
	p := NewProxier(dp, m, health, Config{SyncPeriod: 30 * time.Second, RetryPeriod: time.Second}, WithClock(clk))
	t.Cleanup(p.busy.stop)
	t.Cleanup(p.retry.stop)
	p.OnServiceUpsert(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, servers[0].IP.String()))
	p.OnSynced()
	connect := func() string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := client.Output(ctx, testnet.Helper("tcp", "10.96.0.10:80", "1")...)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	syncs := func(kind string) float64 {
		return testutil.ToFloat64(m.SyncsTotal.WithLabelValues(kind, metrics.IPFamily))
	}
	if err := p.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := connect(); !strings.HasPrefix(got, "ok pod-0") {
		t.Fatalf("before the lock is taken: %q, want pod-0", got)
	}

	fd, err := unix.Open(lock, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	p.OnEndpointSliceUpsert(slice("default", "web-1", "web", "http", 8080, servers[1].IP.String()))
	clk.Step(time.Second)
	if err := p.sync(context.Background()); err != nil {
		t.Fatalf("sync under the held lock returned %v to the runner, want nil: it backs off itself", err)
	}
	last := dp.errs[len(dp.errs)-1]
	if !errors.Is(last, dataplane.ErrBusy) || !strings.Contains(last.Error(), "xtables lock") {
		t.Fatalf("the datapath's error under the held lock: %v, want the lock named, as dataplane.ErrBusy", last)
	}
	t.Logf("the error a user sees: %v", last)
	if got := testutil.ToFloat64(m.SyncLockTimeoutsTotal); got != 1 {
		t.Errorf("lock time-outs counted %v, want 1", got)
	}
	// Counted once, by the proxy, in either mode: no datapath event
	// counts it again.
	if ev, _ := ipt.Events(); ev["iptables_lock_timeout"] != 0 {
		t.Errorf("datapath events %v count the lock time-out the proxy counts", ev)
	}
	if got := connect(); !strings.HasPrefix(got, "ok pod-0") {
		t.Errorf("while the lock is held: %q, want the earlier rules serving pod-0", got)
	}

	if err := unix.Flock(fd, unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	full := syncs(metrics.SyncKindFull)
	clk.Step(time.Second) // the first backoff
	if err := p.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if snap := dp.snaps[len(dp.snaps)-1]; snap.Full || len(snap.Services) != 1 || dp.errs[len(dp.errs)-1] != nil {
		t.Fatalf("sync after the release: full=%v services %d err %v, want the requeued change applied by a partial sync",
			snap.Full, len(snap.Services), dp.errs[len(dp.errs)-1])
	}
	if syncs(metrics.SyncKindFull) != full {
		t.Error("a full sync ran after the lock time-out")
	}
	if got := connect(); !strings.HasPrefix(got, "ok pod-1") {
		t.Errorf("after the release: %q, want the new endpoint pod-1", got)
	}
}
