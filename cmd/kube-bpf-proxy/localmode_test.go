package main

import (
	"io"
	"strings"
	"testing"
)

// --detect-local-mode picks kube-proxy's detector: the cluster CIDR by
// default (none without one), the Node's pod range (read at start), a
// bridge, or an interface name prefix; a mode missing its flag, or an
// unknown mode, is a usage error.
func TestDetectLocalMode(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		want    string // LocalTraffic.String()
		wantErr string
	}{
		{nil, "none", ""},
		{[]string{"--cluster-cidr=10.244.0.0/16"}, "source 10.244.0.0/16", ""},
		{[]string{"--detect-local-mode=ClusterCIDR", "--cluster-cidr=10.244.0.0/16"}, "source 10.244.0.0/16", ""},
		{[]string{"--detect-local-mode=ClusterCIDR"}, "none", ""},
		// Filled at start from the Node.
		{[]string{"--detect-local-mode=NodeCIDR", "--cluster-cidr=10.244.0.0/16"}, "none", ""},
		{[]string{"--detect-local-mode=BridgeInterface", "--pod-bridge-interface=cbr0", "--cluster-cidr=10.244.0.0/16"}, "interface cbr0", ""},
		{[]string{"--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=veth"}, "interface veth+", ""},
		{[]string{"--detect-local-mode=BridgeInterface"}, "", "--pod-bridge-interface"},
		{[]string{"--detect-local-mode=InterfaceNamePrefix"}, "", "--pod-interface-name-prefix"},
		{[]string{"--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=a-name-far-too-long"}, "", "15 characters"},
		{[]string{"--detect-local-mode=BridgeInterface", "--pod-bridge-interface=br 0"}, "", "not an interface name"},
		{[]string{"--detect-local-mode=clustercidr"}, "", "unknown --detect-local-mode"},
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
		for _, cfg := range [2]string{o.iptablesConfig().LocalTraffic.String(), o.packetLayerConfig().LocalTraffic.String()} {
			if cfg != tc.want {
				t.Errorf("%q: local traffic detected by %s, want %s", tc.args, cfg, tc.want)
			}
		}
	}
}
