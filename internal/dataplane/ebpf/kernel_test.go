package ebpf

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func TestMain(m *testing.M) {
	testnet.Main(m, map[string]func([]string) error{"hold": holdDatapath, "ensure-bpffs": ensureBPFFSHelper, "idle-udp": idleUDP})
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
func newKernelSetup(t testing.TB, servers int, configure ...func(*Config)) *kernelSetup {
	t.Helper()
	n := testnet.New(t)
	s := &kernelSetup{net: n}
	s.cfg = Config{
		BPFFSPath:   testnet.BPFFS(t),
		CgroupPath:  n.Cgroup,
		MaxServices: 1024,
		MaxBackends: 4096,
		MaxSockets:  4096,
		NodeNetNS:   "/run/netns/" + n.Node,
		NetNSDirs:   []string{n.PodNetNSDir},
	}
	for _, c := range configure {
		c(&s.cfg)
	}
	s.client = n.AddPod("client", "10.244.0.100")
	s.pods = n.AddServers(servers)
	s.dp = s.open(t)
	return s
}

func (s *kernelSetup) open(t testing.TB) *Dataplane {
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
	return testnet.Backends(port, pods...)
}

func (s *kernelSetup) sync(t testing.TB, snap *model.Snapshot) {
	t.Helper()
	if err := s.dp.Sync(context.Background(), snap); err != nil {
		t.Fatalf("sync: %v", err)
	}
	// The socket cleanup the sync handed over runs after it returns.
	s.dp.waitSocketCleanup()
}

// run runs a helper client in the client pod and returns its result lines.
func (s *kernelSetup) run(t testing.TB, args ...string) []string {
	t.Helper()
	return s.client.Results(args...)
}

const vip = "10.96.0.10"

// The scenarios both modes share (TCP spread, UDP, dig, refusals, churn,
// restart, cleanup) are in the behaviour suite, test/behaviour.
// These are the eBPF datapath's own: its counters, pins, maps and programs.

func TestKernelCountsTranslationsAndRefusals(t *testing.T) {
	s := newKernelSetup(t, 2)
	s.sync(t, snapshot(true,
		servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...),
		servicePort("default", "empty", "http", model.TCP, "10.96.0.11:80")))
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-0"]+got["ok pod-1"] != 10 {
		t.Fatalf("web: %v", got)
	}
	if got := testnet.Tally(s.run(t, "tcp", "10.96.0.11:80", "3")); got["err connection refused"] != 3 {
		t.Fatalf("empty: %v", got)
	}
	events, err := s.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	if events["connect_translated"] < 10 || events["refused_no_backend"] != 3 {
		t.Errorf("events %v, want connect_translated >= 10 and refused_no_backend = 3", events)
	}
}

