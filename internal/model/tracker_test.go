package model

import (
	"fmt"
	"net/netip"
	"reflect"
	"runtime"
	"sync"
	"testing"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// op is one call on a Tracker and the bool it must return.
type op struct {
	desc string
	do   func(*Tracker) bool
	want bool
}

func upSvc(s *v1.Service, want bool) op {
	return op{fmt.Sprintf("UpsertService(%s)", objName(s)), func(t *Tracker) bool { return t.UpsertService(s) }, want}
}

func delSvc(s *v1.Service, want bool) op {
	return op{fmt.Sprintf("DeleteService(%s)", objName(s)), func(t *Tracker) bool { return t.DeleteService(s) }, want}
}

func upSlice(s *discoveryv1.EndpointSlice, want bool) op {
	return op{fmt.Sprintf("UpsertEndpointSlice(%s)", objName(s)), func(t *Tracker) bool { return t.UpsertEndpointSlice(s) }, want}
}

func delSlice(s *discoveryv1.EndpointSlice, want bool) op {
	return op{fmt.Sprintf("DeleteEndpointSlice(%s)", objName(s)), func(t *Tracker) bool { return t.DeleteEndpointSlice(s) }, want}
}

func objName(o metav1.Object) string {
	if reflect.ValueOf(o).IsNil() {
		return "nil"
	}
	return o.GetNamespace() + "/" + o.GetName()
}

func apply(t *testing.T, tr *Tracker, ops []op) {
	t.Helper()
	for _, o := range ops {
		if got := o.do(tr); got != o.want {
			t.Errorf("%s = %v, want %v", o.desc, got, o.want)
		}
	}
}

type services = map[ServiceName][]ServicePort

func TestTracker(t *testing.T) {
	httpPort := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	httpSlicePort := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))

	svcA := newSvc("a", "10.0.0.1", httpPort)
	svcB := newSvc("b", "10.0.0.2", httpPort)
	sliceA1 := newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"), readyEP("10.1.0.2")))
	sliceA2 := newSlice("a-2", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.3")))
	sliceB1 := newSlice("b-1", "b", httpSlicePort, withEndpoints(readyEP("10.2.0.1")))

	// Variants of the above.
	sliceA1NotReady := newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.1.0.1"), endpoint("10.1.0.2", no, no, no)))
	sliceA1ToB := newSlice("a-1", "b", httpSlicePort, withEndpoints(readyEP("10.1.0.1"), readyEP("10.1.0.2")))
	sliceA1NoLabel := newSlice("a-1", "", httpSlicePort, withEndpoints(readyEP("10.1.0.1"), readyEP("10.1.0.2")))
	sliceA1IPv6 := newSlice("a-1", "a", httpSlicePort, withAddressType(discoveryv1.AddressTypeIPv6), withEndpoints(readyEP("fd01::1")))
	svcAHeadless := newSvc("a", v1.ClusterIPNone, httpPort)
	svcAOnlySCTP := newSvc("a", "10.0.0.1", withPorts(svcPort("http", v1.ProtocolSCTP, 80)))
	svcANewIP := newSvc("a", "10.0.0.9", httpPort)
	svcAMetadataOnly := newSvc("a", "10.0.0.1", httpPort, func(s *v1.Service) { s.Labels = map[string]string{"x": "y"} })
	otherNS := newSlice("a-1", "a", httpSlicePort, withEndpoints(readyEP("10.9.0.1")), func(s *discoveryv1.EndpointSlice) { s.Namespace = "other" })

	aFull := []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080")}
	aOnlyA2 := []ServicePort{sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.3:8080")}
	bFull := []ServicePort{sp("b", "http", TCP, "10.0.0.2:80", "10.2.0.1:8080")}

	base := []op{upSvc(svcA, true), upSlice(sliceA1, true), upSlice(sliceA2, true), upSvc(svcB, true), upSlice(sliceB1, true)}

	tests := []struct {
		name string
		// before is applied, then a full snapshot is taken and discarded.
		before []op
		// changes are applied after that snapshot.
		changes     []op
		wantPending bool
		wantPartial services
		wantFull    services
	}{
		{
			name:     "empty tracker",
			wantFull: services{},
		},
		{
			name:        "initial load: partial lists everything",
			changes:     base,
			wantPending: true,
			wantPartial: services{svcName("a"): aFull, svcName("b"): bFull},
			wantFull:    services{svcName("a"): aFull, svcName("b"): bFull},
		},
		{
			name:        "slice before service: backends appear with the service",
			changes:     []op{upSlice(sliceA1, false), upSlice(sliceA2, false), upSvc(svcA, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): aFull},
			wantFull:    services{svcName("a"): aFull},
		},
		{
			name:     "no change after snapshot: partial empty",
			before:   base,
			wantFull: services{svcName("a"): aFull, svcName("b"): bFull},
		},
		{
			name:     "identical update: no change",
			before:   base,
			changes:  []op{upSvc(svcA, false), upSlice(sliceA1, false), upSvc(svcAMetadataOnly, false)},
			wantFull: services{svcName("a"): aFull, svcName("b"): bFull},
		},
		{
			name:        "partial lists only the changed service",
			before:      base,
			changes:     []op{upSlice(sliceA1NotReady, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): {sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.3:8080")}},
			wantFull: services{
				svcName("a"): {sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.3:8080")},
				svcName("b"): bFull,
			},
		},
		{
			name:        "ClusterIP change",
			before:      base,
			changes:     []op{upSvc(svcANewIP, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): {sp("a", "http", TCP, "10.0.0.9:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080")}},
			wantFull: services{
				svcName("a"): {sp("a", "http", TCP, "10.0.0.9:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080")},
				svcName("b"): bFull,
			},
		},
		{
			name:        "service delete: gone service maps to nil",
			before:      base,
			changes:     []op{delSvc(svcA, true), delSvc(svcA, false)},
			wantPending: true,
			wantPartial: services{svcName("a"): nil},
			wantFull:    services{svcName("b"): bFull},
		},
		{
			name:        "service delete then re-add keeps its slices",
			before:      base,
			changes:     []op{delSvc(svcA, true), upSvc(svcANewIP, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): {sp("a", "http", TCP, "10.0.0.9:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080")}},
			wantFull: services{
				svcName("a"): {sp("a", "http", TCP, "10.0.0.9:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080")},
				svcName("b"): bFull,
			},
		},
		{
			name:        "service becomes headless: gone",
			before:      base,
			changes:     []op{upSvc(svcAHeadless, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): nil},
			wantFull:    services{svcName("b"): bFull},
		},
		{
			name:        "service left with no proxyable port: gone",
			before:      base,
			changes:     []op{upSvc(svcAOnlySCTP, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): nil},
			wantFull:    services{svcName("b"): bFull},
		},
		{
			name:        "slice delete",
			before:      base,
			changes:     []op{delSlice(sliceA1, true), delSlice(sliceA1, false)},
			wantPending: true,
			wantPartial: services{svcName("a"): aOnlyA2},
			wantFull:    services{svcName("a"): aOnlyA2, svcName("b"): bFull},
		},
		{
			name:        "last slice deleted: service stays, with no backends",
			before:      base,
			changes:     []op{delSlice(sliceB1, true)},
			wantPending: true,
			wantPartial: services{svcName("b"): {sp("b", "http", TCP, "10.0.0.2:80")}},
			wantFull:    services{svcName("a"): aFull, svcName("b"): {sp("b", "http", TCP, "10.0.0.2:80")}},
		},
		{
			name:    "delete of an unknown or ignored slice: no change",
			before:  base,
			changes: []op{delSlice(newSlice("zzz", "a"), false), delSlice(sliceA1IPv6, true)},
			// sliceA1IPv6 has the name of sliceA1: deleting it deletes a-1.
			wantPending: true,
			wantPartial: services{svcName("a"): aOnlyA2},
			wantFull:    services{svcName("a"): aOnlyA2, svcName("b"): bFull},
		},
		{
			name:        "slice moves to another service",
			before:      base,
			changes:     []op{upSlice(sliceA1ToB, true)},
			wantPending: true,
			wantPartial: services{
				svcName("a"): aOnlyA2,
				svcName("b"): {sp("b", "http", TCP, "10.0.0.2:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.2.0.1:8080")},
			},
			wantFull: services{
				svcName("a"): aOnlyA2,
				svcName("b"): {sp("b", "http", TCP, "10.0.0.2:80", "10.1.0.1:8080", "10.1.0.2:8080", "10.2.0.1:8080")},
			},
		},
		{
			name:        "slice moves, then is deleted",
			before:      base,
			changes:     []op{upSlice(sliceA1ToB, true), delSlice(sliceA1, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): aOnlyA2},
			wantFull:    services{svcName("a"): aOnlyA2, svcName("b"): bFull},
		},
		{
			name:        "slice loses its service label",
			before:      base,
			changes:     []op{upSlice(sliceA1NoLabel, true), delSlice(sliceA1NoLabel, false)},
			wantPending: true,
			wantPartial: services{svcName("a"): aOnlyA2},
			wantFull:    services{svcName("a"): aOnlyA2, svcName("b"): bFull},
		},
		{
			name:        "slice becomes unusable (IPv6)",
			before:      base,
			changes:     []op{upSlice(sliceA1IPv6, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): aOnlyA2},
			wantFull:    services{svcName("a"): aOnlyA2, svcName("b"): bFull},
		},
		{
			name:     "slice of another namespace does not touch the service",
			before:   base,
			changes:  []op{upSlice(otherNS, false), delSlice(otherNS, false)},
			wantFull: services{svcName("a"): aFull, svcName("b"): bFull},
		},
		{
			name:    "slice change reverted before snapshot: no change",
			before:  base,
			changes: []op{upSlice(sliceA1NotReady, true), upSlice(sliceA1, true)},
			// Reverting changes the state back, so the calls return true,
			// but nothing is pending.
			wantFull: services{svcName("a"): aFull, svcName("b"): bFull},
		},
		{
			name:     "slice delete reverted before snapshot: no change",
			before:   base,
			changes:  []op{delSlice(sliceA2, true), upSlice(sliceA2, true)},
			wantFull: services{svcName("a"): aFull, svcName("b"): bFull},
		},
		{
			name:     "service delete reverted before snapshot: no change",
			before:   base,
			changes:  []op{delSvc(svcA, true), upSvc(svcA, true)},
			wantFull: services{svcName("a"): aFull, svcName("b"): bFull},
		},
		{
			name:     "service added and deleted between snapshots: no change",
			changes:  []op{upSvc(svcA, true), upSlice(sliceA1, true), delSvc(svcA, true)},
			wantFull: services{},
		},
		{
			name:        "two changes, one reverted: only the other listed",
			before:      base,
			changes:     []op{upSlice(sliceA1NotReady, true), delSlice(sliceB1, true), upSlice(sliceA1, true)},
			wantPending: true,
			wantPartial: services{svcName("b"): {sp("b", "http", TCP, "10.0.0.2:80")}},
			wantFull:    services{svcName("a"): aFull, svcName("b"): {sp("b", "http", TCP, "10.0.0.2:80")}},
		},
		{
			name:        "change, then a second change: partial has the latest state",
			before:      base,
			changes:     []op{upSlice(sliceA1NotReady, true), delSlice(sliceA1, true)},
			wantPending: true,
			wantPartial: services{svcName("a"): aOnlyA2},
			wantFull:    services{svcName("a"): aOnlyA2, svcName("b"): bFull},
		},
		{
			name:   "nil objects: no change, no crash",
			before: base,
			changes: []op{
				{"UpsertService(nil)", func(t *Tracker) bool { return t.UpsertService(nil) }, false},
				{"DeleteService(nil)", func(t *Tracker) bool { return t.DeleteService(nil) }, false},
				{"UpsertEndpointSlice(nil)", func(t *Tracker) bool { return t.UpsertEndpointSlice(nil) }, false},
				{"DeleteEndpointSlice(nil)", func(t *Tracker) bool { return t.DeleteEndpointSlice(nil) }, false},
			},
			wantFull: services{svcName("a"): aFull, svcName("b"): bFull},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := NewTracker()
			apply(t, tr, tc.before)
			tr.Snapshot(true)
			if tr.hasPending() {
				t.Fatalf("hasPending() after a full snapshot = true")
			}
			apply(t, tr, tc.changes)
			if got := tr.hasPending(); got != tc.wantPending {
				t.Errorf("hasPending() = %v, want %v", got, tc.wantPending)
			}
			partial := tr.Snapshot(false)
			if partial.Full {
				t.Errorf("Snapshot(false).Full = true")
			}
			want := tc.wantPartial
			if want == nil {
				want = services{}
			}
			checkServices(t, "partial snapshot", partial.Services, want)
			if tr.hasPending() {
				t.Errorf("hasPending() after a snapshot = true")
			}
			if again := tr.Snapshot(false); len(again.Services) != 0 {
				t.Errorf("second partial snapshot not empty:%s", dumpServices(again.Services))
			}
			full := tr.Snapshot(true)
			if !full.Full {
				t.Errorf("Snapshot(true).Full = false")
			}
			checkServices(t, "full snapshot", full.Services, tc.wantFull)
		})
	}
}

// TestTrackerFullSnapshotClearsPending checks that a full snapshot counts as
// the previous snapshot for the next partial one.
func TestTrackerFullSnapshotClearsPending(t *testing.T) {
	tr := NewTracker()
	tr.UpsertService(newSvc("a", "10.0.0.1", withPorts(svcPort("http", v1.ProtocolTCP, 80))))
	tr.Snapshot(true)
	if tr.hasPending() {
		t.Errorf("hasPending() after full snapshot = true")
	}
	if s := tr.Snapshot(false); len(s.Services) != 0 {
		t.Errorf("partial after full not empty:%s", dumpServices(s.Services))
	}
}

func TestTrackerOnSkipped(t *testing.T) {
	tests := []struct {
		name string
		do   func(*Tracker) bool
		want []string
	}{
		{
			name: "bad ClusterIP",
			do: func(tr *Tracker) bool {
				return tr.UpsertService(newSvc("a", "300.0.0.1", withPorts(svcPort("http", v1.ProtocolTCP, 80))))
			},
			want: []string{svcRep + ReasonInvalidClusterIP},
		},
		{
			name: "SCTP and bad port skipped, good port kept",
			do: func(tr *Tracker) bool {
				return tr.UpsertService(newSvc("a", "10.0.0.1", withPorts(
					svcPort("sctp", v1.ProtocolSCTP, 80), svcPort("zero", v1.ProtocolTCP, 0), svcPort("http", v1.ProtocolTCP, 80))))
			},
			want: []string{svcRep + ReasonUnsupportedProtocol, svcRep + ReasonInvalidPort},
		},
		{
			name: "bad endpoint IP and nil slice port",
			do: func(tr *Tracker) bool {
				return tr.UpsertEndpointSlice(newSlice("a-1", "a",
					withSlicePorts(discoveryv1.EndpointPort{Name: ptr("http")}),
					withEndpoints(readyEP("10.1.0.1"), readyEP("bogus"))))
			},
			want: []string{sliceRep + ReasonInvalidEndpointPort, sliceRep + ReasonInvalidEndpointIP},
		},
		{
			name: "ignored objects are not malformed",
			do: func(tr *Tracker) bool {
				tr.UpsertService(newSvc("h", v1.ClusterIPNone, withPorts(svcPort("http", v1.ProtocolTCP, 80))))
				tr.UpsertService(newSvc("v6", "fd00::1", withPorts(svcPort("http", v1.ProtocolTCP, 80))))
				tr.UpsertService(newSvc("x", "", withType(v1.ServiceTypeExternalName)))
				return tr.UpsertEndpointSlice(newSlice("a-1", "", withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 0))))
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			tr := NewTracker(WithOnSkipped(rec.report))
			tc.do(tr)
			checkReports(t, rec, tc.want)
		})
	}
}

func TestTrackerSnapshotNotAliased(t *testing.T) {
	httpPort := withPorts(svcPort("http", v1.ProtocolTCP, 80), svcPort("dns", v1.ProtocolUDP, 53))
	slicePorts := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080), slicePortOf("dns", v1.ProtocolUDP, 5353))
	svcA := newSvc("a", "10.0.0.1", httpPort)
	svcB := newSvc("b", "10.0.0.2", httpPort)
	sliceA := newSlice("a-1", "a", slicePorts, withEndpoints(readyEP("10.1.0.1"), readyEP("10.1.0.2")))
	sliceB := newSlice("b-1", "b", slicePorts, withEndpoints(readyEP("10.2.0.1")))
	want := services{
		svcName("a"): {
			sp("a", "dns", UDP, "10.0.0.1:53", "10.1.0.1:5353", "10.1.0.2:5353"),
			sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.1:8080", "10.1.0.2:8080"),
		},
		svcName("b"): {
			sp("b", "dns", UDP, "10.0.0.2:53", "10.2.0.1:5353"),
			sp("b", "http", TCP, "10.0.0.2:80", "10.2.0.1:8080"),
		},
	}

	for _, full := range []bool{true, false} {
		t.Run(fmt.Sprintf("full=%v", full), func(t *testing.T) {
			tr := NewTracker()
			tr.UpsertService(svcA)
			tr.UpsertService(svcB)
			tr.UpsertEndpointSlice(sliceA)
			tr.UpsertEndpointSlice(sliceB)
			snap := tr.Snapshot(full)
			checkServices(t, "snapshot", snap.Services, want)

			// Later updates must not show through the snapshot taken before.
			tr.UpsertEndpointSlice(newSlice("a-1", "a", slicePorts, withEndpoints(readyEP("10.1.0.9"))))
			tr.DeleteService(svcB)
			checkServices(t, "snapshot after updates", snap.Services, want)

			// Changes the reader makes must not show through the tracker,
			// nor leak from one service or port into its neighbour.
			snap.Services[svcName("a")][0].Backends[0].Port = 1
			snap.Services[svcName("a")][0].Backends = append(snap.Services[svcName("a")][0].Backends, Backend{IP: netip.MustParseAddr("10.9.9.9"), Port: 9})
			snap.Services[svcName("a")] = append(snap.Services[svcName("a")], sp("a", "zzz", TCP, "10.0.0.1:1"))
			if got := snap.Services[svcName("a")][1].Backends; len(got) != 2 || got[0].Port != 8080 {
				t.Errorf("append to one port's backends leaked into the next: %v", got)
			}
			checkServices(t, "full snapshot after reader changes", tr.Snapshot(true).Services, services{
				svcName("a"): {
					sp("a", "dns", UDP, "10.0.0.1:53", "10.1.0.9:5353"),
					sp("a", "http", TCP, "10.0.0.1:80", "10.1.0.9:8080"),
				},
			})
		})
	}
}

