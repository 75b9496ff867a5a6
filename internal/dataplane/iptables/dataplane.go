// Package iptables is the --mode=iptables datapath: the model rendered into
// the rule structure upstream kube-proxy (v1.36) builds in its iptables mode,
// applied with iptables-restore --noflush (ip6tables-restore for the IPv6
// family: one Dataplane per family, as kube-proxy runs one proxier per
// family), plus the conntrack cleanup UDP needs. Running the same chains,
// names and comments as kube-proxy makes the A/B against the eBPF datapath
// an honest one.
package iptables

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// DefaultMasqueradeBit is kube-proxy's (and kubelet's) masquerade mark bit,
// 0x4000.
const DefaultMasqueradeBit = 14

// Config is how the iptables datapath is set up.
type Config struct {
	// Family is the address family programmed: IPv4 (the zero value)
	// with iptables, IPv6 with ip6tables, as kube-proxy runs one proxier
	// per family. Every address in the snapshots a Dataplane is given is
	// of its family (an address of the other one is left out of the
	// rules, with a warning: it would fail the whole restore). The IPv6
	// rules are the IPv4 ones but for what upstream leaves out there:
	// node ports are never served on localhost (::1), so there is no
	// route_localnet and no KUBE-FIREWALL rule of ours.
	Family model.IPFamily
	// Backend is BackendNFT, BackendLegacy or BackendAuto (the one the
	// node already uses).
	Backend string
	// LocalTraffic tells this node's pods' traffic (kube-proxy's
	// --detect-local-mode); ClusterIP traffic that is not theirs is
	// masqueraded. The zero value masquerades nothing by source, unless
	// ClusterCIDR is set.
	LocalTraffic LocalTraffic
	// ClusterCIDR, when LocalTraffic is the zero value, is the pods'
	// range: LocalByCIDR(ClusterCIDR), the ClusterCIDR mode.
	ClusterCIDR netip.Prefix
	// MasqueradeAll masquerades all ClusterIP traffic.
	MasqueradeAll bool
	// MasqueradeBit is the fwmark bit (0 to 31) marking traffic to
	// masquerade; nil means DefaultMasqueradeBit. A pointer, as in
	// kube-proxy's configuration, because bit 0 is a valid choice.
	MasqueradeBit *int
	// LockWait bounds the wait for the xtables lock.
	LockWait time.Duration
	// LockFile overrides the xtables lock's path (/run/xtables.lock).
	LockFile string
	// NetNS is the path of the network namespace to program; empty means
	// this process's. Tests program a namespace of their own.
	NetNS string
	// LocalhostNodePorts serves node ports on 127.0.0.0/8 too when the
	// node port addresses include loopback (always, without
	// --nodeport-addresses), as kube-proxy's --iptables-localhost-nodeports:
	// it sets route_localnet in the namespace and guards it with
	// KUBE-FIREWALL. nil means true, kube-proxy's default. IPv4 only:
	// kube-proxy serves no node port on ::1, whatever the flag.
	LocalhostNodePorts *bool
	// ExternalOnly renders only what serves the external frontends of the
	// service ports that have one (node ports, external IPs, load balancer
	// IPs), nothing that matches a ClusterIP, and no localhost node ports:
	// the eBPF mode runs it for packets from outside the node, which its
	// socket hooks never see.
	ExternalOnly bool
	// ClusterIPs, with ExternalOnly, serves the ClusterIPs too, with the
	// rules the iptables mode writes for them (the ClusterIP jumps in
	// KUBE-SERVICES, the KUBE-SVC/KUBE-SVL and KUBE-SEP chains and their
	// masquerade marks, the REJECT and DROP of ports without endpoints):
	// the eBPF mode's packet layer when its socket layer serves the node's
	// own network namespace only (--bpf-socket-lb-host-netns-only), so
	// that pods' ClusterIP traffic is served per packet. The node's own
	// sockets are translated at connect(), so their packets never match
	// these rules.
	ClusterIPs bool
}

func (c Config) withDefaults() Config {
	if c.Family == 0 {
		c.Family = model.IPv4
	}
	if c.Backend == "" {
		c.Backend = BackendAuto
	}
	if c.MasqueradeBit == nil {
		bit := DefaultMasqueradeBit
		c.MasqueradeBit = &bit
	}
	if c.LockWait == 0 {
		c.LockWait = 5 * time.Second
	}
	if c.LocalhostNodePorts == nil {
		on := true
		c.LocalhostNodePorts = &on
	}
	if !c.LocalTraffic.detects() && c.ClusterCIDR.IsValid() {
		c.LocalTraffic = LocalByCIDR(c.ClusterCIDR)
	}
	return c
}

