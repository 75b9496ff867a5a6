package bench

import (
	"context"
	"time"
)

// The control plane digests the background Services for a while after
// they are written: with --load=etcd the API server's watch cache takes in
// the objects, and kube-controller-manager's garbage collector and
// endpointslice controller list and process every Service, EndpointSlice
// and IPAddress (tens of CPU seconds at 10k on this 2-core machine). A cold
// start timed during that work shares the CPU with it, and only the first
// contender of a size would pay for it: the cold node comparison between
// contenders would then measure their order. So each size starts its
// contenders once the control plane is idle.

const (
	// settleInterval is how often the control plane's CPU is sampled.
	settleInterval = 2 * time.Second
	// settleIdleShare is the share of one CPU below which the control
	// plane counts as idle over one interval.
	settleIdleShare = 0.15
	// settleMax bounds the wait: a control plane busy for longer (another
	// cause) does not hold the run.
	settleMax = 2 * time.Minute
)

// cpuSampler returns the CPU seconds a set of processes has used so far.
type cpuSampler func() (float64, error)

// waitIdle samples cpu at each tick until one interval's use stays below
// idleShare of one CPU for interval, and reports whether it did before
// ctx ended (the caller bounds the wait with it) or ticks stopped.
func waitIdle(ctx context.Context, cpu cpuSampler, ticks <-chan time.Time, interval time.Duration, idleShare float64) bool {
	prev, err := cpu()
	if err != nil {
		return false
	}
	for {
		select {
		case <-ctx.Done():
			return false
		case _, ok := <-ticks:
			if !ok {
				return false
			}
		}
		cur, err := cpu()
		if err != nil {
			return false
		}
		if cur-prev < idleShare*interval.Seconds() {
			return true
		}
		prev = cur
	}
}

// settle waits until the control plane is idle, at most settleMax, and
// says how long it waited.
func (r *runner) settle(ctx context.Context) {
	if r.c == nil {
		return
	}
	pids := r.c.ControlPlanePIDs()
	if len(pids) == 0 {
		return
	}
	cpu := func() (float64, error) {
		var sum float64
		for _, pid := range pids {
			_, s, err := processUsage(pid)
			if err != nil {
				return 0, err
			}
			sum += s
		}
		return sum, nil
	}
	start := time.Now()
	ticker := time.NewTicker(settleInterval)
	defer ticker.Stop()
	wctx, cancel := context.WithTimeout(ctx, settleMax)
	defer cancel()
	if waitIdle(wctx, cpu, ticker.C, settleInterval, settleIdleShare) {
		r.prog.note("control plane idle %s after the background Services were written", time.Since(start).Round(time.Second))
	} else if ctx.Err() == nil {
		r.prog.note("control plane still busy %s after the background Services were written; measuring anyway", settleMax)
	}
}
