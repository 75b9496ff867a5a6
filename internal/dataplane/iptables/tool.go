package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
)

// The two iptables backends of iptables 1.8: the same rules and commands,
// programmed through nf_tables or through the legacy x_tables interface.
const (
	BackendNFT    = "nft"
	BackendLegacy = "legacy"
	BackendAuto   = "auto"
)

// tool runs one backend's iptables commands for one address family
// (iptables or ip6tables), optionally in another network namespace.
type tool struct {
	backend string
	// ipv6 selects ip6tables, ip6tables-save and ip6tables-restore. Both
	// families take the same xtables lock (/run/xtables.lock), as
	// kube-proxy's two proxiers do.
	ipv6 bool
	// netns, if set, is the path of the network namespace the commands
	// run in (through nsenter, which switches only that namespace).
	netns string
	// env is added to the commands' environment (XTABLES_LOCKFILE).
	env []string
	// lockWait bounds how long a command waits for the xtables lock that
	// serialises every iptables user on the node.
	lockWait time.Duration
}

// bin names a command of this backend and family: iptables-nft-restore,
// ip6tables-legacy-save, ..., or iptables-<backend> (ip6tables-<backend>)
// for an empty name.
func (t *tool) bin(name string) string {
	bin := "iptables-" + t.backend
	if t.ipv6 {
		bin = "ip6tables-" + t.backend
	}
	if name != "" {
		bin += "-" + name
	}
	return bin
}

// command runs t.bin(name).
func (t *tool) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	bin := t.bin(name)
	if t.netns != "" {
		args = append([]string{"--net=" + t.netns, "--", bin}, args...)
		bin = "nsenter"
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	if len(t.env) > 0 {
		cmd.Env = append(os.Environ(), t.env...)
	}
	return cmd
}

func (t *tool) waitArgs() []string {
	secs := int((t.lockWait + time.Second - 1) / time.Second)
	if secs < 1 {
		secs = 1
	}
	return []string{"-w", strconv.Itoa(secs)}
}

// available reports whether this backend's commands are installed.
func (t *tool) available() bool {
	_, err := exec.LookPath(t.bin("restore"))
	return err == nil
}

var failedLine = regexp.MustCompile(`line (\d+) failed`)

// restore applies input with iptables-restore --noflush: each table is
// replaced in one transaction at its COMMIT, and chains the input does not
// declare are left alone.
func (t *tool) restore(ctx context.Context, input []byte) error {
	args := append([]string{"--noflush", "--counters"}, t.waitArgs()...)
	cmd := t.command(ctx, "restore", args...)
	cmd.Stdin = bytes.NewReader(input)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		// iptables-restore names only the line number; the line itself is
		// what an operator needs.
		if m := failedLine.FindStringSubmatch(msg); m != nil {
			if n, _ := strconv.Atoi(m[1]); n > 0 {
				if all := strings.Split(string(input), "\n"); n <= len(all) {
					msg += fmt.Sprintf(" (line %d: %s)", n, all[n-1])
				}
			}
		}
		if lockTimedOut(err, msg) {
			return fmt.Errorf("%s changed nothing: %w, past the wait (%s): %v: %s",
				t.bin("restore"), errLockHeld, strings.Join(t.waitArgs(), " "), err, msg)
		}
		return fmt.Errorf("%s: %w: %s", t.bin("restore"), err, msg)
	}
	return nil
}

// errLockHeld is a command's failure to get the xtables lock within the
// wait: it changed nothing (iptables-restore applies a table at its COMMIT,
// in one transaction, and takes the lock before reading its input).
var errLockHeld = fmt.Errorf("%w: the xtables lock", dataplane.ErrBusy)

// lockTimedOut recognises the legacy backend's lock time-out: exit status
// 4 (RESOURCE_PROBLEM) and "Another app is currently holding the xtables
// lock" (iptables 1.8's xtables_lock_or_exit). The nft backend takes no
// lock: nf_tables serialises its own transactions.
func lockTimedOut(err error, stderr string) bool {
	var exit *exec.ExitError
	return errors.As(err, &exit) && exit.ExitCode() == 4 && strings.Contains(stderr, "xtables lock")
}