// Serving endpoints that differ from the backends are copied on their own;
// equal ones stay one slice in the snapshot, as in the tracker.
func TestTrackerSnapshotCopiesServing(t *testing.T) {
	ports := withPorts(svcPort("dns", v1.ProtocolUDP, 53))
	slicePorts := withSlicePorts(slicePortOf("dns", v1.ProtocolUDP, 5353))
	tr := NewTracker()
	tr.UpsertService(newSvc("a", "10.0.0.1", ports))
	tr.UpsertService(newSvc("b", "10.0.0.2", ports))
	tr.UpsertEndpointSlice(newSlice("a-1", "a", slicePorts, withEndpoints(readyEP("10.1.0.1"))))
	tr.UpsertEndpointSlice(newSlice("b-1", "b", slicePorts, withEndpoints(readyEP("10.2.0.1"), endpoint("10.2.0.2", no, yes, yes))))
	want := services{
		svcName("a"): {sp("a", "dns", UDP, "10.0.0.1:53", "10.1.0.1:5353")},
		svcName("b"): {withServing(sp("b", "dns", UDP, "10.0.0.2:53", "10.2.0.1:5353"), "10.2.0.1:5353", "10.2.0.2:5353")},
	}
	snap := tr.Snapshot(true)
	checkServices(t, "snapshot", snap.Services, want)
	if a := snap.Services[svcName("a")][0]; !sameSlice(a.Serving, a.Backends) {
		t.Errorf("equal serving endpoints and backends were copied twice")
	}
	snap.Services[svcName("b")][0].Serving[1].Port = 1
	snap.Services[svcName("a")][0].Serving[0].Port = 1
	checkServices(t, "next snapshot after the reader's changes", tr.Snapshot(true).Services, want)
}

