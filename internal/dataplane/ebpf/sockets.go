package ebpf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/sockdiag"
)

// DefaultNetNSDirs is where containerd and CRI-O pin pods' network
// namespaces (bind mounts of nsfs files).
var DefaultNetNSDirs = []string{"/run/netns"}

// Events counted by the socket cleanup, next to the programs' counters.
const (
	eventUDPSocketsDestroyed     = "udp_sockets_destroyed"
	eventUDPSocketDestroyFailed  = "udp_socket_destroy_failed"
	eventUDPSocketsUnsupported   = "udp_socket_cleanup_unsupported"
	eventUDPSocketsNamespaceSkip = "udp_socket_cleanup_netns_skipped"
)

// udpCheck maps each UDP frontend (VIP:port) whose connected sockets must be
// checked to what is checked: a socket we translated from it to a backend
// not serving is stale, and so is one connected to a fresh frontend itself.
type udpCheck map[netip.AddrPort]frontendCheck

type frontendCheck struct {
	serving map[netip.AddrPort]bool
	// fresh is a frontend that had no serving endpoint when the cleaner
	// last looked, or that it did not know: a socket may have connected to
	// its address while nothing translated it (before the Service
	// existed). Every other frontend's connects were translated (or
	// refused, when it had no serving endpoint), so only kbp_revnat's
	// entries can point at its stale sockets.
	fresh bool
}

func (c udpCheck) add(fe model.Frontend, serving []model.Backend, fresh bool) {
	c[netip.AddrPortFrom(fe.IP, fe.Port)] = frontendCheck{serving: model.AddrPortSet(serving), fresh: fresh}
}

// merge adds other's frontends to c, each replacing c's (other is the
// newer), but fresh if either is: a socket connected to the frontend
// untranslated is there until a cleanup finds it.
func (c udpCheck) merge(other udpCheck) {
	for fe, fc := range other {
		if old, ok := c[fe]; ok && old.fresh {
			fc.fresh = true
		}
		c[fe] = fc
	}
}

// socketTable is one network namespace's UDP sockets, as sockdiag.Conn
// gives them; tests use a fake.
type socketTable interface {
	// ConnectedUDPTo lists the connected sockets whose peer is one of
	// peers (all of them for nil), as sockdiag.Conn does.
	ConnectedUDPTo(peers []netip.AddrPort) ([]sockdiag.Socket, error)
	DestroyUDP(sockdiag.Socket) error
	UDPDestroySupported() (bool, error)
	Close() error
}

// socketHost finds the network namespaces to look in and opens their
// socket tables.
type socketHost interface {
	// netNamespaces lists the namespaces, the node's first, each once.
	netNamespaces() ([]string, error)
	open(ns string) (socketTable, error)
}

// revnatLookup tells which frontend our programs translated a socket's
// connect() from, as kbp_revnat records it under the socket's cookie: ok
// is false for a socket we did not translate (connected to a pod IP
// directly, say).
type revnatLookup func(cookie uint64, backend netip.AddrPort) (frontend netip.AddrPort, ok bool, err error)

// revnatScan calls fn with each (backend, frontend) pair kbp_revnat holds,
// and the cookie of the socket it is the pair of.
type revnatScan func(fn func(cookie uint64, backend, frontend netip.AddrPort)) error

// udpSocketCleaner destroys connected UDP sockets left pointing at a backend
// that no longer serves, the socket-level counterpart of kube-proxy's UDP
// conntrack cleanup (see the package documentation).
type udpSocketCleaner struct {
	// family is the family of the sockets' peers it looks at: IPv4
	// (AF_INET sockets, and AF_INET6 ones with a v4-mapped peer) or IPv6
	// (AF_INET6 sockets with a real IPv6 peer).
	family model.IPFamily
	host   socketHost
	revnat revnatLookup
	// scan reads kbp_revnat whole, to learn before visiting any namespace
	// which sockets can be stale; nil in tests that visit every
	// namespace and list every connected socket.
	scan   revnatScan
	events *eventCounts
	// holderOf names the service port the kernel serves a frontend for
	// (reconciler.holderOf); nil in tests, where the snapshot's claims
	// decide.
	holderOf func(model.Frontend) model.ServicePortName

	// serving holds, for each Service, the serving endpoints of each of
	// its applied UDP frontends as of the last sync; nil when unknown (at
	// start, after a failed sync).
	serving map[model.ServiceName]map[model.Frontend][]model.Backend
	// checked are the frontends planned for a check since the last full
	// sync, and their Services: the next full sync checks them once
	// more, for a socket whose kbp_revnat entry landed after the
	// cleanup read it (its connect() raced with the sync).
	checked map[model.Frontend]model.ServiceName

	// probed is set once the kernel has been asked whether it can destroy
	// UDP sockets; unsupported is its answer.
	probed      bool
	unsupported bool
	// noPodNamespaces is set once entering a pod's namespace was refused
	// for want of CAP_SYS_ADMIN; capabilities do not come back.
	noPodNamespaces bool
}

