package localcluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Upstream kube-proxy on a node, run as kubeadm's kube-proxy DaemonSet runs
// it: hostNetwork (the node's network namespace), the ServiceAccount
// kube-system/kube-proxy bound to the built-in ClusterRole
// system:node-proxier, the cluster's pod range as --cluster-cidr, its
// metrics on the node's loopback and its health check on every node
// address. The benchmark runs it beside kube-bpf-proxy, never at the same
// time on one node: both use ports 10249 and 10256.

// KubeProxyOptions say how to run upstream kube-proxy on a node.
type KubeProxyOptions struct {
	// Binary is the kube-proxy binary (hack/kube-build.sh builds it).
	Binary string
	// Mode is --proxy-mode: "iptables" or "nftables".
	Mode string
	// Backend is the iptables mode's backend: IptablesLegacy (the
	// default) or IptablesNFT. The nftables mode takes none.
	Backend string
	// ExtraArgs are added after the flags StartKubeProxy sets.
	ExtraArgs []string
}

// KubeProxyMode values.
const (
	KubeProxyIptables = "iptables"
	KubeProxyNFTables = "nftables"
)

// Backend values: which iptables the iptables mode runs.
const (
	IptablesLegacy = "legacy"
	IptablesNFT    = "nft"
)

const (
	kubeProxyServiceAccount = "kube-proxy"
	// kubeProxyBinding is kubeadm's name for the binding.
	kubeProxyBinding = "kubeadm:node-proxier"
)

func kubeProxyName(node string) string { return "kube-proxy-" + node }

// KubeProxyLog returns the node's kube-proxy log path.
func (c *Cluster) KubeProxyLog(node string) string {
	return filepath.Join(c.Dir, "logs", kubeProxyName(node)+".log")
}

// StartKubeProxy launches upstream kube-proxy on the node and returns at
// once (not synced). The ServiceAccount and its binding are created on
// first use.
//
// The iptables mode runs the backend o.Backend names, legacy by default: a
// directory whose iptables, iptables-save, iptables-restore and ip6tables*
// are xtables-legacy-multi (or xtables-nft-multi) comes first on its PATH,
// as kube-proxy's image picks one backend for the node
// (iptables-nft-restore 1.8.9 takes time growing faster than linearly with
// the number of chains: a first sync of 10k Services on the nft backend
// takes many minutes). The nftables mode runs nft; its PATH is the
// image's, so what it runs of iptables (clearing the other mode's
// leftovers) is the machine's default backend.
//
// --conntrack-max-per-core=0 keeps it from writing nf_conntrack_max, which
// only the machine's initial network namespace can set and which every
// namespace shares. The conntrack timeouts it does set
// (nf_conntrack_tcp_timeout_established and _close_wait) and
// net.ipv4.conf.all.route_localnet (iptables mode) are per network
// namespace, so they stay in the node's.
func (c *Cluster) StartKubeProxy(ctx context.Context, node string, o KubeProxyOptions) error {
	p, err := c.kubeProxyProc(ctx, node, o)
	if err != nil {
		return fmt.Errorf("preparing kube-proxy on %s: %w", node, err)
	}
	return c.startProc(kubeProxyName(node), p)
}

func (c *Cluster) kubeProxyProc(ctx context.Context, node string, o KubeProxyOptions) (*proc, error) {
	n, err := c.Node(node)
	if err != nil {
		return nil, err
	}
	if o.Mode != KubeProxyIptables && o.Mode != KubeProxyNFTables {
		return nil, fmt.Errorf("kube-proxy mode %q: want %s or %s", o.Mode, KubeProxyIptables, KubeProxyNFTables)
	}
	binary, err := filepath.Abs(o.Binary)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(binary); err != nil {
		return nil, fmt.Errorf("kube-proxy binary: %w (hack/kube-build.sh builds it)", err)
	}
	if err := c.ensureKubeProxyRBAC(ctx); err != nil {
		return nil, err
	}
	// Nothing renews the token, unlike a kubelet: a day outlasts any run.
	kubeconfig, err := c.ServiceAccountKubeconfig(ctx, "kube-system", kubeProxyServiceAccount, 24*time.Hour)
	if err != nil {
		return nil, err
	}
	if o.Backend != "" && o.Backend != IptablesLegacy && o.Backend != IptablesNFT {
		return nil, fmt.Errorf("iptables backend %q: want %s or %s", o.Backend, IptablesLegacy, IptablesNFT)
	}
	if o.Backend != "" && o.Mode != KubeProxyIptables {
		return nil, fmt.Errorf("an iptables backend (%s) is for the iptables mode, not %s", o.Backend, o.Mode)
	}
	path, err := c.kubeProxyPath(o.Mode, o.Backend)
	if err != nil {
		return nil, err
	}
	cgroup := filepath.Join(n.Cgroup, "kube-proxy")
	if err := os.Mkdir(cgroup, 0o755); err != nil && !os.IsExist(err) {
		return nil, fmt.Errorf("creating kube-proxy's cgroup: %w", err)
	}
	args := append([]string{binary,
		"--kubeconfig=" + kubeconfig,
		"--hostname-override=" + n.Name,
		"--proxy-mode=" + o.Mode,
		// One per family: upstream's kube-proxy runs a proxier per family
		// of the node.
		"--cluster-cidr=" + strings.Join(c.Stack.ClusterCIDRs(), ","),
		"--conntrack-max-per-core=0",
		"--metrics-bind-address=" + ProxyMetricsAddr,
		"--healthz-bind-address=0.0.0.0:10256",
	}, o.ExtraArgs...)
	return &proc{
		NetNS:  n.NetNS,
		Cgroup: cgroup,
		Args:   args,
		Env:    []string{"PATH=" + path, "HOME=/root", "HOSTNAME=" + n.Name, xtablesLockEnv(n)},
		Log:    c.KubeProxyLog(node),
	}, nil
}

