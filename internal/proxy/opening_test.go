package proxy

import (
	"context"
	"errors"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The datapath opens while the informers list: open sees both lists
// requested before it returns, and the first sync, after both, is full and
// holds what the lists held.
func TestRunOpeningListsWhileTheDatapathOpens(t *testing.T) {
	client := fake.NewClientset(
		service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)),
		slice("default", "web-1", "web", "http", 8080, "10.0.0.1"),
	)
	listed := map[string]chan struct{}{"services": make(chan struct{}), "endpointslices": make(chan struct{})}
	client.PrependReactor("list", "*", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if ch, ok := listed[a.GetResource().Resource]; ok {
			select {
			case <-ch:
			default:
				close(ch)
			}
		}
		return false, nil, nil
	})
	dp := newRecordingDataplane()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- RunOpening(ctx, client, func(ctx context.Context, _ model.IPFamily) (dataplane.Dataplane, error) {
			for res, ch := range listed {
				select {
				case <-ch:
				case <-time.After(30 * time.Second):
					return nil, errors.New(res + " not listed while the datapath opened")
				}
			}
			dp.mu.Lock()
			n := len(dp.snaps)
			dp.mu.Unlock()
			if n != 0 {
				return nil, errors.New("a sync before the datapath opened")
			}
			return dp, nil
		}, true, Config{SyncPeriod: time.Hour, HealthzBindAddress: testnet.FreeAddr(t), MetricsBindAddress: testnet.FreeAddr(t)})
	}()
	snap := dp.next(t)
	web := model.ServiceName{Namespace: "default", Name: "web"}
	if !snap.Full || len(snap.Services[web]) != 1 || len(snap.Services[web][0].Backends) != 1 {
		t.Errorf("first sync: full %v, %+v; want full, web with its one backend", snap.Full, snap.Services)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("RunOpening: %v", err)
	}
}

// A datapath that cannot open ends the proxy with its error, and no sync
// runs.
func TestRunOpeningFailsWithTheDatapathsError(t *testing.T) {
	client := fake.NewClientset(service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	want := errors.New("no programs")
	errc := make(chan error, 1)
	go func() {
		errc <- RunOpening(context.Background(), client, func(context.Context, model.IPFamily) (dataplane.Dataplane, error) {
			return nil, want
		}, true, Config{SyncPeriod: time.Hour, HealthzBindAddress: testnet.FreeAddr(t), MetricsBindAddress: testnet.FreeAddr(t)})
	}()
	select {
	case err := <-errc:
		if !errors.Is(err, want) {
			t.Errorf("RunOpening: %v, want %v", err, want)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("RunOpening did not return within 30s of a failed open")
	}
}
