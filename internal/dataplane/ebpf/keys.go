package ebpf

import (
	"encoding/binary"
	"net/netip"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// The programs compare addresses and ports exactly as the kernel hands them
// over in struct bpf_sock_addr: in network byte order. The generated structs
// hold them in integer fields that cilium/ebpf copies in host order, so the
// network-order bytes are loaded as a host-order integer here.

func addrToBPF(ip netip.Addr) uint32 {
	b := ip.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func addrFromBPF(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

func portToBPF(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func portFromBPF(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

func frontendKey(f model.Frontend) lbSvcKey {
	return lbSvcKey{Addr: addr4ToBPF(f.IP), Port: portToBPF(f.Port), Proto: uint8(f.Protocol)}
}

func frontendFromKey(k lbSvcKey) model.Frontend {
	return model.Frontend{IP: addrFromBPF(k.Addr), Port: portFromBPF(k.Port), Protocol: model.Protocol(k.Proto)}
}

// backendKey identifies a backend entry: the same pod address and port under
// another protocol is another backend.
type backendKey struct {
	model.Backend
	Protocol model.Protocol
}

func (b backendKey) value() lbBackendValue {
	return lbBackendValue{Addr: addr4ToBPF(b.IP), Port: portToBPF(b.Port), Proto: uint8(b.Protocol)}
}

func backendKeyFromValue(v lbBackendValue) backendKey {
	return backendKey{
		Backend:  model.Backend{IP: addrFromBPF(v.Addr), Port: portFromBPF(v.Port)},
		Protocol: model.Protocol(v.Proto),
	}
}

// The high bits of a frontend's id word, as enum svc_flag in bpf/lb.c
// defines them (TestSvcFlagsMatchLbC keeps the two in step): the service
// id's flags, then the frontend's kind.
const (
	svcIDMask              uint32 = 0x00ffffff
	svcFlagAffinity        uint32 = 1 << 24
	svcFlagNoLocalEndpoint uint32 = 1 << 25
	svcFlagNodePort        uint32 = 1 << 26
	svcFlagExternal        uint32 = 1 << 27
	svcFlagNodeNetNSOnly   uint32 = 1 << 28

	// kindFlags say what kind of frontend an entry is.
	kindFlags = svcFlagNodePort | svcFlagExternal | svcFlagNodeNetNSOnly
)

// maxServiceIDs is the most service ids the id word holds.
const maxServiceIDs = svcIDMask

// Kinds of a Service range entry, enum range_kind in bpf/lb.c.
const (
	rangeEnd         uint8 = 0
	rangeServiceCIDR uint8 = 1
	rangeClusterIPs  uint8 = 2
)

// Values of the ClusterIP set, enum cluster_ip_kind in bpf/lb.c: a
// ClusterIP of ours, whose other ports are refused, or one of a Service
// another proxy serves, left alone whatever the port.
const (
	clusterIPOurs    uint32 = 0
	clusterIPForeign uint32 = 1
)

func svcValue(id uint32, count int, flags uint32) lbSvcValue {
	return lbSvcValue{Id: id&svcIDMask | flags&^svcIDMask, Count: uint32(count)}
}

// idOf and flagsOf split a frontend entry's id word; countOf is its count.
func idOf(v lbSvcValue) uint32    { return v.Id & svcIDMask }
func flagsOf(v lbSvcValue) uint32 { return v.Id &^ svcIDMask }
func countOf(v lbSvcValue) int    { return int(v.Count) }

func matchKey(svcID, backendID uint32) lbMatchKey {
	return lbMatchKey{SvcId: svcID, BackendId: backendID}
}

func rangeValue(p netip.Prefix, kind uint8) svcRange {
	return svcRange{Prefix: p.Masked(), Kind: kind}
}