func newUDPSocketCleaner(host socketHost, revnat revnatLookup, events *eventCounts) *udpSocketCleaner {
	return &udpSocketCleaner{family: model.IPv4, host: host, revnat: revnat, events: events}
}

// forget drops what the cleaner knows of the applied state, after a sync
// that failed as a whole: the next (full) sync checks every UDP frontend.
func (c *udpSocketCleaner) forget() {
	c.serving = nil
}

// plan records the UDP frontends of a sync that was applied, except those
// of the ports that failed (named by their ClusterIP), and returns those to
// check. As kube-proxy's conntrack cleanup (pkg/proxy/conntrack, v1.36): a
// frontend is checked when its serving endpoints changed or it is new (a
// socket may have connected to its address before it existed); one
// without a serving endpoint is left alone, and so are the sockets of a
// deleted Service. A full sync is compared with what the cleaner knows
// like a partial one, so the periodic full sync of an unchanged cluster
// checks nothing; everything is checked only when nothing is known (at
// start, after a failed sync). Every frontend the programs serve counts:
// the ClusterIP, NodePorts, local external IPs, LoadBalancer IPs.
//
// A full sync also checks once more the frontends checked since the last
// one, still serving: a socket translated while a sync changed its
// frontend may get its kbp_revnat entry after that cleanup read the map.
// That costs a read of kbp_revnat, in the worker; namespaces are visited
// only if it names a stale socket.
func (c *udpSocketCleaner) plan(snap *model.Snapshot, failed map[model.Frontend]bool) udpCheck {
	check := make(udpCheck)
	recheck := c.checked
	if snap.Full || c.checked == nil {
		c.checked = make(map[model.Frontend]model.ServiceName)
	}
	// What the last cleanup knew; nil at start and after a failed sync,
	// when every frontend is checked.
	known := c.serving
	if snap.Full || c.serving == nil {
		// A full snapshot names every Service: those it leaves out are
		// gone.
		c.serving = make(map[model.ServiceName]map[model.Frontend][]model.Backend)
	}
	// The frontends each port serves: the kernel's, as the sync left it
	// (a frontend two Services name is served for one only, which a
	// partial snapshot of the other cannot tell).
	serves := func(sp *model.ServicePort) []socketFrontend {
		return slices.DeleteFunc(socketFrontends(sp, &snap.Node), func(f socketFrontend) bool {
			return c.holderOf(f.Frontend) != sp.Name
		})
	}
	if c.holderOf == nil {
		claims, _ := claimFrontends(snap, nil)
		serves = func(sp *model.ServicePort) []socketFrontend { return claimedFrontends(sp, &snap.Node, claims) }
	}
	for name, ports := range snap.Services {
		before := known[name]
		now := make(map[model.Frontend][]model.Backend)
		for i := range ports {
			sp := &ports[i]
			if sp.ClusterIP.Protocol != model.UDP {
				continue
			}
			if failed[sp.ClusterIP] {
				// Left as it was in the kernel, and unknown here: the
				// sync that applies it checks it as new.
				continue
			}
			for _, f := range serves(sp) {
				fe := f.Frontend
				now[fe] = sp.Serving
				if len(sp.Serving) == 0 {
					continue
				}
				if old, had := before[fe]; known == nil || !had || !slices.Equal(old, sp.Serving) {
					check.add(fe, sp.Serving, known == nil || !had || len(old) == 0)
					c.checked[fe] = name
				}
			}
		}
		if len(now) == 0 {
			delete(c.serving, name)
		} else {
			c.serving[name] = now
		}
	}
	if snap.Full {
		for fe, name := range recheck {
			if _, planned := check[netip.AddrPortFrom(fe.IP, fe.Port)]; planned {
				continue
			}
			if serving := c.serving[name][fe]; len(serving) > 0 {
				check.add(fe, serving, false)
			}
		}
	}
	return check
}

