// Package testnet builds throw-away test topologies on the real kernel: a
// "node" network namespace, pods as network namespaces with a veth to it, and
// a cgroup of the test's own for programs to attach to. Everything carries a
// random suffix, has no route out of the namespaces, and is removed when the
// test ends, also when it fails.
//
// Client processes run in the test's cgroup (so socket programs attached to
// it see them) and in a pod's network namespace; they are joined to the
// cgroup at clone time, before they run any code.
package testnet

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/cgroups"
)

// T is what testnet needs of a test: *testing.T and *testing.B satisfy it,
// and so can a demo program that is not a test.
type T interface {
	Helper()
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Logf(format string, args ...any)
	Skip(args ...any)
	Cleanup(func())
	TempDir() string
}

// Net is one test's topology.
type Net struct {
	t      T
	Prefix string
	// Node is the node's network namespace; pods route through it.
	Node string
	// Cgroup is the test's cgroup v2 directory.
	Cgroup string
	// PodNetNSDir holds a link to each pod's network namespace, as a
	// node's /run/netns holds its pods': a datapath looking for pods'
	// sockets is pointed here, and finds no other test's.
	PodNetNSDir string

	mu    sync.Mutex
	pods  []*Pod
	procs []*exec.Cmd
	// ipv6: the node routes IPv6 (enableIPv6 ran).
	ipv6 bool
}

// Pod is a network namespace with one address, reachable from every other
// pod, or one per family (AddAddress; see dualstack.go).
type Pod struct {
	net  *Net
	Name string
	NS   string
	// IP is the address the pod was made with; IPs are all of its
	// addresses, IP first (IPOf picks one by family).
	IP  netip.Addr
	IPs []netip.Addr
	// HostIf is the node's end of the pod's veth.
	HostIf string
	// outside: a client machine outside the cluster (AddMachine), whose
	// processes never run in the test's cgroup.
	outside bool
}

// PodGateway is the node's address on every pod link, as CNI plugins that
// route per pod do it.
const PodGateway = "10.244.255.254"

// Require skips tests that need root; everywhere else they are real tests.
func Require(t T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces, cgroups and BPF (make test runs as root)")
	}
}

// New creates the node namespace and the test's cgroup.
func New(t T) *Net {
	t.Helper()
	Require(t)
	n := &Net{t: t, Prefix: "kbp" + randomSuffix()}
	n.Node = n.Prefix + "-node"
	t.Cleanup(n.cleanup)

	mount, err := cgroups.Cgroup2Mount()
	if err != nil {
		t.Fatalf("%v", err)
	}
	n.Cgroup = filepath.Join(mount, n.Prefix)
	if err := os.Mkdir(n.Cgroup, 0o755); err != nil {
		t.Fatalf("creating test cgroup: %v", err)
	}
	n.PodNetNSDir = filepath.Join(t.TempDir(), "netns")
	if err := os.Mkdir(n.PodNetNSDir, 0o755); err != nil {
		t.Fatalf("%v", err)
	}
	n.mustRun("ip", "netns", "add", n.Node)
	n.mustRun("ip", "-n", n.Node, "link", "set", "lo", "up")
	n.mustRun("ip", "netns", "exec", n.Node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	// The node answers a REJECT with an ICMP error per attempt; the
	// default per-client limit (one a second after a burst of six) would
	// turn refusals into timeouts in tests that refuse many times.
	n.mustRun("ip", "netns", "exec", n.Node, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
	return n
}

// RouteToPod sends the node's traffic for prefix to pod p, which owns no
// address in it: such packets are dropped there without an answer, as on a
// network where the address leads nowhere. p needs an address of prefix's
// family.
func (n *Net) RouteToPod(prefix string, p *Pod) {
	n.t.Helper()
	via := p.IPOf(netip.MustParsePrefix(prefix).Addr().Is4())
	if !via.IsValid() {
		n.t.Fatalf("RouteToPod %s: pod %s has no address of its family", prefix, p.Name)
	}
	n.mustRun("ip", "-n", n.Node, "route", "add", prefix, "via", via.String(), "dev", p.HostIf, "onlink")
}

// NodeCommand prepares a command in the node's network namespace.
func (n *Net) NodeCommand(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + n.Node, "--"}, args...)...)
}