func (c Config) tool(backend string) tool {
	t := tool{backend: backend, ipv6: c.Family == model.IPv6, netns: c.NetNS, lockWait: c.LockWait}
	if c.LockFile != "" {
		t.env = []string{"XTABLES_LOCKFILE=" + c.LockFile}
	}
	return t
}

// Dataplane programs kube-proxy-style rules from model snapshots.
type Dataplane struct {
	family model.IPFamily
	tool   tool
	opts   ruleOptions
	ct     conntrack
	// nfacct is nil where the kernel has no nfnetlink_acct.
	nfacct *nfacct
	netns  string
	// localhostNodePorts is the configured wish; whether this node gets
	// them depends on its node port addresses and on route_localnet.
	localhostNodePorts bool
	// localnetFailed: route_localnet could not be set (a read-only
	// /proc/sys), so node ports are not served on 127.0.0.0/8.
	localnetFailed bool

	// applied is what the kernel holds since the last successful sync;
	// nil when unknown (at start, after a failure), which makes the next
	// sync a full one that reads the tables back.
	applied map[model.ServiceName][]model.ServicePort
	// node is the node the applied rules were rendered for.
	node model.NodeInfo
	buf  bytes.Buffer
	// rules counts the rules per table after the last successful sync,
	// and written those that sync wrote.
	rules, written map[string]int
	// large: the last sync's rules were for more than
	// largeClusterEndpoints endpoints (kube-proxy's large cluster mode).
	large bool
	// cleanup is the last sync's conntrack cleanup, if it ran one.
	cleanup conntrackCleanup
	// conntrackRetry: the last cleanup failed, so the next sync checks
	// every UDP frontend, even one that writes no rule.
	conntrackRetry bool
	// restores counts the iptables-restore runs of the syncs, for tests.
	restores uint64
	// flushWait bounds how long Intact, having found the first table's
	// canary gone, waits for the other tables' to go too, polling each
	// flushPoll (kube-proxy's iptablesFlushTimeout and
	// iptablesFlushPollTime); zero means the defaults.
	flushWait, flushPoll time.Duration

	mu     sync.Mutex
	events map[string]uint64
}

var _ dataplane.Dataplane = (*Dataplane)(nil)

// New resolves the backend and opens what syncs need. It changes nothing:
// the first Sync writes the rules.
func New(ctx context.Context, cfg Config) (*Dataplane, error) {
	cfg = cfg.withDefaults()
	if cfg.Family != model.IPv4 && cfg.Family != model.IPv6 {
		return nil, fmt.Errorf("unknown IP family %d", cfg.Family)
	}
	if cidr := cfg.LocalTraffic.cidr; cidr.IsValid() && !cfg.Family.Has(cidr.Addr()) {
		// As kube-proxy, which splits --cluster-cidr by family and gives
		// a proxier without a range of its family no detector: this
		// family's pods are told by nothing (an address of the other
		// family would fail every restore).
		klog.InfoS("The pods' range is of the other family: not detecting local traffic", "ipFamily", cfg.Family, "cidr", cidr)
		cfg.LocalTraffic = LocalTraffic{}
	}
	bit := *cfg.MasqueradeBit
	if bit < 0 || bit > 31 {
		return nil, fmt.Errorf("masquerade bit %d out of range 0..31", bit)
	}
	backend := cfg.Backend
	switch backend {
	case BackendAuto:
		var err error
		if backend, err = detectBackend(ctx, cfg.tool("")); err != nil {
			return nil, err
		}
		klog.InfoS("Detected the node's iptables backend", "backend", backend, "ipFamily", cfg.Family)
	case BackendNFT, BackendLegacy:
	default:
		return nil, fmt.Errorf("unknown iptables backend %q: want auto, nft or legacy", backend)
	}
	t := cfg.tool(backend)
	if !t.available() {
		return nil, fmt.Errorf("%s not found: install iptables 1.8 or later (Debian: apt-get install iptables)", t.bin("restore"))
	}
	ct, err := openConntrack(cfg.NetNS, cfg.Family)
	if err != nil {
		return nil, err
	}
	d := &Dataplane{
		family: cfg.Family,
		tool:   t,
		ct:     ct,
		netns:  cfg.NetNS,
		opts: ruleOptions{
			// kube-proxy formats the mark with %#08x.
			masqMark:      fmt.Sprintf("%#08x", 1<<bit),
			local:         cfg.LocalTraffic,
			masqueradeAll: cfg.MasqueradeAll,
			externalOnly:  cfg.ExternalOnly,
			noClusterIPs:  cfg.ExternalOnly && !cfg.ClusterIPs,
			ipv6:          cfg.Family == model.IPv6,
		},
		// kube-proxy's IPv6 proxier never serves node ports on ::1: the
		// kernel has no route_localnet for IPv6, and a packet to ::1 is
		// never routed anywhere else.
		localhostNodePorts: *cfg.LocalhostNodePorts && !cfg.ExternalOnly && cfg.Family == model.IPv4,
		events:             make(map[string]uint64),
	}
	// As kube-proxy: with conntrack told to be liberal, only
	// out-of-window RSTs are INVALID, and INVALID packets are let through.
	// A namespace without conntrack's sysctls has the default, strict.
	if v, err := readSysctl(cfg.NetNS, sysctlTCPBeLiberal); err == nil && v != 0 {
		d.opts.conntrackLiberal = true
		klog.InfoS("nf_conntrack_tcp_be_liberal is set: not dropping INVALID packets")
	}
	if !cfg.ExternalOnly {
		// The eBPF mode's external datapath is not kube-proxy: it keeps
		// no kube-proxy counters.
		if d.nfacct, err = openNFAcct(cfg.NetNS); err != nil {
			klog.InfoS("Counting INVALID and localhost node port packets is not possible", "err", err)
		}
	}
	return d, nil
}