// TestTrackerConcurrent exercises the lock; run with -race.
func TestTrackerConcurrent(t *testing.T) {
	tr := NewTracker()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				name := fmt.Sprintf("s%d-%d", w, i%10)
				ip := fmt.Sprintf("10.0.%d.%d", w, i%10+1)
				tr.UpsertService(newSvc(name, ip, withPorts(svcPort("http", v1.ProtocolTCP, 80))))
				tr.UpsertEndpointSlice(newSlice(name+"-1", name,
					withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)),
					withEndpoints(readyEP(fmt.Sprintf("10.1.%d.%d", w, i%250+1)))))
				if i%3 == 0 {
					tr.DeleteService(newSvc(name, ip))
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 200 {
			tr.hasPending()
			tr.Snapshot(i%10 == 0)
		}
	}()
	wg.Wait()

	// After the dust settles, a partial snapshot on top of everything taken
	// so far must agree with a fresh full one.
	tr.Snapshot(false)
	full := tr.Snapshot(true)
	for name, ports := range full.Services {
		if len(ports) != 1 || len(ports[0].Backends) != 1 {
			t.Errorf("%s: unexpected ports%s", name, dumpPorts(ports))
		}
	}
}

// BenchmarkTracker measures a full load and one endpoint change at scale.
func BenchmarkTracker(b *testing.B) {
	for _, n := range []int{10_000, 20_000, 50_000} {
		svcs, slices := benchObjects(n, 10)

		b.Run(fmt.Sprintf("load-full-snapshot/services=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				tr := NewTracker()
				for _, s := range svcs {
					tr.UpsertService(s)
				}
				for _, s := range slices {
					tr.UpsertEndpointSlice(s)
				}
				snap := tr.Snapshot(true)
				if len(snap.Services) != n {
					b.Fatalf("full snapshot has %d services, want %d", len(snap.Services), n)
				}
			}
		})

		b.Run(fmt.Sprintf("one-slice-update-partial-snapshot/services=%d", n), func(b *testing.B) {
			tr := NewTracker()
			for _, s := range svcs {
				tr.UpsertService(s)
			}
			for _, s := range slices {
				tr.UpsertEndpointSlice(s)
			}
			tr.Snapshot(true)
			// Alternate between two versions of one slice so that every
			// iteration is a real change.
			target := slices[n/2]
			changed := target.DeepCopy()
			changed.Endpoints[0].Conditions.Ready = ptr(false)
			versions := []*discoveryv1.EndpointSlice{changed, target}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if !tr.UpsertEndpointSlice(versions[i%2]) {
					b.Fatal("update reported no change")
				}
				if snap := tr.Snapshot(false); len(snap.Services) != 1 {
					b.Fatalf("partial snapshot has %d services, want 1", len(snap.Services))
				}
				i++
			}
		})
	}
}

