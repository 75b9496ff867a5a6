package localcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"sigs.k8s.io/yaml"
)

// PrometheusAddr is where the cluster's Prometheus listens, on the first
// node's loopback: reachable from the cluster's namespaces through
// PrometheusAPI and from the machine only through a forwarder
// (StartForwarder), never through a route.
const PrometheusAddr = "127.0.0.1:9090"

const prometheusProc = "prometheus"

// ScrapeTarget is one static scrape target.
type ScrapeTarget struct {
	// Address is host:port, reachable from the first node's namespace.
	Address string `json:"-"`
	// Labels are added to every series of the target (instance, pod, ...).
	Labels map[string]string `json:"labels,omitempty"`
}

// PrometheusOptions configure StartPrometheus.
type PrometheusOptions struct {
	// Binary is the prometheus binary; default "prometheus" on the PATH
	// (Debian's package).
	Binary string
	// ScrapeInterval is the scrape and rule evaluation interval; default
	// 1 s, so that a test sees a change within seconds.
	ScrapeInterval time.Duration
	// ProbeTargets are the latency probe's pods, scraped as job
	// kube-bpf-proxy-probe; SetProbeTargets changes them later.
	ProbeTargets []ScrapeTarget
	// RuleFiles are loaded as rule_files (copied into the cluster
	// directory), so that the rules are evaluated too.
	RuleFiles []string
}

// StartPrometheus starts Prometheus in the first node's namespace,
// scraping the proxy of every node as job kube-proxy (kube-proxy's job
// name, with instance set to the node name, as the shipped scrape
// configuration sets it) and the probe targets as job kube-bpf-proxy-probe.
// The targets are static: the shipped configuration discovers the proxy's
// pods through the Kubernetes API (kubernetes_sd), but no kubelet runs
// here, so the DaemonSet has no pods to discover. Its data lives in the
// cluster directory; the process is recorded, so Down stops it. It returns
// once Prometheus is ready.
func (c *Cluster) StartPrometheus(ctx context.Context, o PrometheusOptions) error {
	if o.Binary == "" {
		o.Binary = "prometheus"
	}
	bin, err := exec.LookPath(o.Binary)
	if err != nil {
		return fmt.Errorf("%w (Debian's package prometheus; hack/deps.sh installs it)", err)
	}
	if o.ScrapeInterval == 0 {
		o.ScrapeInterval = time.Second
	}
	dir := filepath.Join(c.Dir, "prometheus")
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		return err
	}
	var rules []string
	for i, f := range o.RuleFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		p := filepath.Join(dir, fmt.Sprintf("rules-%d-%s", i, filepath.Base(f)))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return err
		}
		rules = append(rules, p)
	}
	if err := c.SetProbeTargets(o.ProbeTargets); err != nil {
		return err
	}
	cfg, err := c.prometheusConfig(o.ScrapeInterval, rules)
	if err != nil {
		return err
	}
	cfgFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, cfg, 0o644); err != nil {
		return err
	}
	p := c.controlPlaneProc(prometheusProc, []string{bin,
		"--config.file=" + cfgFile,
		"--storage.tsdb.path=" + filepath.Join(dir, "data"),
		"--web.listen-address=" + PrometheusAddr,
		// Debian's default console paths need not exist here.
		"--web.console.templates=" + dir, "--web.console.libraries=" + dir,
	})
	if err := c.startProc(prometheusProc, p); err != nil {
		return err
	}
	api := c.PrometheusAPI()
	defer api.Close()
	return c.waitFor(ctx, p, 60*time.Second, "Prometheus to be ready", func() bool {
		return api.Ready(ctx) == nil
	})
}

