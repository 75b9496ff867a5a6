package load

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// LatencyResult is the JSON document of the crr, rr and udp workloads.
type LatencyResult struct {
	// Workload is the client workload that ran: "crr", "rr" or "udp".
	Workload string `json:"workload"`
	// Count is the number of recorded iterations asked for (each
	// iteration measures every target once); Warmup the unrecorded ones
	// before them.
	Count  int `json:"count"`
	Warmup int `json:"warmup"`
	// Series holds one entry per measured quantity: crr gives
	// results.TCPConnect and results.TCPCRR, rr results.TCPRR, udp
	// results.UDPConnected or results.UDPUnconnected.
	Series []Series `json:"series"`
}

// Series is one measured quantity, per target.
type Series struct {
	// Workload is the results package's name for it (results.TCPConnect...).
	Workload string `json:"workload"`
	// Targets has one entry per --targets address, in that order.
	Targets []TargetSamples `json:"targets"`
}

// TargetSamples is what one target gave.
type TargetSamples struct {
	// Target is results.TargetDirect (the first address) or
	// results.TargetService (the second).
	Target string `json:"target"`
	// Address is the IP:port measured.
	Address string `json:"address"`
	// Samples are latencies in microseconds, in the order taken.
	Samples []float64 `json:"samples"`
	// Errors counts recorded iterations whose operation failed for this
	// target (they have no sample). In crr a failure anywhere in the
	// transaction counts in both series and records in neither.
	Errors int `json:"errors"`
	// FirstError is the text of the first such failure, empty if none.
	FirstError string `json:"firstError,omitempty"`
}

// Rep returns the series named workload as a results.Rep: the first
// target's samples as Direct, the second's (if any) as Service.
func (r *LatencyResult) Rep(workload string) (results.Rep, bool) {
	for _, s := range r.Series {
		if s.Workload != workload {
			continue
		}
		var rep results.Rep
		for _, t := range s.Targets {
			switch t.Target {
			case results.TargetDirect:
				rep.Direct, rep.DirectErrors = t.Samples, t.Errors
			case results.TargetService:
				rep.Service, rep.ServiceErrors = t.Samples, t.Errors
			}
		}
		return rep, true
	}
	return results.Rep{}, false
}

// latencyFlags are the flags every latency workload shares.
type latencyFlags struct {
	targets string
	count   int
	warmup  int
	timeout time.Duration
}

func (f *latencyFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.targets, "targets", "", "DIRECT[,SERVICE]: pod IP:port, then ClusterIP:port")
	fs.IntVar(&f.count, "count", 1000, "recorded iterations; each measures every target once")
	fs.IntVar(&f.warmup, "warmup", 20, "unrecorded iterations before them")
	fs.DurationVar(&f.timeout, "timeout", time.Second, "timeout of one operation; a timed-out one counts an error")
}

func (f *latencyFlags) check(fs *flag.FlagSet) ([]target, error) {
	ts, err := parseTargets(f.targets, 2)
	if err != nil {
		return nil, usageError(fs, err)
	}
	if f.count < 1 {
		return nil, usageError(fs, fmt.Errorf("--count must be at least 1, not %d", f.count))
	}
	if f.warmup < 0 {
		return nil, usageError(fs, fmt.Errorf("--warmup must not be negative, not %d", f.warmup))
	}
	if f.timeout <= 0 {
		return nil, usageError(fs, fmt.Errorf("--timeout must be positive, not %v", f.timeout))
	}
	return ts, nil
}

// alternate runs warmup+count iterations, each calling op once per target,
// in list order on even iterations and reversed on odd ones. op returns one
// duration per series name.
func alternate(ctx context.Context, workload string, ts []target, f latencyFlags, series []string, op func(ti int) ([]time.Duration, error)) (*LatencyResult, error) {
	res := &LatencyResult{Workload: workload, Count: f.count, Warmup: f.warmup}
	for _, name := range series {
		s := Series{Workload: name}
		for _, t := range ts {
			s.Targets = append(s.Targets, TargetSamples{Target: t.name, Address: t.addr.String(), Samples: make([]float64, 0, f.count)})
		}
		res.Series = append(res.Series, s)
	}
	for i := range f.warmup + f.count {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("%s stopped after %d of %d iterations: %w", workload, i, f.warmup+f.count, err)
		}
		for j := range ts {
			ti := j
			if i%2 == 1 {
				ti = len(ts) - 1 - j
			}
			ds, err := op(ti)
			if i < f.warmup {
				continue
			}
			for si := range res.Series {
				t := &res.Series[si].Targets[ti]
				if err != nil {
					t.Errors++
					if t.FirstError == "" {
						t.FirstError = err.Error()
					}
					continue
				}
				t.Samples = append(t.Samples, micros(ds[si]))
			}
		}
	}
	return res, nil
}

// parseLatencyFlags parses the flags every latency workload shares, plus
// the workload's own that extra registers, and checks the targets.
func parseLatencyFlags(workload string, args []string, extra func(*flag.FlagSet)) (latencyFlags, []target, error) {
	var f latencyFlags
	fs := newFlagSet("client " + workload)
	f.register(fs)
	if extra != nil {
		extra(fs)
	}
	if err := parseFlags(fs, args); err != nil {
		return f, nil, err
	}
	ts, err := f.check(fs)
	return f, ts, err
}