// Backend is the iptables backend in use, "nft" or "legacy".
func (d *Dataplane) Backend() string { return d.tool.backend }

// conntrackCleanup describes the stale UDP conntrack cleanup of one sync.
type conntrackCleanup struct {
	ran     bool
	took    time.Duration
	deleted uint
}

// LastConntrackCleanup reports whether the last sync cleaned up stale UDP
// conntrack entries (only a sync that changed the serving endpoints of a UDP
// Service does, as in kube-proxy), how long that took and how many entries
// it deleted, for kube-proxy's conntrack reconciler metrics.
func (d *Dataplane) LastConntrackCleanup() (ran bool, took time.Duration, deleted uint) {
	return d.cleanup.ran, d.cleanup.took, d.cleanup.deleted
}

// Sync implements dataplane.Dataplane.
func (d *Dataplane) Sync(ctx context.Context, snap *model.Snapshot) error {
	d.cleanup = conntrackCleanup{}
	snap = d.ofFamily(snap)
	if !snap.Full && d.applied == nil {
		// Only a full snapshot says what else must be served.
		return errors.New("a partial sync needs a full one first: the rules in the kernel are unknown")
	}
	nodeChanged := !snap.Node.Equal(d.node)
	if !snap.Full && !nodeChanged && d.untouched(snap) {
		// Nothing these rules serve changed, so nothing is written: a
		// period without changes, or, in the eBPF mode's packet layer, a
		// change to a ClusterIP-only Service, whose iptables-restore (tens
		// of milliseconds at 10k Services, for a process and the xtables
		// lock) would rewrite what is there already, and hold up the
		// socket layer's next sync.
		d.written = map[string]int{"nat": 0, "filter": 0}
		if d.conntrackRetry {
			d.deleteStale(d.staleUDP(snap, d.applied))
		}
		return nil
	}
	next := nextState(d.applied, snap, d.opts.noClusterIPs)
	services := flatten(next)
	opts := d.opts
	if snap.Full || nodeChanged {
		opts.localhostNodePorts = d.localhostFor(snap.Node)
	}
	// A partial sync rewrites the chains of the Services it lists, and,
	// when the node changed, of the ports whose own chains read the node:
	// the firewall chains of source ranges, which admit the load balancer
	// IPs when a range holds a node address. The rest of what reads the
	// node (the jumps to KUBE-NODEPORTS, localhost node ports) is in the
	// top-level chains, rewritten by every sync.
	in := renderInput{services: services, node: snap.Node, canary: snap.Full,
		chains: chainsToWrite(services, opts.noClusterIPs, func(sp *model.ServicePort) bool {
			if snap.Full {
				return true
			}
			if _, changed := snap.Services[sp.Name.ServiceName]; changed {
				return true
			}
			return nodeChanged && readsNode(sp, opts.noClusterIPs)
		})}
	written := make(map[string]bool)
	for _, pc := range in.chains {
		for _, c := range pc.names() {
			written[c] = true
		}
	}
	if snap.Full {
		if d.nfacct != nil {
			// As kube-proxy: a counter that cannot be made is left out of
			// the rules that would count in it.
			opts.nfacctInvalid = d.ensureCounter(nfacctInvalidDropped)
			opts.nfacctLocalhost = d.ensureCounter(nfacctLocalhostNodePorts)
		}
		// Read the tables back: chains left by a previous process or a
		// failed sync are deleted, and jumps someone removed come back.
		// Only what the sync reads: nat for the stale chains and the nat
		// jumps, filter for the filter jumps and KUBE-FIREWALL.
		save, err := d.tool.save(ctx, "nat", "filter")
		if err != nil {
			return d.failed("reading the current rules", err)
		}
		tables := parseSave(save)
		if nat := tables["nat"]; nat != nil {
			for _, c := range nat.chains {
				if isPerServiceChain(c) && !written[c] {
					in.stale = append(in.stale, c)
				}
			}
		}
		in.missingJumps, in.staleJumps = checkJumps(tables, jumpsFor(opts.externalOnly))
		if !opts.externalOnly && !opts.localhostNodePorts {
			// kube-proxy makes sure KUBE-FIREWALL exists for kubelet's
			// jumps, without touching what kubelet keeps in it.
			in.createFirewall = !tables["filter"].hasChain(chainFirewall)
		}
	} else {
		// Only the changed services' chains can have gone stale.
		for name := range snap.Services {
			for i := range d.applied[name] {
				for _, c := range chainsOf(&d.applied[name][i], opts.noClusterIPs).names() {
					if !written[c] {
						in.stale = append(in.stale, c)
					}
				}
			}
		}
		slices.Sort(in.stale)
	}

	d.buf.Reset()
	st := render(&d.buf, opts, in)
	d.restores++
	if err := d.tool.restore(ctx, d.buf.Bytes()); err != nil {
		d.count("iptables_restore_failed", 1)
		doing := fmt.Sprintf("applying %d nat and %d filter rules", st.natRulesWritten, st.filterRules)
		if errors.Is(err, errLockHeld) {
			// Nothing was changed: the kernel holds exactly what
			// d.applied says, and the same changes can go again. The
			// proxy counts the time-out (kube_bpf_proxy_sync_lock_timeouts_total).
			return fmt.Errorf("%s with %s: %w", doing, d.tool.bin("restore"), err)
		}
		return d.failed(doing, err)
	}
	klog.V(3).InfoS("Applied iptables rules", "full", snap.Full, "natChainsWritten", st.natChainsWritten,
		"natRulesWritten", st.natRulesWritten, "natRules", st.natRules, "filterRules", st.filterRules, "staleChains", len(in.stale))

	d.opts = opts
	d.large = st.largeCluster
	d.rules = map[string]int{"nat": st.natRules, "filter": st.filterRules}
	// The filter table is rewritten whole at every sync, as kube-proxy's.
	d.written = map[string]int{"nat": st.natRulesWritten, "filter": st.filterRules}
	stale := d.staleUDP(snap, next)
	d.applied = next
	d.node = snap.Node
	d.deleteStale(stale)
	return nil
}

