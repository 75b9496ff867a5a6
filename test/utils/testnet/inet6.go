package testnet

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Clients on AF_INET6 sockets that reach IPv4 addresses as ::ffff:a.b.c.d,
// as Java (by default) and other runtimes do. Go's net package cannot be
// one: it sets IPV6_V6ONLY on "tcp6" and "udp6" sockets and dials a
// v4-mapped address from an AF_INET socket. So these use the system calls
// directly, on a socket with IPV6_V6ONLY=0.

// inet6Socket opens an AF_INET6 socket that also reaches IPv4 peers, with
// ioTimeout on its reads and writes.
func inet6Socket(typ int) (int, error) {
	fd, err := unix.Socket(unix.AF_INET6, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	tv := unix.NsecToTimeval(ioTimeout.Nanoseconds())
	for _, err := range []error{
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv),
	} {
		if err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("setsockopt: %w", err)
		}
	}
	return fd, nil
}

// inet6Sockaddr is addr ("[::ffff:10.96.0.10]:80", "[fd00::1]:80") as the
// sockaddr_in6 an application passes. With inet4 it is the sockaddr_in of
// a v4-mapped address instead, which an AF_INET6 socket also takes.
func inet6Sockaddr(addr string, inet4 bool) (unix.Sockaddr, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	if inet4 {
		if !ap.Addr().Is4In6() {
			return nil, fmt.Errorf("%s is not a v4-mapped address", addr)
		}
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}, nil
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}, nil
}

// sockaddrText formats an address as the socket gives it: a v4-mapped
// address keeps its ::ffff: prefix.
func sockaddrText(sa unix.Sockaddr) string {
	switch sa := sa.(type) {
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)).String()
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String()
	}
	return fmt.Sprintf("%v", sa)
}

func peerText(fd int) (string, error) {
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return "", fmt.Errorf("getpeername: %w", err)
	}
	return sockaddrText(sa), nil
}

// inet6Options reads the options after a client's count.
func inet6Options(args []string, allowed ...string) (map[string]bool, error) {
	opts := map[string]bool{}
	for _, a := range args[min(1, len(args)):] {
		if !slices.Contains(allowed, a) {
			return nil, fmt.Errorf("unknown option %q (have %v)", a, allowed)
		}
		opts[a] = true
	}
	return opts, nil
}

// tcp6Requests makes n HTTP requests to addr, each on a new AF_INET6 socket.
func tcp6Requests(addr string, args []string) error {
	opts, err := inet6Options(args, "inet4addr")
	if err != nil {
		return err
	}
	sa, err := inet6Sockaddr(addr, opts["inet4addr"])
	if err != nil {
		return err
	}
	return repeat(args, func() string { return tcp6Request(sa) })
}

func tcp6Request(sa unix.Sockaddr) string {
	fd, err := inet6Socket(unix.SOCK_STREAM)
	if err != nil {
		return "err " + sysErrText(err)
	}
	defer unix.Close(fd)
	if err := connectTimeout(fd, sa); err != nil {
		return "err " + sysErrText(err)
	}
	peer, err := peerText(fd)
	if err != nil {
		return "err " + sysErrText(err)
	}
	if _, err := ignoringEINTR(func() (int, error) { return unix.Write(fd, []byte("GET / HTTP/1.0\r\n\r\n")) }); err != nil {
		return "err " + sysErrText(err)
	}
	var resp []byte
	buf := make([]byte, 4096)
	for {
		n, err := ignoringEINTR(func() (int, error) { return unix.Read(fd, buf) })
		if err != nil {
			return "err " + sysErrText(err)
		}
		if n == 0 {
			break
		}
		resp = append(resp, buf[:n]...)
	}
	_, body, ok := strings.Cut(string(resp), "\r\n\r\n")
	if !ok {
		return fmt.Sprintf("err malformed response %q", resp)
	}
	return fmt.Sprintf("ok %s peer=%s", strings.TrimSpace(body), peer)
}

// connectTimeout connects a stream socket, giving up after ioTimeout: a
// blocking connect() to an address that drops SYNs would wait minutes.
func connectTimeout(fd int, sa unix.Sockaddr) error {
	if err := unix.SetNonblock(fd, true); err != nil {
		return err
	}
	err := unix.Connect(fd, sa)
	if errors.Is(err, unix.EINPROGRESS) {
		err = waitConnected(fd)
	}
	if err != nil {
		return err
	}
	return unix.SetNonblock(fd, false)
}

func waitConnected(fd int) error {
	deadline := time.Now().Add(ioTimeout)
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		n, err := unix.Poll(fds, int(time.Until(deadline).Milliseconds()))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.ETIMEDOUT
		}
		soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return err
		}
		if soErr != 0 {
			return unix.Errno(soErr)
		}
		return nil
	}
}

// udp6Requests sends n datagrams to addr from one AF_INET6 socket and reads
// an answer to each; "connected" connects the socket first.
func udp6Requests(addr string, args []string) error {
	opts, err := inet6Options(args, "connected", "inet4addr")
	if err != nil {
		return err
	}
	sa, err := inet6Sockaddr(addr, opts["inet4addr"])
	if err != nil {
		return err
	}
	fd, err := inet6Socket(unix.SOCK_DGRAM)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if opts["connected"] {
		if err := unix.Connect(fd, sa); err != nil {
			fmt.Println("err " + sysErrText(err))
			return nil
		}
	}
	return repeat(args, func() string {
		var err error
		if opts["connected"] {
			_, err = ignoringEINTR(func() (int, error) { return unix.Write(fd, []byte("hello")) })
		} else {
			_, err = ignoringEINTR(func() (int, error) { return 0, unix.Sendto(fd, []byte("hello"), 0, sa) })
		}
		if err != nil {
			return "err " + sysErrText(err)
		}
		buf := make([]byte, 2048)
		var from unix.Sockaddr
		n, err := ignoringEINTR(func() (n int, err error) {
			n, from, err = unix.Recvfrom(fd, buf, 0)
			return n, err
		})
		if err != nil {
			return "err " + sysErrText(err)
		}
		peer := sockaddrText(from)
		if opts["connected"] {
			if peer, err = peerText(fd); err != nil {
				return "err " + sysErrText(err)
			}
		}
		return fmt.Sprintf("ok %s peer=%s from=%s", buf[:n], peer, sockaddrText(from))
	})
}

// ignoringEINTR calls fn again while it fails with EINTR. A blocking
// socket call with SO_RCVTIMEO or SO_SNDTIMEO set is not restarted after a
// signal (socket(7)), and the Go runtime sends its threads signals (SIGURG,
// to preempt goroutines) at any time.
func ignoringEINTR[T any](fn func() (T, error)) (T, error) {
	for {
		v, err := fn()
		if !errors.Is(err, unix.EINTR) {
			return v, err
		}
	}
}

// sysErrText is errText for system call errors: a read or write past
// SO_RCVTIMEO or SO_SNDTIMEO (EAGAIN), or a connect past ioTimeout, is the
// "timeout" the net package's clients report.
func sysErrText(err error) string {
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.ETIMEDOUT) {
		return "timeout"
	}
	return errText(err)
}

// AddLoopbackAddress gives the pod one more address on its loopback, such
// as a real IPv6 one for a server that clients in the pod reach over IPv6.
func (p *Pod) AddLoopbackAddress(prefix string) {
	p.net.t.Helper()
	p.net.mustRun("ip", "-n", p.NS, "addr", "add", prefix, "dev", "lo", "nodad")
}
