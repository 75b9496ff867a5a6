package ebpf

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// testNode serves node ports on two addresses and loopback (named by
// --nodeport-addresses), in the Service CIDR 10.96.0.0/16.
var testNode = model.NodeInfo{
	NodePortAddresses: addrs("10.0.0.1", "10.0.0.2", "127.0.0.1"),
	LocalAddresses:    addrs("10.0.0.1", "10.0.0.2", "127.0.0.1"),
	ServiceCIDRs:      []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")},
}

func addrs(ips ...string) []netip.Addr {
	var out []netip.Addr
	for _, ip := range ips {
		out = append(out, netip.MustParseAddr(ip))
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

func backendList(backends ...string) []model.Backend {
	return servicePort("", "", "", model.TCP, "10.96.0.1:1", backends...).Backends
}

// onNode is snapshot with the node's information.
func onNode(node model.NodeInfo, full bool, ports ...model.ServicePort) *model.Snapshot {
	s := snapshot(full, ports...)
	s.Node = node
	return s
}

// withNodePort gives sp a node port, its Cluster endpoints being its
// backends, as the model fills them under internalTrafficPolicy Cluster.
func withNodePort(sp model.ServicePort, port uint16) model.ServicePort {
	sp.External.NodePort = port
	sp.Cluster = sp.Backends
	sp.HasEndpoints = len(sp.Backends) > 0
	return sp
}

// withExternal gives sp external IPs and LoadBalancer IPs.
func withExternal(sp model.ServicePort, externalIPs, lbIPs []string, ranges ...string) model.ServicePort {
	sp.External.ExternalIPs = addrs(externalIPs...)
	sp.External.LoadBalancerIPs = addrs(lbIPs...)
	for _, r := range ranges {
		sp.External.SourceRanges = append(sp.External.SourceRanges, netip.MustParsePrefix(r))
	}
	sp.Cluster = sp.Backends
	sp.HasEndpoints = len(sp.Backends) > 0
	return sp
}

// internalLocal makes sp internalTrafficPolicy Local: its ClusterIP goes to
// the local endpoints only (its backends), external frontends reached from
// the node to every endpoint in cluster.
func internalLocal(sp model.ServicePort, local []string, cluster ...string) model.ServicePort {
	sp.InternalLocal = true
	sp.Backends = backendList(local...)
	sp.Local = sp.Backends
	sp.Cluster = backendList(cluster...)
	sp.Serving = sp.Cluster
	sp.HasEndpoints = len(cluster) > 0
	return sp
}

func withAffinity(sp model.ServicePort, d time.Duration) model.ServicePort {
	sp.Affinity = d
	return sp
}

// runSteps syncs each step, checking every operation for holes and for
// deletions racing programs could trip over, and the copy after each, and
// returns the operations and maps of each, for a golden file.
func runSteps(t *testing.T, f *fakeMaps, r *reconciler, steps []syncStep) string {
	t.Helper()
	watchHoles(t, f)
	watchReaders(t, f)
	var out strings.Builder
	for _, step := range steps {
		err := r.sync(step.snap)
		if (err != nil) != step.fails {
			t.Fatalf("%s: sync returned %v, want an error: %v", step.name, err, step.fails)
		}
		checkCopy(t, r, f)
		fmt.Fprintf(&out, "## %s\n", step.name)
		if err != nil {
			fmt.Fprintf(&out, "# error\n%v\n", err)
		}
		fmt.Fprintf(&out, "# operations, in order\n")
		for _, op := range f.takeLog() {
			fmt.Fprintln(&out, op)
		}
		fmt.Fprintf(&out, "# maps\n%s\n", f.dump())
	}
	return out.String()
}

type syncStep struct {
	name  string
	snap  *model.Snapshot
	fails bool
}

// Each kind of external frontend a socket on the node reaches is served
// under the id of the backend list it goes to: one id for the whole port
// while the ClusterIP and the external frontends share their endpoints, two
// under internalTrafficPolicy Local. The frontends move between ids, and
// the ids come and go, without a hole at any operation.
func TestReconcilerExternalFrontends(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	web := func(backends ...string) model.ServicePort {
		sp := servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", backends...)
		return withExternal(withNodePort(sp, 30080), []string{"10.0.0.2", "192.0.2.1"}, []string{"192.0.2.10"})
	}
	webLocal := func(local []string, cluster ...string) model.ServicePort {
		sp := internalLocal(servicePort("default", "web", "http", model.TCP, "10.96.0.10:80"), local, cluster...)
		sp.External = web().External
		return sp
	}
	// A LoadBalancer IP with source ranges is left to the iptables rules.
	ranged := withExternal(servicePort("default", "ranged", "", model.UDP, "10.96.0.11:53", "10.244.0.9:53"),
		nil, []string{"192.0.2.20"}, "203.0.113.0/24")
	a, b, c := "10.244.0.1:8080", "10.244.0.2:8080", "10.244.1.1:8080"
	otherNode := testNode
	otherNode.NodePortAddresses = addrs("10.0.0.3")
	otherNode.LocalAddresses = addrs("10.0.0.3", "127.0.0.1")
	noNodePort := web(a, b, c)
	noNodePort.External.NodePort = 0

	got := runSteps(t, f, r, []syncStep{
		{"NodePort on each node port address, a local external IP, a LoadBalancer IP; one id", onNode(testNode, true, web(a, b, c), ranged), false},
		{"internalTrafficPolicy Local: the ClusterIP keeps its id, the external frontends get one", onNode(testNode, false, webLocal([]string{a, b}, a, b, c)), false},
		{"no local endpoint: the ClusterIP refuses, saying why; external frontends still serve", onNode(testNode, false, webLocal(nil, a, b, c)), false},
		{"internalTrafficPolicy Cluster again: one id, the other goes", onNode(testNode, false, web(a, c)), false},
		{"the node port goes", onNode(testNode, false, noNodePort), false},
		{"the node's addresses change, in a full sync", onNode(otherNode, true, web(a, c), ranged), false},
		{"a partial snapshot with other node addresses is refused, nothing written", onNode(testNode, false, web(a)), true},
		{"the Services go", onNode(otherNode, true), false},
	})
	checkGolden(t, "frontends.golden", got)
}

// A restart adopts the frontends of every kind and the ids they share, and
// rewrites nothing.
func TestReconcilerRestoreAdoptsFrontendGroups(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	web := withExternal(withNodePort(servicePort("default", "web", "http", model.TCP, "10.96.0.10:80",
		"10.244.0.1:8080", "10.244.1.1:8080"), 30080), []string{"10.0.0.1"}, []string{"192.0.2.10"})
	split := internalLocal(servicePort("default", "split", "", model.UDP, "10.96.0.11:53"), []string{"10.244.0.1:53"},
		"10.244.0.1:53", "10.244.1.1:53")
	split.External.NodePort = 30053
	split = withAffinity(split, time.Minute)
	snap := onNode(testNode, true, withAffinity(web, 10*time.Second), split)
	if err := r.sync(snap); err != nil {
		t.Fatal(err)
	}
	before := f.dump()
	f.takeLog()
	restarted := newReconciler(f.maps(), f.grace(), 16, 64)
	if err := restarted.sync(snap); err != nil {
		t.Fatal(err)
	}
	if ops := f.takeLog(); len(ops) != 0 {
		t.Errorf("restart adoption wrote %q", ops)
	}
	checkCopy(t, restarted, f)
	if after := f.dump(); after != before {
		t.Errorf("restart changed the maps:\n%s\nwas\n%s", after, before)
	}
	if got := restarted.namedIDs(); len(got) != 3 {
		t.Errorf("named ids %v, want web's one and split's two", got)
	}
}

// Session affinity: each backend of the id has a match entry, written
// before a frontend's flag asks the programs to look; a backend that goes
// loses its match entry before the grace period, and the backend entry
// goes after it; a timeout change rewrites the entries; affinity off
// deletes them after the flag is off.
func TestReconcilerAffinity(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	web := func(d time.Duration, backends ...string) model.ServicePort {
		return withAffinity(withNodePort(servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", backends...), 30080), d)
	}
	a, b, c, d := "10.244.0.1:8080", "10.244.0.2:8080", "10.244.0.3:8080", "10.244.0.4:8080"
	node := testNode
	node.NodePortAddresses = addrs("10.0.0.1")
	got := runSteps(t, f, r, []syncStep{
		{"affinity on a new port", onNode(node, true, web(3*time.Hour, a, b)), false},
		{"a backend goes, another comes", onNode(node, false, web(3*time.Hour, a, c, d)), false},
		{"the timeout changes", onNode(node, false, web(1500*time.Millisecond, a, c, d)), false},
		{"affinity off", onNode(node, false, web(0, a, c, d)), false},
		{"affinity on again for an existing port", onNode(node, false, web(time.Minute, a, c)), false},
	})
	checkGolden(t, "affinity.golden", got)

	// The order that keeps racing connects safe, in the step where b went.
	step := got[strings.Index(got, "## a backend goes"):strings.Index(got, "## the timeout changes")]
	match := strings.Index(step, "delete matches")
	grace := strings.Index(step, "grace period")
	backend := strings.Index(step, "delete backends")
	if match < 0 || grace < match || backend < grace {
		t.Errorf("removing a backend of an affinity port did:\n%s\nwant its match entry deleted, a grace period, then the backend", step)
	}
}

// What kube-proxy refuses: the ClusterIP set follows the ClusterIPs served,
// and the range array the Service CIDRs, with a last range for ClusterIPs
// outside them (or when none are known).
func TestReconcilerRejects(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	web := withNodePort(servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080"), 30080)
	dnsTCP := servicePort("kube-system", "dns", "tcp", model.TCP, "10.96.0.53:53", "10.244.0.5:53")
	dnsUDP := servicePort("kube-system", "dns", "udp", model.UDP, "10.96.0.53:53", "10.244.0.5:53")
	outside := servicePort("default", "outside", "", model.TCP, "172.30.0.1:80", "10.244.0.1:8080")
	unknown := testNode
	unknown.ServiceCIDRs = nil
	many := testNode
	many.ServiceCIDRs = nil
	for i := range 20 {
		many.ServiceCIDRs = append(many.ServiceCIDRs, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(100 + i), 0, 0}), 16))
	}
	got := runSteps(t, f, r, []syncStep{
		{"ClusterIPs in the Service CIDR; one address for two ports", onNode(testNode, true, web, dnsTCP, dnsUDP), false},
		{"a ClusterIP outside it", onNode(testNode, false, outside), false},
		{"it goes", withDeleted(onNode(testNode, false), outside.Name.ServiceName), false},
		{"one of two ports of an address goes: the address stays", onNode(testNode, false, dnsTCP), false},
		{"Service CIDRs unknown", onNode(unknown, true, web, dnsTCP), false},
		{"more Service CIDRs than the array holds", onNode(many, true, web, dnsTCP), false},
	})
	checkGolden(t, "rejects.golden", got)
}

// A port whose frontends do not fit is refused before it writes anything,
// naming the flag to raise, and takes nothing from the ports that fit.
func TestReconcilerFullFrontendMap(t *testing.T) {
	f := newFakeMaps(16, 64)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	r.maxFrontends = 4
	f.services.capacity = 4
	// big sorts first: three frontends, two node addresses plus its
	// ClusterIP, then small's one would fit, but big's fourth does not.
	big := withExternal(withNodePort(servicePort("ns", "big", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80"), 30001),
		nil, []string{"192.0.2.1", "192.0.2.2"})
	small := servicePort("ns", "small", "", model.TCP, "10.96.0.2:80", "10.244.0.2:80")
	node := testNode
	node.NodePortAddresses = addrs("10.0.0.1", "10.0.0.2")
	err := r.sync(onNode(node, true, big, small))
	failed, only := dataplane.OnlyServicesFailed(err)
	if !only || len(failed) != 1 || failed[0].Service != big.Name || failed[0].Reason != dataplane.ReasonMapFull {
		t.Fatalf("got %v, want a SyncError for %s alone, %s", err, big.Name, dataplane.ReasonMapFull)
	}
	if !errors.Is(err, ErrMapFull) || !strings.Contains(err.Error(), "--"+FlagMaxFrontends) {
		t.Errorf("error %q is not ErrMapFull naming --%s", err, FlagMaxFrontends)
	}
	checkCopy(t, r, f)
	want := "10.96.0.2:80/TCP -> 10.244.0.2:80\nentries: 1 services, 1 slots, 1 backends\n"
	if got := served(f); got != want {
		t.Errorf("serving\n%swant\n%s", got, want)
	}
}

// Two Services naming one external IP and port: the first in name order
// serves it. When it stops naming it, the other takes it over in the sync
// that applies the other; a partial sync of the first without it does not
// delete what the other holds.
func TestReconcilerExternalIPClaimedTwice(t *testing.T) {
	f := newFakeMaps(16, 64)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	first := withExternal(servicePort("a", "first", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80"), []string{"10.0.0.1"}, nil)
	second := withExternal(servicePort("b", "second", "", model.TCP, "10.96.0.2:80", "10.244.0.2:80"), []string{"10.0.0.1"}, nil)
	ext := model.Frontend{IP: netip.MustParseAddr("10.0.0.1"), Port: 80, Protocol: model.TCP}
	servedBy := func() string {
		set, _ := liveSet(f, ext)
		return strings.Join(set, " ")
	}
	if err := r.sync(onNode(testNode, true, first, second)); err != nil {
		t.Fatal(err)
	}
	if got := servedBy(); got != "10.244.0.1:80" {
		t.Fatalf("%s serves %q, want first's backend", ext, got)
	}
	// second changes: it does not take the frontend from first.
	second.Backends = backendList("10.244.0.3:80")
	second.Cluster, second.Serving = second.Backends, second.Backends
	if err := r.sync(onNode(testNode, false, second)); err != nil {
		t.Fatal(err)
	}
	if got := servedBy(); got != "10.244.0.1:80" {
		t.Errorf("after a partial sync of second, %s serves %q, want first's backend", ext, got)
	}
	// first drops it: second, which names it too, takes it at once, as
	// the Dataplane syncs (withWaiters).
	dropped := first
	dropped.External.ExternalIPs = nil
	if err := r.sync(r.withWaiters(onNode(testNode, false, dropped))); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	if got := servedBy(); got != "10.244.0.3:80" {
		t.Errorf("after first dropped it, %s serves %q, want second's backend", ext, got)
	}
	// second goes: nothing waits, the frontend goes with it.
	if err := r.sync(r.withWaiters(withDeleted(onNode(testNode, false), second.Name.ServiceName))); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	if got := servedBy(); got != "" {
		t.Errorf("after second went, %s serves %q, want nothing", ext, got)
	}
	if err := r.sync(onNode(testNode, true, dropped, second)); err != nil {
		t.Fatal(err)
	}
	if got := servedBy(); got != "10.244.0.3:80" {
		t.Errorf("after a full sync, %s serves %q, want second's backend", ext, got)
	}
	checkCopy(t, r, f)
}

func TestAffinitySeconds(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want uint32
	}{
		{time.Second, 1}, {1500 * time.Millisecond, 2}, {10800 * time.Second, 10800}, {time.Millisecond, 1},
		{1 << 62, 1<<32 - 1},
	} {
		if got := affinitySeconds(c.d); got != c.want {
			t.Errorf("affinitySeconds(%v) = %d, want %d", c.d, got, c.want)
		}
	}
}

// A host-scoped address named as an external IP or a LoadBalancer IP is
// never served: in a pod it is the pod's own (127.0.0.53, a sidecar on
// 127.0.0.1) or its link's. Loopback node ports, named by
// --nodeport-addresses, stay, for the node's own sockets only.
func TestReconcilerHostScopedExternalAddressesNotServed(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	hostile := withNodePort(withExternal(servicePort("a", "hostile", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80"),
		[]string{"127.0.0.1", "10.0.0.1", "169.254.169.254"},
		[]string{"127.0.0.53", "169.254.0.1", "224.0.0.251", "255.255.255.255", "0.0.0.0", "192.0.2.10"}), 30080)
	if err := r.sync(onNode(testNode, true, hostile)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	var got []string
	for k, v := range f.services.entries {
		got = append(got, fmt.Sprintf("%s %s", k, svcValueText(v)))
	}
	slices.Sort(got)
	for _, line := range got {
		fe := strings.Fields(line)[0]
		if ap := netip.MustParseAddrPort(strings.TrimSuffix(fe, "/TCP")); model.HostScoped(ap.Addr()) && ap.Port() != 30080 {
			t.Errorf("serves %s, a host-scoped external address", line)
		}
	}
	want := []string{"10.0.0.1:30080", "10.0.0.1:80", "10.0.0.2:30080", "10.96.0.1:80", "127.0.0.1:30080", "192.0.2.10:80"}
	if len(got) != len(want) {
		t.Fatalf("frontends:\n%s\nwant exactly %v", strings.Join(got, "\n"), want)
	}
	for i, w := range want {
		if !strings.HasPrefix(got[i], w+"/") {
			t.Errorf("frontend %d is %q, want %s", i, got[i], w)
		}
	}
	if v := f.services.entries[model.Frontend{IP: netip.MustParseAddr("127.0.0.1"), Port: 30080, Protocol: model.TCP}]; flagsOf(v)&svcFlagNodeNetNSOnly == 0 {
		t.Errorf("loopback node port %s, want it for the node's namespace only", svcValueText(v))
	}
}

// A Service that names an external frontend another Service serves takes
// nothing from it: the holder keeps the frontend and its id, so its
// ClusterIP never serves the newcomer's backends, not even for one
// operation, nor after the holder's own apply fails; the newcomer is
// logged and counted once, not at every sync.
func TestReconcilerExternalFrontendHolderKeepsIt(t *testing.T) {
	f := newFakeMaps(16, 64)
	watchHoles(t, f)
	watchReaders(t, f)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	r.events = newEventCounts(eventFrontendConflict)
	holder := withExternal(servicePort("b", "holder", "", model.TCP, "10.96.0.2:80", "10.244.0.2:80"), []string{"10.0.0.1"}, nil)
	if err := r.sync(onNode(testNode, true, holder)); err != nil {
		t.Fatal(err)
	}
	ext := model.Frontend{IP: netip.MustParseAddr("10.0.0.1"), Port: 80, Protocol: model.TCP}
	mustServe := func(when string, fe model.Frontend, want string) {
		t.Helper()
		if set, _ := liveSet(f, fe); strings.Join(set, " ") != want {
			t.Errorf("%s: %s serves %q, want %q", when, fe, strings.Join(set, " "), want)
		}
	}
	f.onOp = append(f.onOp, func(op fakeOp) {
		if set, _ := liveSet(f, holder.ClusterIP); strings.Join(set, " ") != "10.244.0.2:80" {
			t.Errorf("after %q the holder's ClusterIP serves %v", op.text, set)
		}
	})
	// A newcomer, first in name order and applied first (its ClusterIP
	// sorts first), names the same external IP and port; the holder's
	// writes fail.
	newcomer := withExternal(servicePort("a", "newcomer", "", model.TCP, "10.96.0.1:80", "10.244.0.1:80"), []string{"10.0.0.1"}, nil)
	holder.Backends = backendList("10.244.0.3:80", "10.244.0.2:80")
	holder.Cluster, holder.Serving = holder.Backends, holder.Backends
	f.fail = func(op fakeOp) error {
		if strings.Contains(op.text, "10.244.0.3") {
			return errors.New("injected")
		}
		return nil
	}
	if err := r.sync(onNode(testNode, true, newcomer, holder)); err == nil {
		t.Fatal("the holder's apply did not fail")
	}
	checkCopy(t, r, f)
	mustServe("after the holder's apply failed", ext, "10.244.0.2:80")
	mustServe("after the holder's apply failed", newcomer.ClusterIP, "10.244.0.1:80")
	f.fail = nil
	f.onOp = nil
	for range 2 {
		if err := r.sync(onNode(testNode, true, newcomer, holder)); err != nil {
			t.Fatal(err)
		}
	}
	checkCopy(t, r, f)
	mustServe("after the holder's apply", ext, "10.244.0.2:80 10.244.0.3:80")
	mustServe("after the holder's apply", holder.ClusterIP, "10.244.0.2:80 10.244.0.3:80")
	got := map[string]uint64{}
	r.events.copyTo(got)
	if got[eventFrontendConflict] != 1 {
		t.Errorf("counted %d conflicts over three syncs, want 1", got[eventFrontendConflict])
	}
}

// The ClusterIPs of Services another proxy serves are in the ClusterIP set,
// marked foreign, so that the programs let them through instead of
// refusing them as unallocated addresses of the Service CIDR; ours win
// over foreign ones, and each goes when its Service does.
func TestReconcilerForeignClusterIPs(t *testing.T) {
	f := newFakeMaps(16, 64)
	r := newReconciler(f.maps(), f.grace(), 16, 64)
	web := servicePort("default", "web", "http", model.TCP, "10.96.0.10:80", "10.244.0.1:8080")
	node := testNode
	node.ForeignClusterIPs = addrs("10.96.0.10", "10.96.0.77", "172.30.0.7")
	set := func() map[string]uint32 {
		out := make(map[string]uint32)
		for ip, kind := range f.clusterIPs.entries {
			out[ip.String()] = kind
		}
		return out
	}
	for _, step := range []struct {
		name    string
		foreign []netip.Addr
		want    map[string]uint32
	}{
		{"foreign ones, one also ours", addrs("10.96.0.10", "10.96.0.77", "172.30.0.7"),
			map[string]uint32{"10.96.0.10": clusterIPOurs, "10.96.0.77": clusterIPForeign, "172.30.0.7": clusterIPForeign}},
		{"one goes", addrs("10.96.0.10", "10.96.0.77"),
			map[string]uint32{"10.96.0.10": clusterIPOurs, "10.96.0.77": clusterIPForeign}},
		{"none", nil, map[string]uint32{"10.96.0.10": clusterIPOurs}},
	} {
		node.ForeignClusterIPs = step.foreign
		if err := r.sync(onNode(node, true, web)); err != nil {
			t.Fatal(err)
		}
		checkCopy(t, r, f)
		if got := set(); !maps.Equal(got, step.want) {
			t.Errorf("%s: ClusterIP set %v, want %v", step.name, got, step.want)
		}
	}
	// Ours going leaves a foreign one of the same address.
	node.ForeignClusterIPs = addrs("10.96.0.10")
	if err := r.sync(onNode(node, true)); err != nil {
		t.Fatal(err)
	}
	checkCopy(t, r, f)
	if got := set(); !maps.Equal(got, map[string]uint32{"10.96.0.10": clusterIPForeign}) {
		t.Errorf("after ours went: ClusterIP set %v, want it foreign", got)
	}
}
