package testnet

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// handedOut holds the ports FreePort gave this test binary, so that two
// tests of one package running in parallel never get the same one.
var handedOut sync.Map

// FreeAddr is a loopback address with a port nobody listens on now, for a
// server a test starts. See FreePort for why it stays free.
func FreeAddr(t T) string {
	t.Helper()
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(FreePort(t)))
}

// FreePort is a port free for TCP and UDP on every address now, for a
// server a test starts after this returns.
//
// The port is chosen outside the kernel's ephemeral range
// (net.ipv4.ip_local_port_range). A port the kernel picked for a ":0"
// listener comes from that range, and between closing it and the server's
// bind, any connect() on the machine (another test package's, run in
// parallel) may take it as its source port: the server then fails with
// "address already in use". Outside the range only another explicit bind can
// take it.
func FreePort(t T) int {
	t.Helper()
	lo, hi, err := ephemeralRange()
	if err != nil {
		t.Fatalf("%v", err)
	}
	// The widest span outside [lo, hi], above the well-known and
	// registered ports most daemons use.
	from, to := 10000, lo-1
	if hi+1 <= 65535 && 65535-hi > to-from {
		from, to = hi+1, 65535
	}
	if to-from < 100 {
		t.Fatalf("no room for test ports outside the ephemeral range %d-%d", lo, hi)
	}
	for range 1000 {
		port := from + rand.IntN(to-from+1)
		if _, taken := handedOut.LoadOrStore(port, true); taken {
			continue
		}
		if free(port) {
			return port
		}
	}
	t.Fatalf("no free port in %d-%d after 1000 tries", from, to)
	return 0
}

// free reports whether port can be bound on every address, of both
// families, for TCP and UDP: a port held on any one address (::1, a node
// address) would fail a server that listens on the wildcard.
func free(port int) bool {
	addr := ":" + strconv.Itoa(port)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	defer ln.Close()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return false
	}
	defer pc.Close()
	return true
}

// ephemeralRange is the kernel's range of source ports for connect() and
// ":0" binds.
func ephemeralRange() (lo, hi int, err error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("ip_local_port_range: %q", b)
	}
	if lo, err = strconv.Atoi(f[0]); err == nil {
		hi, err = strconv.Atoi(f[1])
	}
	return lo, hi, err
}