// deleteStale deletes the stale UDP flows. As kube-proxy's
// (pkg/proxy/conntrack, v1.36), a failure is logged and counted
// (kube_bpf_proxy_datapath_events_total{event="conntrack_cleanup_failed"})
// and does not fail the sync: the rules are in place, and a failed sync
// would turn /healthz and every health check node port to 503 for want of
// a cleanup. The next sync checks every UDP frontend again, as kube-proxy's
// next sync does.
func (d *Dataplane) deleteStale(stale *staleUDP) {
	if stale.empty() {
		d.conntrackRetry = false
		return
	}
	start := time.Now()
	n, err := d.ct.deleteStale(stale)
	d.cleanup = conntrackCleanup{ran: true, took: time.Since(start), deleted: n}
	d.count("conntrack_entries_deleted", uint64(n))
	d.conntrackRetry = err != nil
	if err != nil {
		d.count("conntrack_cleanup_failed", 1)
		klog.ErrorS(err, "Failed to delete stale UDP conntrack entries; the rules are in place, the next sync tries again",
			"entriesDeleted", n)
		return
	}
	if n > 0 {
		klog.V(2).InfoS("Deleted stale UDP conntrack entries", "entries", n)
	}
}

// As kube-proxy's Monitor, once the first table's canary is gone Intact
// waits up to defaultFlushWait, polling each defaultFlushPoll, for the
// other tables' to go too: a firewall manager deletes the tables one by
// one, and a full sync halfway through its reload would be undone by the
// rest of it.
const (
	defaultFlushWait = 5 * time.Second
	defaultFlushPoll = 100 * time.Millisecond
)

