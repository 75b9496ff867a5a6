package proxy

import (
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodeinfo"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The proxy's /healthz follows its Node as kube-proxy v1.36's: 200 once
// synced with the Node seen, 503 with nodeEligible false while the
// cluster autoscaler's deletion taint is on it, and the datapath's own
// health unchanged in the body.
func TestHealthzFollowsTheNodesEligibility(t *testing.T) {
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node1"}}
	client := fake.NewClientset(node, service("default", "web", "10.96.0.10", tcpPort("http", 80, 8080)))
	dp := newRecordingDataplane()
	ctx, cancel := context.WithCancel(context.Background())
	healthz := testnet.FreeAddr(t)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, client, dp, Config{
			SyncPeriod: time.Hour, HealthzBindAddress: healthz, MetricsBindAddress: testnet.FreeAddr(t), NodeName: "node1",
			Node: nodeinfo.New(nodeinfo.Config{NodeName: "node1", LocalAddresses: func() ([]netip.Addr, error) { return nil, nil }}),
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	dp.next(t)
	type body struct {
		NodeEligible *bool `json:"nodeEligible"`
		Healthy      bool  `json:"healthy"`
	}
	// Polls until /healthz answers code (the informers deliver the Node
	// in their own time).
	await := func(what string, code int, eligible bool) {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for {
			got, text := get(t, "http://"+healthz+"/healthz")
			var b body
			_ = json.Unmarshal([]byte(text), &b)
			if got == code && b.NodeEligible != nil && *b.NodeEligible == eligible && b.Healthy {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: /healthz %d %s, want %d with nodeEligible %v and healthy true", what, got, text, code, eligible)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	await("synced, Node seen", http.StatusOK, true)
	node.Spec.Taints = []v1.Taint{{Key: nodeinfo.ToBeDeletedTaint, Effect: v1.TaintEffectNoSchedule}}
	if _, err := client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("tainted for deletion", http.StatusServiceUnavailable, false)
	if code, _ := get(t, "http://"+healthz+"/livez"); code != http.StatusOK {
		t.Errorf("/livez %d for a node being drained, want 200", code)
	}
}
