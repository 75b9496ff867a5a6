package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/load"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/utils/localcluster"
)

// client runs a workload of the benchmark binary in a client pod and
// decodes its JSON result into v.
func (r *runner) client(ctx context.Context, pod *localcluster.Pod, v any, args ...string) error {
	out, err := pod.Output(ctx, append([]string{r.cfg.Self, "client"}, args...)...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("client %s in %s: decoding its result: %w", args[0], pod.Name, err)
	}
	return nil
}

// crr runs one repetition of the new-connection workload: its connect
// times and whole transactions.
func (r *runner) crr(ctx context.Context, p path, viaService bool) (map[string]results.Rep, error) {
	var res load.LatencyResult
	if err := r.client(ctx, p.client, &res, "crr",
		"--targets", strings.Join(p.targets(load.EchoPort, viaService), ","),
		"--count", strconv.Itoa(r.cfg.LatencyPairs)); err != nil {
		return nil, err
	}
	out := map[string]results.Rep{}
	for _, w := range []string{results.TCPConnect, results.TCPCRR} {
		rep, ok := res.Rep(w)
		if !ok {
			return out, fmt.Errorf("crr gave no %s", w)
		}
		out[w] = rep
	}
	return out, nil
}

// simpleLatency runs one repetition of rr or a udp workload.
func (r *runner) simpleLatency(ctx context.Context, p path, workload string, viaService bool) (results.Rep, error) {
	var args []string
	switch workload {
	case results.TCPRR:
		args = []string{"rr", "--targets", strings.Join(p.targets(load.EchoPort, viaService), ",")}
	case results.UDPConnected, results.UDPUnconnected:
		args = []string{"udp", "--socket", strings.TrimPrefix(workload, "udp-"),
			"--targets", strings.Join(p.targets(load.UDPEchoPort, viaService), ",")}
	default:
		return results.Rep{}, fmt.Errorf("unknown latency workload %q", workload)
	}
	var res load.LatencyResult
	if err := r.client(ctx, p.client, &res, append(args, "--count", strconv.Itoa(r.cfg.LatencyPairs))...); err != nil {
		return results.Rep{}, err
	}
	rep, ok := res.Rep(workload)
	if !ok {
		return rep, fmt.Errorf("%s gave no %s", args[0], workload)
	}
	return rep, nil
}

// rate runs one repetition of a rate workload from every client pod in
// lock step: the phases start at the same instant in every pod, so that
// every core is loaded and the machine's CPU time in a phase belongs to
// that phase's target.
func (r *runner) rate(ctx context.Context, workload string, rep int, viaService bool, pids map[string]int) ([]results.RatePhase, error) {
	kind, port, workers := "connect", load.EchoPort, r.cfg.ConnectWorkers
	if workload == results.Stream {
		kind, port, workers = "stream", load.SinkPort, 1
	}
	phases := r.cfg.RatePhases
	if !viaService {
		phases /= 2 // direct only: every phase is a direct one
	}
	var pidList []string
	for _, pid := range pids {
		pidList = append(pidList, strconv.Itoa(pid))
	}
	res := make([]load.RateResult, len(r.paths))
	// Time for every client process to start before the first phase (the
	// client fails, rather than measure a short phase, if it starts late).
	// A machine busy enough to start a client later than that gets the
	// measurement again with a longer lead, rather than a failed cell.
	for lead := time.Second; ; lead *= 3 {
		startAt := time.Now().Add(lead)
		var fns []func() error
		for i, p := range r.paths {
			fns = append(fns, func() error {
				args := []string{"rate", "--workload", kind,
					"--targets", strings.Join(p.targets(port, viaService), ","),
					"--workers", strconv.Itoa(workers),
					"--phase", r.cfg.RatePhase.String(), "--phases", strconv.Itoa(phases),
					"--start-at", strconv.FormatInt(startAt.UnixNano(), 10)}
				if len(pidList) > 0 {
					args = append(args, "--proxy-pids", strings.Join(pidList, ","))
				}
				return r.client(ctx, p.client, &res[i], args...)
			})
		}
		err := parallel(fns...)
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), load.ErrStartedLate) || lead >= 9*time.Second {
			return nil, err
		}
		r.prog.note("a client started after its first phase ended (lead %s): measuring again with a longer lead", lead)
	}
	// Sum the clients' work phase by phase. The phase's length and the
	// machine's CPU time are the same window seen by each client: they
	// are taken from the client whose phase ran longest (a client whose
	// phase was missed, its transaction before outlasting it, ran none
	// of it and counts no work in it).
	var out []results.RatePhase
	for k := range res[0].Phases {
		var rp results.RatePhase
		for i, cr := range res {
			if k >= len(cr.Phases) {
				return out, fmt.Errorf("the clients measured different phases (%s: %d)", r.paths[i].client.Name, len(cr.Phases))
			}
			ph := cr.Phases[k]
			if ph.Seconds > rp.Seconds {
				rp = results.RatePhase{Workload: workload, Rep: rep, Target: ph.Target, Seconds: ph.Seconds,
					NodeCPUSeconds: ph.NodeCPUSeconds, ProxyCPUSeconds: ph.ProxyCPUSeconds, Ops: rp.Ops, Errors: rp.Errors}
			}
			rp.Ops += ph.Ops
			rp.Errors += ph.Errors
		}
		if rp.Seconds == 0 {
			continue // every client missed it
		}
		out = append(out, rp)
	}
	return out, nil
}

