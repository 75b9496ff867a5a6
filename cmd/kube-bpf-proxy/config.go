package main

import (
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"
	kubeproxyconfig "k8s.io/kube-proxy/config/v1alpha1"
)

// The config file: --config reads kube-proxy's KubeProxyConfiguration
// (kubeproxy.config.k8s.io/v1alpha1), the file kubeadm, kind and minikube
// write into the kube-proxy ConfigMap, so that their DaemonSet runs this
// binary with only its image changed.
//
// Every field this proxy serves is mapped onto the flag that serves it, and
// set through that flag, so a value from the file is parsed and validated as
// the same value on the command line is. A flag given on the command line
// wins over the file. kube-proxy itself lets only --hostname-override and the
// logging flags win, and silently drops the others when --config is given;
// here every flag does, which is the same for the command line kubeadm
// writes (--config and --hostname-override) and never loses what an
// operator typed.
//
// A zero value in the file means kube-proxy's default, as kube-proxy's own
// defaulting reads it (kubeadm writes every field, most of them zero), so it
// leaves the flag's default in place: ours where it differs from
// kube-proxy's, such as the eBPF mode's shorter --min-sync-period.

// configCodecs know only the v1alpha1 KubeProxyConfiguration, the one
// version kube-proxy's file has ever had.
var configCodecs = func() serializer.CodecFactory {
	scheme := runtime.NewScheme()
	if err := kubeproxyconfig.AddToScheme(scheme); err != nil {
		panic(err)
	}
	// Strict: a misspelt or misplaced field is an error naming it, not a
	// setting silently left at its default.
	return serializer.NewCodecFactory(scheme, serializer.EnableStrict)
}()

// loadConfigFile reads and strictly decodes a KubeProxyConfiguration, YAML
// or JSON. It applies no defaults: zero values stay zero.
func loadConfigFile(path string) (*kubeproxyconfig.KubeProxyConfiguration, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	return decodeConfig(path, data)
}

func decodeConfig(path string, data []byte) (*kubeproxyconfig.KubeProxyConfiguration, error) {
	// No object to decode into: the file must name its apiVersion and
	// kind, as kube-proxy's own decoding requires.
	obj, gvk, err := configCodecs.UniversalDeserializer().Decode(data, nil, nil)
	if err != nil {
		if runtime.IsStrictDecodingError(err) {
			return nil, fmt.Errorf("--config %s: %v (kube-bpf-proxy reads kube-proxy's KubeProxyConfiguration strictly: remove or correct the field)", path, err)
		}
		return nil, fmt.Errorf("--config %s: want a KubeProxyConfiguration of %s: %w", path, kubeproxyconfig.SchemeGroupVersion, err)
	}
	got, ok := obj.(*kubeproxyconfig.KubeProxyConfiguration)
	if !ok {
		return nil, fmt.Errorf("--config %s: want a KubeProxyConfiguration of %s, got %s", path, kubeproxyconfig.SchemeGroupVersion, gvk)
	}
	return got, nil
}

// Kube-proxy's defaults (k8s.io/kubernetes pkg/proxy/apis/config/v1alpha1
// SetDefaults_KubeProxyConfiguration) for the fields this proxy does not
// serve: a file that spells one out (as `kube-proxy --write-config-to`
// does) asks for nothing this proxy leaves undone.
const (
	kubeProxyHealthzPort      = 10256
	kubeProxyMetricsPort      = 10249
	kubeProxyOOMScoreAdj      = -999
	kubeProxyConntrackPerCore = 32 * 1024
	kubeProxyConntrackMin     = 128 * 1024
	kubeProxyConfigSyncPeriod = 15 * time.Minute
	kubeProxySyncPeriod       = 30 * time.Second
	kubeProxyMinSyncPeriod    = time.Second
	kubeProxyMasqueradeBit    = 14
)

// configMapping is what a config file asks of the flags: each flag's value
// (flag name to value, in the flag's syntax, and the field it comes from),
// and the fields set to something this proxy does not serve.
type configMapping struct {
	flags   []configFlag
	ignored []ignoredField
}

