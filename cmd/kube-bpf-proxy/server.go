package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/events"
	clientmetrics "k8s.io/client-go/tools/metrics"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/apiserver"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/cgroups"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/inspect"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodeinfo"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodelabel"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/probe"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/proxy"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/version"
)

// run is main without the exit, for tests: 0 on success, 1 on failure, 2 on
// a usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "probe" {
		// The latency probe ships in the proxy's image as a subcommand
		// with flags of its own.
		return probe.Main(ctx, args[1:], stderr, os.LookupEnv)
	}
	if len(args) > 0 && args[0] == "inspect" {
		// What this node's datapath serves, against what the API server
		// says it should (docs/operations.md).
		return inspect.Main(ctx, args[1:], stdout, stderr, os.LookupEnv)
	}
	var o options
	fs := newFlagSet(&o, stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "unexpected argument %q\n%s\n", fs.Arg(0), usageLine)
		return 2
	}
	warnDeprecated(fs, stderr)
	var ignored []ignoredField
	if o.configFile != "" {
		var err error
		if ignored, err = applyConfigFile(fs, o.configFile, flagsSet(fs)); err != nil {
			fmt.Fprintf(stderr, "%v\n%s\n", err, usageLine)
			return 2
		}
	}
	if o.version {
		fmt.Fprintln(stdout, "kube-bpf-proxy", version.Get())
		return 0
	}
	if err := o.validate(); err != nil {
		fmt.Fprintf(stderr, "%v\n%s\n", err, usageLine)
		return 2
	}
	logIgnoredFields(o.configFile, ignored)

	if o.cleanup {
		// Both modes, whichever was running: this is how a node goes back
		// to kube-proxy or to nothing.
		// Both families' rules and maps: a node may have served
		// either (iptables.Cleanup and ebpf.Cleanup each cover both).
		err := errors.Join(ebpf.Cleanup(o.bpffsPath), iptables.Cleanup(ctx, o.iptablesConfig(model.IPv4)))
		removeModeLabel(ctx, o)
		if err != nil {
			klog.ErrorS(err, "Cleanup failed")
			return 1
		}
		klog.InfoS("Removed both datapaths", "bpffs", o.bpffsPath)
		return 0
	}
	o.afterFirstSync = applyMemoryDefaults(os.Getenv)
	if err := runProxy(ctx, o); err != nil {
		if ctx.Err() != nil {
			// Asked to stop while starting: whatever the stop cut short
			// (an iptables-save killed half way) is not a failure of the
			// node, and a DaemonSet rollout must not count it as one.
			klog.InfoS("Stopped while starting", "interrupted", err)
			return 0
		}
		// A node that cannot run the mode gets one line saying why and
		// what to do, and keeps what serves it now.
		if pe := (*ebpf.PreflightError)(nil); errors.As(err, &pe) {
			fmt.Fprintln(stderr, "kube-bpf-proxy:", pe)
			return 1
		}
		klog.ErrorS(err, "kube-bpf-proxy failed")
		return 1
	}
	return 0
}

// clientConfig returns the configuration every API client of the proxy is
// built from, and where it points. lookupEnv is os.LookupEnv outside tests.
func clientConfig(o options, lookupEnv func(string) (string, bool)) (*rest.Config, apiserver.Target, error) {
	cfg, target, err := apiserver.Config(o.kubeconfig, lookupEnv)
	if err != nil {
		return nil, apiserver.Target{}, err
	}
	cfg.UserAgent = "kube-bpf-proxy"
	o.connection().Apply(cfg)
	return cfg, target, nil
}

// iptablesConfig is the iptables datapath of family f: iptables for IPv4,
// ip6tables for IPv6.
func (o options) iptablesConfig(f model.IPFamily) iptables.Config {
	return iptables.Config{
		Family:        f,
		Backend:       o.iptablesBackend,
		LocalTraffic:  o.localTraffic[f],
		MasqueradeAll: o.masqueradeAll,
		MasqueradeBit: &o.masqueradeBit,
		LockWait:      o.xtablesLockWait,
		// The ebpf mode's packet layer never serves them: ExternalOnly
		// turns them off.
		LocalhostNodePorts: &o.localhostNPs,
	}
}

// packetLayerConfig is the ebpf mode's packet layer of family f. Packets
// no socket on the node sent (from outside, to a node port, an external or
// load balancer IP) are served per packet, by the iptables rules of those
// frontends only; and, when the socket layer serves the node's own network
// namespace only, pods' packets to every frontend, by the ClusterIP rules
// too. The first full sync writes or removes those, so a restart with the
// other value of the flag converges.
func (o options) packetLayerConfig(f model.IPFamily) iptables.Config {
	cfg := o.iptablesConfig(f)
	cfg.ExternalOnly = true
	cfg.ClusterIPs = o.hostNetNSOnly
	return cfg
}

