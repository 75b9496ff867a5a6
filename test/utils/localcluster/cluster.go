// Package localcluster runs a real Kubernetes control plane and two
// simulated nodes on one machine, inside network namespaces of its own:
// etcd, kube-apiserver and kube-controller-manager (whose EndpointSlice
// controller builds the slices the proxy reads) in the first node's
// namespace; pods as network namespaces with a veth to their node and a real
// process inside, with Pod objects whose status is written through the
// status subresource, as a kubelet would. kube-bpf-proxy runs on a node as
// the kubelet would run its DaemonSet's pod (daemonset.go, proxy.go), and so
// do the pods of other workloads, on the pod network, with their
// ServiceAccount's in-cluster credentials (container.go, workload.go).
// The cluster is IPv4 unless Options.Stack makes it dual-stack or IPv6-only
// (stack.go): then its Service ranges, cluster CIDRs, node and pod addresses
// are per family.
//
// Everything it creates (namespaces, cgroups, processes, bpffs mounts) is
// recorded in the cluster directory as it is made, so Down removes all of it,
// from this process or from another one after `up` has exited. Nothing it
// makes has a route out of its namespaces.
package localcluster

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/cgroups"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Options configure Up.
type Options struct {
	// Dir is the cluster directory: credentials, kubeconfigs, logs, data
	// and the record of what exists. Created if missing.
	Dir string
	// KubeBin holds kube-apiserver, kube-controller-manager and kubectl
	// (hack/kube-build.sh prints it).
	KubeBin string
	// Name prefixes the cluster's namespaces and cgroup; random if empty.
	Name string
	// Progress, if set, is told each step as it starts.
	Progress func(format string, args ...any)
	// Image, if set, is the unpacked image every container runs from
	// (the proxies, the probe's workloads): see Image.
	Image *Image
	// Stack is the cluster's IP families: IPv4Only (the default),
	// DualStack or IPv6Only (see Stack).
	Stack Stack
}

// Cluster is a running local cluster.
type Cluster struct {
	Dir     string
	Name    string
	KubeBin string
	Nodes   []NodeInfo
	// Cgroup is the cluster's cgroup: control-plane, system (the
	// proxies) and one per node (its pods) are its children.
	Cgroup string
	// Server is the API server's URL, reachable from the nodes' namespaces
	// (and from this process through Client).
	Server string
	// AdminKubeconfig is a cluster-admin kubeconfig; use it from a node's
	// namespace (Kubectl does).
	AdminKubeconfig string
	// Client is a cluster-admin client whose connections are made inside
	// the first node's namespace.
	Client kubernetes.Interface
	// Config is Client's configuration, for clients with other credentials.
	Config *rest.Config
	// Image is what the containers run from (Options.Image); nil runs
	// the binaries the callers name on the host's file system.
	Image *Image
	// Stack is the cluster's IP families (Options.Stack).
	Stack Stack
}

// Up starts a cluster and returns once the API server is ready, the
// controllers run, the default ServiceAccount exists and both Node objects
// carry their addresses. On failure it removes what it made and says which
// step failed and where that step's log is.
func Up(ctx context.Context, o Options) (c *Cluster, err error) {
	if o.Progress == nil {
		o.Progress = func(string, ...any) {}
	}
	if o.Name == "" {
		b := make([]byte, 3)
		_, _ = rand.Read(b)
		o.Name = "kbp" + hex.EncodeToString(b)
	}
	dir, err := filepath.Abs(o.Dir)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(dir, stateFile)); err == nil {
		return nil, fmt.Errorf("%s already holds a cluster: take it down first", dir)
	}
	for _, b := range []string{"kube-apiserver", "kube-controller-manager", "kubectl"} {
		if _, err := os.Stat(filepath.Join(o.KubeBin, b)); err != nil {
			return nil, fmt.Errorf("%s: %w (hack/kube-build.sh builds it)", b, err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			if derr := Down(dir); derr != nil {
				err = errors.Join(err, fmt.Errorf("cleaning up: %w", derr))
			}
		}
	}()

	links := nodeSubnet
	switch o.Stack {
	case DualStack:
		links += " and " + nodeSubnet6
	case IPv6Only:
		links = nodeSubnet6
	}
	o.Progress("network (%s): namespaces %s-{node1,node2,wan}, node link %s, no route out", o.Stack, o.Name, links)
	if err := withState(dir, func(st *state) error {
		st.Image, st.Stack = o.Image, o.Stack
		return create(st, dir, o.Name)
	}); err != nil {
		return nil, fmt.Errorf("creating the network: %w", err)
	}
	c, err = Open(dir)
	if err != nil {
		return nil, err
	}
	c.KubeBin = o.KubeBin
	if err := c.startControlPlane(ctx, o.Progress); err != nil {
		return nil, err
	}
	return c, nil
}

