package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The test binary doubles as kube-bpf-proxy itself, so the tests run the real
// main: flags, signals and exit codes included.
const runMainEnv = "KBP_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Args = append([]string{"kube-bpf-proxy"}, os.Args[1:]...)
		main()
		return
	}
	testnet.Main(m, nil)
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"unknown flag", []string{"--bogus"}, 2, "usage: kube-bpf-proxy"},
		{"unknown mode", []string{"--mode=ipvs"}, 2, `unknown --mode "ipvs"`},
		{"stray argument", []string{"proxy"}, 2, `unexpected argument "proxy"`},
		{"probe without a role", []string{"probe"}, 2, "usage: kube-bpf-proxy probe server|client"},
		{"probe flag for the proxy", []string{"probe", "client", "--mode=ebpf"}, 2, "usage: kube-bpf-proxy probe client"},
		{"bad duration", []string{"--sync-period=soon"}, 2, "usage: kube-bpf-proxy"},
		{"unknown iptables backend", []string{"--mode=iptables", "--iptables-backend=ipfw"}, 2, `unknown --iptables-backend "ipfw"`},
		{"bad cluster CIDR", []string{"--mode=iptables", "--cluster-cidr=10.244.0.0"}, 2, "--cluster-cidr"},
		{"masquerade bit out of range", []string{"--iptables-masquerade-bit=32"}, 2, "want 0 to 31"},
		{"empty content type", []string{"--kube-api-content-type="}, 2, "--kube-api-content-type is empty: want application/vnd.kubernetes.protobuf"},
		{"unknown content type", []string{"--kube-api-content-type=application/yaml"}, 2, `unknown --kube-api-content-type "application/yaml"`},
		{"negative burst", []string{"--kube-api-burst=-1"}, 2, "--kube-api-burst -1: want 0 or more"},
		{"no burst with a rate limit", []string{"--kube-api-burst=0"}, 2, "--kube-api-burst 0: want at least 1 while --kube-api-qps is above 0"},
		{"QPS not a number", []string{"--kube-api-qps=fast"}, 2, "usage: kube-bpf-proxy"},
		{"negative sync burst", []string{"--sync-burst=-1"}, 2, "--sync-burst -1: want at least 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			code := run(context.Background(), tt.args, io.Discard, &stderr)
			if code != tt.wantCode || !strings.Contains(stderr.String(), tt.wantErr) {
				t.Errorf("run(%q) = %d, stderr %q; want %d and %q", tt.args, code, stderr.String(), tt.wantCode, tt.wantErr)
			}
		})
	}
}

// --bpf-socket-lb-host-netns-only confines the socket layer and gives the
// packet layer the ClusterIPs; without it the packet layer has none.
func TestPacketLayerServesClusterIPsWhenConfined(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{nil, false},
		{[]string{"--bpf-socket-lb-host-netns-only"}, true},
		{[]string{"--bpf-socket-lb-host-netns-only=false"}, false},
	} {
		var o options
		if err := newFlagSet(&o, io.Discard).Parse(tc.args); err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if err := o.validate(); err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		cfg := o.packetLayerConfig(model.IPv4)
		if !cfg.ExternalOnly || cfg.ClusterIPs != tc.want || o.hostNetNSOnly != tc.want {
			t.Errorf("%q: packet layer ExternalOnly %v ClusterIPs %v, socket layer confined %v; want true, %v, %v",
				tc.args, cfg.ExternalOnly, cfg.ClusterIPs, o.hostNetNSOnly, tc.want, tc.want)
		}
	}
}

