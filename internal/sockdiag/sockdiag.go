// Package sockdiag lists and destroys connected UDP sockets through the
// kernel's sock_diag netlink interface (NETLINK_SOCK_DIAG), in this network
// namespace or another one.
//
// Two requests are used, both with a struct inet_diag_req_v2:
//
//   - SOCK_DIAG_BY_FAMILY with NLM_F_DUMP lists the UDP sockets of one
//     family whose state is in a bitmask. A connected UDP socket is in
//     TCP_ESTABLISHED (ip4_datagram_connect sets it), an unconnected one in
//     TCP_CLOSE, so the kernel itself leaves the unconnected ones out. An
//     INET_DIAG_REQ_BYTECODE attribute can narrow it to given peers
//     (ConnectedUDPTo); udp_diag has run such filters since it came
//     (Linux 3.3).
//   - SOCK_DESTROY (Linux 4.5; UDP since 4.9, CONFIG_INET_DIAG_DESTROY)
//     finds one socket by its exact id, cookie included, and aborts it: the
//     owner's pending or next receive fails with ECONNABORTED and the socket
//     is disconnected. A socket that closed, and whose addresses a new one
//     reuses, has another cookie and answers ENOENT instead.
//
// Listing needs no privilege; destroying needs CAP_NET_ADMIN over the
// socket's network namespace.
package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// tcpEstablished is TCP_ESTABLISHED of the kernel's socket states, which
// connected datagram sockets share with TCP.
const tcpEstablished = 1

// Sizes of the kernel structures, from linux/inet_diag.h.
const (
	sizeofSockID  = 48                    // struct inet_diag_sockid
	sizeofReqV2   = 8 + sizeofSockID      // struct inet_diag_req_v2
	sizeofDiagMsg = 4 + sizeofSockID + 20 // struct inet_diag_msg
)

// Socket is one UDP socket as sock_diag identifies it.
type Socket struct {
	// Family is unix.AF_INET or unix.AF_INET6. An AF_INET6 socket talking
	// IPv4 has IPv4-mapped addresses (::ffff:a.b.c.d).
	Family uint8
	Local  netip.AddrPort
	Remote netip.AddrPort
	// Interface is the device the socket is bound to, 0 for none.
	Interface uint32
	// Cookie is the kernel's unique id of the socket, as
	// bpf_get_socket_cookie and SO_COOKIE return it.
	Cookie uint64
}

func (s Socket) String() string {
	return fmt.Sprintf("%s->%s cookie=%d", s.Local, s.Remote, s.Cookie)
}

// ErrNotSupported is wrapped by errors of a kernel that cannot do what was
// asked: list UDP sockets (no CONFIG_INET_UDP_DIAG) or destroy them (no
// CONFIG_INET_DIAG_DESTROY, or older than Linux 4.9).
var ErrNotSupported = errors.New("not supported by this kernel")

// Conn is a sock_diag netlink socket. It answers for the network namespace
// it was opened in, whichever thread uses it. It is not safe for concurrent
// use.
type Conn struct {
	fd  int
	seq uint32
	buf []byte
}

// ioTimeout bounds each wait for the kernel's answer. The kernel answers at
// once; this only keeps a sync from hanging on a kernel that never does.
const ioTimeout = 10 * time.Second

// Open opens a sock_diag socket in the calling thread's network namespace.
func Open() (*Conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("opening sock_diag netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(ioTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting sock_diag receive timeout: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding sock_diag netlink socket: %w", err)
	}
	return &Conn{fd: fd, buf: make([]byte, 64<<10)}, nil
}

// Close closes the netlink socket.
func (c *Conn) Close() error { return unix.Close(c.fd) }

// ConnectedUDP lists the connected UDP sockets of both families.
func (c *Conn) ConnectedUDP() ([]Socket, error) {
	return c.ConnectedUDPTo(nil)
}

// MaxPeerFilter is the most peers ConnectedUDPTo has the kernel filter
// on; with more, it lists every connected socket and filters itself. The
// bytecode holds 20 bytes per IPv4 peer (32 per IPv6 one), and its jumps
// and attribute length are 16-bit.
const MaxPeerFilter = 1024

