package probe

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestMainErrors(t *testing.T) {
	full := map[string]string{EnvPodName: "p", EnvPodNamespace: "ns", EnvNodeName: "n"}
	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		wantCode int
		wantErr  string
	}{
		{"no role", nil, full, 2, "usage: kube-bpf-proxy probe server|client"},
		{"unknown role", []string{"relay"}, full, 2, `unknown probe role "relay"`},
		{"unknown flag", []string{"server", "--bogus"}, full, 2, "usage: kube-bpf-proxy probe server"},
		{"stray argument", []string{"client", "now"}, full, 2, `unexpected argument "now"`},
		{"bad service", []string{"client", "--service=probe-server"}, full, 2, "want namespace/name"},
		{"bad interval", []string{"client", "--interval=0s"}, full, 2, "--interval"},
		{"bad jitter", []string{"client", "--jitter=1"}, full, 2, "--jitter"},
		{"no downward API", []string{"server"}, map[string]string{}, 1, "POD_NAME, POD_NAMESPACE, NODE_NAME not set"},
		{"node name missing", []string{"client"}, map[string]string{EnvPodName: "p", EnvPodNamespace: "ns", EnvNodeName: " "}, 1, "NODE_NAME not set"},
		{"client outside a pod", []string{"client"}, full, 1, ""},
		{"server port taken", []string{"server", "--http-bind-address=256.0.0.1:1"}, full, 1, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			code := Main(context.Background(), tt.args, &stderr, env(tt.env))
			if code != tt.wantCode || !strings.Contains(stderr.String(), tt.wantErr) {
				t.Errorf("Main(%q) = %d, stderr %q; want %d and %q", tt.args, code, stderr.String(), tt.wantCode, tt.wantErr)
			}
		})
	}
}

