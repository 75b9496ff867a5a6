package ebpf

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

var errInjected = errors.New("injected fault")

// faultyOps does the swap's steps in the kernel, except the one numbered
// failAt (counting from 0), which fails. It records every step it is asked
// for, undo steps included.
type faultyOps struct {
	failAt int
	steps  []string
}

func (f *faultyOps) step(what string) error {
	f.steps = append(f.steps, what)
	if len(f.steps)-1 == f.failAt {
		return fmt.Errorf("%s: %w", what, errInjected)
	}
	return nil
}

func (f *faultyOps) attach(opts link.CgroupOptions) (link.Link, error) {
	if err := f.step("attach " + programName(opts.Program)); err != nil {
		return nil, err
	}
	return kernelSwapOps{}.attach(opts)
}

func (f *faultyOps) pin(obj pinnable, path string) error {
	if err := f.step("pin " + filepath.Base(path)); err != nil {
		return err
	}
	return kernelSwapOps{}.pin(obj, path)
}

func programName(p *ebpf.Program) string {
	info, err := p.Info()
	if err != nil {
		return "?"
	}
	return info.Name
}

// kernelState is what a failed swap must leave as it found it.
type kernelState struct {
	// pins maps each file under the pin directory to the object it pins.
	pins map[string]string
	// hooks maps each of our hooks to the programs attached to the test
	// cgroup there.
	hooks map[string][]ebpf.ProgramID
}

func (s *kernelSetup) kernelState(t *testing.T) kernelState {
	t.Helper()
	st := kernelState{pins: map[string]string{}, hooks: map[string][]ebpf.ProgramID{}}
	err := filepath.WalkDir(s.cfg.BPFFSPath, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(s.cfg.BPFFSPath, path)
		if l, err := link.LoadPinnedLink(path, nil); err == nil {
			defer l.Close()
			info, err := l.Info()
			if err != nil {
				return err
			}
			st.pins[rel] = fmt.Sprintf("link %d", info.ID)
			return nil
		}
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			return fmt.Errorf("%s pins neither a link nor a map: %w", rel, err)
		}
		defer m.Close()
		info, err := m.Info()
		if err != nil {
			return err
		}
		id, _ := info.ID()
		st.pins[rel] = fmt.Sprintf("map %d (%d entries)", id, m.MaxEntries())
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("reading pins: %v", err)
	}
	cg, err := os.Open(s.net.Cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	for _, p := range programs {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: p.attach})
		if err != nil {
			t.Fatalf("querying %s programs: %v", p.name, err)
		}
		for _, ap := range res.Programs {
			st.hooks[p.name] = append(st.hooks[p.name], ap.ID)
		}
	}
	return st
}

func (st kernelState) String() string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(st.pins)) {
		fmt.Fprintf(&b, "  pin %s: %s\n", k, st.pins[k])
	}
	for _, k := range slices.Sorted(maps.Keys(st.hooks)) {
		fmt.Fprintf(&b, "  hook %s: programs %v\n", k, st.hooks[k])
	}
	return b.String()
}

func (st kernelState) equal(o kernelState) bool {
	return maps.Equal(st.pins, o.pins) && maps.EqualFunc(st.hooks, o.hooks, slices.Equal)
}