// ConnectedUDPTo lists the connected UDP sockets of both families whose
// peer is one of peers; all of them if peers is nil. An AF_INET6 socket
// talking IPv4 matches an IPv4 peer by its v4-mapped address. The kernel
// filters (an INET_DIAG_REQ_BYTECODE condition per peer), so a dump
// returns only what matched; it still walks the host's whole UDP table,
// which all network namespaces share (unless udp_child_hash_entries gives
// them their own, Linux 6.2+).
func (c *Conn) ConnectedUDPTo(peers []netip.AddrPort) ([]Socket, error) {
	if peers != nil && len(peers) == 0 {
		return nil, nil
	}
	var bytecode []byte
	if peers != nil && len(peers) <= MaxPeerFilter {
		bytecode = peerFilter(peers)
	}
	var out []Socket
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := c.dump(request{family: family, protocol: unix.IPPROTO_UDP, states: 1 << tcpEstablished, bytecode: bytecode})
		if err != nil {
			return nil, err
		}
		out = append(out, socks...)
	}
	if peers != nil && bytecode == nil {
		want := make(map[netip.AddrPort]bool, len(peers))
		for _, p := range peers {
			want[unmapped(p)] = true
		}
		out = slices.DeleteFunc(out, func(s Socket) bool { return !want[unmapped(s.Remote)] })
	}
	return out, nil
}

func unmapped(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// The bytecode of linux/inet_diag.h: each operation is a struct
// inet_diag_bc_op, its arguments following it.
const (
	bcJump          = 1 // INET_DIAG_BC_JMP: always takes "no"
	bcDestCondition = 8 // INET_DIAG_BC_D_COND: a struct inet_diag_hostcond
	reqBytecode     = 1 // INET_DIAG_REQ_BYTECODE
)

// peerFilter is bytecode that accepts a socket whose peer is one of peers:
// for each, a D_COND on its address (all bits) and port; a match jumps to
// the end, which accepts, a miss to the next peer's condition, and a miss
// of the last one past the end, which rejects. The kernel's audit follows
// the "yes" offsets, so each condition but the last is followed by a JMP
// whose "yes" is the next condition and whose "no", the offset it takes,
// is the end. No peers, no bytecode.
func peerFilter(peers []netip.AddrPort) []byte {
	type cond struct {
		family uint8
		addr   []byte
		port   uint16
	}
	if len(peers) == 0 {
		return nil
	}
	conds := make([]cond, 0, len(peers))
	size := 0
	for _, p := range peers {
		a := p.Addr().Unmap()
		c := cond{family: unix.AF_INET, port: p.Port()}
		if a.Is4() {
			v4 := a.As4()
			c.addr = v4[:]
		} else {
			c.family = unix.AF_INET6
			v6 := a.As16()
			c.addr = v6[:]
		}
		conds = append(conds, c)
		size += 4 + 8 + len(c.addr) + 4
	}
	size -= 4 // no jump after the last
	b := make([]byte, 0, size)
	ne := binary.NativeEndian
	for i, c := range conds {
		condLen := 4 + 8 + len(c.addr)
		// The next condition, past the jump; for the last one, past the
		// end: rejected.
		no := condLen + 4
		b = append(b, bcDestCondition, byte(condLen))
		b = ne.AppendUint16(b, uint16(no))
		b = append(b, c.family, byte(8*len(c.addr)), 0, 0)
		b = ne.AppendUint32(b, uint32(c.port))
		b = append(b, c.addr...)
		if i < len(conds)-1 {
			rest := size - len(b) // from the jump to the end
			b = append(b, bcJump, 4)
			b = ne.AppendUint16(b, uint16(rest))
		}
	}
	return b
}

// DestroyUDP aborts the UDP socket with exactly s's id and cookie. IsGone
// tells an error saying no such socket exists any more.
func (c *Conn) DestroyUDP(s Socket) error {
	req := request{
		family:   s.Family,
		protocol: unix.IPPROTO_UDP,
		local:    s.Local,
		remote:   s.Remote,
		iface:    s.Interface,
		cookie:   [2]uint32{uint32(s.Cookie), uint32(s.Cookie >> 32)},
	}
	if err := c.ack(unix.SOCK_DESTROY, req); err != nil {
		return fmt.Errorf("destroying UDP socket %s: %w", s, err)
	}
	return nil
}

// UDPDestroySupported probes whether the kernel can destroy UDP sockets: it
// asks to destroy one that cannot exist, which a kernel that can answers
// ENOENT and one that cannot EOPNOTSUPP. Nothing is destroyed either way:
// the cookie is 0, which the kernel never hands out (all ones in both
// halves would mean "any cookie").
func (c *Conn) UDPDestroySupported() (bool, error) {
	req := request{family: unix.AF_INET, protocol: unix.IPPROTO_UDP,
		local: netip.AddrPortFrom(netip.IPv4Unspecified(), 0), remote: netip.AddrPortFrom(netip.IPv4Unspecified(), 0)}
	err := c.ack(unix.SOCK_DESTROY, req)
	switch {
	case IsGone(err):
		return true, nil
	case errors.Is(err, ErrNotSupported):
		return false, nil
	case err == nil:
		return false, errors.New("probing SOCK_DESTROY: the kernel destroyed a socket with cookie 0")
	default:
		return false, fmt.Errorf("probing SOCK_DESTROY: %w", err)
	}
}

// IsGone reports whether a DestroyUDP error says the socket is no longer
// there: it closed, or another socket, with another cookie, has its
// addresses now. The kernel answers ENOENT (and ESTALE in some versions for
// a cookie that does not match).
func IsGone(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESTALE)
}

