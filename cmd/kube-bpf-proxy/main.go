// Command kube-bpf-proxy replaces kube-proxy on a Kubernetes node: it watches
// Services and EndpointSlices and load-balances them in the kernel, with eBPF
// programs at socket level (--mode=ebpf, the default) or with kube-proxy-style
// iptables rules (--mode=iptables).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
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
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/metrics"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodeinfo"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodelabel"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/probe"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/proxy"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/version"
)

const usageLine = "usage: kube-bpf-proxy [--mode=ebpf|iptables] [--kubeconfig=PATH] [--hostname-override=NODE] [--cleanup] [--version] [flags]\n       kube-bpf-proxy probe server|client [flags]"

type options struct {
	mode               string
	kubeconfig         string
	hostnameOverride   string
	cgroupPath         string
	bpffsPath          string
	cleanup            bool
	version            bool
	maxServices        uint
	maxBackends        uint
	maxSockets         uint
	maxFrontends       uint
	maxAffinity        uint
	netnsDirs          string
	hostNetNSOnly      bool
	minSyncPeriod      time.Duration
	syncBurst          int
	syncPeriod         time.Duration
	healthzBindAddress string
	metricsBindAddress string
	profiling          bool
	// afterFirstSync, if set, runs once the first sync has programmed the
	// node (applyMemoryDefaults).
	afterFirstSync func()

	kubeAPIContentType string
	kubeAPIQPS         float64 // the flag package has no float32
	kubeAPIBurst       int

	nodePortAddresses string
	nodePorts         nodeinfo.Selector // nodePortAddresses parsed by validate
	serviceCIDRs      string
	serviceRanges     []netip.Prefix // serviceCIDRs parsed by validate

	iptablesBackend string
	clusterCIDR     string
	clusterPrefix   netip.Prefix // clusterCIDR parsed by validate

	detectLocalMode        string
	podBridgeInterface     string
	podInterfaceNamePrefix string
	// localTraffic is what validate makes of the three above; for
	// NodeCIDR, runProxy fills it once the Node has a pod range.
	localTraffic    iptables.LocalTraffic
	masqueradeAll   bool
	masqueradeBit   int
	xtablesLockWait time.Duration
	localhostNPs    bool
}

