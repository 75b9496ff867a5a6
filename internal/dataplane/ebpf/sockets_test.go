package ebpf

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/sockdiag"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/apitest"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// fakeNetNS is one network namespace's sockets.
type fakeNetNS struct {
	sockets []sockdiag.Socket
	openErr error
	listErr error
	// destroyErr fails the destroy of the socket with that cookie.
	destroyErr map[uint64]error
}

// fakeSocketHost records what the cleanup opened and destroyed.
type fakeSocketHost struct {
	names       []string // the node's first
	ns          map[string]*fakeNetNS
	unsupported bool
	listErr     error

	opened    []string
	destroyed []string // "ns cookie"
	// filters are the peers each dump asked for, "ns [peers]"; "ns all"
	// for every connected socket.
	filters []string
}

func newFakeSocketHost(names ...string) *fakeSocketHost {
	h := &fakeSocketHost{names: names, ns: make(map[string]*fakeNetNS)}
	for _, n := range names {
		h.ns[n] = &fakeNetNS{}
	}
	return h
}

func (h *fakeSocketHost) netNamespaces() ([]string, error) {
	if h.listErr != nil {
		return h.names[:1], h.listErr
	}
	return h.names, nil
}

func (h *fakeSocketHost) open(ns string) (socketTable, error) {
	h.opened = append(h.opened, ns)
	if err := h.ns[ns].openErr; err != nil {
		return nil, err
	}
	return &fakeTable{host: h, name: ns}, nil
}

type fakeTable struct {
	host *fakeSocketHost
	name string
}

func (t *fakeTable) ConnectedUDPTo(peers []netip.AddrPort) ([]sockdiag.Socket, error) {
	ns := t.host.ns[t.name]
	if peers == nil {
		t.host.filters = append(t.host.filters, t.name+" all")
		return slices.Clone(ns.sockets), ns.listErr
	}
	t.host.filters = append(t.host.filters, fmt.Sprintf("%s %v", t.name, peers))
	var out []sockdiag.Socket
	for _, s := range ns.sockets {
		if slices.Contains(peers, netip.AddrPortFrom(s.Remote.Addr().Unmap(), s.Remote.Port())) {
			out = append(out, s)
		}
	}
	return out, ns.listErr
}

func (t *fakeTable) DestroyUDP(s sockdiag.Socket) error {
	ns := t.host.ns[t.name]
	if err := ns.destroyErr[s.Cookie]; err != nil {
		return err
	}
	t.host.destroyed = append(t.host.destroyed, fmt.Sprintf("%s %d", t.name, s.Cookie))
	ns.sockets = slices.DeleteFunc(ns.sockets, func(o sockdiag.Socket) bool { return o.Cookie == s.Cookie })
	return nil
}

func (t *fakeTable) UDPDestroySupported() (bool, error) { return !t.host.unsupported, nil }
func (t *fakeTable) Close() error                       { return nil }

// fakeRevnat is kbp_revnat: {cookie, backend} -> frontend.
type fakeRevnat map[string]netip.AddrPort

func (f fakeRevnat) record(cookie uint64, backend, frontend string) {
	f[fmt.Sprintf("%d %s", cookie, backend)] = netip.MustParseAddrPort(frontend)
}

func (f fakeRevnat) lookup(cookie uint64, backend netip.AddrPort) (netip.AddrPort, bool, error) {
	fe, ok := f[fmt.Sprintf("%d %s", cookie, backend)]
	return fe, ok, nil
}

func (f fakeRevnat) scan(fn func(cookie uint64, backend, frontend netip.AddrPort)) error {
	for k, fe := range f {
		c, b, _ := strings.Cut(k, " ")
		cookie, err := strconv.ParseUint(c, 10, 64)
		if err != nil {
			return err
		}
		fn(cookie, netip.MustParseAddrPort(b), fe)
	}
	return nil
}

func udpSocket(cookie uint64, remote string) sockdiag.Socket {
	return sockdiag.Socket{Family: unix.AF_INET, Local: netip.MustParseAddrPort("10.244.0.100:40000"),
		Remote: netip.MustParseAddrPort(remote), Cookie: cookie}
}

const (
	dnsVIP   = "10.96.0.10:53"
	otherVIP = "10.96.0.11:53"
)

func dnsPort(backends ...string) model.ServicePort {
	return servicePort("kube-system", "dns", "dns", model.UDP, dnsVIP, backends...)
}

