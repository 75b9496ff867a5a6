// Package ebpf is the socket-level eBPF datapath: it loads and attaches the
// programs in bpf/, keeps their maps pinned, and reconciles model snapshots
// into them.
//
// # Connected UDP sockets
//
// connect4 translates a connected UDP socket once, at connect(): the socket
// then sends to that one backend for as long as it lives. iptables mode
// re-balances such a flow when kube-proxy deletes its conntrack entries;
// here the socket itself must go. After each sync that applied (the new
// backends are in the maps first: make-before-break), for every UDP
// frontend that is new or whose serving endpoints changed since the last
// cleanup (every one at start and after a failed sync; a full sync of an
// unchanged cluster checks only, once more, those checked since the last
// full sync) and that has a serving endpoint, the
// Dataplane destroys the connected UDP sockets, AF_INET and AF_INET6
// (v4-mapped peers; through the IPv6 view, AF_INET6 with IPv6 peers), that
//
//   - our programs translated from that frontend to a backend that no
//     longer serves: kbp_revnat (kbp6_revnat for the view), keyed by socket
//     cookie, names the frontend of each backend the socket was sent to; a socket connected to a pod
//     IP directly has no entry and is not ours to touch; or
//   - are connected to the frontend's VIP:port itself, untranslated, if the
//     frontend is fresh: new, or without a serving endpoint until now
//     (connected before the Service existed; since it served, every
//     connect to it was translated or refused).
//
// These are kube-proxy v1.36's rules for UDP conntrack entries
// (pkg/proxy/conntrack): sockets to a terminating endpoint that still
// serves are left to drain, and a deleted Service's sockets are left
// alone. The owner of a destroyed socket gets ECONNABORTED from its
// pending or next receive (EDESTADDRREQ from a send); resolvers then open a
// new socket, which connect4 sends to a serving backend. Unconnected
// sockets are never destroyed: sendmsg4 picks each datagram's backend
// from the current backends (by the socket cookie: one backend per socket
// while the backend set is unchanged), so a removed backend is never sent
// to again anyway, and destroying one would silently change its source
// port.
// Sockets are looked for in the node's network namespace (hostNetwork
// pods' sockets too, in one dump) and in each pod namespace pinned under
// Config.NetNSDirs, each namespace once (by nsfs inode). A cleanup first
// reads kbp_revnat whole (batched): the sockets translated to a backend
// that left are the candidates. With none, and no fresh frontend, it
// visits no namespace; otherwise each namespace's dump is filtered in the
// kernel on the candidates' backends and the fresh frontends' addresses,
// and once every candidate is found (and no frontend is fresh) the
// remaining namespaces are not visited.
//
// The sockets are found and destroyed with sock_diag netlink requests
// (package sockdiag) rather than a BPF socket iterator calling the
// bpf_sock_destroy kfunc:
//
//   - sock_diag SOCK_DESTROY destroys UDP sockets since Linux 4.9 with
//     CONFIG_INET_DIAG_DESTROY; it needs CAP_NET_ADMIN in the socket's
//     namespace, which the proxy already has. The kernel filters the dump
//     by family, protocol and state (TCP_ESTABLISHED is a connected UDP
//     socket), and destroys by exact id and cookie, so a socket that closed
//     and whose port was reused is never hit. The revnat lookup is one map
//     read per socket the filtered dump returns, in user space.
//   - An iterator (iter/udp calling bpf_sock_destroy, Linux 6.5+) could do
//     the whole match in the kernel, kbp_revnat lookup included, under the
//     socket lock. But it is a tracing program: it needs CAP_BPF and
//     CAP_PERFMON, kernel BTF and a CO-RE build of a second object; it
//     walks the network namespace of the process that creates it, so it
//     needs setns(2) per pod all the same; and 6.5 leaves out most nodes
//     in service today.
//
// Either way, reaching a pod's namespace takes setns(2), which needs
// CAP_SYS_ADMIN. Without it the proxy says so once and still cleans the
// node's own namespace (hostNetwork pods). On a kernel that can destroy no
// socket the proxy says so once and counts each skipped cleanup; syncs
// succeed regardless. Failures are logged and counted, never fail the sync:
// the frontends of a cleanup that failed are checked again with the next
// full sync.
//
// The cleanup runs off the sync's path: the sync plans which frontends to
// check, under its lock, and hands them to a worker goroutine, which visits
// the namespaces after the sync has returned (so the packet layer's sync
// and the next sync's map writes never wait for it). One cleanup runs at a
// time; frontends handed over meanwhile are merged, each with its newest
// serving endpoints, into the next. Closing the Dataplane stops it.
//
// One race remains with sock_diag, harmless: a socket that disconnects
// (connect(AF_UNSPEC)) between the dump and the destroy request is either
// unhashed by that, if its port was chosen by the kernel, and not found; or,
// bound by the application, found and aborted: one spurious ECONNABORTED,
// and it keeps its port, which a bind()ed socket does across an abort.
package ebpf

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Dataplane is the eBPF implementation of dataplane.Dataplane: the IPv4
// Services' datapath, and the owner of the programs and maps both
// families share. IPv6 hands out the IPv6 Services' datapath over the
// same programs.
type Dataplane struct {
	// familyPath is the IPv4 path; its mu also guards node.
	*familyPath
	kernel *kernelObjects
	grace  *rcuGracePeriod
	// events are what user space counts, next to the programs' counters.
	events *eventCounts
	node   nodeState
	cfg    Config

	// views guards v6 and users.
	views sync.Mutex
	v6    *ipv6View
	// users counts the open datapaths over kernel: this one and the IPv6
	// view, until each is closed; the last Close releases kernel.
	users int
	// closed is set by d's own Close, which a second call makes again
	// for nothing.
	closed bool
}

