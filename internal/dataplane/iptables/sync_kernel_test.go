package iptables

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// traceCommands puts wrappers of the iptables commands first in PATH,
// which log each run ("name args...") before running the real one, and
// returns a function that reads and clears the log.
func traceCommands(t *testing.T) func() []string {
	t.Helper()
	dir := t.TempDir()
	log := filepath.Join(dir, "log")
	for _, b := range backends {
		for _, name := range []string{"iptables-" + b, "iptables-" + b + "-save", "iptables-" + b + "-restore"} {
			real, err := exec.LookPath(name)
			if err != nil {
				t.Skipf("%s: %v", name, err)
			}
			script := "#!/bin/sh\necho \"" + name + " $*\" >> " + log + "\nexec " + real + " \"$@\"\n"
			if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	return func() []string {
		data, _ := os.ReadFile(log)
		_ = os.Remove(log)
		return strings.Fields(strings.ReplaceAll(strings.TrimSpace(string(data)), " ", "_"))
	}
}

// As kube-proxy v1.36 (syncProxyRules: iptables-save of the nat table,
// and of filter for its chains; ipt.Monitor: `iptables -w 5 -t TABLE -S
// KUBE-PROXY-CANARY`): a full sync reads only the tables it parses, with
// -t; a partial sync reads nothing; a sync with nothing to do runs
// nothing; the periodic check lists the canary in mangle alone.
func TestKernelSyncsRunOnlyWhatTheyNeed(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			ns := nodeNS(t)
			trace := traceCommands(t)
			d := open(t, Config{Backend: b, NetNS: ns})
			trace()
			a := sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080")
			mustSync(t, d, snap(true, a))
			want := []string{"iptables-" + b + "-save_-t_nat", "iptables-" + b + "-save_-t_filter",
				"iptables-" + b + "-restore_--noflush_--counters_-w_5"}
			if got := trace(); !slices.Equal(got, want) {
				t.Errorf("full sync ran %q, want %q", got, want)
			}
			mustSync(t, d, snap(false, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.2:8080")))
			if got := trace(); !slices.Equal(got, want[2:]) {
				t.Errorf("partial sync ran %q, want %q", got, want[2:])
			}
			if d.LargeCluster() {
				t.Error("two endpoints make a large cluster")
			}
			mustSync(t, d, snap(false))
			if got := trace(); len(got) != 0 {
				t.Errorf("sync without changes ran %q, want nothing", got)
			}
			if ok, err := d.Intact(context.Background()); !ok || err != nil {
				t.Fatalf("Intact after a full sync: %v, %v", ok, err)
			}
			want = []string{"iptables-" + b + "_-w_5_-t_mangle_-S_KUBE-PROXY-CANARY"}
			if got := trace(); !slices.Equal(got, want) {
				t.Errorf("check ran %q, want %q", got, want)
			}
		})
	}
}

// A firewall manager's reload (every chain of every table deleted)
// removes the canary: Intact says so, and the full sync it leads to restores every
// rule, the jumps from the built-in chains included. The eBPF mode's
// packet layer has its own canary, in nat and filter.
func TestKernelCanaryDetectsFlush(t *testing.T) {
	for _, b := range backends {
		for _, externalOnly := range []bool{false, true} {
			name := b
			if externalOnly {
				name += "/packet-layer"
			}
			t.Run(name, func(t *testing.T) {
				ns := nodeNS(t)
				d := open(t, Config{Backend: b, NetNS: ns, ExternalOnly: externalOnly})
				a := sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080")
				a.External.NodePort = 30080
				s := snap(true, a)
				s.Node.AllLocalAddresses = true
				mustSync(t, d, s)
				// nat and filter: flushing mangle makes it appear where
				// the packet layer wrote nothing.
				natFilter := func() []string {
					var all string
					for _, table := range []string{"nat", "filter"} {
						out, err := inNS(ns, "iptables-"+b+"-save", "-t", table).Output()
						if err != nil {
							t.Fatal(err)
						}
						all += string(out)
					}
					return normalised(all)
				}
				before := natFilter()
				if ok, err := d.Intact(context.Background()); !ok || err != nil {
					t.Fatalf("Intact after a full sync: %v, %v", ok, err)
				}
				canary := canaryChain(externalOnly)
				if externalOnly && strings.Contains(saveTables(t, ns, b), "KUBE-PROXY-CANARY") {
					t.Error("the packet layer wrote kube-proxy's canary")
				}
				for _, table := range []string{"mangle", "nat", "filter"} {
					for _, op := range []string{"-F", "-X"} {
						if out, err := inNS(ns, "iptables-"+b, "-t", table, op).CombinedOutput(); err != nil {
							t.Fatalf("iptables -t %s %s: %v\n%s", table, op, err, out)
						}
					}
				}
				ok, err := d.Intact(context.Background())
				if ok || err != nil {
					t.Fatalf("Intact after the chains were deleted: %v, %v; want false (%s gone)", ok, err, canary)
				}
				s = snap(true, a)
				s.Node.AllLocalAddresses = true
				mustSync(t, d, s)
				if after := natFilter(); !slices.Equal(before, after) {
					t.Errorf("the full sync after the flush did not restore the rules:\n%s", lineDiff(before, after))
				}
				if ok, err := d.Intact(context.Background()); !ok || err != nil {
					t.Errorf("Intact after the repairing sync: %v, %v", ok, err)
				}
			})
		}
	}
}

// As kube-proxy's Monitor: a check that finds mangle's canary gone while
// nat's and filter's are still there (a firewall manager's reload halfway)
// waits for them to go too before it reports the flush, so the full sync
// it leads to does not run before the reload has deleted everything.
func TestKernelCanaryWaitsForTheWholeReload(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			ns := nodeNS(t)
			trace := traceCommands(t)
			d := open(t, Config{Backend: b, NetNS: ns})
			// Long enough that the test, not the wait's end, finishes
			// the reload.
			d.flushWait = time.Minute
			mustSync(t, d, snap(true, sp("a", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080")))
			deleteCanary := func(table string) {
				t.Helper()
				if out, err := inNS(ns, "iptables-"+b, "-t", table, "-X", chainCanary).CombinedOutput(); err != nil {
					t.Fatalf("iptables -t %s -X: %v\n%s", table, err, out)
				}
			}
			deleteCanary("mangle")
			trace()
			type result struct {
				ok  bool
				err error
			}
			done := make(chan result, 1)
			go func() {
				ok, err := d.Intact(context.Background())
				done <- result{ok, err}
			}()
			// The check lists nat's canary, still there, before the
			// reload deletes it.
			listedNat := false
			for !listedNat {
				select {
				case r := <-done:
					t.Fatalf("Intact returned %v, %v with nat's and filter's canaries still there, want it to wait for them", r.ok, r.err)
				case <-time.After(20 * time.Millisecond):
				}
				listedNat = slices.ContainsFunc(trace(), func(c string) bool { return strings.Contains(c, "-t_nat_-S_"+chainCanary) })
			}
			deleteCanary("nat")
			deleteCanary("filter")
			if r := <-done; r.ok || r.err != nil {
				t.Errorf("Intact after the reload deleted every canary: %v, %v, want false", r.ok, r.err)
			}
		})
	}
}

// A change of the node's addresses in a partial sync rewrites only what
// reads them (the top-level chains, which every sync rewrites, and the
// chains of ports with source ranges, whose firewall chain admits the load
// balancer IPs when a range holds a node address), and leaves the rules a
// full sync for the new node would write.
func TestKernelNodeChangeInPartialSync(t *testing.T) {
	node := func(addrs ...string) model.NodeInfo {
		var n model.NodeInfo
		for _, a := range addrs {
			n.LocalAddresses = append(n.LocalAddresses, netip.MustParseAddr(a))
			n.NodePortAddresses = append(n.NodePortAddresses, netip.MustParseAddr(a))
		}
		return n
	}
	plain := sp("plain", "http", model.TCP, "10.96.0.1:80", "10.244.1.1:8080", "10.244.1.2:8080")
	plain.External.NodePort = 30080
	fw := sp("fw", "http", model.TCP, "10.96.0.2:80", "10.244.1.3:8080")
	fw.External.LoadBalancerIPs = []netip.Addr{netip.MustParseAddr("192.0.2.10")}
	fw.External.SourceRanges = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}
	fw.External.NodePort = 30081
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			ns := nodeNS(t)
			d := open(t, Config{Backend: b, NetNS: ns, LocalhostNodePorts: new(bool)})
			first := snap(true, plain, fw)
			first.Node = node("10.0.0.1")
			mustSync(t, d, first)

			// The node moves out of the source range: its load
			// balancer IPs are no longer admitted as sources.
			moved := snap(false)
			moved.Node = node("172.16.0.1")
			mustSync(t, d, moved)
			input := d.buf.String()
			fwChains := chainsOf(&fw, false)
			if !strings.Contains(input, chainLine(fwChains.fw)) {
				t.Errorf("the firewall chain %s was not rewritten:\n%s", fwChains.fw, input)
			}
			// (The port's other chains go with its firewall chain: a
			// sync writes a port's chains together.)
			for _, c := range chainsOf(&plain, false).names() {
				if strings.Contains(input, chainLine(c)) {
					t.Errorf("chain %s, which does not read the node, was rewritten", c)
				}
			}
			if !strings.Contains(input, "-d 172.16.0.1/32 -j KUBE-NODEPORTS") && !strings.Contains(input, "-d 172.16.0.1 -j KUBE-NODEPORTS") {
				t.Errorf("node ports not served on the new address:\n%s", input)
			}
			got := normalised(saveTables(t, ns, b))

			// What a fresh full sync for that node writes.
			ns2 := nodeNS(t)
			d2 := open(t, Config{Backend: b, NetNS: ns2, LocalhostNodePorts: new(bool)})
			full := snap(true, plain, fw)
			full.Node = node("172.16.0.1")
			mustSync(t, d2, full)
			if want := normalised(saveTables(t, ns2, b)); !slices.Equal(want, got) {
				t.Errorf("rules after the partial node change differ from a full sync's:\n%s", lineDiff(want, got))
			}
		})
	}
}
