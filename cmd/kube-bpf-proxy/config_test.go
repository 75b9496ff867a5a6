package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// writeConfig writes a config file for one test and returns its path.
func writeConfig(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.conf")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

const configHeader = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"

// parseWithConfig runs the command line's parsing, config file and
// validation as run does, and returns the options and the ignored fields.
func parseWithConfig(t *testing.T, config string, args ...string) (options, []ignoredField, error) {
	t.Helper()
	var o options
	fs := newFlagSet(&o, io.Discard)
	args = append([]string{"--config=" + writeConfig(t, config)}, args...)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("parsing %q: %v", args, err)
	}
	ignored, err := applyConfigFile(fs, o.configFile, flagsSet(fs))
	if err != nil {
		return o, nil, err
	}
	return o, ignored, o.validate()
}

func TestConfigFileSetsFlags(t *testing.T) {
	tests := []struct {
		name   string
		config string
		args   []string
		check  func(o options) string
	}{
		{
			name:   "empty mode is kube-proxy's iptables",
			config: "mode: \"\"\n",
			check:  func(o options) string { return want(o.mode, "iptables") },
		},
		{
			name:   "ebpf by name",
			config: "mode: ebpf\n",
			check:  func(o options) string { return want(o.mode, "ebpf") },
		},
		{
			name:   "the command line's mode wins",
			config: "mode: iptables\n",
			args:   []string{"--mode=ebpf"},
			check:  func(o options) string { return want(o.mode, "ebpf") },
		},
		{
			name: "client connection",
			config: `clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  contentType: application/json
  qps: 7.5
  burst: 20
`,
			check: func(o options) string {
				return want(o.kubeconfig, "/var/lib/kube-proxy/kubeconfig.conf") + want(o.kubeAPIContentType, "application/json") +
					want(o.kubeAPIQPS, 7.5) + want(o.kubeAPIBurst, 20)
			},
		},
		{
			name:   "zero client connection keeps the defaults",
			config: "clientConnection:\n  kubeconfig: \"\"\n  qps: 0\n  burst: 0\n  contentType: \"\"\n",
			check: func(o options) string {
				return want(o.kubeconfig, "") + want(o.kubeAPIContentType, "application/vnd.kubernetes.protobuf") + want(o.kubeAPIQPS, 5.0) + want(o.kubeAPIBurst, 10)
			},
		},
		{
			name: "iptables section",
			config: `mode: iptables
iptables:
  masqueradeBit: 15
  masqueradeAll: true
  localhostNodePorts: false
  syncPeriod: 1m
  minSyncPeriod: 2s
`,
			check: func(o options) string {
				return want(o.masqueradeBit, 15) + want(o.masqueradeAll, true) + want(o.localhostNPs, false) +
					want(o.syncPeriod, time.Minute) + want(o.minSyncPeriod, 2*time.Second)
			},
		},
		{
			name:   "zero periods leave the mode's defaults",
			config: "mode: ebpf\niptables:\n  syncPeriod: 0s\n  minSyncPeriod: 0s\n  masqueradeBit: null\n",
			check: func(o options) string {
				return want(o.syncPeriod, 30*time.Second) + want(o.minSyncPeriod, 100*time.Millisecond) + want(o.masqueradeBit, 14)
			},
		},
		{
			name:   "the command line's period wins",
			config: "iptables:\n  minSyncPeriod: 5s\n",
			args:   []string{"--min-sync-period=3s"},
			check:  func(o options) string { return want(o.minSyncPeriod, 3*time.Second) },
		},
		{
			name:   "addresses get kube-proxy's default ports",
			config: "healthzBindAddress: 0.0.0.0\nmetricsBindAddress: \"::\"\n",
			check: func(o options) string {
				return want(o.healthzBindAddress, "0.0.0.0:10256") + want(o.metricsBindAddress, "[::]:10249")
			},
		},
		{
			name:   "addresses with ports",
			config: "healthzBindAddress: 127.0.0.1:1234\nmetricsBindAddress: 0.0.0.0:10249\n",
			check: func(o options) string {
				return want(o.healthzBindAddress, "127.0.0.1:1234") + want(o.metricsBindAddress, "0.0.0.0:10249")
			},
		},
		{
			name:   "hostname override: the flag wins",
			config: "hostnameOverride: from-file\n",
			args:   []string{"--hostname-override=from-flag"},
			check:  func(o options) string { return want(o.hostnameOverride, "from-flag") },
		},
		{
			name:   "hostname override from the file",
			config: "hostnameOverride: from-file\n",
			check:  func(o options) string { return want(o.hostnameOverride, "from-file") },
		},
		{
			name:   "dual-stack cluster CIDR",
			config: "clusterCIDR: 10.244.0.0/16,fd00:10:244::/56\n",
			check: func(o options) string {
				return want(o.clusterCIDR, "10.244.0.0/16,fd00:10:244::/56") +
					want(o.clusterPrefixes[model.IPv6].String(), "fd00:10:244::/56") + want(o.clusterPrefixes[model.IPv4].String(), "10.244.0.0/16")
			},
		},
		{
			name:   "bind address",
			config: "bindAddress: 10.0.0.5\n",
			check:  func(o options) string { return want(o.bindAddress, "10.0.0.5") },
		},
		{
			name:   "detect-local settings",
			config: "detectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: cbr0\n  interfaceNamePrefix: veth\n",
			check: func(o options) string {
				return want(o.detectLocalMode, "BridgeInterface") + want(o.podBridgeInterface, "cbr0") + want(o.podInterfaceNamePrefix, "veth")
			},
		},
		{
			name:   "node port addresses",
			config: "nodePortAddresses: [10.0.0.0/8, 192.168.0.0/16]\n",
			check:  func(o options) string { return want(o.nodePortAddresses, "10.0.0.0/8,192.168.0.0/16") },
		},
		{
			name:   "node port addresses primary",
			config: "nodePortAddresses: [primary]\n",
			check:  func(o options) string { return want(o.nodePortAddresses, "primary") },
		},
		{
			name:   "profiling",
			config: "enableProfiling: true\n",
			check:  func(o options) string { return want(o.profiling, true) },
		},
		{
			name:   "JSON",
			config: `{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration", "mode": "ebpf", "clusterCIDR": "10.1.0.0/16"}`,
			check:  func(o options) string { return want(o.mode, "ebpf") + want(o.clusterCIDR, "10.1.0.0/16") },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			config := tt.config
			if !strings.HasPrefix(config, "{") {
				config = configHeader + config
			}
			o, _, err := parseWithConfig(t, config, tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			if diff := tt.check(o); diff != "" {
				t.Error(diff)
			}
		})
	}
}

