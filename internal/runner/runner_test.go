package runner

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

const (
	defMin   = 100 * time.Millisecond
	defMax   = 30 * time.Second
	defRetry = time.Second

	// never stands for "waiting without a deadline" in harness.idle.
	never time.Duration = -1

	// stateTimeout bounds how long the harness waits, in real time, for the
	// runner to reach a state. It only turns a hang into a failure; no
	// assertion depends on how fast the runner is.
	stateTimeout = 30 * time.Second
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

var errSync = errors.New("sync failed")

// harness drives one Runner on a fake clock. fn records the fake time of each
// run relative to t0.
type harness struct {
	t      *testing.T
	clk    *clocktesting.FakeClock
	r      *Runner
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	runs     []time.Duration
	results  []error // result of run i; nil past the end
	hold     bool    // when set, fn blocks until release or ctx is done
	release  chan struct{}
	blocked  atomic.Bool // fn is blocked in hold, its start recorded
	active   atomic.Int32
	maxAlive atomic.Int32
}

type config struct {
	min, max, retry time.Duration
	burst           int
	results         []error
}

func newHarness(t *testing.T, c config) *harness {
	t.Helper()
	h := &harness{
		t:       t,
		clk:     clocktesting.NewFakeClock(t0),
		results: c.results,
		release: make(chan struct{}),
		done:    make(chan struct{}),
	}
	h.r = New("test", h.fn, c.min, c.max, c.retry, WithClock(h.clk), WithBurst(c.burst))
	t.Cleanup(func() {
		if h.cancel != nil {
			h.cancel()
			h.waitDone()
		}
		if n := h.maxAlive.Load(); n > 1 {
			t.Errorf("fn ran %d times concurrently", n)
		}
	})
	return h
}

func (h *harness) start() {
	h.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() {
		defer close(h.done)
		h.r.Run(ctx)
	}()
}

func (h *harness) fn(ctx context.Context) error {
	n := h.active.Add(1)
	defer h.active.Add(-1)
	for {
		m := h.maxAlive.Load()
		if n <= m || h.maxAlive.CompareAndSwap(m, n) {
			break
		}
	}

	h.mu.Lock()
	i := len(h.runs)
	h.runs = append(h.runs, h.clk.Since(t0))
	hold := h.hold
	var err error
	if i < len(h.results) {
		err = h.results[i]
	}
	h.mu.Unlock()

	if hold {
		h.blocked.Store(true)
		defer h.blocked.Store(false)
		select {
		case <-h.release:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return err
}

func (h *harness) setHold(hold bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.hold = hold
}

// poll waits until cond holds and fails the test, describing the runner's
// state, if it does not within stateTimeout.
func (h *harness) poll(what string, cond func() bool) {
	h.t.Helper()
	deadline := time.Now().Add(stateTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			idle, until := h.r.waitState()
			h.t.Fatalf("runner never reached state %q: idle=%v until=%v runs=%v",
				what, idle, until.Sub(t0), h.getRuns())
		}
		time.Sleep(time.Millisecond)
	}
}

// idle waits until the runner has taken every Trigger into account and is
// blocked waiting for its next run at t0+until (or without deadline for
// never).
// The fake clock must only be stepped in this state: the runner's timer then
// exists and measures from the current fake time.
func (h *harness) idle(until time.Duration) {
	h.t.Helper()
	want := time.Time{}
	if until != never {
		want = t0.Add(until)
	}
	h.poll("idle until "+until.String(), func() bool {
		idle, got := h.r.waitState()
		return idle && got.Equal(want)
	})
}

// running waits until fn has recorded its start and is blocked in hold.
func (h *harness) running() {
	h.t.Helper()
	h.poll("running", func() bool { return h.blocked.Load() })
}

func (h *harness) step(d time.Duration) { h.clk.Step(d) }

func (h *harness) trigger(n int) {
	for range n {
		h.r.Trigger()
	}
}

func (h *harness) getRuns() []time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.runs)
}

// expectRuns checks the fake start times of all runs so far.
func (h *harness) expectRuns(want ...time.Duration) {
	h.t.Helper()
	if got := h.getRuns(); !slices.Equal(got, want) {
		h.t.Fatalf("runs at %v, want %v", got, want)
	}
}