// prometheusConfig renders the configuration: the proxies as static
// targets at the nodes' InternalIPs, the probe through a file that
// SetProbeTargets rewrites (Prometheus watches it).
func (c *Cluster) prometheusConfig(interval time.Duration, rules []string) ([]byte, error) {
	var proxies []map[string]any
	for _, n := range c.Nodes {
		proxies = append(proxies, map[string]any{
			"targets": []string{net.JoinHostPort(n.IP, "10249")},
			"labels":  map[string]string{"instance": n.Name},
		})
	}
	cfg := map[string]any{
		"global": map[string]any{
			"scrape_interval":     interval.String(),
			"scrape_timeout":      interval.String(),
			"evaluation_interval": interval.String(),
		},
		"scrape_configs": []map[string]any{
			{"job_name": "kube-proxy", "static_configs": proxies},
			{"job_name": "kube-bpf-proxy-probe", "file_sd_configs": []map[string]any{{
				"files": []string{c.probeTargetsFile()}, "refresh_interval": "5s",
			}}},
		},
	}
	if len(rules) > 0 {
		cfg["rule_files"] = rules
	}
	return yaml.Marshal(cfg)
}

func (c *Cluster) probeTargetsFile() string {
	return filepath.Join(c.Dir, "prometheus", "probe-targets.json")
}

// SetProbeTargets replaces the probe's scrape targets of a running (or
// about to start) Prometheus.
func (c *Cluster) SetProbeTargets(targets []ScrapeTarget) error {
	type group struct {
		Targets []string          `json:"targets"`
		Labels  map[string]string `json:"labels,omitempty"`
	}
	groups := []group{}
	for _, t := range targets {
		groups = append(groups, group{Targets: []string{t.Address}, Labels: t.Labels})
	}
	b, err := json.Marshal(groups)
	if err != nil {
		return err
	}
	f := c.probeTargetsFile()
	if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
		return err
	}
	// Renamed into place: Prometheus must never read half a file.
	tmp := f + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, f)
}

// PrometheusRunning reports whether the cluster's Prometheus runs.
func (c *Cluster) PrometheusRunning() bool {
	p, err := c.proc(prometheusProc)
	return err == nil && p.alive()
}

// PrometheusLog is Prometheus's log file.
func (c *Cluster) PrometheusLog() string {
	return filepath.Join(c.Dir, "logs", prometheusProc+".log")
}

// PrometheusAPI is a client of the cluster's Prometheus HTTP API, whose
// connections are made in the first node's namespace.
type PrometheusAPI struct {
	base   string
	client *http.Client
}

// PrometheusAPI returns a client of the cluster's Prometheus.
func (c *Cluster) PrometheusAPI() *PrometheusAPI {
	return &PrometheusAPI{
		base: "http://" + PrometheusAddr,
		client: &http.Client{
			Transport: &http.Transport{DialContext: dialIn(c.Nodes[0].NetNS)},
			Timeout:   30 * time.Second,
		},
	}
}

// Close releases the client's idle connections.
func (p *PrometheusAPI) Close() { p.client.CloseIdleConnections() }

// Ready returns nil once Prometheus serves queries.
func (p *PrometheusAPI) Ready(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.base+"/-/ready", nil)
	if err != nil {
		return err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/-/ready: %s", resp.Status)
	}
	return nil
}

// Sample is one element of a query's result: a series' labels and value.
type Sample struct {
	Labels map[string]string
	Value  float64
}

// QueryError is an error Prometheus answered a query with (bad_data for
// a query that does not parse, execution for one that fails to run).
type QueryError struct {
	Type, Message string
}

func (e *QueryError) Error() string { return e.Type + ": " + e.Message }