// kubeProxyPath is kube-proxy's PATH in mode: the backend's iptables first
// for the iptables mode, legacy unless backend says nft (see
// StartKubeProxy).
func (c *Cluster) kubeProxyPath(mode, backend string) (string, error) {
	if mode != KubeProxyIptables {
		return imagePath, nil
	}
	dir, err := c.iptablesDir(backend)
	if err != nil {
		return "", err
	}
	return dir + ":" + imagePath, nil
}

// iptablesDir makes (once) the directory of iptables commands that are
// backend ("" is legacy).
func (c *Cluster) iptablesDir(backend string) (string, error) {
	if backend == "" {
		backend = IptablesLegacy
	}
	multi, err := exec.LookPath("xtables-" + backend + "-multi")
	if err != nil {
		return "", fmt.Errorf("finding iptables' %s backend (Debian's iptables package has it): %w", backend, err)
	}
	dir := filepath.Join(c.Dir, "iptables-"+backend)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	for _, name := range []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"} {
		link := filepath.Join(dir, name)
		if target, err := os.Readlink(link); err == nil && target == multi {
			continue
		}
		_ = os.Remove(link)
		if err := os.Symlink(multi, link); err != nil {
			return "", fmt.Errorf("linking %s: %w", link, err)
		}
	}
	return dir, nil
}

// ensureKubeProxyRBAC creates kube-proxy's ServiceAccount and kubeadm's
// binding of it to system:node-proxier (the API server's built-in role:
// Nodes, Services, EndpointSlices and Events) unless they exist.
func (c *Cluster) ensureKubeProxyRBAC(ctx context.Context) error {
	_, err := c.Client.CoreV1().ServiceAccounts("kube-system").Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: kubeProxyServiceAccount},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating ServiceAccount kube-system/%s: %w", kubeProxyServiceAccount, err)
	}
	_, err = c.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: kubeProxyBinding},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:node-proxier"},
		Subjects: []rbacv1.Subject{{
			Kind: rbacv1.ServiceAccountKind, Namespace: "kube-system", Name: kubeProxyServiceAccount,
		}},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating ClusterRoleBinding %s: %w", kubeProxyBinding, err)
	}
	return nil
}

// KubeProxyPID returns the node's running kube-proxy's process ID.
func (c *Cluster) KubeProxyPID(node string) (int, bool) {
	return c.runningPID(kubeProxyName(node))
}

// ProxyPID returns the node's running kube-bpf-proxy's process ID.
func (c *Cluster) ProxyPID(node string) (int, bool) {
	return c.runningPID(proxyName(node))
}

// ControlPlanePIDs returns the process IDs of the running control plane:
// etcd, kube-apiserver and kube-controller-manager.
func (c *Cluster) ControlPlanePIDs() []int {
	var pids []int
	for _, name := range []string{"etcd", "kube-apiserver", "kube-controller-manager"} {
		if pid, ok := c.runningPID(name); ok {
			pids = append(pids, pid)
		}
	}
	return pids
}

func (c *Cluster) runningPID(name string) (int, bool) {
	p, err := c.proc(name)
	if err != nil || !p.alive() {
		return 0, false
	}
	return p.PID, true
}

// StopKubeProxy stops the node's kube-proxy: SIGTERM, then SIGKILL after
// grace. It does nothing if none runs. Its rules stay (CleanupKubeProxy
// removes them).
func (c *Cluster) StopKubeProxy(node string, grace time.Duration) error {
	return c.stopNamed(kubeProxyName(node), grace)
}

// StopProxy stops the node's kube-bpf-proxy: SIGTERM, then SIGKILL after
// grace. It does nothing if none runs. What it programmed stays
// (CleanupProxy removes it).
func (c *Cluster) StopProxy(node string, grace time.Duration) error {
	return c.stopNamed(proxyName(node), grace)
}

