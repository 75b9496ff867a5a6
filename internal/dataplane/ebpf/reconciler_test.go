package ebpf

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
)

var update = flag.Bool("update", false, "rewrite golden files in testdata/")

func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden file (run with -update to create it): %v", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from golden file (run with -update if the change is intended)\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

// servicePort builds a model.ServicePort for tests; backends are "ip:port".
// The test builders are apitest's, under the names these tests use.
var (
	servicePort = apitest.ServicePort
	snapshot    = apitest.Snapshot
	withDeleted = apitest.Deleted
)

func TestReconcilerLifecycle(t *testing.T) {
	f := newFakeMaps(16, 64)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 16, 64)

	web := func(backends ...string) model.ServicePort {
		return servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", backends...)
	}
	dnsUDP := servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", "10.244.0.5:53", "10.244.1.5:53")
	dnsTCP := servicePort("kube-system", "dns", "dns-tcp", model.TCP, "10.96.0.53:53", "10.244.0.5:53", "10.244.1.5:53")
	threeWeb := web("10.244.0.2:8080", "10.244.0.3:8080", "10.244.1.2:8080")

	steps := []struct {
		name string
		snap *model.Snapshot
	}{
		{"add web and dns (TCP and UDP on one port)", snapshot(true, threeWeb, dnsUDP, dnsTCP)},
		{"scale web 3 to 5", snapshot(false, web("10.244.0.2:8080", "10.244.0.3:8080", "10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"))},
		{"scale web 5 to 2, dropping a middle slot", snapshot(false, web("10.244.0.2:8080", "10.244.1.4:8080"))},
		{"replace one web endpoint", snapshot(false, web("10.244.0.2:8080", "10.244.2.9:8080"))},
		{"web without endpoints refuses", snapshot(false, web())},
		{"web back to 3", snapshot(false, threeWeb)},
		{"delete dns", withDeleted(snapshot(false), dnsUDP.Name.ServiceName)},
		{"full sync of unchanged state writes nothing", snapshot(true, threeWeb)},
	}
	var out strings.Builder
	for _, step := range steps {
		if err := r.sync(step.snap); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		fmt.Fprintf(&out, "## %s\n# operations, in order\n", step.name)
		for _, op := range f.takeLog() {
			fmt.Fprintln(&out, op)
		}
		fmt.Fprintf(&out, "# maps\n%s\n", f.dump())
	}

	// A restarted proxy adopts the pinned maps and rewrites nothing.
	before := f.dump()
	restarted := newReconciler(f.maps(), f.grace(), 16, 64)
	if err := restarted.sync(snapshot(true, threeWeb)); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if ops := f.takeLog(); len(ops) != 0 {
		t.Errorf("restart adoption wrote to the maps: %q", ops)
	}
	if after := f.dump(); after != before {
		t.Errorf("restart changed the maps:\n%s\nwas\n%s", after, before)
	}
	// ...and keeps allocating ids that do not collide.
	if err := restarted.sync(snapshot(false, dnsUDP)); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&out, "## restart, adopt, then add dns back\n# operations, in order\n")
	for _, op := range f.takeLog() {
		fmt.Fprintln(&out, op)
	}
	fmt.Fprintf(&out, "# maps\n%s", f.dump())
	checkGolden(t, "lifecycle.golden", out.String())
}

func TestReconcilerPartialSyncTouchesOnlyChangedService(t *testing.T) {
	f := newFakeMaps(1024, 4096)
	r := newReconciler(f.maps(), f.grace(), 1024, 4096)
	var all []model.ServicePort
	for i := range 100 {
		all = append(all, servicePort("ns", fmt.Sprintf("svc-%d", i), "", model.TCP,
			fmt.Sprintf("10.96.%d.%d:80", i/256, i%256), fmt.Sprintf("10.244.%d.1:80", i), fmt.Sprintf("10.244.%d.2:80", i)))
	}
	if err := r.sync(snapshot(true, all...)); err != nil {
		t.Fatal(err)
	}
	f.takeLog()

	changed := all[42]
	changed.Backends = append(slices.Clone(changed.Backends), model.Backend{IP: netip.MustParseAddr("10.244.42.3"), Port: 80})
	if err := r.sync(snapshot(false, changed)); err != nil {
		t.Fatal(err)
	}
	ops := f.takeLog()
	// One new backend, its slot, the new count.
	if len(ops) != 3 {
		t.Fatalf("one added endpoint took %d operations, want 3:\n%s", len(ops), strings.Join(ops, "\n"))
	}
	for _, want := range []string{"update backends", "update slots", "update services"} {
		if !slices.ContainsFunc(ops, func(op string) bool { return strings.HasPrefix(op, want) }) {
			t.Errorf("missing %q in %q", want, ops)
		}
	}
}

