package load

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The server's default ports.
const (
	// EchoPort is TCP echo: every byte read is written back (crr, rr and
	// the connect rate workload use it).
	EchoPort = 7001
	// SinkPort is TCP sink: everything read is discarded (stream).
	SinkPort = 7002
	// UDPEchoPort is UDP echo: each datagram is sent back as is.
	UDPEchoPort = 7003
	// NamePort is TCP name: on accept the server writes its pod's name
	// and a newline, and closes (watch and poll use it).
	NamePort = 7004
)

// ServerReadyLine is what ServerMain prints on stdout, alone on a line, once
// every listener is bound.
const ServerReadyLine = "bench server ready"

// serverConfig is the server's parsed flags.
type serverConfig struct {
	name                                  string
	echoPort, sinkPort, udpPort, namePort int
}

func parseServerFlags(args []string) (serverConfig, error) {
	var c serverConfig
	fs := newFlagSet("server")
	fs.StringVar(&c.name, "name", os.Getenv("POD_NAME"), "the pod's name, written by the name port (default $POD_NAME)")
	fs.IntVar(&c.echoPort, "echo-port", EchoPort, "TCP echo port")
	fs.IntVar(&c.sinkPort, "sink-port", SinkPort, "TCP sink port")
	fs.IntVar(&c.udpPort, "udp-echo-port", UDPEchoPort, "UDP echo port")
	fs.IntVar(&c.namePort, "name-port", NamePort, "TCP name port")
	if err := parseFlags(fs, args); err != nil {
		return c, err
	}
	if c.name == "" {
		return c, usageError(fs, errors.New("no pod name: pass --name or set POD_NAME"))
	}
	for _, p := range []int{c.echoPort, c.sinkPort, c.udpPort, c.namePort} {
		if p < 1 || p > 65535 {
			return c, usageError(fs, fmt.Errorf("port %d out of range 1-65535", p))
		}
	}
	return c, nil
}

// ServerMain runs the server until ctx ends (or SIGTERM/SIGINT arrives). It
// prints the line ServerReadyLine on stdout once every listener is bound.
//
// The server is on the measured path: it logs and counts nothing per
// request. The echo ports, which the latency workloads time, use blocking
// system calls on threads of their own (see acceptEcho and echoUDP); the sink
// and name ports use Go's poller, a goroutine per connection.
func ServerMain(ctx context.Context, args []string, stdout io.Writer) error {
	cfg, err := parseServerFlags(args)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, os.Interrupt)
	defer stop()

	var lc net.ListenConfig
	var closers []io.Closer
	closeAll := func() {
		for _, c := range closers {
			c.Close()
		}
	}
	sink, err := lc.Listen(ctx, "tcp", ":"+strconv.Itoa(cfg.sinkPort))
	if err != nil {
		return fmt.Errorf("listening on TCP port %d: %w", cfg.sinkPort, err)
	}
	closers = append(closers, sink)
	name, err := lc.Listen(ctx, "tcp", ":"+strconv.Itoa(cfg.namePort))
	if err != nil {
		closeAll()
		return fmt.Errorf("listening on TCP port %d: %w", cfg.namePort, err)
	}
	closers = append(closers, name)
	echo, err := listenRaw(unix.SOCK_STREAM, cfg.echoPort)
	if err != nil {
		closeAll()
		return err
	}
	closers = append(closers, echo)
	udp, err := listenRaw(unix.SOCK_DGRAM, cfg.udpPort)
	if err != nil {
		closeAll()
		return err
	}
	closers = append(closers, udp)

	var wg sync.WaitGroup
	nameLine := []byte(cfg.name + "\n")
	wg.Go(func() { acceptName(name, nameLine) })
	wg.Go(func() { acceptSink(ctx, sink, &wg) })
	active := new(atomic.Int64)
	for range echoAcceptors {
		wg.Go(func() { acceptEcho(ctx, echo.fd, active, &wg) })
	}
	for range udpEchoThreads {
		wg.Go(func() { echoUDP(ctx, udp.fd) })
	}

	_, err = fmt.Fprintln(stdout, ServerReadyLine)
	if err == nil {
		<-ctx.Done()
	} else {
		err = fmt.Errorf("writing the ready line: %w", err)
	}
	// Closing the Go listeners ends their accept loops, and each of their
	// connections is closed by its context.AfterFunc. Shutting the raw
	// sockets down wakes the threads blocked on them; their connections
	// see ctx's end within rawPollInterval.
	stop()
	sink.Close()
	name.Close()
	_ = unix.Shutdown(echo.fd, unix.SHUT_RDWR)
	_ = unix.Shutdown(udp.fd, unix.SHUT_RDWR)
	wg.Wait()
	echo.Close()
	udp.Close()
	return err
}

