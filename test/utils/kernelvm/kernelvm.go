// Package kernelvm runs commands on other Linux kernels than this machine's:
// each in a qemu VM that boots one of the Debian kernels hack/kernels.sh
// unpacked into the cache and shares this machine's root filesystem with it
// read-only over virtio-9p, so that a test binary built here runs there with
// the host's ip, nsenter and iptables. It proves the eBPF datapath on the
// kernels users run (TestKernelMatrix, `make kernels`).
//
// The VM's init (init.sh, in each kernel's initramfs) mounts proc, sysfs,
// devtmpfs, cgroup2 at /sys/fs/cgroup and a bpffs at /sys/fs/bpf over the
// shared root, tmpfs on /tmp, /var/tmp and /run, loads modules on demand from
// the kernel's own package, and runs the command as root in a chroot. Without
// KVM qemu emulates the CPU (TCG): boots take seconds, and everything runs
// several times slower than here.
package kernelvm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Kernel is one unpacked kernel in the cache, as hack/kernels.sh leaves it:
// DIR/vmlinuz, DIR/initrd.img, DIR/package ("NAME VERSION" of the Debian
// package), DIR/release (its uname -r) and DIR/root (the package's files).
type Kernel struct {
	// Name is the matrix entry, e.g. "bullseye-5.10".
	Name string
	// Package is the Debian package and version it came from.
	Package string
	// Release is what uname -r says on it.
	Release string
	Dir     string
}

// CacheDir is where hack/kernels.sh keeps the kernels: $KBP_CACHE/kernels,
// by default under /var/cache/kube-bpf-proxy for root and
// ~/.cache/kube-bpf-proxy otherwise, as the other hack scripts do.
func CacheDir() string {
	root := os.Getenv("KBP_CACHE")
	if root == "" {
		if os.Geteuid() == 0 {
			root = "/var/cache/kube-bpf-proxy"
		} else {
			base := os.Getenv("XDG_CACHE_HOME")
			if base == "" {
				home, _ := os.UserHomeDir()
				base = filepath.Join(home, ".cache")
			}
			root = filepath.Join(base, "kube-bpf-proxy")
		}
	}
	return filepath.Join(root, "kernels")
}

// Matrix reads the kernel names from hack/kernels.list: one "NAME SUITE
// PACKAGE" a line, # comments.
func Matrix(listPath string) ([]string, error) {
	data, err := os.ReadFile(listPath)
	if err != nil {
		return nil, fmt.Errorf("reading the kernel list: %w", err)
	}
	var names []string
	for line := range strings.Lines(string(data)) {
		fields := strings.Fields(line)
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		if len(fields) != 3 {
			return nil, fmt.Errorf("%s: %q: want NAME SUITE PACKAGE", listPath, strings.TrimSpace(line))
		}
		names = append(names, fields[0])
	}
	return names, nil
}

// Find returns the kernel called name in the cache directory, or an error
// that wraps os.ErrNotExist when hack/kernels.sh has not fetched it.
func Find(cache, name string) (Kernel, error) {
	k := Kernel{Name: name, Dir: filepath.Join(cache, name)}
	for _, f := range []string{".complete", "vmlinuz", "initrd.img"} {
		if _, err := os.Stat(filepath.Join(k.Dir, f)); err != nil {
			return k, fmt.Errorf("kernel %s: %w (hack/kernels.sh --fetch fetches it)", name, err)
		}
	}
	for _, f := range []struct {
		name string
		to   *string
	}{{"package", &k.Package}, {"release", &k.Release}} {
		data, err := os.ReadFile(filepath.Join(k.Dir, f.name))
		if err != nil {
			return k, fmt.Errorf("kernel %s: %w", name, err)
		}
		*f.to = strings.TrimSpace(string(data))
	}
	return k, nil
}

// Result is what a command did in the VM.
type Result struct {
	// Output is the command's standard output and error, interleaved.
	Output   []byte
	ExitCode int
	// Release is uname -r in the VM.
	Release string
	// Boot is the VM's uptime when init started the command: the kernel's
	// boot, module loading and mounts.
	Boot time.Duration
	// Command is how long the command ran, by the VM's clock.
	Command time.Duration
	// Wall is qemu's whole run by this machine's clock, firmware included.
	Wall time.Duration
	// Console is the serial console: the kernel's messages (panics,
	// oopses) and init's own when it could not run the command.
	Console []byte
}

// Memory and CPUs of each VM. TCG runs one host thread per virtual CPU.
const (
	memory = "2G"
	cpus   = "2"
)

