package model

import (
	"testing"
	"unsafe"

	v1 "k8s.io/api/core/v1"
)

// What the model keeps of each endpoint stays compact: it is held for every
// endpoint the proxy knows.
func TestSliceEndpointIsCompact(t *testing.T) {
	if got := unsafe.Sizeof(sliceEndpoint{}); got > 16 {
		t.Errorf("sliceEndpoint is %d bytes, want at most 16", got)
	}
}

// Two conversions of one slice compare equal, hints included (the tracker
// tells a changed slice from a repeated one this way), and differ when only
// a hint differs.
func TestConvertedSlicesCompareByHints(t *testing.T) {
	port := withSlicePorts(slicePortOf("http", v1.ProtocolTCP, 8080))
	mk := func(zones string) *sliceInfo {
		s := newSlice("s1", "svc", port, withEndpoints(ep("10.0.0.1 zones="+zones+" nodes=n1"), ep("10.0.0.2")))
		return convertSlice(s, testNode, IPv4, func(string, string) {})
	}
	a, b, c := mk("za,zb"), mk("za,zb"), mk("zc")
	if !equalSliceInfo(a, b) {
		t.Errorf("the same slice converted twice compares unequal: %+v, %+v", a.endpoints, b.endpoints)
	}
	if equalSliceInfo(a, c) {
		t.Errorf("slices whose zone hints differ compare equal")
	}
	if h := a.endpoints[0].hintsOf(); h.zones != hintSet([]string{"za", "zb"}) || h.nodes != hintSet([]string{"n1"}) {
		t.Errorf("hints = %q, %q", h.zones, h.nodes)
	}
	if h := a.endpoints[1].hintsOf(); h != (endpointHints{}) {
		t.Errorf("an endpoint without hints has %+v", h)
	}
}
