package inspect

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"

	"k8s.io/client-go/kubernetes"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Modes inspect reads.
const (
	ModeAuto     = "auto"
	ModeEBPF     = "ebpf"
	ModeIPTables = "iptables"
)

// Options say what to read and what to compare it with.
type Options struct {
	// Mode is ModeEBPF, ModeIPTables, or ModeAuto: ebpf if the pins are
	// there, else iptables if the nat table of iptables or ip6tables has
	// KUBE-SERVICES.
	Mode string
	// BPFFSPath is the proxy's --bpffs-path.
	BPFFSPath string
	// IPTables says which backend's rules to read (the iptables mode's,
	// or the ebpf mode's packet layer's), and in which network namespace
	// (tests read their own); its Family is ignored: each family's
	// rules are read with that family's tools.
	IPTables iptables.Config
	// Node is this node's name, for the Local policies.
	Node string
	// Namespace and Name filter the Services shown; empty: all.
	Namespace, Name string
	// Client reads the API server; nil: the datapath is shown alone,
	// with ClientError saying why.
	Client      kubernetes.Interface
	ClientError error
	// Server is the API server's URL, for the report.
	Server string
}

// ErrNoDatapath is returned when auto-detection finds neither datapath.
var ErrNoDatapath = errors.New("no datapath found on this node")

// familyState is what the datapath holds of one address family: each
// family has its own maps (kbp_*, kbp6_*) and its own rules (iptables,
// ip6tables), as the proxy runs one proxier per family.
type familyState struct {
	family model.IPFamily
	// serves: the datapath holds this family (eBPF: service ids in its
	// maps, or a packet layer; iptables: the KUBE-SERVICES chain).
	serves bool
	// source is where the iptables mode read it ("iptables-nft").
	source string
	// dps are the maps' or the rules' ports; packets the ebpf mode's
	// packet layer's (nil when not read).
	dps, packets []*dpPort
	// warnings limit the comparison of this family, shown when it is
	// checked; why says why it is not served (a read error), if known.
	warnings []string
	why      string
}

// tools names the iptables commands of family f, for messages.
func tools(f model.IPFamily, backend string) string {
	if f == model.IPv6 {
		return "ip6tables-" + backend
	}
	return "iptables-" + backend
}

// readRules reads family f's iptables rules: o.IPTables with f's tools.
func readRules(ctx context.Context, o Options, f model.IPFamily) (*iptables.SavedRules, error) {
	cfg := o.IPTables
	cfg.Family = f
	return iptables.ReadRules(ctx, cfg)
}

func hasServices(nat []byte) bool {
	return bytes.Contains(nat, []byte(":"+iptables.ChainServices+" "))
}

// Inspect reads the node's datapath and, with a client, compares it with
// the API server's Services and EndpointSlices, family by family.
func Inspect(ctx context.Context, o Options) (*Report, error) {
	r := &Report{Node: o.Node, Mode: o.Mode, API: APIStatus{Server: o.Server}}
	rules := map[model.IPFamily]*iptables.SavedRules{}
	ruleErrs := map[model.IPFamily]error{}
	if o.Mode == ModeAuto || o.Mode == "" {
		switch {
		case ebpf.PinsPresent(o.BPFFSPath):
			r.Mode = ModeEBPF
		default:
			// The iptables mode of an IPv6-only node writes
			// ip6tables rules only.
			for _, f := range model.Families {
				rules[f], ruleErrs[f] = readRules(ctx, o, f)
				if ruleErrs[f] == nil && hasServices(rules[f].NAT) {
					r.Mode = ModeIPTables
				}
			}
			if r.Mode != ModeIPTables {
				if err := errors.Join(ruleErrs[model.IPv4], ruleErrs[model.IPv6]); ruleErrs[model.IPv4] != nil {
					return nil, fmt.Errorf("%w: no pins under %s, and reading the iptables rules failed (pass --mode): %v", ErrNoDatapath, o.BPFFSPath, err)
				}
				ip6 := "nor in the ip6tables one"
				if err := ruleErrs[model.IPv6]; err != nil {
					ip6 = "and ip6tables could not be read: " + err.Error()
				}
				return nil, fmt.Errorf("%w: no pins under %s (--bpffs-path) and no %s chain in the iptables-%s nat table, %s",
					ErrNoDatapath, o.BPFFSPath, iptables.ChainServices, rules[model.IPv4].Backend, ip6)
			}
		}
	}
	var states []*familyState
	switch r.Mode {
	case ModeEBPF:
		pinned, err := ebpf.ReadPinned(o.BPFFSPath)
		if err != nil {
			return nil, fmt.Errorf("reading the eBPF datapath (is --bpffs-path the proxy's?): %w", err)
		}
		r.Source = o.BPFFSPath
		r.Events = pinned.Events
		states = pinnedStates(pinned)
		for _, st := range states {
			f := st.family
			// The packet layer: the rules that serve packets from
			// outside the node (node ports, external and load
			// balancer IPs), one per family.
			pr, err := readRules(ctx, o, f)
			switch {
			case err != nil:
				st.warnings = append(st.warnings, "the packet layer's "+map[model.IPFamily]string{model.IPv4: "iptables", model.IPv6: "ip6tables"}[f]+" rules could not be read: "+err.Error())
				st.why = err.Error()
			case !hasServices(pr.NAT):
				st.warnings = append(st.warnings, "the packet layer has no "+iptables.ChainServices+" chain in the "+tools(f, pr.Backend)+" nat table")
				st.packets = []*dpPort{}
			default:
				st.serves = true
				st.packets = fromRules(pr.NAT, pr.Filter)
				if st.packets == nil {
					st.packets = []*dpPort{}
				}
			}
		}
	case ModeIPTables:
		var ipv4Err error
		for _, f := range model.Families {
			pr, err := rules[f], ruleErrs[f]
			if pr == nil && err == nil {
				pr, err = readRules(ctx, o, f)
			}
			if err != nil && f == model.IPv4 {
				ipv4Err = err
			}
			states = append(states, rulesState(f, pr, err))
		}
		// An IPv6-only node's rules are ip6tables' alone.
		if ipv4Err != nil && !states[len(states)-1].serves {
			return nil, fmt.Errorf("reading the iptables rules: %w", ipv4Err)
		}
	default:
		return nil, fmt.Errorf("unknown mode %q: want ebpf, iptables or auto", r.Mode)
	}

	var exp map[model.IPFamily]*expected
	if o.Client == nil {
		r.API.Error = "no API server configured"
		if o.ClientError != nil {
			r.API.Error = o.ClientError.Error()
		}
	} else {
		var err error
		if exp, err = listExpected(ctx, o.Client, o.Node); err != nil {
			r.API.Error = err.Error()
			exp = nil
		} else {
			r.API.Compared = true
		}
	}
	report(r, states, exp, filter{namespace: o.Namespace, name: o.Name})
	return r, nil
}