// match tells whether a connected UDP socket is stale for check, and why;
// pod says the socket is in a pod's network namespace, not the node's.
// revnat finds the frontend the socket was translated from.
func (c *udpSocketCleaner) match(check udpCheck, s sockdiag.Socket, pod bool, revnat revnatLookup) (frontend netip.AddrPort, reason string, err error) {
	// An AF_INET6 socket talking IPv4 has a v4-mapped peer; our programs
	// key it by the IPv4 address, in the IPv4 maps. A real IPv6 peer is
	// the IPv6 path's.
	peer := netip.AddrPortFrom(s.Remote.Addr().Unmap(), s.Remote.Port())
	if !c.family.Has(peer.Addr()) || peer.Port() == 0 {
		return netip.AddrPort{}, "", nil
	}
	if pod && peer.Addr().IsLoopback() {
		// A pod's loopback is the pod's: the only loopback frontends,
		// node ports on 127.0.0.1 (--nodeport-addresses), serve the
		// node's namespace alone, and nothing in a pod was translated
		// from one.
		return netip.AddrPort{}, "", nil
	}
	if fc, ok := check[peer]; ok && fc.fresh {
		// Connected to the VIP itself: it connected before the Service
		// existed and was never translated.
		return peer, "connected to the frontend untranslated", nil
	}
	fe, ok, err := revnat(s.Cookie, peer)
	if err != nil || !ok {
		return netip.AddrPort{}, "", err
	}
	if fc, checked := check[fe]; checked && !fc.serving[peer] {
		return fe, "backend no longer serving", nil
	}
	return netip.AddrPort{}, "", nil
}

// clean destroys the connected UDP sockets that check finds stale, in the
// node's network namespace and every pod's. Failures are logged and
// counted, and reported as failed so that the cleanup worker checks these
// frontends again with the next full sync: the datapath is in place
// regardless. Once stop is closed it returns before the next namespace.
func (c *udpSocketCleaner) clean(check udpCheck, stop <-chan struct{}) (anyFailed bool) {
	if len(check) == 0 {
		return false
	}
	if c.unsupported {
		c.events.add(eventUDPSocketsUnsupported, 1)
		return false
	}
	var destroyed, failed, skipped, visited int
	cand, err := c.candidates(check)
	if err != nil {
		klog.ErrorS(err, "Reading kbp_revnat for the UDP socket cleanup; looking at every connected UDP socket")
		failed++
	} else if len(cand.cookies) == 0 && !cand.fresh {
		// No socket was translated to a backend that left, and none can
		// be connected to a frontend untranslated: no namespace can hold
		// a stale socket.
		return false
	}
	namespaces, err := c.host.netNamespaces()
	if err != nil {
		klog.ErrorS(err, "Listing network namespaces for the UDP socket cleanup; checking the node's only")
		failed++
	}
	defer func() {
		// Destroyed sockets are counted as they go.
		c.events.add(eventUDPSocketDestroyFailed, uint64(failed))
		c.events.add(eventUDPSocketsNamespaceSkip, uint64(skipped))
		anyFailed = failed > 0
		if destroyed > 0 || failed > 0 {
			klog.V(2).InfoS("Destroyed connected UDP sockets of backends no longer serving", "sockets", destroyed,
				"failed", failed, "frontends", len(check), "netns", visited, "of", len(namespaces))
		}
	}()
	for i, ns := range namespaces {
		select {
		case <-stop:
			return
		default:
		}
		if i > 0 && cand.cookies != nil && len(cand.cookies) == 0 && !cand.fresh {
			// Every socket kbp_revnat named as stale is found: the other
			// namespaces hold none.
			return
		}
		visited++
		pod := i > 0
		if pod && c.noPodNamespaces {
			skipped++
			continue
		}
		t, err := c.host.open(ns)
		if err != nil {
			if pod && errors.Is(err, unix.EPERM) {
				c.noPodNamespaces = true
				klog.ErrorS(err, "Cannot enter pods' network namespaces without CAP_SYS_ADMIN: "+
					"connected UDP sockets in pods keep sending to removed backends until they reconnect; "+
					"only the node's own sockets are cleaned up. Grant CAP_SYS_ADMIN to fix this")
				skipped++
				continue
			}
			if pod && errors.Is(err, os.ErrNotExist) {
				continue // the pod went away meanwhile
			}
			klog.ErrorS(err, "Opening a network namespace for the UDP socket cleanup", "netns", ns)
			failed++
			continue
		}
		if !c.probed {
			c.probed = true
			ok, err := t.UDPDestroySupported()
			if err != nil {
				klog.ErrorS(err, "Probing whether the kernel can destroy UDP sockets; assuming it can")
			}
			if err == nil && !ok {
				c.unsupported = true
				t.Close()
				klog.InfoS("This kernel cannot destroy sockets (it lacks CONFIG_INET_DIAG_DESTROY, or is older than Linux 4.9): " +
					"connected UDP sockets keep sending to removed backends until their application reconnects")
				c.events.add(eventUDPSocketsUnsupported, 1)
				return
			}
		}
		d, f := c.cleanNamespace(ns, t, check, cand, pod)
		t.Close()
		destroyed += d
		failed += f
		if c.unsupported {
			return
		}
	}
	return
}

