package load

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Raw sockets with blocking system calls, as netperf uses them: a sample
// then costs the system calls it measures and no poller wake-up. Each
// socket gets SO_SNDTIMEO and SO_RCVTIMEO so that no call blocks past the
// workload's timeout: a blocking connect() gives up with EINPROGRESS, a
// read with EAGAIN.

// errTimeout is an operation that did not finish within its timeout.
var errTimeout = errors.New("timed out")

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() || ap.Addr().Is4In6() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

// newSocket opens a blocking socket of typ for ap's family with send and
// receive timeouts.
func newSocket(ap netip.AddrPort, typ int, timeout time.Duration) (int, error) {
	family := unix.AF_INET
	if !ap.Addr().Unmap().Is4() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening a socket: %w", err)
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	for _, opt := range []int{unix.SO_SNDTIMEO, unix.SO_RCVTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("setting socket timeouts: %w", err)
		}
	}
	return fd, nil
}

// connectFD connects fd to ap, blocking up to timeout.
func connectFD(fd int, ap netip.AddrPort, timeout time.Duration) error {
	err := unix.Connect(fd, sockaddr(ap))
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINPROGRESS):
		// A blocking connect() with SO_SNDTIMEO returns this when the
		// timeout expires.
		return fmt.Errorf("connecting to %s: %w after %v", ap, errTimeout, timeout)
	case errors.Is(err, unix.EINTR):
		// With a finite timeout a signal ends the wait with EINTR
		// (sock_intr_errno) while the handshake goes on: wait for it.
		return waitConnected(fd, ap, timeout)
	default:
		return fmt.Errorf("connecting to %s: %w", ap, err)
	}
}

func waitConnected(fd int, ap netip.AddrPort, timeout time.Duration) error {
	if err := waitFD(fd, unix.POLLOUT, time.Now().Add(timeout)); err != nil {
		return fmt.Errorf("connecting to %s: %w", ap, err)
	}
	soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return fmt.Errorf("connecting to %s: reading SO_ERROR: %w", ap, err)
	}
	if soerr != 0 {
		return fmt.Errorf("connecting to %s: %w", ap, unix.Errno(soerr))
	}
	return nil
}

// waitFD polls fd for events until deadline.
func waitFD(fd int, events int16, deadline time.Time) error {
	for {
		ms := int(time.Until(deadline).Milliseconds())
		if ms <= 0 {
			return errTimeout
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: events}}
		n, err := unix.Poll(pfd, ms)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("poll: %w", err)
		}
		if n > 0 {
			return nil
		}
	}
}

// writeFD writes all of b.
func writeFD(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			return fmt.Errorf("writing: %w", errTimeout)
		}
		if err != nil {
			return fmt.Errorf("writing: %w", err)
		}
		b = b[n:]
	}
	return nil
}

// readFull reads exactly len(b) bytes.
func readFull(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Read(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			return fmt.Errorf("reading: %w", errTimeout)
		}
		if err != nil {
			return fmt.Errorf("reading: %w", err)
		}
		if n == 0 {
			return errors.New("reading: connection closed by the server")
		}
		b = b[n:]
	}
	return nil
}

// crrOnce is one connect-request-response-close transaction: it returns
// the time connect() took and the time of the whole transaction, socket
// creation to close.
func crrOnce(ap netip.AddrPort, timeout time.Duration) (connect, total time.Duration, err error) {
	start := time.Now()
	fd, err := newSocket(ap, unix.SOCK_STREAM, timeout)
	if err != nil {
		return 0, 0, err
	}
	c0 := time.Now()
	if err := connectFD(fd, ap, timeout); err != nil {
		unix.Close(fd)
		return 0, 0, err
	}
	connect = time.Since(c0)
	if err := exchange1(fd); err != nil {
		unix.Close(fd)
		return 0, 0, err
	}
	if err := unix.Close(fd); err != nil {
		return 0, 0, fmt.Errorf("closing: %w", err)
	}
	return connect, time.Since(start), nil
}

// exchange1 sends one byte and reads its echo.
func exchange1(fd int) error {
	b := [1]byte{'x'}
	if err := writeFD(fd, b[:]); err != nil {
		return err
	}
	return readFull(fd, b[:])
}

// micros converts a duration to the float64 microseconds samples are in.
func micros(d time.Duration) float64 {
	return float64(d.Nanoseconds()) / 1e3
}