// request is a struct inet_diag_req_v2.
type request struct {
	family   uint8
	protocol uint8
	states   uint32
	local    netip.AddrPort
	remote   netip.AddrPort
	iface    uint32
	cookie   [2]uint32
	// bytecode, if any, filters a dump (INET_DIAG_REQ_BYTECODE).
	bytecode []byte
}

// marshal appends the netlink message carrying req.
func (r request) marshal(msgType, flags uint16, seq uint32) []byte {
	n := unix.NLMSG_HDRLEN + sizeofReqV2
	if r.bytecode != nil {
		n += unix.NLA_HDRLEN + len(r.bytecode) // a multiple of 4
	}
	b := make([]byte, n)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], msgType)
	ne.PutUint16(b[6:], flags)
	ne.PutUint32(b[8:], seq)
	ne.PutUint32(b[12:], 0) // to the kernel
	p := b[unix.NLMSG_HDRLEN:]
	p[0] = r.family
	p[1] = r.protocol
	p[2] = 0 // idiag_ext: no extensions
	p[3] = 0
	ne.PutUint32(p[4:], r.states)
	id := p[8:]
	binary.BigEndian.PutUint16(id[0:], r.local.Port())
	binary.BigEndian.PutUint16(id[2:], r.remote.Port())
	putAddr(id[4:20], r.family, r.local.Addr())
	putAddr(id[20:36], r.family, r.remote.Addr())
	ne.PutUint32(id[36:], r.iface)
	ne.PutUint32(id[40:], r.cookie[0])
	ne.PutUint32(id[44:], r.cookie[1])
	if r.bytecode != nil {
		attr := p[sizeofReqV2:]
		ne.PutUint16(attr[0:], uint16(unix.NLA_HDRLEN+len(r.bytecode)))
		ne.PutUint16(attr[2:], reqBytecode)
		copy(attr[unix.NLA_HDRLEN:], r.bytecode)
	}
	return b
}

// putAddr writes an address as inet_diag_sockid holds it: an IPv4 address
// in the first four bytes for AF_INET, all sixteen for AF_INET6.
func putAddr(dst []byte, family uint8, a netip.Addr) {
	if !a.IsValid() {
		return
	}
	if family == unix.AF_INET {
		v4 := a.Unmap().As4()
		copy(dst, v4[:])
		return
	}
	v6 := a.As16()
	copy(dst, v6[:])
}

func addrFrom(src []byte, family uint8) netip.Addr {
	if family == unix.AF_INET {
		return netip.AddrFrom4([4]byte(src[:4]))
	}
	return netip.AddrFrom16([16]byte(src[:16]))
}

// parseDiagMsg decodes a struct inet_diag_msg.
func parseDiagMsg(p []byte) (Socket, error) {
	if len(p) < sizeofDiagMsg {
		return Socket{}, fmt.Errorf("inet_diag_msg of %d bytes, want %d", len(p), sizeofDiagMsg)
	}
	ne := binary.NativeEndian
	s := Socket{Family: p[0]}
	if s.Family != unix.AF_INET && s.Family != unix.AF_INET6 {
		return Socket{}, fmt.Errorf("inet_diag_msg of family %d", s.Family)
	}
	id := p[4:]
	s.Local = netip.AddrPortFrom(addrFrom(id[4:20], s.Family), binary.BigEndian.Uint16(id[0:]))
	s.Remote = netip.AddrPortFrom(addrFrom(id[20:36], s.Family), binary.BigEndian.Uint16(id[2:]))
	s.Interface = ne.Uint32(id[36:])
	s.Cookie = uint64(ne.Uint32(id[40:])) | uint64(ne.Uint32(id[44:]))<<32
	return s, nil
}

