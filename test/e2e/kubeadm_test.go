package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// kubeadmManifest is what kubeadm v1.36.3 installs as its kube-proxy addon
// (ServiceAccount, RBAC, ConfigMap, DaemonSet), rendered by kubeadm's own
// code (cmd/kubeadm/app/phases/addons/proxy, EnsureProxyAddon with
// printManifest) for a cluster initialised with
// --pod-network-cidr=10.244.0.0/16 and the control plane at
// kubeadmAPIEndpoint.
const kubeadmManifest = "testdata/kubeadm-v1.36/kube-proxy.yaml"

// kubeadmAPIEndpoint is the control plane address kubeadm wrote into the
// ConfigMap's kubeconfig; on this cluster kubeadm would have written the
// first node's address.
const kubeadmAPIEndpoint = "https://192.168.0.10:6443"

// TestKubeadmKubeProxy takes kubeadm's kube-proxy DaemonSet and ConfigMap
// as kubeadm renders them and follows docs/replace-kube-proxy.md step by
// step, with its commands: first the image alone changed (kubeadm's
// `mode: ""` runs the iptables mode), then the eBPF mode's patch. Each time
// a ClusterIP is served from both nodes. The proxy runs as the kubelet
// would run kubeadm's pod: its command (/usr/local/bin/kube-proxy, the
// image's link to the binary, --config=/var/lib/kube-proxy/config.conf,
// --hostname-override=$(NODE_NAME)), the ConfigMap mounted at
// /var/lib/kube-proxy, privileged, with the kube-proxy ServiceAccount and
// kubeadm's RBAC only.
func TestKubeadmKubeProxy(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	rendered, err := os.ReadFile(kubeadmManifest)
	if err != nil {
		t.Fatal(err)
	}
	manifest := strings.ReplaceAll(string(rendered), kubeadmAPIEndpoint, "https://"+e.c.Nodes[0].IP+":6443")
	path := filepath.Join(e.c.Dir, "kubeadm-kube-proxy.yaml")
	if err := os.WriteFile(path, []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	// kubeadm applies its addon; the operator then changes the image.
	if _, err := e.c.Kubectl(ctx, "apply", "-f", path); err != nil {
		t.Fatal(err)
	}
	if _, err := e.c.Kubectl(ctx, "-n", "kube-system", "set", "image", "daemonset/kube-proxy",
		"kube-proxy=ghcr.io/kube-bpf-proxy/kube-bpf-proxy:latest"); err != nil {
		t.Fatal(err)
	}

	ns := e.namespace(t, "kubeadm")
	e.addWeb(t, ns, "web-1", "node1", "web")
	e.addWeb(t, ns, "web-2", "node2", "web")
	vip := e.createService(t, ns, "web", 80)

	t.Run("ImageOnly", func(t *testing.T) {
		o := e.kubeadmProxyOptions(t, ctx)
		ctr := o.DaemonSet.Spec.Template.Spec.Containers[0]
		if ctr.Image != "ghcr.io/kube-bpf-proxy/kube-bpf-proxy:latest" || ctr.Command[0] != "/usr/local/bin/kube-proxy" {
			t.Fatalf("the DaemonSet runs %s %q, want the new image with kubeadm's command", ctr.Image, ctr.Command)
		}
		e.startKubeadmProxies(t, ctx, o)
		e.expectBackends(t, vip+":80", "web-1", "web-2")
		e.expectModeMetric(t, ctx, "iptables")
		e.stopKubeadmProxies(t)
	})

	t.Run("EBPF", func(t *testing.T) {
		if _, err := e.c.Kubectl(ctx, "-n", "kube-system", "patch", "daemonset", "kube-proxy", "--type=json",
			"--patch-file", filepath.Join(manifestsDir, "kubeadm", "ebpf-patch.json")); err != nil {
			t.Fatal(err)
		}
		o := e.kubeadmProxyOptions(t, ctx)
		e.startKubeadmProxies(t, ctx, o)
		e.expectBackends(t, vip+":80", "web-1", "web-2")
		e.expectModeMetric(t, ctx, "ebpf")
		for _, n := range e.c.Nodes {
			if got := testnet.AttachedPrograms(t, n.Cgroup); got == 0 {
				t.Errorf("no program attached to %s's cgroup %s", n.Name, n.Cgroup)
			}
		}
		e.stopKubeadmProxies(t)
	})

	for _, n := range e.c.Nodes {
		if err := e.c.CleanupProxy(ctx, n.Name, e.binary); err != nil {
			t.Error(err)
		}
		if got := testnet.AttachedPrograms(t, n.Cgroup); got != 0 {
			t.Errorf("%d programs still attached on %s after --cleanup", got, n.Name)
		}
	}
}

func (e *env) kubeadmProxyOptions(t *testing.T, ctx context.Context) localcluster.ProxyOptions {
	t.Helper()
	ds, err := e.c.Client.AppsV1().DaemonSets("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return localcluster.ProxyOptions{Binary: e.binary, DaemonSet: ds}
}

func (e *env) startKubeadmProxies(t *testing.T, ctx context.Context, o localcluster.ProxyOptions) {
	t.Helper()
	for _, n := range e.c.Nodes {
		if err := e.c.StartProxy(ctx, n.Name, o); err != nil {
			t.Fatalf("starting kubeadm's kube-proxy pod on %s: %v", n.Name, err)
		}
	}
}

func (e *env) stopKubeadmProxies(t *testing.T) {
	t.Helper()
	for _, n := range e.c.Nodes {
		if _, err := e.c.SignalProxy(n.Name, syscall.SIGTERM, 10*time.Second); err != nil {
			t.Error(err)
		}
	}
}

// expectModeMetric checks each node's proxy reports mode on /metrics
// (kubeadm's RBAC does not let it write the Node's mode label).
func (e *env) expectModeMetric(t *testing.T, ctx context.Context, mode string) {
	t.Helper()
	for _, n := range e.c.Nodes {
		_, body, err := e.c.ProxyGet(ctx, n.Name, localcluster.ProxyMetricsAddr, "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(body, `kube_bpf_proxy_info{`) || !strings.Contains(body, `mode="`+mode+`"`) {
			t.Errorf("%s: /metrics does not show mode %s", n.Name, mode)
		}
	}
}
