package nodelabel

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"
)

func node(labels map[string]string) *v1.Node {
	return &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node1", Labels: labels}}
}

func labels(t *testing.T, c *fake.Clientset) map[string]string {
	t.Helper()
	n, err := c.CoreV1().Nodes().Get(context.Background(), "node1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n.Labels
}

// Record sets our label and leaves the others; Remove takes ours away.
func TestRecordAndRemove(t *testing.T) {
	c := fake.NewClientset(node(map[string]string{"zone": "a", Label: "iptables"}))
	ctx := context.Background()
	if err := Record(ctx, c, "node1", "ebpf", DefaultBackoff); err != nil {
		t.Fatal(err)
	}
	if got := labels(t, c); got["zone"] != "a" || got[Label] != "ebpf" || len(got) != 2 {
		t.Errorf("labels after Record %v, want zone=a and %s=ebpf", got, Label)
	}
	if err := Remove(ctx, c, "node1"); err != nil {
		t.Fatal(err)
	}
	if got := labels(t, c); got["zone"] != "a" || len(got) != 1 {
		t.Errorf("labels after Remove %v, want zone=a alone", got)
	}
	if err := Remove(ctx, c, "node1"); err != nil {
		t.Errorf("Remove without the label: %v", err)
	}
}

// An API server that fails is retried with backoff until it answers; a
// refusal (RBAC) is not retried.
func TestRecordRetries(t *testing.T) {
	c := fake.NewClientset(node(nil))
	var calls atomic.Int32
	c.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if calls.Add(1) <= 3 {
			return true, nil, apierrors.NewServiceUnavailable("etcd is down")
		}
		return false, nil, nil
	})
	clk := clocktesting.NewFakeClock(time.Now())
	done := make(chan error, 1)
	go func() {
		done <- Record(context.Background(), c, "node1", "iptables", Backoff{Initial: time.Second, Max: 2 * time.Second, Clock: clk})
	}()
	for waited := 0; ; waited++ {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			if got := labels(t, c)[Label]; got != "iptables" {
				t.Errorf("label %q after the retries, want iptables", got)
			}
			if calls.Load() != 4 {
				t.Errorf("%d attempts, want 4", calls.Load())
			}
			return
		default:
		}
		if clk.HasWaiters() {
			clk.Step(2 * time.Second)
		}
		if waited > 10000 {
			t.Fatal("Record did not finish")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestRecordForbidden(t *testing.T) {
	c := fake.NewClientset(node(nil))
	var calls atomic.Int32
	c.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		calls.Add(1)
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, "node1", errors.New("RBAC"))
	})
	err := Record(context.Background(), c, "node1", "ebpf", DefaultBackoff)
	if !apierrors.IsForbidden(err) || calls.Load() != 1 {
		t.Errorf("Record = %v after %d attempts, want Forbidden after 1", err, calls.Load())
	}
}

func TestRecordStopsWithContext(t *testing.T) {
	c := fake.NewClientset(node(nil))
	c.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewServiceUnavailable("down")
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Record(ctx, c, "node1", "ebpf", Backoff{Initial: time.Hour, Max: time.Hour, Clock: clocktesting.NewFakeClock(time.Now())})
	}()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Record = %v, want context.Canceled", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Record did not return after its context ended")
	}
}