// Raw echo servers. Go's poller costs a wake-up of the poller thread and a
// scheduling hop per request: measured on a 2-core VM, a new connection's
// echo came back after a median 60-140 µs from a goroutine-per-connection
// server and 2-26 µs from one blocking in accept() and read(). That
// constant would dilute every ratio, so the echo ports block in system
// calls as netserver does: the kernel wakes the thread that serves.
const (
	// echoAcceptors threads block in accept() on the echo port; each
	// serves a new connection's first request itself (connect-request-
	// response-close is then served without any hand-off), and hands the
	// connection on to a goroutine of its own for the rest.
	echoAcceptors = 4
	// maxEchoConns bounds the echo connections open at once: each holds
	// an OS thread while blocked (Go stops the process at 10000 threads).
	// Past it a new connection is closed at once, an error for its client.
	maxEchoConns = 2000
	// udpEchoThreads threads block in recvmsg() on the UDP echo socket.
	udpEchoThreads = 2
	// rawPollInterval is the receive and send timeout of raw sockets:
	// how often a blocked thread looks whether the server is stopping.
	rawPollInterval = 250 * time.Millisecond
	// echoBuffer is the most an echo connection reads at once: requests
	// are 1 byte.
	echoBuffer = 2048
)

// rawSocket is a blocking socket.
type rawSocket struct{ fd int }

func (r *rawSocket) Close() error { return unix.Close(r.fd) }

// listenRaw opens a blocking socket of typ bound to port on every address,
// IPv4 and IPv6 alike (IPv4 only where the namespace has no IPv6).
func listenRaw(typ, port int) (*rawSocket, error) {
	proto := map[int]string{unix.SOCK_STREAM: "TCP", unix.SOCK_DGRAM: "UDP"}[typ]
	fail := func(fd int, what string, err error) (*rawSocket, error) {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("listening on %s port %d: %s: %w", proto, port, what, err)
	}
	var sa unix.Sockaddr = &unix.SockaddrInet6{Port: port}
	fd, err := unix.Socket(unix.AF_INET6, typ|unix.SOCK_CLOEXEC, 0)
	if errors.Is(err, unix.EAFNOSUPPORT) {
		sa = &unix.SockaddrInet4{Port: port}
		fd, err = unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return fail(-1, "socket", err)
	}
	if _, v6 := sa.(*unix.SockaddrInet6); v6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			return fail(fd, "IPV6_V6ONLY", err)
		}
		if typ == unix.SOCK_DGRAM {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1); err != nil {
				return fail(fd, "IPV6_RECVPKTINFO", err)
			}
		}
	}
	if typ == unix.SOCK_DGRAM {
		// The local address of each datagram, so that the echo leaves
		// from the address the request was sent to: an unbound
		// socket's answer would otherwise take the route's preferred
		// source, which a client connected to another address of the
		// pod drops. IPv4 datagrams on an IPv6 socket carry
		// IP_PKTINFO.
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_PKTINFO, 1); err != nil {
			return fail(fd, "IP_PKTINFO", err)
		}
	}
	if typ == unix.SOCK_STREAM {
		// As Go's listeners do: a restarted server binds while old
		// connections linger. (On UDP it would let a second server
		// share the port instead of failing.)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fail(fd, "SO_REUSEADDR", err)
		}
	}
	if err := setTimeouts(fd, rawPollInterval); err != nil {
		return fail(fd, "timeouts", err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail(fd, "bind", err)
	}
	if typ == unix.SOCK_STREAM {
		// The kernel caps it at net.core.somaxconn.
		if err := unix.Listen(fd, 4096); err != nil {
			return fail(fd, "listen", err)
		}
	}
	return &rawSocket{fd: fd}, nil
}

