package ebpf

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/sockdiag"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// A resolver that opens a socket per query (musl's) churns through far
// more sockets than kbp_revnat holds. Every one of those sockets' entries
// goes with it, so an idle connected UDP socket opened before them keeps
// its entry: its replies still show the VIP, and it is still destroyed
// when its backend leaves.
func TestKernelPerQuerySocketsKeepIdleSocketsTranslated(t *testing.T) {
	const maxSockets = 64
	for _, tc := range []struct {
		name, addr string
		inet6      bool
	}{
		{"inet", vip + ":53", false},
		{"inet6", mappedVIP + ":53", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newKernelSetup(t, 2, func(c *Config) { c.MaxSockets = maxSockets })
			dns := func(pods ...*testnet.Pod) *model.Snapshot {
				return snapshot(true, servicePort("kube-system", "dns", "dns", model.UDP, vip+":53", s.backends(5353, pods...)...))
			}
			s.sync(t, dns(s.pods[0]))
			wantFrom := netip.MustParseAddrPort(tc.addr).String()

			idle := startIdleUDP(t, s, tc.addr, tc.inet6)
			if got := idle.do(t, "query"); got != "ok pod-0 from="+wantFrom {
				t.Fatalf("first query on the idle socket: %q, want an answer from %s", got, wantFrom)
			}
			// Ten times the map's size in per-query sockets of each kind,
			// each closed after its answer.
			n := 10 * maxSockets
			if got, want := idle.do(t, fmt.Sprintf("churn %d", n)), fmt.Sprintf("churned %d %d", n, n); got != want {
				t.Fatalf("per-query sockets: %q, want %q (answers from the VIP, unconnected and connected)", got, want)
			}
			if got := idle.do(t, "query"); got != "ok pod-0 from="+wantFrom {
				t.Errorf("idle socket after %d per-query sockets: %q, want an answer from %s", 2*n, got, wantFrom)
			}

			// pod-0 leaves the Service: the socket cleanup must find the
			// idle socket by its cookie and destroy it.
			before, err := s.dp.Events()
			if err != nil {
				t.Fatal(err)
			}
			s.sync(t, dns(s.pods[1]))
			after, err := s.dp.Events()
			if err != nil {
				t.Fatal(err)
			}
			if d := after[eventUDPSocketsDestroyed] - before[eventUDPSocketsDestroyed]; d != 1 {
				t.Errorf("%d sockets destroyed when pod-0 left, want the idle one", d)
			}
			if got := idle.do(t, "query"); !strings.HasPrefix(got, "err ") {
				t.Errorf("idle socket after its backend left: %q, want an error (destroyed)", got)
			}
			if n := countRevnat(t, s); n != 1 {
				t.Errorf("%d reverse entries with one socket open, want 1", n)
			}
		})
	}
}

// With as many open translated sockets as --bpf-sock-revnat-max, the next
// socket is still translated, only its replies show the backend, and the
// failure is counted; closing sockets makes room again.
func TestKernelFullRevnatIsCounted(t *testing.T) {
	const maxSockets = 4
	s := newKernelSetup(t, 1, func(c *Config) { c.MaxSockets = maxSockets })
	s.sync(t, snapshot(true, servicePort("kube-system", "dns", "dns", model.UDP, vip+":53", s.backends(5353, s.pods...)...)))
	before, err := s.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	c := startIdleUDP(t, s, vip+":53", false)
	// The helper's own connected socket takes one entry, 3 of these the
	// rest.
	if got := c.do(t, "hold 6"); got != "held 6 3" {
		t.Fatalf("6 more open connected sockets: %q, want all 6 answered, 3 from the VIP", got)
	}
	after, err := s.dp.Events()
	if err != nil {
		t.Fatal(err)
	}
	const failed = "reverse_entry_update_failed"
	if d := after[failed] - before[failed]; d != 3 {
		t.Errorf("%s rose by %d, want 3", failed, d)
	}
	usage, err := s.dp.MapUsage()
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range usage {
		if u.Map == "revnat" && (u.Entries != maxSockets || u.Capacity != maxSockets) {
			t.Errorf("revnat usage %d of %d, want %d of %d", u.Entries, u.Capacity, maxSockets, maxSockets)
		}
	}
	c.do(t, "release")
	if got := c.do(t, "hold 1"); got != "held 1 1" {
		t.Errorf("a socket after the others closed: %q, want an answer from the VIP", got)
	}
}