// create makes the cluster's cgroups, bpffs directories and network.
func create(st *state, dir, name string) error {
	st.Name = name
	mount, err := cgroups.Cgroup2Mount()
	if err != nil {
		return err
	}
	st.Cgroup = filepath.Join(mount, name)
	if err := os.Mkdir(st.Cgroup, 0o755); err != nil {
		return fmt.Errorf("creating cgroup: %w", err)
	}
	for i, zone := range []string{"zone-a", "zone-b"} {
		n := NodeInfo{
			Name:     fmt.Sprintf("node%d", i+1),
			NetNS:    fmt.Sprintf("%s-node%d", name, i+1),
			Zone:     zone,
			Cgroup:   filepath.Join(st.Cgroup, fmt.Sprintf("node%d", i+1)),
			NextHost: 10,
		}
		for _, f := range st.Stack.Families() {
			n.IPs = append(n.IPs, nodeAddr(f, i))
			n.PodCIDRs = append(n.PodCIDRs, podCIDR(f, i))
		}
		n.IP, n.PodCIDR = n.IPs[0], n.PodCIDRs[0]
		// The node's bpffs, mounted as systemd mounts /sys/fs/bpf on a real
		// node: the DaemonSet's proxy has no capability to mount one.
		n.BPFFS = filepath.Join(dir, n.Name, "bpffs")
		if err := os.MkdirAll(n.BPFFS, 0o700); err != nil {
			return err
		}
		st.Mounts = append(st.Mounts, n.BPFFS)
		if err := unix.Mount("bpffs", n.BPFFS, "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mounting bpffs on %s: %w", n.BPFFS, err)
		}
		// A shared mount, as iproute2 makes /run/netns, so that a pod's
		// namespace bound here later reaches the proxy's mount namespace.
		n.NetNSDir = filepath.Join(dir, n.Name, "netns")
		if err := os.MkdirAll(n.NetNSDir, 0o755); err != nil {
			return err
		}
		st.Mounts = append(st.Mounts, n.NetNSDir)
		if err := unix.Mount(n.NetNSDir, n.NetNSDir, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("binding %s: %w", n.NetNSDir, err)
		}
		if err := unix.Mount("", n.NetNSDir, "", unix.MS_SHARED, ""); err != nil {
			return fmt.Errorf("sharing %s: %w", n.NetNSDir, err)
		}
		// The node's xtables lock, created (as iptables would) on first use.
		n.XtablesLock = xtablesLockFile(dir, n.Name)
		if err := os.Mkdir(n.Cgroup, 0o755); err != nil {
			return fmt.Errorf("creating node cgroup: %w", err)
		}
		st.Nodes = append(st.Nodes, n)
	}
	for _, sub := range []string{"control-plane", "system"} {
		if err := os.Mkdir(filepath.Join(st.Cgroup, sub), 0o755); err != nil {
			return fmt.Errorf("creating cgroup: %w", err)
		}
	}
	return buildNetwork(st)
}

// Open returns the cluster recorded in dir.
func Open(dir string) (*Cluster, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	st, err := readState(dir)
	if err != nil {
		return nil, err
	}
	if st.Name == "" {
		return nil, fmt.Errorf("no cluster in %s", dir)
	}
	for i := range st.Nodes {
		if st.Nodes[i].XtablesLock == "" { // recorded before nodes had their own
			st.Nodes[i].XtablesLock = xtablesLockFile(dir, st.Nodes[i].Name)
		}
	}
	c := &Cluster{
		Dir:             dir,
		Name:            st.Name,
		Nodes:           st.Nodes,
		Cgroup:          st.Cgroup,
		Server:          "https://" + net.JoinHostPort(st.Nodes[0].IP, apiServerPort),
		AdminKubeconfig: filepath.Join(dir, "admin.kubeconfig"),
		Image:           st.Image,
		Stack:           st.Stack,
	}
	if p := st.Procs["kube-apiserver"]; p != nil {
		c.KubeBin = filepath.Dir(p.Args[0])
	}
	if _, err := os.Stat(c.AdminKubeconfig); err == nil {
		if err := c.connect(); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// connect builds the admin client from the admin kubeconfig.
func (c *Cluster) connect() error {
	cfg, err := c.RESTConfigFrom(c.AdminKubeconfig)
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	c.Config, c.Client = cfg, cs
	return nil
}

// RESTConfigFrom loads a kubeconfig and makes its connections inside the
// first node's namespace, where the API server is.
func (c *Cluster) RESTConfigFrom(path string) (*rest.Config, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, err
	}
	cfg.Dial = dialIn(c.Nodes[0].NetNS)
	cfg.QPS, cfg.Burst = 100, 200
	return cfg, nil
}

// EtcdURL is etcd's client URL, inside the first node's namespace.
const EtcdURL = "http://127.0.0.1:2379"

// EtcdPrefix is the API server's --etcd-prefix: its objects' keys start
// with it.
const EtcdPrefix = "/registry"

// EtcdHTTPClient returns a client for etcd's HTTP/JSON gateway at EtcdURL
// (/v3/kv/...) whose connections are made inside the first node's
// namespace. Writing objects there bypasses the API server: only the
// benchmark's bulk loader does (test/bench, Populate).
func (c *Cluster) EtcdHTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: dialIn(c.Nodes[0].NetNS), MaxIdleConnsPerHost: 64}}
}

