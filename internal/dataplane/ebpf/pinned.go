package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// This file reads what a running (or stopped) datapath left pinned, for
// `kube-bpf-proxy inspect`: read-only, without loading programs or taking
// the datapath over. The maps are read one after the other while the proxy
// may be writing them: a read taken during a sync can mix what the maps
// held before it (the frontends, say) with what they hold after (the
// slots), a state they never held at one instant. Reading again after the
// sync settles it.

// FrontendKind is what kind of address a frontend entry is, from its flags.
type FrontendKind string

const (
	KindClusterIP FrontendKind = "ClusterIP"
	KindNodePort  FrontendKind = "NodePort"
	// KindExternal is an external IP or a LoadBalancer IP: the maps do not
	// tell them apart.
	KindExternal FrontendKind = "External"
)

// PinnedFrontend is one entry of the frontend map.
type PinnedFrontend struct {
	model.Frontend
	Kind FrontendKind
	// NodeNetNSOnly: served to sockets in the node's network namespace
	// only (a loopback node port address).
	NodeNetNSOnly bool
	// Count is the number of slots the programs pick from for it; 0
	// refuses connections.
	Count int
}

// PinnedBackend is a backend a service id's live slots name.
type PinnedBackend struct {
	ID uint32
	model.Backend
	Protocol model.Protocol
	// Slots is how many live slots name it: its weight among the id's
	// backends (the reconciler writes one slot per backend).
	Slots int
	// Missing: slots name the id but the backend map has no entry for it
	// (a program picking it refuses the connection).
	Missing bool
}

// PinnedCounters are a service id's counters, summed over CPUs.
type PinnedCounters struct {
	Connections uint64 // connect()s translated: TCP, connected UDP
	Datagrams   uint64 // sendmsg()s translated: unconnected UDP
	Refused     uint64 // connections and datagrams refused
	Reverse     uint64 // replies and peer names shown the frontend
}

// PinnedGroup is what the maps hold under one service id: frontends that
// share a backend list (a service port's, or under internalTrafficPolicy
// Local its ClusterIP's and its external frontends' apart).
type PinnedGroup struct {
	// Family is the family of the maps the group is in: each family has
	// its own maps, and its own service ids.
	Family    model.IPFamily
	ID        uint32
	Frontends []PinnedFrontend
	// Backends are those of the live slots (0 to the frontends' highest
	// count), in the order of their first slot.
	Backends []PinnedBackend
	// MissingSlots counts live slots without an entry.
	MissingSlots int
	// Affinity: the frontends have ClientIP session affinity, of
	// AffinitySeconds (read from the match map; 0 if it has no entry).
	Affinity        bool
	AffinitySeconds uint32
	// NoLocalEndpoint: the frontends refuse because this node has no
	// endpoint for internalTrafficPolicy Local while others have.
	NoLocalEndpoint bool
	// Counters is nil when the id has no counters entry.
	Counters *PinnedCounters
}

// Pinned is what the load-balancing maps pinned in a directory hold.
type Pinned struct {
	// Groups are the IPv4 maps', then the IPv6 maps' (kbp6_*), each
	// family's sorted by the lowest frontend (ClusterIPs first).
	Groups []PinnedGroup
	// Events are the node-wide event counters, by their metric names.
	Events map[string]uint64
}

// PinsPresent reports whether dir holds a datapath's pinned frontend map.
func PinsPresent(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, lbMapKbpServices))
	return err == nil
}

// openPinnedReadOnly opens one pinned map read-only (BPF_F_RDONLY on
// BPF_OBJ_GET, Linux 4.15), so that nothing here can change it.
func openPinnedReadOnly(dir, name string) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("opening pinned map %s in %s: %w", name, dir, err)
	}
	return m, nil
}

// ReadPinned reads the load-balancing maps a datapath pinned in dir
// (--bpffs-path), both families'. It fails if the IPv4 frontend, slot or
// backend map is missing; the counters and affinity maps are optional,
// and so are the IPv6 maps (an older version's pins).
func ReadPinned(dir string) (*Pinned, error) {
	out := &Pinned{}
	for _, f := range model.Families {
		groups, err := readPinnedFamily(dir, f)
		if f == model.IPv6 && errors.Is(err, os.ErrNotExist) {
			break // pinned by a version without IPv6 maps
		}
		if err != nil {
			return nil, err
		}
		out.Groups = append(out.Groups, groups...)
	}
	m, err := openPinnedReadOnly(dir, lbMapKbpStats)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if m != nil {
		defer m.Close()
		out.Events = make(map[string]uint64, len(eventNames))
		for idx, name := range eventNames {
			var perCPU []uint64
			if err := m.Lookup(idx, &perCPU); err != nil {
				continue // an older version's map, without this event
			}
			var sum uint64
			for _, v := range perCPU {
				sum += v
			}
			out.Events[name] = sum
		}
	}
	return out, nil
}