// candidates is where a cleanup looks: the peers a stale socket can have,
// and the cookies of the sockets kbp_revnat says were translated to a
// backend no longer serving, not found yet.
type candidates struct {
	// peers are those backends and the fresh frontends; nil for every
	// peer, when kbp_revnat could not be read.
	peers []netip.AddrPort
	// cookies are those sockets' kbp_revnat entries, as read; nil when
	// kbp_revnat could not be read.
	cookies map[uint64]revnatPair
	// fresh is set if a frontend checked is fresh: a socket connected to
	// it untranslated has no kbp_revnat entry, and may be anywhere.
	fresh bool
}

// candidates reads kbp_revnat once, so that each namespace's dump lists
// only the sockets connected to a peer that can be stale (a filter the
// kernel runs), and so that namespaces are not visited at all when no
// socket can be stale, nor any more once every stale one is found.
func (c *udpSocketCleaner) candidates(check udpCheck) (candidates, error) {
	var cand candidates
	peers := make(map[netip.AddrPort]bool)
	for fe, fc := range check {
		if fc.fresh {
			cand.fresh = true
			peers[fe] = true
		}
	}
	if c.scan == nil {
		cand.fresh = true
		return cand, nil
	}
	cand.cookies = make(map[uint64]revnatPair)
	err := c.scan(func(cookie uint64, backend, frontend netip.AddrPort) {
		if fc, ok := check[frontend]; ok && !fc.serving[backend] {
			cand.cookies[cookie] = revnatPair{backend: backend, frontend: frontend}
			peers[backend] = true
		}
	})
	if err != nil {
		return candidates{fresh: true}, err
	}
	cand.peers = make([]netip.AddrPort, 0, len(peers))
	for p := range peers {
		cand.peers = append(cand.peers, p)
	}
	slices.SortFunc(cand.peers, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return cand, nil
}

// revnatPair is a kbp_revnat entry: the backend a socket was translated to,
// from frontend.
type revnatPair struct{ backend, frontend netip.AddrPort }

// lookup answers from what candidates read of kbp_revnat, as c.revnat
// would from the map: a socket not among the candidates was not
// translated to a backend that left, when kbp_revnat was read.
func (cand *candidates) lookup(cookie uint64, backend netip.AddrPort) (netip.AddrPort, bool, error) {
	p, ok := cand.cookies[cookie]
	if !ok || p.backend != backend {
		return netip.AddrPort{}, false, nil
	}
	return p.frontend, true, nil
}

// cleanNamespace destroys the stale sockets of one namespace.
func (c *udpSocketCleaner) cleanNamespace(ns string, t socketTable, check udpCheck, cand candidates, pod bool) (destroyed, failed int) {
	socks, err := t.ConnectedUDPTo(cand.peers)
	if err != nil {
		if errors.Is(err, sockdiag.ErrNotSupported) {
			c.unsupported = true
			klog.InfoS("This kernel cannot list UDP sockets: connected UDP sockets keep sending to removed backends "+
				"until their application reconnects", "err", err)
			c.events.add(eventUDPSocketsUnsupported, 1)
			return 0, 0
		}
		klog.ErrorS(err, "Listing connected UDP sockets", "netns", ns)
		return 0, 1
	}
	// What candidates read of kbp_revnat, not the map again for each
	// socket; the map itself when it could not be read.
	revnat := c.revnat
	if cand.cookies != nil {
		revnat = cand.lookup
	}
	for _, s := range socks {
		fe, reason, err := c.match(check, s, pod, revnat)
		delete(cand.cookies, s.Cookie)
		if err != nil {
			klog.ErrorS(err, "Looking up a socket's frontend", "netns", ns, "socket", s)
			failed++
			continue
		}
		if reason == "" {
			continue
		}
		err = t.DestroyUDP(s)
		switch {
		case err == nil:
			destroyed++
			// Counted at once: the owner may see ECONNABORTED before this
			// cleanup ends.
			c.events.add(eventUDPSocketsDestroyed, 1)
			klog.V(3).InfoS("Destroyed connected UDP socket", "netns", ns, "socket", s, "frontend", fe, "reason", reason)
		case sockdiag.IsGone(err):
			// Closed meanwhile (or its addresses reused by another
			// socket, which the cookie kept us from hitting).
		case errors.Is(err, sockdiag.ErrNotSupported):
			c.unsupported = true
			klog.InfoS("This kernel cannot destroy UDP sockets: connected UDP sockets keep sending to removed backends "+
				"until their application reconnects", "err", err)
			c.events.add(eventUDPSocketsUnsupported, 1)
			return destroyed, failed
		default:
			klog.ErrorS(err, "Destroying a connected UDP socket", "netns", ns, "frontend", fe)
			failed++
		}
	}
	return destroyed, failed
}

// kernelSocketHost finds sockets in the node's namespace and in the pods'
// namespaces pinned in the given directories.
type kernelSocketHost struct {
	nodeNetNS string
	dirs      []string
}

func (h kernelSocketHost) netNamespaces() ([]string, error) {
	node := h.nodeNetNS
	if node == "" {
		node = "/proc/self/ns/net"
	}
	out := []string{node}
	seen := make(map[sockdiag.NamespaceID]bool)
	id, ok, err := sockdiag.Namespace(node)
	if err != nil || !ok {
		return out, fmt.Errorf("node network namespace %s: not a namespace file (%v)", node, err)
	}
	seen[id] = true
	var errs []error
	for _, dir := range h.dirs {
		entries, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue // no pod has been given a namespace there yet
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, e := range entries {
			path := filepath.Join(dir, e.Name())
			id, ok, err := sockdiag.Namespace(path)
			if err == nil && !ok {
				// A runtime's placeholder for a sandbox being set up; or,
				// if every pod's is one, a directory mounted into this
				// container without the host's later mounts.
				klog.V(2).InfoS("Skipping a file that is not a mounted network namespace "+
					"(mount the directory with mountPropagation: HostToContainer)", "path", path)
			}
			if err != nil || !ok || seen[id] {
				// Gone meanwhile, not a namespace, or one already listed.
				continue
			}
			seen[id] = true
			out = append(out, path)
		}
	}
	return out, errors.Join(errs...)
}

func (h kernelSocketHost) open(ns string) (socketTable, error) {
	return sockdiag.OpenIn(ns)
}

// kernelRevnat looks sockets up in the kbp_revnat map: the socket's entry
// by cookie, then the pair of its backend (see sock_revnat in lb.c).
func kernelRevnat(m *ebpf.Map) revnatLookup {
	return func(cookie uint64, backend netip.AddrPort) (netip.AddrPort, bool, error) {
		var v lbSockRevnat
		err := m.Lookup(&cookie, &v)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return netip.AddrPort{}, false, nil
		}
		if err != nil {
			return netip.AddrPort{}, false, fmt.Errorf("looking up socket %d in kbp_revnat: %w", cookie, err)
		}
		fe, ok := frontendOfPair(&v, backend)
		return fe, ok, nil
	}
}