// familyPath is the datapath of one family's Services: its reconciler over
// the family's maps, and the cleanup of its connected UDP sockets.
type familyPath struct {
	maps    familyMaps
	mu      sync.Mutex
	rec     *reconciler
	sockets *udpSocketCleaner
	// cleanup runs the sockets' cleanup that each sync plans, off the
	// sync's path.
	cleanup *cleanupWorker
	// revnat and affinity cache how many entries the reverse map and the
	// affinity map hold.
	revnat, affinity programCount
}

// nodeState is what kbp_node holds.
type nodeState struct {
	cookie   uint64
	confined bool
}

// ConfineToNodeNetNS makes the programs leave every socket outside the
// node's network namespace alone (Config.HostNetNSOnly): they are then
// served by the packet layer, whose ClusterIP rules must be in place
// first, or pods' connections to ClusterIPs would meet nothing. The proxy
// calls it after the packet layer's first sync.
func (d *Dataplane) ConfineToNodeNetNS() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.node.confined {
		return nil
	}
	if err := writeNodeWord(d.kernel.objs.KbpNode, d.node.cookie, true); err != nil {
		return err
	}
	d.node.confined = true
	klog.InfoS("Socket-level load balancing is confined to the node's network namespace: "+
		"pods' Service traffic is served by the packet layer's iptables rules", "flag", "--"+FlagHostNetNSOnly)
	return nil
}

var _ dataplane.Dataplane = (*Dataplane)(nil)

// IPv6 returns the datapath of the IPv6 Services, sharing d's programs: it
// syncs the IPv6 maps (kbp6_*) from the snapshots of an IPv6 proxier, whose
// addresses are all IPv6 and whose NodeInfo lists the node's IPv6
// addresses, as d syncs the IPv4 ones. Each call returns the same view
// until it is closed. d and the view are closed separately; the programs
// and maps are released (this process's handles; the pins keep serving)
// when both are. Its counters and map fill are reported by d's
// ServicePortCounters and MapUsage, and its events are d's Events: the
// view itself serves no metrics, so that one collector over d covers both
// families.
func (d *Dataplane) IPv6() (dataplane.Dataplane, error) {
	d.views.Lock()
	defer d.views.Unlock()
	if d.closed {
		return nil, errors.New("the eBPF datapath is closed")
	}
	if d.v6 != nil {
		return d.v6, nil
	}
	p, err := newFamilyPath(d.kernel, model.IPv6, d.cfg, d.grace, d.events)
	if err != nil {
		return nil, err
	}
	d.v6 = &ipv6View{familyPath: p, owner: d}
	d.users++
	return d.v6, nil
}