func setTimeouts(fd int, d time.Duration) error {
	tv := unix.NsecToTimeval(d.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return err
	}
	return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
}

// acceptEcho accepts echo connections until ctx ends.
func acceptEcho(ctx context.Context, lfd int, active *atomic.Int64, wg *sync.WaitGroup) {
	buf := make([]byte, echoBuffer)
	for ctx.Err() == nil {
		fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			switch {
			case errors.Is(err, unix.EMFILE), errors.Is(err, unix.ENFILE), errors.Is(err, unix.ENOBUFS), errors.Is(err, unix.ENOMEM):
				// Out of a resource: let connections end.
				time.Sleep(10 * time.Millisecond)
			}
			// EAGAIN (the timeout), EINTR, ECONNABORTED: try again;
			// EINVAL after shutdown: ctx has ended.
			continue
		}
		if active.Add(1) > maxEchoConns {
			active.Add(-1)
			unix.Close(fd)
			continue
		}
		// Go's default, which the sink and name ports keep too. The
		// timeouts make blocked calls look at ctx now and then.
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		_ = setTimeouts(fd, rawPollInterval)
		if !echoOnce(fd, buf) {
			active.Add(-1)
			unix.Close(fd)
			continue
		}
		wg.Go(func() {
			defer active.Add(-1)
			defer unix.Close(fd)
			buf := make([]byte, echoBuffer)
			for ctx.Err() == nil && echoOnce(fd, buf) {
			}
		})
	}
}

// echoOnce reads what has come (waiting up to rawPollInterval) and writes
// it back; false means the connection is over.
func echoOnce(fd int, buf []byte) bool {
	n, err := unix.Read(fd, buf)
	switch {
	case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
		return true
	case err != nil, n == 0:
		return false
	}
	for b := buf[:n]; len(b) > 0; {
		w, err := unix.Write(fd, b)
		switch {
		case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
			// A client that stopped reading keeps its connection
			// only as long as it is slow, not forever: the loop
			// goes on, and ctx is looked at between calls.
			continue
		case err != nil:
			return false
		}
		b = b[w:]
	}
	return true
}

// echoUDP sends each datagram back as is until ctx ends, from the address it
// was sent to: the packet info received, sent back as a control message,
// sets the source (ipi_spec_dst, or ipi6_addr) and the interface.
func echoUDP(ctx context.Context, fd int) {
	buf := make([]byte, 64<<10)
	oob := make([]byte, 128)
	for ctx.Err() == nil {
		n, oobn, _, from, err := unix.Recvmsg(fd, buf, oob, 0)
		if err != nil || from == nil {
			// The timeout, EINTR, an ICMP error of an earlier
			// answer (it concerns that peer only), or shutdown.
			continue
		}
		_, _ = unix.SendmsgN(fd, buf[:n], oob[:oobn], from, 0)
	}
}

// acceptSink serves each sink connection on a goroutine until l is closed.
func acceptSink(ctx context.Context, l net.Listener, wg *sync.WaitGroup) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		wg.Go(func() {
			stop := context.AfterFunc(ctx, func() { c.Close() })
			defer func() {
				if stop() {
					c.Close()
				}
			}()
			buf := make([]byte, 256<<10)
			for {
				if _, err := c.Read(buf); err != nil {
					return
				}
			}
		})
	}
}

// acceptName answers each connection with the name and closes it, on the
// accepting goroutine: a write of a few bytes to a new socket never blocks.
func acceptName(l net.Listener, name []byte) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		_, _ = c.Write(name)
		c.Close()
	}
}
