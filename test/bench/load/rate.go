package load

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// Rate workloads (rate's --workload).
const (
	// RateConnect is new connections: each worker loops connect, 1-byte
	// request and echo, close (to the echo port).
	RateConnect = "connect"
	// RateStream is bulk TCP: each worker writes 64 KiB buffers on one
	// connection (to the sink port) for the whole phase.
	RateStream = "stream"
)

// ErrStartedLate is in the error of a rate client that started after its
// first phase had ended: the machine was too busy for the lead the
// caller gave, which can measure again with a longer one.
const ErrStartedLate = "--start-at is in the past"

// streamBuffer is the size of each write of the stream workload.
const streamBuffer = 64 << 10

// RateResult is the JSON document of the rate workload.
type RateResult struct {
	// Workload is results.ConnectRate or results.Stream.
	Workload string `json:"workload"`
	// Workers is the number of concurrent workers in this client.
	Workers int `json:"workers"`
	// PhaseSeconds is the planned length of a phase, in seconds.
	PhaseSeconds float64 `json:"phaseSeconds"`
	// StartAt is the planned start of phase 0, Unix nanoseconds.
	StartAt int64 `json:"startAt"`
	// Phases has one entry per phase, in order.
	Phases []PhaseResult `json:"phases"`
}

// PhaseResult is one phase of a rate workload.
type PhaseResult struct {
	// Index is the phase number, from 0.
	Index int `json:"index"`
	// Target is results.TargetDirect or results.TargetService (phase
	// Index used target Index % len(targets)); Address its IP:port.
	Target  string `json:"target"`
	Address string `json:"address"`
	// Seconds is the time actually elapsed, from the workers' start
	// until the last of them stopped (an operation running at the
	// phase's end finishes, so this can exceed the planned length).
	Seconds float64 `json:"seconds"`
	// Ops is completed connections (connect), or bytes written that the
	// server's kernel acknowledged (stream; bytes still unacknowledged at
	// the phase's end are not counted, and are dropped by a reset).
	Ops int64 `json:"ops"`
	// Errors counts failed operations (connect) or failed connections
	// (stream).
	Errors int64 `json:"errors"`
	// FirstError is the text of the first error, empty if none.
	FirstError string `json:"firstError,omitempty"`
	// NodeCPUSeconds is the whole machine's busy CPU time over Seconds
	// (/proc/stat's user+nice+system+irq+softirq+steal), seconds.
	NodeCPUSeconds float64 `json:"nodeCpuSeconds"`
	// ProxyCPUSeconds is the --proxy-pids' summed utime+stime over
	// Seconds, seconds; a PID gone at the phase's start or end counts 0.
	ProxyCPUSeconds float64 `json:"proxyCpuSeconds"`
	// Missed says the phase never ran: an operation of the phase before
	// (one still running at its end always completes, up to --timeout)
	// outlasted this whole phase. Its Seconds and Ops are 0, so sums of
	// ops over seconds stay right; the other clients' same phase ran.
	Missed bool `json:"missed,omitempty"`
	// ProxyGone is set when one of the --proxy-pids was gone.
	ProxyGone bool `json:"proxyGone,omitempty"`
}

// RatePhases converts the phases to the results model, as repetition rep.
func (r *RateResult) RatePhases(rep int) []results.RatePhase {
	out := make([]results.RatePhase, len(r.Phases))
	for i, p := range r.Phases {
		out[i] = results.RatePhase{
			Workload: r.Workload, Rep: rep, Target: p.Target, Seconds: p.Seconds,
			Ops: p.Ops, Errors: p.Errors,
			NodeCPUSeconds: p.NodeCPUSeconds, ProxyCPUSeconds: p.ProxyCPUSeconds,
		}
	}
	return out
}

type rateConfig struct {
	workload string
	targets  []target
	workers  int
	phase    time.Duration
	phases   int
	startAt  time.Time
	pids     []int
	timeout  time.Duration
	procRoot string
}