func TestReconcilerFullMapKeepsServingWhatFits(t *testing.T) {
	f := newFakeMaps(2, 64)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 2, 64)
	a := servicePort("ns", "a", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80")
	b := servicePort("ns", "b", "", model.TCP, "10.96.0.2:80", "10.244.0.2:80")
	c := servicePort("ns", "c", "", model.TCP, "10.96.0.3:80", "10.244.0.3:80")

	err := r.sync(snapshot(true, a, b, c))
	failed, only := dataplane.OnlyServicesFailed(err)
	if !only || len(failed) != 1 || failed[0].Service != c.Name || failed[0].Reason != dataplane.ReasonMapFull {
		t.Fatalf("sync of 3 services into 2 entries: got %v, want a SyncError with %s alone, for %s", err, c.Name, dataplane.ReasonMapFull)
	}
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "--"+FlagMaxServices) {
		t.Errorf("error %q is not ErrMapFull naming the flag to raise", err)
	}
	t.Logf("the error a user sees: %v", err)
	for _, fe := range []model.Frontend{a.ClusterIP, b.ClusterIP} {
		if _, ok := f.services.entries[fe]; !ok {
			t.Errorf("%s fitted but is not served", fe)
		}
	}
	if len(f.services.entries) != 2 {
		t.Errorf("services map holds %d entries, want 2", len(f.services.entries))
	}
	checkCopy(t, r, f)
	// The leftover backend of the failed service is not leaked.
	if err := r.sync(snapshot(true, a, b)); err != nil {
		t.Fatalf("sync of what fits: %v", err)
	}
	if len(f.backends.entries) != 2 || len(f.slots.entries) != 2 {
		t.Errorf("after dropping c: %d backends, %d slots; want 2 and 2\n%s", len(f.backends.entries), len(f.slots.entries), f.dump())
	}
}

// A sync that replaces and adds backends into a slot map with room for only
// some of them fails for that port, which keeps serving its old backends:
// retried, it fails the same way without losing any.
func TestReconcilerFullSlotMapLeavesPortAsItWas(t *testing.T) {
	f := newFakeMaps(16, 7)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 16, 7)
	web := func(b ...string) model.ServicePort {
		return servicePort("ns", "web", "", model.TCP, "10.96.0.1:80", b...)
	}
	// other shares web's backends, so the slot map fills before the backend
	// map: 6 of 7 slots, 3 of 7 backends.
	other := servicePort("ns", "other", "", model.TCP, "10.96.0.2:80", "10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80")
	if err := r.sync(snapshot(true, other, web("10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80"))); err != nil {
		t.Fatal(err)
	}
	before := served(f)
	// Replace one, add two: three slots to write, one free.
	grown := web("10.244.0.1:80", "10.244.0.4:80", "10.244.0.3:80", "10.244.0.5:80", "10.244.0.6:80")
	for retry := range 3 {
		err := r.sync(snapshot(true, other, grown))
		failed, only := dataplane.OnlyServicesFailed(err)
		if !only || len(failed) != 1 || failed[0].Service != grown.Name || failed[0].Reason != dataplane.ReasonMapFull {
			t.Fatalf("try %d: got %v, want a SyncError for %s alone, %s", retry, err, grown.Name, dataplane.ReasonMapFull)
		}
		checkCopy(t, r, f)
		if got := served(f); got != before {
			t.Fatalf("try %d: serving\n%swant, as before\n%s", retry, got, before)
		}
	}
}

