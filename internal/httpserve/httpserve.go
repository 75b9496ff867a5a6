// Package httpserve serves an http.Handler until a context is cancelled. The
// health and metrics endpoints share it.
package httpserve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"k8s.io/klog/v2"
)

const (
	// shutdownTimeout bounds how long in-flight requests may take to finish
	// once the context is cancelled; then connections are closed.
	shutdownTimeout = 5 * time.Second
	// readHeaderTimeout stops clients that open a connection and never send
	// a request from holding it forever.
	readHeaderTimeout = 10 * time.Second
)

// ListenAndServe listens on addr (host:port) and serves h until ctx is
// cancelled. It returns nil after a shutdown caused by ctx, and an error if
// it cannot listen or serving fails.
func ListenAndServe(ctx context.Context, name, addr string, h http.Handler) error {
	// Listening is quick; a cancelled ctx is handled by Serve, which then
	// returns nil like any other shutdown.
	var lc net.ListenConfig
	ln, err := lc.Listen(context.WithoutCancel(ctx), "tcp", addr)
	if err != nil {
		return fmt.Errorf("listening for %s on %s: %w", name, addr, err)
	}
	return Serve(ctx, name, ln, h)
}

// Serve serves h on ln until ctx is cancelled, and closes ln. It returns nil
// after a shutdown caused by ctx. Tests pass a listener on 127.0.0.1:0 to
// learn the address.
func Serve(ctx context.Context, name string, ln net.Listener, h http.Handler) error {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
	}

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	klog.InfoS("Serving", "server", name, "address", ln.Addr().String())

	select {
	case err := <-errc:
		// Serve only returns early on a listener failure.
		return fmt.Errorf("serving %s on %s: %w", name, ln.Addr(), err)
	case <-ctx.Done():
	}

	// The parent context is done, so the shutdown needs its own deadline.
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		klog.V(2).InfoS("Graceful shutdown incomplete, closing connections", "server", name, "err", err)
		_ = srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serving %s on %s: %w", name, ln.Addr(), err)
	}
	klog.V(2).InfoS("Stopped serving", "server", name, "address", ln.Addr().String())
	return nil
}
