package ebpf

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/testnet"
)

func TestMain(m *testing.M) {
	testnet.Main(m, map[string]func([]string) error{"hold": holdDatapath})
}

// kernelSetup is one test's topology with the datapath attached to its cgroup.
type kernelSetup struct {
	net    *testnet.Net
	cfg    Config
	dp     *Dataplane
	client *testnet.Pod
	pods   []*testnet.Pod
}

// newKernelSetup builds a node, a client pod and n server pods named pod-0..,
// each serving its name on TCP 8080 and 9090 and UDP 5353, and loads the
// datapath with small maps, which configure may change.
func newKernelSetup(t *testing.T, servers int, configure ...func(*Config)) *kernelSetup {
	t.Helper()
	n := testnet.New(t)
	s := &kernelSetup{net: n}
	s.cfg = Config{
		BPFFSPath:   testnet.BPFFS(t),
		CgroupPath:  n.Cgroup,
		MaxServices: 1024,
		MaxBackends: 4096,
		MaxSockets:  4096,
	}
	for _, c := range configure {
		c(&s.cfg)
	}
	s.client = n.AddPod("client", "10.244.0.100")
	for i := range servers {
		p := n.AddPod(fmt.Sprintf("pod-%d", i), fmt.Sprintf("10.244.1.%d", i+1))
		p.Start(false, testnet.Helper("serve", p.Name, "tcp:8080", "udp:5353", "tcp:9090")...)
		s.pods = append(s.pods, p)
	}
	s.dp = s.open(t)
	return s
}

func (s *kernelSetup) open(t *testing.T) *Dataplane {
	t.Helper()
	dp, err := New(s.cfg)
	if err != nil {
		t.Fatalf("loading datapath: %v", err)
	}
	t.Cleanup(func() {
		dp.Close()
		if err := Cleanup(s.cfg.BPFFSPath); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return dp
}

func (s *kernelSetup) backends(port int, pods ...*testnet.Pod) []string {
	var out []string
	for _, p := range pods {
		out = append(out, fmt.Sprintf("%s:%d", p.IP, port))
	}
	return out
}

func (s *kernelSetup) sync(t *testing.T, snap *model.Snapshot) {
	t.Helper()
	if err := s.dp.Sync(context.Background(), snap); err != nil {
		t.Fatalf("sync: %v", err)
	}
}

// run runs a helper client in the client pod and returns its result lines.
func (s *kernelSetup) run(t *testing.T, args ...string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := s.client.Output(ctx, testnet.Helper(args...)...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return strings.Split(strings.TrimSpace(out), "\n")
}

// tally counts result lines by their first two words ("ok pod-1", "err ...").
func tally(lines []string) map[string]int {
	out := make(map[string]int)
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) >= 2 && f[0] == "ok" {
			out["ok "+f[1]]++
		} else {
			out[l]++
		}
	}
	return out
}

const vip = "10.96.0.10"

func TestKernelTCPSpreadsOverBackends(t *testing.T) {
	s := newKernelSetup(t, 3)
	s.sync(t, snapshot(true, servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)))

	lines := s.run(t, "tcp", vip+":80", "60")
	got := tally(lines)
	for _, p := range s.pods {
		if got["ok "+p.Name] == 0 {
			t.Errorf("no connection reached %s in 60: %v", p.Name, got)
		}
	}
	if len(got) != 3 {
		t.Errorf("results other than the three backends: %v", got)
	}
	// getpeername() answers the VIP, never the backend.
	for _, l := range lines {
		if !strings.HasSuffix(l, "peer="+vip+":80") {
			t.Fatalf("getpeername did not return the VIP: %q", l)
		}
	}
	events, err := s.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	if events["connect_translated"] < 60 {
		t.Errorf("datapath counted %d translated connects, want at least 60", events["connect_translated"])
	}
}