func want[T comparable](got, want T) string {
	if got != want {
		return fmt.Sprintf("got %v, want %v; ", got, want)
	}
	return ""
}

// Errors in the file end the command with a usage error (2) naming what is
// wrong.
func TestConfigFileErrors(t *testing.T) {
	tests := []struct {
		name    string
		config  string
		args    []string
		wantErr string
	}{
		{"unknown field", configHeader + "mode: iptables\nproxyMode: ebpf\n", nil, `unknown field "proxyMode"`},
		{"misplaced field", configHeader + "iptables:\n  scheduler: rr\n", nil, `unknown field "iptables.scheduler"`},
		{"duplicate field", configHeader + "mode: iptables\nmode: ebpf\n", nil, `"mode" already set`},
		{"wrong kind", "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n", nil, "KubeletConfiguration"},
		{"no apiVersion", "kind: KubeProxyConfiguration\nmode: iptables\n", nil, "want a KubeProxyConfiguration of kubeproxy.config.k8s.io/v1alpha1"},
		{"not YAML", configHeader + "mode: [\n", nil, "--config"},
		{"nftables mode", configHeader + "mode: nftables\n", nil, `mode "nftables": kube-bpf-proxy serves mode "iptables"`},
		{"ipvs mode", configHeader + "mode: ipvs\n", nil, `mode "ipvs"`},
		{"bad value", configHeader + "iptables:\n  masqueradeBit: 40\n", nil, "--iptables-masquerade-bit 40: want 0 to 31"},
		{"bad CIDR", configHeader + "clusterCIDR: 10.244.0.0\n", nil, "--cluster-cidr"},
		{"two CIDRs of one family", configHeader + "clusterCIDR: 10.244.0.0/16,10.245.0.0/16\n", nil, "at most one CIDR per IP family"},
		{"bad detect-local mode", configHeader + "detectLocalMode: Magic\n", nil, `unknown --detect-local-mode "Magic"`},
		{"wrong type", configHeader + "clientConnection:\n  burst: many\n", nil, "--config"},
		{"missing file", "", []string{"--config=/nonexistent/config.conf"}, "--config: open /nonexistent/config.conf"},
		{"a bad file even with the flag set", configHeader + "mode: nftables\n", []string{"--mode=ebpf"}, `mode "nftables"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			if tt.config != "" {
				args = append([]string{"--config=" + writeConfig(t, tt.config)}, args...)
			}
			var stderr bytes.Buffer
			code := run(context.Background(), args, io.Discard, &stderr)
			if code != 2 || !strings.Contains(stderr.String(), tt.wantErr) {
				t.Errorf("run(%q) = %d, stderr %q; want 2 and %q", args, code, stderr.String(), tt.wantErr)
			}
		})
	}
}

// A field this proxy does not serve, set to something other than
// kube-proxy's default, is reported; zero values and kube-proxy's own
// defaults are not.
func TestConfigFileIgnoredFields(t *testing.T) {
	tests := []struct {
		name   string
		config string
		want   []ignoredField
	}{
		{"zero values", `bindAddress: ""
oomScoreAdj: null
conntrack:
  maxPerCore: null
  min: null
  tcpEstablishedTimeout: null
  udpTimeout: 0s
ipvs:
  scheduler: ""
  syncPeriod: 0s
nftables:
  masqueradeBit: null
configSyncPeriod: 0s
featureGates: {}
logging:
  flushFrequency: 0
  verbosity: 0
`, nil},
		{"kube-proxy's defaults spelt out", `bindAddress: 0.0.0.0
oomScoreAdj: -999
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpEstablishedTimeout: 24h0m0s
  tcpCloseWaitTimeout: 1h0m0s
ipvs:
  syncPeriod: 30s
nftables:
  masqueradeBit: 14
  syncPeriod: 30s
  minSyncPeriod: 1s
configSyncPeriod: 15m0s
logging:
  format: text
  flushFrequency: 5s
`, nil},
		{"fields set", `bindAddress: 10.0.0.5
oomScoreAdj: -500
conntrack:
  maxPerCore: 0
  tcpBeLiberal: true
  udpTimeout: 30s
ipvs:
  scheduler: rr
  excludeCIDRs: [10.0.0.0/8]
nftables:
  masqueradeAll: true
configSyncPeriod: 1m
featureGates:
  B: true
  A: false
portRange: 30000-32767
logging:
  format: json
clusterCIDR: 10.244.0.0/16,fd00::/56
`, []ignoredField{
			{"logging.format", "json"},
			{"featureGates", "A=false,B=true"},
			{"ipvs.scheduler", "rr"},
			{"ipvs.excludeCIDRs", "10.0.0.0/8"},
			{"nftables.masqueradeAll", "true"},
			{"oomScoreAdj", "-500"},
			{"conntrack.maxPerCore", "0"},
			{"conntrack.tcpBeLiberal", "true"},
			{"conntrack.udpTimeout", "30s"},
			{"configSyncPeriod", "1m0s"},
			{"portRange", "30000-32767"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, ignored, err := parseWithConfig(t, configHeader+tt.config)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(ignored, tt.want) {
				t.Errorf("ignored fields:\n got %v\nwant %v", ignored, tt.want)
			}
		})
	}
}

// kube-proxy's flag names and the capacity flags' old names set the flag
// they stand for; the old names warn.
func TestFlagAliases(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		check    func(o options) string
		wantWarn string
	}{
		{"proxy-mode", []string{"--proxy-mode=iptables"}, func(o options) string { return want(o.mode, "iptables") }, ""},
		{"iptables-sync-period", []string{"--iptables-sync-period=1m"}, func(o options) string { return want(o.syncPeriod, time.Minute) }, ""},
		{"iptables-min-sync-period", []string{"--iptables-min-sync-period=2s"}, func(o options) string { return want(o.minSyncPeriod, 2*time.Second) }, ""},
		{"new capacity names", []string{"--bpf-service-ports-max=10", "--bpf-backend-slots-max=20", "--bpf-sock-revnat-max=30", "--bpf-frontends-max=40", "--bpf-affinity-max=50"},
			func(o options) string {
				return want(o.maxServices, 10) + want(o.maxBackends, 20) + want(o.maxSockets, 30) + want(o.maxFrontends, 40) + want(o.maxAffinity, 50)
			}, ""},
		{"old capacity names", []string{"--bpf-max-services=10", "--bpf-max-backends=20", "--bpf-max-sockets=30", "--bpf-max-frontends=40", "--bpf-max-affinity=50"},
			func(o options) string {
				return want(o.maxServices, 10) + want(o.maxBackends, 20) + want(o.maxSockets, 30) + want(o.maxFrontends, 40) + want(o.maxAffinity, 50)
			}, "Flag --bpf-max-backends has been deprecated, use --bpf-backend-slots-max instead"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var o options
			var stderr bytes.Buffer
			fs := newFlagSet(&o, &stderr)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			warnDeprecated(fs, &stderr)
			if err := o.validate(); err != nil {
				t.Fatal(err)
			}
			if diff := tt.check(o); diff != "" {
				t.Error(diff)
			}
			if tt.wantWarn == "" && stderr.Len() > 0 || !strings.Contains(stderr.String(), tt.wantWarn) {
				t.Errorf("stderr %q, want %q", stderr.String(), tt.wantWarn)
			}
		})
	}
}

// An alias on the command line wins over the file as its flag does.
func TestConfigFileAliasOnCommandLineWins(t *testing.T) {
	o, _, err := parseWithConfig(t, configHeader+"mode: iptables\niptables:\n  syncPeriod: 1m\n", "--proxy-mode=ebpf", "--iptables-sync-period=2m")
	if err != nil {
		t.Fatal(err)
	}
	if diff := want(o.mode, "ebpf") + want(o.syncPeriod, 2*time.Minute); diff != "" {
		t.Error(diff)
	}
}

// --help marks each alias as one.
func TestHelpMarksAliases(t *testing.T) {
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"--help"}, io.Discard, &stderr); code != 0 {
		t.Fatalf("--help: exit %d", code)
	}
	for _, line := range []string{
		"-proxy-mode string\n    \talias of --mode: kube-proxy's name for it",
		"-iptables-sync-period duration\n    \talias of --sync-period",
		"-bpf-max-services uint\n    \tdeprecated alias of --bpf-service-ports-max",
	} {
		if !strings.Contains(stderr.String(), line) {
			t.Errorf("--help lacks %q", line)
		}
	}
}

// kubeadm's config.conf (v1.36, testdata) with kubeadm's command line:
// every field decodes, nothing is reported as ignored, and the proxy runs
// kube-proxy's iptables mode with kubeadm's kubeconfig and pod range.
func TestKubeadmConfig(t *testing.T) {
	data, err := os.ReadFile("testdata/kubeadm-v1.36-config.conf")
	if err != nil {
		t.Fatal(err)
	}
	o, ignored, err := parseWithConfig(t, string(data), "--hostname-override=node-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(ignored) != 0 {
		t.Errorf("kubeadm's defaults reported as ignored: %v", ignored)
	}
	if diff := want(o.mode, "iptables") + want(o.kubeconfig, "/var/lib/kube-proxy/kubeconfig.conf") +
		want(o.clusterCIDR, "10.244.0.0/16") + want(o.hostnameOverride, "node-1") +
		want(o.healthzBindAddress, "0.0.0.0:10256") + want(o.metricsBindAddress, "127.0.0.1:10249") +
		want(o.syncPeriod, 30*time.Second) + want(o.minSyncPeriod, time.Second) + want(o.syncBurst, 1) +
		want(o.masqueradeBit, 14) + want(o.localhostNPs, true) + want(o.masqueradeAll, false) +
		want(o.kubeAPIContentType, "application/vnd.kubernetes.protobuf") + want(o.nodePortAddresses, "") +
		want(o.detectLocalMode, ""); diff != "" {
		t.Error(diff)
	}
}

// run logs each ignored field once, with its name, before it starts.
func TestIgnoredFieldsLoggedOnce(t *testing.T) {
	var logs bytes.Buffer
	klog.LogToStderr(false)
	klog.SetOutput(&logs)
	t.Cleanup(func() {
		klog.SetOutput(os.Stderr)
		klog.LogToStderr(true)
	})
	path := writeConfig(t, configHeader+"ipvs:\n  scheduler: rr\nconntrack:\n  maxPerCore: 0\n")
	// The missing kubeconfig ends the run before anything starts.
	code := run(context.Background(), []string{"--config=" + path, "--kubeconfig=/nonexistent/kubeconfig"}, io.Discard, io.Discard)
	klog.Flush()
	if code != 1 {
		t.Errorf("exit %d, want 1 (no kubeconfig)", code)
	}
	for _, field := range []string{`field="ipvs.scheduler" value="rr"`, `field="conntrack.maxPerCore" value="0"`} {
		if n := strings.Count(logs.String(), field); n != 1 {
			t.Errorf("%s logged %d times, want once; logs:\n%s", field, n, logs.String())
		}
	}
}