// kernelRevnatScan reads kbp_revnat in batches (see kernelMap.Iterate).
func kernelRevnatScan(m *ebpf.Map) revnatScan {
	km := newKernelMap[uint64, lbSockRevnat](m, lbMapKbpRevnat)
	return func(fn func(cookie uint64, backend, frontend netip.AddrPort)) error {
		return km.Iterate(func(cookie uint64, v lbSockRevnat) error {
			for _, p := range v.Pairs {
				if p.Backend.Addr == 0 {
					continue // unused
				}
				fn(cookie, netip.AddrPortFrom(addrFromBPF(p.Backend.Addr), portFromBPF(p.Backend.Port)),
					netip.AddrPortFrom(addrFromBPF(p.Frontend.Addr), portFromBPF(p.Frontend.Port)))
			}
			return nil
		})
	}
}

// frontendOfPair is the frontend of backend among a socket's pairs.
func frontendOfPair(v *lbSockRevnat, backend netip.AddrPort) (netip.AddrPort, bool) {
	addr, port := addrToBPF(backend.Addr()), portToBPF(backend.Port())
	for _, p := range v.Pairs {
		if p.Backend.Addr == addr && p.Backend.Port == port && addr != 0 {
			return netip.AddrPortFrom(addrFromBPF(p.Frontend.Addr), portFromBPF(p.Frontend.Port)), true
		}
	}
	return netip.AddrPort{}, false
}

