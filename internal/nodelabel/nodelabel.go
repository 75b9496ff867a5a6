// Package nodelabel records on the proxy's own Node which datapath mode
// serves it, as the label kube-bpf-proxy.io/mode. The latency probe reads it
// to label its measurements, and `kubectl get nodes -L kube-bpf-proxy.io/mode`
// shows the cluster's split during an A/B.
package nodelabel

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
)

// Label is the Node label holding the mode: "ebpf" or "iptables".
const Label = "kube-bpf-proxy.io/mode"

// patch is a JSON merge patch of the Node's labels: it touches our label
// alone, never the others, and needs no read first (no conflict to retry).
// A nil value removes the label.
func patch(value *string) ([]byte, error) {
	return json.Marshal(map[string]any{
		"metadata": map[string]any{"labels": map[string]*string{Label: value}},
	})
}

// Backoff bounds the waits between attempts of Record.
type Backoff struct {
	Initial, Max time.Duration
	Clock        clock.WithTicker
}

// DefaultBackoff waits 1 s, doubling up to a minute: an API server that
// comes back is noticed soon, and one that stays away costs a line a minute.
var DefaultBackoff = Backoff{Initial: time.Second, Max: time.Minute, Clock: clock.RealClock{}}

// Record sets the label on node to mode, retrying with backoff until it
// succeeds or ctx ends. It gives up at once, with a log line, when the
// ServiceAccount may not patch Nodes (an older ClusterRole) or the Node does
// not exist: retrying cannot fix either, and the datapath does not depend on
// the label. Run it in its own goroutine: it never blocks the proxy.
func Record(ctx context.Context, client kubernetes.Interface, node, mode string, b Backoff) error {
	data, err := patch(&mode)
	if err != nil {
		return err
	}
	wait := b.Initial
	for attempt := 1; ; attempt++ {
		_, err := client.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, data, metav1.PatchOptions{FieldManager: "kube-bpf-proxy"})
		switch {
		case err == nil:
			klog.InfoS("Recorded the mode on the Node", "node", node, "label", Label, "mode", mode)
			return nil
		case apierrors.IsForbidden(err):
			klog.ErrorS(err, "Cannot record the mode on the Node: the ClusterRole lacks patch on nodes (manifests/base/rbac.yaml has it); the datapath is not affected",
				"node", node, "label", Label)
			return err
		case apierrors.IsNotFound(err):
			klog.ErrorS(err, "Cannot record the mode on the Node: no such Node (check --hostname-override or NODE_NAME)", "node", node, "label", Label)
			return err
		case ctx.Err() != nil:
			return ctx.Err()
		}
		klog.InfoS("Recording the mode on the Node failed; retrying", "node", node, "attempt", attempt, "retryIn", wait, "err", err)
		t := b.Clock.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C():
		}
		wait = min(2*wait, b.Max)
	}
}

// Remove deletes the label from node, once: --cleanup calls it and goes on
// whatever happens. A Node without the label is no error.
func Remove(ctx context.Context, client kubernetes.Interface, node string) error {
	data, err := patch(nil)
	if err != nil {
		return err
	}
	if _, err := client.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, data, metav1.PatchOptions{FieldManager: "kube-bpf-proxy"}); err != nil {
		return fmt.Errorf("removing label %s from Node %s: %w", Label, node, err)
	}
	return nil
}