// ipv6View is the IPv6 Services' datapath over a Dataplane's programs.
type ipv6View struct {
	*familyPath
	owner *Dataplane
}

var _ dataplane.Dataplane = (*ipv6View)(nil)

// Events, ServicePortCounters and MapUsage are the Dataplane's, which
// count both families: the programs and kbp_stats are shared. The view
// answers them too, so that a node serving IPv6 alone, whose proxy has no
// IPv4 datapath to ask, still exports them; a dual-stack proxy registers
// one family's collector, not both (internal/proxy).
func (v *ipv6View) Events() (map[string]uint64, error) { return v.owner.Events() }

func (v *ipv6View) ServicePortCounters() ([]dataplane.ServicePortCounters, error) {
	return v.owner.ServicePortCounters()
}

func (v *ipv6View) MapUsage() ([]dataplane.MapUsage, error) { return v.owner.MapUsage() }

// Close stops the view's socket cleanup and releases its share of the
// programs and maps.
func (v *ipv6View) Close() error {
	d := v.owner
	d.views.Lock()
	if d.v6 != v {
		d.views.Unlock()
		return nil // closed already
	}
	d.v6 = nil
	d.views.Unlock()
	// Under the path's lock, as the Dataplane's Close: a Sync of the
	// view still in flight finishes before the last release closes the
	// maps it writes.
	v.mu.Lock()
	defer v.mu.Unlock()
	v.cleanup.close()
	return d.release()
}

// release drops one user of the programs and maps; the last releases them.
func (d *Dataplane) release() error {
	d.views.Lock()
	defer d.views.Unlock()
	d.users--
	if d.users > 0 {
		return nil
	}
	return errors.Join(d.kernel.Close(), d.grace.Close())
}

// New loads and attaches the datapath, adopting whatever an earlier run left
// pinned. Until the first Sync, the adopted state keeps serving.
func New(cfg Config) (*Dataplane, error) {
	cfg = cfg.withDefaults()
	if cfg.MaxServices == 0 || cfg.MaxBackends == 0 || cfg.MaxSockets == 0 {
		return nil, errors.New("map capacities must be positive")
	}
	if cfg.MaxServices > maxServiceIDs {
		return nil, fmt.Errorf("--%s=%d is more service ids than the datapath holds (%d)", FlagMaxServices, cfg.MaxServices, maxServiceIDs)
	}
	k, err := load(cfg)
	if err != nil {
		return nil, err
	}
	// Confined at once only if the previous run was: otherwise pods'
	// sockets stay translated until the packet layer has the ClusterIP
	// rules (ConfineToNodeNetNS), and without the flag they are
	// translated again from now on.
	cookie := nodeCookie(cfg.NodeNetNS)
	confined := cfg.HostNetNSOnly && pinnedConfined(k.objs.KbpNode)
	if err := writeNodeWord(k.objs.KbpNode, cookie, confined); err != nil {
		klog.ErrorS(err, "Node ports on loopback addresses are not served to sockets")
	}
	grace := newRCUGracePeriod()
	events := newEventCounts(eventUDPSocketsDestroyed, eventUDPSocketDestroyFailed,
		eventUDPSocketsUnsupported, eventUDPSocketsNamespaceSkip, eventFrontendConflict, eventStatsFailed, eventFamilySkipped)
	p, err := newFamilyPath(k, model.IPv4, cfg, grace, events)
	if err != nil {
		k.Close()
		grace.Close()
		return nil, err
	}
	return &Dataplane{
		familyPath: p,
		node:       nodeState{cookie: cookie, confined: confined},
		kernel:     k,
		grace:      grace,
		events:     events,
		cfg:        cfg,
		users:      1,
	}, nil
}