func parseRateFlags(args []string) (rateConfig, error) {
	var c rateConfig
	var targets, pids string
	var startAt int64
	fs := newFlagSet("client " + WorkloadRate)
	fs.StringVar(&c.workload, "workload", "", "connect or stream")
	fs.StringVar(&targets, "targets", "", "DIRECT[,SERVICE]: phase k uses target k % count")
	fs.IntVar(&c.workers, "workers", 1, "concurrent workers (goroutines)")
	fs.DurationVar(&c.phase, "phase", 500*time.Millisecond, "length of a phase")
	fs.IntVar(&c.phases, "phases", 2, "number of phases")
	fs.Int64Var(&startAt, "start-at", 0, "Unix nanoseconds at which phase 0 starts (0: now); phase k runs from start+k*phase to start+(k+1)*phase")
	fs.StringVar(&pids, "proxy-pids", "", "comma-separated PIDs whose CPU time is measured per phase")
	fs.DurationVar(&c.timeout, "timeout", time.Second, "timeout of one connect, request or answer")
	if err := parseFlags(fs, args); err != nil {
		return c, err
	}
	bad := func(format string, a ...any) (rateConfig, error) {
		return c, usageError(fs, fmt.Errorf(format, a...))
	}
	switch c.workload {
	case RateConnect, RateStream:
	case "":
		return bad("--workload is required (connect or stream)")
	default:
		return bad("--workload must be connect or stream, not %q", c.workload)
	}
	var err error
	if c.targets, err = parseTargets(targets, 2); err != nil {
		return c, usageError(fs, err)
	}
	if c.workers < 1 {
		return bad("--workers must be at least 1, not %d", c.workers)
	}
	if c.phase <= 0 {
		return bad("--phase must be positive, not %v", c.phase)
	}
	if c.phases < 1 {
		return bad("--phases must be at least 1, not %d", c.phases)
	}
	if c.timeout <= 0 {
		return bad("--timeout must be positive, not %v", c.timeout)
	}
	if startAt < 0 {
		return bad("--start-at must be Unix nanoseconds, not %d", startAt)
	}
	if startAt > 0 {
		c.startAt = time.Unix(0, startAt)
	}
	if pids != "" {
		for _, s := range strings.Split(pids, ",") {
			pid, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil || pid < 1 {
				return bad("--proxy-pids: %q is not a PID", s)
			}
			c.pids = append(c.pids, pid)
		}
	}
	c.procRoot = "/proc"
	return c, nil
}

// workerResult is what one worker did in a phase.
type workerResult struct {
	ops, errors int64
	firstError  error
}

func (w *workerResult) fail(err error) {
	w.errors++
	if w.firstError == nil {
		w.firstError = err
	}
}

