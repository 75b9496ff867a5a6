package load

import (
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

func TestClientMainRejectsBadFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no workload", nil, "missing the workload"},
		{"unknown workload", []string{"ping"}, `unknown workload "ping"`},
		{"unknown flag", []string{"crr", "--targets", "10.0.0.1:1", "--bogus"}, "flag provided but not defined: -bogus"},
		{"no targets", []string{"crr"}, "--targets is required"},
		{"hostname target", []string{"rr", "--targets", "server:7001"}, `"server:7001" is not IP:port`},
		{"three targets", []string{"crr", "--targets", "10.0.0.1:1,10.0.0.2:1,10.0.0.3:1"}, "at most 2"},
		{"zero count", []string{"crr", "--targets", "10.0.0.1:1", "--count", "0"}, "--count must be at least 1"},
		{"bad duration", []string{"crr", "--targets", "10.0.0.1:1", "--timeout", "soon"}, `invalid value "soon" for flag -timeout`},
		{"positional", []string{"udp", "--targets", "10.0.0.1:1", "extra"}, "unexpected arguments"},
		{"udp socket", []string{"udp", "--targets", "10.0.0.1:1", "--socket", "raw"}, "--socket must be connected or unconnected"},
		{"rate without workload", []string{"rate", "--targets", "10.0.0.1:1"}, "--workload is required"},
		{"rate bad pid", []string{"rate", "--workload", "connect", "--targets", "10.0.0.1:1", "--proxy-pids", "1,x"}, `"x" is not a PID`},
		{"watch no target", []string{"watch"}, "--target"},
		{"poll no targets", []string{"poll", "--timeout", "1s"}, "--targets is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out strings.Builder
			err := ClientMain(context.Background(), tc.args, &out)
			if err == nil {
				t.Fatalf("ClientMain(%q) succeeded, printing %q", tc.args, out.String())
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ClientMain(%q) error %q does not say %q", tc.args, err, tc.want)
			}
			if out.Len() != 0 {
				t.Errorf("ClientMain(%q) printed %q on a usage error", tc.args, out.String())
			}
		})
	}
}

func TestServerMainRejectsBadFlags(t *testing.T) {
	t.Setenv("POD_NAME", "")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no name", nil, "no pod name"},
		{"bad port", []string{"--name", "a", "--echo-port", "70000"}, "port 70000 out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out strings.Builder
			err := ServerMain(context.Background(), tc.args, &out)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ServerMain(%q) = %v, want an error saying %q", tc.args, err, tc.want)
			}
			if out.Len() != 0 {
				t.Errorf("ServerMain(%q) printed %q", tc.args, out.String())
			}
		})
	}
}

// USER_HZ is hard-coded; this is where it is checked.
func TestUserHZ(t *testing.T) {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err != nil {
		t.Skipf("getconf: %v", err)
	}
	hz, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("getconf CLK_TCK printed %q", out)
	}
	if hz != userHZ {
		t.Fatalf("CLK_TCK is %d, the code assumes %d", hz, userHZ)
	}
}

