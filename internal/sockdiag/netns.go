package sockdiag

import (
	"golang.org/x/sys/unix"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/netnsenter"
)

// OpenIn opens a sock_diag socket in the network namespace whose nsfs file
// is at path (/proc/PID/ns/net, or a bind mount of one such as those
// container runtimes pin under /run/netns); see netnsenter.Do, which says
// what it takes.
func OpenIn(path string) (*Conn, error) {
	var c *Conn
	err := netnsenter.Do(path, func() (err error) {
		c, err = Open()
		return err
	})
	if err != nil {
		if c != nil {
			c.Close()
		}
		return nil, err
	}
	return c, nil
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
