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

// restoreRejects reads the ClusterIP set and the Service ranges.
func (r *reconciler) restoreRejects() error {
	err := r.maps.ClusterIPs.Iterate(func(ip uint32, _ uint32) error {
		r.clusterIPs[addrFromBPF(ip)] = struct{}{}
		return nil
	})
	if err != nil {
		return err
	}
	return r.maps.Ranges.Iterate(func(i uint32, v lbSvcRange) error {
		if i < maxRanges {
			r.ranges[i] = v
		}
		return nil
	})
}

// syncRejects writes the ClusterIP set and the Service ranges the applied
// frontends and node need, and deletes what they no longer need. Nothing
// in them is a reference to another entry: their order does not matter,
// and a change is seen by a racing connect either way.
func (r *reconciler) syncRejects(node *model.NodeInfo) error {
	want := make(map[netip.Addr]struct{})
	for fe, f := range r.frontends {
		if f.flags&kindFlags == 0 {
			want[fe.IP] = struct{}{}
		}
	}
	var errs []error
	// Deletes first: a set at capacity makes room for a new Service's
	// ClusterIP in the sync that removes an old one.
	for _, ip := range slices.SortedFunc(maps.Keys(r.clusterIPs), netip.Addr.Compare) {
		if _, ok := want[ip]; ok {
			continue
		}
		if err := r.maps.ClusterIPs.Delete(addrToBPF(ip)); err != nil {
			errs = append(errs, fmt.Errorf("deleting ClusterIP %s: %w", ip, err))
			continue
		}
		delete(r.clusterIPs, ip)
	}
	for _, ip := range slices.SortedFunc(maps.Keys(want), netip.Addr.Compare) {
		if _, ok := r.clusterIPs[ip]; ok {
			continue
		}
		if err := r.maps.ClusterIPs.Update(addrToBPF(ip), 0); err != nil {
			errs = append(errs, fmt.Errorf("adding ClusterIP %s: %w", ip, err))
			continue
		}
		r.clusterIPs[ip] = struct{}{}
	}
	ranges := r.rangesFor(node.ServiceCIDRs, r.clusterIPs)
	for i := range ranges {
		if ranges[i] == r.ranges[i] {
			continue
		}
		if err := r.maps.Ranges.Update(uint32(i), ranges[i]); err != nil {
			errs = append(errs, fmt.Errorf("writing Service range %d: %w", i, err))
			continue
		}
		r.ranges[i] = ranges[i]
	}
	return errors.Join(errs...)
}

// rangesFor lays out the Service range array: the IPv4 Service CIDRs in
// order, then, if a ClusterIP lies outside all of them, 0.0.0.0/0 for the
// ClusterIPs only; the rest ends the list. CIDRs past what the array holds
// are left out (said once in the log): their addresses are then refused
// only if they are ClusterIPs.
func (r *reconciler) rangesFor(cidrs []netip.Prefix, clusterIPs map[netip.Addr]struct{}) [maxRanges]lbSvcRange {
	var out [maxRanges]lbSvcRange
	var kept []netip.Prefix
	for _, p := range cidrs {
		if !p.Addr().Is4() {
			continue
		}
		if len(kept) == maxRanges-1 {
			if !r.rangesDropped {
				r.rangesDropped = true
				klog.InfoS("More Service CIDRs than the datapath holds: unallocated addresses of the others are not refused",
					"held", kept, "cidrs", cidrs)
			}
			break
		}
		out[len(kept)] = rangeValue(p, rangeServiceCIDR)
		kept = append(kept, p.Masked())
	}
	for ip := range clusterIPs {
		if !slices.ContainsFunc(kept, func(p netip.Prefix) bool { return p.Contains(ip) }) {
			out[len(kept)] = rangeValue(netip.PrefixFrom(netip.IPv4Unspecified(), 0), rangeClusterIPs)
			break
		}
	}
	return out
}
