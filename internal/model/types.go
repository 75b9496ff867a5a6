// Package model is the proxy's picture of what the datapath must serve: service
// ports, their frontends and the backends chosen for them. It is pure Go: it
// takes Kubernetes API objects at its edge and hands out its own types, so the
// datapaths never see client-go or API types and the model never sees a kernel.
package model

import (
	"fmt"
	"net/netip"
	"time"
)

// Protocol is an IP protocol number as the kernel uses it.
type Protocol uint8

const (
	TCP Protocol = 6
	UDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	default:
		return fmt.Sprintf("proto-%d", uint8(p))
	}
}

// ServiceName identifies a Service object.
type ServiceName struct {
	Namespace string
	Name      string
}

func (n ServiceName) String() string { return n.Namespace + "/" + n.Name }

// ServicePortName identifies one port of a Service. The protocol is part of
// it: TCP and UDP on the same port number are different service ports.
type ServicePortName struct {
	ServiceName
	Port     string // the port's name in the Service spec; "" for a single unnamed port
	Protocol Protocol
}

func (n ServicePortName) String() string {
	return fmt.Sprintf("%s:%s/%s", n.ServiceName, n.Port, n.Protocol)
}

// Frontend is an address clients connect to: (IP, port, protocol).
type Frontend struct {
	IP       netip.Addr
	Port     uint16
	Protocol Protocol
}

func (f Frontend) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.IP, f.Port), f.Protocol)
}

// Backend is one endpoint a frontend forwards to. Its protocol is the
// frontend's.
type Backend struct {
	IP   netip.Addr
	Port uint16
}

func (b Backend) String() string { return netip.AddrPortFrom(b.IP, b.Port).String() }

// AddrPortSet returns the backends as a set of address:port pairs, for
// matching flows and sockets against them.
func AddrPortSet(backends []Backend) map[netip.AddrPort]bool {
	set := make(map[netip.AddrPort]bool, len(backends))
	for _, b := range backends {
		set[netip.AddrPortFrom(b.IP, b.Port)] = true
	}
	return set
}

// Compare orders backends by address, then port.
func (b Backend) Compare(o Backend) int {
	if c := b.IP.Compare(o.IP); c != 0 {
		return c
	}
	return int(b.Port) - int(o.Port)
}

// ServicePort is one port of a Service as the datapath serves it: its
// ClusterIP frontend and the backends chosen for it by the endpoint selection
// rules (ready endpoints, else serving-and-terminating ones). Backends are
// sorted and unique; an empty list means the frontend refuses connections.
type ServicePort struct {
	Name      ServicePortName
	ClusterIP Frontend
	// Backends take new connections.
	Backends []Backend
	// Serving lists every endpoint whose serving condition holds, chosen for
	// new connections or not (a terminating pod still draining, a pod that
	// serves but is not ready): sorted, unique, nil when empty. Flows and
	// sockets already established to one of them are left alone, as
	// kube-proxy keeps UDP conntrack entries to serving endpoints; those to
	// any other backend are stale. It aliases Backends when the two are
	// equal, which is the common case.
	Serving []Backend
}

// Snapshot is the desired state handed to a datapath in one sync.
//
// A full snapshot lists every service to serve; anything a datapath serves
// that is not in it must go. A partial snapshot lists only the services that
// changed since the previous snapshot; a changed service that is gone, or has
// nothing left to serve, maps to an empty slice.
type Snapshot struct {
	Full     bool
	Services map[ServiceName][]ServicePort
	// TriggerTimes holds, per Service, the last-change-trigger-time of
	// each EndpointSlice change this snapshot is the first to include
	// (only changes made after the Tracker started that changed what is
	// served; a change to a slice that came before its Service is
	// included with the Service's arrival); nil if none. The
	// proxy observes now minus each one once the snapshot is programmed,
	// as kube-proxy's network programming latency. Datapaths ignore it.
	TriggerTimes map[ServiceName][]time.Time
}