func (h *harness) waitDone() {
	h.t.Helper()
	select {
	case <-h.done:
	case <-time.After(stateTimeout):
		h.t.Fatal("Run did not return after its context was cancelled")
	}
}

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func TestRunner(t *testing.T) {
	defaults := config{min: defMin, max: defMax, retry: defRetry}
	tests := []struct {
		name   string
		config config
		script func(h *harness)
	}{
		{
			name:   "runs once immediately at start",
			config: defaults,
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.expectRuns(0)
			},
		},
		{
			name:   "nothing runs before Run and early triggers fold into the first run",
			config: defaults,
			script: func(h *harness) {
				h.trigger(5)
				h.step(time.Minute)
				h.expectRuns()
				h.start()
				h.idle(time.Minute + defMax)
				h.expectRuns(time.Minute)
			},
		},
		{
			name:   "periodic resync without triggers",
			config: defaults,
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.step(defMax - ms(1))
				h.idle(defMax)
				h.expectRuns(0)
				h.step(ms(1))
				h.idle(2 * defMax)
				h.step(defMax)
				h.idle(3 * defMax)
				h.expectRuns(0, defMax, 2*defMax)
			},
		},
		{
			name:   "trigger after minInterval runs at once",
			config: defaults,
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.step(ms(250))
				h.trigger(1)
				h.idle(ms(250) + defMax)
				h.expectRuns(0, ms(250))
			},
		},
		{
			name:   "trigger within minInterval is deferred to its end",
			config: defaults,
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.step(ms(40))
				h.trigger(1)
				h.idle(ms(100))
				h.expectRuns(0)
				h.step(ms(59))
				h.idle(ms(100))
				h.expectRuns(0)
				h.step(ms(1))
				h.idle(ms(100) + defMax)
				h.expectRuns(0, ms(100))
			},
		},
		{
			name:   "triggers while waiting coalesce into one run",
			config: defaults,
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.step(ms(10))
				h.trigger(10)
				h.idle(ms(100))
				h.step(ms(50))
				h.trigger(10)
				h.idle(ms(100))
				h.step(ms(40))
				h.idle(ms(100) + defMax)
				h.expectRuns(0, ms(100))
			},
		},
		{
			name:   "trigger during a run causes exactly one more run",
			config: defaults,
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.setHold(true)
				h.step(ms(500))
				h.trigger(1)
				h.running()
				h.trigger(10)
				h.setHold(false)
				h.release <- struct{}{}
				// The next run is deferred to the end of minInterval.
				h.idle(ms(600))
				h.expectRuns(0, ms(500))
				h.step(ms(100))
				h.idle(ms(600) + defMax)
				h.expectRuns(0, ms(500), ms(600))
			},
		},
		{
			name:   "trigger during a run longer than minInterval runs right after it",
			config: defaults,
			script: func(h *harness) {
				h.setHold(true)
				h.start()
				h.running()
				h.trigger(3)
				// Nothing waits on the clock while fn runs, so stepping is safe.
				h.step(time.Second)
				h.setHold(false)
				h.release <- struct{}{}
				h.idle(time.Second + defMax)
				h.expectRuns(0, time.Second)
			},
		},
		{
			name:   "error is retried after retryInterval",
			config: config{min: defMin, max: defMax, retry: defRetry, results: []error{errSync, errSync}},
			script: func(h *harness) {
				h.start()
				h.idle(defRetry)
				h.expectRuns(0)
				h.step(defRetry)
				h.idle(2 * defRetry)
				h.step(defRetry)
				// The third run succeeds: back to the periodic schedule.
				h.idle(2*defRetry + defMax)
				h.expectRuns(0, defRetry, 2*defRetry)
			},
		},
		{
			name:   "retry interval measured from the end of the failed run",
			config: config{min: defMin, max: defMax, retry: defRetry, results: []error{errSync}},
			script: func(h *harness) {
				h.setHold(true)
				h.start()
				h.running()
				h.step(ms(300))
				h.setHold(false)
				h.release <- struct{}{}
				h.idle(ms(300) + defRetry)
				h.step(defRetry)
				h.idle(ms(1300) + defMax)
				h.expectRuns(0, ms(1300))
			},
		},
		{
			name:   "retry is not sooner than minInterval",
			config: config{min: 5 * time.Second, max: defMax, retry: defRetry, results: []error{errSync}},
			script: func(h *harness) {
				h.start()
				h.idle(5 * time.Second)
				h.step(5 * time.Second)
				h.idle(5*time.Second + defMax)
				h.expectRuns(0, 5*time.Second)
			},
		},
		{
			name:   "retry is not later than maxInterval",
			config: config{min: defMin, max: defMax, retry: time.Hour, results: []error{errSync}},
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
			},
		},
		{
			name:   "trigger brings a retry forward to the minInterval boundary",
			config: config{min: defMin, max: defMax, retry: defRetry, results: []error{errSync}},
			script: func(h *harness) {
				h.start()
				h.idle(defRetry)
				h.step(ms(20))
				h.trigger(1)
				h.idle(ms(100))
				h.step(ms(80))
				h.idle(ms(100) + defMax)
				h.expectRuns(0, ms(100))
			},
		},
		{
			name:   "without maxInterval only triggers cause runs",
			config: config{min: defMin, retry: defRetry},
			script: func(h *harness) {
				h.start()
				h.idle(never)
				h.step(time.Hour)
				h.idle(never)
				h.expectRuns(0)
				h.trigger(1)
				h.idle(never)
				h.expectRuns(0, time.Hour)
			},
		},
		{
			name:   "without minInterval a trigger runs at once",
			config: config{max: defMax, retry: defRetry},
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.trigger(1)
				h.idle(defMax)
				h.trigger(1)
				h.idle(defMax)
				h.expectRuns(0, 0, 0)
			},
		},
		{
			name:   "with a burst, triggers run at once until the tokens run out",
			config: config{min: defMin, max: defMax, retry: defRetry, burst: 3},
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.step(ms(10))
				h.trigger(1)
				h.idle(ms(10) + defMax)
				h.step(ms(10))
				h.trigger(1)
				h.idle(ms(20) + defMax)
				h.expectRuns(0, ms(10), ms(20))
				// Three runs took the three tokens; the next is one
				// minInterval after the first.
				h.step(ms(10))
				h.trigger(5)
				h.idle(ms(100))
				h.step(ms(70))
				h.idle(ms(100) + defMax)
				h.expectRuns(0, ms(10), ms(20), ms(100))
			},
		},
		{
			name:   "a burst refills one token per minInterval, up to the burst",
			config: config{min: defMin, max: defMax, retry: defRetry, burst: 2},
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.trigger(1)
				h.idle(defMax)
				h.trigger(1)
				h.idle(ms(100))
				h.expectRuns(0, 0)
				h.step(ms(100))
				h.idle(ms(100) + defMax)
				h.expectRuns(0, 0, ms(100))
				// A second idle holds two tokens, not ten.
				h.step(time.Second)
				h.trigger(1)
				h.idle(ms(1100) + defMax)
				h.trigger(1)
				h.idle(ms(1100) + defMax)
				h.trigger(1)
				h.idle(ms(1200))
				h.expectRuns(0, 0, ms(100), ms(1100), ms(1100))
			},
		},
		{
			name:   "with a burst, a trigger during a run runs as soon as it ends",
			config: config{min: defMin, max: defMax, retry: defRetry, burst: 2},
			script: func(h *harness) {
				h.setHold(true)
				h.start()
				h.running()
				h.trigger(3)
				h.step(ms(10))
				h.setHold(false)
				h.release <- struct{}{}
				h.idle(ms(10) + defMax)
				h.expectRuns(0, ms(10))
			},
		},
		{
			name:   "with a burst, a failed run is still retried after retryInterval",
			config: config{min: defMin, max: defMax, retry: defRetry, burst: 10, results: []error{errSync}},
			script: func(h *harness) {
				h.start()
				h.idle(defRetry)
				h.step(defRetry)
				h.idle(defRetry + defMax)
				h.expectRuns(0, defRetry)
			},
		},
		{
			name:   "cancel while waiting stops Run",
			config: defaults,
			script: func(h *harness) {
				h.start()
				h.idle(defMax)
				h.cancel()
				h.waitDone()
				h.trigger(1)
				h.expectRuns(0)
			},
		},
		{
			name:   "cancel during a run stops Run without a retry",
			config: defaults,
			script: func(h *harness) {
				h.setHold(true)
				h.start()
				h.running()
				h.trigger(1)
				h.cancel()
				h.waitDone()
				h.expectRuns(0)
				if h.clk.HasWaiters() {
					t.Error("Run left a timer behind")
				}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.script(newHarness(t, tc.config))
		})
	}
}