// AddPod creates a pod namespace with address ip (IPv4, or IPv6 for an
// IPv6-only pod), linked to the node.
func (n *Net) AddPod(name, ip string) *Pod {
	n.t.Helper()
	n.mu.Lock()
	idx := len(n.pods)
	n.mu.Unlock()
	hostIf := fmt.Sprintf("veth%d", idx)
	addr := netip.MustParseAddr(ip)
	p := &Pod{net: n, Name: name, NS: n.Prefix + "-" + name, IP: addr, IPs: []netip.Addr{addr}, HostIf: hostIf}
	n.mustRun("ip", "netns", "add", p.NS)
	n.mu.Lock()
	n.pods = append(n.pods, p)
	n.mu.Unlock()
	if err := os.Symlink("/run/netns/"+p.NS, filepath.Join(n.PodNetNSDir, p.NS)); err != nil {
		n.t.Fatalf("%v", err)
	}
	n.mustRun("ip", "-n", n.Node, "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", p.NS)
	n.mustRun("ip", "-n", n.Node, "link", "set", hostIf, "up")
	n.mustRun("ip", "-n", p.NS, "link", "set", "lo", "up")
	n.mustRun("ip", "-n", p.NS, "link", "set", "eth0", "up")
	n.addPodAddress(p, addr)
	return p
}

// HostNetwork is a pod with hostNetwork: its processes run in the node's
// network namespace, with the node's address towards pods as their own.
// Its clients go in the test's cgroup like any other.
// Over IPv6 (once a pod has an IPv6 address) its address is NodeAddress6.
func (n *Net) HostNetwork() *Pod {
	p := &Pod{net: n, Name: "host", NS: n.Node, IP: netip.MustParseAddr(PodGateway)}
	p.IPs = []netip.Addr{p.IP}
	n.mu.Lock()
	if n.ipv6 {
		p.IPs = append(p.IPs, netip.MustParseAddr(NodeAddress6))
	}
	n.mu.Unlock()
	return p
}

