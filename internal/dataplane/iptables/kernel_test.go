package iptables

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func TestMain(m *testing.M) { testnet.Main(m, nil) }

var backends = []string{BackendNFT, BackendLegacy}

// nodeNS is a network namespace of the test's own: every rule goes there,
// never into this machine's.
func nodeNS(t *testing.T) string {
	t.Helper()
	return "/run/netns/" + testnet.New(t).Node
}

func inNS(ns string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + ns, "--"}, args...)...)
}

func saveTables(t *testing.T, ns, backend string) string {
	t.Helper()
	out, err := inNS(ns, "iptables-"+backend+"-save").Output()
	if err != nil {
		t.Fatalf("iptables-%s-save: %v", backend, err)
	}
	return string(out)
}

// Every golden file is input the real iptables-restore accepts, with both
// backends, into a node's empty tables.
func TestKernelRestoreAcceptsGoldens(t *testing.T) {
	ns := nodeNS(t)
	goldens, err := filepath.Glob("testdata/*.golden")
	if err != nil || len(goldens) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	for _, b := range backends {
		for _, g := range goldens {
			t.Run(b+"/"+filepath.Base(g), func(t *testing.T) {
				data, err := os.ReadFile(g)
				if err != nil {
					t.Fatal(err)
				}
				restore := "iptables-" + b + "-restore"
				if strings.HasPrefix(filepath.Base(g), "ipv6-") {
					restore = "ip6tables-" + b + "-restore"
				}
				cmd := inNS(ns, restore, "--test", "--noflush")
				cmd.Stdin = bytes.NewReader(data)
				if out, err := cmd.CombinedOutput(); err != nil {
					t.Fatalf("%s --test rejected %s: %v\n%s", restore, g, err, out)
				}
			})
		}
	}
}

func sp(name, port string, proto model.Protocol, fe string, backends ...string) model.ServicePort {
	return apitest.ServicePort("default", name, port, proto, fe, backends...)
}

var snap = apitest.Snapshot