// datapaths opens the mode's datapath of each family, wrapped so that the
// other mode's leftovers go once it serves. It is used from one goroutine
// (proxy.RunOpening opens the families one after the other); Close closes
// what it opened.
type datapaths struct {
	o        options
	families []model.IPFamily
	// removeEBPF (the iptables mode's handover) and confine (the ebpf
	// mode's) wait for every family: one socket layer serves both
	// families. afterAll's functions, one per family.
	removeEBPF, confine []func(context.Context) error
	// base is the eBPF datapath whose IPv6 view the IPv6 family serves
	// through; opened by the first family that needs it.
	base   *ebpf.Dataplane
	opened []dataplane.Dataplane
}

func newDatapaths(o options, families []model.IPFamily) *datapaths {
	d := &datapaths{o: o, families: families}
	if o.mode == "iptables" {
		d.removeEBPF = afterAll(len(families), func(context.Context) error { return ebpf.Cleanup(o.bpffsPath) })
		return d
	}
	d.confine = afterAll(len(families), func(context.Context) error {
		// One socket layer serves both families: pods leave it once
		// every family's packet layer has their ClusterIP rules.
		return d.base.ConfineToNodeNetNS()
	})
	return d
}

func (d *datapaths) index(f model.IPFamily) int {
	for i, g := range d.families {
		if g == f {
			return i
		}
	}
	return 0
}

// open starts family f's datapath. It also returns its iptables backend
// (in the ebpf mode, its packet layer's).
func (d *datapaths) open(ctx context.Context, f model.IPFamily) (dataplane.Dataplane, string, error) {
	o, i := d.o, d.index(f)
	if o.mode == "iptables" {
		dp, err := iptables.New(ctx, o.iptablesConfig(f))
		if err != nil {
			return nil, "", fmt.Errorf("starting the %v iptables datapath: %w", f, err)
		}
		d.opened = append(d.opened, dp)
		klog.InfoS("Starting kube-bpf-proxy", "mode", o.mode, "ipFamily", f, "backend", dp.Backend(), "version", version.Get())
		return dataplane.WithHandover(dp, "ebpf", d.removeEBPF[i]), dp.Backend(), nil
	}
	if d.base == nil {
		cgroupPath := o.cgroupPath
		if cgroupPath == "" {
			var err error
			if cgroupPath, err = cgroups.Cgroup2Mount(); err != nil {
				return nil, "", err
			}
		}
		base, err := ebpf.New(ebpf.Config{
			BPFFSPath:    o.bpffsPath,
			CgroupPath:   cgroupPath,
			MaxServices:  uint32(o.maxServices),
			MaxBackends:  uint32(o.maxBackends),
			MaxSockets:   uint32(o.maxSockets),
			MaxFrontends: uint32(o.maxFrontends),
			MaxAffinity:  uint32(o.maxAffinity),
			NetNSDirs:    splitList(o.netnsDirs),
			// The packet layer below serves what it leaves alone.
			HostNetNSOnly: o.hostNetNSOnly,
		})
		if err != nil {
			return nil, "", fmt.Errorf("starting the eBPF datapath: %w", err)
		}
		d.base = base
		d.opened = append(d.opened, base)
		klog.InfoS("Starting kube-bpf-proxy", "mode", o.mode, "cgroup", cgroupPath, "bpffs", o.bpffsPath,
			"socketLBHostNetNSOnly", o.hostNetNSOnly, "version", version.Get())
	}
	var sockets dataplane.Dataplane = d.base
	if f == model.IPv6 {
		v6, err := d.base.IPv6()
		if err != nil {
			return nil, "", fmt.Errorf("starting the eBPF datapath's IPv6 view: %w", err)
		}
		sockets = v6
		d.opened = append(d.opened, v6)
	}
	packets, err := iptables.New(ctx, o.packetLayerConfig(f))
	if err != nil {
		return nil, "", fmt.Errorf("starting the %v packet layer (ip%stables rules for traffic from outside the node): %w", f, map[model.IPFamily]string{model.IPv6: "6"}[f], err)
	}
	d.opened = append(d.opened, packets)
	klog.InfoS("Starting the packet layer", "ipFamily", f, "backend", packets.Backend())
	layered := &dataplane.Layered{Primary: sockets, Packets: packets}
	if o.hostNetNSOnly {
		// Pods leave the socket layer only once the packet layers have
		// their ClusterIP rules (at once if the previous run had them).
		confine := d.confine[i]
		layered.PacketsServe = func() error { return confine(context.Background()) }
	}
	// The iptables mode's (or kube-proxy's) rules of this family in the
	// other backend go once this family serves: they touch no other
	// family's. The packet layer's full syncs take over their own backend.
	backend := packets.Backend()
	removeIPTables := func(ctx context.Context) error {
		return iptables.CleanupExcept(ctx, o.iptablesConfig(f), backend)
	}
	return dataplane.WithHandover(layered, "iptables", removeIPTables), backend, nil
}