// save dumps the named tables, each with its own -t (a save without one
// reads every table, mangle, raw and security included).
func (t *tool) save(ctx context.Context, tables ...string) ([]byte, error) {
	if len(tables) == 0 {
		return t.saveTable(ctx, "")
	}
	var all []byte
	for _, table := range tables {
		out, err := t.saveTable(ctx, table)
		if err != nil {
			return nil, err
		}
		all = append(all, out...)
	}
	return all, nil
}

func (t *tool) saveTable(ctx context.Context, table string) ([]byte, error) {
	var args []string
	if table != "" {
		args = []string{"-t", table}
	}
	cmd := t.command(ctx, "save", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", t.bin("save"), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// chainExists lists a chain (iptables -S), as kube-proxy's canary check
// does: exit status 1 means the table has no such chain.
func (t *tool) chainExists(ctx context.Context, table, chain string) (bool, error) {
	args := append(t.waitArgs(), "-t", table, "-S", chain)
	cmd := t.command(ctx, "", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdout = io.Discard
	err := cmd.Run()
	if err == nil {
		return true, nil
	}
	msg := strings.TrimSpace(stderr.String())
	var exit *exec.ExitError
	switch {
	case lockTimedOut(err, msg):
		return false, fmt.Errorf("%s -t %s -S %s: %w: %s", t.bin(""), table, chain, errLockHeld, msg)
	case errors.As(err, &exit) && exit.ExitCode() == 1:
		return false, nil
	}
	return false, fmt.Errorf("%s -t %s -S %s: %w: %s", t.bin(""), table, chain, err, msg)
}

// savedTable is one table of an iptables-save dump.
type savedTable struct {
	chains []string
	rules  []string // "-A CHAIN ..." lines, as restore syntax
}

func parseSave(out []byte) map[string]*savedTable {
	tables := make(map[string]*savedTable)
	var cur *savedTable
	for _, line := range strings.Split(string(out), "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			cur = &savedTable{}
			tables[line[1:]] = cur
		case cur == nil:
		case strings.HasPrefix(line, ":"):
			if name, _, ok := strings.Cut(line[1:], " "); ok {
				cur.chains = append(cur.chains, name)
			}
		case strings.HasPrefix(line, "-A "):
			cur.rules = append(cur.rules, line)
		}
	}
	return tables
}

func (st *savedTable) hasChain(name string) bool {
	return st != nil && slices.Contains(st.chains, name)
}

// checkJumps compares a dump's jumps from built-in chains with ours: those
// missing, and older forms of ours to delete (the same chain, target and
// comment, other matches or another order: before issue 12 the comment came
// first). A jump is found by its exact text as iptables-save prints it.
func checkJumps(tables map[string]*savedTable, want []jump) (missing []jump, stale []savedRule) {
	for _, j := range want {
		st := tables[j.table]
		exact := "-A " + j.from + " " + j.rule()
		found := false
		if st != nil {
			for _, r := range st.rules {
				switch {
				case r == exact:
					if found {
						// A duplicate: kube-proxy's or an older ours.
						stale = append(stale, savedRule{j.table, r})
					}
					found = true
				case j.comment != "" && strings.HasPrefix(r, "-A "+j.from+" ") && strings.HasSuffix(r, " -j "+j.to) &&
					strings.Contains(r, `--comment "`+j.comment+`"`):
					stale = append(stale, savedRule{j.table, r})
				}
			}
		}
		if !found {
			missing = append(missing, j)
		}
	}
	return missing, stale
}

// cleanupInput is an iptables-restore input that removes everything this
// mode owns from a dump: the jumps into our chains, then the chains.
func cleanupInput(tables map[string]*savedTable) []byte {
	var buf bytes.Buffer
	for _, name := range []string{"filter", "nat", "mangle"} {
		st := tables[name]
		if st == nil {
			continue
		}
		// An empty KUBE-FIREWALL is ours (the iptables mode makes it for
		// kubelet's jumps when node ports stay off localhost); kubelet's,
		// and ours with its rule, guard route_localnet and stay.
		owns := ownedChain
		if name == "filter" && st.hasChain(chainFirewall) && !st.hasRulesIn(chainFirewall) {
			owns = func(c string) bool { return c == chainFirewall || ownedChain(c) }
		}
		var owned []string
		for _, c := range st.chains {
			if owns(c) {
				owned = append(owned, c)
			}
		}
		var dels []string
		for _, r := range st.rules {
			chain, _, _ := strings.Cut(strings.TrimPrefix(r, "-A "), " ")
			if owns(chain) {
				continue // goes with its chain
			}
			if i := strings.LastIndex(r, " -j "); i >= 0 {
				target, _, _ := strings.Cut(r[i+4:], " ")
				if owns(target) {
					dels = append(dels, "-D"+strings.TrimPrefix(r, "-A"))
				}
			}
		}
		if len(owned) == 0 && len(dels) == 0 {
			continue
		}
		buf.WriteString("*" + name + "\n")
		for _, d := range dels {
			buf.WriteString(d + "\n")
		}
		for _, c := range owned {
			buf.WriteString(chainLine(c) + "\n")
		}
		for _, c := range owned {
			buf.WriteString("-X " + c + "\n")
		}
		buf.WriteString("COMMIT\n")
	}
	return buf.Bytes()
}

func (st *savedTable) hasRulesIn(chain string) bool {
	for _, r := range st.rules {
		if strings.HasPrefix(r, "-A "+chain+" ") {
			return true
		}
	}
	return false
}

// hints are chains kubelet (and kube-proxy's image) create so that other
// programs can tell which backend the node uses.
var hints = []string{"KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"}

// detectBackend picks the backend the node already uses, as kube-proxy's
// image does with its iptables wrapper: the one holding kubelet's hint
// chains; failing that, the one holding more rules; nft when both are
// empty, as on any recent distribution. Like the wrapper, it reads both
// families' tables (iptables and ip6tables), so the proxies of a
// dual-stack node pick the same backend. A backend is usable only if the
// base tool's family works with it; the other family's tables only help
// to decide.
func detectBackend(ctx context.Context, base tool) (string, error) {
	counts := map[string]int{}
	for _, b := range []string{BackendNFT, BackendLegacy} {
		for _, ipv6 := range []bool{base.ipv6, !base.ipv6} {
			own := ipv6 == base.ipv6
			t := base
			t.backend, t.ipv6 = b, ipv6
			if !t.available() {
				if own {
					counts[b] = -1
					break
				}
				continue
			}
			out, err := t.save(ctx, "")
			if err != nil {
				if ctx.Err() != nil {
					// A stop, not a backend that does not work: the killed
					// iptables-save says nothing about the node.
					return "", fmt.Errorf("detecting the node's iptables backend: %w", context.Cause(ctx))
				}
				// Legacy tables may be unsupported by the kernel; that
				// backend is not in use then.
				if own {
					counts[b] = -1
					break
				}
				continue
			}
			for _, st := range parseSave(out) {
				for _, c := range st.chains {
					if slices.Contains(hints, c) {
						return b, nil
					}
				}
				counts[b] += len(st.rules)
			}
		}
	}
	switch {
	case counts[BackendNFT] < 0 && counts[BackendLegacy] < 0:
		return "", fmt.Errorf("neither %s nor %s works here: install iptables 1.8 or later",
			(&tool{backend: BackendNFT, ipv6: base.ipv6}).bin("restore"), (&tool{backend: BackendLegacy, ipv6: base.ipv6}).bin("restore"))
	case counts[BackendLegacy] > counts[BackendNFT]:
		return BackendLegacy, nil
	default:
		return BackendNFT, nil
	}
}
