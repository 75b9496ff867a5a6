package main

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/apiserver"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/ebpf"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/dataplane/iptables"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodeinfo"
)

const usageLine = "usage: kube-bpf-proxy [--config=FILE] [--mode=ebpf|iptables] [--kubeconfig=PATH] [--hostname-override=NODE] [--cleanup] [--version] [flags]\n       kube-bpf-proxy probe server|client [flags]\n       kube-bpf-proxy inspect [[namespace/]name] [-o json] [flags]"

type options struct {
	// configFile is kube-proxy's KubeProxyConfiguration (config.go).
	configFile         string
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
	// detectLocalMode and the two settings of its interface modes carry
	// kube-proxy's flags and config fields; ClusterCIDR uses clusterCIDR.
	detectLocalMode        string
	podBridgeInterface     string
	podInterfaceNamePrefix string
	clusterCIDR            string
	// clusterPrefixes is clusterCIDR parsed by validate: at most one
	// range per family, as kube-proxy takes it.
	clusterPrefixes map[model.IPFamily]netip.Prefix
	// localTraffic is what validate makes of detectLocalMode and the flag
	// it reads, per family; for NodeCIDR, runProxy fills it once the Node
	// has a pod range. A family without an entry detects nothing.
	localTraffic map[model.IPFamily]iptables.LocalTraffic
	// bindAddress is kube-proxy's --bind-address: a specific address
	// makes its family the node's primary one (detectPrimaryFamily).
	bindAddress     string
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
	fs.StringVar(&o.configFile, "config", "", "kube-proxy's configuration file (a KubeProxyConfiguration of kubeproxy.config.k8s.io/v1alpha1, as kubeadm writes it): its fields set the flags they map to (docs/configuration.md); flags given on the command line win over it")
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
	fs.StringVar(&o.nodePortAddresses, "nodeport-addresses", "", "comma-separated CIDRs of the node addresses node ports are served on, or \"primary\" for the node's primary address of each family (its first InternalIP of that family, else its first ExternalIP); default every address of the node, loopback excepted in ebpf mode (name 127.0.0.0/8 to serve node ports on 127.0.0.1 there)")
	fs.StringVar(&o.serviceCIDRs, "service-cluster-ip-range", "", "comma-separated Service ranges, IPv4 or IPv6, any number of each (as the ServiceCIDR objects they stand in for), used when the ServiceCIDR objects cannot be read; connections to an address in them that is no Service's are refused at once (ebpf mode)")
	fs.StringVar(&o.bindAddress, "bind-address", "0.0.0.0", "as kube-proxy's: a specific address (not 0.0.0.0 or ::) makes its family the node's primary one, and is that family's address for --nodeport-addresses=primary; otherwise the Node's first InternalIP decides, else IPv4. The proxy serves both families whenever the node can (docs/configuration.md), the primary one alone otherwise")
	fs.StringVar(&o.iptablesBackend, "iptables-backend", iptables.BackendAuto, "iptables mode: nft, legacy, or auto (the one the node already uses, as kube-proxy's image picks it)")
	fs.StringVar(&o.clusterCIDR, "cluster-cidr", "", "iptables mode, and ebpf mode's packet layer: the pods' range, or a comma-separated pair of one IPv4 and one IPv6 range on a dual-stack cluster (as kube-proxy's); with --detect-local-mode="+localModeClusterCIDR+" (the default), ClusterIP traffic from outside it is masqueraded (ebpf mode: with --"+ebpf.FlagHostNetNSOnly+"), and pods' traffic to an external frontend of an externalTrafficPolicy Local Service goes to every endpoint")
	fs.StringVar(&o.detectLocalMode, "detect-local-mode", "", "iptables mode, and ebpf mode's packet layer: how traffic from this node's pods is told from other traffic (which is masqueraded to ClusterIPs): "+localModeClusterCIDR+" (source in --cluster-cidr; the default), "+localModeNodeCIDR+" (source in the Node's spec.podCIDRs, waited for at start; the proxy exits when they change), "+localModeBridge+" (in on --pod-bridge-interface) or "+localModePrefix+" (in on an interface named --pod-interface-name-prefix*)")
	fs.StringVar(&o.podBridgeInterface, "pod-bridge-interface", "", "with --detect-local-mode="+localModeBridge+": the bridge pods' traffic comes in on")
	fs.StringVar(&o.podInterfaceNamePrefix, "pod-interface-name-prefix", "", "with --detect-local-mode="+localModePrefix+": the prefix of the name of each pod's interface on the node (veth, cali, ...)")
	fs.BoolVar(&o.masqueradeAll, "masquerade-all", false, "iptables mode, and ebpf mode with --"+ebpf.FlagHostNetNSOnly+": masquerade all ClusterIP traffic")
	fs.IntVar(&o.masqueradeBit, "iptables-masquerade-bit", iptables.DefaultMasqueradeBit, "iptables mode: the fwmark bit (0-31) marking packets to masquerade; must match kubelet's")
	fs.BoolVar(&o.localhostNPs, "iptables-localhost-nodeports", true, "iptables mode: also serve node ports on 127.0.0.0/8 when the node port addresses include it (all do without --nodeport-addresses), as kube-proxy: sets net.ipv4.conf.all.route_localnet=1, guarded by KUBE-FIREWALL (needs a writable /proc/sys)")
	fs.DurationVar(&o.xtablesLockWait, "iptables-lock-wait", 5*time.Second, "how long iptables commands (the iptables mode's, the ebpf mode's packet layer's) wait for the xtables lock that serialises iptables users on the node (iptables -w, whole seconds; 5s as kube-proxy); a sync that finds it held longer changes nothing and is retried with a backoff from 1s up to --sync-period")
	for alias, name := range kubeProxyAliases {
		addAlias(fs, alias, name, "alias of --%s: kube-proxy's name for it")
	}
	for old, name := range ebpf.DeprecatedFlagNames {
		addAlias(fs, old, name, "deprecated alias of --%s, its name before it was named after what it sizes")
	}
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	for _, name := range []string{"v", "vmodule", "logtostderr"} {
		fs.Var(klogFlags.Lookup(name).Value, name, klogFlags.Lookup(name).Usage)
	}
	return fs
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
	prefixes, err := onePerFamily("--cluster-cidr", o.clusterCIDR, "10.244.0.0/16,fd00:10:244::/56")
	if err != nil {
		return err
	}
	o.clusterPrefixes = prefixes
	if o.bindAddress != "" {
		if _, err := netip.ParseAddr(o.bindAddress); err != nil {
			return fmt.Errorf("--bind-address %q: want an IP address such as 0.0.0.0 or 10.0.0.5", o.bindAddress)
		}
	}
	if err := o.validateLocalMode(); err != nil {
		return err
	}
	sel, err := nodeinfo.ParseSelector(splitList(o.nodePortAddresses))
	if err != nil {
		return err
	}
	o.nodePorts = sel
	for _, p := range sel.Prefixes {
		if p.Bits() > 0 && p.Contains(netip.IPv6Loopback()) {
			// kube-proxy says it on every sync; once is enough.
			klog.InfoS("--nodeport-addresses includes ::1, but node ports are never served on IPv6 localhost, as in kube-proxy", "cidr", p)
		}
	}
	// Any number of either family: the flag stands in for the
	// ServiceCIDR objects, of which a cluster may have several.
	o.serviceRanges = nil
	for _, c := range splitList(o.serviceCIDRs) {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return fmt.Errorf("--service-cluster-ip-range %q: want CIDRs such as 10.96.0.0/12,fd00:10:96::/112", c)
		}
		o.serviceRanges = append(o.serviceRanges, model.UnmapPrefix(p).Masked())
	}
	if o.syncBurst < 1 {
		return fmt.Errorf("--sync-burst %d: want at least 1", o.syncBurst)
	}
	if o.masqueradeBit < 0 || o.masqueradeBit > 31 {
		return fmt.Errorf("--iptables-masquerade-bit %d: want 0 to 31", o.masqueradeBit)
	}
	return o.connection().Validate()
}

