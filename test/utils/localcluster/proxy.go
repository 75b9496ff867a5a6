package localcluster

import (
	"context"
	"encoding/json"
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
)

// ProxyOptions say how to run kube-bpf-proxy on a node: as a pod of a
// DaemonSet (DaemonSetProxyOptions reads the applied one).
type ProxyOptions struct {
	// Binary is the kube-bpf-proxy binary, the image's entrypoint, when
	// the cluster runs no image (Cluster.Image, which replaces it).
	Binary string
	// DaemonSet is the DaemonSet whose pod the proxy runs as: its
	// container's args, env and envFrom, capabilities, ServiceAccount and
	// hostPath mounts.
	DaemonSet *appsv1.DaemonSet
	// Args are extra flags, after the container's.
	Args []string
	// TokenTTL is the life of the ServiceAccount token (default 24 h):
	// nothing renews it, unlike a kubelet.
	TokenTTL time.Duration
}

// Proxy addresses inside each node's namespace (each node has a loopback of
// its own, so both nodes use kube-proxy's usual ports).
const (
	ProxyHealthzAddr = "127.0.0.1:10256"
	ProxyMetricsAddr = "127.0.0.1:10249"
)

func proxyName(node string) string { return "kube-bpf-proxy-" + node }

// proxyProc prepares the node's proxy as the kubelet would run the
// DaemonSet's pod there (hostNetwork: in the node's network namespace; see
// containerCommand), in a cgroup under the node's (where the proxy's own
// sockets meet its programs, as on a node whose cgroup root they attach
// to).
func (c *Cluster) proxyProc(ctx context.Context, node string, o ProxyOptions) (*proc, error) {
	n, err := c.Node(node)
	if err != nil {
		return nil, err
	}
	if o.DaemonSet == nil {
		return nil, fmt.Errorf("no DaemonSet to run the proxy as")
	}
	ctr, err := container(o.DaemonSet)
	if err != nil {
		return nil, err
	}
	cmd, env, err := c.containerCommand(ctx, containerRun{
		pod:       daemonSetPod(o.DaemonSet, ctr, n),
		binary:    o.Binary,
		extraArgs: o.Args,
		tokenTTL:  o.TokenTTL,
		saDir:     filepath.Join(c.Dir, n.Name, "serviceaccount"),
		staging:   filepath.Join(c.Dir, n.Name, "proxy-run"),
	})
	if err != nil {
		return nil, err
	}
	cgroup := filepath.Join(n.Cgroup, "kube-bpf-proxy")
	if err := os.Mkdir(cgroup, 0o755); err != nil && !os.IsExist(err) {
		return nil, fmt.Errorf("creating the proxy's cgroup: %w", err)
	}
	return &proc{
		NetNS:  n.NetNS,
		Cgroup: cgroup,
		Args:   cmd,
		Env:    env,
		Log:    c.ProxyLog(node),
		Owner:  o.DaemonSet.Name,
	}, nil
}

// LaunchProxy starts kube-bpf-proxy on the node as a pod of o.DaemonSet
// (see proxyProc) and returns at once.
func (c *Cluster) LaunchProxy(ctx context.Context, node string, o ProxyOptions) error {
	p, err := c.proxyProc(ctx, node, o)
	if err != nil {
		return fmt.Errorf("preparing kube-bpf-proxy on %s: %w", node, err)
	}
	return c.startProc(proxyName(node), p)
}

// StartProxy launches the node's proxy and waits for its first successful
// sync.
func (c *Cluster) StartProxy(ctx context.Context, node string, o ProxyOptions) error {
	if err := c.LaunchProxy(ctx, node, o); err != nil {
		return err
	}
	p, err := c.proc(proxyName(node))
	if err != nil {
		return err
	}
	return c.waitFor(ctx, p, 60*time.Second, "kube-bpf-proxy's first sync on "+node, func() bool {
		return c.ProxySynced(ctx, node)
	})
}