func TestKernelUDP(t *testing.T) {
	s := newKernelSetup(t, 3)
	s.sync(t, snapshot(true, servicePort("kube-system", "dns", "dns", model.UDP, vip+":53", s.backends(5353, s.pods...)...)))

	for _, mode := range []string{"unconnected", "connected"} {
		t.Run(mode, func(t *testing.T) {
			lines := s.run(t, "udp", vip+":53", "10", mode)
			got := tally(lines)
			// One backend per socket: all ten answers come from one pod.
			if len(got) != 1 {
				t.Errorf("answers of one socket came from %d places, want 1: %v", len(got), got)
			}
			for _, l := range lines {
				if !strings.HasPrefix(l, "ok pod-") || !strings.Contains(l, "from="+vip+":53") {
					t.Errorf("reply does not come from the VIP: %q", l)
				}
			}
		})
	}

	// Different sockets spread over the backends.
	seen := map[string]bool{}
	for range 20 {
		for k := range tally(s.run(t, "udp", vip+":53", "1")) {
			seen[k] = true
		}
	}
	if len(seen) < 2 {
		t.Errorf("20 sockets all used one backend: %v", seen)
	}
}

func TestKernelDigThroughClusterIP(t *testing.T) {
	s := newKernelSetup(t, 0)
	var dnsPods []*testnet.Pod
	for i := range 2 {
		p := s.net.AddPod(fmt.Sprintf("dns-%d", i), fmt.Sprintf("10.244.2.%d", i+1))
		p.StartDNS("web.kbp.test", "10.96.7.7")
		dnsPods = append(dnsPods, p)
	}
	s.sync(t, snapshot(true,
		servicePort("kube-system", "dns", "dns", model.UDP, vip+":53", s.backends(53, dnsPods...)...),
		servicePort("kube-system", "dns", "dns-tcp", model.TCP, vip+":53", s.backends(53, dnsPods...)...)))

	for _, transport := range []string{"+notcp", "+tcp"} {
		t.Run(transport, func(t *testing.T) {
			for range 5 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				out, err := s.client.Output(ctx, "dig", "@"+vip, "web.kbp.test", "A", transport, "+tries=1", "+timeout=2")
				cancel()
				if err != nil {
					t.Fatal(err)
				}
				if strings.Contains(out, "unexpected source") {
					t.Fatalf("dig saw the backend's address:\n%s", out)
				}
				if !strings.Contains(out, "status: NOERROR") || !strings.Contains(out, "10.96.7.7") {
					t.Fatalf("dig did not get the answer:\n%s", out)
				}
				if !strings.Contains(out, "SERVER: "+vip+"#53") {
					t.Errorf("dig reports another server than the VIP:\n%s", out)
				}
			}
		})
	}
}

func TestKernelSamePortTCPAndUDPAreDifferentServices(t *testing.T) {
	s := newKernelSetup(t, 2)
	s.sync(t, snapshot(true,
		servicePort("default", "mixed", "tcp", model.TCP, vip+":53", s.backends(9090, s.pods[0])...),
		servicePort("default", "mixed", "udp", model.UDP, vip+":53", s.backends(5353, s.pods[1])...)))

	if got := tally(s.run(t, "tcp", vip+":53", "5")); got["ok pod-0"] != 5 {
		t.Errorf("TCP to :53 went elsewhere than pod-0:9090: %v", got)
	}
	if got := tally(s.run(t, "udp", vip+":53", "5")); got["ok pod-1"] != 5 {
		t.Errorf("UDP to :53 went elsewhere than pod-1:5353: %v", got)
	}
}

func TestKernelServiceWithoutEndpointsRefuses(t *testing.T) {
	s := newKernelSetup(t, 0)
	s.sync(t, snapshot(true,
		servicePort("default", "empty", "http", model.TCP, vip+":80"),
		servicePort("default", "empty", "dns", model.UDP, vip+":53")))

	start := time.Now()
	refusals := 0
	for _, args := range [][]string{
		{"tcp", vip + ":80", "3"},
		{"udp", vip + ":53", "3", "connected"},
		{"udp", vip + ":53", "3"},
	} {
		for _, l := range s.run(t, args...) {
			refusals++
			// A refusal, not the helper's 2 s timeout.
			if l != "err connection refused" {
				t.Errorf("%v: got %q, want an immediate refusal", args, l)
			}
		}
	}
	// A refused connect() of a UDP socket ends that client: 3+1+3 calls.
	if refusals != 7 {
		t.Errorf("got %d results, want 7", refusals)
	}
	t.Logf("%d refusals took %v in all, helper processes included", refusals, time.Since(start))
	events, err := s.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	if events["refused_no_backend"] != uint64(refusals) {
		t.Errorf("refused_no_backend = %d, want %d", events["refused_no_backend"], refusals)
	}
}

