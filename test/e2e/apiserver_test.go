package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/apiserver"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// kubernetesClusterIP is the ClusterIP of Service default/kubernetes: the
// first address of the service range, which the kubelet's service-link
// variables give every container.
const kubernetesClusterIP = "10.96.0.1"

// freshNodes starts the proxy on nodes nothing has programmed (no rules, no
// pins: a rebooted node, a new one, a reinstall), the ways it can be
// configured:
//   - installed from the manifests' own overlay, the API server's address
//     never set: it exits at once, saying what to set, having touched
//     nothing;
//   - with only the kubelet's environment (no envFrom, as the manifests were
//     before the ConfigMap): its in-cluster configuration dials the
//     kubernetes Service's ClusterIP, which nothing serves, so it never
//     syncs, and its log says why and what to set;
//   - as the manifests deploy it with the user's overlay: it reaches the API
//     server at its own address and syncs, and then pods reach the
//     kubernetes Service through its ClusterIP;
//   - with only the kubelet's environment again, now that its datapath
//     serves the ClusterIP: it syncs through its own programs, and warns that
//     this fails after a reboot.
func (e *env) freshNodes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// The modes' scenarios start their own.
	defer e.stopProxies(t)
	for _, n := range e.c.Nodes {
		if got := testnet.AttachedPrograms(t, n.Cgroup); got != 0 {
			t.Fatalf("%s is not fresh: %d programs attached", n.Name, got)
		}
		if _, err := os.Stat(filepath.Join(n.BPFFS, "kube-bpf-proxy")); !os.IsNotExist(err) {
			t.Fatalf("%s is not fresh: pins exist (%v)", n.Name, err)
		}
	}
	node := e.c.Nodes[0].Name

	// The project's overlay as it ships: the ConfigMap's address is empty.
	if _, err := e.c.Kubectl(ctx, "apply", "-k", filepath.Join(manifestsDir, "overlays", "ebpf")); err != nil {
		t.Fatal(err)
	}
	unset, err := e.c.DaemonSetProxyOptions(ctx, e.binary)
	if err != nil {
		t.Fatal(err)
	}
	from := logSize(e.c, node)
	if err := e.c.LaunchProxy(ctx, node, unset); err != nil {
		t.Fatal(err)
	}
	if !eventually(30*time.Second, func() bool { return !e.c.ProxyRunning(node) }) {
		t.Fatalf("the proxy without an API server address still runs; log:\n%s", logSince(e.c, node, from))
	}
	if out := logSince(e.c, node, from); !strings.Contains(out, "KUBERNETES_SERVICE_HOST is empty") ||
		!strings.Contains(out, "ConfigMap "+apiserver.ConfigMap) {
		t.Errorf("the proxy without an API server address exited without saying what to set:\n%s", out)
	}
	if got := testnet.AttachedPrograms(t, e.c.Nodes[0].Cgroup); got != 0 {
		t.Errorf("the proxy that could not start attached %d programs", got)
	}

	// The kubelet's environment alone: the user's overlay, less envFrom.
	kubeletOnly := e.proxyOptions(t, "ebpf")
	kubeletOnly.DaemonSet = kubeletOnly.DaemonSet.DeepCopy()
	for i := range kubeletOnly.DaemonSet.Spec.Template.Spec.Containers {
		kubeletOnly.DaemonSet.Spec.Template.Spec.Containers[i].EnvFrom = nil
	}
	starts := map[string]int64{}
	for _, n := range e.c.Nodes {
		starts[n.Name] = logSize(e.c, n.Name)
		if err := e.c.LaunchProxy(ctx, n.Name, kubeletOnly); err != nil {
			t.Fatal(err)
		}
	}
	const diagnostic = "Cannot reach the API server through the kubernetes Service's ClusterIP"
	for _, n := range e.c.Nodes {
		var out string
		// The first attempt's dial times out after apiserver.ProbeTimeout.
		if !eventually(time.Minute, func() bool {
			out = logSince(e.c, n.Name, starts[n.Name])
			return strings.Contains(out, diagnostic)
		}) {
			t.Errorf("%s: no diagnostic of the ClusterIP in the log:\n%s", n.Name, out)
		}
		for _, want := range []string{`server="https://` + kubernetesClusterIP + `:443"`, "ConfigMap " + apiserver.ConfigMap} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: the diagnostic does not say %q:\n%s", n.Name, want, out)
			}
		}
		// Nothing serves the ClusterIP on a fresh node, so this is no
		// race: it cannot have synced.
		if e.c.ProxySynced(ctx, n.Name) || !e.c.ProxyRunning(n.Name) {
			t.Errorf("%s: with the kubelet's ClusterIP on a fresh node the proxy synced (or exited); log:\n%s", n.Name, out)
		}
	}
	e.stopProxies(t)

	// As the manifests deploy it.
	e.startProxies(t, "ebpf")
	e.kubernetesService(t)
	e.mountsAsDeployed(t, node)

	// The kubelet's ClusterIP again, now served by this node's datapath:
	// the proxy's own sockets, in a cgroup under the node's, go through its
	// programs.
	if _, err := e.c.SignalProxy(node, syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	from = logSize(e.c, node)
	if err := e.c.StartProxy(ctx, node, kubeletOnly); err != nil {
		t.Errorf("with the kubelet's ClusterIP, served: %v", err)
	}
	// Up to the advice, which klog quotes.
	warning, _, _ := strings.Cut(apiserver.ClusterIPWarning, ": after a reboot")
	if out := logSince(e.c, node, from); !strings.Contains(out, warning) {
		t.Errorf("no warning that the ClusterIP will fail after a reboot:\n%s", out)
	}
}

