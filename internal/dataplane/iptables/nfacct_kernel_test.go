package iptables

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// nfacct counters belong to a network namespace: the iptables mode's in a
// node's namespace are not another namespace's (kube-proxy's, in the
// fidelity test, or the machine's).
func TestKernelNFAcctCountersPerNamespace(t *testing.T) {
	a, b := nodeNS(t), nodeNS(t)
	na, err := openNFAcct(a)
	if err != nil {
		t.Skipf("no nfacct in this kernel: %v", err)
	}
	defer na.Close()
	nb, err := openNFAcct(b)
	if err != nil {
		t.Fatal(err)
	}
	defer nb.Close()
	if err := na.ensure(nfacctInvalidDropped); err != nil {
		t.Fatal(err)
	}
	if err := na.ensure(nfacctInvalidDropped); err != nil {
		t.Fatalf("ensuring an existing counter: %v", err)
	}
	if n, err := na.packets(nfacctInvalidDropped); err != nil || n != 0 {
		t.Errorf("new counter: %d packets, %v", n, err)
	}
	if _, err := nb.packets(nfacctInvalidDropped); !errors.Is(err, unix.ENOENT) {
		t.Errorf("another namespace's counter is visible: %v", err)
	}
	if err := na.remove(nfacctInvalidDropped); err != nil {
		t.Fatal(err)
	}
	if _, err := na.packets(nfacctInvalidDropped); !errors.Is(err, unix.ENOENT) {
		t.Errorf("removed counter still there: %v", err)
	}
}
