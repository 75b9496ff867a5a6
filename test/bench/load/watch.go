package load

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

type watchConfig struct {
	target   string
	interval time.Duration
	duration time.Duration
	timeout  time.Duration
}

func parseWatchFlags(args []string) (watchConfig, error) {
	var c watchConfig
	fs := newFlagSet("client " + WorkloadWatch)
	fs.StringVar(&c.target, "target", "", "IP:port of a name port (usually a ClusterIP's)")
	fs.DurationVar(&c.interval, "interval", time.Millisecond, "pause between two attempts")
	fs.DurationVar(&c.duration, "duration", 0, "how long to watch (0: until stopped)")
	fs.DurationVar(&c.timeout, "timeout", 100*time.Millisecond, "timeout of one attempt (connect, then the name)")
	if err := parseFlags(fs, args); err != nil {
		return c, err
	}
	ts, err := parseTargets(c.target, 1)
	if err != nil {
		return c, usageError(fs, fmt.Errorf("--target: %w", err))
	}
	c.target = ts[0].addr.String()
	if c.interval < 0 || c.duration < 0 || c.timeout <= 0 {
		return c, usageError(fs, errors.New("--interval and --duration must not be negative, --timeout must be positive"))
	}
	return c, nil
}

// runWatch asks the target for its name over and over and prints a line
// each time the answer changes (see ClientMain). Each line is one Write,
// so an unbuffered stdout (a pipe) carries it at once.
func runWatch(ctx context.Context, c watchConfig, stdout io.Writer) error {
	if c.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.duration)
		defer cancel()
	}
	last, inError := "", false
	for ctx.Err() == nil {
		// The time a connection was started is when the datapath chose
		// its endpoint (at connect(), or at the SYN a few microseconds
		// later): that is the time reported.
		at := time.Now()
		name, err := fetchName(ctx, c.target, c.timeout)
		if ctx.Err() != nil {
			break
		}
		var line string
		switch {
		case err != nil && !inError:
			inError = true
			line = fmt.Sprintf("%d !error %s\n", at.UnixNano(), oneLine(err.Error()))
		case err == nil && (inError || name != last):
			inError, last = false, name
			line = fmt.Sprintf("%d %s\n", at.UnixNano(), name)
		}
		if line != "" {
			if _, err := io.WriteString(stdout, line); err != nil {
				return fmt.Errorf("writing a watch line: %w", err)
			}
		}
		if err := sleepUntil(ctx, time.Now().Add(c.interval)); err != nil {
			break
		}
	}
	return nil
}

// fetchName connects to addr and reads the name line. It reads up to the
// server's close so that the server, which closes first, keeps the
// TIME_WAIT socket and the client's ports are never used up.
func fetchName(ctx context.Context, addr string, timeout time.Duration) (string, error) {
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return "", err
	}
	b, err := io.ReadAll(io.LimitReader(conn, 512))
	if err != nil {
		return "", fmt.Errorf("reading the name from %s: %w", addr, err)
	}
	name, _, ok := bytes.Cut(b, []byte("\n"))
	if !ok || len(name) == 0 {
		return "", fmt.Errorf("%s sent %q, not a name line", addr, b)
	}
	return string(name), nil
}

func oneLine(s string) string {
	return strings.ReplaceAll(s, "\n", " ")
}