// comparePinnedFrontends orders ClusterIPs first, then node ports, then
// external frontends, each by address, port and protocol.
func comparePinnedFrontends(a, b PinnedFrontend) int {
	rank := func(k FrontendKind) int {
		switch k {
		case KindClusterIP:
			return 0
		case KindNodePort:
			return 1
		}
		return 2
	}
	if c := rank(a.Kind) - rank(b.Kind); c != 0 {
		return c
	}
	if c := a.IP.Compare(b.IP); c != 0 {
		return c
	}
	if c := int(a.Port) - int(b.Port); c != 0 {
		return c
	}
	return int(a.Protocol) - int(b.Protocol)
}

// readPinnedFamily reads the groups of family f's maps. An error wrapping
// os.ErrNotExist says its frontend, slot or backend map is not pinned.
func readPinnedFamily(dir string, f model.IPFamily) ([]PinnedGroup, error) {
	fm := mapNamesOf(f)
	open := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range open {
			m.Close()
		}
	}()
	for _, name := range []string{fm.servicesName, fm.slotsName, fm.backendsName, fm.statsName, fm.matchesName} {
		m, err := openPinnedReadOnly(dir, name)
		if err != nil {
			switch name {
			case fm.servicesName, fm.slotsName, fm.backendsName:
				return nil, err
			}
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, err
		}
		open[name] = m
	}
	fm.services, fm.slots, fm.backends = open[fm.servicesName], open[fm.slotsName], open[fm.backendsName]
	fm.stats, fm.matches = open[fm.statsName], open[fm.matchesName]
	maps := kernelMaps(fm, f)

	groups := map[uint32]*PinnedGroup{}
	group := func(id uint32) *PinnedGroup {
		g := groups[id]
		if g == nil {
			g = &PinnedGroup{Family: f, ID: id}
			groups[id] = g
		}
		return g
	}
	err := maps.Services.Iterate(func(fe model.Frontend, v lbSvcValue) error {
		g := group(idOf(v))
		flags := flagsOf(v)
		pf := PinnedFrontend{Frontend: fe, Kind: KindClusterIP, Count: countOf(v),
			NodeNetNSOnly: flags&svcFlagNodeNetNSOnly != 0}
		switch {
		case flags&svcFlagNodePort != 0:
			pf.Kind = KindNodePort
		case flags&svcFlagExternal != 0:
			pf.Kind = KindExternal
		}
		g.Frontends = append(g.Frontends, pf)
		g.Affinity = g.Affinity || flags&svcFlagAffinity != 0
		g.NoLocalEndpoint = g.NoLocalEndpoint || flags&svcFlagNoLocalEndpoint != 0
		return nil
	})
	if err != nil {
		return nil, err
	}

	backends := map[uint32]backendKey{}
	err = maps.Backends.Iterate(func(id uint32, k backendKey) error {
		backends[id] = k
		return nil
	})
	if err != nil {
		return nil, err
	}

	slots := map[uint32]map[uint32]uint32{} // id -> slot -> backend id
	err = maps.Slots.Iterate(func(k lbSlotKey, backendID uint32) error {
		if groups[k.SvcId] == nil {
			return nil // no frontend names the id: hidden, awaiting deletion
		}
		if slots[k.SvcId] == nil {
			slots[k.SvcId] = map[uint32]uint32{}
		}
		slots[k.SvcId][k.Slot] = backendID
		return nil
	})
	if err != nil {
		return nil, err
	}

	if fm.matches != nil {
		err = maps.Matches.Iterate(func(k lbMatchKey, timeout uint32) error {
			if g := groups[k.SvcId]; g != nil {
				g.AffinitySeconds = max(g.AffinitySeconds, timeout)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if fm.stats != nil {
		err = maps.Stats.Iterate(func(id uint32, v lbSvcStats) error {
			if g := groups[id]; g != nil {
				g.Counters = &PinnedCounters{Connections: v.Connections, Datagrams: v.Datagrams, Refused: v.Refused, Reverse: v.Reverse}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}

	var out []PinnedGroup
	for id, g := range groups {
		live := 0
		for _, f := range g.Frontends {
			live = max(live, f.Count)
		}
		index := map[uint32]int{}
		for slot := range uint32(live) {
			bid, ok := slots[id][slot]
			if !ok || bid == 0 {
				g.MissingSlots++
				continue
			}
			if i, seen := index[bid]; seen {
				g.Backends[i].Slots++
				continue
			}
			b := PinnedBackend{ID: bid, Slots: 1}
			if k, ok := backends[bid]; ok {
				b.Backend, b.Protocol = k.Backend, k.Protocol
			} else {
				b.Missing = true
			}
			index[bid] = len(g.Backends)
			g.Backends = append(g.Backends, b)
		}
		slices.SortFunc(g.Frontends, comparePinnedFrontends)
		if !g.Affinity {
			g.AffinitySeconds = 0
		}
		out = append(out, *g)
	}
	slices.SortFunc(out, func(a, b PinnedGroup) int {
		if len(a.Frontends) == 0 || len(b.Frontends) == 0 {
			return len(b.Frontends) - len(a.Frontends)
		}
		return comparePinnedFrontends(a.Frontends[0], b.Frontends[0])
	})
	return out, nil
}
