package nodeinfo

import (
	"context"
	"errors"
	"maps"
	"net"
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

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// dualLocal is a dual-stack node's addresses, sorted as InterfaceAddresses
// sorts them.
var dualLocal = addrs("10.0.0.5", "127.0.0.1", "192.168.1.2", "::1", "2001:db8::7", "fd00::5", "fe80::1")

// --nodeport-addresses per family, as kube-proxy's NewNodePortAddresses
// for each proxier: a family the flag names no CIDR of serves every
// address of it; "primary" is the Node's address of each family; ::1 never
// serves.
func TestChooseForFamilies(t *testing.T) {
	primaries := map[model.IPFamily]netip.Addr{model.IPv4: netip.MustParseAddr("192.168.1.2"), model.IPv6: netip.MustParseAddr("fd00::5")}
	allV4, allV6 := addrs("10.0.0.5", "192.168.1.2"), addrs("2001:db8::7", "fd00::5", "fe80::1")
	type fam struct {
		want []netip.Addr
		all  bool
	}
	for _, tc := range []struct {
		name     string
		flag     []string
		primary  map[model.IPFamily]netip.Addr
		nodeSeen bool
		v4, v6   fam
	}{
		{name: "no flag", v4: fam{allV4, true}, v6: fam{allV6, true}},
		{name: "IPv4 CIDR only: IPv6 serves everywhere", flag: []string{"10.0.0.0/8"},
			v4: fam{addrs("10.0.0.5"), false}, v6: fam{allV6, true}},
		{name: "IPv6 CIDR only: IPv4 serves everywhere", flag: []string{"fd00::/8"},
			v4: fam{allV4, true}, v6: fam{addrs("fd00::5"), false}},
		{name: "mixed", flag: []string{"192.168.0.0/16", " 2001:db8::/32", "fe80::/10"},
			v4: fam{addrs("192.168.1.2"), false}, v6: fam{addrs("2001:db8::7", "fe80::1"), false}},
		{name: "loopback named: IPv4 serves it, IPv6 never", flag: []string{"127.0.0.0/8", "::1/128"},
			v4: fam{addrs("127.0.0.1"), false}, v6: fam{nil, false}},
		{name: "::/0 is every IPv6 address, loopback left out", flag: []string{"::/0", "10.0.0.0/8"},
			v4: fam{addrs("10.0.0.5"), false}, v6: fam{allV6, true}},
		{name: "an IPv4-mapped CIDR is the IPv4 one it carries, as kube-proxy reads it", flag: []string{"::ffff:10.0.0.0/104"},
			v4: fam{addrs("10.0.0.5"), false}, v6: fam{allV6, true}},
		{name: "0.0.0.0/0 is every IPv4 address", flag: []string{"0.0.0.0/0", "fd00::/64"},
			v4: fam{allV4, true}, v6: fam{addrs("fd00::5"), false}},
		{name: "primary of both families", flag: []string{"primary"}, primary: primaries, nodeSeen: true,
			v4: fam{addrs("192.168.1.2"), false}, v6: fam{addrs("fd00::5"), false}},
		{name: "primary, Node without an IPv6 address: every IPv6 address, as kube-proxy", flag: []string{"primary"},
			primary: map[model.IPFamily]netip.Addr{model.IPv4: netip.MustParseAddr("192.168.1.2")}, nodeSeen: true,
			v4: fam{addrs("192.168.1.2"), false}, v6: fam{allV6, true}},
		{name: "primary, loopback node IP: ignored, as kube-proxy", flag: []string{"primary"},
			primary: map[model.IPFamily]netip.Addr{model.IPv4: netip.MustParseAddr("192.168.1.2"), model.IPv6: netip.MustParseAddr("::1")}, nodeSeen: true,
			v4: fam{addrs("192.168.1.2"), false}, v6: fam{allV6, true}},
		{name: "primary, Node not seen yet: nowhere", flag: []string{"primary"},
			v4: fam{nil, false}, v6: fam{nil, false}},
		{name: "primary not a local address: nowhere", flag: []string{"primary"}, nodeSeen: true,
			primary: map[model.IPFamily]netip.Addr{model.IPv4: netip.MustParseAddr("192.0.2.1"), model.IPv6: netip.MustParseAddr("2001:db8::99")},
			v4:      fam{nil, false}, v6: fam{nil, false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sel, err := ParseSelector(tc.flag)
			if err != nil {
				t.Fatal(err)
			}
			for f, want := range map[model.IPFamily]fam{model.IPv4: tc.v4, model.IPv6: tc.v6} {
				got, all := sel.ChooseFor(f, dualLocal, tc.primary[f], tc.nodeSeen)
				if !slices.Equal(got, want.want) || all != want.all {
					t.Errorf("%s: %v all=%v, want %v all=%v", f, got, all, want.want, want.all)
				}
			}
		})
	}
}

func TestParseSelectorIPv6(t *testing.T) {
	sel, err := ParseSelector([]string{"fd00::1/64", "10.0.0.7/8", "", " ::1/128 "})
	if err != nil {
		t.Fatal(err)
	}
	if want := prefixes("fd00::/64", "10.0.0.0/8", "::1/128"); !slices.Equal(sel.Prefixes, want) || sel.Primary {
		t.Errorf("parsed %+v, want prefixes %v", sel, want)
	}
	for _, bad := range [][]string{{"fd00::"}, {"fd00::/129"}, {"primary", "fd00::/64"}, {"fe80::/10%eth0"}} {
		if _, err := ParseSelector(bad); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

// The Node's primary address per family: its first InternalIP of the
// family, else its first ExternalIP of it.
func TestPrimaryAddresses(t *testing.T) {
	node := func(as ...v1.NodeAddress) *v1.Node { return &v1.Node{Status: v1.NodeStatus{Addresses: as}} }
	in := func(a string) v1.NodeAddress { return v1.NodeAddress{Type: v1.NodeInternalIP, Address: a} }
	ex := func(a string) v1.NodeAddress { return v1.NodeAddress{Type: v1.NodeExternalIP, Address: a} }
	for _, tc := range []struct {
		node   *v1.Node
		v4, v6 string
	}{
		{node(in("10.0.0.5"), in("fd00::5")), "10.0.0.5", "fd00::5"},
		{node(in("fd00::5"), in("10.0.0.5"), in("10.0.0.6")), "10.0.0.5", "fd00::5"},
		{node(ex("2001:db8::1"), in("10.0.0.5"), ex("192.0.2.1")), "10.0.0.5", "2001:db8::1"},
		{node(ex("2001:db8::1"), in("fd00::5"), v1.NodeAddress{Type: v1.NodeHostName, Address: "n1"}), "", "fd00::5"},
		{node(in("bogus"), in("::ffff:10.0.0.9")), "10.0.0.9", ""},
		{node(), "", ""},
	} {
		got := PrimaryAddresses(tc.node)
		for f, want := range map[model.IPFamily]string{model.IPv4: tc.v4, model.IPv6: tc.v6} {
			if w, _ := netip.ParseAddr(want); got[f] != w {
				t.Errorf("%v: %s primary %v, want %q", tc.node.Status.Addresses, f, got[f], want)
			}
		}
	}
}

// InfoFor gives each family's proxier that family's addresses, node port
// addresses, primary address and Service ranges, from the Node and the
// ServiceCIDR objects.
func TestInfoForFamilies(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	client := fake.NewClientset()
	s := New(Config{NodeName: "n1", NodePorts: Selector{Primary: true},
		LocalAddresses: func() ([]netip.Addr, error) { return dualLocal, nil },
		ServiceCIDRs:   prefixes("fd00:10::/108", "10.96.0.0/12")})
	changes := make(chan struct{}, 100)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Run(ctx, client, func() { changes <- struct{}{} }) }()
	t.Cleanup(func() { cancel(); <-done })

	// Before the API says anything: the configured ranges, per family;
	// no primary known, so no node port address.
	for f, want := range map[model.IPFamily][]netip.Prefix{model.IPv4: prefixes("10.96.0.0/12"), model.IPv6: prefixes("fd00:10::/108")} {
		info := s.InfoFor(f)
		if !slices.Equal(info.ServiceCIDRs, want) || info.NodePortAddresses != nil || info.AllLocalAddresses {
			t.Errorf("%s before the API: %+v", f, info)
		}
	}

	if _, err := client.CoreV1().Nodes().Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"},
		Status: v1.NodeStatus{Addresses: []v1.NodeAddress{
			{Type: v1.NodeInternalIP, Address: "fd00::5"}, {Type: v1.NodeInternalIP, Address: "192.168.1.2"}}}},
		metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cidr := &networkingv1.ServiceCIDR{ObjectMeta: metav1.ObjectMeta{Name: "kubernetes"},
		Spec: networkingv1.ServiceCIDRSpec{CIDRs: []string{"10.100.0.0/16", "fd00:20::/112"}}}
	if _, err := client.NetworkingV1().ServiceCIDRs().Create(ctx, cidr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := map[model.IPFamily]model.NodeInfo{
		model.IPv4: {NodePortAddresses: addrs("192.168.1.2"), LocalAddresses: addrs("10.0.0.5", "127.0.0.1", "192.168.1.2"),
			ServiceCIDRs: prefixes("10.100.0.0/16")},
		model.IPv6: {NodePortAddresses: addrs("fd00::5"), LocalAddresses: addrs("::1", "2001:db8::7", "fd00::5", "fe80::1"),
			ServiceCIDRs: prefixes("fd00:20::/112")},
	}
	if err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		return s.InfoFor(model.IPv4).Equal(want[model.IPv4]) && s.InfoFor(model.IPv6).Equal(want[model.IPv6]), nil
	}); err != nil {
		t.Fatalf("IPv4 %+v\nIPv6 %+v\nwant %+v", s.InfoFor(model.IPv4), s.InfoFor(model.IPv6), want)
	}
	if !s.Info().Equal(want[model.IPv4]) {
		t.Errorf("Info() is not InfoFor(IPv4): %+v", s.Info())
	}
	if s.PrimaryAddress(model.IPv4) != netip.MustParseAddr("192.168.1.2") || s.PrimaryAddress(model.IPv6) != netip.MustParseAddr("fd00::5") {
		t.Errorf("primary addresses %v %v", s.PrimaryAddress(model.IPv4), s.PrimaryAddress(model.IPv6))
	}

	// The Node loses its IPv6 address: IPv6 node ports are served on every
	// IPv6 address, as kube-proxy's "primary" then names none of IPv6.
	node, err := client.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = node.Status.Addresses[1:]
	if _, err := client.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		return s.InfoFor(model.IPv6).AllLocalAddresses, nil
	}); err != nil {
		t.Fatalf("IPv6 after the Node lost its IPv6 address: %+v", s.InfoFor(model.IPv6))
	}
	if got := s.InfoFor(model.IPv6).NodePortAddresses; !slices.Equal(got, addrs("2001:db8::7", "fd00::5", "fe80::1")) {
		t.Errorf("IPv6 node port addresses %v", got)
	}
	if got := s.InfoFor(model.IPv4).NodePortAddresses; !slices.Equal(got, addrs("192.168.1.2")) {
		t.Errorf("IPv4 node port addresses %v", got)
	}
}

