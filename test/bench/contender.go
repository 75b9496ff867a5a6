// Package bench measures the datapaths side by side on a local cluster
// (test/utils/localcluster). contender.go runs each compared datapath on
// every node; scale.go fills the cluster with background Services.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodelabel"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// Contender is one datapath the benchmark compares, run on every node of a
// cluster.
type Contender interface {
	// Name is one of results.AllContenders.
	Name() string
	// Start launches the proxies on every node (which hold nothing
	// programmed) and returns once they are launched, not synced.
	Start(ctx context.Context) error
	// Stop stops the proxies (SIGTERM, then SIGKILL after a grace),
	// removes everything they programmed with their own --cleanup, and
	// then checks that every node is clean (see nodeLeftovers); an error
	// says what was left.
	Stop(ctx context.Context) error
	// PIDs returns the running proxies' process IDs by node name (empty
	// for direct).
	PIDs() map[string]int
	// MetricsAddr is where /metrics is served inside each node's network
	// namespace ("" for direct).
	MetricsAddr() string
	// LaunchedAt is when Start began launching the proxies, after the
	// one-time steps before (applying the manifests); zero for direct.
	LaunchedAt() time.Time
}

// ContenderOptions are what the contenders run.
type ContenderOptions struct {
	// Binary is kube-bpf-proxy.
	Binary string
	// KubeProxy is upstream kube-proxy ($KUBE_BIN/kube-proxy).
	KubeProxy string
	// ManifestsDir is the repository's manifests/, whose overlays install
	// kube-bpf-proxy.
	ManifestsDir string
	// ExtraArgs are added to kube-bpf-proxy's flags (for example
	// --bpf-backend-slots-max=N for 50k Services).
	ExtraArgs []string
}

// stopGrace is how long a proxy has to exit after SIGTERM.
const stopGrace = 10 * time.Second

// NewContender returns the contender called name on cluster c.
func NewContender(c *localcluster.Cluster, name string, o ContenderOptions) (Contender, error) {
	abs := func(what, p string) (string, error) {
		if p == "" {
			return "", fmt.Errorf("contender %s: no %s given", name, what)
		}
		a, err := filepath.Abs(p)
		if err != nil {
			return "", err
		}
		if _, err := os.Stat(a); err != nil {
			return "", fmt.Errorf("contender %s: %s: %w", name, what, err)
		}
		return a, nil
	}
	base := contenderBase{c: c, name: name}
	switch name {
	case results.Direct:
		return &directContender{base}, nil
	case results.EBPF, results.IptablesNFT, results.IptablesLegacy:
		bin, err := abs("kube-bpf-proxy binary", o.Binary)
		if err != nil {
			return nil, err
		}
		manifests, err := abs("manifests directory", o.ManifestsDir)
		if err != nil {
			return nil, err
		}
		p := &oursContender{contenderBase: base, binary: bin, manifests: manifests, mode: "ebpf"}
		if name != results.EBPF {
			p.mode = "iptables"
			p.args = []string{"--iptables-backend=" + strings.TrimPrefix(name, "iptables-")}
		}
		p.args = append(p.args, o.ExtraArgs...)
		return p, nil
	case results.KubeProxyIptables, results.KubeProxyIptablesNFT, results.KubeProxyNFTables:
		bin, err := abs("kube-proxy binary", o.KubeProxy)
		if err != nil {
			return nil, err
		}
		k := &kubeProxyContender{contenderBase: base, binary: bin, mode: localcluster.KubeProxyIptables, backend: localcluster.IptablesLegacy}
		switch name {
		case results.KubeProxyIptablesNFT:
			k.backend = localcluster.IptablesNFT
		case results.KubeProxyNFTables:
			k.mode, k.backend = localcluster.KubeProxyNFTables, ""
		}
		return k, nil
	}
	return nil, fmt.Errorf("unknown contender %q (want one of %s)", name, strings.Join(results.AllContenders, ", "))
}

