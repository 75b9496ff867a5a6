// Package iptables is the --mode=iptables datapath: the model rendered into
// the rule structure upstream kube-proxy (v1.36) builds in its iptables mode,
// applied with iptables-restore --noflush, plus the conntrack cleanup UDP
// needs. Running the same chains, names and comments as kube-proxy makes the
// A/B against the eBPF datapath an honest one.
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
	// Backend is BackendNFT, BackendLegacy or BackendAuto (the one the
	// node already uses).
	Backend string
	// ClusterCIDR is the pods' range; ClusterIP traffic from outside it is
	// masqueraded. The zero value masquerades nothing by source.
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
}

func (c Config) withDefaults() Config {
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
	return c
}

func (c Config) tool(backend string) tool {
	t := tool{backend: backend, netns: c.NetNS, lockWait: c.LockWait}
	if c.LockFile != "" {
		t.env = []string{"XTABLES_LOCKFILE=" + c.LockFile}
	}
	return t
}

// Dataplane programs kube-proxy-style rules from model snapshots.
type Dataplane struct {
	tool tool
	opts ruleOptions
	ct   conntrack

	// applied is what the kernel holds since the last successful sync;
	// nil when unknown (at start, after a failure), which makes the next
	// sync a full one that reads the tables back.
	applied map[model.ServiceName][]model.ServicePort
	buf     bytes.Buffer
	// rules counts the rules per table after the last successful sync,
	// and written those that sync wrote.
	rules, written map[string]int
	// cleanup is the last sync's conntrack cleanup, if it ran one.
	cleanup conntrackCleanup

	mu     sync.Mutex
	events map[string]uint64
}

var _ dataplane.Dataplane = (*Dataplane)(nil)

// New resolves the backend and opens what syncs need. It changes nothing:
// the first Sync writes the rules.
func New(ctx context.Context, cfg Config) (*Dataplane, error) {
	cfg = cfg.withDefaults()
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
		klog.InfoS("Detected the node's iptables backend", "backend", backend)
	case BackendNFT, BackendLegacy:
	default:
		return nil, fmt.Errorf("unknown iptables backend %q: want auto, nft or legacy", backend)
	}
	t := cfg.tool(backend)
	if !t.available() {
		return nil, fmt.Errorf("iptables-%s-restore not found: install iptables 1.8 or later (Debian: apt-get install iptables)", backend)
	}
	ct, err := openConntrack(cfg.NetNS)
	if err != nil {
		return nil, err
	}
	return &Dataplane{
		tool: t,
		ct:   ct,
		opts: ruleOptions{
			// kube-proxy formats the mark with %#08x.
			masqMark:      fmt.Sprintf("%#08x", 1<<bit),
			clusterCIDR:   cfg.ClusterCIDR,
			masqueradeAll: cfg.MasqueradeAll,
		},
		events: make(map[string]uint64),
	}, nil
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
	if !snap.Full && d.applied == nil {
		// Only a full snapshot says what else must be served.
		return errors.New("a partial sync needs a full one first: the rules in the kernel are unknown")
	}
	next := nextState(d.applied, snap)
	services := flatten(next)
	in := renderInput{services: services, chains: chainsToWrite(services, func(n model.ServiceName) bool {
		_, changed := snap.Services[n]
		return snap.Full || changed
	})}
	written := make(map[string]bool)
	for _, chains := range in.chains {
		for _, c := range chains {
			written[c] = true
		}
	}
	if snap.Full {
		// Read the tables back: chains left by a previous process or a
		// failed sync are deleted, and jumps someone removed come back.
		save, err := d.tool.save(ctx, "")
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
		in.missingJumps = missingJumps(tables)
	} else {
		// Only the changed services' chains can have gone stale.
		for name := range snap.Services {
			for _, sp := range d.applied[name] {
				for _, c := range chainsOf(sp) {
					if !written[c] {
						in.stale = append(in.stale, c)
					}
				}
			}
		}
		slices.Sort(in.stale)
	}

	d.buf.Reset()
	st := render(&d.buf, d.opts, in)
	if err := d.tool.restore(ctx, d.buf.Bytes()); err != nil {
		d.count("iptables_restore_failed", 1)
		return d.failed(fmt.Sprintf("applying %d nat and %d filter rules", st.natRulesWritten, st.filterRules), err)
	}
	klog.V(3).InfoS("Applied iptables rules", "full", snap.Full, "natChainsWritten", st.natChainsWritten,
		"natRulesWritten", st.natRulesWritten, "natRules", st.natRules, "filterRules", st.filterRules, "staleChains", len(in.stale))

	d.rules = map[string]int{"nat": st.natRules, "filter": st.filterRules}
	// The filter table is rewritten whole at every sync, as kube-proxy's.
	d.written = map[string]int{"nat": st.natRulesWritten, "filter": st.filterRules}
	stale := d.staleUDP(snap, next)
	d.applied = next
	if len(stale) > 0 {
		start := time.Now()
		n, err := d.ct.deleteStale(stale)
		d.cleanup = conntrackCleanup{ran: true, took: time.Since(start), deleted: n}
		d.count("conntrack_entries_deleted", uint64(n))
		if err != nil {
			d.count("conntrack_cleanup_failed", 1)
			// The rules are in place; a full sync retries the cleanup.
			return err
		}
		if n > 0 {
			klog.V(2).InfoS("Deleted stale UDP conntrack entries", "entries", n)
		}
	}
	return nil
}

