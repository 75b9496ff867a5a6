package probe

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// probeServer runs a server with addresses host:port for its three
// listeners until the test ends, and returns the ports.
func probeServer(t *testing.T, host string) (httpPort, tcpPort, udpPort, metricsPort int) {
	t.Helper()
	httpPort, tcpPort, udpPort, metricsPort = freePort(t), freePort(t), freePort(t), freePort(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- runServer(ctx, serverOptions{
			httpAddr:    net.JoinHostPort(host, fmt.Sprint(httpPort)),
			tcpEchoAddr: net.JoinHostPort(host, fmt.Sprint(tcpPort)),
			udpEchoAddr: net.JoinHostPort(host, fmt.Sprint(udpPort)),
			metricsAddr: net.JoinHostPort("127.0.0.1", fmt.Sprint(metricsPort)),
		}, identity{pod: "server-0", namespace: "probe", node: "node-b"})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	waitFor(t, "the server's metrics", func() bool {
		_, err := getMetrics(fmt.Sprintf("127.0.0.1:%d", metricsPort))
		return err == nil
	})
	return httpPort, tcpPort, udpPort, metricsPort
}

// probeClient runs a client of svc (namespace probe, name probe-server)
// until the test ends, and returns the address of its /metrics.
func probeClient(t *testing.T, svc *corev1.Service) string {
	t.Helper()
	svc.Namespace, svc.Name = "probe", "probe-server"
	cs := fake.NewClientset(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a",
		Labels: map[string]string{ModeLabel: "ebpf"}}}, svc)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	o := clientOptions{service: "probe/probe-server", httpPort: "http", udpPort: "udp-echo",
		// Limits far above a loopback round trip, so that a loaded
		// machine does not turn one into a timeout.
		interval: 10 * time.Millisecond, timeout: 10 * time.Second, udpTimeout: 10 * time.Second, metricsAddr: addr}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serveClient(ctx, o, identity{pod: "client-a", namespace: "probe", node: "node-a"}, cs) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("client: %v", err)
		}
	})
	return addr
}

func probePorts(httpPort, udpPort int) []corev1.ServicePort {
	return []corev1.ServicePort{
		{Name: "http", Protocol: corev1.ProtocolTCP, Port: int32(httpPort)},
		{Name: "udp-echo", Protocol: corev1.ProtocolUDP, Port: int32(udpPort)},
	}
}