func TestErrorKind(t *testing.T) {
	// A port nobody listens on, on loopback: refused for TCP and for UDP
	// (an ICMP port unreachable on a connected socket).
	addr := testnet.FreeAddr(t)
	_, tcpErr := net.Dial("tcp", addr)
	udp, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	_, _ = udp.Write([]byte("x"))
	_ = udp.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, udpErr := udp.Read(make([]byte, 10))

	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	quiet, err := net.Dial("udp", silent.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	_, _ = quiet.Write([]byte("x"))
	_ = quiet.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
	_, timeoutErr := quiet.Read(make([]byte, 10))

	for _, tt := range []struct {
		name string
		err  error
		want string
	}{
		{"tcp refused", tcpErr, KindRefused},
		{"udp refused", udpErr, KindRefused},
		{"deadline", timeoutErr, KindTimeout},
		{"context", fmt.Errorf("get: %w", context.DeadlineExceeded), KindTimeout},
		{"eof", fmt.Errorf("read: %w", io.EOF), KindReset},
		{"status", fmt.Errorf("HTTP status 503"), KindOther},
	} {
		if got := ErrorKind(tt.err); got != tt.want {
			t.Errorf("%s: ErrorKind(%v) = %s, want %s", tt.name, tt.err, got, tt.want)
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	return testnet.FreePort(t)
}

func getMetrics(addr string) (Scrape, error) {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return ParseScrape(resp.Body)
}

// count returns the round trips counted in s for labels (a subset).
func count(s Scrape, name string, labels map[string]string) float64 {
	var total float64
	f := s[name]
	if f == nil {
		return 0
	}
next:
	for _, m := range f.GetMetric() {
		for k, v := range labels {
			if label(m, k) != v {
				continue next
			}
		}
		if h := m.GetHistogram(); h != nil {
			total += float64(h.GetSampleCount())
		} else {
			total += m.GetCounter().GetValue()
		}
	}
	return total
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestClientAndServer runs both on loopback, the Service's "ClusterIP"
// being 127.0.0.1, with a fake API: the client finds the ports by name,
// labels its series with both nodes and the Node's mode, follows a mode
// change, and counts refusals once the server is gone.
func TestClientAndServer(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	httpPort, tcpPort, udpPort, srvMetrics, cliMetrics := freePort(t), freePort(t), freePort(t), freePort(t), freePort(t)
	srvCtx, stopServer := context.WithCancel(ctx)
	srvDone := make(chan error, 1)
	go func() {
		srvDone <- runServer(srvCtx, serverOptions{
			httpAddr:    fmt.Sprintf("127.0.0.1:%d", httpPort),
			tcpEchoAddr: fmt.Sprintf("127.0.0.1:%d", tcpPort),
			udpEchoAddr: fmt.Sprintf("127.0.0.1:%d", udpPort),
			metricsAddr: fmt.Sprintf("127.0.0.1:%d", srvMetrics),
		}, identity{pod: "server-0", namespace: "probe", node: "node-b"})
	}()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "probe", Name: "probe-server"},
		Spec: corev1.ServiceSpec{ClusterIP: "127.0.0.1", Ports: []corev1.ServicePort{
			{Name: "http", Protocol: corev1.ProtocolTCP, Port: int32(httpPort)},
			{Name: "tcp-echo", Protocol: corev1.ProtocolTCP, Port: int32(tcpPort)},
			{Name: "udp-echo", Protocol: corev1.ProtocolUDP, Port: int32(udpPort)},
		}},
	}
	cs := fake.NewClientset(node, svc)
	o := clientOptions{service: "probe/probe-server", httpPort: "http", udpPort: "udp-echo",
		interval: 10 * time.Millisecond, timeout: time.Second, udpTimeout: time.Second,
		metricsAddr: fmt.Sprintf("127.0.0.1:%d", cliMetrics)}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	cliDone := make(chan error, 1)
	go func() {
		cliDone <- serveClient(ctx, o, identity{pod: "client-a", namespace: "probe", node: "node-a"}, cs)
	}()
	addr := fmt.Sprintf("127.0.0.1:%d", cliMetrics)

	seen := func(mode, protocol string) func() bool {
		return func() bool {
			s, err := getMetrics(addr)
			return err == nil && count(s, metricRoundTrip, map[string]string{
				"client_node": "node-a", "server_node": "node-b", "mode": mode, "protocol": protocol}) >= 3
		}
	}
	waitFor(t, "round trips with mode none", seen(NoMode, "tcp"))
	waitFor(t, "UDP round trips with mode none", seen(NoMode, "udp"))
	s, err := getMetrics(addr)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{metricConnect, metricFirstByte} {
		if count(s, name, map[string]string{"client_node": "node-a", "server_node": "node-b", "mode": NoMode}) == 0 {
			t.Errorf("no %s observed", name)
		}
	}
	if n := count(s, metricErrors, nil); n != 0 {
		t.Errorf("%g errors counted against a serving server", n)
	}
	if n := len(s[metricErrors].GetMetric()); n != 8 {
		t.Errorf("%d error series, want 8 at zero (2 protocols, 4 kinds) for mode none", n)
	}
	if count(s, metricSquared, map[string]string{"protocol": "tcp"}) <= 0 {
		t.Errorf("squared round trips not counted")
	}

	node.Labels = map[string]string{ModeLabel: "ebpf"}
	if _, err := cs.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "round trips with mode ebpf", seen("ebpf", "tcp"))
	waitFor(t, "UDP round trips with mode ebpf", seen("ebpf", "udp"))
	// An A/B's swap: the node's proxy changes mode, and the requests
	// follow the label.
	node.Labels = map[string]string{ModeLabel: "iptables"}
	if _, err := cs.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "round trips with mode iptables after the swap", seen("iptables", "tcp"))

	srvGet := func() (Scrape, error) { return getMetrics(fmt.Sprintf("127.0.0.1:%d", srvMetrics)) }
	ss, err := srvGet()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"http", "udp"} {
		if count(ss, metricServerCount, map[string]string{"node": "node-b", "protocol": p}) == 0 {
			t.Errorf("server counted no %s requests", p)
		}
	}

	stopServer()
	if err := <-srvDone; err != nil {
		t.Fatalf("server: %v", err)
	}
	for _, p := range []string{"tcp", "udp"} {
		waitFor(t, p+" refusals", func() bool {
			s, err := getMetrics(addr)
			return err == nil && count(s, metricErrors, map[string]string{
				"client_node": "node-a", "mode": "iptables", "protocol": p, "kind": KindRefused}) > 0
		})
	}
	cancel()
	if err := <-cliDone; err != nil {
		t.Errorf("client: %v", err)
	}
}

func TestServerTCPEcho(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tcpPort := freePort(t)
	done := make(chan error, 1)
	go func() {
		done <- runServer(ctx, serverOptions{
			httpAddr: "127.0.0.1:0", tcpEchoAddr: fmt.Sprintf("127.0.0.1:%d", tcpPort),
			udpEchoAddr: "127.0.0.1:0", metricsAddr: "127.0.0.1:0",
		}, identity{pod: "s", namespace: "n", node: "x"})
	}()
	var c net.Conn
	waitFor(t, "the echo port", func() bool {
		var err error
		c, err = net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", tcpPort))
		return err == nil
	})
	defer c.Close()
	if _, err := c.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello\n" {
		t.Errorf("echo %q, %v", buf, err)
	}
	// The server stops with an idle connection open.
	cancel()
	if err := <-done; err != nil {
		t.Errorf("server: %v", err)
	}
}
