// Package runner runs a sync function with bounded frequency.
//
// A Runner is the bridge between change notifications (informer handlers
// calling Trigger) and the datapath sync (the function given to New). It
// guarantees, for one Runner:
//
//   - fn never runs concurrently with itself: all runs happen on the goroutine
//     that called Run.
//   - Run calls fn once as soon as it starts. Nothing runs before Run is
//     called, so the caller starts Run only once its informer caches have
//     synced; Triggers that arrive earlier are folded into that first run.
//   - Rate limit: runs start at most once per minInterval on average, and
//     at most burst of them back to back (a token bucket of burst tokens,
//     one added per minInterval, one taken per run). With the default burst
//     of 1, a run starts at least minInterval after the start of the
//     previous run. A Trigger that arrives when no token is left is deferred
//     until there is one, and every Trigger that arrives before the deferred
//     run starts is served by that single run (coalescing). With a token
//     left, a Trigger runs fn at once, or as soon as the run in progress
//     ends: Triggers that arrive during a run are still served together by
//     the next one.
//   - A Trigger that arrives while fn is running causes exactly one more run
//     after it (subject to the rate limit), because fn may have read the state
//     before the change the Trigger announced.
//   - Periodic resync: fn runs at least once every maxInterval, measured from
//     the start of the previous run, even without Triggers. This repairs any
//     drift between the desired and the programmed state.
//   - Retry: when fn returns an error, the error is logged and fn runs again
//     retryInterval after the failed run ended, but never sooner than the
//     rate limit allows and never later than maxInterval after it started.
//     A Trigger can bring the retry forward to when the rate limit allows. There is no exponential backoff: a sync that keeps failing is
//     retried at a steady rate, and a failure is expected to be counted by fn's
//     caller.
//
// Intervals <= 0 are treated as follows: minInterval <= 0 means no rate limit;
// maxInterval <= 0 disables the periodic resync; retryInterval <= 0 retries as
// soon as the rate limit allows (so with both <= 0 a failing fn is retried at
// once, in a tight loop). A maxInterval smaller than minInterval is raised to
// minInterval.
//
// Run is meant to be called once. A second Run on the same Runner waits for
// the first to return, so fn still never runs concurrently.
//
// Typical values for the proxy are maxInterval 30s and retryInterval 1s;
// minInterval 1s with a burst of 1 where a sync is expensive (iptables), and
// minInterval 100ms with a burst of 10 where it is cheap (the eBPF maps): a
// change then starts its sync as soon as the previous one ends, and only a
// long run of changes, such as a rollout, is held to 10 syncs a second, each
// serving every change that arrived meanwhile. A minInterval of zero makes
// every Trigger that arrives while waiting cause its own run.
package runner

import (
	"context"
	"sync"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
)

// Option configures a Runner.
type Option func(*Runner)

// WithBurst lets up to n runs start back to back before the rate limit of
// one per minInterval applies (n < 1 counts as 1, the default).
func WithBurst(n int) Option {
	return func(r *Runner) { r.burst = max(n, 1) }
}

// WithClock makes the Runner read time and create timers through c instead of
// the real clock. Tests pass a k8s.io/utils/clock/testing.FakeClock.
func WithClock(c clock.Clock) Option {
	return func(r *Runner) { r.clock = c }
}

// Runner calls a sync function with bounded frequency; see the package
// documentation for the guarantees.
type Runner struct {
	name          string
	fn            func(ctx context.Context) error
	minInterval   time.Duration
	maxInterval   time.Duration
	retryInterval time.Duration
	burst         int
	clock         clock.Clock

	// tat is the rate limit's state (the theoretical arrival time of the
	// generic cell rate algorithm): a run may start at tat minus burst-1
	// intervals; each run moves it one interval past the later of itself
	// and the run's start. Touched only by Run's goroutine.
	tat time.Time

	// notify wakes Run after a Trigger. It holds at most one token, so
	// Trigger never blocks; a token may be stale (pending already cleared by
	// a run), which costs Run one spurious wake-up.
	notify chan struct{}

	// runMu is held for the whole of Run, so that a second Run on the same
	// Runner waits instead of calling fn concurrently.
	runMu sync.Mutex

	// mu guards the fields below.
	mu sync.Mutex
	// pending is set by Trigger and cleared when a run that serves it is
	// about to start, or when Run has taken it into account while waiting.
	pending bool
	// waiting and waitingUntil describe what Run is blocked on. They exist
	// for tests, which must know that Run is blocked on its timer, with no
	// Trigger left to look at, before they advance a fake clock.
	waiting      bool
	waitingUntil time.Time
}

