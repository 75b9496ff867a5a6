package nodeinfo

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestSelectorChoose(t *testing.T) {
	local := addrs("10.0.0.5", "127.0.0.1", "192.168.1.2")
	primary := netip.MustParseAddr("192.168.1.2")
	for _, tc := range []struct {
		flag []string
		want []netip.Addr
		all  bool
	}{
		{nil, addrs("10.0.0.5", "192.168.1.2"), true},
		{[]string{"127.0.0.0/8"}, addrs("127.0.0.1"), false},
		{[]string{"10.0.0.0/8", " 127.0.0.1/32 "}, addrs("10.0.0.5", "127.0.0.1"), false},
		{[]string{"primary"}, addrs("192.168.1.2"), false},
		// No CIDR of IPv4: every IPv4 address but loopback, as
		// kube-proxy adds 0.0.0.0/0 for a family the flag names none of.
		{[]string{"fd00::/8"}, addrs("10.0.0.5", "192.168.1.2"), false},
	} {
		sel, err := ParseSelector(tc.flag)
		if err != nil {
			t.Fatalf("%v: %v", tc.flag, err)
		}
		if got := sel.Choose(local, primary); !slices.Equal(got, tc.want) {
			t.Errorf("%v: chose %v, want %v", tc.flag, got, tc.want)
		}
		if sel.All() != tc.all {
			t.Errorf("%v: All() = %v", tc.flag, sel.All())
		}
	}
	for _, bad := range [][]string{{"10.0.0.0"}, {"primary", "10.0.0.0/8"}, {"nodes"}} {
		if _, err := ParseSelector(bad); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

func TestSourceFollowsNodeAndServiceCIDRs(t *testing.T) {
	local := addrs("10.0.0.5", "127.0.0.1", "192.168.1.2")
	s := New(Config{NodeName: "n1", NodePorts: Selector{Primary: true},
		LocalAddresses: func() ([]netip.Addr, error) { return local, nil },
		ServiceCIDRs:   []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}})
	info := s.Info()
	if len(info.NodePortAddresses) != 0 {
		t.Errorf("primary unknown yet, but node ports served on %v", info.NodePortAddresses)
	}
	if !slices.Equal(info.LocalAddresses, local) || info.AllLocalAddresses {
		t.Errorf("info %+v", info)
	}
	if got := info.ServiceCIDRs; len(got) != 1 || got[0].String() != "10.96.0.0/12" {
		t.Errorf("configured service ranges not used before the API's: %v", got)
	}
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: map[string]string{v1.LabelTopologyZone: "z1"}},
		Status: v1.NodeStatus{Addresses: []v1.NodeAddress{
			{Type: v1.NodeHostName, Address: "n1"},
			{Type: v1.NodeExternalIP, Address: "10.0.0.5"},
			{Type: v1.NodeInternalIP, Address: "fd00::1"},
			{Type: v1.NodeInternalIP, Address: "192.168.1.2"},
		}}}
	if !s.setNode(node) {
		t.Fatal("first node seen: no change reported")
	}
	if s.setNode(node.DeepCopy()) {
		t.Error("same node reported as a change")
	}
	if s.Zone() != "z1" {
		t.Errorf("zone %q", s.Zone())
	}
	if got := s.Info().NodePortAddresses; !slices.Equal(got, addrs("192.168.1.2")) {
		t.Errorf("primary node port addresses %v, want the InternalIP", got)
	}
	cidr := func(name string, cidrs ...string) any {
		return &networkingv1.ServiceCIDR{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: networkingv1.ServiceCIDRSpec{CIDRs: cidrs}}
	}
	if !s.setServiceCIDRs([]any{cidr("b", "10.100.0.0/16", "fd00:10::/108"), cidr("a", "10.96.0.1/12")}) {
		t.Fatal("ServiceCIDRs: no change reported")
	}
	if got := s.Info().ServiceCIDRs; len(got) != 2 || got[0].String() != "10.96.0.0/12" || got[1].String() != "10.100.0.0/16" {
		t.Errorf("service ranges %v", got)
	}
	if s.setServiceCIDRs([]any{cidr("a", "10.96.0.0/12"), cidr("b", "fd00:10::/108", "10.100.0.0/16")}) {
		t.Error("same ranges reported as a change")
	}
	if !s.setServiceCIDRs(nil) || s.Info().ServiceCIDRs != nil {
		t.Error("every ServiceCIDR gone: ranges not emptied")
	}
}