// pinnedStates splits the maps' service ids by family: the IPv4 maps'
// and the IPv6 maps' (kbp6_*), each with its own ids.
func pinnedStates(pinned *ebpf.Pinned) []*familyState {
	dps := fromPinned(pinned)
	var out []*familyState
	for _, f := range model.Families {
		st := &familyState{family: f}
		for _, dp := range dps {
			if dp.family == f {
				st.dps = append(st.dps, dp)
			}
		}
		st.serves = len(st.dps) > 0
		out = append(out, st)
	}
	return out
}

// rulesState is what family f's iptables rules (the iptables mode's)
// hold; err is why they could not be read.
func rulesState(f model.IPFamily, pr *iptables.SavedRules, err error) *familyState {
	st := &familyState{family: f}
	if err != nil {
		st.why = err.Error()
		return st
	}
	st.serves = hasServices(pr.NAT)
	st.source = tools(f, pr.Backend)
	st.dps = fromRules(pr.NAT, pr.Filter)
	return st
}

// report fills r with the ports of the families checked: those the
// datapath serves, and those the API server's Services have (exp; nil when
// not compared). A family the Services have and the datapath does not
// serve (a dual-stack Service on a node whose proxy serves one family)
// is said in one warning, not compared port by port; with neither, the
// IPv4 family is shown, as on a node that serves nothing yet.
func report(r *Report, states []*familyState, exp map[model.IPFamily]*expected, f filter) {
	var checked []*familyState
	for _, st := range states {
		e := exp[st.family]
		wanted := e != nil && len(e.ports) > 0
		switch {
		case st.serves:
			checked = append(checked, st)
		case wanted:
			n := 0
			for i := range e.ports {
				if f.matches(e.ports[i].Name.ServiceName) {
					n++
				}
			}
			if n == 0 {
				continue
			}
			// Why, when a read failed; else the usual cause.
			why := fmt.Sprintf(" (the proxy here does not serve %v)", st.family)
			if st.why != "" {
				why = " (" + st.why + ")"
			}
			r.Warnings = append(r.Warnings, fmt.Sprintf("the API server's Services have %d %v service %s, but this node's datapath holds no %v: not compared%s",
				n, st.family, plural(n, "port", "ports"), st.family, why))
		}
	}
	if len(checked) == 0 {
		for _, st := range states {
			if st.family == model.IPv4 {
				checked = append(checked, st)
			}
		}
	}
	var sources []string
	filterWarned := false
	for _, st := range checked {
		for _, p := range st.dps {
			p.family = st.family
		}
		for _, p := range st.packets {
			p.family = st.family
		}
		r.Families = append(r.Families, st.family.String())
		if st.source != "" {
			sources = append(sources, st.source)
		}
		r.Warnings = append(r.Warnings, st.warnings...)
		var ports []ServicePort
		if exp == nil {
			var warnings []string
			ports, warnings = datapathOnly(r.Mode, st.dps, st.packets, f)
			if !filterWarned {
				r.Warnings = append(r.Warnings, warnings...)
				filterWarned = len(warnings) > 0
			}
		} else {
			e := exp[st.family]
			if e == nil {
				e = &expected{}
			}
			ports = compare(r.Mode, st.dps, st.packets, e, f)
		}
		for i := range ports {
			ports[i].Family = st.family.String()
		}
		r.ServicePorts = append(r.ServicePorts, ports...)
	}
	if r.Mode == ModeIPTables {
		r.Source = strings.Join(sources, " and ")
	}
	sortPorts(r.ServicePorts)
	for _, sp := range r.ServicePorts {
		// Unchecked ports list only the datapath's own inconsistencies.
		r.Differences += len(sp.Differences)
	}
	if r.ServicePorts == nil {
		r.ServicePorts = []ServicePort{}
	}
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