// families returns the ip_family values of name's series in s.
func families(s Scrape, name string) []string {
	var out []string
	for _, m := range s[name].GetMetric() {
		if f := label(m, "ip_family"); !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	slices.Sort(out)
	return out
}

// A dual-stack Service has a ClusterIP per family: the client probes each,
// its series labelled with the family, and the server, listening once on
// both families, answers both and counts each by family.
func TestClientProbesEveryFamily(t *testing.T) {
	httpPort, _, udpPort, srvMetrics := probeServer(t, "") // ":port": both families
	for _, order := range [][]string{{"127.0.0.1", "::1"}, {"::1", "127.0.0.1"}} {
		t.Run(strings.Join(order, ","), func(t *testing.T) {
			addr := probeClient(t, &corev1.Service{Spec: corev1.ServiceSpec{
				ClusterIP: order[0], ClusterIPs: order,
				IPFamilies:     []corev1.IPFamily{familyOf(order[0]), familyOf(order[1])},
				IPFamilyPolicy: ptr(corev1.IPFamilyPolicyPreferDualStack),
				Ports:          probePorts(httpPort, udpPort)}})
			for _, family := range []string{"IPv4", "IPv6"} {
				for _, protocol := range []string{"tcp", "udp"} {
					waitFor(t, family+" "+protocol+" round trips", func() bool {
						s, err := getMetrics(addr)
						return err == nil && count(s, metricRoundTrip, map[string]string{"client_node": "node-a", "server_node": "node-b",
							"mode": "ebpf", "protocol": protocol, "ip_family": family}) >= 3
					})
				}
			}
			s, err := getMetrics(addr)
			if err != nil {
				t.Fatal(err)
			}
			for _, name := range []string{metricRoundTrip, metricSquared, metricConnect, metricFirstByte, metricErrors} {
				if got := families(s, name); !slices.Equal(got, []string{"IPv4", "IPv6"}) {
					t.Errorf("%s: ip_family %v, want IPv4 and IPv6", name, got)
				}
			}
			if n := count(s, metricErrors, nil); n != 0 {
				t.Errorf("%g errors counted against a server of both families", n)
			}
			// At zero: 2 protocols, 4 kinds, 2 families (and as many of
			// mode none if the Service came before the Node).
			n := 0
			for _, m := range s[metricErrors].GetMetric() {
				if label(m, "mode") == "ebpf" {
					n++
				}
			}
			if n != 16 {
				t.Errorf("%d error series of mode ebpf, want 16", n)
			}
		})
	}
	ss, err := getMetrics(fmt.Sprintf("127.0.0.1:%d", srvMetrics))
	if err != nil {
		t.Fatal(err)
	}
	for _, family := range []string{"IPv4", "IPv6"} {
		for _, p := range []string{"http", "udp"} {
			if count(ss, metricServerCount, map[string]string{"node": "node-b", "protocol": p, "ip_family": family}) == 0 {
				t.Errorf("server counted no %s %s requests", family, p)
			}
		}
	}
}

func familyOf(ip string) corev1.IPFamily {
	if strings.Contains(ip, ":") {
		return corev1.IPv6Protocol
	}
	return corev1.IPv4Protocol
}

func ptr[T any](v T) *T { return &v }

// A single-stack Service, as on an IPv4-only cluster (a Service written
// before dual-stack has no clusterIPs: clusterIP alone), gives IPv4 series
// only, as before the family label.
func TestClientSingleStack(t *testing.T) {
	httpPort, _, udpPort, _ := probeServer(t, "")
	for _, tt := range []struct {
		name string
		spec corev1.ServiceSpec
		want string
	}{
		{"IPv4", corev1.ServiceSpec{ClusterIP: "127.0.0.1", ClusterIPs: []string{"127.0.0.1"}}, "IPv4"},
		{"clusterIP only", corev1.ServiceSpec{ClusterIP: "127.0.0.1"}, "IPv4"},
		{"IPv6", corev1.ServiceSpec{ClusterIP: "::1", ClusterIPs: []string{"::1"}}, "IPv6"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.spec.Ports = probePorts(httpPort, udpPort)
			addr := probeClient(t, &corev1.Service{Spec: tt.spec})
			for _, protocol := range []string{"tcp", "udp"} {
				waitFor(t, protocol+" round trips", func() bool {
					s, err := getMetrics(addr)
					return err == nil && count(s, metricRoundTrip, map[string]string{"protocol": protocol, "ip_family": tt.want}) >= 3
				})
			}
			s, err := getMetrics(addr)
			if err != nil {
				t.Fatal(err)
			}
			for _, name := range []string{metricRoundTrip, metricSquared, metricConnect, metricFirstByte, metricErrors} {
				if got := families(s, name); !slices.Equal(got, []string{tt.want}) {
					t.Errorf("%s: ip_family %v, want %s only", name, got, tt.want)
				}
			}
		})
	}
}