// nextState is what the kernel holds once snap is applied over applied.
func nextState(applied map[model.ServiceName][]model.ServicePort, snap *model.Snapshot) map[model.ServiceName][]model.ServicePort {
	next := make(map[model.ServiceName][]model.ServicePort, len(applied))
	if !snap.Full {
		maps.Copy(next, applied)
	}
	for name, ports := range snap.Services {
		if len(ports) == 0 {
			delete(next, name)
		} else {
			next[name] = ports
		}
	}
	return next
}

// staleUDP collects the UDP frontends that may have stale flows after this
// sync, each with the endpoints whose flows are kept. It follows upstream
// kube-proxy v1.36 (pkg/proxy/conntrack): a flow to a frontend is stale
// unless its reply comes from a serving endpoint, ready or not, terminating
// or not (a draining pod keeps its flows, as its TCP connections keep
// going); a frontend with no serving endpoint is left alone, and so are
// the flows of a deleted Service, which age out. A frontend is checked when
// its serving endpoints changed or it is new (flows sent before it existed
// were never translated); a full sync checks every one.
func (d *Dataplane) staleUDP(snap *model.Snapshot, next map[model.ServiceName][]model.ServicePort) staleUDP {
	full := snap.Full
	var names []model.ServiceName
	if full {
		names = slices.Collect(maps.Keys(next))
	} else {
		names = slices.Collect(maps.Keys(snap.Services))
	}
	out := make(staleUDP)
	for _, name := range names {
		before := make(map[model.Frontend][]model.Backend)
		for _, sp := range d.applied[name] {
			if sp.Name.Protocol == model.UDP {
				before[sp.ClusterIP] = sp.Serving
			}
		}
		for _, sp := range next[name] {
			if sp.Name.Protocol != model.UDP || len(sp.Serving) == 0 {
				continue
			}
			if prev, ok := before[sp.ClusterIP]; full || !ok || !slices.Equal(prev, sp.Serving) {
				out.add(sp.ClusterIP, sp.Serving)
			}
		}
	}
	return out
}

// failed forgets what the kernel holds, so the next sync reads it back.
// The rules applied before stay in force: a restore that fails changes
// nothing in the table it failed in.
func (d *Dataplane) failed(doing string, err error) error {
	d.applied = nil
	return fmt.Errorf("%s with iptables-%s: %w", doing, d.tool.backend, err)
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

// Close releases the conntrack socket; the rules stay and keep serving.
func (d *Dataplane) Close() error {
	d.ct.Close()
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

// Cleanup removes every rule and chain of this mode, from both backends,
// in the network namespace cfg names. Having nothing to remove is not an
// error.
func Cleanup(ctx context.Context, cfg Config) error {
	cfg = cfg.withDefaults()
	var errs []error
	for _, b := range []string{BackendNFT, BackendLegacy} {
		t := cfg.tool(b)
		if !t.available() {
			continue
		}
		save, err := t.save(ctx, "")
		switch {
		case err != nil && b == BackendLegacy && strings.Contains(err.Error(), "Permission denied"):
			// iptables-legacy reads a namespace without legacy tables
			// from /proc alone; tables it must open a raw socket for.
			errs = append(errs, fmt.Errorf("this node has iptables-legacy tables, which cannot be read "+
				"without CAP_NET_RAW, so rules kube-proxy or this proxy's iptables mode may have left there stay. "+
				"Run `kube-bpf-proxy --cleanup` once with NET_RAW (as the iptables overlay grants it): %w", err))
			continue
		case err != nil:
			// No legacy tables in this kernel: nothing of ours there.
			klog.V(2).InfoS("Skipping iptables backend in cleanup", "backend", b, "err", err)
			continue
		}
		input := cleanupInput(parseSave(save))
		if len(input) == 0 {
			continue
		}
		if err := t.restore(ctx, input); err != nil {
			errs = append(errs, fmt.Errorf("removing the iptables rules: %w", err))
			continue
		}
		klog.InfoS("Removed the iptables rules", "backend", b)
	}
	return errors.Join(errs...)
}