// TestRunnerNoConcurrentRuns hammers Trigger from many goroutines while the
// fake clock moves, and checks that fn never runs twice at once (the harness
// checks at cleanup) and that the last trigger is always served.
func TestRunnerNoConcurrentRuns(t *testing.T) {
	h := newHarness(t, config{min: defMin, max: defMax, retry: defRetry, results: []error{nil, errSync, nil, errSync}})
	h.start()

	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				h.r.Trigger()
			}
		})
	}
	for range 20 {
		h.poll("idle", func() bool { idle, _ := h.r.waitState(); return idle })
		h.step(defMin)
	}
	wg.Wait()

	// Every trigger so far must be served by a run at or after the last one.
	last := h.clk.Since(t0)
	h.trigger(1)
	h.poll("served last trigger", func() bool {
		runs := h.getRuns()
		if len(runs) > 0 && runs[len(runs)-1] >= last {
			return true
		}
		if idle, _ := h.r.waitState(); idle {
			h.step(defMin)
		}
		return false
	})
}

func TestNewClampsIntervals(t *testing.T) {
	tests := []struct {
		name             string
		min, max         time.Duration
		wantMin, wantMax time.Duration
	}{
		{name: "valid", min: defMin, max: defMax, wantMin: defMin, wantMax: defMax},
		{name: "negative min", min: -time.Second, max: defMax, wantMin: 0, wantMax: defMax},
		{name: "max below min", min: time.Minute, max: time.Second, wantMin: time.Minute, wantMax: time.Minute},
		{name: "no max", min: defMin, max: 0, wantMin: defMin, wantMax: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := New("test", func(context.Context) error { return nil }, tc.min, tc.max, defRetry)
			if r.minInterval != tc.wantMin || r.maxInterval != tc.wantMax {
				t.Errorf("got min=%v max=%v, want min=%v max=%v", r.minInterval, r.maxInterval, tc.wantMin, tc.wantMax)
			}
		})
	}
}
