package testnet

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) { Main(m, nil) }

// TestDualStackPods checks the topology the IPv6 and dual-stack tests
// stand on: an IPv4 pod made dual-stack, an IPv6-only pod and a
// dual-stack one reach each other over each family they share, and so does
// a hostNetwork client, from NodeAddress6 over IPv6.
func TestDualStackPods(t *testing.T) {
	n := New(t)
	a := n.AddPod("a", "10.244.0.2")
	a.AddAddress("fd00:10:244::2")
	b := n.AddPod("b", "fd00:10:244::3")
	c := n.AddPod("c", "10.244.0.4")
	c.AddAddress("fd00:10:244::4")
	if got := a.IPOf(false); got != netip.MustParseAddr("fd00:10:244::2") {
		t.Errorf("a's IPv6 address: %v", got)
	}
	if got := b.IPOf(true); got.IsValid() {
		t.Errorf("IPv6-only b has an IPv4 address %v", got)
	}
	for _, p := range []*Pod{a, b, c} {
		p.Start(false, Helper("serve", p.Name, "tcp:80", "tcp6:80")...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	connect := func(from, to *Pod, v4 bool) {
		t.Helper()
		addr := netip.AddrPortFrom(to.IPOf(v4), 80)
		helper := "tcp"
		if !v4 {
			helper = "tcp6"
		}
		out, err := from.Output(ctx, Helper(helper, addr.String(), "1")...)
		if err != nil {
			t.Errorf("%s to %s at %s: %v", from.Name, to.Name, addr, err)
			return
		}
		if f := strings.Fields(out); len(f) < 3 || f[0] != "ok" || f[1] != to.Name || f[2] != "peer="+addr.String() {
			t.Errorf("%s to %s at %s: %q, want an answer from %s", from.Name, to.Name, addr, strings.TrimSpace(out), to.Name)
		}
	}
	connect(a, b, false)
	connect(b, a, false)
	connect(a, c, true)
	connect(c, a, false)
	connect(b, c, false)
	host := n.HostNetwork()
	if got := host.IPOf(false); got != netip.MustParseAddr(NodeAddress6) {
		t.Errorf("the hostNetwork pod's IPv6 address is %v, want %s", got, NodeAddress6)
	}
	connect(host, b, false)
	connect(host, a, true)
}