// Node returns the node called name.
func (c *Cluster) Node(name string) (NodeInfo, error) {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n, nil
		}
	}
	return NodeInfo{}, fmt.Errorf("no node %q", name)
}

func (c *Cluster) startControlPlane(ctx context.Context, progress func(string, ...any)) error {
	n1 := c.Nodes[0]
	apiIPs := n1.AllIPs()
	if c.Stack == IPv6Only { // 10.96.0.1 is always in (certs.go)
		apiIPs = append(apiIPs, c.Stack.KubernetesServiceIP())
	}
	creds, err := writeCredentials(c.Dir, apiIPs)
	if err != nil {
		return fmt.Errorf("generating credentials: %w", err)
	}
	write := func(name, content string) error {
		return os.WriteFile(filepath.Join(c.Dir, name), []byte(content), 0o600)
	}
	if err := write("admin.kubeconfig", kubeconfig(c.Server, creds.CACert, "admin", creds.AdminToken)); err != nil {
		return err
	}
	if err := write("kube-controller-manager.kubeconfig", kubeconfig(c.Server, creds.CACert, "system:kube-controller-manager", creds.KCMToken)); err != nil {
		return err
	}
	if err := c.connect(); err != nil {
		return err
	}

	progress("etcd (Debian etcd-server) on %s in %s", EtcdURL, n1.NetNS)
	etcd := c.controlPlaneProc("etcd", []string{"etcd",
		"--name=local", "--data-dir=" + filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls=" + EtcdURL, "--advertise-client-urls=" + EtcdURL,
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=local=http://127.0.0.1:2380",
	})
	if err := c.startProc("etcd", etcd); err != nil {
		return err
	}
	if err := etcd.waitForLine("ready to serve client requests", 30*time.Second); err != nil {
		return fmt.Errorf("etcd: %w", err)
	}

	serviceCIDRs := strings.Join(c.Stack.ServiceCIDRs(), ",")
	progress("kube-apiserver on %s (service CIDR %s)", c.Server, serviceCIDRs)
	f := func(name string) string { return filepath.Join(c.Dir, name) }
	bind := "0.0.0.0"
	if c.Stack.Has(model.IPv6) {
		bind = "::" // both families, or IPv6 only
	}
	api := c.controlPlaneProc("kube-apiserver", []string{filepath.Join(c.KubeBin, "kube-apiserver"),
		"--etcd-servers=" + EtcdURL, "--etcd-prefix=" + EtcdPrefix,
		// The primary family's address: the default/kubernetes Service's
		// endpoints are of its ClusterIP's family.
		"--advertise-address=" + n1.IP, "--bind-address=" + bind, "--secure-port=" + apiServerPort,
		"--tls-cert-file=" + f("apiserver.crt"), "--tls-private-key-file=" + f("apiserver.key"),
		"--client-ca-file=" + f("ca.crt"),
		"--token-auth-file=" + f("tokens.csv"),
		"--authorization-mode=RBAC",
		// As kubeadm's, kind's and minikube's API servers: their
		// kube-proxy DaemonSet runs privileged.
		"--allow-privileged=true",
		// One range per family, the primary first; the API server makes
		// the "kubernetes" ServiceCIDR object of both (MultiCIDRServiceAllocator,
		// GA and on since 1.33).
		"--service-cluster-ip-range=" + serviceCIDRs,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + f("sa.pub"),
		"--service-account-signing-key-file=" + f("sa.key"),
		"--cert-dir=" + f("apiserver-certs"),
		// /debug/pprof for cluster-admin: how the benchmark finds where
		// the API server spends its time (docs/benchmarks.md, "Method").
		"--profiling=true",
	})
	if err := c.startProc("kube-apiserver", api); err != nil {
		return err
	}
	if err := c.waitAPIReady(ctx, api, 90*time.Second); err != nil {
		return err
	}

	progress("kube-controller-manager (EndpointSlice, ServiceAccount, namespace and garbage-collector controllers)")
	kcm := c.controlPlaneProc("kube-controller-manager", []string{filepath.Join(c.KubeBin, "kube-controller-manager"),
		"--kubeconfig=" + f("kube-controller-manager.kubeconfig"),
		// Only what a cluster without kubelets needs: node lifecycle would
		// mark every pod NotReady, since no kubelet posts heartbeats.
		"--controllers=endpointslice-controller,endpointslice-mirroring-controller,serviceaccount-controller," +
			"serviceaccount-token-controller,namespace-controller,garbage-collector-controller," +
			"root-ca-certificate-publisher-controller",
		"--service-account-private-key-file=" + f("sa.key"),
		"--root-ca-file=" + f("ca.crt"),
		"--leader-elect=false",
		"--secure-port=0",
	})
	if err := c.startProc("kube-controller-manager", kcm); err != nil {
		return err
	}
	if err := c.waitFor(ctx, kcm, 60*time.Second, "the default ServiceAccount", func() bool {
		_, err := c.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	}); err != nil {
		return err
	}

	progress("Node objects node1 (zone-a) and node2 (zone-b) with their addresses")
	for _, n := range c.Nodes {
		if err := c.createNode(ctx, n); err != nil {
			return fmt.Errorf("creating Node %s: %w", n.Name, err)
		}
	}
	return nil
}

