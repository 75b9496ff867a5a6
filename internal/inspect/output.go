package inspect

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// WriteJSON writes the report as indented JSON (the -o json schema).
func WriteJSON(w io.Writer, r *Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteTable writes the report for people: a header saying what was read
// and compared, then per service port a line with its policies, affinity,
// counters and status, a line per frontend and per backend, and its
// differences.
func WriteTable(w io.Writer, r *Report) error {
	families := ""
	if !slices.Equal(r.Families, []string{model.IPv4.String()}) && len(r.Families) > 0 {
		// An IPv4-only node's header is as it was before IPv6.
		families = " (" + strings.Join(r.Families, ", ") + ")"
	}
	fmt.Fprintf(w, "Node %s, %s mode%s, read from %s.\n", r.Node, r.Mode, families, r.Source)
	switch {
	case r.API.Compared:
		server := ""
		if r.API.Server != "" {
			server = " (" + r.API.Server + ")"
		}
		fmt.Fprintf(w, "Compared with the API server%s: %s.\n", server, differencesText(r.Differences))
	default:
		fmt.Fprintf(w, "Not compared with the API server (%s): the datapath alone is shown.\n", r.API.Error)
		if r.Differences > 0 {
			fmt.Fprintf(w, "The datapath is inconsistent in itself: %s.\n", differencesText(r.Differences))
		}
	}
	for _, warning := range r.Warnings {
		fmt.Fprintf(w, "Warning: %s.\n", warning)
	}
	fmt.Fprintln(w)

	var table bytes.Buffer
	tw := tabwriter.NewWriter(&table, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE PORT\tFRONTEND / BACKEND\tKIND / STATE\tLAYER / POLICIES\tDETAILS")
	for _, sp := range r.ServicePorts {
		name := portLabel(sp)
		var details []string
		if sp.InternalTrafficPolicy != "" {
			details = append(details, "internal="+sp.InternalTrafficPolicy)
		}
		if sp.ExternalTrafficPolicy != "" {
			details = append(details, "external="+sp.ExternalTrafficPolicy)
		}
		if sp.AffinitySeconds > 0 {
			details = append(details, "affinity=ClientIP/"+strconv.Itoa(int(sp.AffinitySeconds))+"s")
		}
		if c := sp.Counters; c != nil {
			details = append(details, fmt.Sprintf("connections=%d datagrams=%d refused=%d reverse=%d", c.Connections, c.Datagrams, c.Refused, c.Reverse))
		}
		fmt.Fprintf(tw, "%s\t\t%s\t\t%s\n", name, strings.ToUpper(sp.Status), strings.Join(details, " "))
		for _, fe := range sp.Frontends {
			note := ""
			if !fe.InDatapath {
				note = "MISSING"
			}
			fmt.Fprintf(tw, "\t%s\t%s\t%s\t%s\n", fe.Address, fe.Kind, fe.Layer, note)
		}
		if len(sp.Backends) == 0 {
			fmt.Fprintf(tw, "\t-> (no endpoints)\t\t\t\n")
		}
		for _, b := range sp.Backends {
			pol := strings.Join(b.Policies, ",")
			if pol == "" {
				pol = "-"
			}
			var notes []string
			if b.Local != nil && *b.Local {
				notes = append(notes, "on this node")
			}
			if b.Weight > 1 {
				notes = append(notes, "weight="+strconv.Itoa(b.Weight))
			}
			fmt.Fprintf(tw, "\t-> %s\t%s\t%s\t%s\n", b.Address, b.State, pol, strings.Join(notes, " "))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// Empty cells pad lines with spaces to their end.
	for _, line := range strings.SplitAfter(table.String(), "\n") {
		if line != "" {
			fmt.Fprintln(w, strings.TrimRight(line, " \n"))
		}
	}
	// Differences after the table: long sentences in it would widen
	// their column for every line.
	header := false
	for _, sp := range r.ServicePorts {
		for _, d := range sp.Differences {
			if !header {
				fmt.Fprintln(w, "\nDifferences:")
				header = true
			}
			fmt.Fprintf(w, "  %s: %s\n", portLabel(sp), d)
		}
	}
	if len(r.Events) > 0 {
		names := make([]string, 0, len(r.Events))
		for n := range r.Events {
			names = append(names, n)
		}
		slices.Sort(names)
		var parts []string
		for _, n := range names {
			if r.Events[n] > 0 {
				parts = append(parts, fmt.Sprintf("%s=%d", n, r.Events[n]))
			}
		}
		if len(parts) > 0 {
			fmt.Fprintf(w, "\nNode-wide eBPF events: %s\n", strings.Join(parts, " "))
		}
	}
	return nil
}

func differencesText(n int) string {
	switch n {
	case 0:
		return "no differences"
	case 1:
		return "1 difference"
	}
	return fmt.Sprintf("%d differences", n)
}

// portLabel names a service port as "namespace/name:port/PROTOCOL", or by
// its first frontend when the datapath does not name it; an IPv6 port's
// label ends in " IPv6" (the IPv4 one of a dual-stack Service has none,
// as on an IPv4-only node).
func portLabel(sp ServicePort) string {
	name := sp.Service
	if name == "" {
		name = "(unnamed)"
		if len(sp.Frontends) > 0 {
			name = "(" + sp.Frontends[0].Address + ")"
		}
	}
	if sp.Port != "" {
		name += ":" + sp.Port
	}
	name += "/" + sp.Protocol
	if sp.Family == model.IPv6.String() {
		name += " IPv6"
	}
	return name
}