// newFamilyPath makes family f's path over k's maps, its state restored
// from what they hold.
func newFamilyPath(k *kernelObjects, f model.IPFamily, cfg Config, grace gracePeriod, events *eventCounts) (*familyPath, error) {
	fm := mapsOf(&k.objs, f)
	rec := newReconciler(kernelMaps(fm, f), grace, cfg.MaxServices, cfg.MaxBackends)
	rec.family = f
	rec.maxFrontends = cfg.MaxFrontends
	if err := rec.restore(); err != nil {
		return nil, fmt.Errorf("reading pinned %s maps: %w", f, err)
	}
	rec.events = events
	host := kernelSocketHost{nodeNetNS: cfg.NodeNetNS, dirs: cfg.NetNSDirs}
	if cfg.HostNetNSOnly {
		// Pods' sockets are never translated then: a pod's socket
		// connected to a ClusterIP is served per packet, and the packet
		// layer cleans up its stale conntrack entries instead.
		host.dirs = nil
	}
	var sockets *udpSocketCleaner
	if f == model.IPv6 {
		sockets = newUDPSocketCleaner(host, kernelRevnat6(fm.revnat), events)
		sockets.scan = kernelRevnatScan6(fm.revnat)
	} else {
		sockets = newUDPSocketCleaner(host, kernelRevnat(fm.revnat), events)
		sockets.scan = kernelRevnatScan(fm.revnat)
	}
	sockets.family = f
	sockets.holderOf = rec.holderOf
	revnatCount := func() (int, error) { return countEntries[uint64, lbSockRevnat](fm.revnat) }
	if f == model.IPv6 {
		revnatCount = func() (int, error) { return countEntries[uint64, lbSockRevnat6](fm.revnat) }
	}
	return &familyPath{
		maps:    fm,
		rec:     rec,
		sockets: sockets,
		cleanup: newCleanupWorker(sockets.clean),
		revnat:  programCount{count: revnatCount, now: time.Now},
		affinity: programCount{
			count: func() (int, error) { return countEntries[lbAffinityKey, lbAffinityValue](fm.affinity) },
			now:   time.Now,
		},
	}, nil
}

// Sync applies snap. When it applies it only in part it returns a
// *dataplane.SyncError: each port in its Services was left as it was.
func (d *familyPath) Sync(ctx context.Context, snap *model.Snapshot) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	if only, skipped := onlyFamily(snap, d.rec.family); skipped > 0 {
		klog.InfoS("Skipped addresses of another family than the datapath's", "family", d.rec.family, "addresses", skipped)
		d.rec.events.add(eventFamilySkipped, uint64(skipped))
		snap = only
	}
	// A Service waiting for a frontend this snapshot frees takes it now.
	snap = d.rec.withWaiters(snap)
	err := d.rec.sync(snap)
	d.afterSync(snap, err)
	return err
}

// afterSync hands the cleanup worker the UDP frontends whose connected
// sockets the sync may have left stale, once the maps hold the new
// backends; the worker destroys them after the sync returns. After a sync
// that failed only for some service ports, those keep their old state in
// the kernel and are skipped; after one that failed as a whole nothing is
// done, and the next, full, sync checks everything.
func (d *familyPath) afterSync(snap *model.Snapshot, err error) {
	var failed map[model.Frontend]bool
	if err != nil {
		services, only := dataplane.OnlyServicesFailed(err)
		if !only {
			d.sockets.forget()
			return
		}
		failed = make(map[model.Frontend]bool, len(services))
		for _, s := range services {
			failed[s.Frontend] = true
		}
	}
	d.cleanup.submit(d.sockets.plan(snap, failed), snap.Full)
}

// waitSocketCleanup returns once the socket cleanup of every sync so far
// is done.
func (d *familyPath) waitSocketCleanup() { d.cleanup.wait() }

// Counts reports the service ports and backends the maps hold.
func (d *familyPath) Counts() (services, backends int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.rec.counts()
}

