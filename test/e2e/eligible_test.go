package e2e

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodeinfo"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// nodeEligible: as kube-proxy v1.36, a node the cluster autoscaler tainted
// for deletion answers /healthz with 503 and nodeEligible false, so cloud
// load balancers drain it, while the other node keeps answering 200; the
// taint removed, it answers 200 again. /livez stays 200 throughout.
func (e *env) nodeEligible(t *testing.T) {
	ctx := context.Background()
	nodes := e.c.Client.CoreV1().Nodes()
	first, other := e.c.Nodes[0].Name, e.c.Nodes[1].Name
	setTaint := func(on bool) {
		t.Helper()
		node, err := nodes.Get(ctx, first, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		node.Spec.Taints = slices.DeleteFunc(node.Spec.Taints, func(tt corev1.Taint) bool { return tt.Key == nodeinfo.ToBeDeletedTaint })
		if on {
			node.Spec.Taints = append(node.Spec.Taints, corev1.Taint{Key: nodeinfo.ToBeDeletedTaint, Value: "1733400000", Effect: corev1.TaintEffectNoSchedule})
		}
		if _, err := nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { setTaint(false) })
	// healthz waits for node's /healthz to answer code with nodeEligible
	// eligible.
	healthz := func(node string, code int, eligible bool) {
		t.Helper()
		var last string
		if !eventually(30*time.Second, func() bool {
			got, body, err := e.c.ProxyGet(ctx, node, localcluster.ProxyHealthzAddr, "/healthz")
			last = body
			if err != nil {
				last = err.Error()
				return false
			}
			var b struct {
				NodeEligible *bool `json:"nodeEligible"`
			}
			return got == code && json.Unmarshal([]byte(body), &b) == nil && b.NodeEligible != nil && *b.NodeEligible == eligible
		}) {
			t.Fatalf("%s: /healthz %s, want %d with nodeEligible %v", node, last, code, eligible)
		}
	}
	healthz(first, http.StatusOK, true)
	setTaint(true)
	healthz(first, http.StatusServiceUnavailable, false)
	healthz(other, http.StatusOK, true)
	if code, body, err := e.c.ProxyGet(ctx, first, localcluster.ProxyHealthzAddr, "/livez"); err != nil || code != http.StatusOK {
		t.Errorf("%s being drained: /livez %d %s %v, want 200", first, code, body, err)
	}
	setTaint(false)
	healthz(first, http.StatusOK, true)
}
