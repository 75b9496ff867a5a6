// Package healthcheck serves the health check node ports of Services with
// externalTrafficPolicy Local, as kube-proxy (v1.36) serves them: a cloud
// load balancer probes each node on the Service's healthCheckNodePort and
// sends traffic only to nodes that answer 200, that is nodes with a ready
// endpoint of the Service, since external traffic to any other node is
// dropped there. It does not depend on the datapath mode: both modes serve
// the same ports from the same process.
//
// Each Service gets an HTTP server of its own on its port, answering every
// path and method with
//
//	{
//		"service": {
//			"namespace": "NS",
//			"name": "NAME"
//		},
//		"localEndpoints": N,
//		"serviceProxyHealthy": true
//	}
//
// (tab-indented, no trailing newline, byte for byte kube-proxy's), status
// 200 when N > 0 and the proxy is healthy, else 503, and the headers
// Content-Type: application/json, X-Content-Type-Options: nosniff and
// X-Load-Balancing-Endpoint-Weight: N, which some load balancers use to
// weigh nodes by their number of endpoints.
//
// On a dual-stack node each IP family's proxier tells the Server its own
// Services, addresses and local endpoint counts (the *For methods), as
// each of kube-proxy's per-family proxiers has a health check server of
// its own. The two families of one Service share its port, and are not
// combined: a port listens on each family that serves the Service (tcp4
// on the IPv4 family's addresses, tcp6 on the IPv6 family's, IPV6_V6ONLY
// so the two sockets coexist), and a probe is answered with the local endpoints of
// the family of the address it arrived on. That is kube-proxy's answer: a
// load balancer probing a node's IPv4 address learns whether IPv4 traffic
// has a local endpoint there, whatever the IPv6 endpoints are, and an
// IPv4-only Service listens on IPv4 alone.
package healthcheck

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Event fields of a health check port that cannot be opened, kube-proxy's.
const (
	EventReasonFailed = "FailedToStartServiceHealthcheck"
	eventAction       = "Listen"
)

// bodyFormat is kube-proxy's answer once its template has been dedented and
// trimmed; %q quotes the names as JSON does, since Kubernetes names have
// only ASCII letters, digits, '-' and '.'.
const bodyFormat = "{\n\t\"service\": {\n\t\t\"namespace\": %q,\n\t\t\"name\": %q\n\t},\n\t\"localEndpoints\": %d,\n\t\"serviceProxyHealthy\": %v\n}"

// readHeaderTimeout stops a client that connects and never sends a request
// from holding a connection forever; probes send theirs at once.
const readHeaderTimeout = 10 * time.Second

// Config configures a Server. Every field is optional.
type Config struct {
	// NodeName names this node in the Events, as kube-proxy's do.
	NodeName string
	// Recorder records a Warning Event on a Service whose health check
	// port cannot be opened, each time it is tried; nil records none.
	Recorder events.EventRecorder
	// ServiceUID returns a Service's UID for its Events' reference, so
	// that `kubectl describe service` lists them; nil leaves it empty,
	// as kube-proxy does.
	ServiceUID func(model.ServiceName) types.UID
	// Healthy reports whether the proxy keeps the datapath up to date
	// (what /healthz reports; kube-proxy's serviceProxyHealthy). While it
	// is false every health check answers 503, so that load balancers
	// stop sending traffic to a node whose rules may be stale. Nil means
	// always healthy. It is called from HTTP handlers, concurrently.
	Healthy func() bool
	// Listen opens a listening socket; nil uses net.ListenConfig. Tests
	// use it to listen in another network namespace.
	Listen func(ctx context.Context, network, address string) (net.Listener, error)
}

// Server serves the health check node ports. SyncServices, SyncEndpoints,
// SetAddresses and Close are meant for one goroutine, the proxy's sync
// loop (they are safe to call from several, serialised by a lock); the
// HTTP handlers run concurrently with them.
type Server struct {
	cfg Config

	// mu guards everything below. Syncs hold it while they open and close
	// listeners, which is quick; handlers hold it only to read a count.
	mu       sync.RWMutex
	families map[model.IPFamily]*family
	closed   bool

	// serving counts the Serve goroutines, for Close to wait for.
	serving sync.WaitGroup
}

// family is what one IP family's proxier told the Server.
type family struct {
	// all and ips are where ports listen (see SetAddresses).
	all bool
	ips []netip.Addr
	// open holds the Services whose port is open in this family, at the
	// addresses and port they were opened with.
	open map[model.ServiceName]*instance
	// counts are the local endpoint counts of the last SyncEndpoints.
	// They are kept for every Service given, open or not, so the order of
	// SyncServices and SyncEndpoints does not matter.
	counts map[model.ServiceName]int
}

