package httpserve

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// stopTimeout only turns a hang into a failure; nothing depends on speed.
const stopTimeout = 30 * time.Second

func waitErr(t *testing.T, errc <-chan error) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(stopTimeout):
		t.Fatal("server did not stop after its context was cancelled")
		return nil
	}
}

func TestServeStopsOnCancel(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	errc := make(chan error, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "hello") })
	go func() { errc <- Serve(ctx, "test", ln, h) }()

	resp, err := http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("GET while serving: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if string(body) != "hello" {
		t.Errorf("body %q, want %q", body, "hello")
	}

	cancel()
	if err := waitErr(t, errc); err != nil {
		t.Errorf("Serve returned %v after cancel, want nil", err)
	}
	if conn, err := net.Dial("tcp", addr); err == nil {
		_ = conn.Close()
		t.Error("listener still accepts connections after Serve returned")
	}
}

func TestListenAndServe(t *testing.T) {
	tests := []struct {
		name    string
		addr    string
		wantErr bool
	}{
		{name: "ephemeral port stops on cancel", addr: "127.0.0.1:0"},
		{name: "bad address", addr: "127.0.0.1:notaport", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			t.Cleanup(cancel)
			errc := make(chan error, 1)
			go func() { errc <- ListenAndServe(ctx, "test", tc.addr, http.NotFoundHandler()) }()
			if !tc.wantErr {
				cancel()
			}
			err := waitErr(t, errc)
			if (err != nil) != tc.wantErr {
				t.Errorf("ListenAndServe(%q) = %v, want error %v", tc.addr, err, tc.wantErr)
			}
		})
	}
}