// Close releases our handles, the last opened first; the datapath (pinned
// programs or rules) keeps serving until the next start takes it over.
func (d *datapaths) Close() {
	for i := len(d.opened) - 1; i >= 0; i-- {
		d.opened[i].Close()
	}
}

func runProxy(ctx context.Context, o options) error {
	nodeName, err := nodeName(o.hostnameOverride)
	if err != nil {
		return err
	}
	restCfg, target, err := clientConfig(o, os.LookupEnv)
	if err != nil {
		return err
	}
	// client-go's request metrics (rest_client_*), on our registry. Its
	// Register holds once per process, and must come before the client
	// exists: the transport metrics are fed when it is built.
	reg := metrics.NewRegistry()
	clientmetrics.Register(metrics.NewRESTClient(reg).Options())
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("creating Kubernetes client: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Only reports: the informers retry on their own, but a dial into a
	// ClusterIP nobody serves would otherwise show as bare timeouts.
	config := "in-cluster"
	if target.Kubeconfig != "" {
		config = target.Kubeconfig
	}
	klog.InfoS("Connecting to the API server", "server", target.Server, "config", config)

	if o.mode == "ebpf" {
		// Before anything starts: a node that cannot run the mode ends
		// with the preflight's line, never with a probe's or an
		// informer's report racing it out; and nothing on the node has
		// changed.
		if o.cgroupPath == "" {
			if o.cgroupPath, err = cgroups.Cgroup2Mount(); err != nil {
				return err
			}
			// In a container with a cgroup namespace of its own, the
			// mount shows the container's cgroup as its root: programs
			// attached there would see the pod's sockets only, and the
			// node would look served.
			if root, err := cgroups.IsRoot(o.cgroupPath); err == nil && !root {
				return fmt.Errorf("the cgroup2 mount %s is not the node's root cgroup but this container's cgroup namespace's: "+
					"the eBPF mode would serve only its own sockets. Mount the node's /sys/fs/cgroup into the container "+
					"(manifests/base/daemonset.yaml and manifests/kubeadm/ebpf-patch.json mount it at /host/sys/fs/cgroup) "+
					"and pass --cgroup-path=/host/sys/fs/cgroup", o.cgroupPath)
			}
		}
		if _, err := ebpf.Preflight(o.cgroupPath); err != nil {
			return err
		}
	}
	go apiserver.Probe(ctx, client.Discovery().RESTClient(), target, apiserver.ProbeTimeout, 5*time.Second)
	families, err := servedFamilies(ctx, o, client, nodeName, realProbes())
	if err != nil {
		return err
	}
	var podCIDRs map[model.IPFamily]netip.Prefix
	if o.detectLocalMode == localModeNodeCIDR {
		// As kube-proxy: the rules need the Node's pod ranges, so nothing
		// starts before one is allocated (5 minutes at most). Each
		// family tells local traffic by its own range; a family the Node
		// has no range of tells it by nothing, as kube-proxy's per-family
		// detectors.
		klog.InfoS("Waiting for the Node's pod range (--detect-local-mode=NodeCIDR)", "node", nodeName)
		if podCIDRs, err = nodeinfo.WaitForPodCIDRs(ctx, client, nodeName, time.Second, 5*time.Minute); err != nil {
			return err
		}
		for _, f := range families {
			if cidr, ok := podCIDRs[f]; ok {
				klog.InfoS("Telling local traffic by the Node's pod range", "ipFamily", f, "podCIDR", cidr)
				o.localTraffic[f] = iptables.LocalByCIDR(cidr)
			} else {
				klog.InfoS("The Node has no pod range of this family: its local traffic is told by nothing", "ipFamily", f)
			}
		}
	}
	// The datapath starts (loads, verifies and attaches the programs,
	// opens the pins) while the informers list the Services and
	// EndpointSlices; proxy.RunOpening waits for both before it syncs.
	// Closing releases our handles only; the datapath (pinned programs or
	// rules) keeps serving until the next start takes it over.
	dps := newDatapaths(o, families)
	defer dps.Close()
	open := func(ctx context.Context, f model.IPFamily) (dataplane.Dataplane, error) {
		d, backend, err := dps.open(ctx, f)
		if err != nil {
			return nil, err
		}
		if f == families[0] {
			metrics.RegisterInfo(reg, o.mode, backend, version.Get())
		}
		return d, nil
	}
	klog.InfoS("Proxying for node", "node", nodeName)
	recorder, stopEvents := announce(ctx, client, nodeName, o.mode)
	defer stopEvents()
	return proxy.RunOpening(ctx, client, open, o.mode == "ebpf", proxy.Config{
		MinSyncPeriod:      o.minSyncPeriod,
		SyncBurst:          o.syncBurst,
		SyncPeriod:         o.syncPeriod,
		RetryPeriod:        time.Second,
		HealthzBindAddress: o.healthzBindAddress,
		MetricsBindAddress: o.metricsBindAddress,
		Profiling:          o.profiling,
		Recorder:           recorder,
		NodeName:           nodeName,
		Node: nodeinfo.New(nodeinfo.Config{
			NodeName:     nodeName,
			NodePorts:    o.nodePorts,
			ServiceCIDRs: o.serviceRanges,
			PodCIDRs:     podCIDRs,
			BindAddress:  o.bindAddr(),
		}),
		Registry: reg,
		Families: families,
		// The label says what serves the node, so it is written once
		// this mode does; in the background, as the datapath never
		// waits for the API server.
		AfterFirstSync: func() {
			if o.afterFirstSync != nil {
				o.afterFirstSync()
			}
			_ = nodelabel.Record(ctx, client, nodeName, o.mode, nodelabel.DefaultBackoff)
		},
	})
}

// removeModeLabel takes this node's mode label away on --cleanup, if an API
// server is configured and answers within a few seconds: a node cleaned up
// has no mode. Cleanup goes on whatever happens here; it is mostly run
// where no credentials are at hand, and a stale label misleads only the
// probe's mode label until a proxy starts again.
func removeModeLabel(ctx context.Context, o options) {
	node, err := nodeName(o.hostnameOverride)
	if err != nil {
		klog.InfoS("Not removing the Node's mode label", "reason", err)
		return
	}
	restCfg, _, err := clientConfig(o, os.LookupEnv)
	if err != nil {
		klog.InfoS("Not removing the Node's mode label: no API server configured", "node", node, "label", nodelabel.Label, "reason", err)
		return
	}
	restCfg.Timeout = 10 * time.Second
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		klog.InfoS("Not removing the Node's mode label", "node", node, "reason", err)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := nodelabel.Remove(ctx, client, node); err != nil {
		klog.InfoS("Could not remove the Node's mode label; the next proxy to start rewrites it", "node", node, "err", err)
		return
	}
	klog.InfoS("Removed the Node's mode label", "node", node, "label", nodelabel.Label)
}

// announce records a "Starting" Event on this node's Node object, as
// kube-proxy does, so that `kubectl describe node` and `kubectl get events`
// show which proxy, in which mode, serves the node. It returns the recorder,
// for the proxy's Events on Services (nil if Events cannot be recorded).
// Events are sent in the background; the returned function flushes and
// stops the sender.
func announce(ctx context.Context, client kubernetes.Interface, nodeName, mode string) (events.EventRecorder, func()) {
	b := events.NewBroadcaster(&events.EventSinkImpl{Interface: client.EventsV1()})
	if err := b.StartRecordingToSinkWithContext(ctx); err != nil {
		klog.ErrorS(err, "Not recording Events")
		return nil, func() {}
	}
	recorder := b.NewRecorder(scheme.Scheme, "kube-bpf-proxy")
	// Node references carry the node's name as their UID, as kubelet's
	// and kube-proxy's do, so the Events attach to the Node.
	node := &v1.ObjectReference{Kind: "Node", Name: nodeName, UID: types.UID(nodeName)}
	recorder.Eventf(node, nil, v1.EventTypeNormal,
		"Starting", "StartKubeBPFProxy", "kube-bpf-proxy started in %s mode", mode)
	return recorder, b.Shutdown
}

// nodeName follows kube-proxy: the flag, then $NODE_NAME (set from the
// downward API in the DaemonSet), then the hostname, lower-cased.
func nodeName(override string) (string, error) {
	name := override
	if name == "" {
		name = os.Getenv("NODE_NAME")
	}
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			return "", fmt.Errorf("finding the node name (pass --hostname-override): %w", err)
		}
		name = h
	}
	return strings.ToLower(strings.TrimSpace(name)), nil
}