func TestKernelRestartAdoptsPinnedState(t *testing.T) {
	s := newKernelSetup(t, 2)
	snap := snapshot(true,
		servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...),
		servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", s.backends(5353, s.pods...)...))
	s.sync(t, snap)
	s.dp.Close()

	// The closed process's pins keep serving.
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-0"]+got["ok pod-1"] != 10 {
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
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-0"]+got["ok pod-1"] != 10 {
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
		Services: countingMap[model.Frontend, lbSvcValue]{m.Services, &c.ops},
		Slots:    countingMap[lbSlotKey, uint32]{m.Slots, &c.ops},
		Backends: countingMap[uint32, backendKey]{m.Backends, &c.ops},
		Stats:    countingMap[uint32, lbSvcStats]{m.Stats, &c.ops},
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

// holdArgs is the command line of a holdDatapath helper with the setup's
// configuration that serves ports.
func (s *kernelSetup) holdArgs(t *testing.T, ports ...model.ServicePort) []string {
	t.Helper()
	path := t.TempDir() + "/in.json"
	data, err := json.Marshal(map[string]any{"Config": s.cfg, "Services": ports})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return testnet.Helper("hold", path)
}

func TestKernelKill9KeepsServingAndCleanupRemovesAll(t *testing.T) {
	s := newKernelSetup(t, 2)
	s.dp.Close()
	hold := func(ports ...model.ServicePort) *exec.Cmd {
		t.Helper()
		return s.client.Start(false, s.holdArgs(t, ports...)...)
	}
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	proc := hold(web)
	loop := s.client.StartLoop(vip + ":80")
	testnet.AssertAllOK(t, "held", loop.Take(20), "pod-0", "pod-1")
	if err := proc.Process.Signal(os.Kill); err != nil {
		t.Fatal(err)
	}
	_ = proc.Wait()
	testnet.AssertAllOK(t, "after kill -9", loop.Take(50), "pod-0", "pod-1")
	loop.Stop()

	// A new holder converges: web now on pod-1 only, a second service added.
	other := servicePort("default", "other", "http", model.TCP, "10.96.0.11:80", s.backends(9090, s.pods[0])...)
	proc = hold(servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods[1])...), other)
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-1"] != 10 {
		t.Errorf("web after restart: %v, want pod-1 only", got)
	}
	if got := testnet.Tally(s.run(t, "tcp", "10.96.0.11:80", "3")); got["ok pod-0"] != 3 {
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
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "5")); got["ok pod-0"]+got["ok pod-1"] != 5 {
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
	for name, want := range map[string]uint32{lbMapKbpServices: s.cfg.withDefaults().MaxFrontends, lbMapKbpBackends: s.cfg.MaxBackends, lbMapKbpRevnat: s.cfg.MaxSockets} {
		if got := pinnedCapacity(t, s.cfg.BPFFSPath, name); got != want {
			t.Errorf("pinned %s holds %d entries, want %d", name, got, want)
		}
	}
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "10")); got["ok pod-0"]+got["ok pod-1"] != 10 {
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
			k uint64
			v lbSockRevnat
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
	// connections and a connected UDP socket, from AF_INET and from
	// AF_INET6 sockets, leave nothing behind; nor do unconnected UDP
	// sockets, which have no peer at release.
	for _, args := range [][]string{{"tcp", vip + ":80", "20"}, {"tcp6", mappedVIP + ":80", "20"}} {
		if got := testnet.Tally(s.run(t, args...)); got["ok pod-0"]+got["ok pod-1"] != 20 {
			t.Fatalf("%v: %v", args, got)
		}
	}
	s.run(t, "udp", vip+":53", "3", "connected")
	s.run(t, "udp6", mappedVIP+":53", "3", "connected")
	if n := entries(); n != 0 {
		t.Errorf("%d reverse entries left by closed connected sockets, want 0", n)
	}
	s.run(t, "udp", vip+":53", "3")
	s.run(t, "udp6", mappedVIP+":53", "3")
	if n := entries(); n != 0 {
		t.Errorf("%d reverse entries left by closed unconnected UDP sockets, want 0", n)
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
	if got := testnet.Tally(s.run(t, "tcp", "10.96.0.1:80", "6")); got["ok pod-0"]+got["ok pod-1"] != 6 {
		t.Errorf("the service that fitted is not served: %v", got)
	}
	// b was never made visible: its VIP is not translated at all.
	if l := s.run(t, "tcp", "10.96.0.2:80", "1")[0]; strings.HasPrefix(l, "ok ") {
		t.Errorf("the service that did not fit answers: %q", l)
	}
}

// A Service with more endpoints than the maps hold, whose ClusterIP sorts
// first, takes nothing from a Service that gets its endpoint in the same
// sync: the small one serves, whichever way the sync comes.
func TestKernelTooBigServiceDoesNotStarveOthers(t *testing.T) {
	s := newKernelSetup(t, 1, func(c *Config) { c.MaxBackends = 4 })
	var many []string
	for i := range 6 {
		many = append(many, fmt.Sprintf("10.244.9.%d:8080", i+1))
	}
	big := servicePort("default", "big", "http", model.TCP, "10.96.0.1:80", many...)
	small := servicePort("default", "small", "http", model.TCP, "10.96.0.2:80")
	s.sync(t, snapshot(true, small))
	small.Backends = servicePort("", "", "", model.TCP, "10.96.0.2:80", s.backends(8080, s.pods...)...).Backends
	for _, full := range []bool{false, true} {
		err := s.dp.Sync(context.Background(), snapshot(full, big, small))
		if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "default/big") || strings.Contains(err.Error(), "default/small") {
			t.Fatalf("full=%v: sync: %v; want ErrMapFull for default/big alone", full, err)
		}
		if got := testnet.Tally(s.run(t, "tcp", "10.96.0.2:80", "4")); got["ok pod-0"] != 4 {
			t.Fatalf("full=%v: the Service that fits is not served: %v", full, got)
		}
	}
}