// As kube-proxy v1.36's NodeEligible: the node takes load balancer traffic
// once its Node is seen, and not while it is being deleted or tainted by
// the cluster autoscaler for deletion, nor once it is gone.
func TestNodeEligibleFollowsTheNode(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	client := fake.NewClientset()
	s := New(Config{NodeName: "n1", LocalAddresses: func() ([]netip.Addr, error) { return nil, nil }})
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Run(ctx, client, func() {}) }()
	t.Cleanup(func() { cancel(); <-done })
	waitFor := func(what string, want bool) {
		t.Helper()
		if err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
			return s.NodeEligible() == want, nil
		}); err != nil {
			t.Fatalf("%s: NodeEligible() = %v, want %v", what, !want, want)
		}
	}
	if s.NodeEligible() {
		t.Error("eligible before the Node was seen")
	}
	nodes := client.CoreV1().Nodes()
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}}
	node, err := nodes.Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	waitFor("node seen", true)
	node.Spec.Taints = []v1.Taint{{Key: "other", Effect: v1.TaintEffectNoSchedule}, {Key: ToBeDeletedTaint, Value: "1733400000", Effect: v1.TaintEffectNoSchedule}}
	if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("tainted "+ToBeDeletedTaint, false)
	node.Spec.Taints = node.Spec.Taints[:1]
	if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("taint removed", true)
	now := metav1.Now()
	node.DeletionTimestamp = &now
	if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("being deleted", false)
	node.DeletionTimestamp = nil
	if _, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("deletion cleared (test only)", true)
	if err := nodes.Delete(ctx, "n1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("deleted", false)
}

// --detect-local-mode=NodeCIDR, as kube-proxy: the proxy waits for the
// Node to have a pod range, and exits (Run returns) when it changes.
func TestPodCIDRWaitAndChange(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	client := fake.NewClientset()
	nodes := client.CoreV1().Nodes()
	got := make(chan map[model.IPFamily]netip.Prefix, 1)
	errs := make(chan error, 1)
	go func() {
		p, err := WaitForPodCIDRs(ctx, client, "n1", 10*time.Millisecond, time.Minute)
		got <- p
		errs <- err
	}()
	node, err := nodes.Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Dual-stack, IPv6 first: each family has its range.
	node.Spec.PodCIDR = "fd00:1::/64"
	node.Spec.PodCIDRs = []string{"fd00:1::/64", "10.244.3.0/24"}
	if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := map[model.IPFamily]netip.Prefix{model.IPv4: netip.MustParsePrefix("10.244.3.0/24"), model.IPv6: netip.MustParsePrefix("fd00:1::/64")}
	p, err := <-got, <-errs
	if err != nil || !maps.Equal(p, want) {
		t.Fatalf("WaitForPodCIDRs = %v, %v; want %v", p, err, want)
	}

	s := New(Config{NodeName: "n1", PodCIDRs: p,
		LocalAddresses: func() ([]netip.Addr, error) { return nil, nil }})
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx, client, func() {}) }()
	node.Labels = map[string]string{"unrelated": "change"}
	if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	node.Spec.PodCIDRs = []string{"10.244.4.0/24"}
	if _, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := <-ran; !errors.Is(err, ErrPodCIDRChanged) {
		t.Errorf("Run after the pod range changed: %v, want ErrPodCIDRChanged", err)
	}

	// A Node that never gets a range: the wait ends with an error
	// saying what is missing.
	if _, err := nodes.Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n2"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := WaitForPodCIDRs(ctx, client, "n2", time.Millisecond, 20*time.Millisecond); err == nil || !strings.Contains(err.Error(), "spec.podCIDRs") {
		t.Errorf("no pod range: %v", err)
	}
}