// ProxySynced reports whether the node's proxy has completed a sync: its
// /healthz names a last update per IP family, as kube-proxy's does once a
// sync succeeded. (Its status code is no sign: /healthz is 200 until a
// change has waited twice --sync-period, first sync or not; nor is the
// top-level lastUpdated, the current time in any 200 answer.)
func (c *Cluster) ProxySynced(ctx context.Context, node string) bool {
	code, body, err := c.ProxyGet(ctx, node, ProxyHealthzAddr, "/healthz")
	if err != nil || code != http.StatusOK {
		return false
	}
	var status struct {
		Status map[string]struct {
			LastUpdated time.Time `json:"lastUpdated"`
		} `json:"status"`
	}
	if json.Unmarshal([]byte(body), &status) != nil {
		return false
	}
	for _, family := range status.Status {
		if !family.LastUpdated.IsZero() {
			return true
		}
	}
	return false
}

// ProxyGet fetches path from one of the node's proxy endpoints and returns
// the status code and body.
func (c *Cluster) ProxyGet(ctx context.Context, node, addr, path string) (int, string, error) {
	return c.NodeGet(ctx, node, addr, path)
}

// NodeGet fetches http://addr/path from the node's network namespace (a
// pod's address, as Prometheus or a kubelet probe reaches it; the node's
// loopback) over a new connection and returns the status code and body.
func (c *Cluster) NodeGet(ctx context.Context, node, addr, path string) (int, string, error) {
	return c.NodeGetTimeout(ctx, node, addr, path, 2*time.Second)
}

// NodeGetTimeout is NodeGet with the whole request limited to timeout.
func (c *Cluster) NodeGetTimeout(ctx context.Context, node, addr, path string, timeout time.Duration) (int, string, error) {
	n, err := c.Node(node)
	if err != nil {
		return 0, "", err
	}
	client := &http.Client{
		Transport: &http.Transport{DialContext: dialIn(n.NetNS), DisableKeepAlives: true},
		Timeout:   timeout,
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// NodeOutput runs a command in the node's network namespace (with this
// process's mount namespace and environment) and returns its standard
// output; a failure carries its standard error.
func (c *Cluster) NodeOutput(ctx context.Context, node string, args ...string) (string, error) {
	n, err := c.Node(node)
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netnsPath(n.NetNS), "--"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s on %s: %w: %s", strings.Join(args, " "), node, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
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

// ProxyRoot returns the file system as the node's running proxy sees it
// (/proc/PID/root: paths below it resolve in the proxy's mount namespace).
func (c *Cluster) ProxyRoot(node string) (string, error) {
	p, err := c.proc(proxyName(node))
	if err != nil {
		return "", err
	}
	if !p.alive() {
		return "", fmt.Errorf("kube-bpf-proxy on %s is not running", node)
	}
	return fmt.Sprintf("/proc/%d/root", p.PID), nil
}

// ProxyLog returns the node's proxy log path.
func (c *Cluster) ProxyLog(node string) string {
	return filepath.Join(c.Dir, "logs", proxyName(node)+".log")
}

// OneOffBinary is the binary an operator's one-off command runs (--cleanup,
// inspect): with an Image, the image's own (static, so it runs on the host
// too); otherwise binary.
func (c *Cluster) OneOffBinary(binary string) string {
	if c.Image != nil && len(c.Image.Entrypoint) > 0 {
		return filepath.Join(c.Image.Root, c.Image.Entrypoint[0])
	}
	return binary
}

// CleanupProxy runs `kube-bpf-proxy --cleanup` in the node's namespace, as
// an operator does on a node the proxy leaves, with extra flags if given
// (a --kubeconfig lets it remove the Node's mode label too).
func (c *Cluster) CleanupProxy(ctx context.Context, node, binary string, extra ...string) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	// The teardown, not what is under test.
	binary = c.OneOffBinary(binary)
	args := append([]string{"--net=" + netnsPath(n.NetNS), "--", binary, "--cleanup",
		"--cgroup-path=" + n.Cgroup, "--bpffs-path=" + filepath.Join(n.BPFFS, "kube-bpf-proxy")}, extra...)
	out, err := exec.CommandContext(ctx, "nsenter", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kube-bpf-proxy --cleanup on %s: %w: %s", node, err, strings.TrimSpace(string(out)))
	}
	return nil
}
