package monitoring

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// root is the repository's root, from this package's directory.
const root = "../.."

// The committed files are what the generator writes.
func TestCommittedFilesAreGenerated(t *testing.T) {
	files, err := Render()
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(root, Dir, name))
		if err != nil {
			t.Errorf("%v: run `go run ./hack/dashboards` and commit the result", err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from what hack/monitoring generates: run `go run ./hack/dashboards` and commit the result", filepath.Join(Dir, name))
		}
	}
	// No stale dashboard left behind by a rename.
	committed, _ := filepath.Glob(filepath.Join(root, Dir, DashboardsDir, "*.json"))
	for _, c := range committed {
		if _, ok := files[filepath.Join(DashboardsDir, filepath.Base(c))]; !ok {
			t.Errorf("%s is not generated any more: remove it", c)
		}
	}
}

func TestDashboards(t *testing.T) {
	ds, err := Dashboards()
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 2 {
		t.Fatalf("want the proxy and the probe dashboards, got %d", len(ds))
	}
	for _, d := range ds {
		var board struct {
			Templating struct {
				List []struct {
					Name, Type string
					AllValue   string `json:"allValue"`
					Current    struct {
						Value []string `json:"value"`
					} `json:"current"`
				} `json:"list"`
			} `json:"templating"`
			Panels []struct {
				Type       string `json:"type"`
				Title      string `json:"title"`
				Datasource struct {
					UID string `json:"uid"`
				} `json:"datasource"`
				Targets []struct {
					Expr string `json:"expr"`
				} `json:"targets"`
			} `json:"panels"`
		}
		if err := yaml.Unmarshal(d.JSON, &board); err != nil {
			t.Fatalf("%s: %v", d.File, err)
		}
		var vars []string
		for _, v := range board.Templating.List {
			vars = append(vars, v.Type+":"+v.Name)
			// The families added up until the user picks one.
			if v.Name == "ip_family" && (v.AllValue != ".*" || !slices.Equal(v.Current.Value, []string{"$__all"})) {
				t.Errorf("%s: ip_family variable: all value %q, current %v; want .* and All", d.File, v.AllValue, v.Current.Value)
			}
		}
		for _, want := range []string{"datasource:datasource", "query:mode", "query:ip_family"} {
			if !slices.Contains(vars, want) {
				t.Errorf("%s: no %s variable among %v", d.File, want, vars)
			}
		}
		exprs := 0
		for _, p := range board.Panels {
			if p.Type == "row" {
				continue
			}
			if p.Datasource.UID != "${datasource}" {
				t.Errorf("%s: panel %q does not use the datasource variable", d.File, p.Title)
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: panel %q has no query", d.File, p.Title)
			}
			for _, q := range p.Targets {
				exprs++
				// Split by mode: every query but the scrape health, the
				// probe servers' (which have no mode) and the A/B's
				// differences (which name both) selects $mode.
				// The A/B's differences name both modes.
				ab := strings.Contains(q.Expr, `mode="ebpf"`) && strings.Contains(q.Expr, `mode="iptables"`)
				if !strings.Contains(q.Expr, "$mode") && !strings.Contains(q.Expr, "up{") &&
					!strings.Contains(q.Expr, "probe_server_requests_total") && !ab {
					t.Errorf("%s: panel %q: %s is not split by mode", d.File, p.Title, q.Expr)
				}
				for _, sel := range unfiltered(q.Expr) {
					t.Errorf("%s: panel %q: %s cannot be split by IP family (no %s)", d.File, p.Title, sel, FamilyMatcher)
				}
			}
		}
		if exprs != len(d.Queries) {
			t.Errorf("%s: %d queries in the JSON, %d recorded for the tests", d.File, exprs, len(d.Queries))
		}
	}
}

// selector matches a series selector, metric{matchers}.
var selector = regexp.MustCompile(`([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}`)

// bareSeries matches a series of ours or kube-proxy's named outside a
// selector.
var bareSeries = regexp.MustCompile(`[a-z_:]*(kube_bpf_proxy|kubeproxy|rest_client)_[a-z_:]+`)

