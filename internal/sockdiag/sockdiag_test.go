package sockdiag

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// The expected messages are written out byte by byte for a little-endian
// host: netlink headers and the cookie are in host order, ports and
// addresses in network order.
func requireLittleEndian(t *testing.T) {
	t.Helper()
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("expected bytes are written for little-endian hosts")
	}
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRequestMarshal(t *testing.T) {
	requireLittleEndian(t)
	zeros12 := strings.Repeat("00", 12)
	for _, tc := range []struct {
		name  string
		req   request
		typ   uint16
		flags uint16
		want  string
	}{
		{
			name:  "dump of connected IPv6 UDP sockets",
			req:   request{family: unix.AF_INET6, protocol: unix.IPPROTO_UDP, states: 1 << tcpEstablished},
			typ:   unix.SOCK_DIAG_BY_FAMILY,
			flags: unix.NLM_F_REQUEST | unix.NLM_F_DUMP,
			want: "48000000 1400 0103 07000000 00000000" + // len 72, type 20, REQUEST|DUMP, seq, pid
				"0a 11 00 00 02000000" + // AF_INET6, UDP, no extensions, states: ESTABLISHED
				strings.Repeat("00", 48), // any socket
		},
		{
			name: "destroy of an IPv4 socket by id and cookie",
			req: request{family: unix.AF_INET, protocol: unix.IPPROTO_UDP,
				local: netip.MustParseAddrPort("10.244.0.100:1234"), remote: netip.MustParseAddrPort("10.244.1.1:53"),
				iface: 3, cookie: [2]uint32{1, 2}},
			typ:   unix.SOCK_DESTROY,
			flags: unix.NLM_F_REQUEST | unix.NLM_F_ACK,
			want: "48000000 1500 0500 07000000 00000000" +
				"02 11 00 00 00000000" +
				"04d2 0035" + // ports
				"0af40064" + zeros12 + "0af40101" + zeros12 +
				"03000000 01000000 02000000", // interface, cookie low, cookie high
		},
		{
			name: "destroy of an IPv6 socket talking IPv4",
			req: request{family: unix.AF_INET6, protocol: unix.IPPROTO_UDP,
				local: netip.MustParseAddrPort("[::ffff:10.244.0.100]:1234"), remote: netip.MustParseAddrPort("[::ffff:10.96.0.10]:53"),
				cookie: [2]uint32{0xdeadbeef, 0}},
			typ:   unix.SOCK_DESTROY,
			flags: unix.NLM_F_REQUEST | unix.NLM_F_ACK,
			want: "48000000 1500 0500 07000000 00000000" +
				"0a 11 00 00 00000000" +
				"04d2 0035" +
				"00000000000000000000ffff0af40064" + "00000000000000000000ffff0a60000a" +
				"00000000 efbeadde 00000000",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.req.marshal(tc.typ, tc.flags, 7)
			if want := unhex(t, tc.want); string(got) != string(want) {
				t.Errorf("got  %x\nwant %x", got, want)
			}
		})
	}
}

// diagMsg builds a struct inet_diag_msg as the kernel sends it.
func diagMsg(family uint8, local, remote netip.AddrPort, cookie uint64) []byte {
	p := make([]byte, sizeofDiagMsg)
	p[0] = family
	p[1] = tcpEstablished
	id := p[4:]
	binary.BigEndian.PutUint16(id[0:], local.Port())
	binary.BigEndian.PutUint16(id[2:], remote.Port())
	putAddr(id[4:20], family, local.Addr())
	putAddr(id[20:36], family, remote.Addr())
	binary.NativeEndian.PutUint32(id[40:], uint32(cookie))
	binary.NativeEndian.PutUint32(id[44:], uint32(cookie>>32))
	return p
}

// nlmsg frames a payload as a netlink message, padded to alignment.
func nlmsg(typ, flags uint16, seq uint32, payload []byte) []byte {
	l := unix.NLMSG_HDRLEN + len(payload)
	b := make([]byte, (l+3)&^3)
	binary.NativeEndian.PutUint32(b[0:], uint32(l))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint16(b[6:], flags)
	binary.NativeEndian.PutUint32(b[8:], seq)
	copy(b[unix.NLMSG_HDRLEN:], payload)
	return b
}

func errnoPayload(errno unix.Errno) []byte {
	p := make([]byte, 4+unix.NLMSG_HDRLEN) // error, then the request's header
	binary.NativeEndian.PutUint32(p, uint32(-int32(errno)))
	return p
}

