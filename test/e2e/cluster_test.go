package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// TestLocalCluster checks the cluster the other tests stand on: pods become
// endpoints through the real EndpointSlice controller (with their node and
// zone), readiness and deletion reach the slices as a kubelet's would, a pod
// that fails to start leaves nothing, and Down removes every namespace,
// cgroup and mount.
func TestLocalCluster(t *testing.T) {
	testnet.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := filepath.Join(t.TempDir(), "cluster")
	c, err := localcluster.Up(ctx, localcluster.Options{Dir: dir, KubeBin: kubeBinaries(t)})
	if err != nil {
		t.Fatal(err)
	}
	downed := false
	t.Cleanup(func() {
		if !downed {
			_ = localcluster.Down(dir)
		}
	})

	if _, err := c.AddPod(ctx, localcluster.PodSpec{Name: "w-1", Node: "node2", Labels: map[string]string{"app": "w"},
		Command: testnet.Helper("serve", "w-1", "tcp:80"), ReadyLine: "ready"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Kubectl(ctx, "create", "service", "clusterip", "w", "--tcp=80:80"); err != nil {
		t.Fatal(err)
	}
	endpoint := func() (*discoveryv1.Endpoint, bool) {
		slices, err := c.Client.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=w"})
		if err != nil || len(slices.Items) == 0 || len(slices.Items[0].Endpoints) == 0 {
			return nil, false
		}
		return &slices.Items[0].Endpoints[0], true
	}
	waitEndpoint := func(what string, ok func(*discoveryv1.Endpoint) bool) {
		t.Helper()
		if !eventually(30*time.Second, func() bool { ep, found := endpoint(); return found && ok(ep) }) {
			ep, _ := endpoint()
			t.Fatalf("the EndpointSlice controller never showed %s; last endpoint %+v", what, ep)
		}
	}
	waitEndpoint("w-1 ready on node2 in zone-b", func(ep *discoveryv1.Endpoint) bool {
		return *ep.Conditions.Ready && *ep.NodeName == "node2" && ep.Zone != nil && *ep.Zone == "zone-b" &&
			ep.Addresses[0] == "10.244.2.10"
	})
	if err := c.SetPodReady(ctx, "default", "w-1", false); err != nil {
		t.Fatal(err)
	}
	waitEndpoint("w-1 not ready", func(ep *discoveryv1.Endpoint) bool { return !*ep.Conditions.Ready })

	// A pod whose process dies before it is ready leaves no namespace, and
	// its name can be used again.
	before := clusterNetNS(t, c.Name)
	if _, err := c.AddPod(ctx, localcluster.PodSpec{Name: "broken", Node: "node1",
		Command: []string{"false"}, ReadyLine: "ready"}); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("a pod whose process exits: got %v, want an error saying it exited", err)
	}
	if after := clusterNetNS(t, c.Name); len(after) != len(before) {
		t.Fatalf("the failed pod left namespaces: %v, before %v", after, before)
	}
	if _, err := c.AddPod(ctx, localcluster.PodSpec{Name: "broken", Node: "node1",
		Command: testnet.Helper("serve", "x", "tcp:80"), ReadyLine: "ready"}); err != nil {
		t.Fatalf("reusing the failed pod's name: %v", err)
	}

	if err := c.DeletePod(ctx, "default", "w-1", 0); err != nil {
		t.Fatal(err)
	}
	if !eventually(30*time.Second, func() bool { _, found := endpoint(); return !found }) {
		t.Fatal("the deleted pod's endpoint stayed")
	}

	cgroup := c.Cgroup
	if err := localcluster.Down(dir); err != nil {
		t.Fatal(err)
	}
	downed = true
	if left := clusterNetNS(t, c.Name); len(left) > 0 {
		t.Errorf("namespaces left after Down: %v", left)
	}
	if _, err := os.Stat(cgroup); !os.IsNotExist(err) {
		t.Errorf("cgroup %s left after Down (%v)", cgroup, err)
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	if strings.Contains(string(mounts), dir) {
		t.Errorf("mounts left under %s after Down", dir)
	}
}

func clusterNetNS(t *testing.T, prefix string) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], prefix+"-") {
			names = append(names, f[0])
		}
	}
	return names
}
