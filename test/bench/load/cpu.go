package load

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// userHZ is the unit of /proc/stat and /proc/<pid>/stat times: USER_HZ,
// which the kernel fixes at 100 on every Linux architecture Go supports
// (it is not CONFIG_HZ); TestUserHZ checks it against `getconf CLK_TCK`.
const userHZ = 100

// nodeCPUSeconds reads the whole machine's busy CPU time from the
// aggregate "cpu" line of /proc/stat: user, nice, system, irq, softirq and
// steal (idle and iowait excluded; guest time is already in user).
func nodeCPUSeconds(procRoot string) (float64, error) {
	f, err := os.Open(procRoot + "/stat")
	if err != nil {
		return 0, fmt.Errorf("reading CPU time: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || fields[0] != "cpu" {
			continue
		}
		// cpu user nice system idle iowait irq softirq steal ...
		if len(fields) < 9 {
			return 0, fmt.Errorf("%s/stat: short cpu line %q", procRoot, sc.Text())
		}
		var ticks uint64
		for _, i := range []int{1, 2, 3, 6, 7, 8} {
			v, err := strconv.ParseUint(fields[i], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s/stat: cpu field %d: %w", procRoot, i, err)
			}
			ticks += v
		}
		return float64(ticks) / userHZ, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("reading %s/stat: %w", procRoot, err)
	}
	return 0, fmt.Errorf("%s/stat has no aggregate cpu line", procRoot)
}

// pidCPUSeconds reads a process's utime+stime. ok is false if the process
// is gone.
func pidCPUSeconds(procRoot string, pid int) (secs float64, ok bool, err error) {
	// A process that exits between open and read gives ESRCH.
	b, err := os.ReadFile(fmt.Sprintf("%s/%d/stat", procRoot, pid))
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("reading CPU time of PID %d: %w", pid, err)
	}
	// The command name, in parentheses, may hold spaces: fields count
	// from the last ')'. After it come state (field 3) ... utime (14)
	// and stime (15).
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false, fmt.Errorf("/proc/%d/stat: no command name in %q", pid, s)
	}
	fields := strings.Fields(s[i+1:])
	if len(fields) < 13 {
		return 0, false, fmt.Errorf("/proc/%d/stat: short line %q", pid, s)
	}
	var ticks uint64
	for _, f := range fields[11:13] {
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return 0, false, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += v
	}
	return float64(ticks) / userHZ, true, nil
}

// cpuSnapshot is the CPU time counters at one instant.
type cpuSnapshot struct {
	node float64
	pids []float64
	gone []bool
}

func takeCPUSnapshot(procRoot string, pids []int) (cpuSnapshot, error) {
	var s cpuSnapshot
	var err error
	if s.node, err = nodeCPUSeconds(procRoot); err != nil {
		return s, err
	}
	for _, pid := range pids {
		v, ok, err := pidCPUSeconds(procRoot, pid)
		if err != nil {
			return s, err
		}
		s.pids = append(s.pids, v)
		s.gone = append(s.gone, !ok)
	}
	return s, nil
}

// since returns the node's CPU seconds and the PIDs' summed CPU seconds
// between before and s; a PID gone at either end counts 0 and sets gone.
func (s cpuSnapshot) since(before cpuSnapshot) (node, proxy float64, gone bool) {
	node = s.node - before.node
	for i := range s.pids {
		if s.gone[i] || before.gone[i] {
			gone = true
			continue
		}
		proxy += s.pids[i] - before.pids[i]
	}
	return node, proxy, gone
}