// The Node's pod ranges per family, for --detect-local-mode=NodeCIDR.
func TestPodCIDRsPerFamily(t *testing.T) {
	p := netip.MustParsePrefix
	for _, tc := range []struct {
		cidrs []string
		cidr  string
		want  map[model.IPFamily]netip.Prefix
	}{
		{[]string{"10.244.3.0/24", "fd00:1::/64"}, "", map[model.IPFamily]netip.Prefix{model.IPv4: p("10.244.3.0/24"), model.IPv6: p("fd00:1::/64")}},
		{[]string{"fd00:1::5/64", "10.244.3.0/24"}, "", map[model.IPFamily]netip.Prefix{model.IPv4: p("10.244.3.0/24"), model.IPv6: p("fd00:1::/64")}},
		{[]string{"fd00:1::/64"}, "", map[model.IPFamily]netip.Prefix{model.IPv6: p("fd00:1::/64")}},
		{nil, "fd00:1::/64", map[model.IPFamily]netip.Prefix{model.IPv6: p("fd00:1::/64")}},
		{[]string{"bogus", "10.244.3.0/24", "10.244.4.0/24"}, "", map[model.IPFamily]netip.Prefix{model.IPv4: p("10.244.3.0/24")}},
		{nil, "", map[model.IPFamily]netip.Prefix{}},
	} {
		node := &v1.Node{Spec: v1.NodeSpec{PodCIDRs: tc.cidrs, PodCIDR: tc.cidr}}
		if got := PodCIDRs(node); !maps.Equal(got, tc.want) {
			t.Errorf("%v %q: %v, want %v", tc.cidrs, tc.cidr, got, tc.want)
		}
	}
}

