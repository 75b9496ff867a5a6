package probe

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/httpserve"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/nodelabel"
)

// ModeLabel is the Node label where kube-bpf-proxy records its mode.
const ModeLabel = nodelabel.Label

// NoMode is the mode label's value when the client's Node has no ModeLabel
// (kube-proxy, or a proxy that does not record it).
const NoMode = "none"

// DefaultService is the manifests' probe Service.
const DefaultService = "kube-bpf-proxy-probe/probe-server"

// clientOptions are the client's flags.
type clientOptions struct {
	kubeconfig      string
	service         string
	httpPort        string
	udpPort         string
	interval        time.Duration
	jitter          float64
	timeout         time.Duration
	udpTimeout      time.Duration
	metricsAddr     string
	serviceNS, name string // service, split by validate
}

func clientFlags(o *clientOptions, fs *flag.FlagSet) {
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file; empty means the in-cluster configuration (the pod's ServiceAccount)")
	fs.StringVar(&o.service, "service", DefaultService, "the probe server's Service, namespace/name; its ClusterIPs (one per IP family: both of a dual-stack Service are probed) and ports are followed as they change")
	fs.StringVar(&o.httpPort, "http-port", "http", "name of the Service port of the servers' HTTP endpoint")
	fs.StringVar(&o.udpPort, "udp-port", "udp-echo", "name of the Service port of the servers' UDP echo")
	fs.DurationVar(&o.interval, "interval", 200*time.Millisecond, "time between two probes (one HTTP request and one UDP request/response to each of the Service's ClusterIPs)")
	fs.Float64Var(&o.jitter, "jitter", 0.1, "each wait is --interval times a random factor in [1-jitter, 1+jitter], so clients on different nodes do not fall into step")
	fs.DurationVar(&o.timeout, "timeout", time.Second, "limit on one HTTP probe: connect, request and the whole response")
	fs.DurationVar(&o.udpTimeout, "udp-timeout", time.Second, "limit on one UDP probe: the wait for the reply")
	fs.StringVar(&o.metricsAddr, "metrics-bind-address", ":9090", "address of /metrics and /healthz"+bothFamilies)
}

func (o *clientOptions) validate() error {
	ns, name, ok := strings.Cut(o.service, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return fmt.Errorf("--service %q: want namespace/name", o.service)
	}
	o.serviceNS, o.name = ns, name
	switch {
	case o.interval <= 0:
		return fmt.Errorf("--interval %s: want a positive duration", o.interval)
	case o.jitter < 0 || o.jitter >= 1:
		return fmt.Errorf("--jitter %g: want 0 to less than 1", o.jitter)
	case o.timeout <= 0 || o.udpTimeout <= 0:
		return fmt.Errorf("--timeout and --udp-timeout: want positive durations")
	case o.httpPort == "" || o.udpPort == "":
		return fmt.Errorf("--http-port and --udp-port: want the Service's port names")
	}
	return nil
}

// target is where the probes go: the Service's ClusterIPs, one per IP
// family it has (spec.clusterIPs: two on a dual-stack Service, IPv4 first
// or IPv6 first as the Service lists them), and its ports.
type target struct {
	ips               []familyIP
	httpPort, udpPort int32
}

// familyIP is a ClusterIP and its family, the value of the series'
// ip_family label.
type familyIP struct {
	ip     netip.Addr
	family model.IPFamily
}

func (t *target) equal(o *target) bool {
	return o != nil && t.httpPort == o.httpPort && t.udpPort == o.udpPort && slices.Equal(t.ips, o.ips)
}

// families returns the families t probes, in its order.
func (t *target) families() []model.IPFamily {
	out := make([]model.IPFamily, 0, len(t.ips))
	for _, x := range t.ips {
		out = append(out, x.family)
	}
	return out
}

// client sends the probes.
type client struct {
	o       clientOptions
	id      identity
	m       *clientMetrics
	target  atomic.Pointer[target]
	mode    atomic.Pointer[string]
	http    *http.Client
	udpSeq  atomic.Uint64
	lastErr sync.Map // "protocol/family" -> last logged problem, to log changes only
}

func runClient(ctx context.Context, o clientOptions, id identity) error {
	restCfg, err := restConfig(o.kubeconfig)
	if err != nil {
		return err
	}
	restCfg.UserAgent = "kube-bpf-proxy-probe"
	cs, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("creating Kubernetes client: %w", err)
	}
	return serveClient(ctx, o, id, cs)
}

// restConfig loads the kubeconfig if one is given, else the in-cluster
// configuration. Unlike the proxy, the probe is an ordinary pod: it reaches
// the API server through the kubernetes Service's ClusterIP, as the
// kubelet's service links point it, which some proxy must already serve.
func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("loading --kubeconfig %s: %w", kubeconfig, err)
		}
		return cfg, nil
	}
	cfg, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("loading the in-cluster configuration (run in a pod with its ServiceAccount token mounted, or pass --kubeconfig): %w", err)
	}
	return cfg, nil
}

