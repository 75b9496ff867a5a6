package testnet

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// helperEnv marks a re-executed test binary as a helper process.
const helperEnv = "KBP_TESTNET_HELPER"

// Main runs the test binary as a helper process when it was started as one,
// and runs the tests otherwise. Packages using Helper call it from TestMain;
// extra adds helpers of their own, by name.
func Main(m *testing.M, extra map[string]func(args []string) error) {
	RunHelperIfRequested(extra)
	os.Exit(m.Run())
}

// RunHelperIfRequested runs the process as a helper and exits if it was
// started as one; otherwise it returns. Programs other than tests that use
// Helper call it first thing in main.
func RunHelperIfRequested(extra map[string]func(args []string) error) {
	if os.Getenv(helperEnv) == "1" {
		os.Exit(runHelper(os.Args[1:], extra))
	}
}

// Helper returns the command line that runs this test binary as a helper:
//
//	serve NAME tcp:PORT|udp:PORT...   answer each request with NAME (tcp6:, udp6: on IPv6)
//	tcp ADDR N                        N connects, one result line each (IPv6 sockets to an IPv6 ADDR)
//	udp ADDR N [connected]            N requests on one socket (IPv6 to an IPv6 ADDR)
//	loop ADDR [PAUSE]                 connect until killed, a line each, PAUSE between connects (IPv6 to an IPv6 ADDR; [ADDR]: as tcp6)
//	resolve ADDR [OPTION...]          query over one long-lived UDP socket until killed (see resolve)
//	tcp6 ADDR N [inet4addr]           tcp from AF_INET6 sockets with IPV6_V6ONLY=0, as Java's are
//	udp6 ADDR N [connected] [inet4addr]  udp from one such socket
//	sidecar PORT LOG                  a mesh sidecar's outbound listener (see RedirectToSidecar)
//
// Result lines are "ok NAME peer=ADDR" or "err MESSAGE"; UDP ones add
// from=ADDR, where the answer came from. The AF_INET6 clients take ADDR
// as [::ffff:10.96.0.10]:80 for an IPv4 peer and print addresses that way;
// inet4addr passes the socket a sockaddr_in of the IPv4 address instead,
// which the kernel also accepts.
func Helper(args ...string) []string {
	exe, err := os.Executable()
	if err != nil {
		panic(err)
	}
	return append([]string{"env", helperEnv + "=1", exe}, args...)
}

const ioTimeout = 2 * time.Second

func runHelper(args []string, extra map[string]func(args []string) error) int {
	if len(args) < 1 {
		fmt.Fprintln(os.Stderr, "helper: missing arguments")
		return 2
	}
	var err error
	switch fn, ok := extra[args[0]]; {
	case ok:
		err = fn(args[1:])
	case len(args) < 2:
		err = errors.New("missing arguments")
	default:
		err = builtinHelper(args)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	return 0
}

func builtinHelper(args []string) error {
	var err error
	switch args[0] {
	case "serve":
		err = serve(args[1], args[2:])
	case "tcp":
		err = repeat(args[2:], func() string { return tcpRequest(args[1]) })
	case "udp":
		err = udpRequests(args[1], args[2:])
	case "loop":
		err = loop(args[1], args[2:])
	case "resolve":
		err = resolve(args[1], args[2:])
	case "tcp6":
		err = tcp6Requests(args[1], args[2:])
	case "udp6":
		err = udp6Requests(args[1], args[2:])
	case "sidecar":
		err = sidecar(args[1:])
	default:
		err = fmt.Errorf("unknown helper %q", args[0])
	}
	return err
}

// serve answers TCP connections with a minimal HTTP response (so curl works)
// and UDP datagrams with a datagram, each carrying name. A "tcp-src"
// listener (tcp6-src on IPv6) adds the client address it sees ("NAME src=IP"), to show where
// a connection was masqueraded.
func serve(name string, listens []string) error {
	for _, l := range listens {
		proto, port, ok := strings.Cut(l, ":")
		if !ok {
			return fmt.Errorf("bad listen spec %q", l)
		}
		// tcp6, tcp6-src and udp6 listen on IPv6 only, the others on IPv4.
		network := map[string]string{"tcp": "tcp4", "tcp-src": "tcp4", "tcp6": "tcp6", "tcp6-src": "tcp6", "udp": "udp4", "udp6": "udp6"}[proto]
		switch network {
		case "tcp4", "tcp6":
			ln, err := net.Listen(network, ":"+port)
			if err != nil {
				return err
			}
			go serveTCP(ln, name, strings.HasSuffix(proto, "-src"))
		case "udp4", "udp6":
			pc, err := net.ListenPacket(network, ":"+port)
			if err != nil {
				return err
			}
			go serveUDP(pc, name)
		default:
			return fmt.Errorf("bad protocol in %q", l)
		}
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return nil
}

func serveTCP(ln net.Listener, name string, withSrc bool) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(ioTimeout))
			// Read the request up to its blank line, so that closing the
			// socket does not reset it under an unread request.
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil || strings.TrimSpace(line) == "" {
					break
				}
			}
			body := name + "\n"
			if withSrc {
				host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
				body = name + " src=" + host + "\n"
			}
			fmt.Fprintf(c, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
		}()
	}
}