// A node upgraded from a version whose kbp_revnat was an LRU of {cookie,
// backend} keys: the start replaces the pinned map with one of the new
// layout, carrying over the entries of open connected UDP sockets only,
// sockets are translated both ways, and --cleanup removes the map.
func TestKernelRestartReplacesLRURevnat(t *testing.T) {
	s := newKernelSetup(t, 1)
	snap := snapshot(true, servicePort("kube-system", "dns", "dns", model.UDP, vip+":53", s.backends(5353, s.pods...)...))
	s.sync(t, snap)
	// A resolver's connected socket, open across the upgrade.
	idle := startIdleUDP(t, s, vip+":53", false)
	if got := idle.do(t, "query"); got != "ok pod-0 from="+vip+":53" {
		t.Fatalf("query before the upgrade: %q", got)
	}
	cookie := connectedUDPCookie(t, s.client, s.pods[0].IP.String()+":5353")
	s.dp.Close()

	// What the earlier version pinned: the idle socket's entry, and one
	// of a socket long closed.
	path := filepath.Join(s.cfg.BPFFSPath, lbMapKbpRevnat)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	old, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LRUHash, KeySize: 16, ValueSize: 8, MaxEntries: s.cfg.MaxSockets})
	if err != nil {
		t.Fatal(err)
	}
	fe := lbRevnatValue{Addr: addrToBPF(netip.MustParseAddr(vip)), Port: portToBPF(53)}
	for _, c := range []uint64{cookie, 1 << 60} {
		k := legacyRevnatKey{Cookie: c, Addr: addrToBPF(s.pods[0].IP), Port: portToBPF(5353)}
		if err := old.Update(&k, &fe, ebpf.UpdateAny); err != nil {
			t.Fatal(err)
		}
	}
	if err := old.Pin(path); err != nil {
		t.Fatal(err)
	}
	old.Close()

	s.dp = s.open(t)
	s.sync(t, snap)
	pinned, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if pinned.Type() != ebpf.Hash || pinned.KeySize() != 8 {
		t.Errorf("pinned kbp_revnat is a %v with %d-byte keys, want the per-socket hash", pinned.Type(), pinned.KeySize())
	}
	pinned.Close()
	if n := countRevnat(t, s); n != 1 {
		t.Errorf("%d reverse entries carried over, want the open socket's only", n)
	}
	if got := idle.do(t, "query"); got != "ok pod-0 from="+vip+":53" {
		t.Errorf("the open socket's query after the upgrade: %q, want an answer from the VIP", got)
	}
	fresh := startIdleUDP(t, s, vip+":53", false)
	if got := fresh.do(t, "query"); got != "ok pod-0 from="+vip+":53" {
		t.Errorf("a new socket's query after the upgrade: %q, want an answer from the VIP", got)
	}
	if err := Cleanup(s.cfg.BPFFSPath); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("kbp_revnat after --cleanup: %v, want it gone", err)
	}
}

// connectedUDPCookie is the cookie of pod's connected UDP socket to peer.
func connectedUDPCookie(t *testing.T, pod *testnet.Pod, peer string) uint64 {
	t.Helper()
	c, err := sockdiag.OpenIn("/run/netns/" + pod.NS)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	socks, err := c.ConnectedUDP()
	if err != nil {
		t.Fatal(err)
	}
	for _, sk := range socks {
		if sk.Remote.String() == peer {
			return sk.Cookie
		}
	}
	t.Fatalf("no connected UDP socket to %s in %s: %v", peer, pod.Name, socks)
	return 0
}

