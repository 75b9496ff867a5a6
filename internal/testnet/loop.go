package testnet

import (
	"bufio"
	"context"
	"os"
	"os/exec"
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
	t := p.net.t
	t.Helper()
	l := &Loop{t: t, done: make(chan struct{})}
	l.cmd = p.Command(context.Background(), true, Helper("loop", addr)...)
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
	<-ready
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

// Settle returns what the loop reported up to and including the connect
// under way when it was called: every later result comes from a connect
// that started after the caller's last change.
func (l *Loop) Settle() []string {
	l.t.Helper()
	before := l.Take(0)
	return append(before, l.Take(1)...)
}

// Stop ends the loop and waits for it.
func (l *Loop) Stop() {
	_ = l.cmd.Process.Signal(os.Interrupt)
	<-l.done
	_ = l.cmd.Wait()
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