// serveClient is runClient with its API client given.
func serveClient(ctx context.Context, o clientOptions, id identity, cs kubernetes.Interface) error {
	reg := newRegistry()
	c := &client{o: o, id: id, m: newClientMetrics(reg)}
	none := NoMode
	c.mode.Store(&none)
	c.http = &http.Client{
		Transport: &http.Transport{
			// A new connection for every request, so that every request
			// crosses the Service datapath (a connect() to the ClusterIP);
			// no proxy from the environment.
			DisableKeepAlives:  true,
			DisableCompression: true,
			Proxy:              nil,
			DialContext:        (&net.Dialer{Timeout: o.timeout}).DialContext,
		},
		Timeout:       o.timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	defer c.http.CloseIdleConnections()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := c.watch(ctx, cs); err != nil {
		return err
	}

	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", o.metricsAddr)
	if err != nil {
		return fmt.Errorf("listening for metrics on %s: %w", o.metricsAddr, err)
	}
	errc := make(chan error, 1)
	go func() { errc <- httpserve.Serve(ctx, "probe client metrics", ln, mux) }()
	klog.InfoS("Probe client ready", "pod", id.pod, "node", id.node, "service", o.service, "interval", o.interval)
	c.loop(ctx)
	cancel()
	return <-errc
}

// watch follows the Service and this client's Node with informers limited
// to the one object each (the RBAC allows no more for the Service).
func (c *client) watch(ctx context.Context, cs kubernetes.Interface) error {
	svcFactory := informers.NewSharedInformerFactoryWithOptions(cs, 0,
		informers.WithNamespace(c.o.serviceNS),
		informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
			lo.FieldSelector = fields.OneTermEqualSelector("metadata.name", c.o.name).String()
		}))
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(cs, 0,
		informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
			lo.FieldSelector = fields.OneTermEqualSelector("metadata.name", c.id.node).String()
		}))
	svc := svcFactory.Core().V1().Services().Informer()
	node := nodeFactory.Core().V1().Nodes().Informer()
	if _, err := svc.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.setService(obj) },
		UpdateFunc: func(_, obj any) { c.setService(obj) },
		DeleteFunc: func(any) {
			klog.InfoS("Probe Service deleted: probing stops until it is back", "service", c.o.service)
			c.target.Store(nil)
		},
	}); err != nil {
		return err
	}
	if _, err := node.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { c.setNode(obj) },
		UpdateFunc: func(_, obj any) { c.setNode(obj) },
	}); err != nil {
		return err
	}
	// Both stop with ctx; the probes start at once and skip while the
	// Service is unknown, so an API server outage never stops probing.
	svcFactory.Start(ctx.Done())
	nodeFactory.Start(ctx.Done())
	go func() {
		<-ctx.Done()
		svcFactory.Shutdown()
		nodeFactory.Shutdown()
	}()
	return nil
}

func (c *client) setService(obj any) {
	s, ok := obj.(*corev1.Service)
	if !ok {
		return
	}
	t := targetOf(s, c.o.httpPort, c.o.udpPort, c.o.service)
	if t == nil {
		c.target.Store(nil)
		return
	}
	if old := c.target.Load(); !t.equal(old) {
		ips := make([]string, 0, len(t.ips))
		for _, x := range t.ips {
			ips = append(ips, x.ip.String())
		}
		klog.InfoS("Probing Service", "service", c.o.service, "clusterIPs", ips, "httpPort", t.httpPort, "udpPort", t.udpPort)
	}
	// Stored before the mode is read, as setNode stores the mode before
	// reading the target: whichever runs last zeroes the pair.
	c.target.Store(t)
	mode := *c.mode.Load()
	for _, f := range t.families() {
		c.zeroErrors(mode, f)
	}
}