// Each mode's sync defaults: the ebpf mode lets syncs run back to back,
// the iptables mode keeps kube-proxy's one per period; flags win.
func TestSyncDefaults(t *testing.T) {
	for _, tc := range []struct {
		args      []string
		wantMin   time.Duration
		wantBurst int
	}{
		{nil, 100 * time.Millisecond, 10},
		{[]string{"--mode=iptables"}, time.Second, 1},
		{[]string{"--sync-burst=3", "--min-sync-period=50ms"}, 50 * time.Millisecond, 3},
		{[]string{"--mode=iptables", "--sync-burst=2"}, time.Second, 2},
	} {
		var o options
		if err := newFlagSet(&o, io.Discard).Parse(tc.args); err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if err := o.validate(); err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if o.minSyncPeriod != tc.wantMin || o.syncBurst != tc.wantBurst {
			t.Errorf("%q: min sync period %v, burst %d; want %v, %d", tc.args, o.minSyncPeriod, o.syncBurst, tc.wantMin, tc.wantBurst)
		}
	}
}

func TestVersion(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"--version"}, &stdout, &stderr); code != 0 {
		t.Fatalf("--version exited %d: %s", code, stderr.String())
	}
	if v, ok := strings.CutPrefix(strings.TrimSpace(stdout.String()), "kube-bpf-proxy "); !ok || v == "" {
		t.Errorf("--version printed %q, want \"kube-bpf-proxy <version>\"", stdout.String())
	}
}

// Without --kubeconfig the binary needs the API server's address in its
// environment, as the manifests' ConfigMap sets it; left empty (or never set)
// it exits at once saying what to set, instead of dialling the kubelet's
// ClusterIP and timing out on a node without Service rules.
func TestInClusterAddressMissing(t *testing.T) {
	kubelet := []string{"KUBERNETES_SERVICE_PORT=443", "KUBERNETES_PORT=tcp://10.96.0.1:443", "KUBERNETES_PORT_443_TCP_ADDR=10.96.0.1"}
	tests := []struct {
		name string
		env  []string
		want []string
	}{
		{"the ConfigMap left empty", append([]string{"KUBERNETES_SERVICE_HOST="}, kubelet...),
			[]string{"KUBERNETES_SERVICE_HOST is empty", "ConfigMap kube-system/kube-bpf-proxy-apiserver"}},
		{"port left empty", []string{"KUBERNETES_SERVICE_HOST=192.0.2.10", "KUBERNETES_SERVICE_PORT="},
			[]string{"KUBERNETES_SERVICE_PORT is empty", "ConfigMap kube-system/kube-bpf-proxy-apiserver"}},
		{"outside a pod", nil, []string{"KUBERNETES_SERVICE_HOST is not set", "pass --kubeconfig"}},
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(exe, "--hostname-override=test-node")
			cmd.Env = append([]string{runMainEnv + "=1", "PATH=" + os.Getenv("PATH")}, tt.env...)
			out, err := cmd.CombinedOutput()
			if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 1 {
				t.Fatalf("exit: %v, want status 1; output:\n%s", err, out)
			}
			for _, w := range tt.want {
				if !strings.Contains(string(out), w) {
					t.Errorf("output does not say %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestNodeName(t *testing.T) {
	t.Setenv("NODE_NAME", "Node-From-Env")
	if got, _ := nodeName("Flag-Node"); got != "flag-node" {
		t.Errorf("with flag: %q", got)
	}
	if got, _ := nodeName(""); got != "node-from-env" {
		t.Errorf("from env: %q", got)
	}
	t.Setenv("NODE_NAME", "")
	host, _ := os.Hostname()
	if got, _ := nodeName(""); got != strings.ToLower(host) {
		t.Errorf("from hostname: %q, want %q", got, host)
	}
}

// unreachableKubeconfig points at a loopback port nobody listens on: the
// informers never sync, which is what these tests want to watch.
func unreachableKubeconfig(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kubeconfig")
	cfg := `apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
`
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

type binary struct {
	cmd     *exec.Cmd
	healthz string
	metrics string
	stderr  bytes.Buffer
	// netns is the network namespace it runs in ("": the test's own).
	netns string
}

// get is httpGet of path on addr (b.healthz or b.metrics), from inside
// b's network namespace.
func (b *binary) get(addr, path string) (int, string) {
	if b.netns == "" {
		return httpGet("http://" + addr + path)
	}
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			var conn net.Conn
			err := netnsenter.Do("/run/netns/"+b.netns, func() error {
				var err error
				conn, err = (&net.Dialer{}).DialContext(ctx, network, address)
				return err
			})
			return conn, err
		},
	}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// singleStack turns IPv6 off in the network namespace netns, which makes
// the proxy serve IPv4 alone there (kube-proxy's rule: both families
// whenever the node can). The tests that run the binary on this machine's
// kernel, whose IPv6 works, use it for what is not about IP families.
func singleStack(t *testing.T, netns string) {
	t.Helper()
	out, err := exec.Command("nsenter", "--net=/run/netns/"+netns, "--", "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1").CombinedOutput()
	if err != nil {
		t.Fatalf("turning IPv6 off in %s: %v: %s", netns, err, out)
	}
}

func startBinary(t *testing.T, args ...string) *binary {
	t.Helper()
	return startBinaryIn(t, "", args...)
}

// startBinaryIn starts the binary in the network namespace netns (by name;
// "" is the test's own), where iptables rules are its to write and remove.
func startBinaryIn(t *testing.T, netns string, args ...string) *binary {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b := &binary{healthz: testnet.FreeAddr(t), metrics: testnet.FreeAddr(t), netns: netns}
	args = append(args, "--healthz-bind-address="+b.healthz, "--metrics-bind-address="+b.metrics)
	if netns != "" {
		args = append([]string{"--net=/run/netns/" + netns, "--", exe}, args...)
		exe = "nsenter"
	}
	b.cmd = exec.Command(exe, args...)
	b.cmd.Env = append(os.Environ(), runMainEnv+"=1")
	b.cmd.Stderr = &b.stderr
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testnet.Stop(b.cmd) })
	return b
}

func (b *binary) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- b.cmd.Wait() }()
	select {
	case <-done:
		return b.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		t.Fatalf("kube-bpf-proxy did not exit within %v; log:\n%s", timeout, b.stderr.String())
		return -1
	}
}