// eventNames name the per-CPU counters of bpf/lb.c for metrics.
var eventNames = map[lbStatIndex]string{
	lbStatIndexSTAT_CONNECT_TRANSLATED:      "connect_translated",
	lbStatIndexSTAT_SENDMSG_TRANSLATED:      "sendmsg_translated",
	lbStatIndexSTAT_REFUSED_NO_BACKEND:      "refused_no_backend",
	lbStatIndexSTAT_REFUSED_MISSING_SLOT:    "refused_missing_slot",
	lbStatIndexSTAT_REVNAT_TRANSLATED:       "reverse_translated",
	lbStatIndexSTAT_REVNAT_UPDATE_FAILED:    "reverse_entry_update_failed",
	lbStatIndexSTAT_LOOKUP_RACED:            "lookup_raced_with_update",
	lbStatIndexSTAT_REFUSED_MISSING_BACKEND: "refused_missing_backend",
	// Of the connects and datagrams translated, those to a NodePort and
	// to an external IP or LoadBalancer IP, from a socket on the node.
	lbStatIndexSTAT_NODEPORT_TRANSLATED: "nodeport_translated",
	lbStatIndexSTAT_EXTERNAL_TRANSLATED: "external_translated",
	// Connects and datagrams sent to the backend a client used last
	// (session affinity).
	lbStatIndexSTAT_AFFINITY_HIT: "affinity_hit",
	// Refused as kube-proxy refuses them: a ClusterIP on a port its
	// Service does not have, an address of the Service CIDRs that is no
	// ClusterIP, and internalTrafficPolicy Local without an endpoint on
	// this node (which kube-proxy drops).
	lbStatIndexSTAT_REFUSED_UNKNOWN_PORT:      "refused_unknown_port",
	lbStatIndexSTAT_REFUSED_UNALLOCATED:       "refused_unallocated_address",
	lbStatIndexSTAT_REFUSED_NO_LOCAL_ENDPOINT: "refused_no_local_endpoint",
	// Refusals (of any reason above) that failed with EPERM: the kernel
	// has no bpf_set_retval (before Linux 5.18) to choose ECONNREFUSED.
	lbStatIndexSTAT_REFUSED_EPERM: "refused_with_eperm",
}