// targetOf reads where to probe from the Service: each of its ClusterIPs
// (spec.clusterIPs, whose first is spec.clusterIP; an object without
// clusterIPs, written before dual-stack, has spec.clusterIP only), one per
// family, and the named ports. An address that does not parse ("None" of a
// headless Service) is skipped with a warning; nil when no address or port
// is left, and probing stops until the Service has them.
func targetOf(s *corev1.Service, httpPort, udpPort, name string) *target {
	t := &target{}
	ips := s.Spec.ClusterIPs
	if len(ips) == 0 && s.Spec.ClusterIP != "" {
		ips = []string{s.Spec.ClusterIP}
	}
	seen := map[model.IPFamily]bool{}
	for _, raw := range ips {
		ip, err := netip.ParseAddr(raw)
		if err != nil || ip.Zone() != "" {
			klog.ErrorS(nil, "Skipping probe Service ClusterIP that is not an IP address", "service", name, "clusterIP", raw)
			continue
		}
		// The API server never writes ::ffff:a.b.c.d; if one came, it
		// would be probed as the IPv4 address it carries.
		ip = ip.Unmap()
		f := model.FamilyOf(ip)
		if seen[f] {
			klog.ErrorS(nil, "Skipping second probe Service ClusterIP of one family", "service", name, "clusterIP", raw, "family", f)
			continue
		}
		seen[f] = true
		t.ips = append(t.ips, familyIP{ip: ip, family: f})
	}
	for _, p := range s.Spec.Ports {
		switch {
		case p.Name == httpPort && p.Protocol == corev1.ProtocolTCP:
			t.httpPort = p.Port
		case p.Name == udpPort && p.Protocol == corev1.ProtocolUDP:
			t.udpPort = p.Port
		}
	}
	if len(t.ips) == 0 || t.httpPort == 0 || t.udpPort == 0 {
		klog.ErrorS(nil, "Probe Service has no ClusterIP or lacks a port: probing stops until it has them",
			"service", name, "clusterIPs", ips, "httpPort", httpPort+"/TCP", "udpPort", udpPort+"/UDP")
		return nil
	}
	return t
}

func (c *client) setNode(obj any) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return
	}
	mode := n.Labels[ModeLabel]
	if mode == "" {
		mode = NoMode
	}
	if old := c.mode.Swap(&mode); *old != mode {
		klog.InfoS("Proxy mode of this node", "node", c.id.node, "mode", mode)
	}
	if t := c.target.Load(); t != nil {
		for _, f := range t.families() {
			c.zeroErrors(mode, f)
		}
	}
}

// zeroErrors makes the error series of mode and family exist at 0, so that
// a rate() over them (an alert, a dashboard's error panel) answers 0 rather
// than nothing before the first error. Only the families the Service has
// get them: an IPv4-only cluster has no IPv6 series.
func (c *client) zeroErrors(mode string, family model.IPFamily) {
	for _, protocol := range []string{"tcp", "udp"} {
		for _, kind := range []string{KindRefused, KindTimeout, KindReset, KindOther} {
			c.m.errors.WithLabelValues(c.id.node, mode, protocol, kind, family.String())
		}
	}
}

// loop probes until ctx ends: each family on its own, so that one
// family's timeouts (a broken IPv6 path) do not thin out the other's
// samples, and a dual-stack Service gets as many probes per family as a
// single-stack one.
func (c *client) loop(ctx context.Context) {
	var wg sync.WaitGroup
	for _, f := range model.Families {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.loopFamily(ctx, f)
		}()
	}
	wg.Wait()
}

// loopFamily probes the Service's ClusterIP of family f every interval,
// while it has one.
func (c *client) loopFamily(ctx context.Context, f model.IPFamily) {
	for {
		wait := time.Duration(float64(c.o.interval) * (1 + c.o.jitter*(2*rand.Float64()-1)))
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		t := c.target.Load()
		if t == nil {
			continue
		}
		i := slices.IndexFunc(t.ips, func(x familyIP) bool { return x.family == f })
		if i < 0 {
			continue
		}
		mode := *c.mode.Load()
		c.probeHTTP(ctx, t.ips[i], t.httpPort, mode)
		c.probeUDP(ctx, t.ips[i], t.udpPort, mode)
	}
}

// probeHTTP sends one HTTP request over a new connection and records its
// connect time, time to first byte and round trip.
func (c *client) probeHTTP(ctx context.Context, dst familyIP, port int32, mode string) {
	family := dst.family.String()
	var connectStart, connectDone, firstByte time.Time
	// The transport calls these from its own goroutines; the response (or
	// error) that Do returns is handed over after them, which orders the
	// writes before the reads below.
	trace := &httptrace.ClientTrace{
		ConnectStart: func(string, string) { connectStart = time.Now() },
		ConnectDone: func(_, _ string, err error) {
			if err == nil {
				connectDone = time.Now()
			}
		},
		GotFirstResponseByte: func() { firstByte = time.Now() },
	}
	url := "http://" + netip.AddrPortFrom(dst.ip, uint16(port)).String() + "/"
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, url, nil)
	if err != nil {
		c.failed(ctx, "tcp", family, mode, err)
		return
	}
	// time.Now carries the monotonic clock, which Sub uses: wall-clock
	// steps do not show in the durations.
	start := time.Now()
	resp, err := c.http.Do(req)
	if err != nil {
		c.failed(ctx, "tcp", family, mode, err)
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	// The round trip ends with the last byte of the answer; closing the
	// connection (a FIN sent in the background) is not part of it.
	end := time.Now()
	resp.Body.Close()
	if err != nil {
		c.failed(ctx, "tcp", family, mode, err)
		return
	}
	if resp.StatusCode != http.StatusOK {
		c.failed(ctx, "tcp", family, mode, fmt.Errorf("HTTP status %s", resp.Status))
		return
	}
	var reply ServerReply
	if err := json.Unmarshal(body, &reply); err != nil || reply.Node == "" {
		c.failed(ctx, "tcp", family, mode, fmt.Errorf("unexpected answer %q: %v", truncate(body), err))
		return
	}
	rtt := end.Sub(start)
	if !connectStart.IsZero() && !connectDone.IsZero() {
		c.m.connect.WithLabelValues(c.id.node, reply.Node, mode, family).Observe(connectDone.Sub(connectStart).Seconds())
	}
	if !firstByte.IsZero() {
		c.m.firstByte.WithLabelValues(c.id.node, reply.Node, mode, family).Observe(firstByte.Sub(start).Seconds())
	}
	c.observe(reply.Node, mode, "tcp", family, rtt)
	c.recovered("tcp", family)
	klog.V(4).InfoS("Probe", "protocol", "tcp", "family", family, "mode", mode, "server", reply.Pod, "serverNode", reply.Node,
		"connect", connectDone.Sub(connectStart), "firstByte", firstByte.Sub(start), "roundTrip", rtt)
}