// Command is what Run runs in a VM.
type Command struct {
	// Args is the command line; it runs as root, in a chroot into this
	// machine's root filesystem.
	Args []string
	// Shared, an absolute path, is shared read-write at the same path in
	// the VM (a directory under /tmp works too: the VM's /tmp is a tmpfs the
	// share is mounted into). It is where the command's own files go (a
	// test binary built into it runs from there); Run keeps its files in
	// Shared/.kernelvm.
	Shared string
	// Dir is the working directory, Shared if empty. Anywhere else the
	// filesystem is read-only, as on this machine at the time.
	Dir string
}

// Run boots kernel k with this machine's root filesystem, runs c there and
// returns its output and exit status. The VM is killed when ctx ends; the
// error then says so, with the console's last lines. A command that ran and
// failed is not an error: its ExitCode says so.
func Run(ctx context.Context, k Kernel, c Command) (*Result, error) {
	dir := c.Shared
	if !filepath.IsAbs(dir) || strings.ContainsAny(dir, " \t\n") {
		return nil, fmt.Errorf("shared directory %q: want an absolute path without spaces", dir)
	}
	if len(c.Args) == 0 {
		return nil, errors.New("no command")
	}
	workDir := c.Dir
	if workDir == "" {
		workDir = dir
	}
	state := filepath.Join(dir, ".kernelvm")
	if err := os.RemoveAll(state); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(state, 0o755); err != nil {
		return nil, err
	}
	script := "cd " + shellQuote(workDir) + " || exit 125\nexec"
	for _, a := range c.Args {
		script += " " + shellQuote(a)
	}
	if err := os.WriteFile(filepath.Join(state, "cmd"), []byte(script+"\n"), 0o644); err != nil {
		return nil, err
	}

	qemu := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		// TCG: no /dev/kvm here, nor on most CI runners. "max" gives the
		// guest RDRAND, so that getrandom does not wait for entropy on 5.10.
		"-accel", "tcg", "-cpu", "max", "-smp", cpus, "-m", memory,
		"-kernel", filepath.Join(k.Dir, "vmlinuz"),
		"-initrd", filepath.Join(k.Dir, "initrd.img"),
		"-append", "console=ttyS0 rdinit=/init panic=-1 quiet kbp_dir="+dir+" kbp_kernel="+k.Dir,
		"-serial", "stdio",
		// multidevs=remap: the root spans several host filesystems (/proc,
		// /sys, ...); without it their inode numbers collide in the guest,
		// which then loses track of mounts made over them.
		"-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
		"-virtfs", "local,path="+dir+",mount_tag=kbpdir,security_model=none,multidevs=remap",
	)
	var console bytes.Buffer
	qemu.Stdout = &console
	qemu.Stderr = &console
	qemu.WaitDelay = 5 * time.Second
	// A test binary killed by go test's timeout cannot cancel ctx: the VM
	// then dies with it instead of running on. (Strictly, with the thread
	// that started it: nothing here locks goroutines to threads, whose
	// exit would end the VM early.)
	qemu.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	err := qemu.Run()
	res := &Result{Wall: time.Since(start), Console: console.Bytes(), ExitCode: -1}
	if ctx.Err() != nil {
		return res, fmt.Errorf("%s: killed the VM after %s (%w); console:\n%s", k.Name, res.Wall.Round(time.Second), ctx.Err(), tail(res.Console, 30))
	}
	if err != nil {
		return res, fmt.Errorf("%s: qemu: %w; console:\n%s", k.Name, err, tail(res.Console, 30))
	}
	res.Output, _ = os.ReadFile(filepath.Join(state, "output"))
	data, err := os.ReadFile(filepath.Join(state, "status"))
	if err != nil {
		return res, fmt.Errorf("%s: the VM ended without running the command; console:\n%s", k.Name, tail(res.Console, 30))
	}
	if res.ExitCode, err = strconv.Atoi(strings.TrimSpace(string(data))); err != nil {
		return res, fmt.Errorf("%s: exit status %q: %w", k.Name, data, err)
	}
	release, _ := os.ReadFile(filepath.Join(state, "release"))
	res.Release = strings.TrimSpace(string(release))
	booted := uptime(filepath.Join(state, "booted"))
	res.Boot = booted
	if finished := uptime(filepath.Join(state, "finished")); finished > booted {
		res.Command = finished - booted
	}
	return res, nil
}

// uptime reads a /proc/uptime first field that init saved.
func uptime(path string) time.Duration {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	s, err := strconv.ParseFloat(strings.TrimSpace(string(data)), 64)
	if err != nil {
		return 0
	}
	return time.Duration(s * float64(time.Second))
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// tail returns the last n lines of b.
func tail(b []byte, n int) string {
	var lines []string
	s := bufio.NewScanner(bytes.NewReader(b))
	s.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for s.Scan() {
		lines = append(lines, s.Text())
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