// benchObjects builds n single-port Services with one slice of eps ready
// endpoints each.
func benchObjects(n, eps int) ([]*v1.Service, []*discoveryv1.EndpointSlice) {
	svcs := make([]*v1.Service, n)
	slices := make([]*discoveryv1.EndpointSlice, n)
	for i := range n {
		name := fmt.Sprintf("svc-%d", i)
		svcs[i] = newSvc(name, fmt.Sprintf("10.96.%d.%d", i/256, i%256), withPorts(svcPort("http", v1.ProtocolTCP, 80)))
		endpoints := make([]discoveryv1.Endpoint, eps)
		for j := range eps {
			k := i*eps + j
			endpoints[j] = readyEP(fmt.Sprintf("10.%d.%d.%d", 128+k>>16, k>>8&255, k&255))
		}
		slices[i] = newSlice(name+"-abcde", name, withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080)), withEndpoints(endpoints...))
	}
	return svcs, slices
}

func TestTrackerRequeue(t *testing.T) {
	httpPort := withPorts(svcPort("http", v1.ProtocolTCP, 80))
	tr := NewTracker()
	tr.UpsertService(newSvc("a", "10.0.0.1", httpPort))
	tr.UpsertService(newSvc("b", "10.0.0.2", httpPort))
	tr.Snapshot(true)

	aPorts := []ServicePort{sp("a", "http", TCP, "10.0.0.1:80")}
	bPorts := []ServicePort{sp("b", "http", TCP, "10.0.0.2:80")}

	// A requeued service is listed although nothing changed, next to a
	// changed one; a requeued service that is gone is listed as nil.
	tr.Requeue(svcName("a"), svcName("gone"))
	tr.UpsertService(newSvc("b", "10.0.0.2", httpPort, withPorts(svcPort("dns", v1.ProtocolUDP, 53))))
	checkServices(t, "partial after Requeue", tr.Snapshot(false).Services, services{
		svcName("a"):    aPorts,
		svcName("gone"): nil,
		svcName("b"):    {sp("b", "dns", UDP, "10.0.0.2:53"), bPorts[0]},
	})
	checkServices(t, "the next partial", tr.Snapshot(false).Services, services{})

	// A change reverted before the snapshot still leaves a requeued
	// service listed: the datapath may hold neither version.
	tr.Requeue(svcName("a"))
	tr.UpsertService(newSvc("a", "10.0.0.9", httpPort))
	tr.UpsertService(newSvc("a", "10.0.0.1", httpPort))
	checkServices(t, "requeued and reverted", tr.Snapshot(false).Services, services{svcName("a"): aPorts})

	// A full snapshot serves the request.
	tr.Requeue(svcName("a"))
	tr.Snapshot(true)
	checkServices(t, "partial after a full", tr.Snapshot(false).Services, services{})
}