// poll waits until the pod reaches every target and returns when it
// reached the last of them.
func (r *runner) poll(ctx context.Context, p path, targets []string, timeout time.Duration) (time.Time, error) {
	if timeout <= 0 {
		timeout = time.Second
	}
	var res load.PollResult
	err := r.client(ctx, p.client, &res, "poll", "--targets", strings.Join(targets, ","), "--timeout", timeout.String())
	if err != nil {
		return time.Time{}, err
	}
	var last time.Time
	var missing []string
	for _, t := range res.Targets {
		if t.FirstSuccessNanos == 0 {
			missing = append(missing, t.Address)
			continue
		}
		if at := time.Unix(0, t.FirstSuccessNanos); at.After(last) {
			last = at
		}
	}
	if len(missing) > 0 {
		return last, fmt.Errorf("%s never reached %s within %s", p.client.Name, strings.Join(missing, ", "), timeout)
	}
	return last, nil
}

// watcher follows the lines of a running watch client: each change of
// the endpoint answering behind an address, with when it was seen.
type watcher struct {
	cmd   *exec.Cmd
	done  func()
	lines chan watchLine
	wg    sync.WaitGroup
}

type watchLine struct {
	at   time.Time
	name string // "" for an error line
	text string
}

func (r *runner) startWatch(ctx context.Context, p path, target string) (*watcher, error) {
	cmd, done, err := p.client.Command(ctx, r.cfg.Self, "client", "watch", "--target", target)
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		done()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		done()
		return nil, fmt.Errorf("starting the watch client in %s: %w", p.client.Name, err)
	}
	w := &watcher{cmd: cmd, done: done, lines: make(chan watchLine, 1024)}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		defer close(w.lines)
		w.read(stdout)
	}()
	return w, nil
}

// read parses `<unix ns> <name>` and `<unix ns> !error <text>` lines.
func (w *watcher) read(r io.Reader) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		ns, rest, ok := strings.Cut(s.Text(), " ")
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(ns, 10, 64)
		if err != nil {
			continue
		}
		l := watchLine{at: time.Unix(0, n), text: rest}
		if !strings.HasPrefix(rest, "!error") {
			l.name = rest
		}
		w.lines <- l
	}
}

// next returns the next endpoint name seen.
func (w *watcher) next(ctx context.Context, timeout time.Duration) (string, error) {
	l, err := w.until(ctx, timeout, func(l watchLine) bool { return l.name != "" })
	return l.name, err
}

// waitFor returns when name was first seen.
func (w *watcher) waitFor(ctx context.Context, name string, timeout time.Duration) (time.Time, error) {
	l, err := w.until(ctx, timeout, func(l watchLine) bool { return l.name == name })
	return l.at, err
}

func (w *watcher) until(ctx context.Context, timeout time.Duration, ok func(watchLine) bool) (watchLine, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case l, open := <-w.lines:
			if !open {
				return l, errors.New("the watch client exited")
			}
			if l.name == "" {
				lastErr = l.text
			}
			if ok(l) {
				return l, nil
			}
		case <-t.C:
			return watchLine{}, fmt.Errorf("nothing after %s (last error: %q)", timeout, lastErr)
		case <-ctx.Done():
			return watchLine{}, ctx.Err()
		}
	}
}

func (w *watcher) stop() {
	if w.cmd.Process != nil {
		_ = w.cmd.Process.Kill()
	}
	// The reader ends at the pipe's end; drain what it still sends, and
	// only then wait for the process (Wait closes the pipe).
	for range w.lines {
	}
	w.wg.Wait()
	_ = w.cmd.Wait()
	w.done()
}