func newFlagSet(o *options, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("kube-bpf-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, usageLine)
		fs.PrintDefaults()
	}
	fs.StringVar(&o.mode, "mode", "ebpf", "datapath: ebpf (socket-level load balancing) or iptables (kube-proxy's rules)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file; empty means the in-cluster configuration, whose $KUBERNETES_SERVICE_HOST and $KUBERNETES_SERVICE_PORT must be the API server's own address, not the kubernetes Service's ClusterIP")
	fs.StringVar(&o.hostnameOverride, "hostname-override", "", "this node's name; default $NODE_NAME, then the hostname")
	fs.StringVar(&o.cgroupPath, "cgroup-path", "", "cgroup v2 directory the eBPF programs attach to; default the cgroup2 mount root, which covers every socket on the node")
	fs.StringVar(&o.bpffsPath, "bpffs-path", "/sys/fs/bpf/kube-bpf-proxy", "directory on a bpffs for pinned maps and links; bpffs is mounted on its parent if missing")
	fs.BoolVar(&o.cleanup, "cleanup", false, "remove every map, link, program and pin this binary owns, and this node's kube-bpf-proxy.io/mode label if the API server is configured and reachable, then exit")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.UintVar(&o.maxServices, ebpf.FlagMaxServices, ebpf.DefaultMaxServices, "capacity in service ports (one per Service port and protocol; two under internalTrafficPolicy Local with external frontends): service ids, their counters and the ClusterIP set")
	fs.UintVar(&o.maxBackends, ebpf.FlagMaxBackends, ebpf.DefaultMaxBackends, "capacity of the eBPF backend and slot maps, in backend references summed over all service ports")
	fs.UintVar(&o.maxSockets, ebpf.FlagMaxRevNAT, ebpf.DefaultMaxRevNAT, "open sockets whose replies and peer name are shown as the Service address (each entry goes when its socket closes); sockets translated beyond it show the backend's address")
	fs.UintVar(&o.maxFrontends, ebpf.FlagMaxFrontends, ebpf.DefaultMaxFrontends, "capacity of the eBPF frontend map: ClusterIPs, plus node ports on each node port address, and the external and load balancer IPs the socket layer serves")
	fs.UintVar(&o.maxAffinity, ebpf.FlagMaxAffinity, ebpf.DefaultMaxAffinity, "(client network namespace, service port) pairs whose ClientIP session affinity is remembered; the least recently used is forgotten first")
	fs.StringVar(&o.netnsDirs, "netns-dir", strings.Join(ebpf.DefaultNetNSDirs, ","), "ebpf mode: comma-separated directories where the container runtime pins pods' network namespaces; connected UDP sockets there whose backend stopped serving are destroyed (entering them needs CAP_SYS_ADMIN); empty: the node's namespace only")
	fs.BoolVar(&o.hostNetNSOnly, ebpf.FlagHostNetNSOnly, false, "ebpf mode: load-balance at socket level only the node's own network namespace (its processes, hostNetwork pods); pods' Service traffic, ClusterIPs included, is served by iptables rules per packet, so that a service mesh sidecar redirecting it with iptables (Istio, Linkerd) sees the Service address as the original destination")
	fs.DurationVar(&o.minSyncPeriod, "min-sync-period", 0, "least time between two datapath syncs, on average once --sync-burst syncs have run back to back; changes arriving faster are batched (default 100ms in ebpf mode, where map updates are cheap; 1s in iptables mode, as kube-proxy)")
	fs.IntVar(&o.syncBurst, "sync-burst", 0, "how many datapath syncs may start back to back, each as soon as the previous one ends, before --min-sync-period holds them apart (default 10 in ebpf mode, so that a change never waits behind an idle interval; 1 in iptables mode, as kube-proxy)")
	fs.DurationVar(&o.syncPeriod, "sync-period", 30*time.Second, "most time between two syncs; a period without changes only checks that the iptables rules are in place (kube-proxy's canary chains), and full syncs (every rule and map entry rewritten) run once an hour (not above 1000 endpoints), after a failure, and when the rules were flushed, as kube-proxy's")
	fs.StringVar(&o.healthzBindAddress, "healthz-bind-address", "0.0.0.0:10256", "address of /healthz and /livez")
	fs.StringVar(&o.metricsBindAddress, "metrics-bind-address", "127.0.0.1:10249", "address of /metrics")
	fs.BoolVar(&o.profiling, "profiling", false, "serve Go's profiles at /debug/pprof/ on the metrics address, as kube-proxy's flag")
	conn := apiserver.DefaultConnection()
	fs.StringVar(&o.kubeAPIContentType, apiserver.FlagContentType, conn.ContentType, "encoding of the API requests and answers: "+apiserver.ContentTypeProtobuf+" (as kube-proxy; much cheaper to decode, which matters when a node starts with many Services) or "+apiserver.ContentTypeJSON+"; JSON stays accepted in answers either way")
	fs.Float64Var(&o.kubeAPIQPS, apiserver.FlagQPS, float64(conn.QPS), "sustained API requests per second the proxy allows itself (its informers' lists and watches, Events, the Node label); 0: client-go's default, negative: no limit")
	fs.IntVar(&o.kubeAPIBurst, apiserver.FlagBurst, conn.Burst, "API requests the proxy may send at once above --"+apiserver.FlagQPS+"; at least 1 while that is above 0")
	fs.StringVar(&o.nodePortAddresses, "nodeport-addresses", "", "comma-separated CIDRs of the node addresses node ports are served on, or \"primary\" for the node's primary address (its first InternalIP); default every address of the node, loopback excepted in ebpf mode (name 127.0.0.0/8 to serve node ports on 127.0.0.1 there)")
	fs.StringVar(&o.serviceCIDRs, "service-cluster-ip-range", "", "comma-separated IPv4 Service ranges, used when the ServiceCIDR objects cannot be read; connections to an address in them that is no Service's are refused at once (ebpf mode)")
	fs.StringVar(&o.iptablesBackend, "iptables-backend", iptables.BackendAuto, "iptables mode: nft, legacy, or auto (the one the node already uses, as kube-proxy's image picks it)")
	fs.StringVar(&o.clusterCIDR, "cluster-cidr", "", "iptables mode, and ebpf mode's packet layer: the pods' IPv4 range; with --detect-local-mode="+localModeClusterCIDR+" (the default), ClusterIP traffic from outside it is masqueraded (ebpf mode: with --"+ebpf.FlagHostNetNSOnly+"), and pods' traffic to an external frontend of an externalTrafficPolicy Local Service goes to every endpoint")
	fs.StringVar(&o.detectLocalMode, "detect-local-mode", "", "iptables mode, and ebpf mode's packet layer: how traffic from this node's pods is told from other traffic (which is masqueraded to ClusterIPs): "+localModeClusterCIDR+" (source in --cluster-cidr; the default), "+localModeNodeCIDR+" (source in the Node's spec.podCIDRs, waited for at start; the proxy exits when they change), "+localModeBridge+" (in on --pod-bridge-interface) or "+localModePrefix+" (in on an interface named --pod-interface-name-prefix*)")
	fs.StringVar(&o.podBridgeInterface, "pod-bridge-interface", "", "with --detect-local-mode="+localModeBridge+": the bridge pods' traffic comes in on")
	fs.StringVar(&o.podInterfaceNamePrefix, "pod-interface-name-prefix", "", "with --detect-local-mode="+localModePrefix+": the prefix of the name of each pod's interface on the node (veth, cali, ...)")
	fs.BoolVar(&o.masqueradeAll, "masquerade-all", false, "iptables mode, and ebpf mode with --"+ebpf.FlagHostNetNSOnly+": masquerade all ClusterIP traffic")
	fs.IntVar(&o.masqueradeBit, "iptables-masquerade-bit", iptables.DefaultMasqueradeBit, "iptables mode: the fwmark bit (0-31) marking packets to masquerade; must match kubelet's")
	fs.BoolVar(&o.localhostNPs, "iptables-localhost-nodeports", true, "iptables mode: also serve node ports on 127.0.0.0/8 when the node port addresses include it (all do without --nodeport-addresses), as kube-proxy: sets net.ipv4.conf.all.route_localnet=1, guarded by KUBE-FIREWALL (needs a writable /proc/sys)")
	fs.DurationVar(&o.xtablesLockWait, "iptables-lock-wait", 5*time.Second, "how long iptables commands (the iptables mode's, the ebpf mode's packet layer's) wait for the xtables lock that serialises iptables users on the node (iptables -w, whole seconds; 5s as kube-proxy); a sync that finds it held longer changes nothing and is retried with a backoff from 1s up to --sync-period")
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	for _, name := range []string{"v", "vmodule", "logtostderr"} {
		fs.Var(klogFlags.Lookup(name).Value, name, klogFlags.Lookup(name).Usage)
	}
	return fs
}

