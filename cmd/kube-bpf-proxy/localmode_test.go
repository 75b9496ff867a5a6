package main

import (
	"io"
	"strings"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// --detect-local-mode picks kube-proxy's detector, per IP family: the
// cluster CIDR of the family by default (none without one), the Node's pod
// range (read at start), a bridge, or an interface name prefix (both
// families); a mode missing its flag, or an unknown mode, is a usage
// error. --cluster-cidr takes at most one range per family, as kube-proxy
// validates it.
func TestDetectLocalMode(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		want4      string // LocalTraffic.String()
		want6      string // "" means as want4
		wantErr    string
		wantPrefix int // clusterPrefixes parsed
	}{
		{args: nil, want4: "none"},
		{args: []string{"--cluster-cidr=10.244.0.0/16"}, want4: "source 10.244.0.0/16", want6: "none", wantPrefix: 1},
		{args: []string{"--detect-local-mode=ClusterCIDR", "--cluster-cidr=10.244.0.0/16"}, want4: "source 10.244.0.0/16", want6: "none", wantPrefix: 1},
		{args: []string{"--cluster-cidr=10.244.0.0/16,fd00:10:244::/56"}, want4: "source 10.244.0.0/16", want6: "source fd00:10:244::/56", wantPrefix: 2},
		{args: []string{"--cluster-cidr=fd00:10:244::/56, 10.244.0.0/16"}, want4: "source 10.244.0.0/16", want6: "source fd00:10:244::/56", wantPrefix: 2},
		{args: []string{"--cluster-cidr=fd00:10:244::/56"}, want4: "none", want6: "source fd00:10:244::/56", wantPrefix: 1},
		{args: []string{"--cluster-cidr=10.244.0.0/16,10.245.0.0/16"}, wantErr: "at most one CIDR per IP family"},
		{args: []string{"--cluster-cidr=fd00::/56,fd01::/56"}, wantErr: "at most one CIDR per IP family"},
		{args: []string{"--cluster-cidr=10.244.0.0"}, wantErr: "--cluster-cidr"},
		{args: []string{"--detect-local-mode=ClusterCIDR"}, want4: "none"},
		// Filled at start from the Node.
		{args: []string{"--detect-local-mode=NodeCIDR", "--cluster-cidr=10.244.0.0/16"}, want4: "none", wantPrefix: 1},
		{args: []string{"--detect-local-mode=BridgeInterface", "--pod-bridge-interface=cbr0", "--cluster-cidr=10.244.0.0/16"}, want4: "interface cbr0", wantPrefix: 1},
		{args: []string{"--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=veth"}, want4: "interface veth+"},
		{args: []string{"--detect-local-mode=BridgeInterface"}, wantErr: "--pod-bridge-interface"},
		{args: []string{"--detect-local-mode=InterfaceNamePrefix"}, wantErr: "--pod-interface-name-prefix"},
		{args: []string{"--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=a-name-far-too-long"}, wantErr: "15 characters"},
		{args: []string{"--detect-local-mode=BridgeInterface", "--pod-bridge-interface=br 0"}, wantErr: "not an interface name"},
		{args: []string{"--detect-local-mode=clustercidr"}, wantErr: "unknown --detect-local-mode"},
	} {
		var o options
		if err := newFlagSet(&o, io.Discard).Parse(tc.args); err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		err := o.validate()
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: error %v, want one naming %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%q: %v", tc.args, err)
		}
		if len(o.clusterPrefixes) != tc.wantPrefix {
			t.Errorf("%q: cluster CIDRs %v, want %d", tc.args, o.clusterPrefixes, tc.wantPrefix)
		}
		for f, want := range map[model.IPFamily]string{model.IPv4: tc.want4, model.IPv6: tc.want6} {
			if want == "" {
				want = tc.want4
			}
			for _, cfg := range [2]string{o.iptablesConfig(f).LocalTraffic.String(), o.packetLayerConfig(f).LocalTraffic.String()} {
				if cfg != want {
					t.Errorf("%q: %v local traffic detected by %s, want %s", tc.args, f, cfg, want)
				}
			}
			if got := o.iptablesConfig(f).Family; got != f {
				t.Errorf("%q: %v datapath programs %v", tc.args, f, got)
			}
		}
	}
}