// contenderBase is what every contender shares: the cluster and the check
// that its nodes are clean.
type contenderBase struct {
	c    *localcluster.Cluster
	name string
	// launched is when Start began launching the proxies, after what an
	// operator does once (applying the manifests): a cold start is timed
	// from there.
	launched time.Time
}

func (b contenderBase) Name() string { return b.name }

func (b contenderBase) LaunchedAt() time.Time { return b.launched }

// eachNode runs f for every node and joins the errors: a failure on one
// node must not leave the other one running.
func (b contenderBase) eachNode(f func(node string) error) error {
	var errs []error
	for _, n := range b.c.Nodes {
		if err := f(n.Name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// verifyClean checks every node with nodeLeftovers.
func (b contenderBase) verifyClean(ctx context.Context) error {
	return b.eachNode(func(node string) error {
		left, err := nodeLeftovers(ctx, b.c, node)
		if err != nil {
			return fmt.Errorf("%s: checking %s is clean: %w", b.name, node, err)
		}
		if len(left) > 0 {
			return fmt.Errorf("%s left on %s: %s", b.name, node, strings.Join(left, "; "))
		}
		return nil
	})
}

// nodeLeftovers lists what any contender programmed that is still on the
// node: KUBE- chains in either iptables backend (IPv4 and IPv6),
// kube-proxy's nftables tables, kube-bpf-proxy's pins, programs attached
// to the node's cgroup and its mode label on the Node.
func nodeLeftovers(ctx context.Context, c *localcluster.Cluster, node string) ([]string, error) {
	var left []string
	for _, save := range []string{"iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"} {
		out, err := c.NodeOutput(ctx, node, save)
		if err != nil {
			return nil, err
		}
		var kube []string
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "KUBE-") {
				kube = append(kube, l)
			}
		}
		if len(kube) > 0 {
			left = append(left, fmt.Sprintf("%s lists %q", save, kube))
		}
	}
	out, err := c.NodeOutput(ctx, node, "nft", "list", "tables")
	if err != nil {
		return nil, err
	}
	for _, l := range strings.Split(out, "\n") {
		// kube-proxy's nftables mode makes "ip kube-proxy" and "ip6
		// kube-proxy".
		if f := strings.Fields(l); len(f) == 3 && f[0] == "table" && f[2] == "kube-proxy" {
			left = append(left, "nftables "+f[1]+" kube-proxy")
		}
	}
	n, err := c.Node(node)
	if err != nil {
		return nil, err
	}
	// Pins are files; an empty directory --cleanup leaves holds nothing.
	// Only the proxy's directory is looked at: the kernel shows
	// maps.debug and progs.debug at the root of every bpffs mount (its
	// preloaded iterators).
	err = filepath.WalkDir(filepath.Join(n.BPFFS, "kube-bpf-proxy"), func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if !d.IsDir() {
			left = append(left, "pin "+path)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading the node's bpffs: %w", err)
	}
	progs, err := testnet.CountAttachedPrograms(n.Cgroup)
	if err != nil {
		return nil, err
	}
	if progs > 0 {
		left = append(left, fmt.Sprintf("%d programs attached to %s", progs, n.Cgroup))
	}
	obj, err := c.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading Node %s: %w", node, err)
	}
	if v, ok := obj.Labels[nodelabel.Label]; ok {
		left = append(left, fmt.Sprintf("Node label %s=%s", nodelabel.Label, v))
	}
	return left, nil
}

// directContender runs no proxy: clients reach pod IPs only.
type directContender struct{ contenderBase }

func (d *directContender) Start(context.Context) error { return nil }

// Stop runs nothing but still checks the nodes are clean: a direct cell
// measured on a node with rules left over would not be the physical limit.
func (d *directContender) Stop(ctx context.Context) error { return d.verifyClean(ctx) }
func (d *directContender) PIDs() map[string]int           { return map[string]int{} }
func (d *directContender) MetricsAddr() string            { return "" }

// oursContender is kube-bpf-proxy in one mode, installed as a user installs
// it (the manifests' overlay for the mode, pointed at the API server) and
// run as the applied DaemonSet's pod on every node.
type oursContender struct {
	contenderBase
	binary, manifests string
	// mode is the overlay's (ebpf or iptables); args are added to the
	// DaemonSet's own (the iptables backend, then ContenderOptions'). No
	// --v=2: logging every sync costs CPU the benchmark would count.
	mode string
	args []string
}

func (p *oursContender) Start(ctx context.Context) error {
	if _, err := p.c.ApplyOverlay(ctx, p.manifests, p.mode); err != nil {
		return fmt.Errorf("%s: %w", p.name, err)
	}
	o, err := p.c.DaemonSetProxyOptions(ctx, p.binary)
	if err != nil {
		return fmt.Errorf("%s: %w", p.name, err)
	}
	if got := o.Mode(); got != p.mode {
		return fmt.Errorf("%s: the applied DaemonSet runs mode %q, want %q", p.name, got, p.mode)
	}
	o.Args = p.args
	p.launched = time.Now()
	var started []string
	for _, n := range p.c.Nodes {
		if err := p.c.LaunchProxy(ctx, n.Name, o); err != nil {
			// Leave no half-started contender behind.
			for _, s := range started {
				_ = p.c.StopProxy(s, stopGrace)
			}
			return fmt.Errorf("%s: %w", p.name, err)
		}
		started = append(started, n.Name)
	}
	return nil
}

func (p *oursContender) Stop(ctx context.Context) error {
	err := p.eachNode(func(node string) error {
		if err := p.c.StopProxy(node, stopGrace); err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		// With a kubeconfig, as an operator runs it, --cleanup also takes
		// the Node's mode label away.
		if err := p.c.CleanupProxy(ctx, node, p.binary, "--kubeconfig="+p.c.AdminKubeconfig, "--hostname-override="+node); err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		return nil
	})
	return errors.Join(err, p.verifyClean(ctx))
}

func (p *oursContender) PIDs() map[string]int {
	pids := map[string]int{}
	for _, n := range p.c.Nodes {
		if pid, ok := p.c.ProxyPID(n.Name); ok {
			pids[n.Name] = pid
		}
	}
	return pids
}

func (p *oursContender) MetricsAddr() string { return localcluster.ProxyMetricsAddr }

// kubeProxyContender is upstream kube-proxy in one mode on every node (see
// localcluster.StartKubeProxy).
type kubeProxyContender struct {
	contenderBase
	binary, mode string
	// backend is the iptables mode's backend ("" for nftables).
	backend string
}

func (k *kubeProxyContender) Start(ctx context.Context) error {
	k.launched = time.Now()
	var started []string
	for _, n := range k.c.Nodes {
		if err := k.c.StartKubeProxy(ctx, n.Name, localcluster.KubeProxyOptions{Binary: k.binary, Mode: k.mode, Backend: k.backend}); err != nil {
			for _, s := range started {
				_ = k.c.StopKubeProxy(s, stopGrace)
			}
			return fmt.Errorf("%s: %w", k.name, err)
		}
		started = append(started, n.Name)
	}
	return nil
}

func (k *kubeProxyContender) Stop(ctx context.Context) error {
	err := k.eachNode(func(node string) error {
		if err := k.c.StopKubeProxy(node, stopGrace); err != nil {
			return fmt.Errorf("%s: %w", k.name, err)
		}
		if err := k.c.CleanupKubeProxy(ctx, node, k.binary, k.mode); err != nil {
			return fmt.Errorf("%s: %w", k.name, err)
		}
		return nil
	})
	return errors.Join(err, k.verifyClean(ctx))
}

func (k *kubeProxyContender) PIDs() map[string]int {
	pids := map[string]int{}
	for _, n := range k.c.Nodes {
		if pid, ok := k.c.KubeProxyPID(n.Name); ok {
			pids[n.Name] = pid
		}
	}
	return pids
}

func (k *kubeProxyContender) MetricsAddr() string { return localcluster.ProxyMetricsAddr }