// WaitForPodCIDRs waits for any pod range, as kube-proxy: an IPv6-only
// Node has one; Run exits when any family's range changes, or a family
// gains one.
func TestPodCIDRsWaitAndChange(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	client := fake.NewClientset()
	nodes := client.CoreV1().Nodes()
	node, err := nodes.Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"},
		Spec: v1.NodeSpec{PodCIDR: "fd00:1::/64", PodCIDRs: []string{"fd00:1::/64"}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got, err := WaitForPodCIDRs(ctx, client, "n1", time.Millisecond, time.Minute)
	if want := map[model.IPFamily]netip.Prefix{model.IPv6: netip.MustParsePrefix("fd00:1::/64")}; err != nil || !maps.Equal(got, want) {
		t.Fatalf("WaitForPodCIDRs = %v, %v; want %v", got, err, want)
	}
	if _, err := nodes.Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n2"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := WaitForPodCIDRs(ctx, client, "n2", time.Millisecond, 20*time.Millisecond); err == nil || !strings.Contains(err.Error(), "spec.podCIDRs") {
		t.Errorf("no pod range: %v", err)
	}

	s := New(Config{NodeName: "n1", PodCIDRs: got, LocalAddresses: func() ([]netip.Addr, error) { return nil, nil }})
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx, client, func() {}) }()
	node.Spec.PodCIDRs = []string{"fd00:1::/64", "10.244.3.0/24"} // the Node gains an IPv4 range
	if _, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := <-ran; !errors.Is(err, ErrPodCIDRChanged) {
		t.Errorf("per family, an IPv4 range added: %v, want ErrPodCIDRChanged", err)
	}

	// What each configuration calls a change.
	withCIDRs := func(cidrs ...string) *v1.Node { return &v1.Node{Spec: v1.NodeSpec{PodCIDRs: cidrs}} }
	dual := New(Config{PodCIDRs: PodCIDRs(withCIDRs("10.244.3.0/24", "fd00:1::/64"))})
	for _, c := range []struct {
		node *v1.Node
		dual bool
	}{
		{withCIDRs("10.244.3.0/24", "fd00:1::/64"), false},
		{withCIDRs("fd00:1::/64", "10.244.3.0/24"), false},
		{withCIDRs("10.244.3.0/24", "fd00:2::/64"), true},
		{withCIDRs("10.244.3.0/24"), true},
		{withCIDRs("10.244.4.0/24", "fd00:1::/64"), true},
		{withCIDRs("fd00:1::/64"), true},
	} {
		if got := dual.podCIDRsChanged(c.node); got != c.dual {
			t.Errorf("PodCIDRs, Node %v: changed %v", c.node.Spec.PodCIDRs, got)
		}
	}
	// Without pod ranges in use (another --detect-local-mode), no
	// change of the Node's matters.
	if New(Config{}).podCIDRsChanged(withCIDRs("10.244.4.0/24")) {
		t.Error("no ranges in use: a change of the Node's ends Run")
	}
}