// A removed service frees its entries and id only after the grace period,
// at the end of the sync: what did not fit before then gets a second chance
// in the same sync.
func TestReconcilerRemovalMakesRoomInTheSameSync(t *testing.T) {
	f := newFakeMaps(2, 4)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 2, 4)
	a := servicePort("ns", "a", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80", "10.244.0.2:80")
	b := servicePort("ns", "b", "", model.TCP, "10.96.0.2:80", "10.244.0.3:80")
	c := servicePort("ns", "c", "", model.TCP, "10.96.0.3:80", "10.244.0.4:80", "10.244.0.5:80")
	if err := r.sync(snapshot(true, a, b)); err != nil {
		t.Fatal(err)
	}
	if err := r.sync(snapshot(true, b, c)); err != nil {
		t.Fatalf("replacing a by c at capacity: %v", err)
	}
	checkCopy(t, r, f)
	want := "10.96.0.2:80/TCP -> 10.244.0.3:80\n10.96.0.3:80/TCP -> 10.244.0.4:80 10.244.0.5:80\nentries: 2 services, 3 slots, 3 backends\n"
	if got := served(f); got != want {
		t.Errorf("serving\n%swant\n%s", got, want)
	}
}

func TestReconcilerRecoversFromFailedWrite(t *testing.T) {
	f := newFakeMaps(16, 64)
	watchHoles(t, f)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	three := servicePort("ns", "web", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80")
	if err := r.sync(snapshot(true, three)); err != nil {
		t.Fatal(err)
	}
	five := servicePort("ns", "web", "", model.TCP, "10.96.0.1:80",
		"10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80", "10.244.0.4:80", "10.244.0.5:80")

	// The last new slot fails: the count must stay 3 and nothing dangle.
	injected := errors.New("injected failure")
	f.fail = func(op fakeOp) error {
		if k, ok := op.key.(lbSlotKey); ok && op.kind == "update" && k.Slot == 4 {
			return injected
		}
		return nil
	}
	if err := r.sync(snapshot(false, five)); !errors.Is(err, injected) {
		t.Fatalf("got %v, want the injected failure", err)
	}
	if got := f.services.entries[three.ClusterIP].Count; got != 3 {
		t.Errorf("count after failed scale-up = %d, want 3 (unchanged)", got)
	}

	f.fail = nil
	if err := r.sync(snapshot(true, five)); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if got := f.services.entries[three.ClusterIP].Count; got != 5 {
		t.Errorf("count after retry = %d, want 5", got)
	}
	if len(f.backends.entries) != 5 || len(f.slots.entries) != 5 {
		t.Errorf("after retry: %d backends, %d slots, want 5 and 5\n%s", len(f.backends.entries), len(f.slots.entries), f.dump())
	}
}

// A proxy killed half-way through a sync leaves debris; the next one must
// adopt what is right and clean up the rest, deleting nothing before a grace
// period: the killed proxy may have hidden it a moment ago.
func TestReconcilerRestoreCleansLeftovers(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	web := servicePort("ns", "web", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80", "10.244.0.2:80")
	if err := r.sync(snapshot(true, web)); err != nil {
		t.Fatal(err)
	}
	svcID := idOf(f.services.entries[web.ClusterIP])
	// Debris: a slot past the count (interrupted shrink), slots of a service
	// whose entry was never written (interrupted create) and its counters,
	// a backend nothing references (interrupted delete), counters of an id
	// nothing holds (interrupted release). The live port's counters are
	// kept as they are.
	f.slots.entries[lbSlotKey{SvcId: svcID, Slot: 7}] = 1
	f.slots.entries[lbSlotKey{SvcId: 99, Slot: 0}] = 1
	f.backends.entries[42] = backendKey{Backend: model.Backend{IP: netip.MustParseAddr("10.244.9.9"), Port: 80}, Protocol: model.TCP}
	f.stats.entries[99] = lbSvcStats{Refused: 1}
	f.stats.entries[77] = lbSvcStats{Connections: 2}
	f.stats.entries[svcID] = lbSvcStats{Connections: 5, Reverse: 3}
	f.takeLog()
	watchHoles(t, f)
	watchReaders(t, f)

	restarted := newReconciler(f.maps(), f.grace(), 16, 64)
	if err := restarted.sync(snapshot(true, web)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, restarted, f)
	checkGolden(t, "restore-leftovers.golden", strings.Join(f.takeLog(), "\n")+"\n# maps\n"+f.dump())
}

// A proxy killed between writing a backend and recording it can leave two
// ids holding one backend, a slot on either. The copy records the id each
// slot really holds: a sync moves slots to the id it keeps before deleting
// the other, and an id a slot still holds is never deleted.
func TestReconcilerRestoreDuplicateBackends(t *testing.T) {
	web := servicePort("ns", "web", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80", "10.244.0.2:80")
	other := servicePort("ns", "other", "", model.TCP, "10.96.0.2:80", "10.244.0.3:80")
	otherGrown := servicePort("ns", "other", "", model.TCP, "10.96.0.2:80", "10.244.0.3:80", "10.244.0.4:80")
	api := servicePort("ns", "api", "", model.TCP, "10.96.0.3:80", "10.244.0.1:80")
	webSlot0 := lbSlotKey{SvcId: 1, Slot: 0}

	tests := []struct {
		name  string
		syncs []*model.Snapshot
		check func(t *testing.T, f *fakeMaps)
		want  string
	}{
		{
			name:  "a full sync moves the slot to the kept id, then deletes the duplicates",
			syncs: []*model.Snapshot{snapshot(true, web, other)},
			check: func(t *testing.T, f *fakeMaps) {
				if id := f.slots.entries[webSlot0]; id != 1 {
					t.Errorf("web's slot 0 holds id %d, want the kept id 1", id)
				}
			},
			want: "10.96.0.1:80/TCP -> 10.244.0.1:80 10.244.0.2:80\n10.96.0.2:80/TCP -> 10.244.0.3:80\n" +
				"entries: 2 services, 3 slots, 3 backends\n",
		},
		{
			name: "a sync without the holder keeps the id it holds, and uses it",
			syncs: []*model.Snapshot{
				snapshot(false, otherGrown), // id 1 is unreferenced and goes; 7 stays
				snapshot(false, api),        // takes 10.244.0.1:80 as id 7
				snapshot(true, web, otherGrown, api),
			},
			check: func(t *testing.T, f *fakeMaps) {
				if id := f.slots.entries[webSlot0]; id != 7 {
					t.Errorf("web's slot 0 holds id %d, want 7, the only id left for its backend", id)
				}
				if _, ok := f.backends.entries[1]; ok {
					t.Errorf("unreferenced id 1 was kept")
				}
			},
			want: "10.96.0.1:80/TCP -> 10.244.0.1:80 10.244.0.2:80\n10.96.0.2:80/TCP -> 10.244.0.3:80 10.244.0.4:80\n" +
				"10.96.0.3:80/TCP -> 10.244.0.1:80\nentries: 3 services, 5 slots, 4 backends\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeMaps(16, 64)
			r := newReconciler(f.maps(), f.grace(), 16, 64)
			if err := r.sync(snapshot(true, web, other)); err != nil {
				t.Fatal(err)
			}
			// Ids 1, 2, 3 hold 10.244.0.1, .2 and .3. Debris: id 7 holds
			// 10.244.0.1 too and web's slot 0 points at it; id 8 holds
			// 10.244.0.3 too and nothing points at it.
			f.backends.entries[7] = f.backends.entries[1]
			f.slots.entries[webSlot0] = 7
			f.backends.entries[8] = f.backends.entries[3]
			watchHoles(t, f)
			watchReaders(t, f)

			restarted := newReconciler(f.maps(), f.grace(), 16, 64)
			for i, snap := range tt.syncs {
				if err := restarted.sync(snap); err != nil {
					t.Fatalf("sync %d: %v", i, err)
				}
				checkCopy(t, restarted, f)
			}
			tt.check(t, f)
			if got := served(f); got != tt.want {
				t.Errorf("serving\n%swant\n%s", got, tt.want)
			}
		})
	}
}

func TestLayoutSlots(t *testing.T) {
	tests := []struct {
		name string
		old  []uint32
		want []uint32
		out  []uint32
	}{
		{"new service", nil, []uint32{1, 2, 3}, []uint32{1, 2, 3}},
		{"unchanged", []uint32{3, 1, 2}, []uint32{1, 2, 3}, []uint32{3, 1, 2}},
		{"grow keeps places", []uint32{3, 1}, []uint32{1, 2, 3}, []uint32{3, 1, 2}},
		{"shrink moves survivor from a surplus slot into a hole", []uint32{1, 2, 3}, []uint32{1, 3}, []uint32{1, 3}},
		{"replace in place", []uint32{1, 2, 3}, []uint32{1, 4, 3}, []uint32{1, 4, 3}},
		{"to empty", []uint32{1, 2}, nil, []uint32{}},
		{"holes from restore are refilled", []uint32{0, 2}, []uint32{1, 2}, []uint32{1, 2}},
		{"duplicates collapse", nil, []uint32{5, 5, 6}, []uint32{5, 6}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := layoutSlots(tt.old, tt.want)
			if !slices.Equal(got, tt.out) {
				t.Errorf("layoutSlots(%v, %v) = %v, want %v", tt.old, tt.want, got, tt.out)
			}
		})
	}
}

func TestIDAllocator(t *testing.T) {
	a := newIDAllocator(3)
	a.reserve(2)
	var got []uint32
	for range 2 {
		id, err := a.allocate()
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, id)
	}
	// Next-fit continues after the highest restored id, then wraps.
	if !slices.Equal(got, []uint32{3, 1}) {
		t.Errorf("allocated %v, want [3 1]", got)
	}
	if _, err := a.allocate(); err == nil {
		t.Error("allocating past the maximum succeeded")
	}
	a.release(3)
	if id, err := a.allocate(); err != nil || id != 3 {
		t.Errorf("after release: got %d, %v; want 3", id, err)
	}
	// An id past the maximum, found in maps a larger capacity pinned,
	// holds an entry until released, and is never handed out.
	b := newIDAllocator(64)
	b.reserve(1000)
	if b.free() != 63 || !b.isUsed(1000) {
		t.Errorf("after reserving 1000 of 64: free %d, used %t", b.free(), b.isUsed(1000))
	}
	b.release(1000)
	if b.free() != 64 || b.isUsed(1000) {
		t.Errorf("after releasing it: free %d, used %t", b.free(), b.isUsed(1000))
	}
}