// mountsAsDeployed checks what the proxy sees of the node through the ebpf
// overlay's mounts: the ServiceAccount volume where client-go reads it, and
// in /run/netns the namespace of a pod created after the proxy started
// (HostToContainer), as closing UDP sockets inside pods needs.
func (e *env) mountsAsDeployed(t *testing.T, node string) {
	ctx := context.Background()
	root, err := e.c.ProxyRoot(node)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"token", "ca.crt", "namespace"} {
		if _, err := os.Stat(filepath.Join(root, "run/secrets/kubernetes.io/serviceaccount", f)); err != nil {
			t.Errorf("the proxy on %s has no ServiceAccount %s: %v", node, f, err)
		}
	}
	p, err := e.c.AddPod(ctx, localcluster.PodSpec{Name: "after-proxy", Node: node,
		Command: testnet.Helper("serve", "after-proxy", "tcp:80"), ReadyLine: "ready"})
	if err != nil {
		t.Fatal(err)
	}
	// The name alone shows through any bind of the directory; the
	// namespace mounted on it shows only where mounts propagate.
	var onNode, seen unix.Stat_t
	if err := unix.Stat(filepath.Join("/run/netns", p.NetNS), &onNode); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(filepath.Join(root, "run/netns", p.NetNS), &seen); err != nil ||
		seen.Dev != onNode.Dev || seen.Ino != onNode.Ino {
		t.Errorf("the network namespace of a pod made after the proxy started is not in its /run/netns (%v; dev:inode %d:%d there, %d:%d on the node)",
			err, seen.Dev, seen.Ino, onNode.Dev, onNode.Ino)
	}
	// A node's /run/netns holds its own pods only, as on a real node.
	for _, other := range e.c.Nodes {
		if other.Name == node || !e.c.ProxyRunning(other.Name) {
			continue
		}
		otherRoot, err := e.c.ProxyRoot(other.Name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(otherRoot, "run/netns", p.NetNS)); !os.IsNotExist(err) {
			t.Errorf("the proxy on %s sees the namespace of a pod on %s: %v", other.Name, node, err)
		}
	}
	if err := e.c.DeletePod(ctx, p.Namespace, p.Name, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "run/netns", p.NetNS)); !os.IsNotExist(err) {
		t.Errorf("a deleted pod's namespace is still in the proxy's /run/netns: %v", err)
	}
}

// kubernetesService checks that a pod on each node reaches the API server
// through the kubernetes Service's ClusterIP: an HTTPS GET of /livez,
// verified with the cluster's CA.
func (e *env) kubernetesService(t *testing.T) {
	ctx := context.Background()
	svc, err := e.c.Client.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if svc.Spec.ClusterIP != kubernetesClusterIP || svc.Spec.Ports[0].Port != 443 {
		t.Fatalf("Service default/kubernetes is at %s:%d, want %s:443", svc.Spec.ClusterIP, svc.Spec.Ports[0].Port, kubernetesClusterIP)
	}
	url := "https://" + kubernetesClusterIP + "/livez"
	ca := filepath.Join(e.c.Dir, "ca.crt")
	for _, client := range e.clients {
		var last string
		if !eventually(30*time.Second, func() bool {
			out, err := client.Output(ctx, "curl", "-sS", "--max-time", "5", "--cacert", ca, url)
			last = strings.TrimSpace(out)
			if err != nil {
				last = err.Error()
			}
			return last == "ok"
		}) {
			t.Errorf("from %s: GET %s: %s", client.Name, url, last)
		}
	}
}

// stopProxies stops the proxy on every node where one runs.
func (e *env) stopProxies(t *testing.T) {
	t.Helper()
	for _, n := range e.c.Nodes {
		if e.c.ProxyRunning(n.Name) {
			if _, err := e.c.SignalProxy(n.Name, syscall.SIGTERM, 10*time.Second); err != nil {
				t.Error(err)
			}
		}
	}
}

// logSize is the size of the node's proxy log: what a later start adds
// begins there.
func logSize(c *localcluster.Cluster, node string) int64 {
	st, err := os.Stat(c.ProxyLog(node))
	if err != nil {
		return 0
	}
	return st.Size()
}

// logSince returns the node's proxy log from offset on.
func logSince(c *localcluster.Cluster, node string, offset int64) string {
	b, _ := os.ReadFile(c.ProxyLog(node))
	if int64(len(b)) < offset {
		return string(b)
	}
	return string(b[offset:])
}