// connectLoop runs a client that connects in a loop until stopped, and
// collects its results.
type connectLoop struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []string
	done  chan struct{}
}

func startLoop(t *testing.T, s *kernelSetup, addr string) *connectLoop {
	t.Helper()
	l := &connectLoop{done: make(chan struct{})}
	l.cmd = s.client.Command(context.Background(), true, testnet.Helper("loop", addr)...)
	out, err := l.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	l.cmd.Stderr = os.Stderr
	if err := l.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testnet.Stop(l.cmd) })
	ready := make(chan struct{})
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "ready" {
				close(ready)
				continue
			}
			l.mu.Lock()
			l.lines = append(l.lines, sc.Text())
			l.mu.Unlock()
		}
	}()
	<-ready
	return l
}

// take returns the results so far, waiting until there are at least n new.
func (l *connectLoop) take(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		l.mu.Lock()
		if len(l.lines) >= n {
			out := l.lines
			l.lines = nil
			l.mu.Unlock()
			return out
		}
		l.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("connect loop produced fewer than %d results in 30s", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// settle returns what the loop reported up to and including the connect
// that was under way when it was called: every later result comes from a
// connect that started after the caller's last sync.
func (l *connectLoop) settle(t *testing.T) []string {
	t.Helper()
	before := l.take(t, 0)
	return append(before, l.take(t, 1)...)
}

func (l *connectLoop) stop() {
	_ = l.cmd.Process.Signal(os.Interrupt)
	<-l.done
	_ = l.cmd.Wait()
}

func assertAllOK(t *testing.T, phase string, lines []string, allowed ...string) {
	t.Helper()
	for _, l := range lines {
		ok := false
		for _, a := range allowed {
			if strings.HasPrefix(l, "ok "+a+" ") {
				ok = true
			}
		}
		if !ok {
			t.Errorf("%s: unexpected result %q (allowed backends %v)", phase, l, allowed)
			return
		}
	}
}

func TestKernelChurnLosesNoConnect(t *testing.T) {
	s := newKernelSetup(t, 3)
	all := s.backends(8080, s.pods...)
	web := func(backends ...string) model.ServicePort {
		return servicePort("default", "web", "http", model.TCP, vip+":80", backends...)
	}
	s.sync(t, snapshot(true, web(all...)))
	loop := startLoop(t, s, vip+":80")
	defer loop.stop()

	for round := range 5 {
		assertAllOK(t, fmt.Sprintf("round %d with 3", round), loop.take(t, 20), "pod-0", "pod-1", "pod-2")
		s.sync(t, snapshot(false, web(all[1])))
		// Connects under way during the sync may still reach a removed
		// backend; none may fail. From then on only pod-1 answers.
		assertAllOK(t, fmt.Sprintf("round %d, scaling to 1", round), loop.settle(t), "pod-0", "pod-1", "pod-2")
		assertAllOK(t, fmt.Sprintf("round %d with 1", round), loop.take(t, 20), "pod-1")
		s.sync(t, snapshot(false, web(all...)))
		assertAllOK(t, fmt.Sprintf("round %d, scaling to 3", round), loop.settle(t), "pod-0", "pod-1", "pod-2")
	}

	// Deleting the Service: the VIP is no longer known and dies in the
	// namespaces, as an ICMP unreachable from the node or, once the kernel
	// rate-limits those (net.ipv4.route.error_cost, not per namespace), as
	// the client's timeout. Re-creating the Service serves again.
	s.sync(t, withDeleted(snapshot(false), model.ServiceName{Namespace: "default", Name: "web"}))
	loop.settle(t)
	if l := loop.take(t, 1); strings.HasPrefix(l[0], "ok ") {
		t.Errorf("deleted Service still served: %q", l[0])
	}
	s.sync(t, snapshot(false, web(all...)))
	loop.settle(t) // the connect under way across the re-creation may fail
	assertAllOK(t, "re-created", loop.take(t, 20), "pod-0", "pod-1", "pod-2")
}

func TestKernelRestartAdoptsPinnedState(t *testing.T) {
	s := newKernelSetup(t, 2)
	snap := snapshot(true,
		servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...),
		servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...))
	s.sync(t, snap)
	s.dp.Close()

	// The closed process's pins keep serving.
	if got := tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-0"]+got["ok pod-1"] != 10 {
		t.Fatalf("after close: %v", got)
	}

	// A new instance adopts the maps: a full sync of the same state writes nothing.
	counting := &countingMaps{}
	restarted := s.open(t)
	restarted.rec.maps = counting.wrap(restarted.rec.maps)
	if err := restarted.Sync(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	if counting.ops != 0 {
		t.Errorf("restart adoption wrote %d map entries, want 0", counting.ops)
	}
	if got := tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-0"]+got["ok pod-1"] != 10 {
		t.Fatalf("after restart: %v", got)
	}
}

