package load

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/testnet"
)

// The tests below run the server and the clients as the benchmark does: as
// processes of one binary (this test binary, re-executed) in pods' network
// namespaces.
func TestMain(m *testing.M) {
	testnet.Main(m, map[string]func([]string) error{
		"bench-server": func(args []string) error { return ServerMain(context.Background(), args, os.Stdout) },
		"bench-client": func(args []string) error { return ClientMain(context.Background(), args, os.Stdout) },
	})
}

const (
	serverIP = "10.244.1.2"
	// serviceIP is a second address of the server pod, so that the
	// "service" target is a real, different address.
	serviceIP = "10.244.1.3"
	clientIP  = "10.244.2.2"
)

type topology struct {
	net    *testnet.Net
	server *testnet.Pod
	client *testnet.Pod
	srvCmd *exec.Cmd
}

func newTopology(t *testing.T) *topology {
	t.Helper()
	n := testnet.New(t)
	tp := &topology{net: n, server: n.AddPod("srv", serverIP), client: n.AddPod("cli", clientIP)}
	ip(t, "-n", tp.server.NS, "addr", "add", serviceIP+"/32", "dev", "eth0")
	ip(t, "-n", n.Node, "route", "add", serviceIP+"/32", "dev", tp.server.HostIf)
	tp.srvCmd = startServer(t, tp.server, "srv-1")
	return tp
}

func ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// startServer runs the server in pod p and waits for its ready line. It is
// stopped (SIGTERM) when the test ends, if not before.
func startServer(t *testing.T, p *testnet.Pod, name string) *exec.Cmd {
	t.Helper()
	cmd := p.Command(context.Background(), false, testnet.Helper("bench-server", "--name", name)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the server: %v", err)
	}
	t.Cleanup(func() { stopProcess(t, cmd) })
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		sc.Scan()
		ready <- sc.Text()
		for sc.Scan() {
			t.Logf("server %s printed %q", name, sc.Text())
		}
	}()
	select {
	case line := <-ready:
		if line != ServerReadyLine {
			t.Fatalf("server %s printed %q, want %q", name, line, ServerReadyLine)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("server %s not ready in 10 s", name)
	}
	return cmd
}

// stopProcess sends SIGTERM and expects a clean exit.
func stopProcess(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if cmd.ProcessState != nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("%v did not exit cleanly on SIGTERM: %v", cmd.Args, err)
		}
	case <-time.After(5 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Errorf("%v did not stop within 5 s of SIGTERM", cmd.Args)
	}
}