type configFlag struct{ field, flag, value string }

// ignoredField is a field of the file this proxy does not serve, set to a
// value other than kube-proxy's default.
type ignoredField struct{ field, value string }

func (m *configMapping) set(field, flag, value string) {
	m.flags = append(m.flags, configFlag{field, flag, value})
}

func (m *configMapping) ignore(field string, value any) {
	m.ignored = append(m.ignored, ignoredField{field, fmt.Sprint(value)})
}

// mapConfig decides, field by field, what the file asks of the flags.
func mapConfig(c *kubeproxyconfig.KubeProxyConfiguration) (configMapping, error) {
	var m configMapping
	str := func(field, flag, v string) {
		if v != "" {
			m.set(field, flag, v)
		}
	}
	dur := func(field, flag string, d metav1.Duration) {
		if d.Duration != 0 {
			m.set(field, flag, d.Duration.String())
		}
	}
	notServed := func(field string, v any, defaults ...any) {
		rv := reflect.ValueOf(v)
		if !rv.IsValid() || rv.IsZero() || (rv.Kind() == reflect.Pointer && rv.IsNil()) {
			return
		}
		if rv.Kind() == reflect.Pointer {
			v = rv.Elem().Interface()
		}
		for _, d := range defaults {
			if reflect.DeepEqual(v, d) {
				return
			}
		}
		if d, ok := v.(metav1.Duration); ok {
			v = d.Duration
		}
		m.ignore(field, v)
	}

	switch c.Mode {
	case "", "iptables":
		// "" is kube-proxy's iptables mode on Linux, and kubeadm's
		// DaemonSet, which writes "", gives the container neither the
		// node's bpffs nor its cgroup root: the eBPF mode could not keep
		// its pins there. So the file's "" is iptables, served with
		// kube-proxy's rules, and the eBPF mode is asked for by name
		// (docs/replace-kube-proxy.md).
		m.set("mode", "mode", "iptables")
	case "ebpf":
		m.set("mode", "mode", "ebpf")
	default:
		return m, fmt.Errorf("mode %q: kube-bpf-proxy serves mode \"iptables\" (kube-proxy's iptables rules; \"\" means it too) or \"ebpf\" (socket-level load balancing); "+
			"set one of them in the KubeProxyConfiguration, or --mode on the command line", c.Mode)
	}

	cc := c.ClientConnection
	str("clientConnection.kubeconfig", "kubeconfig", cc.Kubeconfig)
	str("clientConnection.contentType", "kube-api-content-type", cc.ContentType)
	if cc.QPS != 0 {
		m.set("clientConnection.qps", "kube-api-qps", strconv.FormatFloat(float64(cc.QPS), 'g', -1, 32))
	}
	if cc.Burst != 0 {
		m.set("clientConnection.burst", "kube-api-burst", strconv.Itoa(int(cc.Burst)))
	}
	// Answers in JSON are always accepted, protobuf too when asked for.
	notServed("clientConnection.acceptContentTypes", cc.AcceptContentTypes)

	if err := mapLogging(&m, c.Logging); err != nil {
		return m, err
	}

	str("hostnameOverride", "hostname-override", c.HostnameOverride)
	// kube-proxy's bindAddress overrides the node's primary IP family;
	// 0.0.0.0 and :: are kubeadm's "none" (and kube-proxy's default).
	str("bindAddress", "bind-address", c.BindAddress)
	if c.HealthzBindAddress != "" {
		m.set("healthzBindAddress", "healthz-bind-address", appendPortIfNeeded(c.HealthzBindAddress, kubeProxyHealthzPort))
	}
	if c.MetricsBindAddress != "" {
		m.set("metricsBindAddress", "metrics-bind-address", appendPortIfNeeded(c.MetricsBindAddress, kubeProxyMetricsPort))
	}
	notServed("bindAddressHardFail", c.BindAddressHardFail)
	if c.EnableProfiling {
		m.set("enableProfiling", "profiling", "true")
	}
	notServed("showHiddenMetricsForVersion", c.ShowHiddenMetricsForVersion)
	if len(c.FeatureGates) > 0 {
		gates := make([]string, 0, len(c.FeatureGates))
		for g, on := range c.FeatureGates {
			gates = append(gates, g+"="+strconv.FormatBool(on))
		}
		slices.Sort(gates)
		m.ignore("featureGates", strings.Join(gates, ","))
	}

	ipt := c.IPTables
	if ipt.MasqueradeBit != nil {
		m.set("iptables.masqueradeBit", "iptables-masquerade-bit", strconv.Itoa(int(*ipt.MasqueradeBit)))
	}
	if ipt.MasqueradeAll {
		m.set("iptables.masqueradeAll", "masquerade-all", "true")
	}
	if ipt.LocalhostNodePorts != nil {
		m.set("iptables.localhostNodePorts", "iptables-localhost-nodeports", strconv.FormatBool(*ipt.LocalhostNodePorts))
	}
	// Both modes sync on these periods: kube-proxy reads iptables.* in its
	// iptables mode, the one a "" or "iptables" mode names.
	dur("iptables.syncPeriod", "sync-period", ipt.SyncPeriod)
	dur("iptables.minSyncPeriod", "min-sync-period", ipt.MinSyncPeriod)

	ipvs := c.IPVS
	notServed("ipvs.syncPeriod", ipvs.SyncPeriod, metav1.Duration{Duration: kubeProxySyncPeriod})
	notServed("ipvs.minSyncPeriod", ipvs.MinSyncPeriod)
	notServed("ipvs.scheduler", ipvs.Scheduler)
	notServed("ipvs.excludeCIDRs", strings.Join(ipvs.ExcludeCIDRs, ","))
	notServed("ipvs.strictARP", ipvs.StrictARP)
	notServed("ipvs.tcpTimeout", ipvs.TCPTimeout)
	notServed("ipvs.tcpFinTimeout", ipvs.TCPFinTimeout)
	notServed("ipvs.udpTimeout", ipvs.UDPTimeout)
	nft := c.NFTables
	notServed("nftables.masqueradeBit", nft.MasqueradeBit, int32(kubeProxyMasqueradeBit))
	notServed("nftables.masqueradeAll", nft.MasqueradeAll)
	notServed("nftables.syncPeriod", nft.SyncPeriod, metav1.Duration{Duration: kubeProxySyncPeriod})
	notServed("nftables.minSyncPeriod", nft.MinSyncPeriod, metav1.Duration{Duration: kubeProxyMinSyncPeriod})
	w := c.Winkernel
	notServed("winkernel.networkName", w.NetworkName)
	notServed("winkernel.sourceVip", w.SourceVip)
	notServed("winkernel.enableDSR", w.EnableDSR)
	notServed("winkernel.rootHnsEndpointName", w.RootHnsEndpointName)
	notServed("winkernel.forwardHealthCheckVip", w.ForwardHealthCheckVip)
	notServed("windowsRunAsService", c.WindowsRunAsService)

	str("detectLocalMode", "detect-local-mode", string(c.DetectLocalMode))
	str("detectLocal.bridgeInterface", "pod-bridge-interface", c.DetectLocal.BridgeInterface)
	str("detectLocal.interfaceNamePrefix", "pod-interface-name-prefix", c.DetectLocal.InterfaceNamePrefix)
	// A range, or a dual-stack pair, validated as the flag's value.
	str("clusterCIDR", "cluster-cidr", c.ClusterCIDR)
	if len(c.NodePortAddresses) > 0 {
		m.set("nodePortAddresses", "nodeport-addresses", strings.Join(c.NodePortAddresses, ","))
	}

	notServed("oomScoreAdj", c.OOMScoreAdj, int32(kubeProxyOOMScoreAdj))
	ct := c.Conntrack
	notServed("conntrack.maxPerCore", ct.MaxPerCore, int32(kubeProxyConntrackPerCore))
	notServed("conntrack.min", ct.Min, int32(kubeProxyConntrackMin))
	notServed("conntrack.tcpEstablishedTimeout", ct.TCPEstablishedTimeout, metav1.Duration{Duration: 24 * time.Hour})
	notServed("conntrack.tcpCloseWaitTimeout", ct.TCPCloseWaitTimeout, metav1.Duration{Duration: time.Hour})
	notServed("conntrack.tcpBeLiberal", ct.TCPBeLiberal)
	notServed("conntrack.udpTimeout", ct.UDPTimeout)
	notServed("conntrack.udpStreamTimeout", ct.UDPStreamTimeout)
	// The informers never resync: every change arrives by watch, and a
	// periodic re-delivery of the cache would change nothing.
	notServed("configSyncPeriod", c.ConfigSyncPeriod, metav1.Duration{Duration: kubeProxyConfigSyncPeriod})
	notServed("portRange", c.PortRange)
	return m, nil
}

