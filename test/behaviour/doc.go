// Package behaviour holds the behaviour suite both datapath modes must pass:
// the same scenarios, in test network namespaces on the real kernel, run
// against the eBPF datapath and against the iptables datapath with each
// iptables backend, each for IPv4 and for IPv6 (and a dual-stack node).
// Where the modes differ by nature the suite asserts each
// mode's own behaviour and says why. It has no code outside its tests.
package behaviour