// One family failing is counted against that family: a server listening on
// 127.0.0.1 only refuses the IPv6 ClusterIP while the IPv4 one answers.
func TestClientFamilyFailsAlone(t *testing.T) {
	httpPort, _, udpPort, _ := probeServer(t, "127.0.0.1")
	addr := probeClient(t, &corev1.Service{Spec: corev1.ServiceSpec{
		ClusterIP: "127.0.0.1", ClusterIPs: []string{"127.0.0.1", "::1"}, Ports: probePorts(httpPort, udpPort)}})
	for _, protocol := range []string{"tcp", "udp"} {
		waitFor(t, protocol+" IPv6 refusals and IPv4 round trips", func() bool {
			s, err := getMetrics(addr)
			return err == nil &&
				count(s, metricErrors, map[string]string{"protocol": protocol, "kind": KindRefused, "ip_family": "IPv6"}) >= 3 &&
				count(s, metricRoundTrip, map[string]string{"protocol": protocol, "ip_family": "IPv4"}) >= 3
		})
	}
	s, err := getMetrics(addr)
	if err != nil {
		t.Fatal(err)
	}
	if n := count(s, metricErrors, map[string]string{"ip_family": "IPv4", "kind": KindRefused}); n != 0 {
		t.Errorf("%g IPv4 refusals, want none: the IPv4 ClusterIP answers", n)
	}
	if n := count(s, metricRoundTrip, map[string]string{"ip_family": "IPv6"}); n != 0 {
		t.Errorf("%g IPv6 round trips, want none: nothing listens on ::1", n)
	}
}

// The server's default addresses (":PORT") listen on both families: HTTP,
// the TCP echo and the UDP echo answer on 127.0.0.1 and on ::1, and each
// request is counted with the family of the client's address (an IPv4
// client of the one dual-stack socket shows as ::ffff:127.0.0.1, counted as
// IPv4).
func TestServerListensOnBothFamilies(t *testing.T) {
	var o serverOptions
	serverFlags(&o, flag.NewFlagSet("server", flag.ContinueOnError))
	for _, a := range []string{o.httpAddr, o.tcpEchoAddr, o.udpEchoAddr, o.metricsAddr} {
		if host, _, err := net.SplitHostPort(a); err != nil || host != "" {
			t.Errorf("default bind address %q: want :PORT, both families", a)
		}
	}
	httpPort, tcpPort, udpPort, srvMetrics := probeServer(t, "")
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			c := &http.Client{Timeout: 5 * time.Second}
			resp, err := c.Get("http://" + net.JoinHostPort(host, fmt.Sprint(httpPort)) + "/")
			if err != nil {
				t.Fatal(err)
			}
			var reply ServerReply
			err = json.NewDecoder(resp.Body).Decode(&reply)
			resp.Body.Close()
			if err != nil || reply.Node != "node-b" || reply.Pod != "server-0" {
				t.Errorf("HTTP answer %+v, %v", reply, err)
			}

			tc, err := net.Dial("tcp", net.JoinHostPort(host, fmt.Sprint(tcpPort)))
			if err != nil {
				t.Fatal(err)
			}
			defer tc.Close()
			_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 3)
			if _, err := tc.Write([]byte("hi\n")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(tc, buf); err != nil || string(buf) != "hi\n" {
				t.Errorf("TCP echo %q, %v", buf, err)
			}

			uc, err := net.Dial("udp", net.JoinHostPort(host, fmt.Sprint(udpPort)))
			if err != nil {
				t.Fatal(err)
			}
			defer uc.Close()
			_ = uc.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := uc.Write([]byte("kbp-probe 1")); err != nil {
				t.Fatal(err)
			}
			ub := make([]byte, udpReplyLimit)
			n, err := uc.Read(ub)
			if err != nil || string(ub[:n]) != "kbp-probe 1 server-0 node-b" {
				t.Errorf("UDP echo %q, %v", ub[:n], err)
			}
		})
	}
	s, err := getMetrics(fmt.Sprintf("127.0.0.1:%d", srvMetrics))
	if err != nil {
		t.Fatal(err)
	}
	for _, family := range []string{"IPv4", "IPv6"} {
		for _, p := range []string{"http", "tcp", "udp"} {
			if n := count(s, metricServerCount, map[string]string{"node": "node-b", "protocol": p, "ip_family": family}); n != 1 {
				t.Errorf("server counted %g %s %s requests, want 1", n, family, p)
			}
		}
	}
}

