package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/load"
	"github.com/kube-bpf-proxy/kube-bpf-proxy/test/bench/results"
)

// cell measures one contender at one size: start on clean nodes, time
// the cold start, run the workloads, time the control plane, stop and
// clean. A failure is recorded in the cell (Skipped) and the run goes on
// with the next contender: one broken contender must not cost the whole
// comparison.
func (r *runner) cell(ctx context.Context, name string, size int) (cell results.Cell) {
	start := time.Now()
	cell = results.Cell{Contender: name, Size: size, Family: r.cfg.family().String()}
	defer func() { cell.Elapsed = time.Since(start) }()
	if at, failed := r.failedAt[name]; failed {
		cell.Skipped = fmt.Sprintf("not tried: did not serve %d Services before", at)
		r.prog.done(stepsPerCell)
		return cell
	}
	viaService := name != results.Direct
	if why := r.projectedMiss(name, size); why != "" {
		cell.Skipped = why
		r.failedAt[name] = size
		r.prog.note("%s: %s", name, why)
		r.prog.done(stepsPerCell)
		return cell
	}

	r.prog.begin(name, size, "start on clean nodes, until every Service is served")
	ct, err := NewContender(r.c, name, ContenderOptions{
		Binary: r.cfg.Binary, KubeProxy: filepath.Join(r.cfg.KubeBin, "kube-proxy"), ManifestsDir: r.cfg.ManifestsDir,
		ExtraArgs: ourArgsFor(name, size+r.cfg.BatchServices, r.cfg.EndpointsPerService),
	})
	if err != nil {
		cell.Skipped = err.Error()
		r.prog.done(stepsPerCell)
		return cell
	}
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		err := ct.Stop(sctx)
		// Connections of this cell must not linger into the next one's
		// conntrack table (TIME_WAIT entries live 2 minutes).
		if ferr := r.flushConntrack(sctx); ferr != nil {
			err = errors.Join(err, ferr)
		}
		return err
	}
	defer func() {
		if err := stop(); err != nil {
			r.prog.note("%s at %d: stopping: %v", name, size, err)
			if cell.Skipped == "" {
				cell.Incomplete = strings.TrimPrefix(cell.Incomplete+"; ", "; ") + "stopping: " + err.Error()
			}
		}
	}()

	started := time.Now()
	if err := ct.Start(ctx); err != nil {
		cell.Skipped = "starting: " + err.Error()
		r.failedAt[name] = size
		r.prog.done(stepsPerCell)
		return cell
	}
	if viaService {
		if l := ct.LaunchedAt(); !l.IsZero() {
			started = l // applying the manifests is not the proxy's start
		}
		timeout := r.cfg.SyncTimeout(size)
		served, err := r.coldStart(ctx, started, timeout)
		cell.ControlPlane.ColdStart = served
		if err != nil {
			cell.ControlPlane.ColdStartTimedOut = true
			cell.Skipped = fmt.Sprintf("did not serve %d Services within %s: %v", size, timeout, err)
			r.failedAt[name] = size
			r.prog.note("%s: %s", name, cell.Skipped)
			r.prog.done(stepsPerCell)
			return cell
		}
		r.served[name] = servedAt{size, served}
		r.prog.note("%s served %d Services %s after its start", name, size, served.Round(time.Millisecond))
	}
	r.prog.done(1)

	var errs []error
	if !r.cfg.workloads(name, size) {
		r.prog.done(2)
	} else {
		r.prog.begin(name, size, "latency: tcp connect/crr/rr, udp (direct and ClusterIP interleaved)")
		lat, err := r.latency(ctx, viaService)
		cell.Latency = lat
		errs = append(errs, err)
		r.prog.done(1)

		r.prog.begin(name, size, "rates: connections per second and stream throughput, with CPU")
		rates, err := r.rates(ctx, viaService, ct.PIDs())
		cell.Rates = rates
		errs = append(errs, err)
		r.prog.done(1)
	}

	if viaService {
		r.prog.begin(name, size, "control plane: endpoint changes under churn, a batch of new Services")
		cp, err := r.controlPlane(ctx, size, r.cfg.endpointChanges(name, size), ct)
		cp.ColdStart = cell.ControlPlane.ColdStart
		cell.ControlPlane = cp
		errs = append(errs, err)
		u, err := proxyUsage(ct.PIDs())
		cell.Proxy = u
		errs = append(errs, err)
	}
	r.prog.done(1)

	r.prog.begin(name, size, "stop and clean the nodes")
	if err := stop(); err != nil {
		errs = append(errs, fmt.Errorf("stopping: %w", err))
	}
	r.prog.done(1)
	if err := errors.Join(errs...); err != nil {
		// Measured in part: what was measured stays, the reason is said.
		cell.Incomplete = err.Error()
		r.prog.note("%s at %d: %v", name, size, err)
	}
	return cell
}

