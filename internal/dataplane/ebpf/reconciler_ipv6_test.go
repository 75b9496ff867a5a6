package ebpf

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
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

// A snapshot handed to one family's datapath with addresses of the other
// (a proxier's bug) has them skipped and counted: nothing of the other
// family reaches the maps, and everything of the family is served.
func TestSyncSkipsAddressesOfTheOtherFamily(t *testing.T) {
	for _, tc := range []struct {
		family model.IPFamily
		mixed  model.ServicePort // of the family, with backends of both
		other  model.ServicePort // of the other family
		node   model.NodeInfo
		want   string
	}{
		{model.IPv4,
			withExternal(servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080", "[fd00:244::1]:8080"),
				[]string{"10.0.0.1", "fd00::1"}, nil),
			servicePort("default", "web6", "http", model.TCP, "[fd00:96::10]:80", "[fd00:244::1]:8080"),
			model.NodeInfo{NodePortAddresses: addrs("10.0.0.1", "fd00::1"), LocalAddresses: addrs("10.0.0.1", "fd00::1")},
			"10.0.0.1:80/TCP -> 10.244.0.1:8080\n10.96.0.10:80/TCP -> 10.244.0.1:8080\n"},
		{model.IPv6,
			withExternal(servicePort("default", "web", "http", model.TCP, "[fd00:96::10]:80", "10.244.0.1:8080", "[fd00:244::1]:8080"),
				[]string{"10.0.0.1", "fd00::1"}, nil),
			servicePort("default", "web4", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080"),
			model.NodeInfo{NodePortAddresses: addrs("10.0.0.1", "fd00::1"), LocalAddresses: addrs("10.0.0.1", "fd00::1")},
			"[fd00:96::10]:80/TCP -> [fd00:244::1]:8080\n[fd00::1]:80/TCP -> [fd00:244::1]:8080\n"},
	} {
		t.Run(tc.family.String(), func(t *testing.T) {
			f := newFakeMaps(16, 64)
			r := newReconciler(f.maps(), f.grace(), 16, 64)
			r.family = tc.family
			events := newEventCounts(eventFamilySkipped)
			r.events = events
			sockets := newUDPSocketCleaner(newFakeSocketHost("node"), fakeRevnat{}.lookup, events)
			cleanup := newCleanupWorker(sockets.clean)
			t.Cleanup(cleanup.close)
			p := &familyPath{rec: r, sockets: sockets, cleanup: cleanup}
			if err := p.Sync(t.Context(), onNode(tc.node, true, tc.mixed, tc.other)); err != nil {
				t.Fatal(err)
			}
			var got strings.Builder
			lines := []string{}
			for fe := range f.services.entries {
				set, _ := liveSet(f, fe)
				lines = append(lines, fmt.Sprintf("%s -> %s\n", fe, strings.Join(set, " ")))
			}
			slices.Sort(lines)
			for _, l := range lines {
				got.WriteString(l)
			}
			if got.String() != tc.want {
				t.Errorf("served\n%s, want\n%s", got.String(), tc.want)
			}
			counts := map[string]uint64{}
			events.copyTo(counts)
			// The mixed port's backend, its external IP (also the
			// node address), and the other port's ClusterIP.
			if counts[eventFamilySkipped] != 3 {
				t.Errorf("skipped %d addresses, want 3", counts[eventFamilySkipped])
			}
		})
	}
}