// mapLogging maps the logging section onto klog's flags: verbosity and
// vmodule. The text format is the only one; its other settings keep
// klog's defaults.
func mapLogging(m *configMapping, l logsapi.LoggingConfiguration) error {
	if l.Verbosity != 0 {
		m.set("logging.verbosity", "v", strconv.Itoa(int(l.Verbosity)))
	}
	if len(l.VModule) > 0 {
		items := make([]string, 0, len(l.VModule))
		for _, it := range l.VModule {
			items = append(items, fmt.Sprintf("%s=%d", it.FilePattern, it.Verbosity))
		}
		m.set("logging.vmodule", "vmodule", strings.Join(items, ","))
	}
	var def logsapi.LoggingConfiguration
	logsapi.SetRecommendedLoggingConfiguration(&def)
	if l.Format != "" && l.Format != def.Format {
		m.ignore("logging.format", l.Format)
	}
	if d := l.FlushFrequency.Duration.Duration; d != 0 && d != def.FlushFrequency.Duration.Duration {
		m.ignore("logging.flushFrequency", d)
	}
	if !reflect.DeepEqual(l.Options, logsapi.FormatOptions{}) && !reflect.DeepEqual(l.Options, def.Options) {
		m.ignore("logging.options", fmt.Sprintf("%+v", l.Options))
	}
	return nil
}

