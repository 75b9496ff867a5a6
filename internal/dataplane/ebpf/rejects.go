package ebpf

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// What kube-proxy refuses, the programs refuse at connect() (see
// refusal_of in bpf/lb.c): a ClusterIP on a port its Service does not
// have, and, when the Service CIDRs are known, an address in them that is
// no ClusterIP. The programs look the ClusterIP set up only for an address
// in one of the ranges; a ClusterIP outside every Service CIDR known (or
// with none known) gets a range that holds it, the last, which refuses
// only the ClusterIPs themselves.
//
// The set follows the ClusterIP frontends as they are written and deleted
// (vipRefs), so that a sync touches only the addresses it changed. It also
// holds, marked foreign, the ClusterIPs of the Services another proxy
// serves (service.kubernetes.io/service-proxy-name), which are in no
// snapshot: the programs let those through whatever the port, as
// kube-proxy leaves them alone, for that proxy to serve.

// clusterIPState is what the reconciler knows of the ClusterIP set and the
// Service ranges.
type clusterIPState struct {
	// vipRefs counts the ClusterIP frontends in the frontend map by
	// address: the set must hold each address counted.
	vipRefs map[netip.Addr]int
	// dirty are the addresses whose count changed since the set was last
	// written; all, after a restore.
	dirty map[netip.Addr]struct{}
	// foreign are the ClusterIPs of other proxies' Services, as of the
	// last sync (model.NodeInfo.ForeignClusterIPs).
	foreign map[netip.Addr]struct{}
	// set is what the ClusterIP set holds: each address's kind
	// (clusterIPOurs, clusterIPForeign).
	set map[netip.Addr]uint32
	// kept are the Service CIDRs in the range array, and outside counts
	// the addresses of the set none of them holds.
	kept    []netip.Prefix
	outside int
	// ranges is what the range array holds.
	ranges [maxRanges]svcRange
	// dropped is set once the Service CIDRs were too many for the
	// array, which is logged once.
	dropped bool
}

// vipRef records that a ClusterIP frontend on ip was written (delta 1) or
// deleted (-1).
func (r *reconciler) vipRef(ip netip.Addr, delta int) {
	if r.vips.vipRefs[ip] += delta; r.vips.vipRefs[ip] <= 0 {
		delete(r.vips.vipRefs, ip)
	}
	r.vips.dirty[ip] = struct{}{}
}

// newClusterIPState is the state before restoreRejects, which follows the
// restore of the frontends, each of which counted its ClusterIP.
func newClusterIPState() clusterIPState {
	return clusterIPState{vipRefs: make(map[netip.Addr]int), dirty: make(map[netip.Addr]struct{}),
		foreign: make(map[netip.Addr]struct{}), set: make(map[netip.Addr]uint32)}
}

// restoreRejects reads the ClusterIP set and the Service ranges. Every
// address the frontends or the set has is checked by the next sync.
func (r *reconciler) restoreRejects() error {
	v := &r.vips
	err := r.maps.ClusterIPs.Iterate(func(addr netip.Addr, kind uint32) error {
		v.set[addr] = kind
		v.dirty[addr] = struct{}{}
		return nil
	})
	if err != nil {
		return err
	}
	// Unknown until the first sync says which CIDRs the ranges are to
	// hold: it compares them with none and counts outside afresh.
	v.kept = nil
	return r.maps.Ranges.Iterate(func(i uint32, rg svcRange) error {
		if i < maxRanges {
			v.ranges[i] = rg
		}
		return nil
	})
}