func countRevnat(t *testing.T, s *kernelSetup) int {
	t.Helper()
	n, err := countEntries[uint64, lbSockRevnat](s.dp.kernel.objs.KbpRevnat)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// idleUDPClient drives the "idle-udp" helper.
type idleUDPClient struct {
	in    io.WriteCloser
	lines chan string
}

func startIdleUDP(t *testing.T, s *kernelSetup, addr string, inet6 bool) *idleUDPClient {
	t.Helper()
	args := []string{"idle-udp", addr}
	if inet6 {
		args = append(args, "inet6")
	}
	cmd := s.client.Command(context.Background(), true, testnet.Helper(args...)...)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testnet.Stop(cmd) })
	c := &idleUDPClient{in: in, lines: make(chan string)}
	go func() {
		defer close(c.lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
	}()
	return c
}

// do sends one command and returns the helper's answer.
func (c *idleUDPClient) do(t *testing.T, command string) string {
	t.Helper()
	if _, err := fmt.Fprintln(c.in, command); err != nil {
		t.Fatalf("idle-udp %s: %v", command, err)
	}
	select {
	case line, ok := <-c.lines:
		if !ok {
			t.Fatalf("idle-udp exited at %q", command)
		}
		return line
	case <-time.After(2 * time.Minute):
		t.Fatalf("idle-udp: no answer to %q", command)
	}
	return ""
}

// idleUDP is the "idle-udp" helper: idle-udp ADDR [inet6]. It connects one
// UDP socket to ADDR (AF_INET6 with a v4-mapped ADDR for inet6) and then
// does what each line on stdin says, answering with one line:
//
//	query    queries on that socket: "ok NAME from=ADDR" or "err MESSAGE"
//	hold N   opens N connected sockets, each sending a query and
//	         reading the answer, and keeps them: "held A V", the answers
//	         and those of them from ADDR
//	release  closes the sockets held: "released"
//	churn N  opens N unconnected sockets, each sending a query with
//	         sendto, reading the answer with recvfrom and closing, then N
//	         connected ones likewise: "churned U C", the answers that
//	         came from ADDR of each kind
func idleUDP(args []string) error {
	if len(args) < 1 {
		return fmt.Errorf("usage: idle-udp ADDR [inet6]")
	}
	to, err := netip.ParseAddrPort(args[0])
	if err != nil {
		return err
	}
	inet6 := len(args) > 1 && args[1] == "inet6"
	idle, err := idleUDPSocket(inet6)
	if err != nil {
		return err
	}
	sa := sockaddrOf(to, inet6)
	if err := unix.Connect(idle, sa); err != nil {
		return err
	}
	var held []int
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		switch cmd {
		case "query":
			name, from, err := udpQuery(idle, nil)
			if err != nil {
				fmt.Println("err " + err.Error())
				continue
			}
			fmt.Printf("ok %s from=%s\n", name, from)
		case "hold":
			n, err := strconv.Atoi(arg)
			if err != nil {
				return err
			}
			answered, fromVIP := 0, 0
			for range n {
				fd, err := idleUDPSocket(inet6)
				if err != nil {
					return err
				}
				held = append(held, fd)
				var from netip.AddrPort
				if err = unix.Connect(fd, sa); err == nil {
					_, from, err = udpQuery(fd, nil)
				}
				if err == nil {
					answered++
				}
				if err == nil && from == to {
					fromVIP++
				}
			}
			fmt.Printf("held %d %d\n", answered, fromVIP)
		case "release":
			for _, fd := range held {
				unix.Close(fd)
			}
			held = nil
			fmt.Println("released")
		case "churn":
			n, err := strconv.Atoi(arg)
			if err != nil {
				return err
			}
			var fromVIP [2]int
			for i, connected := range []bool{false, true} {
				for range n {
					fd, err := idleUDPSocket(inet6)
					if err != nil {
						return err
					}
					dest := sa
					if connected {
						err = unix.Connect(fd, sa)
						dest = nil
					}
					var from netip.AddrPort
					if err == nil {
						_, from, err = udpQuery(fd, dest)
					}
					unix.Close(fd)
					switch {
					case err != nil:
						fmt.Fprintf(os.Stderr, "idle-udp: per-query socket (connected %v): %v\n", connected, err)
					case from != to:
						fmt.Fprintf(os.Stderr, "idle-udp: per-query socket (connected %v): answer from %s\n", connected, from)
					default:
						fromVIP[i]++
					}
				}
			}
			fmt.Printf("churned %d %d\n", fromVIP[0], fromVIP[1])
		default:
			return fmt.Errorf("unknown command %q", cmd)
		}
	}
	return in.Err()
}