// appendPortIfNeeded adds kube-proxy's default port to an address given
// without one, as kube-proxy's defaulting does ("0.0.0.0" serves on
// 0.0.0.0:10256).
func appendPortIfNeeded(addr string, port int) string {
	if _, _, err := net.SplitHostPort(addr); err == nil {
		return addr
	}
	if ip, err := netip.ParseAddr(addr); err == nil {
		return net.JoinHostPort(ip.String(), strconv.Itoa(port))
	}
	return addr // not an address: the flag's validation says so
}

// applyConfigFile sets, from the file at path, every flag the command line
// did not set (onCommandLine, by canonical flag name). It returns the
// fields the file sets that this proxy does not serve, for the caller to
// log once the flags (-v among them) are in place.
func applyConfigFile(fs *flag.FlagSet, path string, onCommandLine map[string]bool) ([]ignoredField, error) {
	cfg, err := loadConfigFile(path)
	if err != nil {
		return nil, err
	}
	m, err := mapConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	for _, f := range m.flags {
		if onCommandLine[f.flag] {
			continue
		}
		if err := fs.Set(f.flag, f.value); err != nil {
			return nil, fmt.Errorf("--config %s: %s %q: %v", path, f.field, f.value, err)
		}
	}
	return m.ignored, nil
}

// logIgnoredFields says once, at start, which settings of the file this
// proxy leaves undone.
func logIgnoredFields(path string, fields []ignoredField) {
	for _, f := range fields {
		klog.InfoS("Ignoring a KubeProxyConfiguration field kube-bpf-proxy does not serve", "config", path, "field", f.field, "value", f.value)
	}
}