// run is main without the exit, for tests: 0 on success, 1 on failure, 2 on
// a usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "probe" {
		// The latency probe ships in the proxy's image as a subcommand
		// with flags of its own.
		return probe.Main(ctx, args[1:], stderr, os.LookupEnv)
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
	if o.version {
		fmt.Fprintln(stdout, "kube-bpf-proxy", version.Get())
		return 0
	}
	if err := o.validate(); err != nil {
		fmt.Fprintf(stderr, "%v\n%s\n", err, usageLine)
		return 2
	}

	if o.cleanup {
		// Both modes, whichever was running: this is how a node goes back
		// to kube-proxy or to nothing.
		err := errors.Join(ebpf.Cleanup(o.bpffsPath), iptables.Cleanup(ctx, o.iptablesConfig()))
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

func (o *options) validate() error {
	switch o.mode {
	case "ebpf":
		if o.minSyncPeriod == 0 {
			o.minSyncPeriod = 100 * time.Millisecond
		}
		if o.syncBurst == 0 {
			o.syncBurst = 10
		}
	case "iptables":
		if o.minSyncPeriod == 0 {
			o.minSyncPeriod = time.Second
		}
		if o.syncBurst == 0 {
			o.syncBurst = 1
		}
	default:
		return fmt.Errorf("unknown --mode %q: want ebpf or iptables", o.mode)
	}
	switch o.iptablesBackend {
	case iptables.BackendAuto, iptables.BackendNFT, iptables.BackendLegacy:
	default:
		return fmt.Errorf("unknown --iptables-backend %q: want auto, nft or legacy", o.iptablesBackend)
	}
	if o.clusterCIDR != "" {
		p, err := netip.ParsePrefix(o.clusterCIDR)
		if err != nil || !p.Addr().Is4() {
			return fmt.Errorf("--cluster-cidr %q: want an IPv4 CIDR such as 10.244.0.0/16", o.clusterCIDR)
		}
		o.clusterPrefix = p.Masked()
	}
	if err := o.validateLocalMode(); err != nil {
		return err
	}
	sel, err := nodeinfo.ParseSelector(splitList(o.nodePortAddresses))
	if err != nil {
		return err
	}
	o.nodePorts = sel
	o.serviceRanges = nil
	for _, c := range splitList(o.serviceCIDRs) {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return fmt.Errorf("--service-cluster-ip-range %q: want CIDRs such as 10.96.0.0/12", c)
		}
		if p.Addr().Is4() {
			o.serviceRanges = append(o.serviceRanges, p.Masked())
		}
	}
	if o.syncBurst < 1 {
		return fmt.Errorf("--sync-burst %d: want at least 1", o.syncBurst)
	}
	if o.masqueradeBit < 0 || o.masqueradeBit > 31 {
		return fmt.Errorf("--iptables-masquerade-bit %d: want 0 to 31", o.masqueradeBit)
	}
	return o.connection().Validate()
}