// A Service naming host-scoped addresses as external IPs or load balancer
// IPs is reported once per conversion where the datapath asks for it (the
// eBPF mode leaves them out), never otherwise; the model keeps the
// addresses either way, for the iptables rules, as kube-proxy's.
func TestTrackerReportsHostScopedExternalAddresses(t *testing.T) {
	hostile := newSvc("hostile", "10.0.0.9", withPorts(svcPort("http", v1.ProtocolTCP, 80)))
	hostile.Spec.ExternalIPs = []string{"127.0.0.1", "192.0.2.1"}
	hostile.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "169.254.169.254"}, {IP: "224.0.0.251"}}
	benign := newSvc("benign", "10.0.0.8", withPorts(svcPort("http", v1.ProtocolTCP, 80)))
	benign.Spec.ExternalIPs = []string{"192.0.2.2"}
	for _, c := range []struct {
		name string
		opts []TrackerOption
		want []string
	}{
		{"socket level", []TrackerOption{WithHostScopedReports()}, []string{ResourceService + "/" + ReasonHostScopedExternalIP}},
		{"iptables", nil, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			rec := &recorder{}
			tr := NewTracker(append(c.opts, WithOnSkipped(rec.report))...)
			tr.UpsertService(hostile)
			tr.UpsertService(benign)
			checkReports(t, rec, c.want)
			ports := tr.Snapshot(true).Services[svcName("hostile")]
			if len(ports) != 1 || len(ports[0].External.ExternalIPs) != 2 || len(ports[0].External.LoadBalancerIPs) != 2 {
				t.Errorf("ports %+v, want every external address kept in the model", ports)
			}
		})
	}
}

