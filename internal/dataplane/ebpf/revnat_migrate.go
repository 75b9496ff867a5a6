package ebpf

import (
	"net/netip"

	"github.com/cilium/ebpf"
	"k8s.io/klog/v2"
)

// legacyRevnatKey is kbp_revnat's key in versions before the per-socket
// entries (see isLRURevnat); its value was an lbRevnatValue, the frontend.
type legacyRevnatKey struct {
	Cookie uint64
	Addr   uint32
	Port   uint16
	_      uint16
}

// migrateLegacyRevnat carries the reverse entries of open connected UDP
// sockets over from an earlier version's kbp_revnat (legacy) into the new
// one (m), so that a resolver's long-lived socket keeps seeing the VIP
// after an upgrade and the UDP socket cleanup keeps finding it. Those are
// the sockets that need it: a TCP socket only shows its backend to
// getpeername(), and an unconnected UDP socket's next sendto writes its
// entry afresh. It runs while the new programs, sock_release included,
// are attached and before the old ones go.
//
// The open sockets are listed with sock_diag, in the namespaces the UDP
// cleanup visits; an entry is written only for a socket listed, and only
// if the socket has none yet. A socket that closed after it was listed
// would leave its entry for good (its sock_release came first), so the
// sockets are listed again afterwards and the entries of those gone are
// deleted; one that closes later is released with its entry. Failing,
// the sockets concerned show their backend, as they would without this.
func migrateLegacyRevnat(legacy, m *ebpf.Map, host socketHost) {
	open := openConnectedUDP(host)
	migrated := make(map[uint64]bool)
	for cookie, peer := range open {
		key := legacyRevnatKey{Cookie: cookie, Addr: addrToBPF(peer.Addr()), Port: portToBPF(peer.Port())}
		var fe lbRevnatValue
		if legacy.Lookup(&key, &fe) != nil {
			continue
		}
		entry := lbSockRevnat{Next: 1}
		entry.Pairs[0] = lbRevnatPair{Backend: lbRevnatValue{Addr: key.Addr, Port: key.Port}, Frontend: fe}
		if err := m.Update(&cookie, &entry, ebpf.UpdateNoExist); err == nil {
			migrated[cookie] = true
		}
	}
	if len(migrated) == 0 {
		return
	}
	still := openConnectedUDP(host)
	for cookie := range migrated {
		if _, ok := still[cookie]; !ok {
			_ = m.Delete(&cookie)
			delete(migrated, cookie)
		}
	}
	klog.InfoS("Carried the reverse entries of open connected UDP sockets over from the earlier kbp_revnat", "sockets", len(migrated))
}

// openConnectedUDP maps the cookie of each open connected UDP socket
// talking IPv4 (v4-mapped for AF_INET6 sockets) to its peer, in the
// namespaces host finds; those it cannot read are left out.
func openConnectedUDP(host socketHost) map[uint64]netip.AddrPort {
	out := make(map[uint64]netip.AddrPort)
	namespaces, err := host.netNamespaces()
	if err != nil {
		klog.V(2).InfoS("Listing network namespaces for the reverse entry migration", "err", err)
	}
	for _, ns := range namespaces {
		t, err := host.open(ns)
		if err != nil {
			klog.V(2).InfoS("Opening a network namespace for the reverse entry migration", "netns", ns, "err", err)
			continue
		}
		socks, err := t.ConnectedUDPTo(nil)
		t.Close()
		if err != nil {
			klog.V(2).InfoS("Listing connected UDP sockets for the reverse entry migration", "netns", ns, "err", err)
			continue
		}
		for _, s := range socks {
			peer := netip.AddrPortFrom(s.Remote.Addr().Unmap(), s.Remote.Port())
			if peer.Addr().Is4() && peer.Port() != 0 {
				out[s.Cookie] = peer
			}
		}
	}
	return out
}

// resyncRevnat brings to, a resized copy of a reverse map (kbp_revnat,
// kbp6_revnat, whose values V are) made before the new
// programs were attached, up to date with from, the pinned map the old
// programs still write, once the new sock_release is attached. A socket
// that closed after the copy had its entry deleted from from only: left
// in to, it would never go. One translated after the copy has its entry
// in from only. Sockets closing from now on are deleted from both maps,
// and the old programs go at the commit; an entry added for a socket that
// closed meanwhile is taken out again. An entry that is in both is
// left as it is: rewriting it would replace the element under a program
// that may be reading it.
func resyncRevnat[V any](from, to *ebpf.Map, name string) {
	var (
		cookie uint64
		entry  V
		stale  []uint64
	)
	it := to.Iterate()
	for it.Next(&cookie, &entry) {
		var v V
		if from.Lookup(&cookie, &v) != nil {
			stale = append(stale, cookie)
		}
	}
	if err := it.Err(); err != nil {
		klog.ErrorS(err, "Reading the resized reverse map; some closed sockets' entries may stay", "map", name)
	}
	for _, c := range stale {
		_ = to.Delete(&c)
	}
	var added []uint64
	it = from.Iterate()
	for it.Next(&cookie, &entry) {
		if to.Update(&cookie, &entry, ebpf.UpdateNoExist) == nil {
			added = append(added, cookie)
		}
	}
	if err := it.Err(); err != nil {
		klog.ErrorS(err, "Reading the pinned reverse map; sockets translated during the resize may show their backend", "map", name)
	}
	// A socket that closed between being read and being added was
	// released before its entry came: it is gone from from.
	kept := 0
	for _, c := range added {
		var v V
		if from.Lookup(&c, &v) != nil {
			_ = to.Delete(&c)
			continue
		}
		kept++
	}
	klog.V(2).InfoS("Brought the resized reverse map up to date", "map", name, "removed", len(stale), "added", kept)
}
