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

// A cold node's first sync queues its writes and applies them map by map:
// every backend before any slot names it, every slot before any frontend
// covers it, so no program finds a hole whichever write fails. A failure
// fails the sync as a whole (counters excepted), and the next full sync
// reads the maps back and converges.
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
			err := r.sync(nodeSnap(true, coldPorts()...))
			if failed.mapName == "stats" {
				if err != nil {
					t.Errorf("%s failed: sync returned %v, want nil", failed.text, err)
				}
			} else {
				var se *dataplane.SyncError
				if !errors.As(err, &se) || se.Err == nil {
					t.Fatalf("%s failed: sync returned %v, want a SyncError failing the sync", failed.text, err)
				}
			}
			f.fail = nil
			if err := r.sync(nodeSnap(true, coldPorts()...)); err != nil {
				t.Fatalf("%s failed; the next sync: %v", failed.text, err)
			}
			checkCopy(t, r, f)
			if got := served(f); got != want {
				t.Errorf("%s failed; after the next sync serving\n%s\nwant\n%s", failed.text, got, want)
			}
		})
	}
}