// familyless are the series that never carry ip_family: the scrape's
// health and the proxy's info, one of each per node.
var familyless = []string{"up", "kube_bpf_proxy_info"}

// unfiltered returns the selectors of expr that lack the family matcher
// (those of familyless series aside), and any series named without a
// selector.
func unfiltered(expr string) []string {
	var out []string
	for _, m := range selector.FindAllStringSubmatch(expr, -1) {
		if !slices.Contains(familyless, m[1]) && !strings.Contains(m[2], FamilyMatcher) {
			out = append(out, m[0])
		}
	}
	// A bare metric name (no braces) would escape the check above.
	rest := selector.ReplaceAllString(expr, "")
	return append(out, bareSeries.FindAllString(rest, -1)...)
}

// The family check catches a selector without the matcher, and a bare
// series name.
func TestUnfiltered(t *testing.T) {
	for _, tt := range []struct {
		expr string
		want int
	}{
		{`sum(rate(a_total{job="x", ` + FamilyMatcher + `}[1m])) * on(instance) group_left(mode) kube_bpf_proxy_info{job="kube-proxy"} + up{job="x"}`, 0},
		{`sum(rate(a_total{job="x"}[1m]))`, 1},
		{`rate(a_total{job="x", ` + FamilyMatcher + `}[1m]) / rate(b_total{job="x"}[1m])`, 1},
		{`sum(kube_bpf_proxy_services)`, 1},
	} {
		if got := unfiltered(tt.expr); len(got) != tt.want {
			t.Errorf("unfiltered(%s) = %q, want %d", tt.expr, got, tt.want)
		}
	}
}

// Substitute replaces every variable the expressions use.
func TestSubstitute(t *testing.T) {
	got := Substitute(`rate(x{mode=~"$mode", instance=~"$instance", protocol=~"$protocol", `+FamilyMatcher+`}[$__rate_interval]) / increase(y[$__range])`, "ebpf", "90s")
	want := `rate(x{mode=~"ebpf", instance=~".+", protocol=~".+", ip_family=~".*|"}[90s]) / increase(y[90s])`
	if got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool (Debian's package prometheus) is not installed; hack/deps.sh installs it")
	}
	return p
}

