package load

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// newFlagSet makes a flag set that reports errors to its caller instead of
// printing them or exiting.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// parseFlags parses args and rejects positional arguments, which every
// subcommand here would otherwise silently ignore.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return usageError(fs, errors.New("help requested"))
		}
		return usageError(fs, err)
	}
	if fs.NArg() > 0 {
		return usageError(fs, fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	return nil
}

// usageError says what was wrong and which flags the subcommand takes.
func usageError(fs *flag.FlagSet, err error) error {
	var b bytes.Buffer
	fs.SetOutput(&b)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
	return fmt.Errorf("%s: %w\nflags of %s:\n%s", fs.Name(), err, fs.Name(), strings.TrimRight(b.String(), "\n"))
}

// target is one address a workload measures.
type target struct {
	// name is results.TargetDirect or results.TargetService.
	name string
	addr netip.AddrPort
}

// parseTargets parses a comma-separated list of IP:port; at most max of
// them (0: any number). The first is named direct, the second service.
func parseTargets(s string, max int) ([]target, error) {
	if s == "" {
		return nil, errors.New("--targets is required (IP:port[,IP:port])")
	}
	parts := strings.Split(s, ",")
	if max > 0 && len(parts) > max {
		return nil, fmt.Errorf("--targets has %d addresses, at most %d allowed (direct, then service)", len(parts), max)
	}
	ts := make([]target, len(parts))
	for i, p := range parts {
		ap, err := netip.ParseAddrPort(strings.TrimSpace(p))
		if err != nil {
			return nil, fmt.Errorf("--targets: %q is not IP:port: %w", p, err)
		}
		if ap.Port() == 0 {
			return nil, fmt.Errorf("--targets: %q has port 0", p)
		}
		ts[i] = target{name: targetName(i), addr: ap}
	}
	return ts, nil
}

// targetName names the i-th target of a list.
func targetName(i int) string {
	switch i {
	case 0:
		return results.TargetDirect
	case 1:
		return results.TargetService
	default:
		return fmt.Sprintf("target%d", i)
	}
}