// probeUDP sends one datagram from a new connected socket and waits for
// the echo: the connect() of the socket is what a socket-level datapath
// translates, as a resolver's would be.
func (c *client) probeUDP(ctx context.Context, dst familyIP, port int32, mode string) {
	family := dst.family.String()
	seq := strconv.FormatUint(c.udpSeq.Add(1), 10)
	payload := "kbp-probe " + seq
	start := time.Now()
	ctx, cancel := context.WithDeadline(ctx, start.Add(c.o.udpTimeout))
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", netip.AddrPortFrom(dst.ip, uint16(port)).String())
	if err != nil {
		c.failed(ctx, "udp", family, mode, err)
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(start.Add(c.o.udpTimeout))
	if _, err := conn.Write([]byte(payload)); err != nil {
		c.failed(ctx, "udp", family, mode, err)
		return
	}
	buf := make([]byte, udpReplyLimit)
	n, err := conn.Read(buf)
	end := time.Now()
	if err != nil {
		c.failed(ctx, "udp", family, mode, err)
		return
	}
	// "kbp-probe SEQ POD NODE"; a reply to another request cannot reach
	// this new socket, but check anyway.
	f := strings.Fields(string(buf[:n]))
	if len(f) != 4 || f[0] != "kbp-probe" || f[1] != seq {
		c.failed(ctx, "udp", family, mode, fmt.Errorf("unexpected reply %q to %q", truncate(buf[:n]), payload))
		return
	}
	rtt := end.Sub(start)
	c.observe(f[3], mode, "udp", family, rtt)
	c.recovered("udp", family)
	klog.V(4).InfoS("Probe", "protocol", "udp", "family", family, "mode", mode, "server", f[2], "serverNode", f[3], "roundTrip", rtt)
}

// observe records one round trip of this client's to serverNode.
func (c *client) observe(serverNode, mode, protocol, family string, rtt time.Duration) {
	s := rtt.Seconds()
	c.m.roundTrip.WithLabelValues(c.id.node, serverNode, mode, protocol, family).Observe(s)
	c.m.squared.WithLabelValues(c.id.node, serverNode, mode, protocol, family).Add(s * s)
}

// failed counts a failed probe by kind, and logs it: every one at -v=4,
// a change of kind at the default level (per protocol and family).
func (c *client) failed(ctx context.Context, protocol, family, mode string, err error) {
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return // shutting down, not a probe failure
	}
	kind := ErrorKind(err)
	c.m.errors.WithLabelValues(c.id.node, mode, protocol, kind, family).Inc()
	if prev, loaded := c.lastErr.Swap(protocol+"/"+family, kind); !loaded || prev != kind {
		klog.InfoS("Probe failing", "protocol", protocol, "family", family, "mode", mode, "kind", kind, "err", err)
	}
	klog.V(4).InfoS("Probe failed", "protocol", protocol, "family", family, "mode", mode, "kind", kind, "err", err)
}

func (c *client) recovered(protocol, family string) {
	if prev, loaded := c.lastErr.LoadAndDelete(protocol + "/" + family); loaded {
		klog.InfoS("Probe succeeds again", "protocol", protocol, "family", family, "after", prev)
	}
}

// ErrorKind classifies a probe failure: refused (no endpoint: the connect or
// the datagram was refused, by a socket-level datapath at connect() or by an
// ICMP port unreachable), timeout, reset (the connection was reset or closed
// before the answer), or other.
func ErrorKind(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return KindRefused
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return KindTimeout
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return KindReset
	}
	return KindOther
}

func truncate(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "..."
	}
	return string(b)
}