// projectedMiss says why name is not tried at size (Config.SkipProjected):
// its cold start at the last size it served, scaled to size, exceeds the
// wait at size; "" to try it.
func (r *runner) projectedMiss(name string, size int) string {
	last, ok := r.served[name]
	if !r.cfg.SkipProjected || !ok || last.size <= 0 || size <= last.size {
		return ""
	}
	projected := time.Duration(float64(last.cold) * float64(size) / float64(last.size))
	if wait := r.cfg.SyncTimeout(size); projected > wait {
		return fmt.Sprintf("not tried: its cold start at %d Services (%s), scaled to %d, is %s, more than the %s wait",
			last.size, last.cold.Round(100*time.Millisecond), size, projected.Round(time.Second), wait)
	}
	return ""
}

// ourArgsFor sizes the eBPF mode's maps for services Services: the
// defaults hold 262144 endpoint slots, which 50k Services of 10 endpoints
// outgrow. An operator sets the same flag (docs/configuration.md, "Full
// maps", says when).
func ourArgsFor(contender string, services, endpoints int) []string {
	need := (services + 100) * endpoints * 5 / 4
	if contender != results.EBPF || need <= 262144 {
		return nil
	}
	return []string{"--bpf-backend-slots-max=" + strconv.Itoa(need)}
}

// coldStart waits until a client on each node reaches the last background
// Service, the benchmark's Services and the churned one, and returns the
// time since started.
func (r *runner) coldStart(ctx context.Context, started time.Time, timeout time.Duration) (time.Duration, error) {
	var targets []string
	if r.lastBackground != "" {
		targets = append(targets, r.lastBackground)
	}
	for _, p := range r.paths {
		targets = append(targets, net.JoinHostPort(p.vip.String(), strconv.Itoa(load.EchoPort)))
	}
	targets = append(targets, r.churnVIP)
	var latest time.Time
	var clients []func() error
	firsts := make([]time.Time, 2)
	for i, p := range []path{r.paths[0], r.paths[1]} { // node1 and node2
		clients = append(clients, func() error {
			t, err := r.poll(ctx, p, targets, timeout-time.Since(started))
			firsts[i] = t
			return err
		})
	}
	err := parallel(clients...)
	for _, t := range firsts {
		if t.After(latest) {
			latest = t
		}
	}
	if err != nil {
		return time.Since(started), err
	}
	return latest.Sub(started), nil
}

// latency runs each latency workload Repetitions times from client-1.
func (r *runner) latency(ctx context.Context, viaService bool) ([]results.Paired, error) {
	p := r.paths[0]
	byWorkload := map[string]*results.Paired{}
	add := func(w string, rep results.Rep) {
		if byWorkload[w] == nil {
			byWorkload[w] = &results.Paired{Workload: w}
		}
		byWorkload[w].Reps = append(byWorkload[w].Reps, rep)
	}
	var errs []error
	for range r.cfg.Repetitions {
		reps, err := r.crr(ctx, p, viaService)
		if err != nil {
			errs = append(errs, err)
		}
		for w, rep := range reps {
			add(w, rep)
		}
		for _, w := range []string{results.TCPRR, results.UDPConnected, results.UDPUnconnected} {
			if !r.cfg.runsWorkload(w) {
				continue
			}
			rep, err := r.simpleLatency(ctx, p, w, viaService)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			add(w, rep)
		}
	}
	var out []results.Paired
	for _, w := range []string{results.TCPConnect, results.TCPCRR, results.TCPRR, results.UDPConnected, results.UDPUnconnected} {
		if byWorkload[w] != nil {
			out = append(out, *byWorkload[w])
		}
	}
	return out, errors.Join(errs...)
}

// rates runs the connection-rate and stream workloads from every client
// at once (both cores loaded), phase by phase alternating the targets.
func (r *runner) rates(ctx context.Context, viaService bool, pids map[string]int) ([]results.RatePhase, error) {
	var out []results.RatePhase
	var errs []error
	for rep := range r.cfg.Repetitions {
		for _, w := range []string{results.ConnectRate, results.Stream} {
			if !r.cfg.runsWorkload(w) {
				continue
			}
			phases, err := r.rate(ctx, w, rep, viaService, pids)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", w, err))
			}
			out = append(out, phases...)
		}
	}
	return out, errors.Join(errs...)
}

