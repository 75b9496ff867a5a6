package sockdiag

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// OpenIn opens a sock_diag socket in the network namespace whose nsfs file
// is at path (/proc/PID/ns/net, or a bind mount of one such as those
// container runtimes pin under /run/netns). A socket stays in the namespace
// it was created in, so only its creation needs the namespace: it runs on
// a thread of its own that enters the namespace with setns(2) and leaves it
// again.
//
// setns(2) needs CAP_SYS_ADMIN; without it the error wraps unix.EPERM. A
// path naming the caller's own namespace needs no setns and no capability.
func OpenIn(path string) (*Conn, error) {
	target, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer target.Close()
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(target.Fd()), &fs); err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", path, err)
	}
	if fs.Type != unix.NSFS_MAGIC {
		return nil, fmt.Errorf("%s is not a namespace file", path)
	}

	type result struct {
		c   *Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// This thread's namespace, not the process's: they differ only
		// for threads locked into another one, and this one is new.
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("opening this thread's network namespace: %w", err)}
			return
		}
		defer orig.Close()
		if same, err := sameFile(orig, target); err != nil || same {
			var c *Conn
			if err == nil {
				c, err = Open()
			}
			runtime.UnlockOSThread()
			done <- result{c, err}
			return
		}
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("entering network namespace %s (needs CAP_SYS_ADMIN): %w", path, err)}
			return
		}
		c, err := Open()
		if rerr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); rerr != nil {
			// Leave the thread locked: it ends with this goroutine
			// instead of running others in the wrong namespace.
			if c != nil {
				c.Close()
			}
			done <- result{err: fmt.Errorf("returning from network namespace %s: %w", path, errors.Join(err, rerr))}
			return
		}
		runtime.UnlockOSThread()
		if err != nil {
			err = fmt.Errorf("in network namespace %s: %w", path, err)
		}
		done <- result{c, err}
	}()
	r := <-done
	return r.c, r.err
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

// NamespaceID identifies a network namespace by its nsfs inode, so that one
// reached by two paths is visited once.
type NamespaceID struct{ Dev, Ino uint64 }

// Namespace returns the id of the network namespace at path; ok is false if
// path is not a namespace file (a runtime's placeholder before it mounts
// one, or a stray file).
func Namespace(path string) (id NamespaceID, ok bool, err error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return NamespaceID{}, false, err
	}
	if fs.Type != unix.NSFS_MAGIC {
		return NamespaceID{}, false, nil
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return NamespaceID{}, false, err
	}
	return NamespaceID{Dev: st.Dev, Ino: st.Ino}, true, nil
}