// The rules pass promtool's checks, and each alert fires on the series it
// watches with the labels and texts in testdata/rules-test.yaml (and stays
// silent on healthy ones).
func TestRulesWithPromtool(t *testing.T) {
	bin := promtool(t)
	for _, args := range [][]string{
		{"check", "rules", filepath.Join(root, Dir, RulesFile)},
		{"test", "rules", "testdata/rules-test.yaml"},
	} {
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// Local mirrors of the prometheus-operator v1 types' fields we use
// (github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring
// v1, checked against v0.95.2's JSON tags): strict decoding into them
// rejects a misspelt or misplaced field. The operator's own module is not
// imported: it requires a newer k8s.io/api than this module builds with.
type relabelConfig struct {
	SourceLabels []string `json:"sourceLabels,omitempty"`
	Separator    string   `json:"separator,omitempty"`
	TargetLabel  string   `json:"targetLabel,omitempty"`
	Regex        string   `json:"regex,omitempty"`
	Replacement  *string  `json:"replacement,omitempty"`
	Action       string   `json:"action,omitempty"`
}

type podMonitor struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		JobLabel string `json:"jobLabel,omitempty"`
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels,omitempty"`
		} `json:"selector"`
		NamespaceSelector struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector"`
		PodMetricsEndpoints []struct {
			Port        *string         `json:"port,omitempty"`
			Path        string          `json:"path,omitempty"`
			Interval    string          `json:"interval,omitempty"`
			Relabelings []relabelConfig `json:"relabelings,omitempty"`
		} `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

func readStrict(t *testing.T, path string, into any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// relabeled returns the value a relabeling list gives label by a constant
// replacement, if any.
func relabeled(rs []relabelConfig, label string) string {
	v := ""
	for _, r := range rs {
		if r.TargetLabel == label && len(r.SourceLabels) == 0 && r.Replacement != nil {
			v = *r.Replacement
		}
	}
	return v
}

func TestPodMonitors(t *testing.T) {
	var ds appsv1.DaemonSet
	b, err := os.ReadFile(filepath.Join(root, "manifests/base/daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatal(err)
	}
	metricsPort := ""
	for _, p := range ds.Spec.Template.Spec.Containers[0].Ports {
		if p.ContainerPort == 10249 {
			metricsPort = p.Name
		}
	}
	for _, c := range []struct {
		file, job, namespace string
		podLabels            map[string]string
		port                 string
	}{
		{"podmonitor-kube-bpf-proxy.yaml", ProxyJob, "kube-system", ds.Spec.Template.Labels, metricsPort},
		{"podmonitor-probe.yaml", ProbeJob, "kube-bpf-proxy-probe", nil, "metrics"},
	} {
		t.Run(c.file, func(t *testing.T) {
			var pm podMonitor
			readStrict(t, filepath.Join(root, Dir, "prometheus-operator", c.file), &pm)
			if pm.APIVersion != "monitoring.coreos.com/v1" || pm.Kind != "PodMonitor" {
				t.Errorf("%s/%s, want monitoring.coreos.com/v1 PodMonitor", pm.APIVersion, pm.Kind)
			}
			if !slices.Equal(pm.Spec.NamespaceSelector.MatchNames, []string{c.namespace}) {
				t.Errorf("namespaceSelector %v, want %s", pm.Spec.NamespaceSelector.MatchNames, c.namespace)
			}
			for k, v := range pm.Spec.Selector.MatchLabels {
				if c.podLabels[k] != v {
					t.Errorf("selector %s=%s does not match the pods' labels %v", k, v, c.podLabels)
				}
			}
			if len(pm.Spec.PodMetricsEndpoints) != 1 {
				t.Fatalf("want one endpoint, got %d", len(pm.Spec.PodMetricsEndpoints))
			}
			ep := pm.Spec.PodMetricsEndpoints[0]
			if ep.Port == nil || *ep.Port != c.port || c.port == "" {
				t.Errorf("port %v, want the pods' metrics port %q", ep.Port, c.port)
			}
			if got := relabeled(ep.Relabelings, "job"); got != c.job {
				t.Errorf("job label %q, want %q", got, c.job)
			}
		})
	}
}

func TestPrometheusRuleMatchesRulesFile(t *testing.T) {
	var pr struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string            `json:"name"`
			Namespace string            `json:"namespace"`
			Labels    map[string]string `json:"labels"`
		} `json:"metadata"`
		Spec struct {
			Groups []ruleGroup `json:"groups"`
		} `json:"spec"`
	}
	readStrict(t, filepath.Join(root, Dir, PrometheusRuleFile), &pr)
	var plain struct {
		Groups []ruleGroup `json:"groups"`
	}
	readStrict(t, filepath.Join(root, Dir, RulesFile), &plain)
	if pr.APIVersion != "monitoring.coreos.com/v1" || pr.Kind != "PrometheusRule" {
		t.Errorf("%s/%s, want monitoring.coreos.com/v1 PrometheusRule", pr.APIVersion, pr.Kind)
	}
	if !reflect.DeepEqual(pr.Spec.Groups, plain.Groups) {
		t.Errorf("the PrometheusRule's groups differ from the rules file's")
	}
	if len(plain.Groups) != 1 || len(plain.Groups[0].Rules) != len(Alerts()) {
		t.Errorf("want one group with every alert, got %+v", plain.Groups)
	}
}

// The plain scrape configuration keeps the DaemonSet's pods on their
// metrics port as job kube-proxy, and the probe's pods as
// kube-bpf-proxy-probe. (promtool checks it in the end-to-end test, with a
// promtool that has Kubernetes discovery.)
func TestScrapeConfig(t *testing.T) {
	var cfg struct {
		ScrapeConfigs []struct {
			JobName             string `json:"job_name"`
			ScrapeInterval      string `json:"scrape_interval"`
			KubernetesSDConfigs []struct {
				Role       string `json:"role"`
				Namespaces struct {
					Names []string `json:"names"`
				} `json:"namespaces"`
			} `json:"kubernetes_sd_configs"`
			RelabelConfigs []struct {
				SourceLabels []string `json:"source_labels"`
				Regex        string   `json:"regex"`
				Action       string   `json:"action"`
				TargetLabel  string   `json:"target_label"`
			} `json:"relabel_configs"`
		} `json:"scrape_configs"`
	}
	readStrict(t, filepath.Join(root, Dir, "prometheus/scrape-configs.yaml"), &cfg)
	var jobs []string
	for _, sc := range cfg.ScrapeConfigs {
		jobs = append(jobs, sc.JobName)
		if len(sc.KubernetesSDConfigs) != 1 || sc.KubernetesSDConfigs[0].Role != "pod" {
			t.Errorf("%s: want pod discovery", sc.JobName)
		}
		keeps := map[string]string{}
		instance := ""
		for _, r := range sc.RelabelConfigs {
			if r.Action == "keep" {
				keeps[strings.Join(r.SourceLabels, ";")] = r.Regex
			}
			if r.TargetLabel == "instance" {
				instance = strings.Join(r.SourceLabels, ";")
			}
		}
		switch sc.JobName {
		case ProxyJob:
			if ns := sc.KubernetesSDConfigs[0].Namespaces.Names; !slices.Equal(ns, []string{"kube-system"}) {
				t.Errorf("kube-proxy: namespaces %v", ns)
			}
			if keeps["__meta_kubernetes_pod_label_k8s_app"] != "kube-bpf-proxy" || keeps["__meta_kubernetes_pod_container_port_number"] != "10249" {
				t.Errorf("kube-proxy: keeps %v, want the DaemonSet's pods on 10249", keeps)
			}
			if instance != "__meta_kubernetes_pod_node_name" {
				t.Errorf("kube-proxy: instance from %q, want the node name", instance)
			}
		case ProbeJob:
			if ns := sc.KubernetesSDConfigs[0].Namespaces.Names; !slices.Equal(ns, []string{"kube-bpf-proxy-probe"}) {
				t.Errorf("probe: namespaces %v", ns)
			}
		}
	}
	if !slices.Equal(jobs, []string{ProxyJob, ProbeJob}) {
		t.Errorf("jobs %v, want %s and %s", jobs, ProxyJob, ProbeJob)
	}
}

// The A/B's difference is a mean over the nodes, as its description and
// docs/ab-testing.md say: with two ebpf nodes of 1 ms and 3 ms, the first
// sending ten times as many requests, and an iptables node of 1 ms, it is
// 2 ms − 1 ms, in µs (a request-weighted mean would make it 182 µs).
func TestABDifferenceIsAMeanOverNodes(t *testing.T) {
	bin := promtool(t)
	const conn = "kube_bpf_proxy_probe_connect_seconds"
	series := func(node, mode string, perStep, sumPerStep float64) string {
		sel := fmt.Sprintf(`{job="kube-bpf-proxy-probe",mode=%q,client_node=%q,ip_family="IPv4"}`, mode, node)
		return fmt.Sprintf("  - series: '%s_count%s'\n    values: '0+%gx20'\n  - series: '%s_sum%s'\n    values: '0+%gx20'\n",
			conn, sel, perStep, conn, sel, sumPerStep)
	}
	test := "rule_files: []\nevaluation_interval: 15s\ntests:\n- interval: 15s\n  input_series:\n" +
		series("n1", "ebpf", 150, 0.15) + series("n2", "ebpf", 15, 0.045) + series("n3", "iptables", 75, 0.075) +
		"  promql_expr_test:\n  - expr: 'round(1e6 * (" + strings.ReplaceAll(Substitute(abDifference(conn, "", false), "", "1m"), "'", "''") + "))'\n" +
		"    eval_time: 4m\n    exp_samples:\n    - labels: '{}'\n      value: 1000\n"
	file := filepath.Join(t.TempDir(), "ab-test.yaml")
	if err := os.WriteFile(file, []byte(test), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "test", "rules", file).CombinedOutput(); err != nil {
		t.Errorf("promtool test rules: %v\n%s\n%s", err, out, test)
	}
}
