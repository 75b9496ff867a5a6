package testnet

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// resolve is a long-lived DNS-style client, the "resolve" helper:
//
//	resolve ADDR [unconnected] [inet6] [timeout=DUR] [pause=DUR]
//
// It queries ADDR over one UDP socket in a loop until SIGTERM, as stub
// resolvers do (c-ares in nginx, HAProxy, Envoy; statsd clients): the
// socket is connected once (or, with "unconnected", sends each query with
// sendto) and kept. On an error the socket reports (a read or write error:
// refused, aborted, no destination) the client says so, closes it and sends
// the next query from a new socket through ADDR again, as c-ares does. A
// timeout is only reported: the next query goes out on the same socket, as
// c-ares retries a lone nameserver, so a socket whose peer vanished
// silently keeps timing out. With "inet6" the sockets are AF_INET6 ones
// that reach IPv4 as ::ffff:a.b.c.d (ADDR like [::ffff:10.96.0.10]:53), as
// Java's are.
//
// It prints "ready", then one line per query:
//
//	ok NAME gen=G lport=P from=ADDR start=NS
//	err MESSAGE gen=G lport=P start=NS
//
// NAME is the answering backend's, G counts the sockets used (1 for the
// first), P is the socket's local port and NS the Unix nanosecond time
// the query began (see Loop.Settle).
func resolve(addr string, args []string) error {
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return err
	}
	connected, inet6 := true, false
	timeout, pause := ioTimeout, 20*time.Millisecond
	for _, a := range args {
		k, v, _ := strings.Cut(a, "=")
		switch k {
		case "unconnected":
			connected = false
		case "inet6":
			inet6 = true
		case "timeout":
			if timeout, err = time.ParseDuration(v); err != nil {
				return err
			}
		case "pause":
			if pause, err = time.ParseDuration(v); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown resolve option %q", a)
		}
	}
	var (
		conn *net.UDPConn
		gen  int
	)
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	buf := make([]byte, 2048)
	untilStopped(pause, func() {
		start := time.Now()
		if conn == nil {
			gen++
			switch {
			case inet6:
				conn, err = inet6UDPConn(addr, connected)
			case connected:
				conn, err = net.DialUDP(networkFor("udp", addr), nil, raddr)
			default:
				conn, err = net.ListenUDP(networkFor("udp", addr), nil)
			}
			if err != nil {
				conn = nil
				fmt.Printf("err %s gen=%d lport=0 start=%d\n", errText(err), gen, start.UnixNano())
				return
			}
		}
		lport := conn.LocalAddr().(*net.UDPAddr).Port
		_ = conn.SetDeadline(start.Add(timeout))
		if connected {
			_, err = conn.Write([]byte("query"))
		} else {
			_, err = conn.WriteTo([]byte("query"), raddr)
		}
		var (
			n    int
			from *net.UDPAddr
		)
		if err == nil {
			n, from, err = conn.ReadFromUDP(buf)
		}
		switch {
		case err == nil:
			fmt.Printf("ok %s gen=%d lport=%d from=%s start=%d\n", buf[:n], gen, lport, from, start.UnixNano())
		case errText(err) == "timeout":
			// Retried on the same socket, as c-ares does.
			fmt.Printf("err timeout gen=%d lport=%d start=%d\n", gen, lport, start.UnixNano())
		default:
			fmt.Printf("err %s gen=%d lport=%d start=%d\n", errText(err), gen, lport, start.UnixNano())
			conn.Close()
			conn = nil
		}
	})
	return nil
}

// inet6UDPConn is a UDP socket of family AF_INET6 with IPV6_V6ONLY off,
// connected to addr (a v4-mapped address) if connected, handed to Go's
// net package for its deadlines.
func inet6UDPConn(addr string, connected bool) (*net.UDPConn, error) {
	fd, err := inet6Socket(unix.SOCK_DGRAM)
	if err != nil {
		return nil, err
	}
	if connected {
		sa, err := inet6Sockaddr(addr, false)
		if err == nil {
			err = unix.Connect(fd, sa)
		}
		if err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
	f := os.NewFile(uintptr(fd), "udp6")
	defer f.Close() // FileConn holds a duplicate
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	return c.(*net.UDPConn), nil
}

// StartResolver starts the "resolve" helper (see resolve) in pod p with the
// given options; its results are collected as a Loop's.
func (p *Pod) StartResolver(addr string, options ...string) *Loop {
	p.net.t.Helper()
	args := append([]string{"resolve", addr}, options...)
	return StartLoopCommand(p.net.t, p.Command(context.Background(), true, Helper(args...)...))
}

// ResolverResult is one line of the "resolve" helper.
type ResolverResult struct {
	// Backend is the name of the server that answered; "" for a failure.
	Backend string
	// Err is the failure ("timeout", "connection refused", ...); "" for
	// an answer.
	Err string
	// Gen numbers the client's sockets, from 1; LPort is the socket's
	// local port.
	Gen, LPort int
	// From is where the answer came from as the client saw it.
	From string
	Line string
}

// ParseResolverResult parses a line of the "resolve" helper.
func ParseResolverResult(line string) (ResolverResult, error) {
	r := ResolverResult{Line: line}
	status, rest, _ := strings.Cut(line, " ")
	i := strings.Index(rest, " gen=")
	if i < 0 {
		return r, fmt.Errorf("resolver result without a generation: %q", line)
	}
	switch status {
	case "ok":
		r.Backend = rest[:i]
	case "err":
		r.Err = rest[:i]
	default:
		return r, fmt.Errorf("resolver result %q", line)
	}
	for _, f := range strings.Fields(rest[i:]) {
		k, v, _ := strings.Cut(f, "=")
		var err error
		switch k {
		case "gen":
			r.Gen, err = strconv.Atoi(v)
		case "lport":
			r.LPort, err = strconv.Atoi(v)
		case "from":
			r.From = v
		}
		if err != nil {
			return r, fmt.Errorf("resolver result %q: %w", line, err)
		}
	}
	return r, nil
}
