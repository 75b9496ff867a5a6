package testnet

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Loop is a client in a pod that connects over and over until stopped,
// with its results ("ok NAME peer=..." or "err ...") collected as they come.
type Loop struct {
	t     T
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []string
	done  chan struct{}
}

// StartLoop starts a TCP connect loop to addr in pod p.
func (p *Pod) StartLoop(addr string) *Loop {
	p.net.t.Helper()
	return StartLoopCommand(p.net.t, p.Command(context.Background(), true, Helper("loop", addr)...))
}

// StartLoopCommand starts cmd, a prepared "loop" helper (see Helper) in
// some client's namespace, and collects its results. It returns once the
// loop is under way; the loop is stopped when the test ends.
func StartLoopCommand(t T, cmd *exec.Cmd) *Loop {
	t.Helper()
	l := &Loop{t: t, cmd: cmd, done: make(chan struct{})}
	out, err := l.cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("%v", err)
	}
	l.cmd.Stderr = os.Stderr
	if err := l.cmd.Start(); err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { Stop(l.cmd) })
	ready := make(chan struct{})
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "ready" {
				close(ready)
				continue
			}
			l.mu.Lock()
			l.lines = append(l.lines, sc.Text())
			l.mu.Unlock()
		}
	}()
	select {
	case <-ready:
	case <-l.done:
		t.Fatalf("connect loop %v exited before it began", cmd.Args)
	case <-time.After(30 * time.Second):
		t.Fatalf("connect loop %v did not begin in 30s", cmd.Args)
	}
	return l
}

// Take returns the results so far, waiting until there are at least n.
func (l *Loop) Take(n int) []string {
	l.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		l.mu.Lock()
		if len(l.lines) >= n {
			out := l.lines
			l.lines = nil
			l.mu.Unlock()
			return out
		}
		l.mu.Unlock()
		if time.Now().After(deadline) {
			l.t.Fatalf("connect loop produced fewer than %d results in 30s", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Settle returns the results of the connects begun before it was called,
// waiting for the one under way: every later result comes from a connect
// that began after the caller's last change. It goes by each result's start
// time, not by arrival: the result of a connect that ended just before the
// call may still be in the pipe while the next one, begun before the
// change, is under way.
func (l *Loop) Settle() []string {
	l.t.Helper()
	mark := time.Now().UnixNano()
	deadline := time.Now().Add(30 * time.Second)
	var out []string
	for {
		l.mu.Lock()
		for len(l.lines) > 0 {
			if startOf(l.lines[0]) >= mark {
				l.mu.Unlock()
				return out
			}
			out = append(out, l.lines[0])
			l.lines = l.lines[1:]
		}
		l.mu.Unlock()
		if time.Now().After(deadline) {
			l.t.Fatalf("connect loop began no connect in the 30s after the change")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startOf is the start time a loop result carries; 0 if it has none.
func startOf(line string) int64 {
	i := strings.LastIndex(line, " start=")
	if i < 0 {
		return 0
	}
	n, _ := strconv.ParseInt(line[i+len(" start="):], 10, 64)
	return n
}

// Stop ends the loop and waits for it.
func (l *Loop) Stop() {
	_ = l.cmd.Process.Signal(os.Interrupt)
	<-l.done
	_ = l.cmd.Wait()
}

// AddServers adds n pods named pod-0.. at 10.244.1.1.., each serving its
// name on TCP 8080 and 9090 and UDP 5353: the backends most tests use.
func (n *Net) AddServers(count int) []*Pod {
	n.t.Helper()
	var pods []*Pod
	for i := range count {
		p := n.AddPod(fmt.Sprintf("pod-%d", i), fmt.Sprintf("10.244.1.%d", i+1))
		p.Start(false, Helper("serve", p.Name, "tcp:8080", "udp:5353", "tcp:9090")...)
		pods = append(pods, p)
	}
	return pods
}

// Backends lists the pods' addresses with port, as "ip:port" ("[ip]:port"
// for IPv6).
func Backends(port int, pods ...*Pod) []string {
	var out []string
	for _, p := range pods {
		out = append(out, netip.AddrPortFrom(p.IP, uint16(port)).String())
	}
	return out
}

// Results runs a helper client (Helper's arguments: "tcp ADDR N", ...) in
// the pod and returns its result lines; a client that cannot run fails the
// test.
func (p *Pod) Results(args ...string) []string {
	p.net.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := p.Output(ctx, Helper(args...)...)
	if err != nil {
		p.net.t.Fatalf("%v", err)
	}
	return strings.Split(strings.TrimSpace(out), "\n")
}

// Tally counts result lines by their first two words ("ok pod-1"); other
// lines count as themselves.
func Tally(lines []string) map[string]int {
	out := make(map[string]int)
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) >= 2 && f[0] == "ok" {
			out["ok "+f[1]]++
		} else {
			out[l]++
		}
	}
	return out
}

// AssertAllOK fails the test unless every line is an answer from one of
// the allowed pods.
func AssertAllOK(t T, phase string, lines []string, allowed ...string) {
	t.Helper()
	for _, l := range lines {
		ok := false
		for _, a := range allowed {
			if strings.HasPrefix(l, "ok "+a+" ") {
				ok = true
			}
		}
		if !ok {
			t.Errorf("%s: unexpected result %q (allowed backends %v)", phase, l, allowed)
			return
		}
	}
}
