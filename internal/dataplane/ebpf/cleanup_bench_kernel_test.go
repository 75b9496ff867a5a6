package ebpf

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// This file is self-contained (its helper registers itself), so that the
// same benchmark runs on an older tree for a before/after comparison.

const socketFarmHelper = "udp-socket-farm"

func init() {
	if os.Getenv("KBP_TESTNET_HELPER") == "1" && len(os.Args) > 1 && os.Args[1] == socketFarmHelper {
		testnet.RunHelperIfRequested(map[string]func([]string) error{socketFarmHelper: socketFarm})
	}
}

// socketFarm holds connected UDP sockets in many network namespaces:
// args are VIP:PORT, the sockets per namespace, and a file listing the
// namespaces. In each namespace one socket connects to the VIP (connect4
// translates it: the process runs in the test's cgroup), the others to
// addresses of no Service. It prints "ready N" with the sockets open;
// then, for each "reconnect" line on stdin, connects every VIP socket that
// was destroyed to the VIP again and prints "reconnected N".
func socketFarm(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("usage: %s VIP:PORT PER-NETNS NETNS-LIST", socketFarmHelper)
	}
	vip, err := netip.ParseAddrPort(args[0])
	if err != nil {
		return err
	}
	per, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	list, err := os.ReadFile(args[2])
	if err != nil {
		return err
	}
	toVIP := &unix.SockaddrInet4{Addr: vip.Addr().As4(), Port: int(vip.Port())}
	var vipSockets []int
	total := 0
	for i, ns := range strings.Fields(string(list)) {
		err := inNetNSThread(ns, func() error {
			for j := range per {
				fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				to := toVIP
				if j > 0 {
					to = &unix.SockaddrInet4{Addr: [4]byte{10, 250, byte(i), byte(j)}, Port: 9999}
				} else {
					vipSockets = append(vipSockets, fd)
				}
				if err := unix.Connect(fd, to); err != nil {
					return fmt.Errorf("connecting in %s: %w", ns, err)
				}
				total++
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	fmt.Printf("ready %d\n", total)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		n := 0
		for _, fd := range vipSockets {
			if _, err := unix.Getpeername(fd); err == nil {
				continue
			}
			// Destroyed: disconnected, its error pending. A socket keeps
			// its namespace, so no setns is needed.
			_, _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
			if err := unix.Connect(fd, toVIP); err != nil {
				return fmt.Errorf("reconnecting: %w", err)
			}
			n++
		}
		fmt.Printf("reconnected %d\n", n)
	}
	return in.Err()
}

// envInt reads a size from the environment, for a quick smaller run.
func envInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > 250 {
		b.Fatalf("%s=%q: want 1 to 250", name, v)
	}
	return n
}

// inNetNSThread runs fn on a locked thread in the namespace at path.
func inNetNSThread(path string, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is left locked: it ends with the goroutine, and never
		// runs anything else in the wrong namespace.
		f, err := os.Open(path)
		if err != nil {
			done <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		done <- fn()
	}()
	return <-done
}

// BenchmarkKernelUDPSocketCleanup measures the socket cleanup with 200 pod
// network namespaces holding 10k connected UDP sockets, 200 of them
// connected to a DNS ClusterIP with two backends (KBP_BENCH_NETNS and
// KBP_BENCH_SOCKETS_PER_NETNS make it smaller). Per iteration:
//
//   - unchanged: a full sync of the same Services;
//   - removed: one backend leaves (about 100 sockets to destroy);
//   - fresh: a new UDP Service appears (its VIP may have sockets connected
//     untranslated, so every namespace is looked at).
//
// For each it reports the sync's time (until Sync returns) and the time
// until the cleanup is done (from the sync's start; the same where the
// cleanup runs in the sync). Run it under the heavy lock:
//
//	flock /tmp/kbp-heavy.lock go test -run - -bench KernelUDPSocketCleanup -benchtime 3x ./internal/dataplane/ebpf/
func BenchmarkKernelUDPSocketCleanup(b *testing.B) {
	const dnsVIP = "10.96.0.10:53"
	namespaces, perNetNS := envInt(b, "KBP_BENCH_NETNS", 200), envInt(b, "KBP_BENCH_SOCKETS_PER_NETNS", 50)
	s := newKernelSetup(b, 0, func(c *Config) { c.MaxSockets = 65536 })
	n := s.net

	// The pods' namespaces: only loopback, with all of 10/8 on it, so that
	// any backend or pod address is routable for connect().
	var script strings.Builder
	var paths []string
	for i := range namespaces {
		name := fmt.Sprintf("%s-p%03d", n.Prefix, i)
		fmt.Fprintf(&script, "ip netns add %[1]s && ip -n %[1]s link set lo up && ip -n %[1]s addr add 10.255.255.1/8 dev lo && ", name)
		paths = append(paths, "/run/netns/"+name)
	}
	script.WriteString("true")
	b.Cleanup(func() {
		for _, p := range paths {
			_ = exec.Command("ip", "netns", "del", filepath.Base(p)).Run()
		}
	})
	if out, err := exec.Command("bash", "-c", script.String()).CombinedOutput(); err != nil {
		b.Fatalf("creating namespaces: %v: %s", err, out)
	}
	for _, p := range paths {
		if err := os.Symlink(p, filepath.Join(n.PodNetNSDir, filepath.Base(p))); err != nil {
			b.Fatal(err)
		}
	}
	list := filepath.Join(b.TempDir(), "netns")
	if err := os.WriteFile(list, []byte(strings.Join(paths, "\n")), 0o600); err != nil {
		b.Fatal(err)
	}

	dns := func(backends ...string) model.ServicePort {
		return servicePort("kube-system", "dns", "dns", model.UDP, dnsVIP, backends...)
	}
	const b1, b2 = "10.244.1.1:53", "10.244.1.2:53"
	both := snapshot(true, dns(b1, b2))
	s.sync(b, both)

	// One process in the test's cgroup (so connect4 sees its sockets)
	// holds them all.
	cmd := s.client.Command(context.Background(), true,
		testnet.Helper(socketFarmHelper, dnsVIP, strconv.Itoa(perNetNS), list)...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	lines := bufio.NewScanner(stdout)
	line := func() string {
		if !lines.Scan() {
			b.Fatalf("socket farm ended: %v", lines.Err())
		}
		return lines.Text()
	}
	if got, want := line(), fmt.Sprintf("ready %d", namespaces*perNetNS); got != want {
		b.Fatalf("socket farm: %q, want %q", got, want)
	}

	// wait waits for the cleanup where it runs after the sync (off its
	// path); where the sync runs it, there is nothing to wait for.
	wait := func() {
		if w, ok := any(s.dp).(interface{ waitSocketCleanup() }); ok {
			w.waitSocketCleanup()
		}
	}
	destroyed := func() uint64 {
		e, err := s.dp.Events()
		if err != nil {
			b.Fatal(err)
		}
		return e[eventUDPSocketsDestroyed]
	}
	type phase struct {
		name        string
		sync, total time.Duration
		destroyed   uint64
	}
	phases := []*phase{{name: "unchanged"}, {name: "removed"}, {name: "fresh"}}
	measure := func(p *phase, snap *model.Snapshot) {
		before := destroyed()
		start := time.Now()
		if err := s.dp.Sync(context.Background(), snap); err != nil {
			b.Fatal(err)
		}
		p.sync += time.Since(start)
		wait()
		p.total += time.Since(start)
		p.destroyed += destroyed() - before
	}
	other := servicePort("default", "stats", "udp", model.UDP, "10.96.0.11:8125", "10.244.3.1:8125")
	// A first full sync after the farm connected (not measured): the
	// cleaner now knows every frontend.
	s.sync(b, both)
	for i := 0; i < b.N; i++ {
		measure(phases[0], both)
		measure(phases[1], snapshot(false, dns(b2)))
		measure(phases[2], snapshot(false, other))
		// Back to the start, not measured: the new Service goes, the
		// backend comes back, the destroyed sockets reconnect.
		s.sync(b, snapshot(true, dns(b2)))
		s.sync(b, both)
		if _, err := io.WriteString(stdin, "reconnect\n"); err != nil {
			b.Fatal(err)
		}
		if got := line(); !strings.HasPrefix(got, "reconnected ") {
			b.Fatalf("socket farm: %q", got)
		}
	}
	for _, p := range phases {
		b.ReportMetric(float64(p.sync.Microseconds())/float64(b.N)/1000, p.name+"-sync-ms")
		b.ReportMetric(float64(p.total.Microseconds())/float64(b.N)/1000, p.name+"-cleanup-done-ms")
		b.ReportMetric(float64(p.destroyed)/float64(b.N), p.name+"-destroyed")
	}
	b.ReportMetric(0, "ns/op")
}