func checkKeys(c udpCheck) []string {
	var out []string
	for fe, fc := range c {
		var s []string
		for b := range fc.serving {
			s = append(s, b.String())
		}
		slices.Sort(s)
		line := fmt.Sprintf("%s %v", fe, s)
		if fc.fresh {
			line += " fresh"
		}
		out = append(out, line)
	}
	slices.Sort(out)
	return out
}

func TestPlanChecksNewAndChangedUDPFrontends(t *testing.T) {
	tcp := servicePort("default", "web", "http", model.TCP, "10.96.0.12:80", "10.244.1.1:8080")
	other := servicePort("default", "stats", "udp", model.UDP, otherVIP, "10.244.3.1:8125")
	for _, tc := range []struct {
		name   string
		before *model.Snapshot // applied first; nil for none
		snap   *model.Snapshot
		failed []model.Frontend
		want   []string
	}{
		{
			name: "the first sync checks every UDP frontend with a serving endpoint",
			snap: snapshot(true, dnsPort("10.244.1.1:53"), other, tcp,
				servicePort("default", "empty", "udp", model.UDP, "10.96.0.13:53")),
			want: []string{"10.96.0.10:53 [10.244.1.1:53] fresh", "10.96.0.11:53 [10.244.3.1:8125] fresh"},
		},
		{
			name:   "a full sync of an unchanged cluster checks nothing",
			before: snapshot(true, dnsPort("10.244.1.1:53"), other, tcp),
			snap: snapshot(true, dnsPort("10.244.1.1:53"), other, tcp,
				servicePort("default", "empty", "udp", model.UDP, "10.96.0.13:53")),
		},
		{
			name:   "a full sync checks what changed",
			before: snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53"), other),
			snap:   snapshot(true, dnsPort("10.244.1.2:53"), other),
			want:   []string{"10.96.0.10:53 [10.244.1.2:53]"},
		},
		{
			name:   "a full sync checks a Service that came back as new",
			before: snapshot(true, other),
			snap:   snapshot(true, dnsPort("10.244.1.1:53"), other),
			want:   []string{"10.96.0.10:53 [10.244.1.1:53] fresh"},
		},
		{
			name:   "partial sync without a UDP change checks nothing",
			before: snapshot(true, dnsPort("10.244.1.1:53"), other, tcp),
			snap:   snapshot(false, dnsPort("10.244.1.1:53"), servicePort("default", "web", "http", model.TCP, "10.96.0.12:80")),
		},
		{
			name:   "a removed endpoint",
			before: snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53"), other),
			snap:   snapshot(false, dnsPort("10.244.1.2:53")),
			want:   []string{"10.96.0.10:53 [10.244.1.2:53]"},
		},
		{
			name:   "an endpoint going terminating while it serves keeps its sockets",
			before: snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53")),
			snap:   snapshot(false, apitest.WithServing(dnsPort("10.244.1.2:53"), "10.244.1.1:53", "10.244.1.2:53")),
		},
		{
			name:   "an added endpoint",
			before: snapshot(true, dnsPort("10.244.1.1:53")),
			snap:   snapshot(false, dnsPort("10.244.1.1:53", "10.244.1.2:53")),
			want:   []string{"10.96.0.10:53 [10.244.1.1:53 10.244.1.2:53]"},
		},
		{
			name: "a new frontend: sockets may have connected to its VIP before",
			snap: snapshot(false, dnsPort("10.244.1.1:53")),
			want: []string{"10.96.0.10:53 [10.244.1.1:53] fresh"},
		},
		{
			name:   "a frontend given its first serving endpoint: sockets may have connected to its VIP before",
			before: snapshot(true, dnsPort()),
			snap:   snapshot(false, dnsPort("10.244.1.1:53")),
			want:   []string{"10.96.0.10:53 [10.244.1.1:53] fresh"},
		},
		{
			name:   "a frontend losing its last serving endpoint is left alone",
			before: snapshot(true, dnsPort("10.244.1.1:53")),
			snap:   snapshot(false, dnsPort()),
		},
		{
			name:   "a deleted Service is left alone",
			before: snapshot(true, dnsPort("10.244.1.1:53")),
			snap:   withDeleted(snapshot(false), model.ServiceName{Namespace: "kube-system", Name: "dns"}),
		},
		{
			name:   "a node port's frontends are checked with the ClusterIP",
			before: onNode(testNode, true, dnsPort("10.244.1.1:53", "10.244.1.2:53")),
			snap:   onNode(testNode, false, withNodePort(dnsPort("10.244.1.2:53"), 30053)),
			want: []string{"10.0.0.1:30053 [10.244.1.2:53] fresh", "10.0.0.2:30053 [10.244.1.2:53] fresh",
				"10.96.0.10:53 [10.244.1.2:53]", "127.0.0.1:30053 [10.244.1.2:53] fresh"},
		},
		{
			name:   "an unchanged node port is not checked again",
			before: onNode(testNode, true, withNodePort(dnsPort("10.244.1.1:53"), 30053)),
			snap:   onNode(testNode, false, withNodePort(dnsPort("10.244.1.1:53"), 30053), tcp),
		},
		{
			name:   "a port that failed is skipped, with its node port",
			before: onNode(testNode, true, withNodePort(dnsPort("10.244.1.1:53", "10.244.1.2:53"), 30053), other),
			snap: onNode(testNode, true, withNodePort(dnsPort("10.244.1.2:53"), 30053),
				servicePort("default", "stats", "udp", model.UDP, otherVIP, "10.244.3.2:8125")),
			failed: []model.Frontend{dnsPort().ClusterIP},
			want:   []string{"10.96.0.11:53 [10.244.3.2:8125]"},
		},
		{
			name:   "a port that failed is skipped",
			before: snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53"), other),
			snap:   snapshot(true, dnsPort("10.244.1.2:53"), servicePort("default", "stats", "udp", model.UDP, otherVIP, "10.244.3.2:8125")),
			failed: []model.Frontend{dnsPort().ClusterIP},
			want:   []string{"10.96.0.11:53 [10.244.3.2:8125]"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newUDPSocketCleaner(nil, nil, newEventCounts())
			if tc.before != nil {
				// Twice: the second full sync rechecks what the first
				// checked, and leaves nothing to recheck.
				c.plan(tc.before, nil)
				c.plan(tc.before, nil)
			}
			failed := make(map[model.Frontend]bool)
			for _, fe := range tc.failed {
				failed[fe] = true
			}
			if got := checkKeys(c.plan(tc.snap, failed)); !slices.Equal(got, tc.want) {
				t.Errorf("checked %v, want %v", got, tc.want)
			}
		})
	}
}