func TestParseDiagMsg(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    Socket
	}{
		{"IPv4", Socket{Family: unix.AF_INET, Local: netip.MustParseAddrPort("10.244.0.100:40000"),
			Remote: netip.MustParseAddrPort("10.244.1.2:5353"), Cookie: 1<<40 | 77}},
		{"IPv6 talking IPv4", Socket{Family: unix.AF_INET6, Local: netip.MustParseAddrPort("[::ffff:10.244.0.100]:40000"),
			Remote: netip.MustParseAddrPort("[::ffff:10.96.0.10]:53"), Cookie: 5}},
		{"IPv6", Socket{Family: unix.AF_INET6, Local: netip.MustParseAddrPort("[fd00::1]:1"),
			Remote: netip.MustParseAddrPort("[fd00::2]:2"), Cookie: 6}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseDiagMsg(diagMsg(tc.s.Family, tc.s.Local, tc.s.Remote, tc.s.Cookie))
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.s {
				t.Errorf("got %+v, want %+v", got, tc.s)
			}
		})
	}
	if _, err := parseDiagMsg(make([]byte, sizeofDiagMsg-1)); err == nil {
		t.Error("a truncated message parsed")
	}
}

// fakeKernel is the other end of a socket pair standing in for the
// kernel's netlink socket: each request gets the replies reply returns.
func fakeKernel(t *testing.T, reply func(req []byte) [][]byte) *Conn {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := &Conn{fd: fds[0], buf: make([]byte, 64<<10)}
	done := make(chan struct{})
	t.Cleanup(func() {
		// Wake the reader before closing: a closed descriptor's number is
		// reused by the next test's pair, which it would read from.
		unix.Shutdown(fds[1], unix.SHUT_RDWR)
		<-done
		c.Close()
		unix.Close(fds[1])
	})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := unix.Read(fds[1], buf)
			if err != nil || n == 0 {
				return
			}
			for _, d := range reply(buf[:n]) {
				if _, err := unix.Write(fds[1], d); err != nil {
					return
				}
			}
		}
	}()
	return c
}

func seqOf(req []byte) uint32 { return binary.NativeEndian.Uint32(req[8:]) }

func TestConnectedUDPReadsBothFamiliesAcrossDatagrams(t *testing.T) {
	v4 := Socket{Family: unix.AF_INET, Local: netip.MustParseAddrPort("10.244.0.100:40000"),
		Remote: netip.MustParseAddrPort("10.244.1.2:5353"), Cookie: 11}
	v4b := Socket{Family: unix.AF_INET, Local: netip.MustParseAddrPort("10.244.0.100:40001"),
		Remote: netip.MustParseAddrPort("10.96.0.10:53"), Cookie: 12}
	v6 := Socket{Family: unix.AF_INET6, Local: netip.MustParseAddrPort("[::ffff:10.244.0.100]:40002"),
		Remote: netip.MustParseAddrPort("[::ffff:10.244.1.3]:5353"), Cookie: 13}
	var requests [][]byte
	c := fakeKernel(t, func(req []byte) [][]byte {
		requests = append(requests, append([]byte(nil), req...))
		seq := seqOf(req)
		stale := nlmsg(unix.SOCK_DIAG_BY_FAMILY, unix.NLM_F_MULTI, seq-1, diagMsg(unix.AF_INET, v4.Local, v4.Remote, 99))
		msg := func(s Socket) []byte {
			return nlmsg(unix.SOCK_DIAG_BY_FAMILY, unix.NLM_F_MULTI, seq, diagMsg(s.Family, s.Local, s.Remote, s.Cookie))
		}
		done := nlmsg(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq, make([]byte, 4))
		if req[unix.NLMSG_HDRLEN] == unix.AF_INET {
			// Two datagrams, the first with a leftover of an earlier
			// request that must be skipped.
			return [][]byte{append(append(stale, msg(v4)...), msg(v4b)...), done}
		}
		return [][]byte{append(msg(v6), done...)}
	})
	got, err := c.ConnectedUDP()
	if err != nil {
		t.Fatal(err)
	}
	want := []Socket{v4, v4b, v6}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("socket %d: got %v, want %v", i, got[i], want[i])
		}
	}
	if len(requests) != 2 || requests[0][unix.NLMSG_HDRLEN] != unix.AF_INET || requests[1][unix.NLMSG_HDRLEN] != unix.AF_INET6 {
		t.Errorf("requests were not one dump per family: %x", requests)
	}
}