// parseError decodes the payload of NLMSG_ERROR, and of the NLMSG_DONE
// that ends a dump: a negative errno, 0 for success.
func parseError(p []byte) error {
	if len(p) < 4 {
		return errors.New("truncated netlink error message")
	}
	if errno := -int32(binary.NativeEndian.Uint32(p)); errno != 0 {
		return unix.Errno(errno)
	}
	return nil
}

// message is one netlink message of a reply.
type message struct {
	typ     uint16
	flags   uint16
	seq     uint32
	payload []byte
}

// splitMessages splits a datagram from the kernel into its messages.
func splitMessages(b []byte) ([]message, error) {
	var out []message
	for len(b) >= unix.NLMSG_HDRLEN {
		ne := binary.NativeEndian
		l := int(ne.Uint32(b[0:]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, fmt.Errorf("netlink message of length %d in %d bytes", l, len(b))
		}
		out = append(out, message{typ: ne.Uint16(b[4:]), flags: ne.Uint16(b[6:]), seq: ne.Uint32(b[8:]),
			payload: b[unix.NLMSG_HDRLEN:l]})
		next := (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
		if next > len(b) {
			break
		}
		b = b[next:]
	}
	return out, nil
}

func (c *Conn) send(msgType, flags uint16, r request) (uint32, error) {
	c.seq++
	// Without an address, netlink sends to the socket's default peer,
	// which is the kernel.
	if _, err := unix.Write(c.fd, r.marshal(msgType, flags, c.seq)); err != nil {
		return 0, fmt.Errorf("sending sock_diag request: %w", err)
	}
	return c.seq, nil
}

// receive reads the kernel's reply to request seq, calling fn for each of
// its messages until fn reports the reply complete.
func (c *Conn) receive(seq uint32, fn func(message) (done bool, err error)) error {
	for {
		n, _, err := unix.Recvfrom(c.fd, c.buf, 0)
		if err != nil {
			return fmt.Errorf("reading sock_diag reply: %w", err)
		}
		msgs, err := splitMessages(c.buf[:n])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.seq != seq {
				continue // the rest of an earlier request that failed half-way
			}
			done, err := fn(m)
			if err != nil || done {
				return err
			}
		}
	}
}

// dump lists the sockets a request matches.
func (c *Conn) dump(r request) ([]Socket, error) {
	seq, err := c.send(unix.SOCK_DIAG_BY_FAMILY, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, r)
	if err != nil {
		return nil, err
	}
	var out []Socket
	err = c.receive(seq, func(m message) (bool, error) {
		switch m.typ {
		case unix.NLMSG_DONE, unix.NLMSG_ERROR:
			// A dump that fails once under way ends in NLMSG_DONE carrying
			// the error; one that cannot start answers NLMSG_ERROR.
			var err error
			if len(m.payload) >= 4 {
				err = parseError(m.payload)
			}
			if err == nil && m.flags&unix.NLM_F_DUMP_INTR != 0 {
				err = errors.New("the socket table changed during the dump")
			}
			if errors.Is(err, unix.ENOENT) {
				// No handler for the protocol: udp_diag is neither built
				// in nor loadable.
				err = fmt.Errorf("%w (CONFIG_INET_UDP_DIAG): %w", ErrNotSupported, err)
			}
			return true, err
		case unix.SOCK_DIAG_BY_FAMILY:
			s, err := parseDiagMsg(m.payload)
			if err != nil {
				return true, err
			}
			out = append(out, s)
		}
		return false, nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing UDP sockets of family %d: %w", r.family, err)
	}
	return out, nil
}

// ack sends a request that is answered with an acknowledgement or an error.
func (c *Conn) ack(msgType uint16, r request) error {
	seq, err := c.send(msgType, unix.NLM_F_REQUEST|unix.NLM_F_ACK, r)
	if err != nil {
		return err
	}
	return c.receive(seq, func(m message) (bool, error) {
		if m.typ != unix.NLMSG_ERROR {
			return false, nil
		}
		err := parseError(m.payload)
		if errors.Is(err, unix.EOPNOTSUPP) {
			// The protocol's diag handler has no destroy operation.
			err = fmt.Errorf("%w (CONFIG_INET_DIAG_DESTROY, Linux 4.9+ for UDP): %w", ErrNotSupported, err)
		}
		return true, err
	})
}