// countingMaps counts writes and deletes that reach the kernel.
type countingMaps struct{ ops int }

type countingMap[K comparable, V any] struct {
	Map[K, V]
	ops *int
}

func (c countingMap[K, V]) Update(k K, v V) error { *c.ops++; return c.Map.Update(k, v) }
func (c countingMap[K, V]) Delete(k K) error      { *c.ops++; return c.Map.Delete(k) }

func (c *countingMaps) wrap(m Maps) Maps {
	return Maps{
		Services: countingMap[lbSvcKey, lbSvcValue]{m.Services, &c.ops},
		Slots:    countingMap[lbSlotKey, uint32]{m.Slots, &c.ops},
		Backends: countingMap[uint32, lbBackendValue]{m.Backends, &c.ops},
	}
}

// holdDatapath is a helper process that loads the datapath, applies a
// snapshot read from a JSON file, prints "ready" and waits to be killed:
// a stand-in for the proxy process in kill -9 tests.
func holdDatapath(args []string) error {
	var in struct {
		Config   Config
		Services []model.ServicePort
	}
	data, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, &in); err != nil {
		return err
	}
	dp, err := New(in.Config)
	if err != nil {
		return err
	}
	if err := dp.Sync(context.Background(), snapshot(true, in.Services...)); err != nil {
		return err
	}
	fmt.Println("ready")
	select {}
}

func TestKernelKill9KeepsServingAndCleanupRemovesAll(t *testing.T) {
	s := newKernelSetup(t, 2)
	s.dp.Close()
	hold := func(ports ...model.ServicePort) *exec.Cmd {
		t.Helper()
		path := t.TempDir() + "/in.json"
		data, err := json.Marshal(map[string]any{"Config": s.cfg, "Services": ports})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return s.client.Start(false, testnet.Helper("hold", path)...)
	}
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	proc := hold(web)
	loop := startLoop(t, s, vip+":80")
	assertAllOK(t, "held", loop.take(t, 20), "pod-0", "pod-1")
	if err := proc.Process.Signal(os.Kill); err != nil {
		t.Fatal(err)
	}
	_ = proc.Wait()
	assertAllOK(t, "after kill -9", loop.take(t, 50), "pod-0", "pod-1")
	loop.stop()

	// A new holder converges: web now on pod-1 only, a second service added.
	other := servicePort("default", "other", "http", model.TCP, "10.96.0.11:80", s.backends(9090, s.pods[0])...)
	proc = hold(servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods[1])...), other)
	if got := tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-1"] != 10 {
		t.Errorf("web after restart: %v, want pod-1 only", got)
	}
	if got := tally(s.run(t, "tcp", "10.96.0.11:80", "3")); got["ok pod-0"] != 3 {
		t.Errorf("service added across restart: %v", got)
	}
	testnet.Stop(proc)

	if err := Cleanup(s.cfg.BPFFSPath); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.cfg.BPFFSPath); !os.IsNotExist(err) {
		t.Errorf("pin directory still there after cleanup: %v", err)
	}
	if got := testnet.AttachedPrograms(t, s.net.Cgroup); got != 0 {
		t.Errorf("%d programs still attached after cleanup", got)
	}
	// And the VIP is no longer translated: it dies in the namespaces.
	if l := s.run(t, "tcp", vip+":80", "1")[0]; strings.HasPrefix(l, "ok ") {
		t.Errorf("VIP still served after cleanup: %q", l)
	}
}

