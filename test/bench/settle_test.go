package bench

import (
	"context"
	"errors"
	"testing"
	"time"
)

// cpuSeries is a cpuSampler reading a fixed series of cumulative CPU seconds.
type cpuSeries struct {
	vals []float64
	n    int
}

func (s *cpuSeries) read() (float64, error) {
	if s.n >= len(s.vals) {
		return 0, errors.New("no more samples")
	}
	v := s.vals[s.n]
	s.n++
	return v, nil
}

func ticks(n int) <-chan time.Time {
	c := make(chan time.Time, n)
	for range n {
		c <- time.Time{}
	}
	close(c)
	return c
}

func TestWaitIdleWaitsForAQuietInterval(t *testing.T) {
	// 2 s intervals, idle below 0.3 CPU s: busy (1.5, 1.0), then quiet (0.1).
	s := &cpuSeries{vals: []float64{10, 11.5, 12.5, 12.6}}
	if !waitIdle(context.Background(), s.read, ticks(10), 2*time.Second, 0.15) {
		t.Fatal("not idle, want idle after the third sample")
	}
	if s.n != 4 {
		t.Errorf("read %d samples, want 4: stopped at the first quiet interval", s.n)
	}
}

func TestWaitIdleGivesUpWhenTicksStop(t *testing.T) {
	s := &cpuSeries{vals: []float64{0, 2, 4, 6}}
	if waitIdle(context.Background(), s.read, ticks(3), 2*time.Second, 0.15) {
		t.Fatal("idle, want busy: every interval used 2 CPU s")
	}
}

func TestWaitIdleStopsOnSamplerError(t *testing.T) {
	s := &cpuSeries{vals: []float64{0}}
	if waitIdle(context.Background(), s.read, ticks(3), 2*time.Second, 0.15) {
		t.Fatal("idle, want false when the processes cannot be read")
	}
}