// family returns f's state, creating it (listening everywhere). Call with
// mu held.
func (s *Server) family(f model.IPFamily) *family {
	fam := s.families[f]
	if fam == nil {
		fam = &family{all: true, open: map[model.ServiceName]*instance{}, counts: map[model.ServiceName]int{}}
		s.families[f] = fam
	}
	return fam
}

// instance is one Service's open port in one family: one HTTP server per
// address.
type instance struct {
	port    uint16
	all     bool
	ips     []netip.Addr
	servers []*http.Server
	// listeners are closed by close itself: http.Server.Close closes
	// only those its Serve goroutine has registered, and one that has not
	// run yet closes its listener whenever it does, which would make
	// reopening the port at once fail with EADDRINUSE.
	listeners []net.Listener
}

// New returns a Server with nothing open that listens on every address of
// the node until SetAddresses says otherwise.
func New(cfg Config) *Server {
	if cfg.Listen == nil {
		var lc net.ListenConfig
		cfg.Listen = lc.Listen
	}
	return &Server{cfg: cfg, families: map[model.IPFamily]*family{}}
}

// SetAddresses is SetAddressesFor of IPv4, the family of a single-stack
// IPv4 proxy.
func (s *Server) SetAddresses(all bool, ips []netip.Addr) { s.SetAddressesFor(model.IPv4, all, ips) }

// SyncServices is SyncServicesFor of IPv4.
func (s *Server) SyncServices(ports map[model.ServiceName]uint16) error {
	return s.SyncServicesFor(model.IPv4, ports)
}

// SyncEndpoints is SyncEndpointsFor of IPv4.
func (s *Server) SyncEndpoints(local map[model.ServiceName]int) {
	s.SyncEndpointsFor(model.IPv4, local)
}

// SetAddressesFor sets where family f's ports listen, from its next
// SyncServicesFor on, which reopens the ports that listen elsewhere. With
// all, a port listens on 0.0.0.0 (IPv4) or :: (IPv6), as kube-proxy's do
// without --nodeport-addresses; otherwise it listens on each of ips (those
// of family f; others are ignored), which are the node's addresses that
// match --nodeport-addresses, and on none if none matches, as kube-proxy
// does. Pass the family's model.NodeInfo's AllLocalAddresses and
// NodePortAddresses.
//
// kube-proxy looks the addresses up once at start; following them lets a
// node that gains or loses an address serve its health checks where its
// node ports are.
func (s *Server) SetAddressesFor(f model.IPFamily, all bool, ips []netip.Addr) {
	var mine []netip.Addr
	if !all {
		for _, ip := range ips {
			if f == model.IPv4 {
				ip = ip.Unmap()
			}
			if f.Has(ip) {
				mine = append(mine, ip)
			}
		}
		slices.SortFunc(mine, netip.Addr.Compare)
		mine = slices.Compact(mine)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	fam := s.family(f)
	if fam.all == all && slices.Equal(fam.ips, mine) {
		return
	}
	fam.all, fam.ips = all, mine
	if !all && len(mine) == 0 {
		klog.InfoS("No node address matches --nodeport-addresses: health check node ports listen nowhere", "ipFamily", f)
	}
}

// SyncServicesFor makes family f's open ports exactly ports: it closes the ports of
// Services not in it (or whose port or addresses changed), then opens the
// missing ones (a zero port is no port). A port that cannot be opened
// (another process holds it, an address is gone) leaves that Service
// unserved and the others untouched; it is reported with a Warning Event
// on the Service, logged, and tried again at the next call, as kube-proxy
// does at each sync. The returned error names every such Service; it is
// for the log: the datapath is not affected, and the next call retries
// anyway.
func (s *Server) SyncServicesFor(f model.IPFamily, ports map[model.ServiceName]uint16) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("health check server closed")
	}
	fam := s.family(f)
	// Close first, so that a port moving from one Service to another,
	// or a Service moving to other addresses, is free to open.
	for name, inst := range fam.open {
		if port, ok := ports[name]; ok && port == inst.port && inst.all == fam.all && slices.Equal(inst.ips, fam.ips) {
			continue
		}
		klog.V(2).InfoS("Closing health check node port", "service", name, "port", inst.port, "ipFamily", f)
		inst.close()
		delete(fam.open, name)
	}
	var errs []error
	for _, name := range sortedNames(ports) {
		port := ports[name]
		if fam.open[name] != nil || port == 0 {
			continue
		}
		klog.V(2).InfoS("Opening health check node port", "service", name, "port", port, "ipFamily", f)
		inst, err := s.listen(f, fam, name, port)
		if err != nil {
			s.reportFailure(name, port, err)
			errs = append(errs, fmt.Errorf("opening health check node port %d of Service %s (%v): %w", port, name, f, err))
			continue
		}
		fam.open[name] = inst
	}
	return errors.Join(errs...)
}