func TestCPUSnapshot(t *testing.T) {
	root := t.TempDir()
	write := func(path, s string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(filepath.Join(root, path)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, path), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// user nice system idle iowait irq softirq steal guest guest_nice
	write("stat", "cpu  100 20 300 9999 8888 4 5 6 7 8\ncpu0 1 1 1 1 1 1 1 1 1 1\nintr 1\n")
	// A command name with spaces and a parenthesis: utime 250, stime 50.
	write("42/stat", "42 (kube proxy) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 1000 100 0 0\n")
	write("43/stat", "43 (p) S 1 43 43 0 -1 0 0 0 0 0 10 10 0 0 20 0 1 0 1 1 1\n")
	before, err := takeCPUSnapshot(root, []int{42, 43, 44})
	if err != nil {
		t.Fatal(err)
	}
	if want := (100 + 20 + 300 + 4 + 5 + 6) / 100.0; before.node != want {
		t.Errorf("node CPU %v s, want %v", before.node, want)
	}
	if before.pids[0] != 3 || before.pids[1] != 0.2 || !before.gone[2] || before.gone[0] {
		t.Errorf("PIDs %v gone %v, want [3 0.2 0] [false false true]", before.pids, before.gone)
	}
	write("stat", "cpu  200 20 300 9999 8888 4 5 6 7 8\n")
	write("42/stat", "42 (kube proxy) x) S 1 42 42 0 -1 4194560 100 0 0 0 300 100 0 0 20 0 8 0 100 1000 100 0 0\n")
	after, err := takeCPUSnapshot(root, []int{42, 43, 44})
	if err != nil {
		t.Fatal(err)
	}
	node, proxy, gone := after.since(before)
	if node != 1 || proxy != 1 || !gone {
		t.Errorf("since = %v, %v, %v; want 1, 1, true", node, proxy, gone)
	}
	node, proxy, gone = after.since(after)
	if node != 0 || proxy != 0 || !gone {
		t.Errorf("since itself = %v, %v, %v; want 0, 0, true (44 is gone)", node, proxy, gone)
	}
}

func TestLatencyResultRep(t *testing.T) {
	var r LatencyResult
	if err := json.Unmarshal([]byte(`{"workload":"crr","series":[
		{"workload":"tcp-connect","targets":[{"target":"direct","samples":[1,2]},{"target":"service","samples":[3],"errors":1}]},
		{"workload":"tcp-crr","targets":[{"target":"direct","samples":[5]}]}]}`), &r); err != nil {
		t.Fatal(err)
	}
	rep, ok := r.Rep(results.TCPConnect)
	if !ok || len(rep.Direct) != 2 || len(rep.Service) != 1 || rep.ServiceErrors != 1 || rep.DirectErrors != 0 {
		t.Errorf("Rep(tcp-connect) = %+v, %v", rep, ok)
	}
	if _, ok := r.Rep(results.TCPRR); ok {
		t.Errorf("Rep(tcp-rr) found a series that is not there")
	}
}

// TestRateMissedPhase: an operation still running when its phase ends
// completes (up to --timeout) and may outlast the next phase; that phase
// is recorded as missed, with nothing counted, and the run goes on: one
// slow connection must not cost a cell its whole rate measurement.
func TestRateMissedPhase(t *testing.T) {
	// Loopback of this process's own namespace: a server that accepts and
	// never answers, so every transaction waits out its timeout.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	}()
	addr := netip.MustParseAddrPort(l.Addr().String())
	res, err := runRate(context.Background(), rateConfig{
		workload: RateConnect, targets: []target{{name: results.TargetDirect, addr: addr}},
		workers: 1, phase: 100 * time.Millisecond, phases: 4, timeout: 250 * time.Millisecond,
		startAt: time.Now().Add(50 * time.Millisecond), procRoot: "/proc",
	})
	if err != nil {
		t.Fatalf("an overrun phase failed the run: %v", err)
	}
	if len(res.Phases) != 4 {
		t.Fatalf("%d phases, want 4", len(res.Phases))
	}
	missed := 0
	for _, p := range res.Phases {
		if p.Missed {
			missed++
			if p.Ops != 0 || p.Seconds != 0 {
				t.Errorf("missed phase %d counts %d ops over %.3f s", p.Index, p.Ops, p.Seconds)
			}
		}
	}
	if missed == 0 || res.Phases[0].Missed {
		t.Errorf("phases %+v: want a later one missed after phase 0's 250 ms transaction", res.Phases)
	}
}

// A client started after its first phase ended says so in words the
// benchmark recognises, so that it measures again with a longer lead
// instead of failing the cell.
func TestRateStartedLate(t *testing.T) {
	addr := netip.MustParseAddrPort("127.0.0.1:9")
	_, err := runRate(context.Background(), rateConfig{
		workload: RateConnect, targets: []target{{name: results.TargetDirect, addr: addr}},
		workers: 1, phase: 100 * time.Millisecond, phases: 2, timeout: 250 * time.Millisecond,
		startAt: time.Now().Add(-time.Second), procRoot: "/proc",
	})
	if err == nil || !strings.Contains(err.Error(), ErrStartedLate) {
		t.Fatalf("a start a second in the past gave %v, want an error containing %q", err, ErrStartedLate)
	}
}