// Events sums the datapath's per-CPU event counters.
func (d *Dataplane) Events() (map[string]uint64, error) {
	out := make(map[string]uint64, len(eventNames))
	for idx, name := range eventNames {
		var perCPU []uint64
		if err := d.kernel.objs.KbpStats.Lookup(idx, &perCPU); err != nil {
			return nil, fmt.Errorf("reading %s counter: %w", name, err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		out[name] = sum
	}
	d.events.copyTo(out)
	return out, nil
}

// ServicePortCounters reads the counters of every service port the maps
// hold whose name is known (after a restart, names come with the first
// sync), summed over CPUs and over the port's service ids (a port has two
// under internalTrafficPolicy Local with external frontends). One batched
// walk of the counters map, whatever the number of ports. The IPv6
// view's ports come after the IPv4 ones: a dual-stack Service's port is
// listed once per family, and the metrics collector sums them by name.
func (d *Dataplane) ServicePortCounters() ([]dataplane.ServicePortCounters, error) {
	out, err := d.servicePortCounters()
	if err != nil {
		return nil, err
	}
	if v6 := d.ipv6(); v6 != nil {
		more, err := v6.servicePortCounters()
		if err != nil {
			return nil, err
		}
		out = append(out, more...)
	}
	return out, nil
}

// ipv6 is the open IPv6 view, or nil.
func (d *Dataplane) ipv6() *ipv6View {
	d.views.Lock()
	defer d.views.Unlock()
	return d.v6
}

func (d *familyPath) servicePortCounters() ([]dataplane.ServicePortCounters, error) {
	d.mu.Lock()
	names := d.rec.namedIDs()
	stats := d.rec.maps.Stats
	d.mu.Unlock()
	byName := make(map[model.ServicePortName]*dataplane.ServicePortCounters, len(names))
	var out []*dataplane.ServicePortCounters
	// The walk runs without the lock, so that a scrape never delays a
	// sync: an id released and reused meanwhile shows the new port's
	// counts under the old name for one scrape at worst.
	err := stats.Iterate(func(id uint32, v lbSvcStats) error {
		name, ok := names[id]
		if !ok {
			return nil
		}
		c := byName[name]
		if c == nil {
			c = &dataplane.ServicePortCounters{Name: name}
			byName[name] = c
			out = append(out, c)
		}
		c.Connections += v.Connections
		c.Datagrams += v.Datagrams
		c.Refused += v.Refused
		c.ReverseTranslations += v.Reverse
		return nil
	})
	if err != nil {
		return nil, err
	}
	list := make([]dataplane.ServicePortCounters, len(out))
	for i, c := range out {
		list[i] = *c
	}
	return list, nil
}

// MapUsage reports the entries in use and the capacity of each map: the
// reconciler's exact counts for the maps it writes, and a count of the
// keys of the maps the programs write (see programCount). The IPv4 maps
// are labelled as before the IPv6 ones came (services, slots, ...), the
// IPv6 view's, once it is open, with an ipv6_ prefix (ipv6_services, ...):
// each family has its own maps, of the sizes the same flags give.
func (d *Dataplane) MapUsage() ([]dataplane.MapUsage, error) {
	out, err := d.mapUsage("")
	if err != nil {
		return nil, err
	}
	if v6 := d.ipv6(); v6 != nil {
		more, err := v6.mapUsage("ipv6_")
		if err != nil {
			return nil, err
		}
		out = append(out, more...)
	}
	return out, nil
}

func (d *familyPath) mapUsage(prefix string) ([]dataplane.MapUsage, error) {
	revnat, err := d.revnat.get()
	if err != nil {
		return nil, fmt.Errorf("counting %s entries: %w", d.maps.revnatName, err)
	}
	affinity, err := d.affinity.get()
	if err != nil {
		return nil, fmt.Errorf("counting %s entries: %w", d.maps.affinityName, err)
	}
	d.mu.Lock()
	e := d.rec.entries()
	d.mu.Unlock()
	o := &d.maps
	usage := func(name string, entries int, m interface{ MaxEntries() uint32 }) dataplane.MapUsage {
		return dataplane.MapUsage{Map: prefix + name, Entries: entries, Capacity: int(m.MaxEntries())}
	}
	return []dataplane.MapUsage{
		usage("services", e.frontends, o.services),
		usage("slots", e.slots, o.slots),
		usage("backends", e.backends, o.backends),
		usage("revnat", revnat, o.revnat),
		usage("service_stats", e.stats, o.stats),
		usage("affinity", affinity, o.affinity),
		usage("affinity_match", e.matches, o.matches),
		usage("cluster_ips", e.clusterIPs, o.clusterIPs),
	}, nil
}

// revnatCountTTL is how long a count of the reverse map (or the affinity
// map) is reused. The programs write these maps: no one holds an exact
// count, and counting walks every key (up to 256k by default, a few
// milliseconds), which a scrape every few seconds by several Prometheus
// servers should not repeat.
const revnatCountTTL = 5 * time.Second

// programCount caches the count of the entries of a map the programs write.
type programCount struct {
	count func() (int, error)
	now   func() time.Time

	mu   sync.Mutex
	n    int
	when time.Time
	ok   bool
}

func (c *programCount) get() (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if c.ok && now.Sub(c.when) < revnatCountTTL {
		return c.n, nil
	}
	n, err := c.count()
	if err != nil {
		return 0, err
	}
	c.n, c.when, c.ok = n, now, true
	return n, nil
}

// Close stops the IPv4 path's socket cleanup and releases this process's
// handles once the IPv6 view, if one was opened, is closed too; pins keep
// the datapath serving.
func (d *Dataplane) Close() error {
	d.views.Lock()
	if d.closed {
		d.views.Unlock()
		return nil
	}
	d.closed = true
	d.views.Unlock()
	// A Sync in flight finishes first, and none starts before the
	// release (which closes the maps if the view is closed too).
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cleanup.close()
	return d.release()
}
