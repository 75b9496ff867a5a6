package inspect

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"k8s.io/client-go/kubernetes"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
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
	// there, else iptables if the nat table has KUBE-SERVICES.
	Mode string
	// BPFFSPath is the proxy's --bpffs-path.
	BPFFSPath string
	// IPTables says which backend's rules to read (the iptables mode's,
	// or the ebpf mode's packet layer's), and in which network namespace
	// (tests read their own).
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

// Inspect reads the node's datapath and, with a client, compares it with
// the API server's Services and EndpointSlices.
func Inspect(ctx context.Context, o Options) (*Report, error) {
	r := &Report{Node: o.Node, Mode: o.Mode, API: APIStatus{Server: o.Server}}
	var (
		dps, packets []*dpPort
		rules        *iptables.SavedRules
	)
	if o.Mode == ModeAuto || o.Mode == "" {
		switch {
		case ebpf.PinsPresent(o.BPFFSPath):
			r.Mode = ModeEBPF
		default:
			var err error
			if rules, err = iptables.ReadRules(ctx, o.IPTables); err != nil {
				return nil, fmt.Errorf("%w: no pins under %s, and reading the iptables rules failed (pass --mode): %v", ErrNoDatapath, o.BPFFSPath, err)
			}
			if !bytes.Contains(rules.NAT, []byte(":"+iptables.ChainServices+" ")) {
				return nil, fmt.Errorf("%w: no pins under %s (--bpffs-path) and no %s chain in the iptables-%s nat table",
					ErrNoDatapath, o.BPFFSPath, iptables.ChainServices, rules.Backend)
			}
			r.Mode = ModeIPTables
		}
	}
	switch r.Mode {
	case ModeEBPF:
		pinned, err := ebpf.ReadPinned(o.BPFFSPath)
		if err != nil {
			return nil, fmt.Errorf("reading the eBPF datapath (is --bpffs-path the proxy's?): %w", err)
		}
		dps = fromPinned(pinned)
		r.Source = o.BPFFSPath
		r.Events = pinned.Events
		// The packet layer: the rules that serve packets from outside
		// the node (node ports, external and load balancer IPs).
		pr, err := iptables.ReadRules(ctx, o.IPTables)
		switch {
		case err != nil:
			r.Warnings = append(r.Warnings, "the packet layer's iptables rules could not be read: "+err.Error())
		case !bytes.Contains(pr.NAT, []byte(":"+iptables.ChainServices+" ")):
			r.Warnings = append(r.Warnings, "the packet layer has no "+iptables.ChainServices+" chain in the iptables-"+pr.Backend+" nat table")
			packets = []*dpPort{}
		default:
			packets = fromRules(pr.NAT, pr.Filter)
			if packets == nil {
				packets = []*dpPort{}
			}
		}
	case ModeIPTables:
		if rules == nil {
			var err error
			if rules, err = iptables.ReadRules(ctx, o.IPTables); err != nil {
				return nil, fmt.Errorf("reading the iptables rules: %w", err)
			}
		}
		dps = fromRules(rules.NAT, rules.Filter)
		r.Source = "iptables-" + rules.Backend
	default:
		return nil, fmt.Errorf("unknown mode %q: want ebpf, iptables or auto", r.Mode)
	}

	f := filter{namespace: o.Namespace, name: o.Name}
	if o.Client == nil {
		r.API.Error = "no API server configured"
		if o.ClientError != nil {
			r.API.Error = o.ClientError.Error()
		}
		var warnings []string
		r.ServicePorts, warnings = datapathOnly(r.Mode, dps, packets, f)
		r.Warnings = append(r.Warnings, warnings...)
	} else {
		exp, err := listExpected(ctx, o.Client, o.Node)
		if err != nil {
			r.API.Error = err.Error()
			var warnings []string
			r.ServicePorts, warnings = datapathOnly(r.Mode, dps, packets, f)
			r.Warnings = append(r.Warnings, warnings...)
		} else {
			r.API.Compared = true
			r.ServicePorts = compare(r.Mode, dps, packets, exp, f)
		}
	}
	sortPorts(r.ServicePorts)
	for _, sp := range r.ServicePorts {
		// Unchecked ports list only the datapath's own inconsistencies.
		r.Differences += len(sp.Differences)
	}
	if r.ServicePorts == nil {
		r.ServicePorts = []ServicePort{}
	}
	return r, nil
}