func TestErrors(t *testing.T) {
	sock := Socket{Family: unix.AF_INET, Local: netip.MustParseAddrPort("10.244.0.100:40000"),
		Remote: netip.MustParseAddrPort("10.244.1.2:5353"), Cookie: 11}
	for _, tc := range []struct {
		name  string
		reply func(seq uint32) [][]byte
		call  func(c *Conn) error
		check func(err error) bool
	}{
		{
			name:  "destroyed",
			reply: func(seq uint32) [][]byte { return [][]byte{nlmsg(unix.NLMSG_ERROR, 0, seq, errnoPayload(0))} },
			call:  func(c *Conn) error { return c.DestroyUDP(sock) },
			check: func(err error) bool { return err == nil },
		},
		{
			name:  "socket gone",
			reply: func(seq uint32) [][]byte { return [][]byte{nlmsg(unix.NLMSG_ERROR, 0, seq, errnoPayload(unix.ENOENT))} },
			call:  func(c *Conn) error { return c.DestroyUDP(sock) },
			check: IsGone,
		},
		{
			name: "kernel without SOCK_DESTROY",
			reply: func(seq uint32) [][]byte {
				return [][]byte{nlmsg(unix.NLMSG_ERROR, 0, seq, errnoPayload(unix.EOPNOTSUPP))}
			},
			call:  func(c *Conn) error { return c.DestroyUDP(sock) },
			check: func(err error) bool { return errors.Is(err, ErrNotSupported) && !IsGone(err) },
		},
		{
			name:  "no permission",
			reply: func(seq uint32) [][]byte { return [][]byte{nlmsg(unix.NLMSG_ERROR, 0, seq, errnoPayload(unix.EPERM))} },
			call:  func(c *Conn) error { return c.DestroyUDP(sock) },
			check: func(err error) bool { return errors.Is(err, unix.EPERM) && !errors.Is(err, ErrNotSupported) },
		},
		{
			name: "kernel without UDP diag",
			reply: func(seq uint32) [][]byte {
				return [][]byte{nlmsg(unix.NLMSG_DONE, unix.NLM_F_MULTI, seq, errnoPayload(unix.ENOENT)[:4])}
			},
			call:  func(c *Conn) error { _, err := c.ConnectedUDP(); return err },
			check: func(err error) bool { return errors.Is(err, ErrNotSupported) },
		},
		{
			name: "dump interrupted",
			reply: func(seq uint32) [][]byte {
				return [][]byte{nlmsg(unix.NLMSG_DONE, unix.NLM_F_MULTI|unix.NLM_F_DUMP_INTR, seq, make([]byte, 4))}
			},
			call:  func(c *Conn) error { _, err := c.ConnectedUDP(); return err },
			check: func(err error) bool { return err != nil && strings.Contains(err.Error(), "changed during the dump") },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := fakeKernel(t, func(req []byte) [][]byte { return tc.reply(seqOf(req)) })
			if err := tc.call(c); !tc.check(err) {
				t.Errorf("unexpected result: %v", err)
			}
		})
	}
}

func TestUDPDestroySupportedProbe(t *testing.T) {
	for _, tc := range []struct {
		name  string
		errno unix.Errno
		want  bool
		err   bool
	}{
		{"supported", unix.ENOENT, true, false},
		{"not supported", unix.EOPNOTSUPP, false, false},
		{"something destroyed", 0, false, true},
		{"other error", unix.EINVAL, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var req []byte
			c := fakeKernel(t, func(r []byte) [][]byte {
				req = append([]byte(nil), r...)
				return [][]byte{nlmsg(unix.NLMSG_ERROR, 0, seqOf(r), errnoPayload(tc.errno))}
			})
			got, err := c.UDPDestroySupported()
			if got != tc.want || (err != nil) != tc.err {
				t.Errorf("got %v, %v; want %v, error %v", got, err, tc.want, tc.err)
			}
			// The probe must never name a real socket: cookie 0.
			if cookie := req[len(req)-8:]; string(cookie) != string(make([]byte, 8)) {
				t.Errorf("probe sent cookie %x, want 0", cookie)
			}
		})
	}
}

