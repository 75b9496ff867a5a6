package main

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// fakeProbes is a node whose /proc files and ip6tables backends are given.
func fakeProbes(files map[string]string, working ...string) nodeProbes {
	return nodeProbes{
		readFile: func(name string) ([]byte, error) {
			if s, ok := files[name]; ok {
				return []byte(s), nil
			}
			return nil, os.ErrNotExist
		},
		ip6tables: func(_ context.Context, backend string, _ ...string) error {
			if slices.Contains(working, backend) {
				return nil
			}
			return errors.New("ip6tables-" + backend + ": can't initialize ip6tables table `nat'")
		},
	}
}

// The families served, as kube-proxy decides them: dual-stack whenever
// the node supports IPv6, primary first; otherwise the primary family
// alone, which must be supported. The primary family comes from
// --bind-address, then the Node's addresses, then the hostname's.
func TestServedFamilies(t *testing.T) {
	ipv6On := map[string]string{"/proc/net/if_inet6": "", "/proc/sys/net/ipv6/conf/all/disable_ipv6": "0\n"}
	ipv6Disabled := map[string]string{"/proc/net/if_inet6": "", "/proc/sys/net/ipv6/conf/all/disable_ipv6": "1\n"}
	noIPv6 := map[string]string{}
	v4, v6 := netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")
	for _, tc := range []struct {
		name          string
		mode, backend string
		files         map[string]string
		working       []string
		bind          string
		nodeIPs       []netip.Addr
		want          []model.IPFamily
		wantErr       string
	}{
		{name: "dual-stack node", files: ipv6On, working: []string{"nft"}, nodeIPs: []netip.Addr{v4, v6},
			want: []model.IPFamily{model.IPv4, model.IPv6}},
		{name: "IPv6-primary dual-stack node", files: ipv6On, working: []string{"nft"}, nodeIPs: []netip.Addr{v6, v4},
			want: []model.IPFamily{model.IPv6, model.IPv4}},
		// kube-proxy runs dual-stack on a single-stack cluster too.
		{name: "IPv4 node that could serve IPv6", files: ipv6On, working: []string{"legacy"}, nodeIPs: []netip.Addr{v4},
			want: []model.IPFamily{model.IPv4, model.IPv6}},
		{name: "bind address makes IPv6 primary", files: ipv6On, working: []string{"nft"}, bind: "fd00::5", nodeIPs: []netip.Addr{v4},
			want: []model.IPFamily{model.IPv6, model.IPv4}},
		{name: "no kernel IPv6", files: noIPv6, working: []string{"nft", "legacy"}, nodeIPs: []netip.Addr{v4},
			want: []model.IPFamily{model.IPv4}},
		{name: "IPv6 disabled", files: ipv6Disabled, working: []string{"nft"}, nodeIPs: []netip.Addr{v4, v6},
			want: []model.IPFamily{model.IPv4}},
		{name: "no working ip6tables", files: ipv6On, nodeIPs: []netip.Addr{v4, v6},
			want: []model.IPFamily{model.IPv4}},
		{name: "ip6tables of another backend than the one asked for", backend: iptables.BackendLegacy, files: ipv6On, working: []string{"nft"}, nodeIPs: []netip.Addr{v4},
			want: []model.IPFamily{model.IPv4}},
		{name: "IPv6 node without IPv6 support", files: noIPv6, nodeIPs: []netip.Addr{v6},
			wantErr: "no support for the node's primary IP family IPv6"},
		{name: "bind address of an unsupported family", files: ipv6Disabled, bind: "fd00::5", nodeIPs: []netip.Addr{v4},
			wantErr: "IPv6 disabled"},
		{name: "nothing known: IPv4", files: noIPv6,
			want: []model.IPFamily{model.IPv4}},
		{name: "unspecified bind address is no bind address", files: noIPv6, bind: "::", nodeIPs: []netip.Addr{v4},
			want: []model.IPFamily{model.IPv4}},
		{name: "ebpf mode: the packet layer needs ip6tables", mode: "ebpf", files: ipv6On, nodeIPs: []netip.Addr{v4},
			want: []model.IPFamily{model.IPv4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mode, backend := tc.mode, tc.backend
			if mode == "" {
				mode = "iptables"
			}
			if backend == "" {
				backend = iptables.BackendAuto
			}
			support := supportedFamilies(context.Background(), mode, backend, fakeProbes(tc.files, tc.working...))
			got, err := chooseFamilies(detectPrimaryFamily(tc.bind, tc.nodeIPs), support)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, %v; want an error naming %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

// What must wait for every family's datapath runs once the last one
// calls, and from then on each time (the caller retries until it
// succeeds); the others' calls succeed without running it.
func TestAfterAll(t *testing.T) {
	ran := 0
	fns := afterAll(2, func(context.Context) error { ran++; return nil })
	ctx := context.Background()
	if err := fns[1](ctx); err != nil || ran != 0 {
		t.Fatalf("after one family: ran %d, %v", ran, err)
	}
	_ = fns[1](ctx)
	if ran != 0 {
		t.Fatalf("the same family twice ran it")
	}
	if err := fns[0](ctx); err != nil || ran != 1 {
		t.Fatalf("after both: ran %d, %v", ran, err)
	}
	one := afterAll(1, func(context.Context) error { ran++; return nil })
	if _ = one[0](ctx); ran != 2 {
		t.Fatalf("a single family: ran %d", ran)
	}
}

// --nodeport-addresses takes IPv6 CIDRs, and --service-cluster-ip-range
// ranges of either family, several of one too (as the ServiceCIDR objects
// it stands in for; versions before IPv6 took several IPv4 ones).
func TestIPv6Ranges(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		wantErr string
	}{
		{args: []string{"--nodeport-addresses=10.0.0.0/8,fd00::/64"}},
		{args: []string{"--nodeport-addresses=fd00::/64"}},
		{args: []string{"--nodeport-addresses=fd00::"}, wantErr: "--nodeport-addresses"},
		{args: []string{"--service-cluster-ip-range=10.96.0.0/12,fd00:10:96::/112"}},
		{args: []string{"--service-cluster-ip-range=10.96.0.0/12,10.97.0.0/16,fd00:10:96::/112"}},
		{args: []string{"--service-cluster-ip-range=10.96.0.0/12,fd00:10:96::"}, wantErr: "--service-cluster-ip-range"},
		// IPv4-mapped CIDRs are the IPv4 ranges they carry, as
		// kube-proxy reads them: two IPv4 cluster ranges.
		{args: []string{"--cluster-cidr=10.244.0.0/16,::ffff:10.245.0.0/112"}, wantErr: "both IPv4"},
		{args: []string{"--bind-address=fd00::5"}},
		{args: []string{"--bind-address=node-1"}, wantErr: "--bind-address"},
	} {
		var o options
		if err := newFlagSet(&o, nil).Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		err := o.validate()
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("%q: %v, want error %q", tc.args, err, tc.wantErr)
		}
	}
}