// Query evaluates expr at the current time (/api/v1/query) and returns
// its samples: a vector's elements, or a scalar as one sample without
// labels.
func (p *PrometheusAPI) Query(ctx context.Context, expr string) ([]Sample, error) {
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := p.get(ctx, "/api/v1/query", url.Values{"query": {expr}}, &data); err != nil {
		return nil, fmt.Errorf("query %s: %w", expr, err)
	}
	switch data.ResultType {
	case "vector":
		var v []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		}
		if err := json.Unmarshal(data.Result, &v); err != nil {
			return nil, err
		}
		out := make([]Sample, 0, len(v))
		for _, s := range v {
			f, err := sampleValue(s.Value)
			if err != nil {
				return nil, err
			}
			out = append(out, Sample{Labels: s.Metric, Value: f})
		}
		return out, nil
	case "scalar":
		var v [2]any
		if err := json.Unmarshal(data.Result, &v); err != nil {
			return nil, err
		}
		f, err := sampleValue(v)
		if err != nil {
			return nil, err
		}
		return []Sample{{Labels: map[string]string{}, Value: f}}, nil
	}
	return nil, fmt.Errorf("query %s: result type %q, want vector or scalar", expr, data.ResultType)
}

func sampleValue(v [2]any) (float64, error) {
	s, ok := v[1].(string)
	if !ok {
		return 0, fmt.Errorf("sample value %v is not a string", v[1])
	}
	return strconv.ParseFloat(s, 64)
}

// Target is a scrape target as /api/v1/targets reports it.
type Target struct {
	Labels    map[string]string `json:"labels"`
	ScrapeURL string            `json:"scrapeUrl"`
	Health    string            `json:"health"`
	LastError string            `json:"lastError"`
}

// Targets returns the active scrape targets.
func (p *PrometheusAPI) Targets(ctx context.Context) ([]Target, error) {
	var data struct {
		ActiveTargets []Target `json:"activeTargets"`
	}
	if err := p.get(ctx, "/api/v1/targets", url.Values{"state": {"active"}}, &data); err != nil {
		return nil, err
	}
	return data.ActiveTargets, nil
}

// LabelValues returns the values of label on the series matching match
// (/api/v1/label/NAME/values), as a Grafana label_values() variable reads
// them.
func (p *PrometheusAPI) LabelValues(ctx context.Context, label, match string) ([]string, error) {
	var data []string
	err := p.get(ctx, "/api/v1/label/"+url.PathEscape(label)+"/values", url.Values{"match[]": {match}}, &data)
	return data, err
}

// get calls an API endpoint and decodes the data of a success; an error
// answer is a *QueryError.
func (p *PrometheusAPI) get(ctx context.Context, path string, q url.Values, data any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.base+path+"?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body struct {
		Status    string          `json:"status"`
		Data      json.RawMessage `json:"data"`
		ErrorType string          `json:"errorType"`
		Error     string          `json:"error"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return fmt.Errorf("%s: %s: decoding the answer: %w", path, resp.Status, err)
	}
	if body.Status != "success" {
		return &QueryError{Type: body.ErrorType, Message: body.Error}
	}
	return json.Unmarshal(body.Data, data)
}

// Forward accepts connections on listen, in this process's network
// namespace, and joins each to a connection to target made inside node's
// namespace, until ctx ends: a way in for a browser on the machine, and
// no route out of the cluster's namespaces.
func (c *Cluster) Forward(ctx context.Context, listen, node, target string) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	dial := dialIn(n.NetNS)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		go func() {
			defer conn.Close()
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			up, err := dial(dctx, "tcp", target)
			cancel()
			if err != nil {
				return
			}
			defer up.Close()
			done := make(chan struct{}, 2)
			go func() { _, _ = io.Copy(up, conn); done <- struct{}{} }()
			go func() { _, _ = io.Copy(conn, up); done <- struct{}{} }()
			// Either direction ending ends both: the deferred closes
			// stop the other copy.
			select {
			case <-done:
			case <-ctx.Done():
			}
		}()
	}
}

// StartForwarder runs args (a command that calls Forward, such as
// `cluster forward`) in the machine's own network namespace, detached and
// recorded under name, so that Down stops it.
func (c *Cluster) StartForwarder(name string, args []string) error {
	cgroup := filepath.Join(c.Cgroup, "system")
	return c.startProc(name, &proc{Cgroup: cgroup, Args: args,
		Log: filepath.Join(c.Dir, "logs", name+".log")})
}