// runFilter checks bytecode as the kernel's inet_diag_bc_audit does (each
// "yes" walks to the next operation and ends exactly at the end; each "no"
// lands on an operation or the end, or 4 past it) and runs it as
// inet_diag_bc_run does, for a socket of family with peer.
func runFilter(t *testing.T, bc []byte, family uint8, peer netip.AddrPort) bool {
	t.Helper()
	ne := binary.NativeEndian
	starts := map[int]bool{}
	for off := 0; off < len(bc); {
		starts[off] = true
		yes := int(bc[off+1])
		if yes < 4 || yes&3 != 0 || off+yes > len(bc) {
			t.Fatalf("operation at %d: yes %d", off, yes)
		}
		off += yes
		if off == len(bc) {
			break
		}
	}
	for off := range starts {
		no := int(ne.Uint16(bc[off+2:]))
		rest := len(bc) - off
		if no < 4 || no&3 != 0 || no > rest+4 || (no < rest && !starts[off+no]) {
			t.Fatalf("operation at %d: no %d with %d left", off, no, rest)
		}
	}
	off := 0
	for off < len(bc) {
		code, yes, no := bc[off], int(bc[off+1]), int(ne.Uint16(bc[off+2:]))
		match := false
		switch code {
		case bcJump:
		case bcDestCondition:
			condFamily, bits := bc[off+4], int(bc[off+5])
			port := int32(ne.Uint32(bc[off+8:]))
			addr := bc[off+12 : off+12+bits/8]
			a := peer.Addr()
			switch {
			case port != -1 && uint16(port) != peer.Port():
			case condFamily == family && family == unix.AF_INET:
				v4 := a.Unmap().As4()
				match = string(v4[:]) == string(addr)
			case condFamily == family:
				v6 := a.As16()
				match = string(v6[:]) == string(addr)
			case condFamily == unix.AF_INET && family == unix.AF_INET6 && a.Is4In6():
				v4 := a.Unmap().As4()
				match = string(v4[:]) == string(addr)
			}
		default:
			t.Fatalf("operation %d at %d", code, off)
		}
		if match {
			off += yes
		} else {
			off += no
		}
	}
	return off == len(bc)
}

func TestPeerFilter(t *testing.T) {
	peers := []netip.AddrPort{netip.MustParseAddrPort("10.244.1.1:53"), netip.MustParseAddrPort("[::ffff:10.96.0.10]:53"),
		netip.MustParseAddrPort("[fd00::1]:53")}
	for _, tc := range []struct {
		family uint8
		peer   string
		want   bool
	}{
		{unix.AF_INET, "10.244.1.1:53", true},
		{unix.AF_INET, "10.96.0.10:53", true},
		{unix.AF_INET6, "[::ffff:10.244.1.1]:53", true},
		{unix.AF_INET6, "[::ffff:10.96.0.10]:53", true},
		{unix.AF_INET6, "[fd00::1]:53", true},
		{unix.AF_INET, "10.244.1.1:54", false},
		{unix.AF_INET, "10.244.1.2:53", false},
		{unix.AF_INET6, "[fd00::2]:53", false},
		{unix.AF_INET6, "[::ffff:10.244.1.2]:53", false},
	} {
		for n := 1; n <= len(peers); n++ {
			want := tc.want && slices.ContainsFunc(peers[:n], func(p netip.AddrPort) bool {
				return netip.AddrPortFrom(p.Addr().Unmap(), p.Port()) ==
					netip.AddrPortFrom(netip.MustParseAddrPort(tc.peer).Addr().Unmap(), netip.MustParseAddrPort(tc.peer).Port())
			})
			if got := runFilter(t, peerFilter(peers[:n]), tc.family, netip.MustParseAddrPort(tc.peer)); got != want {
				t.Errorf("%d peers, family %d, peer %s: accepted %v, want %v", n, tc.family, tc.peer, got, want)
			}
		}
	}
}

// A filtered dump carries the bytecode in an INET_DIAG_REQ_BYTECODE
// attribute after the request, counted in the message's length.
func TestRequestMarshalWithFilter(t *testing.T) {
	bc := peerFilter([]netip.AddrPort{netip.MustParseAddrPort("10.244.1.1:53")})
	b := request{family: unix.AF_INET, protocol: unix.IPPROTO_UDP, bytecode: bc}.marshal(unix.SOCK_DIAG_BY_FAMILY, 0, 1)
	ne := binary.NativeEndian
	attr := b[unix.NLMSG_HDRLEN+sizeofReqV2:]
	if got, want := int(ne.Uint32(b)), unix.NLMSG_HDRLEN+sizeofReqV2+unix.NLA_HDRLEN+len(bc); got != want || len(b) != want {
		t.Fatalf("message length %d (%d bytes), want %d", got, len(b), want)
	}
	if l, typ := int(ne.Uint16(attr)), ne.Uint16(attr[2:]); l != unix.NLA_HDRLEN+len(bc) || typ != reqBytecode {
		t.Errorf("attribute length %d type %d, want %d type %d", l, typ, unix.NLA_HDRLEN+len(bc), reqBytecode)
	}
	if string(attr[unix.NLA_HDRLEN:]) != string(bc) {
		t.Error("the attribute does not hold the bytecode")
	}
}
