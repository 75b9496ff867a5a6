package ebpf

import (
	"encoding/binary"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// The reconciler is one piece of code for both families: it reads and
// writes its maps in family-neutral terms (model.Frontend, backendKey,
// netip.Addr, svcRange), and codecMap encodes them in the layout of the
// family's maps, kbp_* for IPv4 and kbp6_* for IPv6 (bpf/lb.c, "IPv6").
// Only the address encoding differs; the maps keyed by id (slots,
// counters, affinity matches) have one layout in both families.

// svcRange is an entry of the Service range array: a prefix and its kind
// (rangeServiceCIDR, rangeClusterIPs), or rangeEnd.
type svcRange struct {
	Prefix netip.Prefix
	Kind   uint8
}

// codecMap presents inner, a map of kernel layout KK -> VV, as a map of
// K -> V.
type codecMap[K, KK comparable, V, VV any] struct {
	inner    Map[KK, VV]
	encKey   func(K) KK
	decKey   func(KK) K
	encValue func(V) VV
	decValue func(VV) V
}

func (c *codecMap[K, KK, V, VV]) Update(key K, value V) error {
	return c.inner.Update(c.encKey(key), c.encValue(value))
}

func (c *codecMap[K, KK, V, VV]) Delete(key K) error {
	return c.inner.Delete(c.encKey(key))
}

func (c *codecMap[K, KK, V, VV]) Iterate(fn func(K, V) error) error {
	return c.inner.Iterate(func(k KK, v VV) error { return fn(c.decKey(k), c.decValue(v)) })
}

func same[T any](v T) T { return v }

// addr6ToBPF and addr6FromBPF are addrToBPF and addrFromBPF for 16-byte
// addresses: four words, each the network-order bytes loaded in host
// order. An IPv4 address is taken as its v4-mapped form (the reconciler
// never writes one to the IPv6 maps: Sync skips it).
func addr6ToBPF(ip netip.Addr) [4]uint32 {
	b := ip.As16()
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

func addr6FromBPF(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	return netip.AddrFrom16(b)
}

// addr4ToBPF is addrToBPF for an address that may not be IPv4: such an
// address is written as 0.0.0.0, which no Service has (Sync skips it
// before it gets here; this keeps a bug from crashing the proxy).
func addr4ToBPF(ip netip.Addr) uint32 {
	if !ip.Is4() {
		return 0
	}
	return addrToBPF(ip)
}

func frontendKey6(f model.Frontend) lbSvc6Key {
	return lbSvc6Key{Addr: addr6ToBPF(f.IP), Port: portToBPF(f.Port), Proto: uint8(f.Protocol)}
}

func frontendFromKey6(k lbSvc6Key) model.Frontend {
	return model.Frontend{IP: addr6FromBPF(k.Addr), Port: portFromBPF(k.Port), Protocol: model.Protocol(k.Proto)}
}

func backendValue6(b backendKey) lbBackend6Value {
	return lbBackend6Value{Addr: addr6ToBPF(b.IP), Port: portToBPF(b.Port), Proto: uint8(b.Protocol)}
}

func backendKeyFromValue6(v lbBackend6Value) backendKey {
	return backendKey{
		Backend:  model.Backend{IP: addr6FromBPF(v.Addr), Port: portFromBPF(v.Port)},
		Protocol: model.Protocol(v.Proto),
	}
}

func rangeValue6(r svcRange) lbSvcRange6 {
	if r.Kind == rangeEnd {
		return lbSvcRange6{}
	}
	return lbSvcRange6{Net: addr6ToBPF(r.Prefix.Masked().Addr()), Bits: uint8(r.Prefix.Bits()), Kind: r.Kind}
}

func rangeFromValue6(v lbSvcRange6) svcRange {
	if v.Kind == rangeEnd {
		return svcRange{}
	}
	return svcRange{Prefix: netip.PrefixFrom(addr6FromBPF(v.Net), int(v.Bits)), Kind: v.Kind}
}

func rangeValue4(r svcRange) lbSvcRange {
	if r.Kind == rangeEnd {
		return lbSvcRange{}
	}
	return lbSvcRange{Net: addr4ToBPF(r.Prefix.Masked().Addr()), Bits: uint8(r.Prefix.Bits()), Kind: r.Kind}
}

func rangeFromValue4(v lbSvcRange) svcRange {
	if v.Kind == rangeEnd {
		return svcRange{}
	}
	return svcRange{Prefix: netip.PrefixFrom(addrFromBPF(v.Net), int(v.Bits)), Kind: v.Kind}
}

// familyMaps are the names of one family's maps that differ by family,
// and the objects holding them.
type familyMaps struct {
	services, slots, backends, revnat, stats, affinity, matches, clusterIPs, ranges *ebpf.Map
	// names, in the order above.
	servicesName, slotsName, backendsName, revnatName, statsName, affinityName, matchesName, clusterIPsName, rangesName string
}

// mapNamesOf returns the names of family f's maps.
func mapNamesOf(f model.IPFamily) familyMaps {
	if f == model.IPv6 {
		return familyMaps{
			servicesName: lbMapKbp6Services, slotsName: lbMapKbp6Slots, backendsName: lbMapKbp6Backends,
			revnatName: lbMapKbp6Revnat, statsName: lbMapKbp6SvcStats, affinityName: lbMapKbp6Affinity,
			matchesName: lbMapKbp6AffMatch, clusterIPsName: lbMapKbp6Clusterips, rangesName: lbMapKbp6SvcRanges,
		}
	}
	return familyMaps{
		servicesName: lbMapKbpServices, slotsName: lbMapKbpSlots, backendsName: lbMapKbpBackends,
		revnatName: lbMapKbpRevnat, statsName: lbMapKbpSvcStats, affinityName: lbMapKbpAffinity,
		matchesName: lbMapKbpAffMatch, clusterIPsName: lbMapKbpClusterIps, rangesName: lbMapKbpSvcRanges,
	}
}

// mapsOf returns family f's maps in o.
func mapsOf(o *lbObjects, f model.IPFamily) familyMaps {
	fm := mapNamesOf(f)
	if f == model.IPv6 {
		fm.services, fm.slots, fm.backends, fm.revnat = o.Kbp6Services, o.Kbp6Slots, o.Kbp6Backends, o.Kbp6Revnat
		fm.stats, fm.affinity, fm.matches = o.Kbp6SvcStats, o.Kbp6Affinity, o.Kbp6AffMatch
		fm.clusterIPs, fm.ranges = o.Kbp6Clusterips, o.Kbp6SvcRanges
		return fm
	}
	fm.services, fm.slots, fm.backends, fm.revnat = o.KbpServices, o.KbpSlots, o.KbpBackends, o.KbpRevnat
	fm.stats, fm.affinity, fm.matches = o.KbpSvcStats, o.KbpAffinity, o.KbpAffMatch
	fm.clusterIPs, fm.ranges = o.KbpClusterIps, o.KbpSvcRanges
	return fm
}

// kernelMaps returns the reconciler's view of family f's maps.
func kernelMaps(fm familyMaps, f model.IPFamily) Maps {
	m := Maps{
		Slots:   newKernelMap[lbSlotKey, uint32](fm.slots, fm.slotsName),
		Stats:   newPerCPUMap(fm.stats, fm.statsName),
		Matches: newKernelMap[lbMatchKey, uint32](fm.matches, fm.matchesName),
	}
	if f == model.IPv6 {
		m.Services = &codecMap[model.Frontend, lbSvc6Key, lbSvcValue, lbSvcValue]{
			inner:  newKernelMap[lbSvc6Key, lbSvcValue](fm.services, fm.servicesName),
			encKey: frontendKey6, decKey: frontendFromKey6, encValue: same[lbSvcValue], decValue: same[lbSvcValue],
		}
		m.Backends = &codecMap[uint32, uint32, backendKey, lbBackend6Value]{
			inner:  newKernelMap[uint32, lbBackend6Value](fm.backends, fm.backendsName),
			encKey: same[uint32], decKey: same[uint32], encValue: backendValue6, decValue: backendKeyFromValue6,
		}
		m.ClusterIPs = &codecMap[netip.Addr, lbIn6Words, uint32, uint32]{
			inner:  newKernelMap[lbIn6Words, uint32](fm.clusterIPs, fm.clusterIPsName),
			encKey: func(ip netip.Addr) lbIn6Words { return lbIn6Words{Addr: addr6ToBPF(ip)} },
			decKey: func(w lbIn6Words) netip.Addr { return addr6FromBPF(w.Addr) }, encValue: same[uint32], decValue: same[uint32],
		}
		m.Ranges = &codecMap[uint32, uint32, svcRange, lbSvcRange6]{
			inner:  newKernelMap[uint32, lbSvcRange6](fm.ranges, fm.rangesName),
			encKey: same[uint32], decKey: same[uint32], encValue: rangeValue6, decValue: rangeFromValue6,
		}
		return m
	}
	m.Services = &codecMap[model.Frontend, lbSvcKey, lbSvcValue, lbSvcValue]{
		inner:  newKernelMap[lbSvcKey, lbSvcValue](fm.services, fm.servicesName),
		encKey: frontendKey, decKey: frontendFromKey, encValue: same[lbSvcValue], decValue: same[lbSvcValue],
	}
	m.Backends = &codecMap[uint32, uint32, backendKey, lbBackendValue]{
		inner:  newKernelMap[uint32, lbBackendValue](fm.backends, fm.backendsName),
		encKey: same[uint32], decKey: same[uint32], encValue: backendKey.value, decValue: backendKeyFromValue,
	}
	m.ClusterIPs = &codecMap[netip.Addr, uint32, uint32, uint32]{
		inner:  newKernelMap[uint32, uint32](fm.clusterIPs, fm.clusterIPsName),
		encKey: addr4ToBPF, decKey: addrFromBPF, encValue: same[uint32], decValue: same[uint32],
	}
	m.Ranges = &codecMap[uint32, uint32, svcRange, lbSvcRange]{
		inner:  newKernelMap[uint32, lbSvcRange](fm.ranges, fm.rangesName),
		encKey: same[uint32], decKey: same[uint32], encValue: rangeValue4, decValue: rangeFromValue4,
	}
	return m
}

// UpdateBatch encodes the entries and writes them in batches, as the
// kernel map does (see coldfill.go).
func (c *codecMap[K, KK, V, VV]) UpdateBatch(keys []K, values []V) error {
	kk := make([]KK, len(keys))
	vv := make([]VV, len(values))
	for i := range keys {
		kk[i], vv[i] = c.encKey(keys[i]), c.encValue(values[i])
	}
	if b, ok := c.inner.(batchUpdater[KK, VV]); ok {
		return b.UpdateBatch(kk, vv)
	}
	for i := range kk {
		if err := c.inner.Update(kk[i], vv[i]); err != nil {
			return err
		}
	}
	return nil
}

// eventFamilySkipped counts the addresses of the other family that a
// snapshot handed to one family's datapath held, and that were skipped:
// each distinct address once per sync.
const eventFamilySkipped = "other_family_address_skipped"

// onlyFamily returns snap with every address of a family other than f
// left out: a service port whose ClusterIP is of the other family, and
// any other address (a backend, an external IP, a node address) that
// is. A proxier of one family hands over addresses of that family only;
// one that did not must not make the datapath write an IPv6 address into
// an IPv4 map or the reverse. snap itself is returned, not copied, when it
// holds nothing to leave out (every sync but a buggy one's); skipped is
// how many distinct addresses were left out (a port of the other family
// counts as its ClusterIP).
func onlyFamily(snap *model.Snapshot, f model.IPFamily) (_ *model.Snapshot, skipped int) {
	if !hasOtherFamily(snap, f) {
		return snap, 0
	}
	seen := map[netip.Addr]bool{}
	skip := func(a netip.Addr) {
		if !seen[a] {
			seen[a] = true
			skipped++
		}
	}
	keepAddrs := func(in []netip.Addr) []netip.Addr {
		var out []netip.Addr
		for _, a := range in {
			if f.Has(a) {
				out = append(out, a)
			} else {
				skip(a)
			}
		}
		return out
	}
	keepBackends := func(in []model.Backend) []model.Backend {
		var out []model.Backend
		for _, b := range in {
			if f.Has(b.IP) {
				out = append(out, b)
			} else {
				skip(b.IP)
			}
		}
		return out
	}
	out := *snap
	out.Services = make(map[model.ServiceName][]model.ServicePort, len(snap.Services))
	for name, ports := range snap.Services {
		if ports == nil {
			out.Services[name] = nil // deleted, in a partial snapshot
			continue
		}
		kept := make([]model.ServicePort, 0, len(ports))
		for _, sp := range ports {
			if !f.Has(sp.ClusterIP.IP) {
				skip(sp.ClusterIP.IP)
				continue
			}
			sp.Backends = keepBackends(sp.Backends)
			sp.Serving = keepBackends(sp.Serving)
			sp.Cluster = keepBackends(sp.Cluster)
			sp.Local = keepBackends(sp.Local)
			sp.HealthCheckLocal = keepBackends(sp.HealthCheckLocal)
			sp.External.ExternalIPs = keepAddrs(sp.External.ExternalIPs)
			sp.External.LoadBalancerIPs = keepAddrs(sp.External.LoadBalancerIPs)
			kept = append(kept, sp)
		}
		out.Services[name] = kept
	}
	out.Node.NodePortAddresses = keepAddrs(snap.Node.NodePortAddresses)
	out.Node.LocalAddresses = keepAddrs(snap.Node.LocalAddresses)
	out.Node.ForeignClusterIPs = keepAddrs(snap.Node.ForeignClusterIPs)
	return &out, skipped
}

func hasOtherFamily(snap *model.Snapshot, f model.IPFamily) bool {
	other := func(addrs []netip.Addr) bool {
		return slices.ContainsFunc(addrs, func(a netip.Addr) bool { return !f.Has(a) })
	}
	otherBackend := func(bs []model.Backend) bool {
		return slices.ContainsFunc(bs, func(b model.Backend) bool { return !f.Has(b.IP) })
	}
	if other(snap.Node.NodePortAddresses) || other(snap.Node.LocalAddresses) || other(snap.Node.ForeignClusterIPs) {
		return true
	}
	for _, ports := range snap.Services {
		for i := range ports {
			sp := &ports[i]
			if !f.Has(sp.ClusterIP.IP) || otherBackend(sp.Backends) || otherBackend(sp.Serving) ||
				otherBackend(sp.Cluster) || otherBackend(sp.Local) || otherBackend(sp.HealthCheckLocal) ||
				other(sp.External.ExternalIPs) || other(sp.External.LoadBalancerIPs) {
				return true
			}
		}
	}
	return false
}