// kube-proxy's --detect-local-mode values.
const (
	localModeClusterCIDR = "ClusterCIDR"
	localModeNodeCIDR    = "NodeCIDR"
	localModeBridge      = "BridgeInterface"
	localModePrefix      = "InterfaceNamePrefix"
)

// validateLocalMode checks --detect-local-mode and the flag it reads, and
// sets localTraffic, as kube-proxy picks its detector (cmd/kube-proxy
// getLocalDetectors): ClusterCIDR without --cluster-cidr detects nothing.
func (o *options) validateLocalMode() error {
	o.localTraffic = iptables.LocalTraffic{}
	switch o.detectLocalMode {
	case "", localModeClusterCIDR:
		if o.clusterPrefix.IsValid() {
			o.localTraffic = iptables.LocalByCIDR(o.clusterPrefix)
		}
	case localModeNodeCIDR:
	case localModeBridge:
		if err := iptables.ValidateInterfaceName(o.podBridgeInterface); err != nil {
			return fmt.Errorf("--pod-bridge-interface (with --detect-local-mode=%s): %w", localModeBridge, err)
		}
		o.localTraffic = iptables.LocalByBridge(o.podBridgeInterface)
	case localModePrefix:
		if err := iptables.ValidateInterfaceName(o.podInterfaceNamePrefix); err != nil {
			return fmt.Errorf("--pod-interface-name-prefix (with --detect-local-mode=%s): %w", localModePrefix, err)
		}
		o.localTraffic = iptables.LocalByInterfacePrefix(o.podInterfaceNamePrefix)
	default:
		return fmt.Errorf("unknown --detect-local-mode %q: want %s, %s, %s or %s", o.detectLocalMode,
			localModeClusterCIDR, localModeNodeCIDR, localModeBridge, localModePrefix)
	}
	return nil
}