func (c *Cluster) stopNamed(name string, grace time.Duration) error {
	p, err := c.proc(name)
	if err != nil {
		return nil // never started
	}
	if err := p.stop(grace); err != nil {
		return fmt.Errorf("stopping %s: %w", name, err)
	}
	return nil
}

// CleanupKubeProxy runs `kube-proxy --cleanup` in the node's namespace
// once with each iptables backend first on its PATH (so the iptables
// mode's cleanup reaches the tables it wrote, whichever backend wrote
// them). kube-proxy's cleanup removes what every mode of it makes
// (iptables chains of both address families, its nftables tables, IPVS
// state), so that a node is left clean whichever mode and backend ran.
func (c *Cluster) CleanupKubeProxy(ctx context.Context, node, binary, mode string) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	var errs []error
	for _, backend := range []string{IptablesLegacy, IptablesNFT} {
		path, err := c.kubeProxyPath(KubeProxyIptables, backend)
		if err != nil {
			return err
		}
		cmd := exec.CommandContext(ctx, "nsenter", "--net="+netnsPath(n.NetNS), "--", binary, "--cleanup")
		cmd.Env = []string{"PATH=" + path, "HOME=/root", xtablesLockEnv(n)}
		out, err := cmd.CombinedOutput()
		if err != nil {
			errs = append(errs, fmt.Errorf("kube-proxy --cleanup (iptables %s first on PATH) on %s: %w: %s", backend, node, err, lastLines(string(out), 10)))
		}
	}
	if mode == KubeProxyIptables {
		if err := c.removeKubeFirewall(ctx, n); err != nil {
			errs = append(errs, err)
		}
	}
	// Both modes set these two timeouts (--conntrack-tcp-timeout-*: 24 h
	// and 1 h); they are the node namespace's own. Back to a new
	// namespace's values (the kernel's nf_conntrack_proto_tcp defaults:
	// 5 days and 60 s), so that the next contender on the node meets
	// what it would on a fresh one.
	for file, value := range map[string]string{
		"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established": "432000",
		"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait":  "60",
	} {
		cmd := exec.CommandContext(ctx, "nsenter", "--net="+netnsPath(n.NetNS), "--", "sh", "-c", "echo "+value+" > "+file)
		if out, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("resetting %s on %s: %w: %s", file, node, err, strings.TrimSpace(string(out))))
		}
	}
	return errors.Join(errs...)
}

// removeKubeFirewall removes what the iptables mode makes and its
// --cleanup leaves (v1.36), on both iptables backends: the filter table's
// KUBE-FIREWALL chain, which drops packets to 127.0.0.0/8 from elsewhere,
// and the jumps to it from INPUT and OUTPUT (it guards route_localnet=1,
// which it sets for NodePorts on localhost); and route_localnet itself,
// back to the kernel's default. Both are the node namespace's own.
func (c *Cluster) removeKubeFirewall(ctx context.Context, n NodeInfo) error {
	in := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netnsPath(n.NetNS), "--"}, args...)...)
		cmd.Env = []string{"PATH=" + imagePath, xtablesLockEnv(n)}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s on %s: %w: %s", strings.Join(args, " "), n.Name, err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	var errs []error
	for _, backend := range []string{IptablesLegacy, IptablesNFT} {
		dir, err := c.iptablesDir(backend)
		if err != nil {
			return err
		}
		for _, cmd := range []string{"iptables", "ip6tables"} {
			ipt := filepath.Join(dir, cmd)
			if in(ipt, "-w", "-t", "filter", "-S", "KUBE-FIREWALL") != nil {
				continue // no such chain
			}
			for _, from := range []string{"INPUT", "OUTPUT"} {
				// Once per jump; a bounded loop in case of duplicates.
				for range 10 {
					if in(ipt, "-w", "-t", "filter", "-D", from, "-j", "KUBE-FIREWALL") != nil {
						break
					}
				}
			}
			for _, op := range []string{"-F", "-X"} {
				if err := in(ipt, "-w", "-t", "filter", op, "KUBE-FIREWALL"); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	if err := in("sh", "-c", "echo 0 > /proc/sys/net/ipv4/conf/all/route_localnet"); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// xtablesLockEnv gives the node's kube-proxy an xtables lock of its own, as
// a real node has (its own /run): the simulated nodes share this machine's
// /run/xtables.lock, and at 10k Services one node's restore held it past
// the other's 5 s wait, so that node's every sync failed ("Can't lock
// /run/xtables.lock") and it never served. iptables reads the path from
// XTABLES_LOCKFILE. It is the file kube-bpf-proxy's DaemonSet mounts at
// /run/xtables.lock on that node (nodePath).
func xtablesLockEnv(n NodeInfo) string {
	return "XTABLES_LOCKFILE=" + n.XtablesLock
}

// xtablesLockPath is the xtables lock's path on a real node.
const xtablesLockPath = "/run/xtables.lock"
