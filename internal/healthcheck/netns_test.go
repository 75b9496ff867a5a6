package healthcheck

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"testing"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// listenIn and dialIn create their sockets in the network namespace at
// path; the sockets stay there whichever thread uses them.
func listenIn(path string) func(ctx context.Context, network, addr string) (net.Listener, error) {
	return func(ctx context.Context, network, addr string) (ln net.Listener, err error) {
		err = netnsenter.Do(path, func() error {
			var lc net.ListenConfig
			ln, err = lc.Listen(ctx, network, addr)
			return err
		})
		return ln, err
	}
}

func dialIn(path string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (c net.Conn, err error) {
		err = netnsenter.Do(path, func() error {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
}

// TestProbedFromOutsideTheNode serves a health check port in a node's
// network namespace, on the node's address, and probes it from a pod
// namespace routed through the node, as a load balancer probes it from
// the network: it answers on the node port addresses only when they are
// given, on every address of the node otherwise.
func TestProbedFromOutsideTheNode(t *testing.T) {
	n := testnet.New(t)
	prober := n.AddPod("prober", "10.244.0.10")
	const nodeIP = "192.168.77.10"
	n.HostNetwork().AddLoopbackAddress(nodeIP + "/32")
	const port = 31000
	atNode := netip.AddrPortFrom(netip.MustParseAddr(nodeIP), port)
	// The node's other address, towards its pods: not a node port
	// address here.
	atGateway := netip.AddrPortFrom(netip.MustParseAddr(testnet.PodGateway), port)

	s := New(Config{Listen: listenIn("/run/netns/" + n.Node)})
	t.Cleanup(func() { _ = s.Close() })
	c := client(dialIn("/run/netns/" + prober.NS))
	probe := func(t *testing.T, addr netip.AddrPort) answer {
		t.Helper()
		a, err := ask(c, http.MethodGet, "http://"+addr.String()+"/healthz")
		if err != nil {
			t.Fatalf("probing %s from %s: %v", addr, prober.Name, err)
		}
		return a
	}
	refusedFromPod := func(t *testing.T, addr netip.AddrPort) {
		t.Helper()
		conn, err := dialIn("/run/netns/"+prober.NS)(context.Background(), "tcp4", addr.String())
		if err == nil {
			conn.Close()
			t.Fatalf("%s accepts connections from %s, want refused", addr, prober.Name)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dialling %s from %s: %v, want connection refused", addr, prober.Name, err)
		}
	}

	s.SetAddresses(false, []netip.Addr{netip.MustParseAddr(nodeIP)})
	if err := s.SyncServices(map[model.ServiceName]uint16{web: port}); err != nil {
		t.Fatal(err)
	}
	t.Run("node address, no local endpoints", func(t *testing.T) {
		checkAnswer(t, probe(t, atNode), web, 503, 0, true)
	})
	t.Run("node address, local endpoints", func(t *testing.T) {
		s.SyncEndpoints(map[model.ServiceName]int{web: 2})
		checkAnswer(t, probe(t, atNode), web, 200, 2, true)
	})
	t.Run("other address of the node", func(t *testing.T) {
		refusedFromPod(t, atGateway)
	})
	t.Run("every address", func(t *testing.T) {
		s.SetAddresses(true, nil)
		if err := s.SyncServices(map[model.ServiceName]uint16{web: port}); err != nil {
			t.Fatal(err)
		}
		checkAnswer(t, probe(t, atNode), web, 200, 2, true)
		checkAnswer(t, probe(t, atGateway), web, 200, 2, true)
	})
	t.Run("service gone", func(t *testing.T) {
		if err := s.SyncServices(nil); err != nil {
			t.Fatal(err)
		}
		refusedFromPod(t, atNode)
		refusedFromPod(t, atGateway)
	})
}
