package localcluster

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// ProxyOptions say how to run kube-bpf-proxy on a node.
type ProxyOptions struct {
	// Binary is the kube-bpf-proxy binary.
	Binary string
	// Kubeconfig is the proxy's identity (see ServiceAccountKubeconfig).
	Kubeconfig string
	// Mode is ebpf or iptables.
	Mode string
	// Args are extra flags.
	Args []string
	// Capabilities, if set, are the only ones the proxy keeps (as in a
	// container that drops ALL and adds these), e.g. "BPF", "NET_ADMIN".
	Capabilities []string
}

// Proxy addresses inside each node's namespace (each node has a loopback of
// its own, so both nodes use kube-proxy's usual ports).
const (
	ProxyHealthzAddr = "127.0.0.1:10256"
	ProxyMetricsAddr = "127.0.0.1:10249"
)

func proxyName(node string) string { return "kube-bpf-proxy-" + node }

// proxyArgs returns the command line the node's proxy runs with: the
// node's name, its cgroup (where its pods' sockets are), bpffs and pods'
// network namespaces, and the cluster's pod range.
func (c *Cluster) proxyArgs(node string, o ProxyOptions) ([]string, error) {
	n, err := c.Node(node)
	if err != nil {
		return nil, err
	}
	var prefix []string
	if len(o.Capabilities) > 0 {
		// Root keeps exactly its bounding set across exec: the container
		// runtime's "drop ALL, add these".
		set := "-all"
		for _, c := range o.Capabilities {
			set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
		}
		prefix = []string{"setpriv", "--bounding-set=" + set, "--inh-caps=-all", "--"}
	}
	return append(prefix, append([]string{o.Binary,
		"--mode=" + o.Mode,
		"--kubeconfig=" + o.Kubeconfig,
		"--hostname-override=" + n.Name,
		"--cgroup-path=" + n.Cgroup,
		"--bpffs-path=" + filepath.Join(n.BPFFS, "kube-bpf-proxy"),
		"--netns-dir=" + podNetNSDir(c.Dir, n.Name),
		"--cluster-cidr=" + ClusterCIDR,
		"--healthz-bind-address=" + ProxyHealthzAddr,
		"--metrics-bind-address=" + ProxyMetricsAddr,
	}, o.Args...)...), nil
}

// StartProxy runs kube-bpf-proxy in the node's namespace, as the DaemonSet
// runs it on a node (host network), and waits until /healthz reports its
// first sync.
func (c *Cluster) StartProxy(ctx context.Context, node string, o ProxyOptions) error {
	args, err := c.proxyArgs(node, o)
	if err != nil {
		return err
	}
	n, _ := c.Node(node)
	p := &proc{
		NetNS:  n.NetNS,
		Cgroup: filepath.Join(c.Cgroup, "system"),
		Args:   args,
		Log:    filepath.Join(c.Dir, "logs", proxyName(node)+".log"),
	}
	if err := c.startProc(proxyName(node), p); err != nil {
		return err
	}
	return c.waitFor(ctx, p, 60*time.Second, "kube-bpf-proxy's first sync on "+node, func() bool {
		code, _, _ := c.ProxyGet(ctx, node, ProxyHealthzAddr, "/healthz")
		return code == http.StatusOK
	})
}

// ProxyGet fetches path from one of the node's proxy endpoints and returns
// the status code and body.
func (c *Cluster) ProxyGet(ctx context.Context, node, addr, path string) (int, string, error) {
	n, err := c.Node(node)
	if err != nil {
		return 0, "", err
	}
	client := &http.Client{
		Transport: &http.Transport{DialContext: dialIn(n.NetNS), DisableKeepAlives: true},
		Timeout:   2 * time.Second,
	}
	resp, err := client.Get("http://" + addr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// ProxyRunning reports whether the node's proxy process is alive.
func (c *Cluster) ProxyRunning(node string) bool {
	p, err := c.proc(proxyName(node))
	return err == nil && p.alive()
}

// SignalProxy sends sig to the node's proxy and waits up to timeout for it
// to exit; it returns how long the exit took. A proxy still running after
// timeout is an error (and is left running).
func (c *Cluster) SignalProxy(node string, sig syscall.Signal, timeout time.Duration) (time.Duration, error) {
	p, err := c.proc(proxyName(node))
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := p.signal(sig); err != nil {
		return 0, err
	}
	if !p.waitExit(timeout) {
		return time.Since(start), fmt.Errorf("kube-bpf-proxy on %s still running %s after %s; see %s", node, timeout, sig, p.Log)
	}
	return time.Since(start), nil
}

// ProxyLog returns the node's proxy log path.
func (c *Cluster) ProxyLog(node string) string {
	return filepath.Join(c.Dir, "logs", proxyName(node)+".log")
}

// CleanupProxy runs `kube-bpf-proxy --cleanup` in the node's namespace, as
// an operator does on a node the proxy leaves.
func (c *Cluster) CleanupProxy(ctx context.Context, node, binary string) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, "nsenter", "--net="+netnsPath(n.NetNS), "--", binary, "--cleanup",
		"--cgroup-path="+n.Cgroup, "--bpffs-path="+filepath.Join(n.BPFFS, "kube-bpf-proxy")).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kube-bpf-proxy --cleanup on %s: %w: %s", node, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// DaemonSetProxyOptions returns options that run binary as manifests/
// deploys it (manifestsDir is that directory, whose overlay must have been
// applied): with a TokenRequest token of the DaemonSet's ServiceAccount, so
// that the proxy has exactly the ClusterRole's rights, and with only the
// DaemonSet's capabilities.
func (c *Cluster) DaemonSetProxyOptions(ctx context.Context, manifestsDir, binary, mode string, ttl time.Duration) (ProxyOptions, error) {
	kc, err := c.ServiceAccountKubeconfig(ctx, "kube-system", "kube-bpf-proxy", ttl)
	if err != nil {
		return ProxyOptions{}, fmt.Errorf("%w (apply %s first)", err, filepath.Join(manifestsDir, "overlays", mode))
	}
	caps, err := DaemonSetCapabilities(filepath.Join(manifestsDir, "base", "daemonset.yaml"))
	if err != nil {
		return ProxyOptions{}, err
	}
	return ProxyOptions{Binary: binary, Kubeconfig: kc, Mode: mode, Capabilities: caps}, nil
}

// DaemonSetCapabilities reads the capabilities the DaemonSet manifest at
// path gives the proxy container, so that the proxy runs here with exactly
// what it gets on a cluster.
func DaemonSetCapabilities(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name != "kube-bpf-proxy" || c.SecurityContext == nil || c.SecurityContext.Capabilities == nil {
			continue
		}
		var caps []string
		for _, c := range c.SecurityContext.Capabilities.Add {
			caps = append(caps, string(c))
		}
		if len(caps) == 0 {
			break
		}
		return caps, nil
	}
	return nil, fmt.Errorf("%s: no capabilities added to the kube-bpf-proxy container", path)
}