// InterfaceAddresses reads addresses of both families, IPv4 first; a
// 16-byte IPv4 address is IPv4; link-local IPv6 addresses carry no zone.
func TestAddressesOf(t *testing.T) {
	ipnet := func(s string) net.Addr {
		ip, n, err := net.ParseCIDR(s)
		if err != nil {
			t.Fatal(err)
		}
		n.IP = ip
		return n
	}
	got := addressesOf([]net.Addr{
		ipnet("fe80::1/64"), ipnet("10.0.0.5/24"), ipnet("::1/128"), ipnet("127.0.0.1/8"),
		&net.IPNet{IP: net.IPv4(192, 168, 1, 2), Mask: net.CIDRMask(24, 32)}, // 16 bytes
		ipnet("fe80::1/64"), // the same link-local address on another link
		&net.IPAddr{IP: net.ParseIP("2001:db8::7")},
		&net.UnixAddr{Name: "x"},
	})
	if want := addrs("10.0.0.5", "127.0.0.1", "192.168.1.2", "::1", "2001:db8::7", "fe80::1"); !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// A specific --bind-address is the primary address of its family for
// --nodeport-addresses=primary, as kube-proxy's detectNodeIPs makes it; the
// other family keeps the Node's.
func TestBindAddressIsPrimary(t *testing.T) {
	s := New(Config{NodeName: "n1", NodePorts: Selector{Primary: true},
		LocalAddresses: func() ([]netip.Addr, error) { return dualLocal, nil },
		BindAddress:    netip.MustParseAddr("10.0.0.5")})
	s.setNode(&v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}, Status: v1.NodeStatus{Addresses: []v1.NodeAddress{
		{Type: v1.NodeInternalIP, Address: "192.168.1.2"}, {Type: v1.NodeInternalIP, Address: "fd00::5"}}}})
	if got := s.InfoFor(model.IPv4).NodePortAddresses; !slices.Equal(got, addrs("10.0.0.5")) {
		t.Errorf("IPv4 node port addresses %v, want the bind address", got)
	}
	if got := s.InfoFor(model.IPv6).NodePortAddresses; !slices.Equal(got, addrs("fd00::5")) {
		t.Errorf("IPv6 node port addresses %v, want the Node's", got)
	}
}