// BenchmarkReconcilerOneChangeLargeService replaces one endpoint of a
// service with 5000 (fake maps: the reconciler's own cost, no kernel).
func BenchmarkReconcilerOneChangeLargeService(b *testing.B) {
	f := newFakeMaps(16, 20000)
	r := newReconciler(f.maps(), f.grace(), 16, 20000)
	var backends []string
	for i := range 5000 {
		backends = append(backends, fmt.Sprintf("10.%d.%d.%d:80", 128+i>>16, (i>>8)&255, i&255))
	}
	orig := servicePort("ns", "big", "", model.TCP, "10.96.0.1:80", backends...)
	if err := r.sync(snapshot(true, orig)); err != nil {
		b.Fatal(err)
	}
	changed := orig
	changed.Backends = append([]model.Backend{{IP: netip.MustParseAddr("10.250.0.1"), Port: 80}}, orig.Backends[1:]...)
	variants := [2]*model.Snapshot{snapshot(false, changed), snapshot(false, orig)}
	i := 0
	for b.Loop() {
		if err := r.sync(variants[i%2]); err != nil {
			b.Fatal(err)
		}
		f.takeLog()
		i++
	}
}

// A port too big for the maps is refused before it writes anything: it
// takes no capacity from the ports after it, in this sync or the next. One
// Service with more endpoints than --bpf-backend-slots-max must not starve a
// Service created beside it (seen in the e2e when its ClusterIP sorted
// first: each retry filled the backend ids, and the small Service, already
// created with no endpoints, refused connections for good).
func TestReconcilerTooBigPortTakesNothingFromOthers(t *testing.T) {
	var big []string
	for i := range 10 {
		big = append(big, fmt.Sprintf("10.244.1.%d:80", i+1))
	}
	cases := []struct {
		name string
		// big sorts before small, so is tried first.
		big, small model.ServicePort
	}{
		{"backends", servicePort("ns", "big", "", model.TCP, "10.96.0.1:80", big...),
			servicePort("ns", "small", "", model.TCP, "10.96.0.2:80", "10.244.0.1:80")},
		// Backends shared with another port: only the slot map overflows.
		{"slots", servicePort("ns", "big", "", model.TCP, "10.96.0.1:80", big[:6]...),
			servicePort("ns", "small", "", model.TCP, "10.96.0.2:80", "10.244.0.1:80")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeMaps(16, 8)
			watchHoles(t, f)
			watchReaders(t, f)
			r := newReconciler(f.maps(), f.grace(), 16, 8)
			var base []model.ServicePort
			if tc.name == "slots" {
				base = append(base, servicePort("ns", "shared", "", model.TCP, "10.96.0.9:80", big[:6]...))
			}
			empty := tc.small
			empty.Backends = nil
			if err := r.sync(snapshot(true, append(base, empty)...)); err != nil {
				t.Fatal(err)
			}
			for _, full := range []bool{false, true, false, true} {
				err := r.sync(snapshot(full, append(base, tc.big, tc.small)...))
				failed, only := dataplane.OnlyServicesFailed(err)
				if !only || len(failed) != 1 || failed[0].Service != tc.big.Name || failed[0].Reason != dataplane.ReasonMapFull {
					t.Fatalf("full=%v: got %v, want a SyncError for %s alone, %s", full, err, tc.big.Name, dataplane.ReasonMapFull)
				}
				if !strings.Contains(err.Error(), "--"+FlagMaxBackends) {
					t.Errorf("error %q does not name --%s", err, FlagMaxBackends)
				}
				checkCopy(t, r, f)
				if got, _ := liveSet(f, tc.small.ClusterIP); !slices.Equal(got, []string{"10.244.0.1:80"}) {
					t.Fatalf("full=%v: %s serves %v, want its one backend\n%s", full, tc.small.ClusterIP, got, served(f))
				}
				if _, ok := f.services.entries[tc.big.ClusterIP]; ok {
					t.Errorf("full=%v: %s is in the services map", full, tc.big.ClusterIP)
				}
			}
			t.Logf("the error a user sees: %v", r.sync(snapshot(true, append(base, tc.big, tc.small)...)))
		})
	}
}

