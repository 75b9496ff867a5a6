package ebpf

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// coldPorts are a cold node's Services: a shared backend, affinity, a
// node port and external IPs, so that every deferred map is written.
func coldPorts() []model.ServicePort {
	web := withExternal(withNodePort(servicePort("default", "web", "http", model.TCP, "10.96.0.10:80",
		"10.244.0.1:8080", "10.244.0.2:8080"), 30080), []string{"10.0.0.1"}, []string{"192.0.2.10"})
	other := servicePort("default", "other", "http", model.TCP, "10.96.0.12:80", "10.244.0.1:8080", "10.244.9.9:8080")
	dns := servicePort("kube-system", "dns", "dns", model.UDP, "10.96.0.53:53", "10.244.0.5:53", "10.244.1.5:53")
	dns.Affinity = time.Minute
	return []model.ServicePort{web, other, dns}
}

// A cold node's first sync queues its writes and applies them map by map,
// in batches: every backend before any slot names it, every slot before
// any frontend covers it, so no program finds a hole whichever write
// fails. A failure (counters excepted, which are tolerated) makes the same
// sync read the maps back and write entry by entry: it converges at once.
func TestReconcilerColdFill(t *testing.T) {
	want := func() string {
		f := newFakeMaps(64, 256)
		r := newReconciler(f.maps(), f.grace(), 64, 256)
		if err := r.sync(nodeSnap(true, coldPorts()...)); err != nil {
			t.Fatal(err)
		}
		checkCopy(t, r, f)
		return served(f)
	}()
	f := newFakeMaps(64, 256)
	r := newReconciler(f.maps(), f.grace(), 64, 256)
	if err := r.sync(nodeSnap(true, coldPorts()...)); err != nil {
		t.Fatal(err)
	}
	if f.batches == 0 {
		t.Error("the cold sync wrote no batch")
	}
	operations := f.ops
	for n := 1; n <= operations; n++ {
		t.Run(fmt.Sprint("failing operation ", n), func(t *testing.T) {
			f := newFakeMaps(64, 256)
			watchHoles(t, f)
			watchReaders(t, f)
			var failed fakeOp
			f.fail = func(op fakeOp) error {
				err := failNth(n)(op)
				if err != nil {
					failed = op
				}
				return err
			}
			r := newReconciler(f.maps(), f.grace(), 64, 256)
			if err := r.sync(nodeSnap(true, coldPorts()...)); err != nil {
				t.Fatalf("%s failed: sync returned %v, want nil (written entry by entry)", failed.text, err)
			}
			checkCopy(t, r, f)
			if got := served(f); got != want {
				t.Errorf("%s failed; after the sync serving\n%s\nwant\n%s", failed.text, got, want)
			}
			f.fail = nil
			if err := r.sync(nodeSnap(true, coldPorts()...)); err != nil {
				t.Fatalf("%s failed; the next sync: %v", failed.text, err)
			}
			checkCopy(t, r, f)
		})
	}
}

// Where the kernel has no batch operations (before 5.6), and where the
// writes take many chunks, the cold sync writes the same entries.
func TestReconcilerColdFillChunksAndFallback(t *testing.T) {
	sync := func(setup func(*fakeMaps)) (string, int) {
		f := newFakeMaps(64, 256)
		watchHoles(t, f)
		setup(f)
		r := newReconciler(f.maps(), f.grace(), 64, 256)
		if err := r.sync(nodeSnap(true, coldPorts()...)); err != nil {
			t.Fatal(err)
		}
		checkCopy(t, r, f)
		return served(f), f.batches
	}
	want, one := sync(func(*fakeMaps) {})
	got, chunked := sync(func(f *fakeMaps) { f.batchChunk = 2 })
	if got != want || chunked <= one {
		t.Errorf("in chunks of 2: %d batches (want more than %d) serving\n%s\nwant\n%s", chunked, one, got, want)
	}
	got, none := sync(func(f *fakeMaps) { f.noBatch = true })
	if got != want || none != 0 {
		t.Errorf("without batch operations: %d batches serving\n%s\nwant\n%s", none, got, want)
	}
}

// A map that fills up on a cold node fails only the ports that do not
// fit, as in any other sync: the rest serve, in the same sync.
func TestReconcilerColdFillMapFull(t *testing.T) {
	for _, noBatch := range []bool{false, true} {
		t.Run(fmt.Sprint("noBatch=", noBatch), func(t *testing.T) {
			f := newFakeMaps(64, 256)
			f.noBatch = noBatch
			watchHoles(t, f)
			watchReaders(t, f)
			f.services.capacity = 2
			r := newReconciler(f.maps(), f.grace(), 64, 256)
			a := servicePort("ns", "a", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80")
			b := servicePort("ns", "b", "", model.TCP, "10.96.0.2:80", "10.244.0.2:80")
			c := servicePort("ns", "c", "", model.TCP, "10.96.0.3:80", "10.244.0.3:80")
			err := r.sync(nodeSnap(true, a, b, c))
			failed, only := dataplane.OnlyServicesFailed(err)
			if !only || len(failed) != 1 || failed[0].Service != c.Name || failed[0].Reason != dataplane.ReasonMapFull {
				t.Fatalf("cold sync of 3 services into 2 frontend entries: got %v, want a SyncError with %s alone, for %s", err, c.Name, dataplane.ReasonMapFull)
			}
			if !errors.Is(err, ErrMapFull) {
				t.Errorf("error %q is not ErrMapFull", err)
			}
			for _, fe := range []model.Frontend{a.ClusterIP, b.ClusterIP} {
				if _, ok := f.services.entries[fe]; !ok {
					t.Errorf("%s fitted but is not served", fe)
				}
			}
			checkCopy(t, r, f)
		})
	}
}