// checkOneMapSet fails the test unless every program attached to the test
// cgroup reads the pinned maps, so all of them one set.
func (s *kernelSetup) checkOneMapSet(t *testing.T, st kernelState) {
	t.Helper()
	pinned := map[string]ebpf.MapID{}
	for _, m := range pinnedMaps {
		pm, err := ebpf.LoadPinnedMap(filepath.Join(s.cfg.BPFFSPath, m.name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		info, err := pm.Info()
		pm.Close()
		if err != nil {
			t.Fatal(err)
		}
		pinned[m.name], _ = info.ID()
	}
	for hook, ids := range st.hooks {
		for _, id := range ids {
			for name, mapID := range mapsReadBy(t, id) {
				// The read-only constants (kbp_have_*) are each
				// load's own, set from the kernel's features:
				// nothing is shared through them.
				if strings.HasSuffix(name, ".rodata") {
					continue
				}
				if pinned[name] != mapID {
					t.Errorf("the %s program %d reads %s %d, but the pinned %s is %d", hook, id, name, mapID, name, pinned[name])
				}
			}
		}
	}
}

// mapsReadBy names the maps a loaded program reads.
func mapsReadBy(t *testing.T, id ebpf.ProgramID) map[string]ebpf.MapID {
	t.Helper()
	prog, err := ebpf.NewProgramFromID(id)
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		t.Fatal(err)
	}
	ids, ok := info.MapIDs()
	if !ok {
		t.Fatal("the kernel does not list the maps of a program")
	}
	out := map[string]ebpf.MapID{}
	for _, mid := range ids {
		m, err := ebpf.NewMapFromID(mid)
		if err != nil {
			t.Fatal(err)
		}
		mi, err := m.Info()
		m.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[mi.Name] = mid
	}
	return out
}

// olderVersionHooks are hooks a version before AF_INET6 support did not
// have: a restart over its pins attaches them for the first time.
var olderVersionHooks = []string{"connect6", "recvmsg6", "getpeername6"}

// A start swaps the programs all or nothing: whichever single step of the
// swap fails, the kernel and the pins are left as they were (the same
// programs on every hook, each reading the pinned maps), the datapath that
// served before still serves, and a start without the fault then succeeds.
func TestKernelSwapIsAllOrNothing(t *testing.T) {
	for _, sc := range []struct {
		name string
		// prepare leaves what the start under test finds; it returns
		// the configuration to start with.
		prepare func(t *testing.T, s *kernelSetup) Config
		// served is whether a datapath serves before the start.
		served bool
	}{{
		name:    "fresh start",
		prepare: func(t *testing.T, s *kernelSetup) Config { return s.cfg },
	}, {
		name: "restart over an older version's pins",
		prepare: func(t *testing.T, s *kernelSetup) Config {
			s.serveWeb(t, s.cfg)
			for _, hook := range olderVersionHooks {
				// Detached at once: a link whose pin goes is released
				// asynchronously.
				pin := filepath.Join(s.cfg.BPFFSPath, linksDir, hook)
				l, err := link.LoadPinnedLink(pin, nil)
				if err != nil {
					t.Fatal(err)
				}
				if err := detach(l); err != nil {
					t.Fatal(err)
				}
				if err := os.Remove(pin); err != nil {
					t.Fatal(err)
				}
			}
			return s.cfg
		},
		served: true,
	}, {
		name: "capacity migration",
		prepare: func(t *testing.T, s *kernelSetup) Config {
			s.serveWeb(t, s.cfg)
			bigger := s.cfg
			bigger.MaxServices *= 2
			bigger.MaxBackends *= 2
			bigger.MaxSockets *= 2
			return bigger
		},
		served: true,
	}} {
		t.Run(sc.name, func(t *testing.T) {
			s := newKernelSetup(t, 2)
			s.dp.Close()
			prepared := func(t *testing.T) Config {
				t.Helper()
				if err := Cleanup(s.cfg.BPFFSPath); err != nil {
					t.Fatal(err)
				}
				return sc.prepare(t, s)
			}

			// A start without faults lists the steps, each of which then
			// fails in turn.
			counting := &faultyOps{failAt: -1}
			cfg := prepared(t)
			cfg.ops = counting
			dp, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			dp.Close()
			t.Logf("steps: %q", counting.steps)
			for i, step := range counting.steps {
				t.Run(fmt.Sprintf("%02d %s", i, step), func(t *testing.T) {
					cfg := prepared(t)
					before := s.kernelState(t)
					faulty := &faultyOps{failAt: i}
					cfg.ops = faulty
					dp, err := New(cfg)
					if err == nil {
						dp.Close()
					}
					if !errors.Is(err, errInjected) || !strings.Contains(err.Error(), "nothing was changed") {
						t.Fatalf("start failing at %q: %v; want the injected fault, undone", step, err)
					}
					t.Logf("the error a user sees: %v", err)
					after := s.kernelState(t)
					if !after.equal(before) {
						t.Errorf("a failed start changed the datapath (steps %q)\nbefore:\n%safter:\n%s", faulty.steps, before, after)
					}
					s.checkOneMapSet(t, after)
					if sc.served {
						s.expectServed(t, "after the failed start", "tcp", vip+":80")
					}

					cfg.ops = nil
					dp, err = New(cfg)
					if err != nil {
						t.Fatalf("a start without the fault: %v", err)
					}
					defer dp.Close()
					if !sc.served {
						if err := dp.Sync(t.Context(), snapshot(true,
							servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...))); err != nil {
							t.Fatal(err)
						}
					}
					s.expectServed(t, "after a start without the fault", "tcp", vip+":80")
					s.expectServed(t, "after a start without the fault", "tcp6", mappedVIP+":80")
					st := s.kernelState(t)
					for _, p := range programs {
						if len(st.hooks[p.name]) != 1 {
							t.Errorf("%s: %d programs attached, want 1", p.name, len(st.hooks[p.name]))
						}
					}
					s.checkOneMapSet(t, st)
					for name, want := range map[string]uint32{lbMapKbpServices: cfg.withDefaults().MaxFrontends, lbMapKbpBackends: cfg.MaxBackends, lbMapKbpRevnat: cfg.MaxSockets} {
						if got := pinnedCapacity(t, cfg.BPFFSPath, name); got != want {
							t.Errorf("pinned %s holds %d entries, want %d", name, got, want)
						}
					}
				})
			}
		})
	}
}