// client runs a client workload in the client pod and decodes its JSON.
func (tp *topology) run(t *testing.T, out any, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stdout, err := tp.client.Output(ctx, testnet.Helper(append([]string{"bench-client"}, args...)...)...)
	if err != nil {
		t.Fatalf("client %v: %v", args, err)
	}
	dec := json.NewDecoder(strings.NewReader(stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(out); err != nil {
		t.Fatalf("client %v printed %q: %v", args, stdout, err)
	}
	if dec.More() {
		t.Fatalf("client %v printed more than one JSON document: %q", args, stdout)
	}
}

func addr(ip string, port int) string { return fmt.Sprintf("%s:%d", ip, port) }

// checkSeries checks one series' targets: wantOK samples, all positive, and
// no error, for the reachable ones; count errors and no sample for those in
// broken.
func checkSeries(t *testing.T, r *LatencyResult, workload string, count int, targets []string, broken map[int]bool) {
	t.Helper()
	var s *Series
	for i := range r.Series {
		if r.Series[i].Workload == workload {
			s = &r.Series[i]
		}
	}
	if s == nil {
		t.Fatalf("no %s series in %+v", workload, r)
	}
	if len(s.Targets) != len(targets) {
		t.Fatalf("%s: %d targets, want %d", workload, len(s.Targets), len(targets))
	}
	for i, tg := range s.Targets {
		if tg.Target != targetName(i) || tg.Address != targets[i] {
			t.Errorf("%s target %d is %s %s, want %s %s", workload, i, tg.Target, tg.Address, targetName(i), targets[i])
		}
		if broken[i] {
			if tg.Errors != count || len(tg.Samples) != 0 || tg.FirstError == "" {
				t.Errorf("%s to unreachable %s: %d errors (%q), %d samples; want %d errors, no sample", workload, tg.Address, tg.Errors, tg.FirstError, len(tg.Samples), count)
			}
			continue
		}
		if tg.Errors != 0 || len(tg.Samples) != count {
			t.Errorf("%s to %s: %d samples, %d errors (%s); want %d samples", workload, tg.Address, len(tg.Samples), tg.Errors, tg.FirstError, count)
		}
		if len(tg.Samples) > 0 {
			sorted := slices.Sorted(slices.Values(tg.Samples))
			t.Logf("%s %s (%s): p50 %.1f µs, max %.1f µs over %d samples", workload, tg.Target, tg.Address, sorted[len(sorted)/2], sorted[len(sorted)-1], len(sorted))
		}
		for _, v := range tg.Samples {
			if v <= 0 || v > 1e6 {
				t.Errorf("%s to %s: implausible sample %v µs", workload, tg.Address, v)
				break
			}
		}
	}
}

func TestWorkloads(t *testing.T) {
	tp := newTopology(t)
	both := []string{addr(serverIP, EchoPort), addr(serviceIP, EchoPort)}
	// 7999: nothing listens there; connections are refused.
	refused := []string{addr(serverIP, EchoPort), addr(serviceIP, 7999)}
	const count = 200

	t.Run("crr", func(t *testing.T) {
		var r LatencyResult
		tp.run(t, &r, "crr", "--targets", strings.Join(both, ","), "--count", strconv.Itoa(count))
		if r.Workload != WorkloadCRR || r.Count != count || len(r.Series) != 2 {
			t.Errorf("result header %+v", r)
		}
		checkSeries(t, &r, results.TCPConnect, count, both, nil)
		checkSeries(t, &r, results.TCPCRR, count, both, nil)
		// A transaction includes its connect.
		c, x := r.Series[0].Targets[0].Samples, r.Series[1].Targets[0].Samples
		for i := range c {
			if x[i] < c[i] {
				t.Fatalf("sample %d: crr %v µs shorter than its connect %v µs", i, x[i], c[i])
			}
		}
	})
	t.Run("crr one target", func(t *testing.T) {
		var r LatencyResult
		tp.run(t, &r, "crr", "--targets", both[0], "--count", "20", "--warmup", "0")
		checkSeries(t, &r, results.TCPCRR, 20, both[:1], nil)
		if rep, ok := r.Rep(results.TCPCRR); !ok || len(rep.Direct) != 20 || rep.Service != nil {
			t.Errorf("Rep = %+v, %v; want 20 direct samples and no service", rep, ok)
		}
	})
	t.Run("crr refused", func(t *testing.T) {
		var r LatencyResult
		tp.run(t, &r, "crr", "--targets", strings.Join(refused, ","), "--count", "20")
		checkSeries(t, &r, results.TCPConnect, 20, refused, map[int]bool{1: true})
		checkSeries(t, &r, results.TCPCRR, 20, refused, map[int]bool{1: true})
	})
	t.Run("rr", func(t *testing.T) {
		var r LatencyResult
		tp.run(t, &r, "rr", "--targets", strings.Join(both, ","), "--count", strconv.Itoa(count))
		checkSeries(t, &r, results.TCPRR, count, both, nil)
	})
	t.Run("rr refused", func(t *testing.T) {
		var r LatencyResult
		tp.run(t, &r, "rr", "--targets", strings.Join(refused, ","), "--count", "20")
		checkSeries(t, &r, results.TCPRR, 20, refused, map[int]bool{1: true})
	})
	udp := []string{addr(serverIP, UDPEchoPort), addr(serviceIP, UDPEchoPort)}
	udpBroken := []string{addr(serverIP, UDPEchoPort), addr(serviceIP, 7999)}
	for _, mode := range []string{"connected", "unconnected"} {
		series := map[string]string{"connected": results.UDPConnected, "unconnected": results.UDPUnconnected}[mode]
		t.Run("udp "+mode, func(t *testing.T) {
			var r LatencyResult
			tp.run(t, &r, "udp", "--socket", mode, "--targets", strings.Join(udp, ","), "--count", strconv.Itoa(count))
			checkSeries(t, &r, series, count, udp, nil)
		})
		t.Run("udp "+mode+" unanswered", func(t *testing.T) {
			var r LatencyResult
			tp.run(t, &r, "udp", "--socket", mode, "--targets", strings.Join(udpBroken, ","), "--count", "10", "--timeout", "50ms")
			checkSeries(t, &r, series, 10, udpBroken, map[int]bool{1: true})
		})
	}
	t.Run("rate connect", func(t *testing.T) {
		// A PID that is gone: a process that ran and was reaped.
		gone := exec.Command("true")
		if err := gone.Run(); err != nil {
			t.Fatal(err)
		}
		var r RateResult
		tp.run(t, &r, "rate", "--workload", "connect", "--targets", strings.Join(both, ","),
			"--workers", "2", "--phase", "200ms", "--phases", "4",
			"--start-at", strconv.FormatInt(time.Now().Add(300*time.Millisecond).UnixNano(), 10),
			"--proxy-pids", strconv.Itoa(tp.srvCmd.Process.Pid))
		checkPhases(t, &r, results.ConnectRate, both)
		for _, p := range r.Phases {
			if p.ProxyGone {
				t.Errorf("phase %d: the server's PID counted as gone", p.Index)
			}
		}
		var r2 RateResult
		tp.run(t, &r2, "rate", "--workload", "connect", "--targets", both[0], "--phase", "100ms", "--phases", "1",
			"--proxy-pids", strconv.Itoa(gone.Process.Pid))
		if len(r2.Phases) != 1 || !r2.Phases[0].ProxyGone || r2.Phases[0].ProxyCPUSeconds != 0 {
			t.Errorf("with a gone PID: %+v, want one phase with proxyGone and 0 proxy CPU", r2.Phases)
		}
	})
	t.Run("rate connect refused", func(t *testing.T) {
		var r RateResult
		tp.run(t, &r, "rate", "--workload", "connect", "--targets", refused[1], "--phase", "100ms", "--phases", "1")
		if len(r.Phases) != 1 || r.Phases[0].Ops != 0 || r.Phases[0].Errors == 0 || r.Phases[0].FirstError == "" {
			t.Errorf("refused target: %+v, want errors and no op", r.Phases)
		}
	})
	t.Run("rate stream", func(t *testing.T) {
		sink := []string{addr(serverIP, SinkPort), addr(serviceIP, SinkPort)}
		var r RateResult
		tp.run(t, &r, "rate", "--workload", "stream", "--targets", strings.Join(sink, ","),
			"--workers", "2", "--phase", "200ms", "--phases", "2")
		checkPhases(t, &r, results.Stream, sink)
		for _, p := range r.Phases {
			// Far more than one buffer goes through a veth in 200 ms.
			if p.Ops < streamBuffer {
				t.Errorf("phase %d: %d bytes, want more than %d", p.Index, p.Ops, streamBuffer)
			}
		}
	})
}

// TestStopsOnSIGTERM: a workload far from done stops promptly when
// signalled, fails, and prints no partial result.
func TestStopsOnSIGTERM(t *testing.T) {
	tp := newTopology(t)
	for _, args := range [][]string{
		{"crr", "--targets", addr(serverIP, EchoPort) + "," + addr(serviceIP, EchoPort), "--count", "10000000"},
		{"rate", "--workload", "stream", "--targets", addr(serverIP, SinkPort), "--phase", "1m", "--phases", "2"},
		{"poll", "--targets", addr(serverIP, 7999), "--timeout", "1m"},
	} {
		t.Run(args[0], func(t *testing.T) {
			cmd := tp.client.Command(context.Background(), true, testnet.Helper(append([]string{"bench-client"}, args...)...)...)
			var stdout, stderr strings.Builder
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			time.Sleep(300 * time.Millisecond)
			sent := time.Now()
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				if err == nil || stdout.Len() != 0 {
					t.Errorf("%v on SIGTERM: exit %v, stdout %q; want a failure and no result", args, err, stdout.String())
				}
				t.Logf("%v stopped %v after SIGTERM: %s", args[0], time.Since(sent), strings.TrimSpace(stderr.String()))
			case <-time.After(5 * time.Second):
				_ = cmd.Process.Kill()
				<-done
				t.Errorf("%v still running 5 s after SIGTERM", args)
			}
		})
	}
}

func checkPhases(t *testing.T, r *RateResult, workload string, targets []string) {
	t.Helper()
	if r.Workload != workload {
		t.Errorf("workload %q, want %q", r.Workload, workload)
	}
	for i, p := range r.Phases {
		ti := i % len(targets)
		if p.Index != i || p.Target != targetName(ti) || p.Address != targets[ti] {
			t.Errorf("phase %d is %d %s %s, want %s %s", i, p.Index, p.Target, p.Address, targetName(ti), targets[ti])
		}
		if p.Ops <= 0 || p.Errors != 0 || p.Seconds <= 0 || p.NodeCPUSeconds <= 0 || p.ProxyCPUSeconds < 0 {
			t.Errorf("phase %d: %+v; want ops, no error, elapsed time and node CPU", i, p)
		}
	}
	for _, p := range r.Phases {
		t.Logf("%s phase %d %s: %.3f s, %d ops, %.2f node CPU s, %.3f proxy CPU s", workload, p.Index, p.Target, p.Seconds, p.Ops, p.NodeCPUSeconds, p.ProxyCPUSeconds)
	}
	if len(r.Phases) == 0 {
		t.Errorf("no phase")
	}
}

func TestWatch(t *testing.T) {
	n := testnet.New(t)
	srv := n.AddPod("srv", serverIP)
	cli := n.AddPod("cli", clientIP)
	srv1 := startServer(t, srv, "name-one")

	cmd := cli.Command(context.Background(), true, testnet.Helper("bench-client", "watch", "--target", addr(serverIP, NamePort))...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopProcess(t, cmd) })
	lines := make(chan string, 100)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	var last int64
	next := func() (string, bool) {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("watch ended early")
			}
			ns, rest, _ := strings.Cut(l, " ")
			v, err := strconv.ParseInt(ns, 10, 64)
			if err != nil || v < last || rest == "" {
				t.Fatalf("bad watch line %q after time %d", l, last)
			}
			last = v
			return rest, strings.HasPrefix(rest, "!error ")
		case <-time.After(10 * time.Second):
			t.Fatalf("no watch line within 10 s")
		}
		return "", false
	}
	if name, _ := next(); name != "name-one" {
		t.Fatalf("watch printed %q first, want name-one", name)
	}
	stopProcess(t, srv1)
	changed := time.Now().UnixNano()
	startServer(t, srv, "name-two")
	// Refusals while no server listens give one error line (not one per
	// attempt), then the new name.
	errorsSeen := 0
	for {
		name, isErr := next()
		if isErr {
			errorsSeen++
			if errorsSeen > 1 {
				t.Fatalf("a second error line %q in one run of errors", name)
			}
			continue
		}
		if name != "name-two" {
			t.Fatalf("watch printed %q, want name-two", name)
		}
		if last < changed {
			t.Errorf("name-two seen at %d, before the change at %d", last, changed)
		}
		break
	}
	stopProcess(t, cmd)
	for l := range lines {
		t.Errorf("watch printed %q with no change", l)
	}
}