func TestKernelCapacityChangeResizesPinnedMaps(t *testing.T) {
	s := newKernelSetup(t, 2)
	snap := snapshot(true, servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...))
	s.sync(t, snap)
	s.dp.Close()

	// Too small for what is in use: refused, naming the flag, and the old
	// datapath keeps serving.
	small := s.cfg
	small.MaxBackends = 1
	if _, err := New(small); err == nil || !strings.Contains(err.Error(), "--"+FlagMaxBackends) {
		t.Fatalf("New with too small a backend map: %v, want an error naming --%s", err, FlagMaxBackends)
	}
	if got := tally(s.run(t, "tcp", vip+":80", "5")); got["ok pod-0"]+got["ok pod-1"] != 5 {
		t.Fatalf("after refused resize: %v", got)
	}

	// Larger: the maps are migrated, nothing needs rewriting, traffic flows.
	s.cfg.MaxServices *= 2
	s.cfg.MaxBackends *= 2
	s.cfg.MaxSockets *= 2
	counting := &countingMaps{}
	resized := s.open(t)
	resized.rec.maps = counting.wrap(resized.rec.maps)
	if err := resized.Sync(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	if counting.ops != 0 {
		t.Errorf("resized maps needed %d writes, want 0 (entries must be carried over)", counting.ops)
	}
	for name, want := range map[string]uint32{lbMapKbpServices: s.cfg.MaxServices, lbMapKbpBackends: s.cfg.MaxBackends, lbMapKbpRevnat: s.cfg.MaxSockets} {
		if got := pinnedCapacity(t, s.cfg.BPFFSPath, name); got != want {
			t.Errorf("pinned %s holds %d entries, want %d", name, got, want)
		}
	}
	if got := tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-0"]+got["ok pod-1"] != 10 {
		t.Fatalf("after resize: %v", got)
	}
}

func pinnedCapacity(t *testing.T, dir, name string) uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	return m.MaxEntries()
}

func TestKernelReverseEntriesGoWithTheirSocket(t *testing.T) {
	s := newKernelSetup(t, 2)
	s.sync(t, snapshot(true,
		servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...),
		servicePort("default", "dns", "dns", model.UDP, vip+":53", s.backends(5353, s.pods...)...)))
	entries := func() int {
		n := 0
		var (
			k lbRevnatKey
			v lbRevnatValue
		)
		it := s.dp.kernel.objs.KbpRevnat.Iterate()
		for it.Next(&k, &v) {
			n++
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
		return n
	}

	// The helper has exited, so its sockets are released: 20 TCP
	// connections and a connected UDP socket leave nothing behind.
	if got := tally(s.run(t, "tcp", vip+":80", "20")); got["ok pod-0"]+got["ok pod-1"] != 20 {
		t.Fatalf("tcp: %v", got)
	}
	s.run(t, "udp", vip+":53", "3", "connected")
	if n := entries(); n != 0 {
		t.Errorf("%d reverse entries left by closed connected sockets, want 0", n)
	}
	// An unconnected socket has no peer to key on at release: its entry
	// stays until the LRU needs the room.
	s.run(t, "udp", vip+":53", "3")
	if n := entries(); n != 1 {
		t.Errorf("%d reverse entries after one unconnected UDP socket, want 1", n)
	}
}

// The slot map holds one entry per backend of each service port, so two
// services sharing two backends need four: with room for two, the kernel
// refuses the update, the error names the flag, and what fitted is served.
func TestKernelFullMapNamesFlagAndKeepsServing(t *testing.T) {
	s := newKernelSetup(t, 2, func(c *Config) { c.MaxBackends = 2 })
	backends := s.backends(8080, s.pods...)
	err := s.dp.Sync(context.Background(), snapshot(true,
		servicePort("default", "a", "http", model.TCP, "10.96.0.1:80", backends...),
		servicePort("default", "b", "http", model.TCP, "10.96.0.2:80", backends...)))
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "raise --"+FlagMaxBackends) || !strings.Contains(err.Error(), "default/b") {
		t.Fatalf("sync into a full slot map: %v; want ErrMapFull naming --%s and default/b", err, FlagMaxBackends)
	}
	t.Logf("the error a user sees: %v", err)
	if got := tally(s.run(t, "tcp", "10.96.0.1:80", "6")); got["ok pod-0"]+got["ok pod-1"] != 6 {
		t.Errorf("the service that fitted is not served: %v", got)
	}
	// b was never made visible: its VIP is not translated at all.
	if l := s.run(t, "tcp", "10.96.0.2:80", "1")[0]; strings.HasPrefix(l, "ok ") {
		t.Errorf("the service that did not fit answers: %q", l)
	}
}
