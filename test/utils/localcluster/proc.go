package localcluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// proc is a process the cluster started, recorded with enough to restart it
// and to be sure a later kill reaches that process and not one that reused
// its PID.
type proc struct {
	PID int `json:"pid"`
	// StartTime is field 22 of /proc/PID/stat: the PID's identity.
	StartTime string   `json:"startTime"`
	NetNS     string   `json:"netns"`
	Cgroup    string   `json:"cgroup"`
	Args      []string `json:"args"`
	// Env is the process's whole environment; nil inherits this one's.
	Env []string `json:"env,omitempty"`
	Log string   `json:"log"`
	// Owner names the workload the process is a pod of (a proxy's
	// DaemonSet), if any.
	Owner string `json:"owner,omitempty"`
}

// start runs p.Args in network namespace p.NetNS (if set) and cgroup p.Cgroup,
// detached from the caller (its own session, output to p.Log), so it
// outlives a CLI invocation. It joins the cgroup at clone time, before it
// runs any code.
func (p *proc) start() error {
	logf, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cgfd, err := unix.Open(p.Cgroup, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening cgroup %s: %w", p.Cgroup, err)
	}
	defer unix.Close(cgfd)
	// Without a namespace it runs in this process's own (a forwarder
	// listening on the machine's loopback).
	cmd := exec.Command(p.Args[0], p.Args[1:]...)
	if p.NetNS != "" {
		cmd = exec.Command("nsenter", append([]string{"--net=" + netnsPath(p.NetNS), "--"}, p.Args...)...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = p.Env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, UseCgroupFD: true, CgroupFD: cgfd}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", p.Args[0], err)
	}
	p.PID = cmd.Process.Pid
	p.StartTime = startTime(p.PID)
	// Reap it if it dies while this process lives; once this process is
	// gone, init does.
	go func() { _ = cmd.Wait() }()
	return nil
}

// alive reports whether the recorded process is still running.
func (p *proc) alive() bool {
	if p == nil || p.PID == 0 {
		return false
	}
	st := startTime(p.PID)
	return st != "" && st == p.StartTime && !zombie(p.PID)
}

// signal sends sig to the recorded process if it is still the one started.
func (p *proc) signal(sig syscall.Signal) error {
	if !p.alive() {
		return nil
	}
	return syscall.Kill(p.PID, sig)
}

// stop sends SIGTERM, waits up to grace for the process to exit, then
// kills it.
func (p *proc) stop(grace time.Duration) error {
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if p.waitExit(grace) {
		return nil
	}
	_ = p.signal(syscall.SIGKILL)
	if !p.waitExit(2 * time.Second) {
		return fmt.Errorf("process %d (%s) survived SIGKILL", p.PID, p.Args[0])
	}
	return nil
}

// waitExit waits up to timeout for the process to be gone and reports
// whether it is.
func (p *proc) waitExit(timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for p.alive() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// waitForLine waits until the process's log has a line containing s.
func (p *proc) waitForLine(s string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(p.Log)
		if strings.Contains(string(b), s) {
			return nil
		}
		if !p.alive() {
			return fmt.Errorf("%s exited; see %s", filepath.Base(p.Args[0]), p.Log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not print %q in %s; see %s", filepath.Base(p.Args[0]), s, timeout, p.Log)
}

func startTime(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	// The command name (field 2) may hold spaces; fields after its closing
	// parenthesis are plain.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return ""
	}
	return f[19] // field 22 overall
}

func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && len(s) > i+2 && s[i+2] == 'Z'
}