var (
	_ dataplane.Monitored         = (*Dataplane)(nil)
	_ dataplane.NodeChangeApplier = (*Dataplane)(nil)
)

// Intact checks kube-proxy's canary: an empty chain each full sync
// creates, in mangle, nat and filter (in filter and nat for the eBPF
// mode's packet layer, under its own name), whose absence means someone
// deleted the tables' chains (a firewall manager's reload, iptables -X),
// ours with them. As kube-proxy's Monitor, one `iptables -w 5 -t mangle
// -S KUBE-PROXY-CANARY` (filter for the packet layer): the legacy backend
// reads the whole table it lists a chain of, and mangle is small where
// nat holds every Service. Only when that canary is gone does it list the
// others, until they are gone too or defaultFlushWait has passed (then
// the reload is taken as done, however inconsistent the tables).
//
// A check that found the xtables lock held returns an error wrapping
// dataplane.ErrBusy: the proxy backs off, as for a restore that did.
func (d *Dataplane) Intact(ctx context.Context) (bool, error) {
	if d.applied == nil {
		return false, nil
	}
	// The first table's canary alone, as kube-proxy's Monitor polls.
	tables, chain := canaryTables(d.opts.externalOnly), canaryChain(d.opts.externalOnly)
	ok, err := d.tool.chainExists(ctx, tables[0], chain)
	if err != nil {
		return false, fmt.Errorf("checking the canary chain: %w", err)
	}
	if ok {
		return true, nil
	}
	klog.InfoS("Canary chain gone: the iptables rules were flushed", "table", tables[0], "chain", chain)
	if !d.othersGone(ctx, tables[1:], chain) {
		klog.InfoS("Inconsistent iptables state: the canary chain is gone from one table and still in another past the wait; syncing in full",
			"chain", chain, "waited", cmp.Or(d.flushWait, defaultFlushWait))
	}
	return false, nil
}