// SyncEndpointsFor sets the number of this node's ready endpoints of
// family f of each Service; a Service not in local has none.
func (s *Server) SyncEndpointsFor(f model.IPFamily, local map[model.ServiceName]int) {
	counts := make(map[model.ServiceName]int, len(local))
	for name, n := range local {
		if n > 0 {
			counts[name] = n
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.family(f).counts = counts
}

// Close closes every port and waits for their servers to stop. The Server
// cannot be used afterwards.
func (s *Server) Close() error {
	s.mu.Lock()
	for _, fam := range s.families {
		for _, inst := range fam.open {
			inst.close()
		}
		fam.open = map[model.ServiceName]*instance{}
	}
	s.closed = true
	s.mu.Unlock()
	s.serving.Wait()
	return nil
}

// listen opens name's port on the current addresses and serves it. It
// opens either every listener or none, so a failure leaves nothing to
// close and the next attempt starts afresh.
func (s *Server) listen(f model.IPFamily, fam *family, name model.ServiceName, port uint16) (*instance, error) {
	inst := &instance{port: port, all: fam.all, ips: fam.ips}
	// As kube-proxy's per-family servers: tcp4 for IPv4, tcp6 for IPv6,
	// whose wildcard socket Go makes IPV6_V6ONLY, so both bind the port.
	network, wildcard := "tcp4", "0.0.0.0"
	if f == model.IPv6 {
		network, wildcard = "tcp6", "::"
	}
	var addrs []string
	if fam.all {
		addrs = []string{net.JoinHostPort(wildcard, strconv.Itoa(int(port)))}
	} else {
		for _, ip := range fam.ips {
			addrs = append(addrs, netip.AddrPortFrom(ip, port).String())
		}
	}
	lns := make([]net.Listener, 0, len(addrs))
	for _, addr := range addrs {
		ln, err := s.cfg.Listen(context.Background(), network, addr)
		if err != nil {
			for _, l := range lns {
				_ = l.Close()
			}
			return nil, err
		}
		lns = append(lns, ln)
	}
	inst.listeners = lns
	handler := s.handler(f, name)
	for _, ln := range lns {
		srv := &http.Server{Handler: handler, ReadHeaderTimeout: readHeaderTimeout}
		inst.servers = append(inst.servers, srv)
		s.serving.Add(1)
		go func() {
			defer s.serving.Done()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				// Accept failed for good; the port stays open in
				// name only until the Service changes.
				klog.ErrorS(err, "Health check node port stopped serving", "service", name, "address", ln.Addr())
			}
		}()
	}
	return inst, nil
}

// close stops the instance's servers: listeners and connections close at
// once, as kube-proxy's do, since the port is no longer this Service's.
func (inst *instance) close() {
	for _, srv := range inst.servers {
		_ = srv.Close()
	}
	for _, ln := range inst.listeners {
		// Closed already unless its server had not started.
		_ = ln.Close()
	}
}

// reportFailure logs a port that cannot be opened and records kube-proxy's
// Event on the Service.
func (s *Server) reportFailure(name model.ServiceName, port uint16, err error) {
	klog.ErrorS(err, "Failed to start health check node port", "node", s.cfg.NodeName, "service", name, "port", port)
	if s.cfg.Recorder == nil {
		return
	}
	ref := &v1.ObjectReference{APIVersion: "v1", Kind: "Service", Namespace: name.Namespace, Name: name.Name}
	if s.cfg.ServiceUID != nil {
		ref.UID = s.cfg.ServiceUID(name)
	}
	s.cfg.Recorder.Eventf(ref, nil, v1.EventTypeWarning, EventReasonFailed, eventAction,
		"node %s failed to start healthcheck %q on port %d: %v", s.cfg.NodeName, name.String(), port, err)
}

// handler answers every request on name's port in family f with its local
// endpoint count in f.
func (s *Server) handler(f model.IPFamily, name model.ServiceName) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		s.mu.RLock()
		fam := s.families[f]
		_, open := fam.open[name]
		count := fam.counts[name]
		s.mu.RUnlock()
		if !open {
			// A request that raced the port's closing: the Service
			// no longer has it, so the node must not be used.
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		healthy := s.cfg.Healthy == nil || s.cfg.Healthy()
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(count))
		if count > 0 && healthy {
			w.WriteHeader(http.StatusOK)
		} else {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		if _, err := fmt.Fprintf(w, bodyFormat, name.Namespace, name.Name, count, healthy); err != nil {
			klog.V(4).InfoS("Writing health check answer", "service", name, "err", err)
		}
	})
}

func sortedNames(ports map[model.ServiceName]uint16) []model.ServiceName {
	names := make([]model.ServiceName, 0, len(ports))
	for name := range ports {
		names = append(names, name)
	}
	slices.SortFunc(names, func(a, b model.ServiceName) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	return names
}
