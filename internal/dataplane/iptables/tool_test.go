package iptables

import (
	"context"
	"errors"
	"os/exec"
	"testing"
)

// A stop that lands while the backend is being detected kills iptables-save;
// that must read as the stop, not as a node whose iptables does not work
// (which once turned a SIGTERM during start-up into exit status 1).
func TestDetectBackendReportsTheStop(t *testing.T) {
	if _, err := exec.LookPath("iptables-nft-restore"); err != nil {
		t.Skip("iptables is not installed")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	backend, err := detectBackend(ctx, Config{}.tool(""))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("detectBackend after a stop = %q, %v; want an error wrapping context.Canceled", backend, err)
	}
}