// Once a sync has deleted what it hid, no group keeps an empty map of
// hidden slots or match entries: at 10k Services one per service id is
// megabytes held for nothing (an emptied Go map keeps its buckets).
func TestReconcilerDropsEmptiedMaps(t *testing.T) {
	f := newFakeMaps(16, 256)
	r := newReconciler(f.maps(), f.grace(), 16, 256)
	web := servicePort("ns", "web", "http", model.TCP, "10.96.0.1:80", "10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80")
	sticky := web
	sticky.Name.ServiceName.Name, sticky.ClusterIP.IP = "sticky", netip.MustParseAddr("10.96.0.2")
	sticky.Affinity = model.DefaultAffinityTimeout
	check := func(when string) {
		t.Helper()
		for id, g := range r.groups {
			if g.hidden != nil || (g.matches != nil && len(g.matches) == 0) {
				t.Errorf("%s: service id %d keeps hidden %v (nil: %t), matches %v (nil: %t)", when, id,
					g.hidden, g.hidden == nil, g.matches, g.matches == nil)
			}
		}
	}
	if err := r.sync(snapshot(true, web, sticky)); err != nil {
		t.Fatal(err)
	}
	check("first sync")
	shrunk, unstuck := web, sticky
	shrunk.Backends = web.Backends[:1]
	shrunk.Serving, shrunk.Cluster = shrunk.Backends, shrunk.Backends
	unstuck.Affinity = 0
	if err := r.sync(snapshot(false, shrunk, unstuck)); err != nil {
		t.Fatal(err)
	}
	check("after hiding and deleting slots and match entries")
}

// BenchmarkReconcilerHeap reports the heap the reconciler holds after a
// full sync of 10k Services x 10 endpoints into fake maps at the default
// capacities, the fake maps' own entries included (heap-MiB;
// docs/memory.md).
func BenchmarkReconcilerHeap(b *testing.B) {
	snap := apitest.ScaleSnapshot(10000, 10)
	var heap float64
	for b.Loop() {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		f := newFakeMaps(DefaultMaxServices, DefaultMaxBackends)
		r := newReconciler(f.maps(), f.grace(), DefaultMaxServices, DefaultMaxBackends)
		if err := r.sync(snap); err != nil {
			b.Fatal(err)
		}
		f.takeLog()
		runtime.GC()
		runtime.ReadMemStats(&after)
		heap = float64(after.HeapAlloc-before.HeapAlloc) / (1 << 20)
		runtime.KeepAlive(r)
	}
	b.ReportMetric(heap, "heap-MiB")
}