func open(t *testing.T, cfg Config) *Dataplane {
	t.Helper()
	d, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func mustSync(t *testing.T, d *Dataplane, s *model.Snapshot) {
	t.Helper()
	if err := d.Sync(context.Background(), s); err != nil {
		t.Fatalf("sync: %v", err)
	}
}

// perServiceChains lists the KUBE-SVC/SEP chains of a save dump.
func perServiceChains(save string) []string {
	var out []string
	for _, c := range parseSave([]byte(save))["nat"].chains {
		if isPerServiceChain(c) {
			out = append(out, c)
		}
	}
	return out
}

func TestKernelPartialSyncsAndStaleChains(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			ns := nodeNS(t)
			cfg := Config{Backend: b, NetNS: ns}
			d := open(t, cfg)
			a := sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080", "10.244.1.2:8080")
			bb := sp("b", "dns", model.UDP, "10.96.0.2:53", "10.244.1.3:53")
			mustSync(t, d, snap(true, a, bb))
			if got := len(perServiceChains(saveTables(t, ns, b))); got != 5 {
				t.Fatalf("%d per-service chains after the first sync, want 5 (2 SVC + 3 SEP)", got)
			}

			// One endpoint of a replaced: its old SEP chain goes, b is untouched.
			a2 := sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080", "10.244.1.9:8080")
			mustSync(t, d, snap(false, a2))
			save := saveTables(t, ns, b)
			if strings.Contains(save, endpointChain(a.Name, a.Backends[1])) {
				t.Errorf("removed endpoint's chain still there")
			}
			if !strings.Contains(save, "--to-destination 10.244.1.9:8080") || !strings.Contains(save, "--to-destination 10.244.1.3:53") {
				t.Errorf("new endpoint or untouched service missing:\n%s", save)
			}
			// The rule count (for kube-proxy's iptables_total metric)
			// includes the rules the partial sync left as they were.
			tables := parseSave([]byte(save))
			for table, n := range d.RuleCounts() {
				ours := 0
				for _, r := range tables[table].rules {
					if strings.HasPrefix(r, "-A KUBE-") {
						ours++
					}
				}
				if got := ours; got != n {
					t.Errorf("%s: counted %d rules, the table holds %d", table, n, got)
				}
			}
			// kube-proxy's iptables_last: what this sync wrote. The
			// partial sync left b's chains alone, and rewrote the filter
			// table.
			written, total := d.RulesWritten(), d.RuleCounts()
			if written["nat"] <= 0 || written["nat"] >= total["nat"] || written["filter"] != total["filter"] {
				t.Errorf("rules written by the partial sync %v, want fewer nat rules than in the table %v and every filter rule", written, total)
			}

			// a loses all endpoints: its chains go, a REJECT takes their place.
			mustSync(t, d, snap(false, sp("a", "http", model.TCP, "10.96.0.1:80")))
			save = saveTables(t, ns, b)
			if strings.Contains(save, serviceChain(a.Name)) {
				t.Errorf("chain of a service without endpoints still there")
			}
			if !strings.Contains(save, `"default/a:http has no endpoints"`) || !strings.Contains(save, "-j REJECT") {
				t.Errorf("no REJECT for a:\n%s", save)
			}

			// A new process converges by a full sync: b deleted meanwhile.
			d.Close()
			d2 := open(t, cfg)
			mustSync(t, d2, snap(true, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080")))
			mustSync(t, d2, snap(true, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080")))
			save = saveTables(t, ns, b)
			if got := perServiceChains(save); len(got) != 2 {
				t.Errorf("per-service chains after restart: %v, want a's two", got)
			}
			// Jumps are inserted once, however many full syncs run.
			if n := strings.Count(save, `-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`); n != 1 {
				t.Errorf("%d PREROUTING jumps, want 1:\n%s", n, save)
			}
		})
	}
}

// A partial sync without a full one before it is refused: the rules in
// the kernel are unknown, and writing only the changed services would
// drop the others from KUBE-SERVICES.
func TestPartialFirstIsRefused(t *testing.T) {
	d := &Dataplane{}
	if err := d.Sync(context.Background(), snap(false)); err == nil {
		t.Fatal("partial sync accepted before any full sync")
	}
}

// iptables-legacy serialises every writer with a flock on the xtables lock.
// A holder longer than the wait makes the sync fail and leaves the old
// rules in force; a shorter one is waited for.
func TestKernelHonoursXtablesLock(t *testing.T) {
	ns := nodeNS(t)
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	cfg := Config{Backend: BackendLegacy, NetNS: ns, LockFile: lock, LockWait: time.Second}
	d := open(t, cfg)
	old := sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080")
	mustSync(t, d, snap(true, old))

	fd, err := unix.Open(lock, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	err = d.Sync(context.Background(), snap(true, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.2:8080")))
	if err == nil || !strings.Contains(err.Error(), "xtables lock") {
		t.Fatalf("sync while another program holds the lock: %v, want an error naming the lock", err)
	}
	t.Logf("the error a user sees: %v", err)
	if save := saveTables(t, ns, BackendLegacy); !strings.Contains(save, "--to-destination 10.244.1.1:8080") {
		t.Errorf("the previous rules are not in force after the failed sync:\n%s", save)
	}

	// Released half-way through the wait: the sync waits and succeeds.
	go func() {
		time.Sleep(300 * time.Millisecond)
		_ = unix.Flock(fd, unix.LOCK_UN)
	}()
	mustSync(t, d, snap(true, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.2:8080")))
	if save := saveTables(t, ns, BackendLegacy); !strings.Contains(save, "--to-destination 10.244.1.2:8080") {
		t.Errorf("the sync after the lock was released did not apply:\n%s", save)
	}
}

func TestKernelAutoPicksTheBackendInUse(t *testing.T) {
	for _, c := range []struct {
		name  string
		setup []string
		want  string
	}{
		{"empty node", nil, BackendNFT},
		{"kubelet hint in legacy", []string{"iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"}, BackendLegacy},
		{"kubelet hint in nft", []string{"iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"}, BackendNFT},
		{"only legacy rules", []string{"iptables-legacy", "-A", "FORWARD", "-s", "192.0.2.1", "-j", "ACCEPT"}, BackendLegacy},
		// As kube-proxy's image wrapper, both families' tables count,
		// so that the IPv4 and IPv6 datapaths pick one backend.
		{"kubelet hint in ip6tables legacy", []string{"ip6tables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"}, BackendLegacy},
		{"only ip6tables legacy rules", []string{"ip6tables-legacy", "-A", "FORWARD", "-s", "2001:db8::1", "-j", "ACCEPT"}, BackendLegacy},
	} {
		for _, f := range model.Families {
			t.Run(c.name+"/"+f.String(), func(t *testing.T) {
				ns := nodeNS(t)
				if c.setup != nil {
					if out, err := inNS(ns, c.setup...).CombinedOutput(); err != nil {
						t.Fatalf("%v: %v: %s", c.setup, err, out)
					}
				}
				if got := open(t, Config{Family: f, Backend: BackendAuto, NetNS: ns}).Backend(); got != c.want {
					t.Errorf("auto picked %s, want %s", got, c.want)
				}
			})
		}
	}
}

// CleanupExcept (the ebpf mode's handover) stays within its family: the
// other family's rules are its own proxy's to take over.
func TestKernelCleanupExceptStaysInItsFamily(t *testing.T) {
	ns := nodeNS(t)
	mustSync(t, open(t, Config{Backend: BackendNFT, NetNS: ns}), snap(true, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080")))
	mustSync(t, open(t, Config{Family: model.IPv6, Backend: BackendNFT, NetNS: ns}),
		snap(true, sp("a", "http", model.TCP, "[fd00::1]:80", "[fd00:1::1]:8080")))
	if err := CleanupExcept(context.Background(), Config{Family: model.IPv6, NetNS: ns}, BackendLegacy); err != nil {
		t.Fatal(err)
	}
	if save := saveTables6(t, ns, BackendNFT); strings.Contains(save, "KUBE-SERVICES") {
		t.Errorf("the IPv6 rules stayed:\n%s", save)
	}
	if save := saveTables(t, ns, BackendNFT); !strings.Contains(save, "KUBE-SERVICES") {
		t.Errorf("the IPv6 handover removed the IPv4 rules:\n%s", save)
	}
}

// Cleanup removes our chains and jumps from both backends and nothing else.
func TestKernelCleanupRemovesBothBackendsOnly(t *testing.T) {
	ns := nodeNS(t)
	for _, b := range backends {
		mustSync(t, open(t, Config{Backend: b, NetNS: ns}), snap(true,
			sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080"), sp("e", "", model.TCP, "10.96.0.3:80")))
		if out, err := inNS(ns, "iptables-"+b, "-A", "FORWARD", "-s", "192.0.2.1", "-m", "comment", "--comment", "not ours", "-j", "ACCEPT").CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	if err := Cleanup(context.Background(), Config{NetNS: ns}); err != nil {
		t.Fatal(err)
	}
	for _, b := range backends {
		save := saveTables(t, ns, b)
		if strings.Contains(save, "KUBE-") {
			t.Errorf("%s: rules of ours left after cleanup:\n%s", b, save)
		}
		if !strings.Contains(save, `"not ours"`) {
			t.Errorf("%s: cleanup removed a rule that is not ours:\n%s", b, save)
		}
	}
	// Nothing left: a second cleanup is a no-op, not an error.
	if err := Cleanup(context.Background(), Config{NetNS: ns}); err != nil {
		t.Fatal(err)
	}
}

// Bit 0 is a valid masquerade bit, not "unset".
func TestMasqueradeBitZeroIsKept(t *testing.T) {
	ns := nodeNS(t)
	zero := 0
	for _, c := range []struct {
		bit  *int
		want string
	}{{nil, "0x00004000"}, {&zero, "0x00000001"}} {
		if got := open(t, Config{Backend: BackendNFT, NetNS: ns, MasqueradeBit: c.bit}).opts.masqMark; got != c.want {
			t.Errorf("masquerade bit %v: mark %s, want %s", c.bit, got, c.want)
		}
	}
}
