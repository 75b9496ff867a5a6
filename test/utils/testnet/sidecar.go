package testnet

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SidecarMark marks the sidecar helper's own connections, which the
// redirect rules of RedirectToSidecar let through, as Istio's iptables
// rules let its proxy's uid through (-m owner --uid-owner 1337).
const SidecarMark = 0x539

// RedirectToSidecar sets up a service mesh's outbound capture in the pod's
// own network namespace, as Istio's and Linkerd's init containers do:
// every TCP connection the pod opens is REDIRECTed (nat OUTPUT) to the
// sidecar listening on port, except the sidecar's own (SidecarMark). The
// rules live and die with the pod's namespace.
func (p *Pod) RedirectToSidecar(port int) {
	p.net.t.Helper()
	if p.NS == p.net.Node {
		p.net.t.Fatalf("RedirectToSidecar needs a pod namespace, not the node's")
	}
	for _, rule := range [][]string{
		{"-t", "nat", "-N", "MESH-OUTPUT"},
		{"-t", "nat", "-A", "MESH-OUTPUT", "-m", "mark", "--mark", strconv.Itoa(SidecarMark), "-j", "RETURN"},
		{"-t", "nat", "-A", "MESH-OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(port)},
		{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "MESH-OUTPUT"},
	} {
		out, err := p.Command(context.Background(), false, append([]string{"iptables-nft", "-w"}, rule...)...).CombinedOutput()
		if err != nil {
			p.net.t.Fatalf("iptables %v in %s: %v: %s", rule, p.Name, err, out)
		}
	}
}

// sidecar PORT LOG is a mesh sidecar's outbound listener: it accepts the
// connections RedirectToSidecar sends it, reads where each was headed
// (SO_ORIGINAL_DST, the destination before the REDIRECT: what a sidecar
// routes by), appends it to the file LOG, one "orig=IP:PORT" line per
// connection, and forwards the connection there from a socket marked
// SidecarMark, as a sidecar's passthrough does.
func sidecar(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("want PORT LOG")
	}
	ln, err := net.Listen("tcp4", ":"+args[0])
	if err != nil {
		return err
	}
	log, err := os.OpenFile(args[1], os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	record := func(line string) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintln(log, line)
	}
	fmt.Println("ready")
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			orig, err := originalDst(c.(*net.TCPConn))
			if err != nil {
				record("err " + errText(err))
				return
			}
			record("orig=" + orig.String())
			forward(c.(*net.TCPConn), orig)
		}()
	}
}

// originalDst reads SO_ORIGINAL_DST (SOL_IP, 80): the IPv4 destination
// conntrack recorded before the connection was NATed to us, a sockaddr_in.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var sa [16]byte
	var serr error
	err = raw.Control(func(fd uintptr) {
		size := uint32(len(sa))
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, unix.SO_ORIGINAL_DST,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			serr = fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", errno)
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, err
	}
	// sockaddr_in: family (host order), port and address (network order).
	port := binary.BigEndian.Uint16(sa[2:4])
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(sa[4:8])), port), nil
}

// forward relays c to dst both ways from a socket marked SidecarMark.
func forward(c *net.TCPConn, dst netip.AddrPort) {
	d := net.Dialer{Timeout: ioTimeout, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, SidecarMark)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	up, err := d.Dial("tcp4", dst.String())
	if err != nil {
		return // the client sees its connection closed
	}
	defer up.Close()
	_ = c.SetDeadline(time.Now().Add(2 * ioTimeout))
	_ = up.SetDeadline(time.Now().Add(2 * ioTimeout))
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(up, c)
		_ = up.(*net.TCPConn).CloseWrite()
		close(done)
	}()
	_, _ = io.Copy(c, up)
	_ = c.CloseWrite()
	<-done
}