// New returns a Runner that calls fn under the given intervals. name
// identifies the Runner in logs. fn receives the context passed to Run and
// should return promptly when it is cancelled.
func New(name string, fn func(ctx context.Context) error, minInterval, maxInterval, retryInterval time.Duration, opts ...Option) *Runner {
	if minInterval < 0 {
		minInterval = 0
	}
	if maxInterval > 0 && maxInterval < minInterval {
		maxInterval = minInterval
	}
	r := &Runner{
		name:          name,
		fn:            fn,
		minInterval:   minInterval,
		maxInterval:   maxInterval,
		retryInterval: retryInterval,
		burst:         1,
		clock:         clock.RealClock{},
		notify:        make(chan struct{}, 1),
	}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Trigger asks for a run of fn. It never blocks and is safe to call from any
// goroutine, before or during Run. Many Triggers may be served by one run.
func (r *Runner) Trigger() {
	r.mu.Lock()
	r.pending = true
	r.mu.Unlock()
	select {
	case r.notify <- struct{}{}:
	default:
	}
}

// Run calls fn immediately and then as described in the package
// documentation, until ctx is done. It returns once ctx is done and any run
// in progress has returned.
func (r *Runner) Run(ctx context.Context) {
	r.runMu.Lock()
	defer r.runMu.Unlock()

	klog.V(2).InfoS("Starting sync runner", "runner", r.name,
		"minInterval", r.minInterval, "burst", r.burst, "maxInterval", r.maxInterval, "retryInterval", r.retryInterval)
	defer klog.V(2).InfoS("Stopped sync runner", "runner", r.name)

	for ctx.Err() == nil {
		if !r.wait(ctx, r.runOnce(ctx)) {
			return
		}
	}
}

// runOnce calls fn and returns when the next run is due without a Trigger
// (the zero time if never).
func (r *Runner) runOnce(ctx context.Context) (next time.Time) {
	// Any Trigger received so far is served by this run, because fn reads
	// the state after this point. Only Triggers from now on need another run.
	r.mu.Lock()
	r.pending = false
	r.mu.Unlock()

	start := r.clock.Now()
	if r.tat.Before(start) {
		r.tat = start
	}
	r.tat = r.tat.Add(r.minInterval)
	err := r.fn(ctx)
	end := r.clock.Now()

	if r.maxInterval > 0 {
		next = start.Add(r.maxInterval)
	}
	if err == nil {
		klog.V(4).InfoS("Sync done", "runner", r.name, "elapsed", end.Sub(start))
		return next
	}
	if ctx.Err() != nil {
		// Errors caused by shutdown are not worth a retry or an error log.
		klog.V(2).InfoS("Sync interrupted by shutdown", "runner", r.name, "err", err)
		return next
	}

	retry := end.Add(r.retryInterval)
	if earliest := r.earliest(); retry.Before(earliest) {
		retry = earliest
	}
	if next.IsZero() || retry.Before(next) {
		next = retry
	}
	klog.ErrorS(err, "Sync failed, will retry", "runner", r.name, "retryAfter", next.Sub(end))
	return next
}

// earliest is when the rate limit lets the next run start.
func (r *Runner) earliest() time.Time {
	return r.tat.Add(-time.Duration(r.burst-1) * r.minInterval)
}

// wait blocks until the next run is due: at next, or as soon as the rate
// limit allows if a Trigger arrives earlier. It returns false if ctx is
// done first.
func (r *Runner) wait(ctx context.Context, next time.Time) bool {
	due := next
	for {
		// A zero due means only a Trigger (or ctx) ends the wait.
		var timer clock.Timer
		var timerC <-chan time.Time
		if !due.IsZero() {
			d := due.Sub(r.clock.Now())
			if d <= 0 {
				return ctx.Err() == nil
			}
			timer = r.clock.NewTimer(d)
			timerC = timer.C()
		}

		earliest := r.earliest()
		res := r.waitFor(ctx, timerC, due, earliest)
		if timer != nil {
			timer.Stop()
		}
		switch res {
		case waitCancelled:
			return false
		case waitDue:
			return true
		case waitMoved:
			due = earliest
		}
	}
}

type waitResult int

const (
	waitCancelled waitResult = iota // ctx is done
	waitDue                         // the deadline passed
	waitMoved                       // a Trigger moved the deadline to earliest
)

// waitFor blocks until timerC fires, ctx is done, or a Trigger moves the
// deadline from due to earliest. Triggers that leave the deadline unchanged
// are absorbed.
func (r *Runner) waitFor(ctx context.Context, timerC <-chan time.Time, due, earliest time.Time) waitResult {
	moves := due.IsZero() || earliest.Before(due)

	r.mu.Lock()
	r.waiting, r.waitingUntil = true, due
	r.mu.Unlock()
	defer r.setNotWaiting()

	for {
		// A Trigger from before this wait (including one that arrived while
		// fn ran) is seen here without blocking, as its token is still in
		// notify.
		select {
		case <-ctx.Done():
			return waitCancelled
		case <-timerC:
			return waitDue
		case <-r.notify:
			r.mu.Lock()
			pending := r.pending
			// The coming run serves this Trigger, whether it moves the
			// deadline or not.
			r.pending = false
			if pending && moves {
				// waiting is cleared in the same critical section as pending,
				// so that no observer sees "waiting with nothing pending"
				// until the new deadline is in place.
				r.waiting = false
				r.mu.Unlock()
				return waitMoved
			}
			// A stale token (its Trigger was served by the last run), or the
			// coming run is already as early as the rate limit allows.
			r.mu.Unlock()
		}
	}
}

func (r *Runner) setNotWaiting() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.waiting = false
	r.waitingUntil = time.Time{}
}

// waitState reports whether Run is blocked waiting for its next run with no
// Trigger left to consider, and until when (the zero time if only a Trigger
// can end the wait).
func (r *Runner) waitState() (idle bool, until time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.waiting && !r.pending, r.waitingUntil
}