func (c *Cluster) controlPlaneProc(name string, args []string) *proc {
	return &proc{
		NetNS:  c.Nodes[0].NetNS,
		Cgroup: filepath.Join(c.Cgroup, "control-plane"),
		Args:   args,
		Log:    filepath.Join(c.Dir, "logs", name+".log"),
	}
}

// startProc starts p and records it under name.
func (c *Cluster) startProc(name string, p *proc) error {
	return withState(c.Dir, func(st *state) error {
		if old := st.Procs[name]; old.alive() {
			return fmt.Errorf("%s is already running (pid %d)", name, old.PID)
		}
		if err := p.start(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		st.Procs[name] = p
		return nil
	})
}

func (c *Cluster) proc(name string) (*proc, error) {
	st, err := readState(c.Dir)
	if err != nil {
		return nil, err
	}
	p := st.Procs[name]
	if p == nil {
		return nil, fmt.Errorf("no process %q in cluster %s", name, c.Name)
	}
	return p, nil
}

func (c *Cluster) waitAPIReady(ctx context.Context, api *proc, timeout time.Duration) error {
	return c.waitFor(ctx, api, timeout, "the API server's /readyz", func() bool {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		b, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(rctx)
		return err == nil && strings.TrimSpace(string(b)) == "ok"
	})
}

// waitFor polls ok until it holds, p dies or timeout passes.
func (c *Cluster) waitFor(ctx context.Context, p *proc, timeout time.Duration, what string, ok func() bool) error {
	deadline := time.Now().Add(timeout)
	for {
		if ok() {
			return nil
		}
		if !p.alive() {
			return fmt.Errorf("waiting for %s: %s exited; see %s", what, filepath.Base(p.Args[0]), p.Log)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waiting for %s: not within %s; see %s", what, timeout, p.Log)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (c *Cluster) createNode(ctx context.Context, n NodeInfo) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: n.Name,
			Labels: map[string]string{
				"kubernetes.io/hostname":      n.Name,
				"kubernetes.io/os":            "linux",
				"topology.kubernetes.io/zone": n.Zone,
			},
		},
		// Written as node IPAM would (it does not run: nothing here needs
		// a range handed out), one per family, spec.podCIDR the first.
		Spec: corev1.NodeSpec{PodCIDR: n.PodCIDR, PodCIDRs: n.AllPodCIDRs()},
	}
	created, err := c.Client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	now := metav1.Now()
	var addrs []corev1.NodeAddress
	for _, ip := range n.AllIPs() { // as a kubelet with --node-ip=v4,v6 lists them
		addrs = append(addrs, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
	}
	created.Status = corev1.NodeStatus{
		Addresses: append(addrs, corev1.NodeAddress{Type: corev1.NodeHostName, Address: n.Name}),
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			Message: "simulated node", LastHeartbeatTime: now, LastTransitionTime: now,
		}},
	}
	_, err = c.Client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{})
	return err
}