// syncRejects writes the ClusterIP set and the Service ranges that the
// applied frontends and the node's Service CIDRs need. Nothing in them is a
// reference to another entry: their order does not matter, and a change is
// seen by a racing connect either way. Addresses that fail stay to be
// written by the next sync.
func (r *reconciler) syncRejects(node *model.NodeInfo) error {
	v := &r.vips
	kept := r.keptCIDRs(node.ServiceCIDRs)
	recount := v.kept == nil || !slices.Equal(kept, v.kept)
	covered := func(ip netip.Addr) bool {
		return slices.ContainsFunc(kept, func(p netip.Prefix) bool { return p.Contains(ip) })
	}
	var errs []error
	foreign := make(map[netip.Addr]struct{}, len(node.ForeignClusterIPs))
	for _, ip := range node.ForeignClusterIPs {
		foreign[ip] = struct{}{}
		if _, had := v.foreign[ip]; !had {
			v.dirty[ip] = struct{}{}
		}
	}
	for ip := range v.foreign {
		if _, still := foreign[ip]; !still {
			v.dirty[ip] = struct{}{}
		}
	}
	v.foreign = foreign
	// want is the kind the set is to hold for ip: ours wins over another
	// proxy's (the API gives a ClusterIP to one Service; the other is a
	// deletion not yet seen).
	kindOf := func(ip netip.Addr) (uint32, bool) {
		if v.vipRefs[ip] > 0 {
			return clusterIPOurs, true
		}
		if _, ok := v.foreign[ip]; ok {
			return clusterIPForeign, true
		}
		return 0, false
	}
	dirty := slices.SortedFunc(maps.Keys(v.dirty), netip.Addr.Compare)
	// Deletes first: a set at capacity makes room for a new Service's
	// ClusterIP in the sync that removes an old one.
	for _, ip := range dirty {
		if _, have := v.set[ip]; !have {
			continue
		}
		if _, need := kindOf(ip); need {
			continue
		}
		if err := r.maps.ClusterIPs.Delete(ip); err != nil {
			errs = append(errs, fmt.Errorf("deleting ClusterIP %s: %w", ip, err))
			continue
		}
		delete(v.set, ip)
		if !covered(ip) {
			v.outside--
		}
	}
	for _, ip := range dirty {
		kind, have := v.set[ip]
		wantKind, need := kindOf(ip)
		if !need {
			if !have {
				delete(v.dirty, ip)
			}
			continue // else its delete failed above
		}
		if have && kind == wantKind {
			delete(v.dirty, ip)
			continue
		}
		if err := r.maps.ClusterIPs.Update(ip, wantKind); err != nil {
			errs = append(errs, fmt.Errorf("adding ClusterIP %s: %w", ip, err))
			continue
		}
		v.set[ip] = wantKind
		delete(v.dirty, ip)
		if !have && !covered(ip) {
			v.outside++
		}
	}
	v.dirty = emptied(v.dirty)
	if recount {
		v.kept = kept
		v.outside = 0
		for ip := range v.set {
			if !covered(ip) {
				v.outside++
			}
		}
	}
	var want [maxRanges]svcRange
	for i, p := range kept {
		want[i] = rangeValue(p, rangeServiceCIDR)
	}
	if v.outside > 0 {
		want[len(kept)] = rangeValue(netip.PrefixFrom(r.unspecified(), 0), rangeClusterIPs)
	}
	for i := range want {
		if want[i] == v.ranges[i] {
			continue
		}
		if err := r.maps.Ranges.Update(uint32(i), want[i]); err != nil {
			errs = append(errs, fmt.Errorf("writing Service range %d: %w", i, err))
			continue
		}
		v.ranges[i] = want[i]
	}
	return errors.Join(errs...)
}

// unspecified is the family's any-address, whose /0 is every address.
func (r *reconciler) unspecified() netip.Addr {
	if r.family == model.IPv6 {
		return netip.IPv6Unspecified()
	}
	return netip.IPv4Unspecified()
}

// keptCIDRs are the Service CIDRs of the reconciler's family the range array holds, in order,
// leaving room for the range of ClusterIPs outside them. CIDRs past what
// the array holds are left out (said once in the log): their addresses
// are then refused only if they are ClusterIPs.
func (r *reconciler) keptCIDRs(cidrs []netip.Prefix) []netip.Prefix {
	kept := []netip.Prefix{}
	for _, p := range cidrs {
		if !r.family.Has(p.Addr()) {
			continue
		}
		if len(kept) == maxRanges-1 {
			if !r.vips.dropped {
				r.vips.dropped = true
				klog.InfoS("More Service CIDRs than the datapath holds: unallocated addresses of the others are not refused",
					"held", kept, "cidrs", cidrs)
			}
			break
		}
		kept = append(kept, p.Masked())
	}
	return kept
}
