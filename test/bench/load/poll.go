package load

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// PollResult is the JSON document of the poll workload.
type PollResult struct {
	// StartNanos is when polling started, Unix nanoseconds.
	StartNanos int64 `json:"startNanos"`
	// Targets has one entry per --targets address, in that order.
	Targets []PollTarget `json:"targets"`
	// AllReached is set when every target accepted a connection before
	// --timeout.
	AllReached bool `json:"allReached"`
}

// PollTarget is one polled address.
type PollTarget struct {
	// Address is the IP:port polled.
	Address string `json:"address"`
	// FirstSuccessNanos is when the first connection to it was
	// established, Unix nanoseconds; 0 if none was before --timeout.
	FirstSuccessNanos int64 `json:"firstSuccessNanos"`
	// Attempts is the number of connections tried.
	Attempts int `json:"attempts"`
	// LastError is the last failed attempt's error, empty if none.
	LastError string `json:"lastError,omitempty"`
}

type pollConfig struct {
	targets        []target
	timeout        time.Duration
	connectTimeout time.Duration
	retry          time.Duration
}

func parsePollFlags(args []string) (pollConfig, error) {
	var c pollConfig
	var targets string
	fs := newFlagSet("client " + WorkloadPoll)
	fs.StringVar(&targets, "targets", "", "comma-separated IP:port list, any number")
	fs.DurationVar(&c.timeout, "timeout", 60*time.Second, "give up on the targets not reached by then")
	fs.DurationVar(&c.connectTimeout, "connect-timeout", 50*time.Millisecond, "timeout of one connect")
	fs.DurationVar(&c.retry, "retry", 10*time.Millisecond, "an attempt starts this long after the one before started (or when it ends, if later)")
	if err := parseFlags(fs, args); err != nil {
		return c, err
	}
	var err error
	if c.targets, err = parseTargets(targets, 0); err != nil {
		return c, usageError(fs, err)
	}
	if c.timeout <= 0 || c.connectTimeout <= 0 || c.retry <= 0 {
		return c, usageError(fs, errors.New("--timeout, --connect-timeout and --retry must be positive"))
	}
	return c, nil
}

// runPoll connects to every target in parallel until each accepted a
// connection once, or --timeout.
func runPoll(ctx context.Context, c pollConfig) (*PollResult, error) {
	start := time.Now()
	res := &PollResult{StartNanos: start.UnixNano(), Targets: make([]PollTarget, len(c.targets))}
	pctx, cancel := context.WithDeadline(ctx, start.Add(c.timeout))
	defer cancel()
	var wg sync.WaitGroup
	for i, t := range c.targets {
		pt := &res.Targets[i]
		pt.Address = t.addr.String()
		wg.Go(func() { pollOne(pctx, t.addr.String(), c, pt) })
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("poll stopped: %w", err)
	}
	res.AllReached = true
	for _, t := range res.Targets {
		if t.FirstSuccessNanos == 0 {
			res.AllReached = false
		}
	}
	return res, nil
}

func pollOne(ctx context.Context, addr string, c pollConfig, pt *PollTarget) {
	d := net.Dialer{Timeout: c.connectTimeout}
	for ctx.Err() == nil {
		attempt := time.Now()
		pt.Attempts++
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			pt.FirstSuccessNanos = time.Now().UnixNano()
			conn.Close()
			return
		}
		if ctx.Err() == nil {
			pt.LastError = err.Error()
		}
		if sleepUntil(ctx, attempt.Add(c.retry)) != nil {
			return
		}
	}
}