// A full sync checks once more, not fresh, the frontends checked since the
// last one: a socket whose kbp_revnat entry landed after that cleanup read
// the map is found then, though the frontend did not change again.
func TestPlanRechecksAtTheNextFullSync(t *testing.T) {
	c := newUDPSocketCleaner(nil, nil, newEventCounts())
	other := servicePort("default", "stats", "udp", model.UDP, otherVIP, "10.244.3.1:8125")
	c.plan(snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53"), other), nil)
	c.plan(snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53"), other), nil)
	shrunk := snapshot(false, dnsPort("10.244.1.2:53"))
	if got := checkKeys(c.plan(shrunk, nil)); !slices.Equal(got, []string{"10.96.0.10:53 [10.244.1.2:53]"}) {
		t.Fatalf("the partial sync checked %v", got)
	}
	full := snapshot(true, dnsPort("10.244.1.2:53"), other)
	if got := checkKeys(c.plan(full, nil)); !slices.Equal(got, []string{"10.96.0.10:53 [10.244.1.2:53]"}) {
		t.Errorf("the next full sync checked %v, want the frontend the partial one checked, again", got)
	}
	if got := c.plan(full, nil); len(got) != 0 {
		t.Errorf("the full sync after checked %v, want nothing: once more is enough", checkKeys(got))
	}
}

// A port that failed is forgotten, so the sync that applies it checks it,
// partial or not.
func TestPlanChecksAFailedPortOnceApplied(t *testing.T) {
	c := newUDPSocketCleaner(nil, nil, newEventCounts())
	c.plan(snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53")), nil)
	shrunk := snapshot(false, dnsPort("10.244.1.2:53"))
	if got := c.plan(shrunk, map[model.Frontend]bool{dnsPort().ClusterIP: true}); len(got) != 0 {
		t.Fatalf("checked a failed port: %v", checkKeys(got))
	}
	// Unknown since it failed: fresh.
	if got := checkKeys(c.plan(shrunk, nil)); !slices.Equal(got, []string{"10.96.0.10:53 [10.244.1.2:53] fresh"}) {
		t.Errorf("the retry checked %v", got)
	}
	if got := c.plan(shrunk, nil); len(got) != 0 {
		t.Errorf("an unchanged port checked again: %v", checkKeys(got))
	}
}

// After a sync that failed as a whole, nothing is known: the next sync
// checks what it carries.
func TestPlanAfterForgetChecksEverything(t *testing.T) {
	c := newUDPSocketCleaner(nil, nil, newEventCounts())
	c.plan(snapshot(true, dnsPort("10.244.1.1:53")), nil)
	c.forget()
	if got := c.plan(snapshot(false, dnsPort("10.244.1.1:53")), nil); len(got) != 1 {
		t.Errorf("checked %v after forgetting, want the frontend", checkKeys(got))
	}
}

func TestMatch(t *testing.T) {
	check := make(udpCheck)
	check.add(dnsPort().ClusterIP, dnsPort("10.244.1.2:53", "10.244.1.3:53").Serving, true)
	check.add(servicePort("default", "stats", "udp", model.UDP, "10.96.0.12:53").ClusterIP,
		dnsPort("10.244.1.2:53").Serving, false)
	revnat := fakeRevnat{}
	revnat.record(1, "10.244.1.1:53", dnsVIP)   // translated to a removed backend
	revnat.record(2, "10.244.1.2:53", dnsVIP)   // translated to a serving one
	revnat.record(3, "10.244.1.1:53", otherVIP) // from a frontend not checked
	revnat.record(4, "10.244.1.1:53", dnsVIP)
	for _, tc := range []struct {
		name   string
		s      sockdiag.Socket
		reason string
	}{
		{"translated to a backend no longer serving", udpSocket(1, "10.244.1.1:53"), "backend no longer serving"},
		{"translated to a serving backend", udpSocket(2, "10.244.1.2:53"), ""},
		{"translated from a frontend not checked", udpSocket(3, "10.244.1.1:53"), ""},
		{"connected to the VIP", udpSocket(5, dnsVIP), "connected to the frontend untranslated"},
		{"connected to the VIP on another port", udpSocket(5, "10.96.0.10:54"), ""},
		{"connected to a frontend that is not fresh", udpSocket(5, "10.96.0.12:53"), ""},
		{"connected to the removed pod directly", udpSocket(6, "10.244.1.1:53"), ""},
		{"IPv6 socket translated, v4-mapped", sockdiag.Socket{Family: unix.AF_INET6, Cookie: 4,
			Local: netip.MustParseAddrPort("[::ffff:10.244.0.100]:40000"), Remote: netip.MustParseAddrPort("[::ffff:10.244.1.1]:53")},
			"backend no longer serving"},
		{"IPv6 socket connected to the v4-mapped VIP", sockdiag.Socket{Family: unix.AF_INET6, Cookie: 7,
			Local: netip.MustParseAddrPort("[::ffff:10.244.0.100]:40000"), Remote: netip.MustParseAddrPort("[::ffff:10.96.0.10]:53")},
			"connected to the frontend untranslated"},
		{"IPv6 peer", sockdiag.Socket{Family: unix.AF_INET6, Cookie: 8,
			Local: netip.MustParseAddrPort("[fd00::1]:40000"), Remote: netip.MustParseAddrPort("[fd00::2]:53")}, ""},
		{"no peer (unconnected)", sockdiag.Socket{Family: unix.AF_INET, Cookie: 1,
			Local: netip.MustParseAddrPort("0.0.0.0:40000"), Remote: netip.MustParseAddrPort("0.0.0.0:0")}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newUDPSocketCleaner(nil, revnat.lookup, newEventCounts())
			_, reason, err := c.match(check, tc.s, false, c.revnat)
			if err != nil {
				t.Fatal(err)
			}
			if reason != tc.reason {
				t.Errorf("reason %q, want %q", reason, tc.reason)
			}
		})
	}
}

// cleanerSetup is a cleaner over a node and two pods; pod-a's client was
// translated to 10.244.1.1:53, which is removed.
type cleanerSetup struct {
	host   *fakeSocketHost
	revnat fakeRevnat
	events *eventCounts
	c      *udpSocketCleaner
	check  udpCheck
}

func newCleanerSetup() *cleanerSetup {
	s := &cleanerSetup{host: newFakeSocketHost("node", "pod-a", "pod-b"), events: newEventCounts()}
	revnat := fakeRevnat{}
	revnat.record(1, "10.244.1.1:53", dnsVIP)
	revnat.record(2, "10.244.1.1:53", dnsVIP)
	revnat.record(3, "10.244.1.1:53", dnsVIP)
	s.host.ns["node"].sockets = []sockdiag.Socket{udpSocket(1, "10.244.1.1:53")}
	s.host.ns["pod-a"].sockets = []sockdiag.Socket{udpSocket(2, "10.244.1.1:53"), udpSocket(9, "10.244.1.2:53")}
	s.host.ns["pod-b"].sockets = []sockdiag.Socket{udpSocket(3, "10.244.1.1:53")}
	s.revnat = revnat
	// Through s, so that a test may replace the map.
	s.c = newUDPSocketCleaner(s.host, func(cookie uint64, backend netip.AddrPort) (netip.AddrPort, bool, error) {
		return s.revnat.lookup(cookie, backend)
	}, s.events)
	s.c.scan = func(fn func(uint64, netip.AddrPort, netip.AddrPort)) error { return s.revnat.scan(fn) }
	s.check = make(udpCheck)
	s.check.add(dnsPort().ClusterIP, dnsPort("10.244.1.2:53").Serving, false)
	return s
}

func (s *cleanerSetup) counts() map[string]uint64 {
	out := make(map[string]uint64)
	s.events.copyTo(out)
	for k, v := range out {
		if v == 0 {
			delete(out, k)
		}
	}
	return out
}

func TestCleanDestroysStaleSocketsInEveryNamespace(t *testing.T) {
	s := newCleanerSetup()
	s.c.clean(s.check, nil)
	if want := []string{"node 1", "pod-a 2", "pod-b 3"}; !slices.Equal(s.host.destroyed, want) {
		t.Errorf("destroyed %v, want %v", s.host.destroyed, want)
	}
	if got := s.counts(); got[eventUDPSocketsDestroyed] != 3 || len(got) != 1 {
		t.Errorf("events %v, want 3 sockets destroyed and nothing else", got)
	}
}

// The cleanup reads kbp_revnat whole once and matches the sockets it lists
// against what it read: no lookup per socket.
func TestCleanLooksUpNoSocketAfterTheScan(t *testing.T) {
	s := newCleanerSetup()
	lookups := 0
	s.c.revnat = func(cookie uint64, backend netip.AddrPort) (netip.AddrPort, bool, error) {
		lookups++
		return s.revnat.lookup(cookie, backend)
	}
	s.c.clean(s.check, nil)
	if want := []string{"node 1", "pod-a 2", "pod-b 3"}; !slices.Equal(s.host.destroyed, want) {
		t.Errorf("destroyed %v, want %v", s.host.destroyed, want)
	}
	if lookups != 0 {
		t.Errorf("%d kbp_revnat lookups after reading it whole, want 0", lookups)
	}
}

func TestCleanWithNothingToCheckOpensNothing(t *testing.T) {
	s := newCleanerSetup()
	s.c.clean(udpCheck{}, nil)
	if len(s.host.opened) != 0 {
		t.Errorf("opened %v for nothing to check", s.host.opened)
	}
}

// Without CAP_SYS_ADMIN the pods' namespaces cannot be entered: the node's
// own sockets are still handled, and the pods are not tried again.
func TestCleanWithoutSysAdminHandlesTheNode(t *testing.T) {
	s := newCleanerSetup()
	eperm := fmt.Errorf("entering network namespace (needs CAP_SYS_ADMIN): %w", unix.EPERM)
	s.host.ns["pod-a"].openErr = eperm
	s.host.ns["pod-b"].openErr = eperm
	s.c.clean(s.check, nil)
	s.c.clean(s.check, nil)
	if want := []string{"node 1"}; !slices.Equal(s.host.destroyed, want) {
		t.Errorf("destroyed %v, want %v", s.host.destroyed, want)
	}
	if want := []string{"node", "pod-a", "node"}; !slices.Equal(s.host.opened, want) {
		t.Errorf("opened %v, want %v: one refusal is enough", s.host.opened, want)
	}
	if got := s.counts(); got[eventUDPSocketsNamespaceSkip] != 4 || got[eventUDPSocketDestroyFailed] != 0 {
		t.Errorf("events %v, want both pods skipped twice and no failure", got)
	}
}

func TestCleanOnAKernelThatCannotDestroy(t *testing.T) {
	s := newCleanerSetup()
	s.host.unsupported = true
	s.c.clean(s.check, nil)
	s.c.clean(s.check, nil)
	if len(s.host.destroyed) != 0 {
		t.Errorf("destroyed %v", s.host.destroyed)
	}
	if want := []string{"node"}; !slices.Equal(s.host.opened, want) {
		t.Errorf("opened %v, want the node's namespace once, to probe", s.host.opened)
	}
	if got := s.counts(); got[eventUDPSocketsUnsupported] != 2 || len(got) != 1 {
		t.Errorf("events %v, want two skipped cleanups counted", got)
	}
}

func TestCleanCountsFailuresAndGoesOn(t *testing.T) {
	s := newCleanerSetup()
	s.host.ns["node"].destroyErr = map[uint64]error{1: fmt.Errorf("destroying: %w", unix.ENOMEM)}
	// Closed between the dump and the destroy: not a failure.
	s.host.ns["pod-a"].destroyErr = map[uint64]error{2: fmt.Errorf("destroying: %w", unix.ENOENT)}
	s.host.ns["pod-b"].listErr = errors.New("dump failed")
	s.c.clean(s.check, nil)
	if len(s.host.destroyed) != 0 {
		t.Errorf("destroyed %v", s.host.destroyed)
	}
	if got := s.counts(); got[eventUDPSocketDestroyFailed] != 2 || len(got) != 1 {
		t.Errorf("events %v, want 2 failures (a destroy, a dump)", got)
	}
}

func TestCleanWhenThePodsCannotBeListed(t *testing.T) {
	s := newCleanerSetup()
	s.host.listErr = errors.New("reading /run/netns: permission denied")
	s.c.clean(s.check, nil)
	if want := []string{"node 1"}; !slices.Equal(s.host.destroyed, want) {
		t.Errorf("destroyed %v, want %v", s.host.destroyed, want)
	}
}

// The Dataplane acts after a sync that applied, skips the ports of one
// that applied in part, and does nothing after one that failed.
func TestDataplaneCleansAfterSync(t *testing.T) {
	newDP := func() (*Dataplane, *fakeSocketHost) {
		host := newFakeSocketHost("node")
		revnat := fakeRevnat{}
		revnat.record(1, "10.244.1.1:53", dnsVIP)
		revnat.record(2, "10.244.3.1:8125", otherVIP)
		host.ns["node"].sockets = []sockdiag.Socket{udpSocket(1, "10.244.1.1:53"), udpSocket(2, "10.244.3.1:8125")}
		events := newEventCounts()
		f := newFakeMaps(64, 256)
		sockets := newUDPSocketCleaner(host, revnat.lookup, events)
		cleanup := newCleanupWorker(sockets.clean)
		t.Cleanup(cleanup.close)
		return &Dataplane{
			familyPath: &familyPath{
				rec:     newReconciler(f.maps(), f.grace(), 64, 256),
				sockets: sockets,
				cleanup: cleanup,
			},
			events: events,
		}, host
	}
	initial := snapshot(true, dnsPort("10.244.1.1:53", "10.244.1.2:53"),
		servicePort("default", "stats", "udp", model.UDP, otherVIP, "10.244.3.1:8125", "10.244.3.2:8125"))
	shrunk := snapshot(false, dnsPort("10.244.1.2:53"),
		servicePort("default", "stats", "udp", model.UDP, otherVIP, "10.244.3.2:8125"))

	t.Run("applied", func(t *testing.T) {
		dp, host := newDP()
		if err := dp.Sync(context.Background(), initial); err != nil {
			t.Fatal(err)
		}
		dp.waitSocketCleanup()
		if len(host.destroyed) != 0 {
			t.Fatalf("destroyed %v with every backend serving", host.destroyed)
		}
		dp.waitSocketCleanup()
		host.opened = nil
		if err := dp.Sync(context.Background(), snapshot(false, servicePort("default", "web", "http", model.TCP, "10.96.0.12:80", "10.244.1.1:8080"))); err != nil {
			t.Fatal(err)
		}
		dp.waitSocketCleanup()
		if len(host.opened) != 0 {
			t.Errorf("a sync without a UDP change looked at sockets in %v", host.opened)
		}
		if err := dp.Sync(context.Background(), shrunk); err != nil {
			t.Fatal(err)
		}
		dp.waitSocketCleanup()
		if want := []string{"node 1", "node 2"}; !slices.Equal(host.destroyed, want) {
			t.Errorf("destroyed %v, want %v", host.destroyed, want)
		}
	})
	t.Run("applied but for one port", func(t *testing.T) {
		dp, host := newDP()
		dp.afterSync(initial, nil)
		dp.afterSync(shrunk, &dataplane.SyncError{Services: []*dataplane.ServiceError{
			{Service: dnsPort().Name, Frontend: dnsPort().ClusterIP, Reason: dataplane.ReasonMapFull, Err: ErrMapFull}}})
		dp.waitSocketCleanup()
		if want := []string{"node 2"}; !slices.Equal(host.destroyed, want) {
			t.Errorf("destroyed %v, want %v: the failed port keeps its old backends", host.destroyed, want)
		}
	})
	t.Run("failed", func(t *testing.T) {
		dp, host := newDP()
		dp.afterSync(initial, nil)
		dp.waitSocketCleanup()
		host.opened = nil
		dp.afterSync(shrunk, errors.New("reading BPF maps: boom"))
		dp.waitSocketCleanup()
		if len(host.opened) != 0 || len(host.destroyed) != 0 {
			t.Errorf("after a failed sync: opened %v, destroyed %v", host.opened, host.destroyed)
		}
	})
}

// The node's namespace comes first, and each namespace once however many
// links lead to it; files that are not mounted namespaces are skipped.
func TestKernelSocketHostListsEachNamespaceOnce(t *testing.T) {
	n := testnet.New(t)
	pod := n.AddPod("a", "10.244.0.1")
	dir := t.TempDir()
	for name, target := range map[string]string{
		"1-pod":      "/run/netns/" + pod.NS,
		"2-same-pod": "/run/netns/" + pod.NS,
		"3-node":     "/run/netns/" + n.Node,
		"4-dangling": "/run/netns/" + n.Prefix + "-gone",
	} {
		if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "5-placeholder"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	host := kernelSocketHost{nodeNetNS: "/run/netns/" + n.Node, dirs: []string{dir, filepath.Join(dir, "missing")}}
	got, err := host.netNamespaces()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"/run/netns/" + n.Node, filepath.Join(dir, "1-pod")}; !slices.Equal(got, want) {
		t.Errorf("namespaces %v, want %v", got, want)
	}
}

// A partial sync of a Service that names a UDP frontend another serves
// checks nothing of that frontend: the holder's sockets, translated to the
// holder's backends, are healthy.
func TestPlanLeavesAnotherServicesFrontendAlone(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	c := newUDPSocketCleaner(nil, nil, newEventCounts())
	c.holderOf = r.holderOf
	holder := withExternal(servicePort("a", "holder", "", model.UDP, "10.96.0.1:53", "10.244.0.1:53"), []string{"10.0.0.1"}, nil)
	other := withExternal(servicePort("b", "other", "", model.UDP, "10.96.0.2:53", "10.244.0.2:53"), []string{"10.0.0.1"}, nil)
	full := onNode(testNode, true, holder, other)
	if err := r.sync(full); err != nil {
		t.Fatal(err)
	}
	c.plan(full, nil)
	other.Backends = backendList("10.244.0.3:53")
	other.Cluster, other.Serving = other.Backends, other.Backends
	partial := onNode(testNode, false, other)
	if err := r.sync(partial); err != nil {
		t.Fatal(err)
	}
	got := checkKeys(c.plan(partial, nil))
	if want := []string{"10.96.0.2:53 [10.244.0.3:53]"}; !slices.Equal(got, want) {
		t.Errorf("checked %v, want %v: the external IP is the holder's", got, want)
	}
}

// A loopback node port (--nodeport-addresses naming 127.0.0.0/8) is the
// node's: a pod's socket connected to 127.0.0.1 and that port talks to the
// pod's own loopback, and is never destroyed; the node's is checked.
func TestMatchLoopbackNodePortIsTheNodesOnly(t *testing.T) {
	check := make(udpCheck)
	fe := model.Frontend{IP: netip.MustParseAddr("127.0.0.1"), Port: 30053, Protocol: model.UDP}
	check.add(fe, dnsPort("10.244.1.2:53").Serving, true)
	c := newUDPSocketCleaner(nil, fakeRevnat{}.lookup, newEventCounts())
	s := udpSocket(9, "127.0.0.1:30053")
	for _, tc := range []struct {
		pod    bool
		reason string
	}{{true, ""}, {false, "connected to the frontend untranslated"}} {
		_, reason, err := c.match(check, s, tc.pod, c.revnat)
		if err != nil {
			t.Fatal(err)
		}
		if reason != tc.reason {
			t.Errorf("in a pod: %v: reason %q, want %q", tc.pod, reason, tc.reason)
		}
	}
}

// Where the cleanup looks follows kbp_revnat: no namespace when no socket
// was translated to a backend that left and no frontend is fresh; the
// namespaces up to the last stale socket's; and in each, a dump of the
// sockets connected to a stale backend or a fresh frontend only.
func TestCleanLooksOnlyWhereStaleSocketsCanBe(t *testing.T) {
	fresh := func(s *cleanerSetup) {
		s.check.add(model.Frontend{IP: netip.MustParseAddr("10.96.0.11"), Port: 53, Protocol: model.UDP},
			dnsPort("10.244.3.1:53").Serving, true)
	}
	for _, tc := range []struct {
		name      string
		setup     func(s *cleanerSetup)
		opened    []string
		filters   []string
		destroyed []string
		failed    uint64
	}{
		{
			name:      "stale sockets in every namespace",
			opened:    []string{"node", "pod-a", "pod-b"},
			filters:   []string{"node [10.244.1.1:53]", "pod-a [10.244.1.1:53]", "pod-b [10.244.1.1:53]"},
			destroyed: []string{"node 1", "pod-a 2", "pod-b 3"},
		},
		{
			name: "no socket translated to a backend that left",
			setup: func(s *cleanerSetup) {
				s.revnat = fakeRevnat{}
				s.revnat.record(9, "10.244.1.2:53", dnsVIP)
			},
		},
		{
			name: "the last stale socket is in the first pod",
			setup: func(s *cleanerSetup) {
				delete(s.revnat, "3 10.244.1.1:53")
			},
			opened:    []string{"node", "pod-a"},
			filters:   []string{"node [10.244.1.1:53]", "pod-a [10.244.1.1:53]"},
			destroyed: []string{"node 1", "pod-a 2"},
		},
		{
			name: "a fresh frontend's untranslated sockets may be anywhere",
			setup: func(s *cleanerSetup) {
				s.revnat = fakeRevnat{}
				s.host.ns["pod-b"].sockets = append(s.host.ns["pod-b"].sockets, udpSocket(4, otherVIP))
				fresh(s)
			},
			opened:    []string{"node", "pod-a", "pod-b"},
			filters:   []string{"node [10.96.0.11:53]", "pod-a [10.96.0.11:53]", "pod-b [10.96.0.11:53]"},
			destroyed: []string{"pod-b 4"},
		},
		{
			name: "stale backends and fresh frontends in one dump",
			setup: func(s *cleanerSetup) {
				delete(s.revnat, "3 10.244.1.1:53")
				fresh(s)
			},
			opened: []string{"node", "pod-a", "pod-b"},
			filters: []string{"node [10.96.0.11:53 10.244.1.1:53]", "pod-a [10.96.0.11:53 10.244.1.1:53]",
				"pod-b [10.96.0.11:53 10.244.1.1:53]"},
			destroyed: []string{"node 1", "pod-a 2"},
		},
		{
			name: "kbp_revnat unreadable: every socket everywhere",
			setup: func(s *cleanerSetup) {
				s.c.scan = func(func(uint64, netip.AddrPort, netip.AddrPort)) error { return errors.New("boom") }
			},
			opened:    []string{"node", "pod-a", "pod-b"},
			filters:   []string{"node all", "pod-a all", "pod-b all"},
			destroyed: []string{"node 1", "pod-a 2", "pod-b 3"},
			failed:    1,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newCleanerSetup()
			if tc.setup != nil {
				tc.setup(s)
			}
			if failed := s.c.clean(s.check, nil); failed != (tc.failed > 0) {
				t.Errorf("clean reported failed=%v", failed)
			}
			if !slices.Equal(s.host.opened, tc.opened) {
				t.Errorf("opened %v, want %v", s.host.opened, tc.opened)
			}
			if !slices.Equal(s.host.filters, tc.filters) {
				t.Errorf("dumps %v, want %v", s.host.filters, tc.filters)
			}
			if !slices.Equal(s.host.destroyed, tc.destroyed) {
				t.Errorf("destroyed %v, want %v", s.host.destroyed, tc.destroyed)
			}
			if got := s.counts()[eventUDPSocketDestroyFailed]; got != tc.failed {
				t.Errorf("%d failures counted, want %d", got, tc.failed)
			}
		})
	}
}
