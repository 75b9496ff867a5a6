package probe

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/httpserve"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// ServerReply is the HTTP endpoint's answer.
type ServerReply struct {
	Pod  string `json:"pod"`
	Node string `json:"node"`
	// Received is when the server read the request's headers (its own
	// clock: comparable with the client's only on one node).
	Received time.Time `json:"received"`
}

// serverOptions are the server's flags.
type serverOptions struct {
	httpAddr, tcpEchoAddr, udpEchoAddr, metricsAddr string
}

// bothFamilies is said of the bind addresses: Go listens on an empty or
// unspecified host (":8080", "0.0.0.0:8080", "[::]:8080") with one IPv6
// socket with IPV6_V6ONLY off where the system has IPv6, so one socket
// answers the Service's ClusterIP of either family.
const bothFamilies = "; an empty host (:PORT), 0.0.0.0 or [::] listens on both IP families, one socket for both (IPv4 alone where the pod has no IPv6)"

func serverFlags(o *serverOptions, fs *flag.FlagSet) {
	fs.StringVar(&o.httpAddr, "http-bind-address", ":8080", "address of the HTTP endpoint that answers with the pod's and node's names and the time it received the request"+bothFamilies)
	fs.StringVar(&o.tcpEchoAddr, "tcp-echo-bind-address", ":8081", "address of the TCP echo port"+bothFamilies)
	fs.StringVar(&o.udpEchoAddr, "udp-echo-bind-address", ":8082", "address of the UDP echo port; each reply carries the server's pod and node names"+bothFamilies)
	fs.StringVar(&o.metricsAddr, "metrics-bind-address", ":9090", "address of /metrics and /healthz"+bothFamilies)
}

// server answers the client's probes.
type server struct {
	id       identity
	requests *prometheus.CounterVec
}

// udpReplyLimit bounds an echoed datagram: the client's are a few bytes,
// and the reply must fit in one datagram with the names added.
const udpReplyLimit = 1024

// runServer serves until ctx ends; each listener failing to start is an
// error at once.
func runServer(ctx context.Context, o serverOptions, id identity) error {
	reg := newRegistry()
	s := &server{id: id, requests: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricServerCount,
		Help: "Probe requests the server answered, by its node, protocol (http, tcp echo connections, udp echo datagrams) and the family of the client's address (ip_family, IPv4 or IPv6).",
	}, []string{"node", "protocol", "ip_family"})}
	reg.MustRegister(s.requests)
	// Series exist from the start, at 0, for the families the pod has an
	// address of; others appear with their first request.
	for _, f := range podFamilies() {
		for _, p := range []string{"http", "tcp", "udp"} {
			s.requests.WithLabelValues(id.node, p, f.String())
		}
	}

	var lc net.ListenConfig
	httpLn, err := lc.Listen(ctx, "tcp", o.httpAddr)
	if err != nil {
		return fmt.Errorf("listening for HTTP on %s: %w", o.httpAddr, err)
	}
	tcpLn, err := lc.Listen(ctx, "tcp", o.tcpEchoAddr)
	if err != nil {
		httpLn.Close()
		return fmt.Errorf("listening for TCP echo on %s: %w", o.tcpEchoAddr, err)
	}
	udpConn, err := lc.ListenPacket(ctx, "udp", o.udpEchoAddr)
	if err != nil {
		httpLn.Close()
		tcpLn.Close()
		return fmt.Errorf("listening for UDP echo on %s: %w", o.udpEchoAddr, err)
	}
	metricsLn, err := lc.Listen(ctx, "tcp", o.metricsAddr)
	if err != nil {
		httpLn.Close()
		tcpLn.Close()
		udpConn.Close()
		return fmt.Errorf("listening for metrics on %s: %w", o.metricsAddr, err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 4)
	goServe := func(f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil {
				errc <- err
				cancel()
			}
		}()
	}
	goServe(func() error { return httpserve.Serve(ctx, "probe HTTP", httpLn, http.HandlerFunc(s.serveHTTP)) })
	goServe(func() error { return s.serveTCPEcho(ctx, tcpLn) })
	goServe(func() error { return s.serveUDPEcho(ctx, udpConn) })
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	goServe(func() error { return httpserve.Serve(ctx, "probe server metrics", metricsLn, mux) })
	klog.InfoS("Probe server ready", "pod", id.pod, "node", id.node,
		"http", httpLn.Addr().String(), "tcpEcho", tcpLn.Addr().String(), "udpEcho", udpConn.LocalAddr().String())
	wg.Wait()
	close(errc)
	return errors.Join(collect(errc)...)
}

func collect(errc <-chan error) []error {
	var errs []error
	for err := range errc {
		errs = append(errs, err)
	}
	return errs
}

func (s *server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	received := time.Now()
	s.requests.WithLabelValues(s.id.node, "http", familyOfAddr(r.RemoteAddr)).Inc()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(ServerReply{Pod: s.id.pod, Node: s.id.node, Received: received.UTC()})
}

// serveTCPEcho echoes each connection's bytes back until the client closes
// it or ctx ends.
func (s *server) serveTCPEcho(ctx context.Context, ln net.Listener) error {
	// Whatever ends the loop, the open connections are closed (cancel)
	// before waiting for their goroutines (deferred calls run last first).
	var conns sync.WaitGroup
	defer conns.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accepting TCP echo connections: %w", err)
		}
		s.requests.WithLabelValues(s.id.node, "tcp", familyOfAddr(c.RemoteAddr().String())).Inc()
		conns.Add(1)
		go func() {
			defer conns.Done()
			defer c.Close()
			// An idle connection does not outlive the server.
			done := context.AfterFunc(ctx, func() { c.Close() })
			defer done()
			_, _ = io.Copy(c, c)
		}()
	}
}

// serveUDPEcho answers each datagram with "<payload> <pod> <node>": the
// client learns which server, on which node, answered.
func (s *server) serveUDPEcho(ctx context.Context, pc net.PacketConn) error {
	stop := context.AfterFunc(ctx, func() { pc.Close() })
	defer stop()
	buf := make([]byte, udpReplyLimit)
	suffix := " " + s.id.pod + " " + s.id.node
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("reading UDP echo datagrams: %w", err)
		}
		payload := strings.TrimSpace(string(buf[:n]))
		if len(payload)+len(suffix) > udpReplyLimit {
			continue // not a probe's datagram
		}
		s.requests.WithLabelValues(s.id.node, "udp", familyOfAddr(addr.String())).Inc()
		if _, err := pc.WriteTo([]byte(payload+suffix), addr); err != nil {
			klog.V(2).InfoS("UDP echo reply failed", "client", addr.String(), "err", err)
		}
	}
}

// familyOfAddr is the family of a client's "host:port" as the ip_family
// label spells it. A dual-stack socket shows an IPv4 client as
// ::ffff:a.b.c.d: that is IPv4.
func familyOfAddr(hostport string) string {
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil {
		return "unknown"
	}
	return model.FamilyOf(ap.Addr().Unmap()).String()
}

// podFamilies returns the families of the pod's global unicast addresses
// (loopback and link-local left out: no ClusterIP leads there).
func podFamilies() []model.IPFamily {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		klog.V(2).InfoS("Listing the pod's addresses failed", "err", err)
		return nil
	}
	has := map[model.IPFamily]bool{}
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok || !ip.Unmap().IsGlobalUnicast() {
			continue
		}
		has[model.FamilyOf(ip.Unmap())] = true
	}
	var out []model.IPFamily
	for _, f := range model.Families {
		if has[f] {
			out = append(out, f)
		}
	}
	return out
}
