package nodeinfo

import (
	"net/netip"
	"os/exec"
	"slices"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// InterfaceAddresses reads a real namespace's addresses of both families,
// and InfoFor splits them: in a fresh node namespace with one pod link,
// given an IPv4 and an IPv6 address, plus the loopback and link-local ones
// the kernel adds.
func TestInterfaceAddressesBothFamilies(t *testing.T) {
	n := testnet.New(t)
	pod := n.AddPod("a", "10.244.1.5")
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"-n", n.Node}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	ip("addr", "add", "192.0.2.10/24", "dev", pod.HostIf)
	ip("addr", "add", "2001:db8::10/64", "dev", pod.HostIf, "nodad")
	ip("addr", "add", "fe80::10/64", "dev", pod.HostIf, "nodad")
	var got []netip.Addr
	if err := netnsenter.Do("/run/netns/"+n.Node, func() (err error) {
		got, err = InterfaceAddresses()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for _, want := range addrs("127.0.0.1", testnet.PodGateway, "192.0.2.10", "::1", "2001:db8::10", "fe80::10") {
		if !slices.Contains(got, want) {
			t.Errorf("%v missing from %v", want, got)
		}
	}
	if !slices.IsSortedFunc(got, netip.Addr.Compare) {
		t.Errorf("not sorted: %v", got)
	}
	s := New(Config{LocalAddresses: func() ([]netip.Addr, error) { return got, nil }})
	v4, v6 := s.InfoFor(model.IPv4), s.InfoFor(model.IPv6)
	for _, a := range v4.LocalAddresses {
		if !a.Is4() {
			t.Errorf("IPv4 local addresses hold %v", a)
		}
	}
	for _, a := range v6.LocalAddresses {
		if !a.Is6() || a.Is4In6() {
			t.Errorf("IPv6 local addresses hold %v", a)
		}
	}
	if !v6.AllLocalAddresses || slices.Contains(v6.NodePortAddresses, netip.MustParseAddr("::1")) ||
		!slices.Contains(v6.NodePortAddresses, netip.MustParseAddr("2001:db8::10")) {
		t.Errorf("IPv6 node port addresses %v (all %v): want every address but ::1", v6.NodePortAddresses, v6.AllLocalAddresses)
	}
	if slices.Contains(v4.NodePortAddresses, netip.MustParseAddr("127.0.0.1")) || !slices.Contains(v4.NodePortAddresses, netip.MustParseAddr("192.0.2.10")) {
		t.Errorf("IPv4 node port addresses %v", v4.NodePortAddresses)
	}
}
