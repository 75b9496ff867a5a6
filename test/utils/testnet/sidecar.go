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
// sidecar listening on port, except the sidecar's own (SidecarMark), in
// each family the pod has an address of (iptables, ip6tables). The rules
// live and die with the pod's namespace.
func (p *Pod) RedirectToSidecar(port int) {
	p.net.t.Helper()
	if p.NS == p.net.Node {
		p.net.t.Fatalf("RedirectToSidecar needs a pod namespace, not the node's")
	}
	tools := []string{}
	if p.IPOf(true).IsValid() {
		tools = append(tools, "iptables-nft")
	}
	if p.IPOf(false).IsValid() {
		tools = append(tools, "ip6tables-nft")
	}
	for _, tool := range tools {
		p.redirectToSidecar(tool, port)
	}
}

func (p *Pod) redirectToSidecar(tool string, port int) {
	p.net.t.Helper()
	for _, rule := range [][]string{
		{"-t", "nat", "-N", "MESH-OUTPUT"},
		{"-t", "nat", "-A", "MESH-OUTPUT", "-m", "mark", "--mark", strconv.Itoa(SidecarMark), "-j", "RETURN"},
		{"-t", "nat", "-A", "MESH-OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(port)},
		{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "MESH-OUTPUT"},
	} {
		out, err := p.Command(context.Background(), false, append([]string{tool, "-w"}, rule...)...).CombinedOutput()
		if err != nil {
			p.net.t.Fatalf("%s %v in %s: %v: %s", tool, rule, p.Name, err, out)
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
	// One listener per family: each reads SO_ORIGINAL_DST of its own.
	ln, err := net.Listen("tcp4", ":"+args[0])
	if err != nil {
		return err
	}
	ln6, err := net.Listen("tcp6", ":"+args[0])
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
	errs := make(chan error, 2)
	for _, l := range []net.Listener{ln, ln6} {
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					errs <- err
					return
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
		}()
	}
	return <-errs
}

// originalDst reads SO_ORIGINAL_DST (SOL_IP, 80; for an IPv6 connection
// IP6T_SO_ORIGINAL_DST, SOL_IPV6, 80): the destination conntrack recorded
// before the connection was NATed to us, a sockaddr_in (sockaddr_in6).
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	v6 := c.LocalAddr().(*net.TCPAddr).IP.To4() == nil
	level := uintptr(unix.SOL_IP)
	if v6 {
		level = unix.SOL_IPV6
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var sa [28]byte
	var serr error
	err = raw.Control(func(fd uintptr) {
		size := uint32(len(sa))
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, level, unix.SO_ORIGINAL_DST,
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
	// sockaddr_in(6): family (host order), port and address (network
	// order; after the flow info in a sockaddr_in6).
	port := binary.BigEndian.Uint16(sa[2:4])
	if v6 {
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(sa[8:24])), port), nil
	}
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
	up, err := d.Dial("tcp", dst.String())
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