// bindAddr is --bind-address parsed (validate checked it), invalid when
// it is unset.
func (o options) bindAddr() netip.Addr {
	ip, _ := netip.ParseAddr(o.bindAddress)
	return ip
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
	o.localTraffic = map[model.IPFamily]iptables.LocalTraffic{}
	both := func(l iptables.LocalTraffic) {
		for _, f := range model.Families {
			o.localTraffic[f] = l
		}
	}
	switch o.detectLocalMode {
	case "", localModeClusterCIDR:
		// Each family by its own range; a family without one detects
		// nothing, as kube-proxy's.
		for f, p := range o.clusterPrefixes {
			o.localTraffic[f] = iptables.LocalByCIDR(p)
		}
	case localModeNodeCIDR:
	case localModeBridge:
		if err := iptables.ValidateInterfaceName(o.podBridgeInterface); err != nil {
			return fmt.Errorf("--pod-bridge-interface (with --detect-local-mode=%s): %w", localModeBridge, err)
		}
		both(iptables.LocalByBridge(o.podBridgeInterface))
	case localModePrefix:
		if err := iptables.ValidateInterfaceName(o.podInterfaceNamePrefix); err != nil {
			return fmt.Errorf("--pod-interface-name-prefix (with --detect-local-mode=%s): %w", localModePrefix, err)
		}
		both(iptables.LocalByInterfacePrefix(o.podInterfaceNamePrefix))
	default:
		return fmt.Errorf("unknown --detect-local-mode %q: want %s, %s, %s or %s", o.detectLocalMode,
			localModeClusterCIDR, localModeNodeCIDR, localModeBridge, localModePrefix)
	}
	return nil
}

