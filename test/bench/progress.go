package bench

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress is the run's progress line: contender, size, workload, elapsed
// and the estimated time left. On a terminal it is one line redrawn in
// place; elsewhere (CI logs, a file) a line per step, so a log shows
// where a run spent its time.
type progress struct {
	bar   *progressbar.ProgressBar
	w     io.Writer
	tty   bool
	start time.Time
	step  string
	// steps done of max, for the estimate on a line of its own (the bar
	// keeps no state while it is invisible).
	doneSteps, max int
}

// newProgress counts steps: the run's work is planned as that many steps
// of roughly comparable length, and the estimate is the mean step so far
// times the steps left.
func newProgress(w io.Writer, steps int) *progress {
	p := &progress{w: w, start: time.Now(), max: steps}
	if w == nil {
		w = io.Discard
		p.w = w
	}
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		p.tty = true
	}
	p.bar = progressbar.NewOptions(steps,
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetVisibility(p.tty),
		progressbar.OptionSetWidth(20),
		progressbar.OptionShowCount(),
		progressbar.OptionSetElapsedTime(true),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionThrottle(200*time.Millisecond),
	)
	return p
}

// begin names the step now running.
func (p *progress) begin(contender string, size int, what string) {
	p.step = fmt.Sprintf("%-19s %6d Services  %s", contender, size, what)
	p.bar.Describe(p.step)
	if !p.tty {
		elapsed := time.Since(p.start)
		left := "?"
		if p.doneSteps > 0 {
			left = (elapsed / time.Duration(p.doneSteps) * time.Duration(p.max-p.doneSteps)).Round(time.Second).String()
		}
		fmt.Fprintf(p.w, "[%s elapsed, ~%s left, step %d/%d] %s\n",
			elapsed.Round(time.Second), left, p.doneSteps+1, p.max, p.step)
	}
}

// done counts n steps done.
func (p *progress) done(n int) {
	p.doneSteps += n
	_ = p.bar.Add(n)
}

// note prints a line that stays (a finding worth seeing while it runs).
func (p *progress) note(format string, args ...any) {
	if p.tty {
		_ = p.bar.Clear()
	}
	fmt.Fprintf(p.w, "  "+format+"\n", args...)
}

func (p *progress) finish() {
	_ = p.bar.Finish()
	if p.tty {
		fmt.Fprintln(p.w)
	}
}