// StopAPIServer stops kube-apiserver: SIGTERM, then SIGKILL after 5 s (its
// graceful shutdown waits up to a minute for watches to drain). The rest of
// the cluster keeps running; StartAPIServer starts it again.
func (c *Cluster) StopAPIServer() error {
	p, err := c.proc("kube-apiserver")
	if err != nil {
		return err
	}
	return p.stop(5 * time.Second)
}

// StartAPIServer restarts a stopped kube-apiserver and waits until it is
// ready.
func (c *Cluster) StartAPIServer(ctx context.Context) error {
	old, err := c.proc("kube-apiserver")
	if err != nil {
		return err
	}
	p := &proc{NetNS: old.NetNS, Cgroup: old.Cgroup, Args: old.Args, Log: old.Log}
	if err := c.startProc("kube-apiserver", p); err != nil {
		return err
	}
	return c.waitAPIReady(ctx, p, 90*time.Second)
}

// Kubectl runs the cluster's kubectl as admin in the first node's namespace
// and returns its combined output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	return c.KubectlAs(ctx, c.AdminKubeconfig, args...)
}

// KubectlAs runs kubectl with another kubeconfig.
func (c *Cluster) KubectlAs(ctx context.Context, kubeconfig string, args ...string) (string, error) {
	cmd := c.KubectlCommand(ctx, kubeconfig, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// KubectlCommand prepares kubectl in the first node's namespace.
func (c *Cluster) KubectlCommand(ctx context.Context, kubeconfig string, args ...string) *exec.Cmd {
	full := append([]string{"--net=" + netnsPath(c.Nodes[0].NetNS), "--",
		filepath.Join(c.KubeBin, "kubectl"), "--kubeconfig=" + kubeconfig}, args...)
	return exec.CommandContext(ctx, "nsenter", full...)
}

// ServiceAccountKubeconfig writes a kubeconfig for a ServiceAccount, with a
// token from the TokenRequest API, and returns its path.
func (c *Cluster) ServiceAccountKubeconfig(ctx context.Context, namespace, name string, ttl time.Duration) (string, error) {
	token, err := c.requestToken(ctx, namespace, name, ttl)
	if err != nil {
		return "", err
	}
	ca, err := os.ReadFile(filepath.Join(c.Dir, "ca.crt"))
	if err != nil {
		return "", err
	}
	path := filepath.Join(c.Dir, fmt.Sprintf("sa-%s-%s.kubeconfig", namespace, name))
	user := "system:serviceaccount:" + namespace + ":" + name
	return path, os.WriteFile(path, []byte(kubeconfig(c.Server, string(ca), user, token)), 0o600)
}

// requestToken returns a token of a ServiceAccount from the TokenRequest
// API, as the kubelet gets one for a pod.
func (c *Cluster) requestToken(ctx context.Context, namespace, name string, ttl time.Duration) (string, error) {
	secs := int64(ttl.Seconds())
	tr, err := c.Client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &secs},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("requesting a token for %s/%s: %w", namespace, name, err)
	}
	return tr.Status.Token, nil
}

// Down removes everything the cluster in dir made: processes (its cgroup
// tree is killed), bpffs mounts, network namespaces, and the cluster
// directory's record. Logs stay until the directory is removed. It is safe to
// call on a half-made cluster and twice.
func Down(dir string) error {
	var errs []error
	err := withState(dir, func(st *state) error {
		if st.Cgroup != "" {
			if err := cgroups.Remove(st.Cgroup); err != nil {
				errs = append(errs, err)
			}
		}
		for _, m := range st.Mounts {
			if err := unmountAll(m); err != nil {
				errs = append(errs, err)
			}
		}
		for _, ns := range st.Namespaces {
			if _, err := os.Stat(netnsPath(ns)); err == nil {
				if err := run("ip", "netns", "del", ns); err != nil {
					errs = append(errs, err)
				}
			}
		}
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		_ = os.Remove(filepath.Join(dir, stateFile))
		_ = os.RemoveAll(filepath.Join(dir, "etcd"))
		_ = os.RemoveAll(filepath.Join(dir, "prometheus"))
	}
	return errors.Join(errs...)
}

// unmountAll detaches whatever is mounted on path, mounts stacked on it
// and below it included.
func unmountAll(path string) error {
	for {
		err := unix.Unmount(path, unix.MNT_DETACH)
		switch {
		case err == nil:
			continue
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil // not (or no longer) a mount point
		default:
			return fmt.Errorf("unmounting %s: %w", path, err)
		}
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// xtablesLockFile is the xtables lock of the cluster's node name: a file of
// its own, as a real node has /run/xtables.lock to itself.
func xtablesLockFile(dir, name string) string {
	return filepath.Join(dir, name, "xtables.lock")
}