// Command prepares a command in the pod's network namespace. Clients (the
// ones socket programs must see) go in the test's cgroup; servers do not.
func (p *Pod) Command(ctx context.Context, inCgroup bool, args ...string) *exec.Cmd {
	full := append([]string{"--net=/run/netns/" + p.NS, "--"}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", full...)
	cmd.WaitDelay = 5 * time.Second
	if inCgroup && !p.outside {
		fd, err := unix.Open(p.net.Cgroup, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			p.net.t.Fatalf("opening cgroup: %v", err)
		}
		p.net.t.Cleanup(func() { unix.Close(fd) })
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	}
	return cmd
}

// Output runs a client command in the pod and returns its output; a failure
// is returned with stderr for the test to judge.
func (p *Pod) Output(ctx context.Context, args ...string) (string, error) {
	cmd := p.Command(ctx, true, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s in %s: %w: %s", strings.Join(args, " "), p.Name, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// Start starts a long-running process in the pod (outside the test cgroup
// unless inCgroup) and waits until it prints its first line, which servers
// print once they listen. The process is killed when the test ends.
func (p *Pod) Start(inCgroup bool, args ...string) *exec.Cmd {
	p.net.t.Helper()
	cmd := p.Command(context.Background(), inCgroup, args...)
	ready := make(chan string, 1)
	pr, pw, err := os.Pipe()
	if err != nil {
		p.net.t.Fatalf("%v", err)
	}
	cmd.Stdout = pw
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		p.net.t.Fatalf("starting %v in %s: %v", args, p.Name, err)
	}
	pw.Close()
	p.net.track(cmd)
	go func() {
		defer pr.Close()
		r := bufio.NewReader(pr)
		line, _ := r.ReadString('\n')
		ready <- strings.TrimSuffix(line, "\n")
		// Keep draining so the process never blocks on a full pipe.
		_, _ = io.Copy(io.Discard, r)
	}()
	select {
	case line := <-ready:
		if !strings.HasPrefix(line, "ready") {
			p.net.t.Fatalf("%v in %s did not start: %q", args, p.Name, line)
		}
	case <-time.After(30 * time.Second):
		p.net.t.Fatalf("%v in %s printed nothing in 30s", args, p.Name)
	}
	return cmd
}

func (n *Net) track(cmd *exec.Cmd) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.procs = append(n.procs, cmd)
}

// Stop kills a process started with Start and waits for it.
func Stop(cmd *exec.Cmd) {
	if cmd.Process == nil || cmd.ProcessState != nil {
		return
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
}

func (n *Net) cleanup() {
	n.mu.Lock()
	procs, pods := n.procs, n.pods
	n.mu.Unlock()
	for _, cmd := range procs {
		Stop(cmd)
	}
	for _, p := range pods {
		n.run("ip", "netns", "del", p.NS)
	}
	n.run("ip", "netns", "del", n.Node)
	if n.Cgroup != "" {
		if err := cgroups.Remove(n.Cgroup); err != nil {
			n.t.Errorf("%v", err)
		}
	}
}

func (n *Net) mustRun(args ...string) {
	n.t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		n.t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func (n *Net) run(args ...string) {
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		n.t.Logf("cleanup: %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// BPFFS returns a pin directory on a private bpffs: its parent is a fresh
// directory that the datapath under test mounts a bpffs on, as it does on a
// node where none is mounted. The mount is removed when the test ends, which
// also drops any pin left in it.
func BPFFS(t T) string {
	t.Helper()
	Require(t)
	mnt := filepath.Join(t.TempDir(), "bpffs")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		var st unix.Statfs_t
		if unix.Statfs(mnt, &st) == nil && uint32(st.Type) == uint32(unix.BPF_FS_MAGIC) {
			if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
				t.Errorf("unmounting test bpffs: %v", err)
			}
		}
	})
	return filepath.Join(mnt, "kube-bpf-proxy")
}

func randomSuffix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// AttachedPrograms counts the BPF programs attached directly to a cgroup, as
// bpftool reports them.
func AttachedPrograms(t T, cgroup string) int {
	t.Helper()
	n, err := CountAttachedPrograms(cgroup)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return n
}

// CountAttachedPrograms is AttachedPrograms for callers without a T.
func CountAttachedPrograms(cgroup string) (int, error) {
	out, err := exec.Command("bpftool", "-j", "cgroup", "show", cgroup).Output()
	if err != nil {
		return 0, fmt.Errorf("bpftool cgroup show %s: %w", cgroup, err)
	}
	// bpftool prints nothing at all, not [], for a cgroup without programs.
	if len(bytes.TrimSpace(out)) == 0 {
		return 0, nil
	}
	var progs []json.RawMessage
	if err := json.Unmarshal(out, &progs); err != nil {
		return 0, fmt.Errorf("bpftool output %q: %w", out, err)
	}
	return len(progs), nil
}

// StartListener starts a third-party server in the pod (outside the test
// cgroup) and waits until it listens on proto ("tcp" or "udp") port, for
// servers that cannot say when they are ready.
func (p *Pod) StartListener(proto string, port int, args ...string) *exec.Cmd {
	p.net.t.Helper()
	cmd := p.Command(context.Background(), false, args...)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		p.net.t.Fatalf("starting %v in %s: %v", args, p.Name, err)
	}
	p.net.track(cmd)
	flag := "-Hlnt"
	if proto == "udp" {
		flag = "-Hlnu"
	}
	for range 300 {
		out, err := exec.Command("nsenter", "--net=/run/netns/"+p.NS, "--", "ss", flag, fmt.Sprintf("sport = :%d", port)).Output()
		if err == nil && len(bytes.TrimSpace(out)) > 0 {
			return cmd
		}
		time.Sleep(100 * time.Millisecond)
	}
	p.net.t.Fatalf("%v in %s did not listen on %s port %d within 30s", args, p.Name, proto, port)
	return nil
}

// StartDNS runs dnsmasq in the pod on port 53 (UDP and TCP), answering name
// with ip and nothing else, and waits until it listens.
func (p *Pod) StartDNS(name, ip string) *exec.Cmd {
	p.net.t.Helper()
	return p.StartListener("udp", 53, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
		"--conf-file=/dev/null", "--user=root", "--pid-file=", "--port=53", "--log-facility=/dev/null",
		"--address=/"+name+"/"+ip)
}