func (o options) connection() apiserver.Connection {
	return apiserver.Connection{ContentType: o.kubeAPIContentType, QPS: float32(o.kubeAPIQPS), Burst: o.kubeAPIBurst}
}

// onePerFamily parses a comma-separated list of CIDRs with at most one per
// IP family, as kube-proxy validates its clusterCIDR (and kube-apiserver
// its Service ranges): a single range, or a dual-stack pair.
func onePerFamily(flag, value, example string) (map[model.IPFamily]netip.Prefix, error) {
	out := map[model.IPFamily]netip.Prefix{}
	for _, c := range splitList(value) {
		p, err := netip.ParsePrefix(c)
		// ::ffff:10.244.0.0/112 is 10.244.0.0/16, as kube-proxy reads it.
		p = model.UnmapPrefix(p)
		if err != nil {
			return nil, fmt.Errorf("%s %q: want a CIDR, or one IPv4 and one IPv6 CIDR such as %s", flag, c, example)
		}
		f := model.FamilyOf(p.Addr())
		if old, ok := out[f]; ok {
			return nil, fmt.Errorf("%s %q: %s and %s are both %v; want at most one CIDR per IP family, such as %s", flag, value, old, p.Masked(), f, example)
		}
		out[f] = p.Masked()
	}
	return out, nil
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

// kubeProxyAliases are kube-proxy's names (cmd/kube-proxy/app/options.go)
// for flags this proxy serves under another name, so that a kube-proxy
// command line runs unchanged. kube-proxy's other flags this proxy serves
// have the same name here; docs/configuration.md lists the ones it does
// not serve.
var kubeProxyAliases = map[string]string{
	"proxy-mode":               "mode",
	"iptables-sync-period":     "sync-period",
	"iptables-min-sync-period": "min-sync-period",
}

// addAlias registers alias as another name of the flag name: both set the
// same value, and --help shows the alias with usage (a format naming the
// flag).
func addAlias(fs *flag.FlagSet, alias, name, usage string) {
	f := fs.Lookup(name)
	fs.Var(f.Value, alias, fmt.Sprintf(usage, name))
}

// canonicalFlag returns the name of the flag an alias stands for.
func canonicalFlag(name string) string {
	if n, ok := kubeProxyAliases[name]; ok {
		return n
	}
	if n, ok := ebpf.DeprecatedFlagNames[name]; ok {
		return n
	}
	return name
}

// flagsSet returns the flags the command line set, by canonical name.
func flagsSet(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[canonicalFlag(f.Name)] = true })
	return set
}

// warnDeprecated says which deprecated flag names the command line used,
// as kube-proxy's flag library does.
func warnDeprecated(fs *flag.FlagSet, stderr io.Writer) {
	fs.Visit(func(f *flag.Flag) {
		if name, ok := ebpf.DeprecatedFlagNames[f.Name]; ok {
			fmt.Fprintf(stderr, "Flag --%s has been deprecated, use --%s instead\n", f.Name, name)
		}
	})
}
