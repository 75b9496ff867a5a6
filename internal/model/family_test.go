package model

import (
	"net/netip"
	"testing"
)

func TestFamilyOf(t *testing.T) {
	for _, tc := range []struct {
		ip   string
		want IPFamily
	}{
		{"10.0.0.1", IPv4},
		{"fd00::1", IPv6},
		{"::ffff:10.0.0.1", IPv6},
		{"::1", IPv6},
	} {
		ip := netip.MustParseAddr(tc.ip)
		if got := FamilyOf(ip); got != tc.want {
			t.Errorf("FamilyOf(%s) = %v, want %v", tc.ip, got, tc.want)
		}
		if !tc.want.Has(ip) || tc.want.Other().Has(ip) {
			t.Errorf("%v.Has(%s) wrong", tc.want, tc.ip)
		}
	}
	if IPv4.String() != "IPv4" || IPv6.String() != "IPv6" {
		t.Errorf("String: %q %q", IPv4, IPv6)
	}
	if (IPFamily(0)).Has(netip.Addr{}) {
		t.Error("the zero Addr has a family")
	}
}