// A Service shrinks, grows and changes backends in a tight loop while two
// clients connect in a loop: no connect may fail, and no program may find a
// slot or backend missing. A connect that read the old count, or a slot's
// old backend, a moment before an update must still find what it read,
// which only the grace period before each deletion ensures.
func TestKernelChurnNeverLosesAConnect(t *testing.T) {
	s := newKernelSetup(t, 8)
	all := s.backends(8080, s.pods...)
	rng := rand.New(rand.NewPCG(1, 2))
	web := func(n int) model.ServicePort {
		picked := slices.Clone(all)
		rng.Shuffle(len(picked), func(i, j int) { picked[i], picked[j] = picked[j], picked[i] })
		return servicePort("default", "web", "http", model.TCP, vip+":80", picked[:n]...)
	}
	s.sync(t, snapshot(true, web(6)))
	loops := []*testnet.Loop{s.client.StartLoop(vip + ":80"), s.client.StartLoop(vip + ":80")}

	// Hundreds of syncs between 1 and 6 backends, each a random subset of 8
	// (so most also replace backends), for as long as it takes the clients
	// to make thousands of connects.
	const minSyncs, minConnects = 500, 5000
	var results []string
	syncs := 0
	for syncs < minSyncs || len(results) < minConnects {
		s.sync(t, snapshot(false, web(1+rng.IntN(6))))
		syncs++
		if syncs%50 == 0 {
			for _, l := range loops {
				results = append(results, l.Take(1)...)
			}
		}
	}
	connects, failed := stopAndCountFailures(t, loops, results)
	events, err := s.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d syncs, %d connects, %d failed; events %v", syncs, connects, failed, events)
	assertNothingMissing(t, events)
}

// A proxy killed at the wrong moment can leave two backend ids holding one
// backend, a slot pointing at the second. A restart must move the slot to
// the id it keeps before it deletes the other: the slot never dangles.
func TestKernelRestartResolvesDuplicateBackend(t *testing.T) {
	s := newKernelSetup(t, 2)
	snap := snapshot(true, servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...))
	s.sync(t, snap)
	s.dp.Close()

	// Debris: backend id 100 holds what slot 0's backend holds, and slot 0
	// points at it.
	slots := openPinned(t, s.cfg.BPFFSPath, lbMapKbpSlots)
	backends := openPinned(t, s.cfg.BPFFSPath, lbMapKbpBackends)
	svcID := uint32(1)
	key := lbSlotKey{SvcId: svcID, Slot: 0}
	var id uint32
	if err := slots.Lookup(&key, &id); err != nil {
		t.Fatalf("reading slot 0 of service id %d: %v", svcID, err)
	}
	var b lbBackendValue
	if err := backends.Lookup(&id, &b); err != nil {
		t.Fatal(err)
	}
	dup := uint32(100)
	if err := backends.Put(&dup, &b); err != nil {
		t.Fatal(err)
	}
	if err := slots.Put(&key, &dup); err != nil {
		t.Fatal(err)
	}

	restarted := s.open(t)
	loop := s.client.StartLoop(vip + ":80")
	if err := restarted.Sync(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	testnet.AssertAllOK(t, "during the restart's sync", loop.Settle(), "pod-0", "pod-1")
	testnet.AssertAllOK(t, "after it", loop.Take(50), "pod-0", "pod-1")
	loop.Stop()
	events, err := restarted.Events()
	if err != nil {
		t.Fatal(err)
	}
	if events["refused_missing_slot"] != 0 {
		t.Errorf("%d connects found a slot or backend missing, want 0", events["refused_missing_slot"])
	}
	if _, n := restarted.Counts(); n != 2 {
		t.Errorf("%d backends left, want 2: the duplicate must go once nothing holds it", n)
	}
	if err := slots.Lookup(&key, &id); err != nil || id == dup {
		t.Errorf("slot 0 holds %d (%v), want the kept id", id, err)
	}
}

