package sockdiag

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

func TestMain(m *testing.M) {
	testnet.Main(m, map[string]func([]string) error{"netns-probe": netnsProbe})
}

// netnsProbe is a helper process: it opens sock_diag sockets in its own
// network namespace and in the one at args[0], and prints what happened.
func netnsProbe(args []string) error {
	c, err := OpenIn("/proc/self/ns/net")
	if err != nil {
		fmt.Printf("own: %v\n", err)
	} else {
		socks, err := c.ConnectedUDP()
		c.Close()
		fmt.Printf("own: %d sockets, %v\n", len(socks), err)
	}
	c, err = OpenIn(args[0])
	switch {
	case errors.Is(err, unix.EPERM):
		fmt.Printf("other: EPERM: %v\n", err)
	case err != nil:
		fmt.Printf("other: %v\n", err)
	default:
		c.Close()
		fmt.Println("other: opened")
	}
	return nil
}

// Without CAP_SYS_ADMIN, as in a container that is not granted it, another
// namespace cannot be entered and the error says why; the process's own
// namespace needs no setns and still works.
func TestKernelWithoutSysAdmin(t *testing.T) {
	n := testnet.New(t)
	other := n.AddPod("other", "10.244.0.1")
	probe := func(drop bool) string {
		t.Helper()
		args := []string{"nsenter", "--net=/run/netns/" + n.Node, "--"}
		if drop {
			// Root keeps exactly its bounding set across exec.
			args = append(args, "setpriv", "--bounding-set=-sys_admin", "--inh-caps=-all", "--")
		}
		args = append(args, testnet.Helper("netns-probe", "/run/netns/"+other.NS)...)
		out, err := exec.CommandContext(context.Background(), args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
		return string(out)
	}
	with, without := probe(false), probe(true)
	if !strings.Contains(with, "own: 0 sockets, <nil>") || !strings.Contains(with, "other: opened") {
		t.Errorf("with CAP_SYS_ADMIN:\n%s", with)
	}
	if !strings.Contains(without, "own: 0 sockets, <nil>") || !strings.Contains(without, "other: EPERM") ||
		!strings.Contains(without, "CAP_SYS_ADMIN") {
		t.Errorf("without CAP_SYS_ADMIN:\n%s", without)
	}
	t.Logf("without CAP_SYS_ADMIN:\n%s", without)
}

// BenchmarkKernelListNamespace is what the cleanup costs per network
// namespace with nothing to destroy: enter it, open a sock_diag socket,
// dump both families, close.
func BenchmarkKernelListNamespace(b *testing.B) {
	n := testnet.New(b)
	ns := "/run/netns/" + n.Node
	for b.Loop() {
		c, err := OpenIn(ns)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.ConnectedUDP(); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// inNetNS runs fn on a thread inside the network namespace at path.
// Sockets fn makes stay there.
func inNetNS(t *testing.T, path string, fn func()) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			done <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(path)
		if err != nil {
			done <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- err // the thread stays locked and ends with this goroutine
			return
		}
		runtime.UnlockOSThread()
		done <- nil
	}()
	if err := <-done; err != nil {
		t.Fatalf("in %s: %v", path, err)
	}
}

// testSocket is a UDP socket the test owns.
type testSocket struct {
	fd     int
	cookie uint64
	local  netip.AddrPort
}

func newUDPSocket(t *testing.T, family int, connectTo string) *testSocket {
	t.Helper()
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if connectTo != "" {
		ap := netip.MustParseAddrPort(connectTo)
		var sa unix.Sockaddr
		if family == unix.AF_INET {
			sa = &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
		} else {
			sa = &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
		}
		if err := unix.Connect(fd, sa); err != nil {
			t.Fatalf("connecting to %s: %v", connectTo, err)
		}
	} else if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	s := &testSocket{fd: fd, cookie: cookie}
	switch sa, _ := unix.Getsockname(fd); sa := sa.(type) {
	case *unix.SockaddrInet4:
		s.local = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		s.local = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return s
}

func (s *testSocket) connected() bool {
	_, err := unix.Getpeername(s.fd)
	return err == nil
}

// aborted reports whether the socket's owner would be told it was
// destroyed: a receive fails with ECONNABORTED.
func (s *testSocket) aborted() bool {
	_, _, err := unix.Recvfrom(s.fd, make([]byte, 16), unix.MSG_DONTWAIT)
	return errors.Is(err, unix.ECONNABORTED)
}

func byCookie(socks []Socket) map[uint64]Socket {
	m := make(map[uint64]Socket)
	for _, s := range socks {
		m[s.Cookie] = s
	}
	return m
}

func TestKernelListsAndDestroysConnectedUDPSockets(t *testing.T) {
	n := testnet.New(t)
	ns := "/run/netns/" + n.Node
	var v4, v6, other, unconnected *testSocket
	inNetNS(t, ns, func() {
		v4 = newUDPSocket(t, unix.AF_INET, "127.0.0.2:53")
		v6 = newUDPSocket(t, unix.AF_INET6, "[::ffff:127.0.0.2]:53")
		other = newUDPSocket(t, unix.AF_INET, "127.0.0.3:53")
		unconnected = newUDPSocket(t, unix.AF_INET, "")
	})

	c, err := OpenIn(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if ok, err := c.UDPDestroySupported(); !ok || err != nil {
		t.Fatalf("this kernel has CONFIG_INET_DIAG_DESTROY, but the probe says %v, %v", ok, err)
	}

	socks, err := c.ConnectedUDP()
	if err != nil {
		t.Fatal(err)
	}
	// Only the namespace's own sockets, and only the connected ones.
	if len(socks) != 3 {
		t.Fatalf("listed %v, want the three connected sockets of the test namespace", socks)
	}
	got := byCookie(socks)
	for _, tc := range []struct {
		name   string
		s      *testSocket
		family uint8
		remote string
	}{
		{"IPv4", v4, unix.AF_INET, "127.0.0.2:53"},
		{"IPv6 talking IPv4", v6, unix.AF_INET6, "[::ffff:127.0.0.2]:53"},
		{"other", other, unix.AF_INET, "127.0.0.3:53"},
	} {
		s, ok := got[tc.s.cookie]
		if !ok {
			t.Errorf("%s socket not listed", tc.name)
			continue
		}
		if s.Family != tc.family || s.Remote != netip.MustParseAddrPort(tc.remote) || s.Local != tc.s.local {
			t.Errorf("%s socket listed as %+v, want family %d, %s->%s", tc.name, s, tc.family, tc.s.local, tc.remote)
		}
	}
	if _, ok := got[unconnected.cookie]; ok {
		t.Error("an unconnected socket was listed")
	}

	// The right addresses with another cookie are another socket: the
	// kernel refuses, and the socket is untouched.
	wrong := got[other.cookie]
	wrong.Cookie = v4.cookie
	if err := c.DestroyUDP(wrong); !IsGone(err) {
		t.Errorf("destroy with a stale cookie: %v, want a not-found error", err)
	}
	if !other.connected() || other.aborted() {
		t.Error("a destroy with a stale cookie hit the socket")
	}

	for _, s := range []*testSocket{v4, v6} {
		if err := c.DestroyUDP(got[s.cookie]); err != nil {
			t.Fatalf("destroying %v: %v", got[s.cookie], err)
		}
		if !s.aborted() {
			t.Errorf("destroyed socket %v: its receive does not fail with ECONNABORTED", got[s.cookie])
		}
		if s.connected() {
			t.Errorf("destroyed socket %v is still connected", got[s.cookie])
		}
	}
	if err := c.DestroyUDP(got[v4.cookie]); !IsGone(err) {
		t.Errorf("destroying it again: %v, want a not-found error", err)
	}
	socks, err = c.ConnectedUDP()
	if err != nil {
		t.Fatal(err)
	}
	if len(socks) != 1 || socks[0].Cookie != other.cookie {
		t.Errorf("after destroying two, listed %v, want the other socket alone", socks)
	}
	if unconnected.aborted() {
		t.Error("the unconnected socket was aborted")
	}
}

func TestKernelOpenInRefusesWhatIsNotANamespace(t *testing.T) {
	testnet.Require(t)
	path := filepath.Join(t.TempDir(), "not-a-netns")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if c, err := OpenIn(path); err == nil {
		c.Close()
		t.Fatal("opened a sock_diag socket in a plain file")
	}
	if _, ok, err := Namespace(path); ok || err != nil {
		t.Errorf("Namespace(plain file) = %v, %v; want not a namespace", ok, err)
	}
}

// The kernel filters a dump on the peers asked for (INET_DIAG_REQ_BYTECODE):
// an AF_INET6 socket talking IPv4 matches by its v4-mapped peer, the port
// must match too, and more peers than the bytecode holds are filtered
// here, with the same result.
func TestKernelListsOnlySocketsConnectedToPeers(t *testing.T) {
	n := testnet.New(t)
	ns := "/run/netns/" + n.Node
	var v4, v6, otherPort, other, ipv6 *testSocket
	inNetNS(t, ns, func() {
		v4 = newUDPSocket(t, unix.AF_INET, "127.0.0.2:53")
		v6 = newUDPSocket(t, unix.AF_INET6, "[::ffff:127.0.0.2]:53")
		otherPort = newUDPSocket(t, unix.AF_INET, "127.0.0.2:54")
		other = newUDPSocket(t, unix.AF_INET, "127.0.0.3:53")
		ipv6 = newUDPSocket(t, unix.AF_INET6, "[::1]:53")
	})
	c, err := OpenIn(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	many := func(extra ...string) []netip.AddrPort {
		var out []netip.AddrPort
		for i := range MaxPeerFilter + 1 {
			out = append(out, netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 53))
		}
		for _, e := range extra {
			out = append(out, netip.MustParseAddrPort(e))
		}
		return out
	}
	for _, tc := range []struct {
		name  string
		peers []netip.AddrPort
		want  []*testSocket
	}{
		{"one IPv4 peer, both families", []netip.AddrPort{netip.MustParseAddrPort("127.0.0.2:53")}, []*testSocket{v4, v6}},
		{"peers given v4-mapped", []netip.AddrPort{netip.MustParseAddrPort("[::ffff:127.0.0.3]:53"),
			netip.MustParseAddrPort("10.9.9.9:53")}, []*testSocket{other}},
		{"two peers, one port each", []netip.AddrPort{netip.MustParseAddrPort("127.0.0.2:54"),
			netip.MustParseAddrPort("127.0.0.3:53")}, []*testSocket{otherPort, other}},
		{"an IPv6 peer", []netip.AddrPort{netip.MustParseAddrPort("[::1]:53")}, []*testSocket{ipv6}},
		{"no socket matches", []netip.AddrPort{netip.MustParseAddrPort("127.0.0.2:55")}, nil},
		{"no peers", []netip.AddrPort{}, nil},
		{"every connected socket", nil, []*testSocket{v4, v6, otherPort, other, ipv6}},
		{"more peers than the bytecode holds", many("127.0.0.2:54", "127.0.0.3:53"), []*testSocket{otherPort, other}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			socks, err := c.ConnectedUDPTo(tc.peers)
			if err != nil {
				t.Fatal(err)
			}
			got := byCookie(socks)
			for _, s := range tc.want {
				if _, ok := got[s.cookie]; !ok {
					t.Errorf("socket %s->? not listed", s.local)
				}
			}
			if len(socks) != len(tc.want) {
				t.Errorf("listed %v, want %d sockets", socks, len(tc.want))
			}
		})
	}
	if len(peerFilter(many()[:MaxPeerFilter])) > 0xffff-unix.NLA_HDRLEN {
		t.Errorf("the largest filter does not fit an attribute")
	}
}