func (o options) connection() apiserver.Connection {
	return apiserver.Connection{ContentType: o.kubeAPIContentType, QPS: float32(o.kubeAPIQPS), Burst: o.kubeAPIBurst}
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

func (o options) iptablesConfig() iptables.Config {
	return iptables.Config{
		Backend:       o.iptablesBackend,
		LocalTraffic:  o.localTraffic,
		MasqueradeAll: o.masqueradeAll,
		MasqueradeBit: &o.masqueradeBit,
		LockWait:      o.xtablesLockWait,
		// The ebpf mode's packet layer never serves them: ExternalOnly
		// turns them off.
		LocalhostNodePorts: &o.localhostNPs,
	}
}

// packetLayerConfig is the ebpf mode's packet layer. Packets no socket on
// the node sent (from outside, to a node port, an external or load
// balancer IP) are served per packet, by the iptables rules of those
// frontends only; and, when the socket layer serves the node's own network
// namespace only, pods' packets to every frontend, by the ClusterIP rules
// too. The first full sync writes or removes those, so a restart with the
// other value of the flag converges.
func (o options) packetLayerConfig() iptables.Config {
	cfg := o.iptablesConfig()
	cfg.ExternalOnly = true
	cfg.ClusterIPs = o.hostNetNSOnly
	return cfg
}

// newDataplane starts the mode's datapath, wrapped so that the other mode's
// leftovers go once it serves. It also returns the iptables backend in use
// (in the ebpf mode, the packet layer's).
func newDataplane(ctx context.Context, o options) (dataplane.Dataplane, string, error) {
	if o.mode == "iptables" {
		dp, err := iptables.New(ctx, o.iptablesConfig())
		if err != nil {
			return nil, "", fmt.Errorf("starting the iptables datapath: %w", err)
		}
		klog.InfoS("Starting kube-bpf-proxy", "mode", o.mode, "backend", dp.Backend(), "version", version.Get())
		return dataplane.WithHandover(dp, "ebpf", func(context.Context) error { return ebpf.Cleanup(o.bpffsPath) }), dp.Backend(), nil
	}
	cgroupPath := o.cgroupPath
	if cgroupPath == "" {
		var err error
		if cgroupPath, err = cgroups.Cgroup2Mount(); err != nil {
			return nil, "", err
		}
	}
	dp, err := ebpf.New(ebpf.Config{
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
	packets, err := iptables.New(ctx, o.packetLayerConfig())
	if err != nil {
		dp.Close()
		return nil, "", fmt.Errorf("starting the packet layer (iptables rules for traffic from outside the node): %w", err)
	}
	klog.InfoS("Starting kube-bpf-proxy", "mode", o.mode, "cgroup", cgroupPath, "bpffs", o.bpffsPath,
		"packetLayerBackend", packets.Backend(), "socketLBHostNetNSOnly", o.hostNetNSOnly, "version", version.Get())
	layered := &dataplane.Layered{Primary: dp, Packets: packets}
	if o.hostNetNSOnly {
		// Pods leave the socket layer only once the packet layer has
		// their ClusterIP rules (at once if the previous run had them).
		layered.PacketsServe = dp.ConfineToNodeNetNS
	}
	return dataplane.WithHandover(layered, "iptables", func(ctx context.Context) error {
		// The packet layer's full syncs take over its own backend.
		return iptables.CleanupExcept(ctx, o.iptablesConfig(), packets.Backend())
	}), packets.Backend(), nil
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
		}
		if _, err := ebpf.Preflight(o.cgroupPath); err != nil {
			return err
		}
	}
	go apiserver.Probe(ctx, client.Discovery().RESTClient(), target, apiserver.ProbeTimeout, 5*time.Second)
	var podCIDR netip.Prefix
	if o.detectLocalMode == localModeNodeCIDR {
		// As kube-proxy: the rules need the Node's pod range, so nothing
		// starts before it is allocated (5 minutes at most).
		klog.InfoS("Waiting for the Node's pod range (--detect-local-mode=NodeCIDR)", "node", nodeName)
		if podCIDR, err = nodeinfo.WaitForPodCIDR(ctx, client, nodeName, time.Second, 5*time.Minute); err != nil {
			return err
		}
		klog.InfoS("Telling local traffic by the Node's pod range", "podCIDR", podCIDR)
		o.localTraffic = iptables.LocalByCIDR(podCIDR)
	}
	// The datapath starts (loads, verifies and attaches the programs,
	// opens the pins) while the informers list the Services and
	// EndpointSlices; proxy.RunOpening waits for both before it syncs.
	// Closing releases our handles only; the datapath (pinned programs or
	// rules) keeps serving until the next start takes it over.
	var dp dataplane.Dataplane
	defer func() {
		if dp != nil {
			dp.Close()
		}
	}()
	open := func(ctx context.Context) (dataplane.Dataplane, error) {
		d, backend, err := newDataplane(ctx, o)
		if err != nil {
			return nil, err
		}
		dp = d
		metrics.RegisterInfo(reg, o.mode, backend, version.Get())
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
			PodCIDR:      podCIDR,
		}),
		Registry: reg,
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

// splitList splits a comma-separated flag value, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	klog.Flush()
	os.Exit(code)
}