// idleUDPSocket is a UDP socket with a receive timeout; an AF_INET6 one with
// IPV6_V6ONLY off for inet6.
func idleUDPSocket(inet6 bool) (int, error) {
	family := unix.AF_INET
	if inet6 {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	// Generous: the kernel matrix runs this under emulation.
	tv := unix.Timeval{Sec: 10}
	err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err == nil && inet6 {
		err = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func sockaddrOf(ap netip.AddrPort, inet6 bool) unix.Sockaddr {
	if inet6 {
		return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
}

// udpQuery sends a query (with sendto to dest, unless nil) and returns the
// answer and where recvfrom says it came from.
func udpQuery(fd int, dest unix.Sockaddr) (string, netip.AddrPort, error) {
	// The raw calls block this thread, where the Go runtime's preemption
	// signal interrupts them (EINTR): an interrupted call did nothing, and
	// is made again.
	var err error
	for {
		if dest == nil {
			_, err = unix.Write(fd, []byte("query"))
		} else {
			err = unix.Sendto(fd, []byte("query"), 0, dest)
		}
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	buf := make([]byte, 512)
	var n int
	var from unix.Sockaddr
	for {
		n, from, err = unix.Recvfrom(fd, buf, 0)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	var ap netip.AddrPort
	switch sa := from.(type) {
	case *unix.SockaddrInet4:
		ap = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		ap = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return string(buf[:n]), ap, nil
}

// A resized kbp_revnat copy made before the new programs came is brought
// up to date: entries of sockets closed since the copy go, entries of
// sockets translated since come.
func TestKernelResyncRevnat(t *testing.T) {
	testnet.Require(t)
	spec, err := loadLb()
	if err != nil {
		t.Fatal(err)
	}
	newMap := func() *ebpf.Map {
		ms := spec.Maps[lbMapKbpRevnat].Copy()
		ms.Pinning = ebpf.PinNone
		ms.MaxEntries = 16
		m, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	from, to := newMap(), newMap()
	entry := func(port uint16) lbSockRevnat {
		e := lbSockRevnat{Next: 1}
		e.Pairs[0].Backend.Port = port
		return e
	}
	put := func(m *ebpf.Map, cookie uint64, port uint16) {
		e := entry(port)
		if err := m.Update(&cookie, &e, ebpf.UpdateAny); err != nil {
			t.Fatal(err)
		}
	}
	// 1 open throughout, 2 closed since the copy, 3 translated since;
	// 1 has a pair more in from, which stays as copied.
	put(from, 1, 11)
	put(from, 3, 33)
	put(to, 1, 10)
	put(to, 2, 20)
	resyncRevnat[lbSockRevnat](from, to, lbMapKbpRevnat)
	got := map[uint64]uint16{}
	var (
		cookie uint64
		e      lbSockRevnat
	)
	it := to.Iterate()
	for it.Next(&cookie, &e) {
		got[cookie] = e.Pairs[0].Backend.Port
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	if want := map[uint64]uint16{1: 10, 3: 33}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("resynced entries %v, want %v", got, want)
	}
}