func TestHostScoped(t *testing.T) {
	for _, c := range []struct {
		ip   string
		want bool
	}{
		{"127.0.0.1", true}, {"127.0.0.53", true}, {"169.254.169.254", true}, {"224.0.0.251", true},
		{"239.1.2.3", true}, {"255.255.255.255", true}, {"0.0.0.0", true}, {"::ffff:127.0.0.1", true},
		{"10.0.0.1", false}, {"192.0.2.1", false}, {"100.64.0.1", false}, {"255.255.255.254", false},
	} {
		if got := HostScoped(netip.MustParseAddr(c.ip)); got != c.want {
			t.Errorf("HostScoped(%s) = %v, want %v", c.ip, got, c.want)
		}
	}
}

// BenchmarkTrackerHeap reports the heap a Tracker holds at 10k Services x
// 10 endpoints with one full snapshot taken (heap-MiB; docs/memory.md).
func BenchmarkTrackerHeap(b *testing.B) {
	svcs, slices := benchObjects(10_000, 10)
	var heap float64
	for b.Loop() {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		tr := NewTracker()
		for _, s := range svcs {
			tr.UpsertService(s)
		}
		for _, s := range slices {
			tr.UpsertEndpointSlice(s)
		}
		snap := tr.Snapshot(true)
		runtime.GC()
		runtime.ReadMemStats(&after)
		heap = float64(after.HeapAlloc-before.HeapAlloc) / (1 << 20)
		runtime.KeepAlive(tr)
		runtime.KeepAlive(snap)
	}
	b.ReportMetric(heap, "heap-MiB")
}