func TestPoll(t *testing.T) {
	n := testnet.New(t)
	srv := n.AddPod("srv", serverIP)
	late := n.AddPod("late", "10.244.3.2")
	cli := n.AddPod("cli", clientIP)
	startServer(t, srv, "early")

	cmd := cli.Command(context.Background(), true, testnet.Helper("bench-client", "poll", "--timeout", "2s", "--targets",
		strings.Join([]string{addr(serverIP, NamePort), addr("10.244.3.2", NamePort), addr(serverIP, 7999)}, ","))...)
	cmd.Stderr = os.Stderr
	var stdout strings.Builder
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopProcess(t, cmd) })
	time.Sleep(300 * time.Millisecond)
	lateStart := time.Now().UnixNano()
	startServer(t, late, "late")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("poll: %v", err)
	}
	var r PollResult
	if err := json.Unmarshal([]byte(stdout.String()), &r); err != nil {
		t.Fatalf("poll printed %q: %v", stdout.String(), err)
	}
	if len(r.Targets) != 3 || r.AllReached {
		t.Fatalf("poll result %+v, want 3 targets, not all reached", r)
	}
	early, lt, never := r.Targets[0], r.Targets[1], r.Targets[2]
	// The poller may start after the sleep on a loaded machine, so the early
	// target is judged by its attempts, not by the late server's start.
	if early.FirstSuccessNanos < r.StartNanos || early.Attempts != 1 {
		t.Errorf("listening target reached at %d after %d attempts, want at the first attempt, after the start %d", early.FirstSuccessNanos, early.Attempts, r.StartNanos)
	}
	if r.StartNanos >= lateStart {
		// The late server was up before polling began: only its success can be checked.
		t.Logf("the poller started %v after the late server", time.Duration(r.StartNanos-lateStart))
		if lt.FirstSuccessNanos == 0 {
			t.Errorf("late target never reached: %+v", lt)
		}
	} else if lt.FirstSuccessNanos < lateStart || lt.Attempts < 2 {
		t.Errorf("late target reached at %d after %d attempts, want after its server started at %d and retries", lt.FirstSuccessNanos, lt.Attempts, lateStart)
	}
	if never.FirstSuccessNanos != 0 || never.LastError == "" {
		t.Errorf("refusing target: %+v, want no success and an error", never)
	}
}