// expectServed fails the test unless connects to addr from client reach
// the backends.
func (s *kernelSetup) expectServed(t *testing.T, phase, client, addr string) {
	t.Helper()
	if got := testnet.Tally(s.run(t, client, addr, "4")); got["ok pod-0"]+got["ok pod-1"] != 4 {
		t.Errorf("%s: %s %s: %v, want answers from pod-0 and pod-1", phase, client, addr, got)
	}
}

// serveWeb starts a datapath with cfg that serves web on the VIP, and
// closes it: its pins serve on.
func (s *kernelSetup) serveWeb(t *testing.T, cfg Config) {
	t.Helper()
	dp, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	if err := dp.Sync(t.Context(), snapshot(true,
		servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...))); err != nil {
		t.Fatal(err)
	}
}

// baseCapabilities are the capabilities the manifests' base gives the
// proxy container, what both modes get.
func baseCapabilities(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "..", "manifests", "base", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(data, &ds); err != nil {
		t.Fatal(err)
	}
	var caps []string
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.SecurityContext != nil && c.SecurityContext.Capabilities != nil {
			for _, a := range c.SecurityContext.Capabilities.Add {
				caps = append(caps, string(a))
			}
		}
	}
	if len(caps) == 0 {
		t.Fatal("no capabilities in the base DaemonSet")
	}
	return caps
}

// A restart replaces an earlier run's programs with only the capabilities
// of the DaemonSet's base (no SYS_ADMIN, without which a program or link
// can be opened by its id only from a pin; the ebpf overlay adds it for
// another purpose, and an operator may well drop it).
func TestKernelRestartWithDaemonSetCapabilities(t *testing.T) {
	s := newKernelSetup(t, 2)
	web := servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods...)...)
	s.sync(t, snapshot(true, web))
	s.dp.Close()
	before := s.kernelState(t)

	caps := baseCapabilities(t)
	set := "-all"
	for _, c := range caps {
		set += ",+" + strings.ToLower(c)
	}
	t.Logf("capabilities: %s", set)
	restricted := append([]string{"setpriv", "--inh-caps=" + set, "--ambient-caps=" + set, "--bounding-set=" + set},
		s.holdArgs(t, servicePort("default", "web", "http", model.TCP, vip+":80", s.backends(8080, s.pods[1])...))...)
	testnet.Stop(s.client.Start(false, restricted...)) // returns once the helper served

	after := s.kernelState(t)
	for _, p := range programs {
		if len(after.hooks[p.name]) != 1 || slices.Equal(after.hooks[p.name], before.hooks[p.name]) {
			t.Errorf("%s: programs %v after the restart, %v before; want one new one", p.name, after.hooks[p.name], before.hooks[p.name])
		}
	}
	s.checkOneMapSet(t, after)
	if got := testnet.Tally(s.run(t, "tcp", vip+":80", "4")); got["ok pod-1"] != 4 {
		t.Errorf("after the restart: %v, want pod-1 only", got)
	}
}