func openPinned(t *testing.T, dir, name string) *ebpf.Map {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// The reconciler overwrites live entries in place: a service's entry when
// its count changes, a slot when its backend is replaced. The kernel's hash
// map links the new element before unlinking the old, and a lookup walking
// the bucket at that moment can miss both, so the programs look again
// (lookup_past_overwrite). Here the service's entry and its slots are
// overwritten as fast as user space can while two clients connect, with
// other entries in the maps so that buckets hold chains: no connect may be
// refused, or leave untranslated and time out.
func TestKernelOverwritesNeverMissALookup(t *testing.T) {
	s := newKernelSetup(t, 2)
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	s.sync(t, snapshot(true, web))
	fe := web.ClusterIP
	svc := s.dp.rec.frontends[fe].group
	ids := slices.Clone(svc.slots)
	// Fillers under ids no service uses, so that buckets hold chains
	// (the maps hold 4096 slots and 1024 services here).
	for i := range uint32(3000) {
		if err := s.dp.rec.maps.Slots.Update(lbSlotKey{SvcId: 1 << 20, Slot: i}, ids[0]); err != nil {
			t.Fatal(err)
		}
	}
	for i := range uint32(900) {
		other := model.Frontend{IP: netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}), Port: 80, Protocol: model.TCP}
		if err := s.dp.rec.maps.Services.Update(other, lbSvcValue{Id: 1 << 20, Count: 0}); err != nil {
			t.Fatal(err)
		}
	}
	loops := []*testnet.Loop{s.client.StartLoop(vip + ":80"), s.client.StartLoop(vip + ":80")}
	var results []string
	rounds := 0
	for len(results) < 20000 {
		for i := range 200 {
			for slot := range uint32(len(ids)) {
				if err := s.dp.rec.maps.Slots.Update(lbSlotKey{SvcId: svc.id, Slot: slot}, ids[(i+int(slot))%len(ids)]); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.dp.rec.maps.Services.Update(fe, lbSvcValue{Id: svc.id, Count: uint32(len(ids))}); err != nil {
				t.Fatal(err)
			}
		}
		rounds += 200
		for _, l := range loops {
			results = append(results, l.Take(1)...)
		}
	}
	connects, failed := stopAndCountFailures(t, loops, results)
	events, err := s.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d rounds of overwrites, %d connects, %d failed; lookups that met an overwrite and looked again: %d",
		rounds, connects, failed, events["lookup_raced_with_update"])
	assertNothingMissing(t, events)
}

// stopAndCountFailures stops connect loops, adds their last results to
// results and fails the test for each that did not reach a pod (naming the
// first five).
func stopAndCountFailures(t *testing.T, loops []*testnet.Loop, results []string) (connects, failed int) {
	t.Helper()
	for _, l := range loops {
		l.Stop()
		results = append(results, l.Take(0)...)
	}
	for _, l := range results {
		if !strings.HasPrefix(l, "ok pod-") {
			if failed < 5 {
				t.Errorf("connect failed: %q", l)
			}
			failed++
		}
	}
	return len(results), failed
}

// assertNothingMissing fails the test if a program found a slot or a
// backend missing, which make-before-break and the grace periods rule out.
func assertNothingMissing(t *testing.T, events map[string]uint64) {
	t.Helper()
	for _, e := range []string{"refused_missing_slot", "refused_missing_backend"} {
		if events[e] != 0 {
			t.Errorf("%s = %d, want 0", e, events[e])
		}
	}
}

// beforeAttachOps runs fn once, before the first program of a swap is
// attached: after the resized maps were copied, while the old programs
// still serve alone.
type beforeAttachOps struct {
	kernelSwapOps
	fn   func()
	done bool
}

func (o *beforeAttachOps) attach(opts link.CgroupOptions) (link.Link, error) {
	if !o.done {
		o.done = true
		o.fn()
	}
	return o.kernelSwapOps.attach(opts)
}

// What the old programs write into a map the programs write (the LRU maps:
// reverse entries, affinity) after it was copied for a resize, until the
// old links go, is in the resized map once the swap is done.
func TestKernelResizeKeepsEntriesWrittenDuringTheSwap(t *testing.T) {
	s := newKernelSetup(t, 2, func(c *Config) { c.MaxAffinity = 64 })
	snap := snapshot(true, withAffinity(servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...), time.Hour))
	s.sync(t, snap)
	s.dp.Close()

	s.cfg.MaxAffinity = 128
	var first []string
	s.cfg.ops = &beforeAttachOps{fn: func() { first = s.run(t, "tcp", vip+":80", "1") }}
	resized := s.open(t)
	if len(first) != 1 || !strings.HasPrefix(first[0], "ok pod-") {
		t.Fatalf("the connect during the swap: %q", first)
	}
	if got := pinnedCapacity(t, s.cfg.BPFFSPath, lbMapKbpAffinity); got != 128 {
		t.Fatalf("pinned affinity map holds %d entries, want 128", got)
	}
	m := openPinned(t, s.cfg.BPFFSPath, lbMapKbpAffinity)
	if n, err := countEntries[lbAffinityKey, lbAffinityValue](m); err != nil || n != 1 {
		t.Errorf("the resized affinity map holds %d entries (%v), want the one written during the swap", n, err)
	}
	// And it is used: the client keeps its backend.
	if err := resized.Sync(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	peer := strings.Fields(first[0])[1]
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "5")); got["ok "+peer] != 5 {
		t.Errorf("after the resize: %v, want every connection to %s, the backend remembered during the swap", got, peer)
	}
}