func runCRR(ctx context.Context, args []string) (*LatencyResult, error) {
	f, ts, err := parseLatencyFlags(WorkloadCRR, args, nil)
	if err != nil {
		return nil, err
	}
	return alternate(ctx, WorkloadCRR, ts, f, []string{results.TCPConnect, results.TCPCRR}, func(ti int) ([]time.Duration, error) {
		c, total, err := crrOnce(ts[ti].addr, f.timeout)
		return []time.Duration{c, total}, err
	})
}

func runRR(ctx context.Context, args []string) (*LatencyResult, error) {
	f, ts, err := parseLatencyFlags(WorkloadRR, args, nil)
	if err != nil {
		return nil, err
	}
	// One kept connection per target; one that fails is closed and
	// opened again at that target's next iteration, so that a lost
	// answer cannot shift every later one.
	fds := make([]int, len(ts))
	for i := range fds {
		fds[i] = -1
	}
	defer func() {
		for _, fd := range fds {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	}()
	return alternate(ctx, WorkloadRR, ts, f, []string{results.TCPRR}, func(ti int) ([]time.Duration, error) {
		if fds[ti] < 0 {
			fd, err := newSocket(ts[ti].addr, unix.SOCK_STREAM, f.timeout)
			if err != nil {
				return nil, err
			}
			if err := connectFD(fd, ts[ti].addr, f.timeout); err != nil {
				unix.Close(fd)
				return nil, err
			}
			// A request is sent only once the previous answer is
			// in, so Nagle would never hold one back; set it anyway
			// to rule out its interplay with delayed ACKs.
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
				unix.Close(fd)
				return nil, fmt.Errorf("setting TCP_NODELAY: %w", err)
			}
			fds[ti] = fd
		}
		start := time.Now()
		if err := exchange1(fds[ti]); err != nil {
			unix.Close(fds[ti])
			fds[ti] = -1
			return nil, fmt.Errorf("%s: %w", ts[ti].addr, err)
		}
		return []time.Duration{time.Since(start)}, nil
	})
}

// udpDatagramSize is the size of a udp request: a sequence number and
// padding, about a small DNS query's size class.
const udpDatagramSize = 16

func runUDP(ctx context.Context, args []string) (*LatencyResult, error) {
	var mode string
	var fs *flag.FlagSet // for the usage errors below
	f, ts, err := parseLatencyFlags(WorkloadUDP, args, func(set *flag.FlagSet) {
		fs = set
		fs.StringVar(&mode, "socket", "connected", "connected (one connect()ed socket per target) or unconnected (one socket, sendto each target)")
	})
	if err != nil {
		return nil, err
	}
	var series string
	var fds []int // connected: one per target; unconnected: one shared
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	switch mode {
	case "connected":
		series = results.UDPConnected
		for _, t := range ts {
			fd, err := newSocket(t.addr, unix.SOCK_DGRAM, f.timeout)
			if err != nil {
				return nil, err
			}
			fds = append(fds, fd)
			if err := connectFD(fd, t.addr, f.timeout); err != nil {
				return nil, err
			}
		}
	case "unconnected":
		series = results.UDPUnconnected
		fd, err := newSocket(ts[0].addr, unix.SOCK_DGRAM, f.timeout)
		if err != nil {
			return nil, err
		}
		fds = append(fds, fd)
		for _, t := range ts[1:] {
			if t.addr.Addr().Unmap().Is4() != ts[0].addr.Addr().Unmap().Is4() {
				return nil, usageError(fs, errors.New("--socket=unconnected needs targets of one address family"))
			}
		}
	default:
		return nil, usageError(fs, fmt.Errorf("--socket must be connected or unconnected, not %q", mode))
	}

	var seq uint64
	buf := make([]byte, udpDatagramSize)
	in := make([]byte, 2048)
	return alternate(ctx, WorkloadUDP, ts, f, []string{series}, func(ti int) ([]time.Duration, error) {
		seq++
		binary.BigEndian.PutUint64(buf, seq)
		var fd int
		var sa unix.Sockaddr
		if mode == "connected" {
			fd = fds[ti]
		} else {
			fd, sa = fds[0], sockaddr(ts[ti].addr)
		}
		start := time.Now()
		deadline := start.Add(f.timeout)
		var err error
		for {
			if sa != nil {
				err = unix.Sendto(fd, buf, 0, sa)
			} else {
				_, err = unix.Write(fd, buf)
			}
			if !errors.Is(err, unix.EINTR) {
				break
			}
		}
		if err != nil {
			// On a connected socket an earlier ICMP error (port
			// unreachable) is reported by the next call.
			return nil, fmt.Errorf("sending to %s: %w", ts[ti].addr, err)
		}
		for {
			n, err := unix.Read(fd, in)
			switch {
			case errors.Is(err, unix.EINTR):
				continue
			case errors.Is(err, unix.EAGAIN):
				return nil, fmt.Errorf("waiting for the echo from %s: %w", ts[ti].addr, errTimeout)
			case err != nil:
				return nil, fmt.Errorf("waiting for the echo from %s: %w", ts[ti].addr, err)
			}
			if n == udpDatagramSize && binary.BigEndian.Uint64(in) == seq {
				return []time.Duration{time.Since(start)}, nil
			}
			// A stale echo (of a request that timed out): skip it.
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("waiting for the echo from %s: %w", ts[ti].addr, errTimeout)
			}
		}
	})
}
