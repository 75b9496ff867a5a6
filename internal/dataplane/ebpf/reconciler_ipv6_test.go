package ebpf

import (
	"net/netip"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// The reconciler of the IPv6 view is the same code over the kbp6_* maps:
// these are the IPv4 tests' scenarios with IPv6 addresses, for a reconciler
// whose family is IPv6.

var testNode6 = model.NodeInfo{
	NodePortAddresses: addrs("fd00::1", "fd00::2", "::1"),
	LocalAddresses:    addrs("fd00::1", "fd00::2", "::1"),
	ServiceCIDRs:      []netip.Prefix{netip.MustParsePrefix("fd00:96::/112")},
}

func newReconciler6(f *fakeMaps) *reconciler {
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	r.family = model.IPv6
	return r
}

func TestReconcilerIPv6Frontends(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler6(f)
	web := func(backends ...string) model.ServicePort {
		sp := servicePort("default", "web", "http", model.TCP, "[fd00:96::10]:80", backends...)
		return withExternal(withNodePort(sp, 30080), []string{"fd00::2", "2001:db8::1"}, []string{"2001:db8::10"})
	}
	dns := withAffinity(servicePort("kube-system", "dns", "dns", model.UDP, "[fd00:96::53]:53", "[fd00:244::5]:53", "[fd00:244::6]:53"), 3*time.Hour)
	a, b, c := "[fd00:244::1]:8080", "[fd00:244::2]:8080", "[fd00:244:1::1]:8080"
	got := runSteps(t, f, r, []syncStep{
		{"ClusterIP, NodePort on each node address (::1 for the node only), a local external IP, a LoadBalancer IP; affinity", onNode(testNode6, true, web(a, b, c), dns), false},
		{"a backend goes", onNode(testNode6, false, web(a, c)), false},
		{"the Services go", onNode(testNode6, true), false},
	})
	checkGolden(t, "frontends6.golden", got)

	// A restart adopts what the IPv6 maps hold and rewrites nothing.
	snap := onNode(testNode6, true, web(a, b), dns)
	if err := r.sync(snap); err != nil {
		t.Fatal(err)
	}
	before := f.dump()
	f.takeLog()
	restarted := newReconciler6(f)
	if err := restarted.sync(snap); err != nil {
		t.Fatal(err)
	}
	if ops := f.takeLog(); len(ops) != 0 {
		t.Errorf("restart adoption wrote %q", ops)
	}
	checkCopy(t, restarted, f)
	if after := f.dump(); after != before {
		t.Errorf("restart changed the maps:\n%s\nwas\n%s", after, before)
	}
}

func TestReconcilerIPv6Rejects(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler6(f)
	web := servicePort("default", "web", "http", model.TCP, "[fd00:96::10]:80", "[fd00:244::1]:8080")
	outside := servicePort("default", "outside", "", model.TCP, "[fd00:97::1]:80", "[fd00:244::1]:8080")
	// An IPv4 Service CIDR in an IPv6 NodeInfo is not the IPv6 maps'.
	mixed := testNode6
	mixed.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd00:96::/112")}
	mixed.ForeignClusterIPs = addrs("fd00:96::77")
	got := runSteps(t, f, r, []syncStep{
		{"a ClusterIP in the Service CIDR", onNode(testNode6, true, web), false},
		{"a ClusterIP outside it: the whole IPv6 space holds ClusterIPs", onNode(testNode6, false, outside), false},
		{"it goes", withDeleted(onNode(testNode6, false), outside.Name.ServiceName), false},
		{"IPv4 CIDRs left out; a foreign ClusterIP", onNode(mixed, true, web), false},
	})
	checkGolden(t, "rejects6.golden", got)
}