// eventually polls cond (the process's startup is not ours to time) for up
// to 30s.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	var last string
	for range 300 {
		var ok bool
		if ok, last = cond(); ok {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: never happened; last: %s", what, last)
}

func httpGet(url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// attachedPrograms is how many programs the eBPF datapath attaches: the
// four socket hooks of each family (connect, sendmsg, recvmsg,
// getpeername) and sock_release.
const attachedPrograms = 9

func TestBinaryLifecycle(t *testing.T) {
	n := testnet.New(t)
	bpffs := testnet.BPFFS(t)
	args := []string{
		"--kubeconfig=" + unreachableKubeconfig(t), "--hostname-override=test-node",
		"--cgroup-path=" + n.Cgroup, "--bpffs-path=" + bpffs,
		"--sync-period=200ms", "--bpf-service-ports-max=64", "--bpf-backend-slots-max=256", "--bpf-sock-revnat-max=256",
	}
	pinned := func() (bool, string) {
		_, err := os.Stat(filepath.Join(bpffs, "links", "getpeername4"))
		return err == nil, fmt.Sprint(err)
	}

	// In the node namespace, IPv4 alone: this is about the process's
	// life, not its families.
	singleStack(t, n.Node)
	first := startBinaryIn(t, n.Node, args...)
	eventually(t, "programs pinned", pinned)
	if got := testnet.AttachedPrograms(t, n.Cgroup); got != attachedPrograms {
		t.Errorf("%d programs attached to the test cgroup, want %d", got, attachedPrograms)
	}
	// The API never answers, so the first sync never happens: once a queued
	// sync is overdue (2 x --sync-period), health says so.
	eventually(t, "healthz 503 while never synced", func() (bool, string) {
		code, body := first.get(first.healthz, "/healthz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "lastUpdated"), fmt.Sprint(code, body)
	})
	// The liveness probe's endpoint stays good: a restart cannot bring the
	// API server back, and the pinned datapath serves meanwhile.
	if code, body := first.get(first.healthz, "/livez"); code != http.StatusOK {
		t.Errorf("/livez = %d %s while the API server is unreachable, want 200", code, body)
	}
	eventually(t, "metrics served", func() (bool, string) {
		code, body := first.get(first.metrics, "/metrics")
		return code == http.StatusOK && strings.Contains(body, "kubeproxy_sync_proxy_rules_duration_seconds"), fmt.Sprint(code)
	})

	// kill -9: the datapath stays attached and pinned.
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	first.wait(t, 10*time.Second)
	if got := testnet.AttachedPrograms(t, n.Cgroup); got != attachedPrograms {
		t.Errorf("after kill -9: %d programs attached, want %d", got, attachedPrograms)
	}

	// A restart takes the pinned links over (updating them in place), and
	// SIGTERM ends it cleanly, leaving the datapath serving.
	second := startBinaryIn(t, n.Node, args...)
	eventually(t, "restarted proxy serves metrics", func() (bool, string) {
		code, _ := second.get(second.metrics, "/metrics")
		return code == http.StatusOK, fmt.Sprint(code)
	})
	if err := second.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := second.wait(t, 5*time.Second); code != 0 {
		t.Errorf("exit status after SIGTERM = %d, want 0; log:\n%s", code, second.stderr.String())
	}
	if !strings.Contains(second.stderr.String(), "Programs in place") && !strings.Contains(second.stderr.String(), "Starting kube-bpf-proxy") {
		t.Errorf("restart log lacks the start line:\n%s", second.stderr.String())
	}
	if got := testnet.AttachedPrograms(t, n.Cgroup); got != attachedPrograms {
		t.Errorf("after SIGTERM: %d programs attached, want %d (the datapath must outlive the process)", got, attachedPrograms)
	}
	if ok, _ := pinned(); !ok {
		t.Error("pins gone after SIGTERM")
	}

	// --cleanup removes both modes: rules of the iptables mode are put in
	// the node namespace first (the binary runs there, never in this
	// machine's own).
	ipt, err := iptables.New(context.Background(), iptables.Config{Backend: iptables.BackendNFT, NetNS: "/run/netns/" + n.Node})
	if err != nil {
		t.Fatal(err)
	}
	defer ipt.Close()
	if err := ipt.Sync(context.Background(), &model.Snapshot{Full: true}); err != nil {
		t.Fatal(err)
	}
	if save := iptablesSave(t, n.Node); !strings.Contains(save, "KUBE-SERVICES") {
		t.Fatalf("no iptables rules to clean up:\n%s", save)
	}
	cleanup := startBinaryIn(t, n.Node, "--cleanup", "--bpffs-path="+bpffs)
	if code := cleanup.wait(t, 10*time.Second); code != 0 {
		t.Fatalf("--cleanup exit status %d; log:\n%s", code, cleanup.stderr.String())
	}
	if got := testnet.AttachedPrograms(t, n.Cgroup); got != 0 {
		t.Errorf("after --cleanup: %d programs attached, want 0", got)
	}
	if _, err := os.Stat(bpffs); !os.IsNotExist(err) {
		t.Errorf("after --cleanup the pin directory is still there: %v", err)
	}
	if save := iptablesSave(t, n.Node); strings.Contains(save, "KUBE-") {
		t.Errorf("after --cleanup iptables rules are left:\n%s", save)
	}
	// Cleaning a clean node succeeds.
	again := startBinaryIn(t, n.Node, "--cleanup", "--bpffs-path="+bpffs)
	if code := again.wait(t, 10*time.Second); code != 0 {
		t.Errorf("--cleanup of a clean node: exit status %d; log:\n%s", code, again.stderr.String())
	}
}

func iptablesSave(t *testing.T, netns string) string {
	t.Helper()
	out, err := exec.Command("nsenter", "--net=/run/netns/"+netns, "--", "iptables-nft-save").Output()
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// In iptables mode the binary picks the node's backend and stops cleanly;
// it writes no rule before the first sync, which never comes here.
func TestBinaryIptablesMode(t *testing.T) {
	n := testnet.New(t)
	singleStack(t, n.Node)
	b := startBinaryIn(t, n.Node, "--mode=iptables", "--kubeconfig="+unreachableKubeconfig(t),
		"--hostname-override=test-node", "--cluster-cidr=10.244.0.0/16")
	eventually(t, "iptables mode started", func() (bool, string) {
		return strings.Contains(b.stderr.String(), `backend="nft"`), b.stderr.String()
	})
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := b.wait(t, 5*time.Second); code != 0 {
		t.Errorf("exit status after SIGTERM = %d, want 0; log:\n%s", code, b.stderr.String())
	}
	if save := iptablesSave(t, n.Node); strings.Contains(save, "KUBE-") {
		t.Errorf("rules written before any sync:\n%s", save)
	}
}

// Without NET_RAW (a DaemonSet that drops it) iptables-legacy cannot read
// tables that exist. --cleanup must then say that legacy rules remain and
// what to do, not report success; with NET_RAW, as the manifests grant it,
// they go.
func TestCleanupOfLegacyRulesNeedsNetRaw(t *testing.T) {
	n := testnet.New(t)
	bpffs := testnet.BPFFS(t)
	legacy := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("nsenter", append([]string{"--net=/run/netns/" + n.Node, "--", "iptables-legacy"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("iptables-legacy %v: %v: %s", args, err, out)
		}
		return string(out)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cleanup := func(caps string) (int, string) {
		cmd := exec.Command("nsenter", "--net=/run/netns/"+n.Node, "--", "setpriv", "--bounding-set="+caps, "--inh-caps=-all", "--",
			exe, "--cleanup", "--bpffs-path="+bpffs)
		cmd.Env = append(os.Environ(), runMainEnv+"=1")
		out, _ := cmd.CombinedOutput()
		return cmd.ProcessState.ExitCode(), string(out)
	}
	// A node without legacy tables needs no NET_RAW at all.
	if code, out := cleanup("-all,+bpf,+net_admin,+sys_admin"); code != 0 {
		t.Errorf("--cleanup without NET_RAW and without legacy tables: exit %d:\n%s", code, out)
	}
	// What an upstream kube-proxy on an iptables-legacy node leaves.
	legacy("-t", "nat", "-N", "KUBE-SERVICES")
	legacy("-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES")
	code, out := cleanup("-all,+bpf,+net_admin,+sys_admin") // the ebpf overlay's
	if code != 1 || !strings.Contains(out, "CAP_NET_RAW") {
		t.Errorf("--cleanup without NET_RAW over legacy rules: exit %d, want 1 with a message naming CAP_NET_RAW:\n%s", code, out)
	}
	if !strings.Contains(legacy("-t", "nat", "-S"), "KUBE-SERVICES") {
		t.Fatal("the legacy rules went without NET_RAW: the check above cannot fail")
	}
	code, out = cleanup("-all,+bpf,+net_admin,+net_raw") // the iptables overlay's
	if code != 0 {
		t.Fatalf("--cleanup with NET_RAW: exit %d:\n%s", code, out)
	}
	if left := legacy("-t", "nat", "-S"); strings.Contains(left, "KUBE-") {
		t.Errorf("legacy rules left after --cleanup with NET_RAW:\n%s", left)
	}
}

// A node that cannot run the eBPF mode gets one line that names the kernel,
// what is missing and what to do, and keeps the datapath that serves it:
// here a restart without the capabilities to load programs, and one given a
// cgroup v1 (or any non-cgroup2) directory.
func TestBinaryPreflightKeepsRunningDatapath(t *testing.T) {
	n := testnet.New(t)
	bpffs := testnet.BPFFS(t)
	args := []string{
		"--kubeconfig=" + unreachableKubeconfig(t), "--hostname-override=test-node",
		"--cgroup-path=" + n.Cgroup, "--bpffs-path=" + bpffs,
		"--bpf-service-ports-max=64", "--bpf-backend-slots-max=256", "--bpf-sock-revnat-max=256",
	}
	linkPin := filepath.Join(bpffs, "links", "connect4")
	first := startBinary(t, args...)
	eventually(t, "programs pinned", func() (bool, string) {
		_, err := os.Stat(linkPin)
		return err == nil, fmt.Sprint(err)
	})
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	first.wait(t, 10*time.Second)

	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name    string
		wrap    []string
		args    []string
		missing string
	}{{
		name:    "no CAP_BPF, CAP_PERFMON or CAP_SYS_ADMIN",
		wrap:    []string{"setpriv", "--inh-caps=-all,+net_admin,+net_raw", "--ambient-caps=-all,+net_admin,+net_raw", "--bounding-set=-all,+net_admin,+net_raw", "--"},
		args:    args,
		missing: "this process lacks CAP_BPF and CAP_PERFMON",
	}, {
		name:    "not a cgroup v2 directory",
		args:    append(slices.Clone(args), "--cgroup-path="+t.TempDir()),
		missing: "no cgroup v2 hierarchy at",
	}} {
		t.Run(c.name, func(t *testing.T) {
			b := &binary{healthz: testnet.FreeAddr(t), metrics: testnet.FreeAddr(t)}
			cmdline := append(slices.Clone(c.wrap), exe)
			cmdline = append(cmdline, c.args...)
			cmdline = append(cmdline, "--healthz-bind-address="+b.healthz, "--metrics-bind-address="+b.metrics)
			b.cmd = exec.Command(cmdline[0], cmdline[1:]...)
			b.cmd.Env = append(os.Environ(), runMainEnv+"=1")
			b.cmd.Stderr = &b.stderr
			if err := b.cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { testnet.Stop(b.cmd) })
			if code := b.wait(t, 30*time.Second); code != 1 {
				t.Errorf("exit status %d, want 1; log:\n%s", code, b.stderr.String())
			}
			lines := strings.Split(strings.TrimSpace(b.stderr.String()), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "kube-bpf-proxy: the eBPF mode cannot run on this node (Linux ") ||
				!strings.Contains(last, c.missing) || !strings.Contains(last, "; ") {
				t.Errorf("last line %q, want the preflight's one line naming %q and what to do", last, c.missing)
			}
			if got := testnet.AttachedPrograms(t, n.Cgroup); got != attachedPrograms {
				t.Errorf("%d programs attached after the refused start, want %d", got, attachedPrograms)
			}
			if _, err := os.Stat(linkPin); err != nil {
				t.Errorf("pins gone after the refused start: %v", err)
			}
		})
	}
}

// In a namespace whose IPv6 works, the binary serves both families, as
// kube-proxy does, and says so as kube-proxy does; with IPv6 off, IPv4
// alone.
func TestBinaryChoosesFamilies(t *testing.T) {
	for _, c := range []struct {
		name   string
		ipv6   bool
		want   []string
		absent string
	}{
		{"IPv6 usable", true, []string{"Using iptables Proxier", `"kube-bpf-proxy running in dual-stack mode" primary ipFamily="IPv4"`, `"Creating dualStackProxier" ipFamilies=["IPv4","IPv6"]`}, "single-stack"},
		{"IPv6 off", false, []string{"Using iptables Proxier", `"kube-bpf-proxy running in single-stack mode" ipFamily="IPv4"`}, "dual-stack"},
	} {
		t.Run(c.name, func(t *testing.T) {
			n := testnet.New(t)
			if !c.ipv6 {
				singleStack(t, n.Node)
			}
			b := startBinaryIn(t, n.Node, "--mode=iptables", "--kubeconfig="+unreachableKubeconfig(t), "--hostname-override=test-node")
			eventually(t, "families logged", func() (bool, string) {
				return strings.Contains(b.stderr.String(), "Proxying for node"), b.stderr.String()
			})
			log := b.stderr.String()
			for _, w := range c.want {
				if !strings.Contains(log, w) {
					t.Errorf("log lacks %s:\n%s", w, log)
				}
			}
			if strings.Contains(log, c.absent) {
				t.Errorf("log says %s:\n%s", c.absent, log)
			}
		})
	}
}
