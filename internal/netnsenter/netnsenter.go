// Package netnsenter runs a function in another network namespace. A socket
// stays in the namespace it was created in, whichever thread uses it later,
// so creating one is all that needs the namespace: fn runs on a thread of
// its own, locked, that enters the namespace with setns(2) and leaves it
// again.
package netnsenter

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs fn in the network namespace whose nsfs file is at path
// (/proc/PID/ns/net, or a bind mount of one such as those iproute2 and
// container runtimes pin under /run/netns), and returns its error.
//
// Entering a namespace needs CAP_SYS_ADMIN; without it the error wraps
// unix.EPERM. A path naming the caller's own namespace is not entered, so
// it needs no capability.
func Do(path string, fn func() error) error {
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer target.Close()
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(target.Fd()), &fs); err != nil {
		return fmt.Errorf("network namespace %s: %w", path, err)
	}
	if fs.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("%s is not a namespace file", path)
	}

	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// This thread's namespace, not the process's: they differ only
		// for threads locked into another one, and this one is new.
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("opening this thread's network namespace: %w", err)
			return
		}
		defer orig.Close()
		if same, err := sameFile(orig, target); err != nil || same {
			if err == nil {
				err = fn()
			}
			runtime.UnlockOSThread()
			done <- err
			return
		}
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("entering network namespace %s (needs CAP_SYS_ADMIN): %w", path, err)
			return
		}
		err = fn()
		if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr != nil {
			// Leave the thread locked: it ends with this goroutine
			// instead of running others in the wrong namespace.
			done <- fmt.Errorf("returning from network namespace %s: %w", path, errors.Join(err, rerr))
			return
		}
		runtime.UnlockOSThread()
		if err != nil {
			err = fmt.Errorf("in network namespace %s: %w", path, err)
		}
		done <- err
	}()
	return <-done
}

// sameFile reports whether two open files are the same inode, which for
// namespace files means the same namespace.
func sameFile(a, b *os.File) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Fstat(int(a.Fd()), &sa); err != nil {
		return false, err
	}
	if err := unix.Fstat(int(b.Fd()), &sb); err != nil {
		return false, err
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}