// controlPlane times endpoint changes (while background Services churn)
// and a batch of new Services, and reads the proxies' own network
// programming histogram.
func (r *runner) controlPlane(ctx context.Context, size, changes int, ct Contender) (results.ControlPlane, error) {
	var cp results.ControlPlane
	var errs []error

	churnCtx, stopChurn := context.WithCancel(ctx)
	churned := make(chan struct{})
	go func() { defer close(churned); r.churn(churnCtx, size) }()
	moves, err := r.endpointChanges(ctx, changes)
	stopChurn()
	<-churned
	cp.EndpointChange = moves
	if err != nil {
		cp.EndpointChangeTimedOut = true
		errs = append(errs, fmt.Errorf("endpoint changes: %w", err))
	}

	if r.cfg.BatchServices > 0 {
		served, err := r.batch(ctx)
		cp.BatchServices = r.cfg.BatchServices
		cp.BatchServed = served
		if err != nil {
			cp.BatchTimedOut = true
			errs = append(errs, fmt.Errorf("a batch of %d Services: %w", r.cfg.BatchServices, err))
		}
	}

	if addr := ct.MetricsAddr(); addr != "" {
		h, err := r.networkProgramming(ctx, addr)
		cp.NetworkProgramming = h
		if err != nil {
			errs = append(errs, err)
		}
	}
	return cp, errors.Join(errs...)
}

// endpointChanges moves the churned Service's only endpoint between two
// pods n times and times each until client-1 sees it.
func (r *runner) endpointChanges(ctx context.Context, n int) ([]time.Duration, error) {
	w, err := r.startWatch(ctx, r.paths[0], r.churnVIP)
	if err != nil {
		return nil, err
	}
	defer w.stop()
	// The watcher first reports the current endpoint.
	cur := 0
	if name, err := w.next(ctx, 30*time.Second); err != nil {
		return nil, fmt.Errorf("the churned Service never answered: %w", err)
	} else if name == r.churnPods[1].Name {
		cur = 1
	}
	var out []time.Duration
	begin := time.Now()
	for range n {
		if time.Since(begin) > r.cfg.EndpointChangeBudget && len(out) > 0 {
			break
		}
		to := r.churnPods[1-cur]
		// A pause like a real cluster's gaps between changes, so that each
		// change is timed on its own and not batched with the one before.
		time.Sleep(200 * time.Millisecond)
		if err := r.moveChurned(ctx, to); err != nil {
			return out, err
		}
		written := time.Now()
		at, err := w.waitFor(ctx, to.Name, 30*time.Second)
		if err != nil {
			return out, fmt.Errorf("the client never reached %s: %w", to.Name, err)
		}
		out = append(out, max(at.Sub(written), 0))
		cur = 1 - cur
	}
	return out, nil
}

// batch creates BatchServices Services and times the last one served.
func (r *runner) batch(ctx context.Context) (time.Duration, error) {
	vips, err := CreateBatch(ctx, r.api, backgroundNamespace, r.cfg.BatchServices, r.cfg.EndpointsPerService, r.serverAddrs(), load.EchoPort, populateWorkers)
	created := time.Now()
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if err := DeleteBatch(dctx, r.api, backgroundNamespace, populateWorkers); err != nil {
			r.prog.note("deleting the batch: %v", err)
		}
	}()
	if err != nil {
		return 0, err
	}
	at, err := r.poll(ctx, r.paths[0], vips[len(vips)-1:], time.Minute)
	if err != nil {
		return time.Since(created), err
	}
	return max(at.Sub(created), 0), nil
}

// networkProgramming merges the nodes' network programming histograms.
func (r *runner) networkProgramming(ctx context.Context, addr string) (*results.Histogram, error) {
	var merged *results.Histogram
	for _, n := range r.c.Nodes {
		code, body, err := r.c.NodeGet(ctx, n.Name, addr, "/metrics")
		if err != nil || code != 200 {
			return merged, fmt.Errorf("%s's /metrics: %d %v", n.Name, code, err)
		}
		h, err := parseHistogram(strings.NewReader(body), "kubeproxy_network_programming_duration_seconds")
		if err != nil {
			return merged, fmt.Errorf("%s's /metrics: %w", n.Name, err)
		}
		merged = mergeHistograms(merged, h)
	}
	return merged, nil
}