// othersGone polls the canary in the other tables until none has it, and
// reports whether that came within the wait. A listing that fails (the
// lock held, the wait's end) counts as the canary still there.
func (d *Dataplane) othersGone(ctx context.Context, tables []string, chain string) bool {
	ctx, cancel := context.WithTimeout(ctx, cmp.Or(d.flushWait, defaultFlushWait))
	defer cancel()
	tick := time.NewTicker(cmp.Or(d.flushPoll, defaultFlushPoll))
	defer tick.Stop()
	for {
		gone := true
		for _, table := range tables {
			if ok, err := d.tool.chainExists(ctx, table, chain); ok || err != nil {
				gone = false
				break
			}
		}
		if gone {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

// LargeCluster reports kube-proxy's large cluster mode: more than 1000
// endpoints in the rules, where kube-proxy leaves out per-endpoint
// comments and runs no periodic full sync.
func (d *Dataplane) LargeCluster() bool { return d.large }

// AppliesNodeChanges: a partial sync rewrites what reads the node.
func (d *Dataplane) AppliesNodeChanges() bool { return true }

// readsNode reports whether a service port's own chains read the node's
// addresses: the firewall chain of a port with source ranges admits its
// load balancer IPs as sources when a range holds a node address.
func readsNode(sp *model.ServicePort, noClusterIPs bool) bool {
	v := viewOf(sp, noClusterIPs)
	return v.usesFW
}

// localhostFor decides whether node ports answer on 127.0.0.0/8 on this
// node, as kube-proxy does: for IPv4 only (d.localhostNodePorts is false
// for IPv6), when configured, and when the node port
// addresses include loopback (all of them do without
// --nodeport-addresses). That needs route_localnet; where it cannot be set
// (a read-only /proc/sys), node ports stay off localhost and the log says
// why.
func (d *Dataplane) localhostFor(node model.NodeInfo) bool {
	if !d.localhostNodePorts {
		return false
	}
	if !node.AllLocalAddresses && !slices.ContainsFunc(node.NodePortAddresses, isLoopback4) {
		return false
	}
	if err := ensureSysctl(d.netns, sysctlRouteLocalnet, 1); err != nil {
		if !d.localnetFailed {
			klog.ErrorS(err, "Cannot serve node ports on 127.0.0.1: route_localnet cannot be set. "+
				"Make /proc/sys writable for the proxy, or pass --iptables-localhost-nodeports=false or a --nodeport-addresses without 127.0.0.0/8")
		}
		d.localnetFailed = true
		return false
	}
	if d.localnetFailed {
		klog.InfoS("route_localnet is set now: serving node ports on 127.0.0.1")
	}
	d.localnetFailed = false
	return true
}

// ensureCounter makes sure an nfacct counter exists.
func (d *Dataplane) ensureCounter(name string) bool {
	if err := d.nfacct.ensure(name); err != nil {
		klog.ErrorS(err, "Cannot create nfacct counter; its metric will not count", "counter", name)
		return false
	}
	return true
}

// untouched reports whether applying a partial snapshot for the node the
// rules were rendered for would leave the rules as they are: it lists no
// Service, or (only the external-only mode leaves Services out: those
// without an external frontend) only Services this datapath served none of
// before and serves none of after; their UDP flows are left alone then too,
// so no conntrack cleanup is skipped either. It costs what the snapshot
// lists, not what the rules hold.
func (d *Dataplane) untouched(snap *model.Snapshot) bool {
	if len(snap.Services) == 0 {
		return true
	}
	if !d.opts.noClusterIPs {
		return false
	}
	for name, ports := range snap.Services {
		if len(d.applied[name]) > 0 || slices.ContainsFunc(ports, isExternal) {
			return false
		}
	}
	return true
}

// nextState is what the kernel holds once snap is applied over applied.
// Without the ClusterIPs (the external-only mode), ports without an
// external frontend are not served.
func nextState(applied map[model.ServiceName][]model.ServicePort, snap *model.Snapshot, noClusterIPs bool) map[model.ServiceName][]model.ServicePort {
	next := make(map[model.ServiceName][]model.ServicePort, len(applied))
	if !snap.Full {
		maps.Copy(next, applied)
	}
	for name, ports := range snap.Services {
		if noClusterIPs && slices.ContainsFunc(ports, notExternal) {
			ports = slices.DeleteFunc(slices.Clone(ports), notExternal)
		}
		if len(ports) == 0 {
			delete(next, name)
		} else {
			next[name] = ports
		}
	}
	return next
}

// isExternal: the external-only mode serves the port, for its external
// frontends, or only for its health check node port's ACCEPT rule (a
// Local LoadBalancer Service not yet reachable from outside, whose load
// balancer probes the node all the same).
func isExternal(sp model.ServicePort) bool {
	return sp.External.Accessible() || sp.External.HealthCheckNodePort != 0
}

func notExternal(sp model.ServicePort) bool { return !isExternal(sp) }

// staleUDP collects the UDP frontends that may have stale flows after this
// sync, each with the endpoints whose flows are kept. It follows upstream
// kube-proxy v1.36 (pkg/proxy/conntrack): a flow to a frontend (ClusterIP,
// external IP, load balancer IP or node port) is stale unless its reply
// comes from a serving endpoint, ready or not, terminating or not, on any
// node (a draining pod keeps its flows, as its TCP connections keep going);
// a port with no serving endpoint is left alone, and so are the flows of a
// deleted Service, which age out. A port's frontends are checked when its
// serving endpoints changed, or a frontend is new (flows sent before it
// existed were never translated: a Service gaining its first endpoints, or
// a new node port); a full sync, or the one after a cleanup that failed, checks every one. The external-only mode
// does not translate ClusterIPs (unless told to: Config.ClusterIPs), so it
// leaves their flows alone.
func (d *Dataplane) staleUDP(snap *model.Snapshot, next map[model.ServiceName][]model.ServicePort) *staleUDP {
	// After a cleanup that failed, every frontend is checked again.
	full := snap.Full || d.conntrackRetry
	var names []model.ServiceName
	if full {
		names = slices.Collect(maps.Keys(next))
	} else {
		names = slices.Collect(maps.Keys(snap.Services))
	}
	out := newStaleUDP()
	for _, name := range names {
		before := make(map[model.ServicePortName]*model.ServicePort)
		for i, sp := range d.applied[name] {
			if sp.Name.Protocol == model.UDP {
				before[sp.Name] = &d.applied[name][i]
			}
		}
		for i := range next[name] {
			sp := &next[name][i]
			if sp.Name.Protocol != model.UDP || len(sp.Serving) == 0 {
				continue
			}
			prev := before[sp.Name]
			changed := full || prev == nil || !slices.Equal(prev.Serving, sp.Serving)
			var serving map[netip.AddrPort]bool
			check := func(isNew bool) bool {
				if !changed && !isNew {
					return false
				}
				if serving == nil {
					serving = model.AddrPortSet(sp.Serving)
				}
				return true
			}
			if !d.opts.noClusterIPs && check(prev == nil || prev.ClusterIP != sp.ClusterIP) {
				out.add(sp.ClusterIP, serving)
			}
			for _, ips := range [][]netip.Addr{sp.External.ExternalIPs, sp.External.LoadBalancerIPs} {
				for _, ip := range ips {
					fe := model.Frontend{IP: ip, Port: sp.ClusterIP.Port, Protocol: model.UDP}
					if check(prev == nil || !hasFrontend(prev, fe)) {
						out.add(fe, serving)
					}
				}
			}
			if np := sp.External.NodePort; np != 0 && check(prev == nil || prev.External.NodePort != np) {
				out.addNodePort(np, serving)
			}
		}
	}
	return out
}

// hasFrontend reports whether a port served an external frontend.
func hasFrontend(sp *model.ServicePort, fe model.Frontend) bool {
	return sp.ClusterIP.Port == fe.Port &&
		(slices.Contains(sp.External.ExternalIPs, fe.IP) || slices.Contains(sp.External.LoadBalancerIPs, fe.IP))
}

// failed forgets what the kernel holds, so the next sync reads it back.
// The rules applied before stay in force: a restore that fails changes
// nothing in the table it failed in.
func (d *Dataplane) failed(doing string, err error) error {
	d.applied = nil
	return fmt.Errorf("%s with %s: %w", doing, d.tool.bin("restore"), err)
}

func (d *Dataplane) count(event string, n uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.events[event] += n
}

// Events reports what the datapath has done, for the metrics.
func (d *Dataplane) Events() (map[string]uint64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return maps.Clone(d.events), nil
}

// RuleCounts reports the rules per table after the last successful sync.
func (d *Dataplane) RuleCounts() map[string]int { return maps.Clone(d.rules) }

// RulesWritten reports the rules per table the last successful sync wrote.
func (d *Dataplane) RulesWritten() map[string]int { return maps.Clone(d.written) }

// RestoreFailures reports how many iptables-restore runs of the syncs have
// failed since the datapath was created.
func (d *Dataplane) RestoreFailures() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.events["iptables_restore_failed"]
}

// Counts reports the service ports and backend references applied.
func (d *Dataplane) Counts() (services, backends int) {
	for _, ports := range d.applied {
		for _, sp := range ports {
			services++
			backends += len(sp.Backends)
		}
	}
	return services, backends
}

// NFAcctPackets reports the packets kube-proxy's nfacct counters have
// counted: INVALID packets dropped in KUBE-FORWARD
// (kubeproxy_iptables_ct_state_invalid_dropped_packets_total) and packets
// accepted to node ports on 127.0.0.0/8
// (kubeproxy_iptables_localhost_nodeports_accepted_packets_total). ok is
// false where the kernel has no nfacct, or the counters are not in use.
func (d *Dataplane) NFAcctPackets() (invalidDropped, localhostNodePorts uint64, ok bool) {
	if d.nfacct == nil || !d.opts.nfacctInvalid {
		return 0, 0, false
	}
	var err error
	if invalidDropped, err = d.nfacct.packets(nfacctInvalidDropped); err != nil {
		return 0, 0, false
	}
	if d.opts.nfacctLocalhost {
		localhostNodePorts, _ = d.nfacct.packets(nfacctLocalhostNodePorts)
	}
	return invalidDropped, localhostNodePorts, true
}

// Close releases the netlink sockets; the rules stay and keep serving.
func (d *Dataplane) Close() error {
	d.ct.Close()
	if d.nfacct != nil {
		d.nfacct.Close()
	}
	return nil
}

// flatten lists service ports in a stable order: by name, then protocol.
func flatten(services map[model.ServiceName][]model.ServicePort) []model.ServicePort {
	var out []model.ServicePort
	for _, ports := range services {
		out = append(out, ports...)
	}
	slices.SortFunc(out, func(a, b model.ServicePort) int {
		return cmp.Or(
			cmp.Compare(a.Name.Namespace, b.Name.Namespace),
			cmp.Compare(a.Name.Name, b.Name.Name),
			cmp.Compare(a.Name.Port, b.Name.Port),
			cmp.Compare(a.Name.Protocol, b.Name.Protocol))
	})
	return out
}

// Cleanup removes every rule and chain of this mode, from both backends and
// both families (iptables and ip6tables, whatever cfg.Family says, as
// kube-proxy's --cleanup), in the network namespace cfg names, and the
// nfacct counters the iptables mode makes (unless cfg.ExternalOnly: that
// mode makes none). Having nothing to remove is not an error. As
// kube-proxy's cleanup, it leaves KUBE-FIREWALL when it holds its rule,
// and route_localnet as it is: the rule guards the sysctl, and kubelet
// keeps the same chain.
func Cleanup(ctx context.Context, cfg Config) error {
	cfg = cfg.withDefaults()
	var errs []error
	for _, f := range model.Families {
		c := cfg
		c.Family = f
		errs = append(errs, cleanupRules(ctx, c, ""))
	}
	errs = append(errs, cleanupCounters(cfg))
	return errors.Join(errs...)
}

// CleanupExcept is Cleanup of cfg.Family alone, leaving backend keep
// alone: the eBPF mode's packet layer of that family takes over the
// backend it writes with its first full sync, which deletes every chain it
// does not need (what the iptables mode or kube-proxy left there), so
// removing them first would only open a gap. The other family's rules are
// its own proxy's to take over.
func CleanupExcept(ctx context.Context, cfg Config, keep string) error {
	cfg = cfg.withDefaults()
	return errors.Join(cleanupRules(ctx, cfg, keep), cleanupCounters(cfg))
}

// cleanupRules removes this mode's rules and chains of cfg.Family from
// both backends but keep.
func cleanupRules(ctx context.Context, cfg Config, keep string) error {
	var errs []error
	for _, b := range []string{BackendNFT, BackendLegacy} {
		if b == keep {
			continue
		}
		t := cfg.tool(b)
		if !t.available() {
			continue
		}
		save, err := t.save(ctx, "")
		switch {
		case err != nil && b == BackendLegacy && strings.Contains(err.Error(), "Permission denied"):
			// iptables-legacy reads a namespace without legacy tables
			// from /proc alone; tables it must open a raw socket for.
			errs = append(errs, fmt.Errorf("this node has %s tables, which cannot be read "+
				"without CAP_NET_RAW, so rules kube-proxy or this proxy's iptables mode may have left there stay. "+
				"Run `kube-bpf-proxy --cleanup` once with NET_RAW (as the iptables overlay grants it): %w", t.bin(""), err))
			continue
		case err != nil:
			// No legacy tables in this kernel: nothing of ours there.
			klog.V(2).InfoS("Skipping iptables backend in cleanup", "backend", b, "ipFamily", cfg.Family, "err", err)
			continue
		}
		input := cleanupInput(parseSave(save))
		if len(input) == 0 {
			continue
		}
		if err := t.restore(ctx, input); err != nil {
			errs = append(errs, fmt.Errorf("removing the %v iptables rules: %w", cfg.Family, err))
			continue
		}
		klog.InfoS("Removed the iptables rules", "backend", b, "ipFamily", cfg.Family)
	}
	return errors.Join(errs...)
}

// cleanupCounters removes the iptables mode's nfacct counters, which both
// families' rules count in (a counter is the network namespace's, not a
// family's), once no rule counts in them: kube-proxy's own, if it runs,
// keep theirs, as a counter in use is not deleted.
func cleanupCounters(cfg Config) error {
	if cfg.ExternalOnly {
		return nil
	}
	n, err := openNFAcct(cfg.NetNS)
	if err != nil {
		return nil
	}
	defer n.Close()
	var errs []error
	for _, c := range []string{nfacctInvalidDropped, nfacctLocalhostNodePorts} {
		if err := n.remove(c); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