func serveUDP(pc net.PacketConn, name string) {
	buf := make([]byte, 2048)
	for {
		_, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = pc.WriteTo([]byte(name), from)
	}
}

func repeat(args []string, once func() string) error {
	n := 1
	if len(args) > 0 {
		var err error
		if n, err = strconv.Atoi(args[0]); err != nil {
			return err
		}
	}
	for range n {
		fmt.Println(once())
	}
	return nil
}

// networkFor is the Go network ("tcp4", "udp6", ...) of a tcp or udp client
// of addr: an IPv6 address ([fd00::a]:80) is reached from an IPv6 socket,
// everything else from an IPv4 one, as the tcp and udp helpers always did.
func networkFor(proto, addr string) string {
	if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Is6() && !ap.Addr().Is4In6() {
		return proto + "6"
	}
	return proto + "4"
}

func tcpRequest(addr string) string {
	c, err := net.DialTimeout(networkFor("tcp", addr), addr, ioTimeout)
	if err != nil {
		return "err " + errText(err)
	}
	defer c.Close()
	// Go fills RemoteAddr from getpeername(2) after connecting.
	peer := c.RemoteAddr().String()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return "err " + errText(err)
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		return "err " + errText(err)
	}
	_, body, ok := strings.Cut(string(resp), "\r\n\r\n")
	if !ok {
		return fmt.Sprintf("err malformed response %q", resp)
	}
	return fmt.Sprintf("ok %s peer=%s", strings.TrimSpace(body), peer)
}

func udpRequests(addr string, args []string) error {
	network := networkFor("udp", addr)
	raddr, err := net.ResolveUDPAddr(network, addr)
	if err != nil {
		return err
	}
	// Options after the count: "connected" connects the socket;
	// "lport=N" binds it to local port N, so that successive clients are
	// one flow for conntrack.
	connected := false
	var laddr *net.UDPAddr
	for _, a := range args[min(1, len(args)):] {
		switch {
		case a == "connected":
			connected = true
		case strings.HasPrefix(a, "lport="):
			port, err := strconv.Atoi(strings.TrimPrefix(a, "lport="))
			if err != nil {
				return err
			}
			laddr = &net.UDPAddr{Port: port}
		default:
			return fmt.Errorf("unknown udp option %q", a)
		}
	}
	var conn *net.UDPConn
	if connected {
		conn, err = net.DialUDP(network, laddr, raddr)
	} else {
		conn, err = net.ListenUDP(network, laddr)
	}
	if err != nil {
		fmt.Println("err " + errText(err))
		return nil
	}
	defer conn.Close()
	return repeat(args, func() string {
		_ = conn.SetDeadline(time.Now().Add(ioTimeout))
		if connected {
			_, err = conn.Write([]byte("hello"))
		} else {
			_, err = conn.WriteTo([]byte("hello"), raddr)
		}
		if err != nil {
			return "err " + errText(err)
		}
		buf := make([]byte, 2048)
		n, from, err := conn.ReadFromUDP(buf)
		if err != nil {
			return "err " + errText(err)
		}
		peer := from.String()
		if connected {
			peer = conn.RemoteAddr().String()
		}
		return fmt.Sprintf("ok %s peer=%s from=%s", buf[:n], peer, from)
	})
}

// loop connects over and over until SIGTERM, then exits 0: from AF_INET
// sockets, or, for an address in brackets, from AF_INET6 ones (as tcp6).
// Each result ends with " start=" and the Unix nanosecond time its connect began, so
// that a test can tell results of connects begun before a change from
// those begun after it.
func loop(addr string, args []string) error {
	var pause time.Duration
	if len(args) > 0 {
		var err error
		if pause, err = time.ParseDuration(args[0]); err != nil {
			return err
		}
	}
	request := func() string { return tcpRequest(addr) }
	if strings.HasPrefix(addr, "[") {
		// An address in brackets: from AF_INET6 sockets, as tcp6 makes
		// them ([fd00:96::a]:80, or [::ffff:10.96.0.10]:80 for IPv4).
		sa, err := inet6Sockaddr(addr, false)
		if err != nil {
			return err
		}
		request = func() string { return tcp6Request(sa) }
	}
	untilStopped(pause, func() {
		start := time.Now()
		fmt.Printf("%s start=%d\n", request(), start.UnixNano())
	})
	return nil
}

// untilStopped prints "ready", then calls once over and over, pausing
// between calls, until SIGTERM or SIGINT: the body of the helpers that run
// until a test stops them.
func untilStopped(pause time.Duration, once func()) {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	fmt.Println("ready")
	for {
		select {
		case <-stop:
			return
		default:
		}
		once()
		time.Sleep(pause)
	}
}

func errText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return err.Error()
}
