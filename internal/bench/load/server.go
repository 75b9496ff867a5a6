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
	"syscall"
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
// request, and serves each connection on a goroutine of its own with Go's
// defaults (TCP_NODELAY on).
func ServerMain(ctx context.Context, args []string, stdout io.Writer) error {
	cfg, err := parseServerFlags(args)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, os.Interrupt)
	defer stop()

	var lc net.ListenConfig
	tcp := []struct {
		port  int
		serve func(net.Conn)
	}{
		{cfg.echoPort, serveEcho},
		{cfg.sinkPort, serveSink},
		{cfg.namePort, nil}, // answered in the accept loop
	}
	var listeners []net.Listener
	closeAll := func() {
		for _, l := range listeners {
			l.Close()
		}
	}
	for _, t := range tcp {
		l, err := lc.Listen(ctx, "tcp", ":"+strconv.Itoa(t.port))
		if err != nil {
			closeAll()
			return fmt.Errorf("listening on TCP port %d: %w", t.port, err)
		}
		listeners = append(listeners, l)
	}
	pc, err := lc.ListenPacket(ctx, "udp", ":"+strconv.Itoa(cfg.udpPort))
	if err != nil {
		closeAll()
		return fmt.Errorf("listening on UDP port %d: %w", cfg.udpPort, err)
	}
	udp := pc.(*net.UDPConn)

	var wg sync.WaitGroup
	name := []byte(cfg.name + "\n")
	for i, t := range tcp {
		l := listeners[i]
		if t.serve == nil {
			wg.Go(func() { acceptName(l, name) })
		} else {
			wg.Go(func() { acceptLoop(ctx, l, t.serve, &wg) })
		}
	}
	wg.Go(func() { serveUDPEcho(udp) })

	if _, err := fmt.Fprintln(stdout, ServerReadyLine); err != nil {
		closeAll()
		udp.Close()
		wg.Wait()
		return fmt.Errorf("writing the ready line: %w", err)
	}
	<-ctx.Done()
	// Closing the listeners ends the accept loops; each connection is
	// closed by its context.AfterFunc.
	closeAll()
	udp.Close()
	wg.Wait()
	return nil
}

// acceptLoop serves each connection of l on a goroutine until l is closed.
func acceptLoop(ctx context.Context, l net.Listener, serve func(net.Conn), wg *sync.WaitGroup) {
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
			serve(c)
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

func serveEcho(c net.Conn) {
	// Requests are 1 byte; a small buffer keeps a connection per request
	// cheap.
	buf := make([]byte, 2048)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func serveSink(c net.Conn) {
	buf := make([]byte, 256<<10)
	for {
		if _, err := c.Read(buf); err != nil {
			return
		}
	}
}

func serveUDPEcho(c *net.UDPConn) {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// An ICMP error from an earlier answer can surface here;
			// it concerns that peer only.
			continue
		}
		_, _ = c.WriteToUDPAddrPort(buf[:n], from)
	}
}
