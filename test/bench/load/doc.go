// Package load is the benchmark's traffic: the server every server pod runs
// and the client workloads the client pods run. Both are subcommands of the
// benchmark binary (hack/bench), started inside pods so that they live in the
// pod's network namespace and the node's cgroup, where the proxies' socket
// programs attach:
//
//	<bench-binary> server [--name NAME] [--echo-port P] ...
//	<bench-binary> client crr|rr|udp|rate|watch|poll [flags]
//
// ServerMain prints ServerReadyLine once every listener is bound. Every
// client workload but watch writes one JSON document on stdout (LatencyResult,
// RateResult, PollResult); watch prints lines as they happen instead (see
// ClientMain), because the orchestrator times endpoint changes from them.
//
// # Latency workloads
//
// crr, rr and udp take --targets DIRECT[,SERVICE] (IP:port each) and
// alternate the targets sample by sample: iteration i measures both, the
// order swapped on odd iterations, after --warmup unrecorded iterations.
// They use blocking system calls on raw sockets, as netperf does, rather
// than Go's poller, whose wake-ups would add scheduling noise of the same
// order as the differences measured.
//
// # Client ports and TIME_WAIT
//
// crr and the connect rate workload close the connection from the client
// side, as netperf's TCP_CRR does, so every connection leaves a TIME_WAIT
// socket in the client pod for 60 s (TCP_TIMEWAIT_LEN, not tunable). A new
// connection may not reuse the 4-tuple of one in TIME_WAIT, so a client pod
// can open about as many connections to one destination address and port
// per minute as its ephemeral range holds (net.ipv4.ip_local_port_range,
// 32768-60999 by default: 28232). With connect-time translation (the ebpf
// contender) a ClusterIP connection's socket is bound to the pod IP, so
// direct and service share that one budget. Past it connect() fails with
// EADDRNOTAVAIL, counted as errors (the results' FirstError says so).
//
// So: crr's 2 × (count + warmup) connections plus any connect-rate phases
// against the same server pod within a minute must stay below ~28k per client
// pod, or the orchestrator sets net.ipv4.tcp_tw_reuse=1 (per network
// namespace: then a TIME_WAIT 4-tuple is reusable after 1 s, timestamps
// being on) and may widen ip_local_port_range in the client pods. The client
// binds nothing itself and does not reset connections (SO_LINGER 0) in crr
// or connect-rate: that would skip the close handshake the proxies' datapath
// sees in real traffic. watch and poll read the server's close first (the
// name server closes), so they leave no TIME_WAIT on the client.
package load