func runRate(ctx context.Context, c rateConfig) (*RateResult, error) {
	workload := results.ConnectRate
	if c.workload == RateStream {
		workload = results.Stream
	}
	if c.startAt.IsZero() {
		c.startAt = time.Now()
	}
	res := &RateResult{Workload: workload, Workers: c.workers, PhaseSeconds: c.phase.Seconds(), StartAt: c.startAt.UnixNano()}
	buf := make([]byte, streamBuffer) // only read by writers: shared
	for k := range c.phases {
		t := c.targets[k%len(c.targets)]
		start := c.startAt.Add(time.Duration(k) * c.phase)
		end := start.Add(c.phase)
		if err := sleepUntil(ctx, start); err != nil {
			return nil, fmt.Errorf("rate stopped before phase %d: %w", k, err)
		}
		if !time.Now().Before(end) {
			if k == 0 {
				return nil, fmt.Errorf("phase 0 ended at %s before it could start: %s", end.Format(time.RFC3339Nano), ErrStartedLate)
			}
			res.Phases = append(res.Phases, PhaseResult{Index: k, Target: t.name, Address: t.addr.String(), Missed: true,
				FirstError: "missed: the phase before overran it"})
			continue
		}
		before, err := takeCPUSnapshot(c.procRoot, c.pids)
		if err != nil {
			return nil, err
		}
		t0 := time.Now()
		ws := make([]workerResult, c.workers)
		var wg sync.WaitGroup
		for i := range ws {
			wg.Go(func() {
				if c.workload == RateStream {
					streamWorker(ctx, t.addr, end, c.timeout, buf, &ws[i])
				} else {
					connectWorker(ctx, t.addr, end, c.timeout, &ws[i])
				}
			})
		}
		wg.Wait()
		elapsed := time.Since(t0)
		after, err := takeCPUSnapshot(c.procRoot, c.pids)
		if err != nil {
			return nil, err
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("rate stopped in phase %d: %w", k, err)
		}
		p := PhaseResult{Index: k, Target: t.name, Address: t.addr.String(), Seconds: elapsed.Seconds()}
		p.NodeCPUSeconds, p.ProxyCPUSeconds, p.ProxyGone = after.since(before)
		for _, w := range ws {
			p.Ops += w.ops
			p.Errors += w.errors
			if p.FirstError == "" && w.firstError != nil {
				p.FirstError = w.firstError.Error()
			}
		}
		res.Phases = append(res.Phases, p)
	}
	return res, nil
}

// connectWorker runs transactions until end: none starts at or after end;
// one running at end completes and counts.
func connectWorker(ctx context.Context, addr netip.AddrPort, end time.Time, timeout time.Duration, w *workerResult) {
	for ctx.Err() == nil && time.Now().Before(end) {
		if _, _, err := crrOnce(addr, timeout); err != nil {
			w.fail(err)
			continue
		}
		w.ops++
	}
}

// streamWorker writes on one connection until end and counts the bytes the
// server acknowledged.
func streamWorker(ctx context.Context, addr netip.AddrPort, end time.Time, timeout time.Duration, buf []byte, w *workerResult) {
	d := net.Dialer{Timeout: timeout}
	dctx, cancel := context.WithDeadline(ctx, end)
	defer cancel()
	c, err := d.DialContext(dctx, "tcp", addr.String())
	if err != nil {
		w.fail(fmt.Errorf("connecting to %s: %w", addr, err))
		return
	}
	tc := c.(*net.TCPConn)
	defer func() {
		// Reset rather than close: unacknowledged bytes are not counted
		// and must not load the next phase, which may measure the other
		// target.
		_ = tc.SetLinger(0)
		tc.Close()
	}()
	// The deadline ends the phase; the context's end moves it to now.
	_ = tc.SetWriteDeadline(end)
	stop := context.AfterFunc(dctx, func() { _ = tc.SetWriteDeadline(time.Now()) })
	defer stop()
	var written int64
	for {
		n, err := tc.Write(buf)
		written += int64(n)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			w.fail(fmt.Errorf("writing to %s: %w", addr, err))
			break
		}
	}
	unacked, err := unackedBytes(tc)
	if err != nil {
		w.fail(err)
		return
	}
	w.ops += written - unacked
}

// unackedBytes is the bytes of the socket's send queue the peer has not
// acknowledged yet (SIOCOUTQ).
func unackedBytes(tc *net.TCPConn) (int64, error) {
	rc, err := tc.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("reading the send queue: %w", err)
	}
	var n int
	var ioErr error
	if err := rc.Control(func(fd uintptr) { n, ioErr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) }); err != nil {
		return 0, fmt.Errorf("reading the send queue: %w", err)
	}
	if ioErr != nil {
		return 0, fmt.Errorf("reading the send queue (SIOCOUTQ): %w", ioErr)
	}
	return int64(n), nil
}

// sleepUntil waits until t or ctx's end.
func sleepUntil(ctx context.Context, t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
