package iptables

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// nfacct talks to the kernel's extended accounting objects (nfnetlink_acct,
// what the nfacct tool manages) in one network namespace: kube-proxy
// counts the packets two of its rules match in them, for its
// kubeproxy_iptables_ct_state_invalid_dropped_packets_total and
// kubeproxy_iptables_localhost_nodeports_accepted_packets_total metrics.
type nfacct struct {
	sock *nl.NetlinkSocket
}

// nfnetlink_acct's commands and attributes (linux/netfilter/nfnetlink_acct.h).
const (
	nfacctNew = 0
	nfacctGet = 1
	nfacctDel = 3 // 2 is GET_CTRZERO

	nfacctAttrName    = 1
	nfacctAttrPackets = 2
)

// openNFAcct opens a netfilter netlink socket in the namespace at nsPath
// (this process's if empty). It fails where the kernel has no
// nfnetlink_acct: the rules are then written without counters.
func openNFAcct(nsPath string) (*nfacct, error) {
	target := netns.None()
	if nsPath != "" {
		ns, err := netns.GetFromPath(nsPath)
		if err != nil {
			return nil, fmt.Errorf("opening network namespace %s: %w", nsPath, err)
		}
		defer ns.Close()
		target = ns
	}
	// With a target, the socket is made on a locked thread inside it; a
	// socket keeps its namespace.
	sock, err := nl.GetNetlinkSocketAt(target, netns.None(), unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("opening a netfilter netlink socket: %w", err)
	}
	n := &nfacct{sock: sock}
	// A lookup of a name that does not exist tells whether the subsystem
	// is there at all.
	if _, err := n.packets("kube-bpf-proxy-probe"); err != nil && !errors.Is(err, unix.ENOENT) {
		sock.Close()
		return nil, fmt.Errorf("nfacct is not available: %w", err)
	}
	return n, nil
}

func (n *nfacct) request(cmd int, flags uint16, name string) *nl.NetlinkRequest {
	req := &nl.NetlinkRequest{
		NlMsghdr: unix.NlMsghdr{
			Len:   uint32(unix.SizeofNlMsghdr),
			Type:  uint16(cmd | unix.NFNL_SUBSYS_ACCT<<8),
			Flags: flags,
		},
		Sockets: map[int]*nl.SocketHandle{unix.NETLINK_NETFILTER: {Socket: n.sock}},
	}
	req.AddData(&nl.Nfgenmsg{NfgenFamily: unix.AF_UNSPEC, Version: nl.NFNETLINK_V0})
	req.AddData(nl.NewRtAttr(nfacctAttrName, nl.ZeroTerminated(name)))
	return req
}

// ensure creates the counter unless it exists.
func (n *nfacct) ensure(name string) error {
	_, err := n.packets(name)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.ENOENT) {
		return err
	}
	_, err = n.request(nfacctNew, unix.NLM_F_REQUEST|unix.NLM_F_CREATE|unix.NLM_F_ACK, name).Execute(unix.NETLINK_NETFILTER, 0)
	if err != nil && !errors.Is(err, unix.EBUSY) { // EBUSY: created meanwhile
		return fmt.Errorf("creating nfacct counter %s: %w", name, err)
	}
	return nil
}

// packets reads a counter's packet count.
func (n *nfacct) packets(name string) (uint64, error) {
	msgs, err := n.request(nfacctGet, unix.NLM_F_REQUEST|unix.NLM_F_ACK, name).Execute(unix.NETLINK_NETFILTER, 0)
	if err != nil {
		return 0, err
	}
	for _, m := range msgs {
		if len(m) < nl.SizeofNfgenmsg {
			continue
		}
		attrs, err := nl.ParseRouteAttr(m[nl.SizeofNfgenmsg:])
		if err != nil {
			return 0, err
		}
		for _, a := range attrs {
			if a.Attr.Type == nfacctAttrPackets && len(a.Value) == 8 {
				return binary.BigEndian.Uint64(a.Value), nil
			}
		}
	}
	return 0, fmt.Errorf("nfacct counter %s: no packet count in the answer", name)
}

// remove deletes a counter; one still used by a rule (EBUSY) or gone
// already (ENOENT) is left as it is.
func (n *nfacct) remove(name string) error {
	_, err := n.request(nfacctDel, unix.NLM_F_REQUEST|unix.NLM_F_ACK, name).Execute(unix.NETLINK_NETFILTER, 0)
	if err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EBUSY) {
		return nil
	}
	return fmt.Errorf("deleting nfacct counter %s: %w", name, err)
}

func (n *nfacct) Close() { n.sock.Close() }