func TestTargetOf(t *testing.T) {
	ports := probePorts(80, 7)
	for _, tt := range []struct {
		name string
		spec corev1.ServiceSpec
		want []string // "family ip"; nil: no target
	}{
		{"dual-stack", corev1.ServiceSpec{ClusterIP: "10.0.0.1", ClusterIPs: []string{"10.0.0.1", "fd00::1"}, Ports: ports},
			[]string{"IPv4 10.0.0.1", "IPv6 fd00::1"}},
		{"IPv6 first", corev1.ServiceSpec{ClusterIP: "fd00::1", ClusterIPs: []string{"fd00::1", "10.0.0.1"}, Ports: ports},
			[]string{"IPv6 fd00::1", "IPv4 10.0.0.1"}},
		{"IPv4 only", corev1.ServiceSpec{ClusterIP: "10.0.0.1", ClusterIPs: []string{"10.0.0.1"}, Ports: ports}, []string{"IPv4 10.0.0.1"}},
		{"clusterIP only", corev1.ServiceSpec{ClusterIP: "10.0.0.1", Ports: ports}, []string{"IPv4 10.0.0.1"}},
		{"bad address skipped", corev1.ServiceSpec{ClusterIP: "10.0.0.1", ClusterIPs: []string{"10.0.0.1", "fd00::zz"}, Ports: ports}, []string{"IPv4 10.0.0.1"}},
		{"second of a family skipped", corev1.ServiceSpec{ClusterIPs: []string{"10.0.0.1", "10.0.0.2"}, Ports: ports}, []string{"IPv4 10.0.0.1"}},
		{"mapped", corev1.ServiceSpec{ClusterIPs: []string{"::ffff:10.0.0.1"}, Ports: ports}, []string{"IPv4 10.0.0.1"}},
		{"headless", corev1.ServiceSpec{ClusterIP: "None", ClusterIPs: []string{"None"}, Ports: ports}, nil},
		{"no address", corev1.ServiceSpec{Ports: ports}, nil},
		{"no udp port", corev1.ServiceSpec{ClusterIPs: []string{"10.0.0.1"}, Ports: ports[:1]}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := targetOf(&corev1.Service{Spec: tt.spec}, "http", "udp-echo", "probe/probe-server")
			if tt.want == nil {
				if got != nil {
					t.Errorf("target %+v, want none", got)
				}
				return
			}
			if got == nil {
				t.Fatalf("no target, want %v", tt.want)
			}
			var ips []string
			for _, x := range got.ips {
				ips = append(ips, x.family.String()+" "+x.ip.String())
			}
			if !slices.Equal(ips, tt.want) || got.httpPort != 80 || got.udpPort != 7 {
				t.Errorf("target %v ports %d/%d, want %v ports 80/7", ips, got.httpPort, got.udpPort, tt.want)
			}
		})
	}
}

// Each family is probed on its own: an IPv6 ClusterIP whose every probe
// hangs (a listener that never answers, a UDP socket that never replies)
// does not hold up the IPv4 one.
func TestFamilyHangDoesNotStallTheOther(t *testing.T) {
	httpPort, _, udpPort, _ := probeServer(t, "127.0.0.1")
	silentTCP, err := net.Listen("tcp", net.JoinHostPort("::1", fmt.Sprint(httpPort)))
	if err != nil {
		t.Fatal(err)
	}
	defer silentTCP.Close()
	go func() {
		for {
			c, err := silentTCP.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	silentUDP, err := net.ListenPacket("udp", net.JoinHostPort("::1", fmt.Sprint(udpPort)))
	if err != nil {
		t.Fatal(err)
	}
	defer silentUDP.Close()
	addr := probeClient(t, &corev1.Service{Spec: corev1.ServiceSpec{
		ClusterIP: "::1", ClusterIPs: []string{"::1", "127.0.0.1"}, Ports: probePorts(httpPort, udpPort)}})
	// The IPv6 probes wait for their 10 s limit; meanwhile IPv4 keeps
	// going.
	for _, protocol := range []string{"tcp", "udp"} {
		waitFor(t, protocol+" IPv4 round trips while IPv6 hangs", func() bool {
			s, err := getMetrics(addr)
			return err == nil && count(s, metricRoundTrip, map[string]string{"protocol": protocol, "ip_family": "IPv4"}) >= 5
		})
	}
}
