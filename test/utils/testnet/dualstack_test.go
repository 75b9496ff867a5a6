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
// a hostNetwork client, whose IPv6 connections come from NodeAddress6.
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
		p.Start(false, Helper("serve", p.Name, "tcp:80", "tcp6:80", "tcp6-src:81")...)
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
	// From NodeAddress6 itself: b sees it as the client's address.
	out, err := host.Output(ctx, Helper("tcp6", netip.AddrPortFrom(b.IPOf(false), 81).String(), "1")...)
	if f := strings.Fields(out); err != nil || len(f) < 3 || f[1] != b.Name || f[2] != "src="+NodeAddress6 {
		t.Errorf("hostNetwork to b over IPv6: %v: %q, want b to see src=%s", err, strings.TrimSpace(out), NodeAddress6)
	}
}
