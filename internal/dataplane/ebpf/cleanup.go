package ebpf

import (
	"sync"
)

// cleanupWorker runs the UDP socket cleanup off the sync's path. A sync
// plans, under the Dataplane's lock, which frontends to check (cheap, from
// the snapshot) and hands them over; the worker visits the network
// namespaces afterwards, so that neither the map writes of the next sync
// nor the packet layer's sync, which follows the socket layer's, wait for
// it. One cleanup runs at a time. What syncs hand over while one runs is
// merged (udpCheck.merge), the newest serving endpoints of a frontend
// replacing older ones, and cleaned next: the kernel's maps already hold
// the newest, and a socket is stale against them.
type cleanupWorker struct {
	// clean checks the sockets against check and reports whether any of
	// them could not be checked or destroyed; it gives up early, with
	// nothing to report, once stop is closed.
	clean func(check udpCheck, stop <-chan struct{}) (failed bool)

	mu sync.Mutex
	// idle is closed while the worker has nothing left to do; a submit
	// that hands work over replaces it with an open one.
	idle chan struct{}
	// pending is what syncs handed over since the running cleanup
	// started.
	pending udpCheck
	// retry is the frontends of a cleanup that failed somewhere, checked
	// again with the next full sync (which used to check every frontend).
	retry udpCheck

	// kick tells the worker there is work pending.
	kick chan struct{}
	stop chan struct{}
	done chan struct{}
	once sync.Once
}

func newCleanupWorker(clean func(udpCheck, <-chan struct{}) bool) *cleanupWorker {
	w := &cleanupWorker{clean: clean, idle: make(chan struct{}), kick: make(chan struct{}, 1),
		stop: make(chan struct{}), done: make(chan struct{})}
	close(w.idle)
	go w.run()
	return w
}

// submit hands over a sync's check; full says it was a full sync, which
// also retries the frontends of failed cleanups. It never blocks.
func (w *cleanupWorker) submit(check udpCheck, full bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	select {
	case <-w.stop:
		return
	default:
	}
	if w.pending == nil {
		w.pending = make(udpCheck)
	}
	if full && len(w.retry) > 0 {
		// Older than anything pending.
		retry := w.retry
		retry.merge(w.pending)
		w.pending, w.retry = retry, nil
	}
	w.pending.merge(check)
	if len(w.pending) == 0 {
		return
	}
	if isClosed(w.idle) {
		w.idle = make(chan struct{})
	}
	select {
	case w.kick <- struct{}{}:
	default: // already kicked
	}
}

func (w *cleanupWorker) run() {
	defer close(w.done)
	for {
		select {
		case <-w.stop:
			return
		case <-w.kick:
		}
		if w.stopped() {
			return // select picks at random when both are ready
		}
		w.mu.Lock()
		check := w.pending
		w.pending = nil
		w.mu.Unlock()
		if len(check) > 0 {
			failed := w.clean(check, w.stop)
			w.mu.Lock()
			for fe := range check {
				// Superseded by this cleanup, or its failure recorded
				// below.
				delete(w.retry, fe)
			}
			if failed {
				if w.retry == nil {
					w.retry = make(udpCheck)
				}
				w.retry.merge(check)
			}
			w.mu.Unlock()
		}
		w.mu.Lock()
		if len(w.pending) == 0 && !isClosed(w.idle) {
			// Else a submit came meanwhile, and kicked.
			close(w.idle)
		}
		w.mu.Unlock()
	}
}

// wait returns once every check handed over so far has been cleaned (or
// the worker stopped).
func (w *cleanupWorker) wait() {
	w.mu.Lock()
	idle := w.idle
	w.mu.Unlock()
	select {
	case <-idle:
	case <-w.stop:
	}
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func (w *cleanupWorker) stopped() bool {
	select {
	case <-w.stop:
		return true
	default:
		return false
	}
}

// close stops the worker, interrupting a cleanup under way between two
// network namespaces, and returns once it has stopped: the cleanup reads
// kbp_revnat, whose handle the Dataplane closes next.
func (w *cleanupWorker) close() {
	w.once.Do(func() {
		close(w.stop)
		<-w.done
	})
}
