package load

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Client workloads: ClientMain's args[0].
const (
	// WorkloadCRR: connect, 1-byte request and echo, close, per sample
	// (LatencyResult with results.TCPConnect and results.TCPCRR).
	WorkloadCRR = "crr"
	// WorkloadRR: 1-byte request and echo on one kept connection per
	// target (LatencyResult with results.TCPRR).
	WorkloadRR = "rr"
	// WorkloadUDP: a 16-byte datagram and its echo (LatencyResult with
	// results.UDPConnected or results.UDPUnconnected).
	WorkloadUDP = "udp"
	// WorkloadRate: phased connect or stream load (RateResult).
	WorkloadRate = "rate"
	// WorkloadWatch: the name behind an address, as it changes (lines,
	// not JSON; see ClientMain).
	WorkloadWatch = "watch"
	// WorkloadPoll: when each target first accepts a connection
	// (PollResult).
	WorkloadPoll = "poll"
)

// ClientMain runs one client workload (args[0] is its name, the rest its
// flags) and writes its result as one JSON document on stdout: a
// LatencyResult for crr, rr and udp, a RateResult for rate, a PollResult
// for poll. It stops promptly when ctx ends or SIGTERM/SIGINT arrives;
// a workload stopped that way returns an error and writes nothing, except
// watch.
//
// watch is the exception to JSON: it prints, as they happen, one line per
// change of the name it gets,
//
//	<unix nanoseconds> <name>
//	<unix nanoseconds> !error <text>
//
// the second once per run of failed attempts (the name is printed again
// after one, even if unchanged). The time is the start of the attempt that
// saw it. Each line is a single write. watch ends after --duration, or when
// stopped, without error.
func ClientMain(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return errors.New("client: missing the workload: crr, rr, udp, rate, watch or poll")
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, os.Interrupt)
	defer stop()
	var res any
	var err error
	switch name, flags := args[0], args[1:]; name {
	case WorkloadCRR:
		res, err = runCRR(ctx, flags)
	case WorkloadRR:
		res, err = runRR(ctx, flags)
	case WorkloadUDP:
		res, err = runUDP(ctx, flags)
	case WorkloadRate:
		var c rateConfig
		if c, err = parseRateFlags(flags); err == nil {
			res, err = runRate(ctx, c)
		}
	case WorkloadPoll:
		var c pollConfig
		if c, err = parsePollFlags(flags); err == nil {
			res, err = runPoll(ctx, c)
		}
	case WorkloadWatch:
		c, err := parseWatchFlags(flags)
		if err != nil {
			return err
		}
		return runWatch(ctx, c, stdout)
	default:
		return fmt.Errorf("client: unknown workload %q: want crr, rr, udp, rate, watch or poll", name)
	}
	if err != nil {
		return err
	}
	if err := json.NewEncoder(stdout).Encode(res); err != nil {
		return fmt.Errorf("writing the %s result: %w", args[0], err)
	}
	return nil
}