// eventCounts are events counted in user space, for Events.
type eventCounts struct {
	mu sync.Mutex
	m  map[string]uint64
}

func newEventCounts(names ...string) *eventCounts {
	e := &eventCounts{m: make(map[string]uint64)}
	for _, n := range names {
		e.m[n] = 0
	}
	return e
}

func (e *eventCounts) add(name string, n uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.m[name] += n
}

func (e *eventCounts) copyTo(out map[string]uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for k, v := range e.m {
		out[k] = v
	}
}

// kernelRevnat6 is kernelRevnat over kbp6_revnat, the IPv6 sockets' pairs
// (sock_revnat6 in lb.c).
func kernelRevnat6(m *ebpf.Map) revnatLookup {
	return func(cookie uint64, backend netip.AddrPort) (netip.AddrPort, bool, error) {
		var v lbSockRevnat6
		err := m.Lookup(&cookie, &v)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return netip.AddrPort{}, false, nil
		}
		if err != nil {
			return netip.AddrPort{}, false, fmt.Errorf("looking up socket %d in %s: %w", cookie, lbMapKbp6Revnat, err)
		}
		fe, ok := frontendOfPair6(&v, backend)
		return fe, ok, nil
	}
}

// kernelRevnatScan6 is kernelRevnatScan over kbp6_revnat.
func kernelRevnatScan6(m *ebpf.Map) revnatScan {
	km := newKernelMap[uint64, lbSockRevnat6](m, lbMapKbp6Revnat)
	return func(fn func(cookie uint64, backend, frontend netip.AddrPort)) error {
		return km.Iterate(func(cookie uint64, v lbSockRevnat6) error {
			for _, p := range v.Pairs {
				if p.Seq == 0 {
					continue // unused, or being written
				}
				fn(cookie, netip.AddrPortFrom(addr6FromBPF(p.Backend.Addr), portFromBPF(p.Backend.Port)),
					netip.AddrPortFrom(addr6FromBPF(p.Frontend.Addr), portFromBPF(p.Frontend.Port)))
			}
			return nil
		})
	}
}

// frontendOfPair6 is frontendOfPair for an IPv6 socket's pairs.
func frontendOfPair6(v *lbSockRevnat6, backend netip.AddrPort) (netip.AddrPort, bool) {
	addr, port := addr6ToBPF(backend.Addr()), portToBPF(backend.Port())
	for _, p := range v.Pairs {
		if p.Seq != 0 && p.Backend.Addr == addr && p.Backend.Port == port {
			return netip.AddrPortFrom(addr6FromBPF(p.Frontend.Addr), portFromBPF(p.Frontend.Port)), true
		}
	}
	return netip.AddrPort{}, false
}
