// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level load balancing of Kubernetes Services.
 *
 * connect4 (TCP, connected UDP) and sendmsg4 (unconnected UDP) rewrite the
 * destination of a socket from a Service frontend (VIP, port, protocol) to one
 * of its backends, so packets leave the socket already addressed to a pod and
 * need no NAT or conntrack. recvmsg4 and getpeername4 undo the rewrite for what
 * the application sees, so replies and peer names show the VIP.
 *
 * AF_INET6 sockets (IPV6_V6ONLY off, as Java's are by default) reach an IPv4
 * Service as ::ffff:VIP. Which hook runs, as measured with per-program run
 * counts on Linux 6.18 (ebpf.TestKernelHooksPerPath checks it):
 *   TCP connect(::ffff:VIP)         connect6; tcp_v6_connect then calls
 *                                   tcp_v4_connect directly, no connect4
 *   UDP connect(::ffff:VIP)         connect6
 *   UDP sendto(::ffff:VIP)          sendmsg4, not sendmsg6: udpv6_sendmsg
 *                                   hands a v4-mapped destination to
 *                                   udp_sendmsg as a sockaddr_in
 *   UDP send() when connected       sendmsg4 as well, with the peer (the
 *                                   backend already): not a Service, a miss,
 *                                   and no Service address: let through
 *   recvfrom(), getpeername()       recvmsg6, getpeername6, showing ::ffff:
 *   connect/sendto(sockaddr_in)     connect4, sendmsg4: the IPv4 path
 * So connect6, recvmsg6 and getpeername6 handle v4-mapped addresses through
 * the IPv4 maps (the backend stays v4-mapped), and sendmsg6 never sees one:
 * the kernel never shows it a v4-mapped destination, and refuses one it
 * writes (ENOTSUPP). This holds on every kernel these programs load on
 * (5.10 and later, see "Kernels" below): udpv6_sendmsg sent v4-mapped
 * destinations to udp_sendmsg before the sendmsg hooks came (4.18), and the
 * *6 hooks we use exist since 4.17 (connect6), 4.18 (sendmsg6), 5.2
 * (recvmsg6) and 5.8 (getpeername6). Anything that is not v4-mapped is real
 * IPv6: connect6, sendmsg6, recvmsg6 and getpeername6 serve it through the
 * kbp6_* maps, exactly as the *4 programs serve IPv4 (see "IPv6" below).
 *
 * Kernels. The floor is Linux 5.10: getpeername hooks (5.8), sock_release
 * (5.9), bpf_get_netns_cookie for these programs (5.7). Two helpers are
 * newer and used only where the kernel has them, as the loader's probes
 * find at start (internal/dataplane/ebpf/features.go), through the
 * read-only constants kbp_have_*: the verifier knows a frozen read-only
 * global's value (5.2) and never walks the branch it rules out, so a call
 * to a helper the kernel lacks is dead code it does not check.
 *   bpf_set_retval (5.18)    refusals fail with ECONNREFUSED; without it
 *                            with EPERM, the error a cgroup program's
 *                            denial gives (counted: refused_with_eperm)
 *   bpf_ktime_get_coarse_ns  affinity's clock; without it
 *   (5.11)                   bpf_ktime_get_ns, the same clock read exactly
 *
 * Map layout (written by internal/dataplane/ebpf, make-before-break):
 *   kbp_services  frontend -> {id word, backend count}. A frontend is a
 *                 ClusterIP, a NodePort on a node address, a local
 *                 external IP or a LoadBalancer IP (see "Frontends").
 *                 The id word holds the service id in its low 24 bits
 *                 and flags (enum svc_flag) in its high 8, so that all
 *                 come in the one load that reads the entry. (Flags there
 *                 rather than in the count: a binary from before them,
 *                 started over these maps, reads an unknown id, and its
 *                 first sync serves the ClusterIPs under it again; a
 *                 count it reads must be one.)
 *   kbp_slots     {service id, slot 0..count-1} -> backend id
 *   kbp_backends  backend id -> {address, port, protocol}
 *   kbp_revnat    socket cookie -> the socket's last REVNAT_PAIRS
 *                 {backend, frontend} pairs, written at connect/sendmsg,
 *                 read at recvmsg/getpeername and by user space's UDP
 *                 socket cleanup, deleted by sock_release whenever a
 *                 socket closes (connected or not, its peer cleared or
 *                 not): no entry outlives its socket, so the map holds
 *                 live sockets only (--bpf-sock-revnat-max sizes it; a full
 *                 map is counted, STAT_REVNAT_UPDATE_FAILED). One format
 *                 for AF_INET and AF_INET6 sockets: IPv4 addresses (an
 *                 AF_INET6 socket sent to a real IPv6 backend has its
 *                 pairs in kbp6_revnat).
 *                 bpf_get_socket_cookie came to sock_addr programs in
 *                 4.19 and to sock_release's (CGROUP_SOCK) in 5.7, the
 *                 sock_release hook in 5.9.
 *   kbp_stats     per-CPU event counters (nothing here logs)
 *   kbp_svc_stats service id -> per-CPU counters of that service port;
 *                 user space creates a zeroed entry before the id's
 *                 frontend appears and deletes it when the id is freed,
 *                 programs only look up and add
 *   kbp_affinity  {client netns cookie, service id} -> {backend id, last
 *                 use}: session affinity, written by the programs (LRU)
 *   kbp_aff_match {service id, backend id} -> affinity timeout, for each
 *                 backend of a service id with affinity: what an affinity
 *                 entry may still be used for
 *   kbp_cluster_ips  the ClusterIPs (any port), ours and other proxies',
 *                 and
 *   kbp_svc_ranges   the Service CIDRs: a connect to a ClusterIP on a port
 *                 it does not serve, or to an address of the Service range
 *                 that is no ClusterIP, is refused (see refusal_of)
 *   kbp_node      the node's network namespace cookie, and node-wide
 *                 flags (struct node_config)
 *
 * Frontends. A service id stands for a set of frontends that share one
 * backend list: a service port's ClusterIP, and its external frontends as
 * sockets on the node reach them, which go to the port's Cluster endpoints
 * even under externalTrafficPolicy Local (kube-proxy's short circuit for
 * traffic from the node and its pods). Under internalTrafficPolicy Local
 * the two lists differ and the port has two ids. External frontends served
 * here are NodePorts on the node addresses chosen for them, external IPs
 * that are the node's own, and LoadBalancer IPs without source ranges
 * (with ranges the source address decides, which a socket does not have
 * at connect(): the iptables rules serve those). An external IP elsewhere
 * is left alone here, but the packet layer's iptables rules, kube-proxy's,
 * still capture the node's and pods' packets to it: as with kube-proxy,
 * a Service naming another's address intercepts it (CVE-2020-8554), which
 * only admission control prevents. Host-scoped external IPs and
 * LoadBalancer IPs (loopback, link-local, multicast, broadcast) are never
 * served here: in a pod they are the pod's own. A loopback NodePort
 * frontend is the node's loopback: it is served to the node's own sockets
 * only, a pod's 127.0.0.1 being the pod's.
 *
 * IPv6 Services have maps of their own, kbp6_* (see "IPv6" at their
 * definitions); kbp_stats and kbp_node serve both families.
 *
 * Map sizes below are placeholders: the loader sets them from its flags.
 */
#include "include/kbp.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/*
 * What the running kernel offers, set by the loader before the programs
 * load (see "Kernels" above). The defaults are the newest kernel's.
 */
volatile const __u8 kbp_have_set_retval = 1;
volatile const __u8 kbp_have_ktime_coarse = 1;

struct svc_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct svc_value {
	/* The service id in the bits of SVC_ID_MASK, enum svc_flag above. */
	__u32 id;
	__u32 count; /* 0: the service exists and refuses connections */
};

/*
 * The high bits of a frontend's id word. The first two are the service
 * id's, written alike in each of its frontends; the others say what kind
 * of frontend the entry is.
 */
enum svc_flag {
	SVC_ID_MASK = 0x00ffffff,
	/* Session affinity: reuse the client's last backend (kbp_affinity). */
	SVC_F_AFFINITY = 1 << 24,
	/*
	 * With count 0: this node has no endpoint for the port's
	 * internalTrafficPolicy Local, others have (see choose_backend).
	 */
	SVC_F_NO_LOCAL_ENDPOINT = 1 << 25,
	SVC_F_NODEPORT = 1 << 26,
	/* An external IP or a LoadBalancer IP. */
	SVC_F_EXTERNAL = 1 << 27,
	/* Served to sockets in the node's network namespace only. */
	SVC_F_NODE_NETNS_ONLY = 1 << 28,
};

struct slot_key {
	__u32 svc_id;
	__u32 slot;
};

struct backend_value {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* An IPv4 address and port: a frontend, or in a pair the backend. */
struct revnat_value {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

/*
 * A backend a socket was sent to, and the frontend it asked for. Aligned
 * to 8 so that clang reads and writes each half in one 8-byte access (it
 * splits an access it cannot prove aligned into 4-byte ones).
 */
struct revnat_pair {
	struct revnat_value backend;
	struct revnat_value frontend;
} __attribute__((aligned(8)));

/*
 * Pairs kept per socket: a connected socket needs one, an unconnected one
 * one per Service it sends to, and a resolver sends to a few nameservers
 * (glibc and musl read at most 3) from one socket. The newest replaces
 * the oldest.
 */
#define REVNAT_PAIRS 4
_Static_assert((REVNAT_PAIRS & (REVNAT_PAIRS - 1)) == 0, "REVNAT_PAIRS is a power of two");

/* kbp_revnat's value: one socket's pairs; an unused one is all zero. */
struct sock_revnat {
	struct revnat_pair pairs[REVNAT_PAIRS];
	__u32 next; /* the pair a new backend replaces, modulo REVNAT_PAIRS */
	__u32 pad;
};

/*
 * Session affinity is keyed by the client's network namespace: at
 * connect() a socket has no source address yet (it is chosen by the route
 * to the backend, which is what the program is choosing), and a pod has
 * one address, so its namespace stands for the client IP kube-proxy keys
 * on. The node's own processes (hostNetwork pods included) share the
 * node's namespace, and so one affinity, as they share the node's
 * addresses for kube-proxy.
 */
struct affinity_key {
	__u64 netns_cookie;
	__u32 svc_id;
	__u32 pad;
};

struct affinity_value {
	__u32 backend_id;
	/* Seconds of CLOCK_MONOTONIC at the last connect that used it. */
	__u32 last_used;
};

struct match_key {
	__u32 svc_id;
	__u32 backend_id;
};

/*
 * One range of Service addresses, in kbp_svc_ranges. Entries are used in
 * index order up to the first RANGE_END.
 */
struct svc_range {
	__be32 net;
	__u8 bits; /* prefix length */
	__u8 kind; /* enum range_kind */
	__u16 pad;
};

/*
 * Values of kbp_cluster_ips: a ClusterIP of ours (its other ports are
 * refused), or one of a Service another proxy serves (labelled
 * service.kubernetes.io/service-proxy-name), left alone, as kube-proxy
 * leaves it, for that proxy to serve.
 */
enum cluster_ip_kind {
	CLUSTER_IP_OURS = 0,
	CLUSTER_IP_FOREIGN = 1,
};

enum range_kind {
	RANGE_END = 0,
	/* A Service CIDR: an address in it that is no ClusterIP is refused. */
	RANGE_SERVICE_CIDR = 1,
	/*
	 * ClusterIPs may lie here, outside every Service CIDR known (or
	 * none is known): only the ClusterIPs themselves are refused.
	 */
	RANGE_CLUSTER_IPS = 2,
};

/* Entries of kbp_svc_ranges. */
#define MAX_SVC_RANGES 16

/*
 * kbp_node's one entry: the node's network namespace cookie in the bits of
 * NODE_COOKIE_MASK, and flags (NODE_F_*) in the high byte, so that one load
 * reads both and the value keeps the size it had before the flags (a map
 * pinned by an earlier version stays usable; its flags are 0). The kernel
 * counts network namespaces from 1 (net_cookie, Linux 5.7): a cookie never
 * comes near 2^56.
 */
struct node_config {
	__u64 netns_cookie;
};

#define NODE_COOKIE_MASK 0x00ffffffffffffffULL
/*
 * Socket-level load balancing for the node's own network namespace only
 * (--bpf-socket-lb-host-netns-only): a socket in any other (a pod's) is
 * neither translated nor refused, and its packets meet the packet layer's
 * iptables rules, ClusterIPs included. A service mesh sidecar that
 * redirects the pod's traffic with iptables then reads the Service address
 * as the original destination, not a backend's.
 */
#define NODE_F_HOST_NETNS_ONLY (1ULL << 63)

/*
 * What happened to one service port, per CPU. User space sums the CPUs.
 * Each counter is incremented without atomics: a program runs on one CPU
 * and migration is disabled while it does, so only two runs interleaving
 * on one CPU (preemptible RCU) could lose an increment, as for kbp_stats.
 */
struct svc_stats {
	__u64 connections; /* connect4/connect6 translated: TCP, connected UDP */
	__u64 datagrams;   /* sendmsg4 translated: unconnected UDP */
	__u64 refused;     /* every refusal: no (local) backend, missing slot or backend */
	__u64 reverse;     /* recvmsg and getpeername shown the frontend */
};

/*
 * New indexes go at the end: the pinned counters keep their meaning
 * across versions, and the map grows (the loader copies it).
 */
enum stat_index {
	STAT_CONNECT_TRANSLATED = 0,
	STAT_SENDMSG_TRANSLATED = 1,
	STAT_REFUSED_NO_BACKEND = 2,
	STAT_REFUSED_MISSING_SLOT = 3,
	STAT_REVNAT_TRANSLATED = 4,
	STAT_REVNAT_UPDATE_FAILED = 5,
	STAT_LOOKUP_RACED = 6,
	STAT_REFUSED_MISSING_BACKEND = 7,
	/* Translations (connects and datagrams) by kind of frontend. */
	STAT_NODEPORT_TRANSLATED = 8,
	STAT_EXTERNAL_TRANSLATED = 9,
	STAT_AFFINITY_HIT = 10,
	STAT_REFUSED_UNKNOWN_PORT = 11,
	STAT_REFUSED_UNALLOCATED = 12,
	STAT_REFUSED_NO_LOCAL_ENDPOINT = 13,
	/*
	 * Refusals that failed with EPERM instead of ECONNREFUSED: the kernel
	 * has no bpf_set_retval (before 5.18). Also counted by reason.
	 */
	STAT_REFUSED_EPERM = 14,
	STAT_MAX = 15,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct slot_key);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend_value);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_backends SEC(".maps");

/*
 * Keyed by socket cookie alone, so that sock_release can delete a socket's
 * entry whatever became of its peer. A plain hash, not an LRU: eviction
 * would drop live sockets' entries (an idle connected UDP socket's replies
 * would then show the pod address, and the socket cleanup could no longer
 * find it); with every entry deleted at close, a full map means that many
 * live translated sockets, and is counted. Not preallocated (hash maps
 * without preallocation since Linux 4.6): memory follows the live
 * sockets (about 130 bytes each before allocator rounding), not
 * --bpf-sock-revnat-max.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct sock_revnat);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, enum stat_index);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_stats SEC(".maps");

/*
 * Not preallocated: a per-CPU entry costs 32 bytes on every possible CPU,
 * so only the service ids in use take memory (--bpf-service-ports-max sizes it).
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32);
	__type(value, struct svc_stats);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_svc_stats SEC(".maps");

/*
 * LRU: a client namespace that goes, or stops using a Service, leaves an
 * entry that ages out; when the map is full the least recently used
 * affinity is forgotten, the client then picks a backend afresh.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct match_key);
	__type(value, __u32); /* the affinity timeout in seconds */
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_aff_match SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, __u32); /* enum cluster_ip_kind */
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_cluster_ips SEC(".maps");

/*
 * An array read in full by every connect that is no Service's: most
 * clusters have one Service CIDR per family, so the walk ends after two
 * entries, each an inlined array access and a compare. A hash lookup (a
 * set of the ClusterIPs) or an LPM trie walk costs more, and would be
 * paid by every connect to anything but a Service.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct svc_range);
	__uint(max_entries, MAX_SVC_RANGES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_svc_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct node_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp_node SEC(".maps");

/*
 * IPv6. Each family has its own set of maps, as Cilium's lb4_* and lb6_*:
 * kbp6_* hold what kbp_* hold, with 16-byte addresses where those have 4
 * (kbp6_services, kbp6_backends, kbp6_revnat, kbp6_clusterips,
 * kbp6_svc_ranges), and with ids of their own in those keyed by id
 * (kbp6_slots, kbp6_svc_stats, kbp6_affinity, kbp6_aff_match), their
 * layout that of the IPv4 ones. Shared id-keyed maps would save four maps,
 * but then the two families' reconcilers would share one id space and
 * each would have to tell the other's entries apart at restore and
 * collection; separate, each reconciler owns its maps whole and is the
 * same code over another address encoding, and the IPv4 programs touch
 * exactly the maps they touched before. kbp_stats and kbp_node are shared.
 * The same flags size both families' maps. (kbp6_clusterips, not
 * kbp6_cluster_ips: the kernel keeps 15 characters of a map's name, and
 * the pin and the kernel's name are to be the same.)
 */
struct in6_words {
	__be32 addr[4];
};

struct svc6_key {
	__be32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct backend6_value {
	__be32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* An IPv6 address and port: a frontend, or in a pair the backend. */
struct revnat6_value {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

/*
 * A pair is too wide to be written in one store: seq, 0 while it changes
 * and nonzero after, tells a reader on x86 (stores seen in order; as for
 * IPv4, see remember_frontend) whether it read one pair (frontend6_of).
 */
struct revnat6_pair {
	__u64 seq;
	struct revnat6_value backend;
	struct revnat6_value frontend;
};

struct sock_revnat6 {
	struct revnat6_pair pairs[REVNAT_PAIRS];
	__u32 next; /* the pair a new backend replaces, modulo REVNAT_PAIRS */
	__u32 seq;  /* the last seq written to a pair */
};

struct svc_range6 {
	__be32 net[4];
	__u8 bits;
	__u8 kind; /* enum range_kind */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc6_key);
	__type(value, struct svc_value);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct slot_key);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend6_value);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_backends SEC(".maps");

/* As kbp_revnat, for AF_INET6 sockets sent to real IPv6 backends. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct sock_revnat6);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32);
	__type(value, struct svc_stats);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct match_key);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_aff_match SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct in6_words);
	__type(value, __u32); /* enum cluster_ip_kind */
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_clusterips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct svc_range6);
	__uint(max_entries, MAX_SVC_RANGES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kbp6_svc_ranges SEC(".maps");

static __always_inline void count_event(enum stat_index index)
{
	__u64 *counter = bpf_map_lookup_elem(&kbp_stats, &index);

	if (counter)
		*counter += 1;
}

/*
 * Reading a value the reconciler may be overwriting at this moment: a
 * service's entry when its count changes, a slot when its backend is
 * replaced. Two kernel behaviours make a plain lookup unsafe there:
 *
 *  - An update of an existing key links the new element at the head of its
 *    bucket and then unlinks the old one: a lookup walking the bucket past
 *    the head, before the old element, when it is unlinked misses both.
 *  - The old element is freed at once and its memory may go to the very
 *    next update, of any key (bpf_mem_alloc since Linux 6.1; the per-CPU
 *    spare element of preallocated maps before): a value read through the
 *    pointer a lookup returned may by then be another key's.
 *
 * Measured on Linux 6.18 while slots were overwritten as fast as user space
 * can: backend lookups keyed by a pointer into a slot's value missed about
 * once in 25k connects, the key changing between hashing and comparing. So
 * the value is copied with one aligned load as soon as it is found, and the
 * key is looked up again: the second walk starts after any link of a new
 * element, and when the two copies differ the second, newer one is used.
 * When only the first lookup finds the key it was deleted meanwhile. A
 * slot is deleted only a grace period after it was hidden, so the first
 * copy is still one the caller may use (trust_first). A service's entry is
 * deleted at once, the delete being what hides it, and the first copy may
 * be of memory already reused by another key: that counts as a miss. One
 * more lookup per call, tens of nanoseconds.
 */
#define DEFINE_READ_VALUE(name, type, trust_first)				\
static __always_inline int name(void *map, const void *key, type *out)		\
{										\
	type *first = bpf_map_lookup_elem(map, key);				\
	type *again;								\
	type copy = 0;								\
										\
	if (first)								\
		copy = *(volatile type *)first;					\
	again = bpf_map_lookup_elem(map, key);					\
	if (!again) {								\
		*out = copy;							\
		return (trust_first) && first != 0;				\
	}									\
	*out = *(volatile type *)again;						\
	if (!first || *out != copy)						\
		count_event(STAT_LOOKUP_RACED);					\
	return 1;								\
}

/* For 8-byte values (a service's entry) and 4-byte ones (a slot's). */
DEFINE_READ_VALUE(read_value64, __u64, 0)
DEFINE_READ_VALUE(read_value32, __u32, 1)

/*
 * The counters of service id svc_id; NULL if it has none, which happens only
 * when user space could not create them or a restarted proxy has not yet.
 */
static __always_inline struct svc_stats *svc_stats_of(void *stats_map, __u32 svc_id)
{
	return bpf_map_lookup_elem(stats_map, &svc_id);
}

/*
 * Refuse the call with ECONNREFUSED instead of the EPERM a plain 0 gives,
 * counted globally by reason and on the service, if there is one (svc_id
 * 0 is none). Before Linux 5.18 a program cannot choose the errno: the
 * call fails with EPERM, at once all the same, and is counted as such.
 */
static __always_inline int refuse(enum stat_index reason, void *stats_map, __u32 svc_id)
{
	struct svc_stats *stats = 0;

	if (svc_id)
		stats = svc_stats_of(stats_map, svc_id);
	if (stats)
		stats->refused += 1;
	count_event(reason);
	if (kbp_have_set_retval)
		bpf_set_retval(-ECONNREFUSED);
	else
		count_event(STAT_REFUSED_EPERM);
	return 0;
}

/*
 * The slot a socket uses. TCP picks uniformly at random per connection. UDP
 * keeps one backend per socket while the backend set is unchanged, so that a
 * client's datagrams to a Service go to one peer (DNS resolvers expect the
 * answer from where they sent the question): the socket cookie is hashed
 * (Knuth's multiplicative hash spreads sequential cookies) and reduced.
 */
static __always_inline __u32 pick_slot(struct bpf_sock_addr *ctx, __u8 proto, __u32 count)
{
	__u64 cookie;
	__u32 h;

	if (proto == IPPROTO_TCP)
		return bpf_get_prandom_u32() % count;
	cookie = bpf_get_socket_cookie(ctx);
	h = (__u32)(cookie ^ (cookie >> 32)) * 2654435761U;
	return h % count;
}

/*
 * Makes clang compute p here, in a register, rather than from the loop
 * index where paths join: a pointer computed from an index that differs by
 * path is refused by the verifier without CAP_PERFMON ("pointer arithmetic
 * with it prohibited for !root"), as the DaemonSet runs.
 */
#define kbp_keep_pointer(p) asm volatile("" : "+r"(p))

/* An address and port as a revnat_value's 8 bytes, for one-store writes. */
static __always_inline __u64 revnat_word_of(__be32 addr, __be16 port)
{
	struct revnat_value v = {.addr = addr, .port = port};
	__u64 word;

	__builtin_memcpy(&word, &v, sizeof(word));
	return word;
}

/*
 * A socket's entry is created once and then written in place, never
 * replaced, so it stays at one address until sock_release deletes it, and
 * no program can run on a socket being released: a pointer to it is never
 * another socket's memory. A pair is two 8-byte words, each written in one
 * store. Replacing a pair clears its backend word first and writes it last,
 * so that a reader, which reads the backend, the frontend and the backend
 * again (frontend_of), never takes one pair's frontend for another's
 * backend on x86, whose stores are seen in order; elsewhere a torn read
 * needs another thread of the socket reading a reply from the pair being
 * replaced, in a window of a few instructions.
 */
static __always_inline void remember_frontend(struct bpf_sock_addr *ctx,
					      const struct backend_value *backend,
					      const struct svc_key *frontend)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u64 be = revnat_word_of(backend->addr, backend->port);
	__u64 fe = revnat_word_of(frontend->addr, frontend->port);
	struct sock_revnat *entry;
	__u32 i;
	long err;

	entry = bpf_map_lookup_elem(&kbp_revnat, &cookie);
	if (!entry) {
		struct sock_revnat fresh = {};

		__builtin_memcpy(&fresh.pairs[0].backend, &be, sizeof(be));
		__builtin_memcpy(&fresh.pairs[0].frontend, &fe, sizeof(fe));
		fresh.next = 1;
		err = bpf_map_update_elem(&kbp_revnat, &cookie, &fresh, BPF_NOEXIST);
		if (err == 0)
			return;
		/* Another thread of the socket made it meanwhile: add to it. */
		if (err == -EEXIST)
			entry = bpf_map_lookup_elem(&kbp_revnat, &cookie);
		if (!entry) {
			count_event(STAT_REVNAT_UPDATE_FAILED);
			return;
		}
	}
	/* A UDP socket calls sendmsg per datagram: write only on change. */
#pragma unroll
	for (i = 0; i < REVNAT_PAIRS; i++) {
		__u64 *b = (__u64 *)&entry->pairs[i].backend;
		__u64 *f = (__u64 *)&entry->pairs[i].frontend;

		kbp_keep_pointer(f);
		if (*(volatile __u64 *)b != be)
			continue;
		if (*(volatile __u64 *)f != fe)
			*(volatile __u64 *)f = fe;
		return;
	}
	/* Two threads racing here may pick one pair: one backend is lost. */
	i = *(volatile __u32 *)&entry->next & (REVNAT_PAIRS - 1);
	*(volatile __u32 *)&entry->next = i + 1;
	*(volatile __u64 *)&entry->pairs[i].backend = 0;
	*(volatile __u64 *)&entry->pairs[i].frontend = fe;
	*(volatile __u64 *)&entry->pairs[i].backend = be;
}

/*
 * The map values as single 64-bit words: each is copied in one aligned load
 * (see read_value64).
 */
union svc_word {
	__u64 word;
	struct svc_value value;
};

union backend_word {
	__u64 word;
	struct backend_value value;
};

union revnat_word {
	__u64 word;
	struct revnat_value value;
};

union affinity_word {
	__u64 word;
	struct affinity_value value;
};

union range_word {
	__u64 word;
	struct svc_range value;
};

/*
 * Why a connect to IPv4 address addr (in network order), which is no
 * frontend, is refused, as kube-proxy refuses it: a ClusterIP on a port
 * its Service does not have (STAT_REFUSED_UNKNOWN_PORT), or an address of
 * a Service CIDR that is no ClusterIP (STAT_REFUSED_UNALLOCATED); STAT_MAX
 * lets it through, as for a ClusterIP of another proxy's Service
 * (CLUSTER_IP_FOREIGN), whatever the port. The ranges are walked in order: the Service CIDRs,
 * then, if some ClusterIP lies outside them, a range that holds it. The
 * ClusterIP set is looked up only for an address in a range.
 *
 * The reconciler writes an entry in place, which a program may read while
 * it changes (an array's update copies into the element): each entry is
 * read in one load, so it is one range or the other, and a change of the
 * ranges (rare: a ServiceCIDR added or removed) may decide one connect by
 * the old ranges or a mix of old and new.
 */
static __always_inline enum stat_index refusal_of(__be32 addr)
{
	__u32 host = kbp_htonl(addr);
	__u32 *kind;
	__u32 i;

	/*
	 * Unrolled: verifiers before 6.x lose the counter's value once its
	 * stack slot is passed to a helper as the key, and refuse the loop
	 * as infinite (seen on 5.10); unrolled, each key is a constant.
	 */
#pragma unroll
	for (i = 0; i < MAX_SVC_RANGES; i++) {
		union range_word r;
		__u32 index = i;
		__u64 *word = bpf_map_lookup_elem(&kbp_svc_ranges, &index);
		__u32 mask;

		if (!word)
			break;
		r.word = *(volatile __u64 *)word;
		if (r.value.kind == RANGE_END)
			break;
		if (r.value.bits == 0)
			mask = 0;
		else if (r.value.bits >= 32)
			mask = ~0U;
		else
			mask = ~0U << (32 - r.value.bits);
		if ((host & mask) != (kbp_htonl(r.value.net) & mask))
			continue;
		kind = bpf_map_lookup_elem(&kbp_cluster_ips, &addr);
		if (kind)
			return *(volatile __u32 *)kind == CLUSTER_IP_FOREIGN ? STAT_MAX : STAT_REFUSED_UNKNOWN_PORT;
		if (r.value.kind == RANGE_SERVICE_CIDR)
			return STAT_REFUSED_UNALLOCATED;
		return STAT_MAX;
	}
	return STAT_MAX;
}

/*
 * The word of struct node_config, read in one load; 0 (no cookie, no
 * flags) if absent. It is written once, at start.
 */
static __always_inline __u64 node_word(void)
{
	__u32 zero = 0;
	__u64 *word = bpf_map_lookup_elem(&kbp_node, &zero);

	return word ? *(volatile __u64 *)word : 0;
}

/*
 * Whether the socket is in the node's own network namespace, where its
 * loopback is the node's; node is node_word().
 */
static __always_inline int in_node_netns(struct bpf_sock_addr *ctx, __u64 node)
{
	__u64 cookie = node & NODE_COOKIE_MASK;

	return cookie != 0 && cookie == bpf_get_netns_cookie(ctx);
}

/*
 * Whether the socket layer serves the socket: every socket, or with
 * NODE_F_HOST_NETNS_ONLY those in the node's network namespace only.
 */
static __always_inline int socket_lb_applies(struct bpf_sock_addr *ctx, __u64 node)
{
	return !(node & NODE_F_HOST_NETNS_ONLY) || in_node_netns(ctx, node);
}

/*
 * Seconds of CLOCK_MONOTONIC: affinity timeouts are whole seconds, which a
 * 32-bit count holds for 136 years. The coarse clock, as of the last tick,
 * costs no clock read (Linux 5.11); older kernels read the clock itself.
 */
static __always_inline __u32 now_seconds(void)
{
	__u64 ns;

	if (kbp_have_ktime_coarse)
		ns = bpf_ktime_get_coarse_ns();
	else
		ns = bpf_ktime_get_ns();
	return (__u32)(ns / 1000000000ULL);
}

/*
 * The maps keyed by service id or backend id, one set per family: a
 * family's reconciler hands out its own ids (see "IPv6" above). The
 * functions below that take them are inlined into each program with the
 * family's maps, so each program references its own family's maps only.
 */
#define KBP4_ID_MAPS &kbp_slots, &kbp_svc_stats, &kbp_affinity, &kbp_aff_match
#define KBP6_ID_MAPS &kbp6_slots, &kbp6_svc_stats, &kbp6_affinity, &kbp6_aff_match

static __always_inline void remember_affinity(void *affinity_map, const struct affinity_key *key,
					      __u32 backend_id, __u32 now)
{
	struct affinity_value value = {
		.backend_id = backend_id,
		.last_used = now,
	};

	/* Failing leaves the client without affinity for this connect only. */
	bpf_map_update_elem(affinity_map, key, &value, BPF_ANY);
}

/*
 * The backend the client of key used last, copied into *backend_id, if it
 * is still a backend of the service id (its match entry exists) and was
 * used within the service's timeout: kube-proxy's `recent --rcheck
 * --seconds T --reap`, to the second. The entry's time is refreshed, as
 * kube-proxy's `recent --set` does at each new connection; within one
 * second it is not rewritten. 0 if there is none to use.
 *
 * The affinity entry is copied in one load (an LRU element may be
 * recycled under us), and so is the timeout: a match entry is overwritten
 * only when the timeout changes, and a read that races it uses the old or
 * the new timeout, or misses and picks afresh. The backend id stays
 * valid: the reconciler deletes a backend only a grace period after the
 * last match entry naming it went.
 */
static __always_inline int affinity_backend(void *affinity_map, void *match_map,
					    const struct affinity_key *key, __u32 now,
					    __u32 *backend_id)
{
	union affinity_word found;
	struct match_key match = {};
	__u32 *entry;
	__u32 timeout;
	__u64 *word = bpf_map_lookup_elem(affinity_map, key);

	if (!word)
		return 0;
	found.word = *(volatile __u64 *)word;
	match.svc_id = key->svc_id;
	match.backend_id = found.value.backend_id;
	entry = bpf_map_lookup_elem(match_map, &match);
	if (!entry)
		return 0;
	timeout = *(volatile __u32 *)entry;
	if (now - found.value.last_used > timeout)
		return 0;
	*backend_id = found.value.backend_id;
	if (found.value.last_used != now)
		remember_affinity(affinity_map, key, found.value.backend_id, now);
	count_event(STAT_AFFINITY_HIT);
	return 1;
}

/*
 * The backend id a socket headed for the frontend whose entry is svc goes
 * to, copied into *backend_id; 0 leaves the call alone. *verdict is the
 * program's return value: 0 when the call is refused. Everything here is
 * the same in both families but the maps.
 */
static __always_inline int pick_backend_id(struct bpf_sock_addr *ctx, __u8 proto, __u64 svc_word,
					   __u32 *backend_id, int *verdict, void *slots_map,
					   void *stats_map, void *affinity_map, void *match_map)
{
	union svc_word svc = {.word = svc_word};
	struct slot_key slot = {};
	struct affinity_key affinity = {};
	enum stat_index reason;
	__u32 svc_id, flags, now = 0;
	__u64 node = node_word();

	if (!socket_lb_applies(ctx, node))
		return 0; /* a pod's socket: the packet layer serves it */
	svc_id = svc.value.id & SVC_ID_MASK;
	flags = svc.value.id & ~SVC_ID_MASK;
	if ((flags & SVC_F_NODE_NETNS_ONLY) && !in_node_netns(ctx, node))
		return 0; /* a pod's own loopback */
	if (svc.value.count == 0) {
		/*
		 * internalTrafficPolicy Local with endpoints on other nodes
		 * only: kube-proxy drops the packet, and the client retries
		 * until it times out. A socket can be told at once, and is;
		 * the reason is counted apart, since the Service does have
		 * endpoints.
		 */
		reason = STAT_REFUSED_NO_BACKEND;
		if (flags & SVC_F_NO_LOCAL_ENDPOINT)
			reason = STAT_REFUSED_NO_LOCAL_ENDPOINT;
		*verdict = refuse(reason, stats_map, svc_id);
		return 0;
	}
	if (flags & SVC_F_AFFINITY) {
		affinity.netns_cookie = bpf_get_netns_cookie(ctx);
		affinity.svc_id = svc_id;
		now = now_seconds();
	}
	if (!(flags & SVC_F_AFFINITY) ||
	    !affinity_backend(affinity_map, match_map, &affinity, now, backend_id)) {
		slot.svc_id = svc_id;
		slot.slot = pick_slot(ctx, proto, svc.value.count);
		if (!read_value32(slots_map, &slot, backend_id)) {
			*verdict = refuse(STAT_REFUSED_MISSING_SLOT, stats_map, svc_id);
			return 0;
		}
		if (flags & SVC_F_AFFINITY)
			remember_affinity(affinity_map, &affinity, *backend_id, now);
	}
	return 1;
}

/*
 * Counts a translation to the frontend whose id word is id: as
 * translated_event, by the kind of its frontend, and on the service as a
 * connection or, for sendmsg, a datagram.
 */
static __always_inline void count_translated(__u32 id, void *stats_map,
					     enum stat_index translated_event)
{
	struct svc_stats *stats;

	count_event(translated_event);
	if (id & SVC_F_NODEPORT)
		count_event(STAT_NODEPORT_TRANSLATED);
	else if (id & SVC_F_EXTERNAL)
		count_event(STAT_EXTERNAL_TRANSLATED);
	stats = svc_stats_of(stats_map, id & SVC_ID_MASK);
	if (stats) {
		if (translated_event == STAT_SENDMSG_TRANSLATED)
			stats->datagrams += 1;
		else
			stats->connections += 1;
	}
}

/*
 * The backend a socket headed for IPv4 frontend addr (and the port and
 * protocol in ctx) goes to instead, copied into *backend and remembered for
 * the reverse translation; 0 leaves the call alone. *verdict is the
 * program's return value: 0 when the call is refused. The caller
 * rewrites the address, because only it may touch the address field of its
 * family.
 */
static __always_inline int choose_backend(struct bpf_sock_addr *ctx, __be32 addr,
					  struct backend_value *backend, int *verdict,
					  enum stat_index translated_event)
{
	struct svc_key frontend = {};
	union svc_word svc;
	union backend_word found;
	enum stat_index reason;
	__u64 *word;
	__u32 backend_id;
	__u8 proto = ctx->protocol;

	*verdict = 1;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	frontend.addr = addr;
	frontend.port = (__be16)ctx->user_port;
	frontend.proto = proto;
	/*
	 * The node's word is read only where it decides: a connect to no
	 * Service that is not refused, the most common, pays nothing for it.
	 */
	if (!read_value64(&kbp_services, &frontend, &svc.word)) {
		reason = refusal_of(addr);
		if (reason != STAT_MAX && socket_lb_applies(ctx, node_word()))
			*verdict = refuse(reason, &kbp_svc_stats, 0);
		return 0; /* not a Service: leave the call alone */
	}
	if (!pick_backend_id(ctx, proto, svc.word, &backend_id, verdict, KBP4_ID_MAPS))
		return 0;
	/*
	 * Backends are written once and deleted a grace period after the
	 * last slot or match entry naming them went: one lookup, keyed by
	 * our own copy.
	 */
	word = bpf_map_lookup_elem(&kbp_backends, &backend_id);
	if (!word) {
		*verdict = refuse(STAT_REFUSED_MISSING_BACKEND, &kbp_svc_stats,
				  svc.value.id & SVC_ID_MASK);
		return 0;
	}
	found.word = *(volatile __u64 *)word;
	*backend = found.value;
	remember_frontend(ctx, backend, &frontend);
	count_translated(svc.value.id, &kbp_svc_stats, translated_event);
	return 1;
}

/*
 * Counts a reverse translation on the service now serving frontend. The
 * reverse entry names the frontend, not the service id, so this costs one
 * more lookup, only for translated sockets; a frontend no longer a Service
 * is counted globally only. The id is read in one load: a frontend keeps
 * its id while it exists (only the count in its entry changes), and the
 * rare lookup that races an overwrite of the entry (see read_value64) at
 * worst leaves one reverse translation uncounted per service.
 */
static __always_inline void count_reverse(void *services_map, void *stats_map, const void *key)
{
	struct svc_value *svc = bpf_map_lookup_elem(services_map, key);
	struct svc_stats *stats;

	if (!svc)
		return;
	stats = svc_stats_of(stats_map, *(volatile __u32 *)&svc->id & SVC_ID_MASK);
	if (stats)
		stats->reverse += 1;
}

/*
 * The frontend a socket asked for, given the IPv4 backend address (and the
 * port in ctx) it was rewritten to, copied into *frontend; 0 if it was not
 * rewritten. A pair's backend is read before and after its frontend, and
 * the pair used only if both reads agree (see remember_frontend).
 */
static __always_inline int frontend_of(struct bpf_sock_addr *ctx, __be32 addr,
				       struct revnat_value *frontend)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	union revnat_word want = {}, found;
	struct sock_revnat *entry;
	__u32 i;

	if (addr == 0)
		return 0;
	entry = bpf_map_lookup_elem(&kbp_revnat, &cookie);
	if (!entry)
		return 0;
	want.value.addr = addr;
	want.value.port = (__be16)ctx->user_port;
#pragma unroll
	for (i = 0; i < REVNAT_PAIRS; i++) {
		__u64 *b = (__u64 *)&entry->pairs[i].backend;

		kbp_keep_pointer(b);
		if (*(volatile __u64 *)b != want.word)
			continue;
		found.word = *(volatile __u64 *)&entry->pairs[i].frontend;
		if (*(volatile __u64 *)b != want.word)
			continue;
		*frontend = found.value;
		count_event(STAT_REVNAT_TRANSLATED);
		{
			struct svc_key key = {
				.addr = frontend->addr,
				.port = frontend->port,
				.proto = (__u8)ctx->protocol,
			};

			count_reverse(&kbp_services, &kbp_svc_stats, &key);
		}
		return 1;
	}
	return 0;
}

static __always_inline int translate4(struct bpf_sock_addr *ctx, enum stat_index translated_event)
{
	int verdict;
	struct backend_value backend;

	if (choose_backend(ctx, ctx->user_ip4, &backend, &verdict, translated_event)) {
		ctx->user_ip4 = backend.addr;
		ctx->user_port = (__u32)backend.port;
	}
	return verdict;
}

/* Shows the application the frontend it asked for instead of the backend. */
static __always_inline int reverse_translate4(struct bpf_sock_addr *ctx)
{
	struct revnat_value frontend;

	if (frontend_of(ctx, ctx->user_ip4, &frontend)) {
		ctx->user_ip4 = frontend.addr;
		ctx->user_port = (__u32)frontend.port;
	}
	return 1;
}

/*
 * An IPv4 address as an AF_INET6 socket carries it, ::ffff:a.b.c.d
 * (RFC 4291 2.5.5.2). Everything else is real IPv6 and left alone.
 */
static __always_inline int is_v4_mapped(__u32 w0, __u32 w1, __u32 w2)
{
	return w0 == 0 && w1 == 0 && w2 == kbp_htonl(0x0000ffff);
}

static __always_inline int user_ip6_is_v4_mapped(struct bpf_sock_addr *ctx)
{
	return is_v4_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2]);
}

/*
 * A v4-mapped destination goes through the IPv4 maps (an IPv6 client of
 * an IPv4 Service); the backend stays v4-mapped: only the IPv4 part of the
 * address changes.
 */
static __always_inline int translate_v4_mapped(struct bpf_sock_addr *ctx,
					       enum stat_index translated_event)
{
	int verdict;
	struct backend_value backend;

	if (choose_backend(ctx, ctx->user_ip6[3], &backend, &verdict, translated_event)) {
		ctx->user_ip6[3] = backend.addr;
		ctx->user_port = (__u32)backend.port;
	}
	return verdict;
}

static __always_inline int reverse_translate_v4_mapped(struct bpf_sock_addr *ctx)
{
	struct revnat_value frontend;

	if (frontend_of(ctx, ctx->user_ip6[3], &frontend)) {
		ctx->user_ip6[3] = frontend.addr;
		ctx->user_port = (__u32)frontend.port;
	}
	return 1;
}

/*
 * The mask of word w (0..3, in host order) of a /bits IPv6 prefix.
 */
static __always_inline __u32 prefix_mask6(__u8 bits, int w)
{
	int left = (int)bits - 32 * w;

	if (left <= 0)
		return 0;
	if (left >= 32)
		return ~0U;
	return ~0U << (32 - left);
}

/*
 * refusal_of for an IPv6 address, over kbp6_svc_ranges and
 * kbp6_clusterips. An entry is 20 bytes, copied word by word: a read
 * racing the reconciler's in-place rewrite of an entry (a ServiceCIDR
 * added or removed) may mix two ranges, and decide that one connect by a
 * range that never was; as with IPv4, it is a connect let through or
 * refused while the ranges change.
 */
static __always_inline enum stat_index refusal_of6(const struct in6_words *addr)
{
	__u32 *kind;
	__u32 i;

#pragma unroll
	for (i = 0; i < MAX_SVC_RANGES; i++) {
		__u32 index = i;
		struct svc_range6 *entry = bpf_map_lookup_elem(&kbp6_svc_ranges, &index);
		struct svc_range6 r;
		int w, match = 1;

		if (!entry)
			break;
		r = *entry;
		if (r.kind == RANGE_END)
			break;
#pragma unroll
		for (w = 0; w < 4; w++) {
			__u32 mask = prefix_mask6(r.bits, w);

			if ((kbp_htonl(addr->addr[w]) & mask) != (kbp_htonl(r.net[w]) & mask))
				match = 0;
		}
		if (!match)
			continue;
		kind = bpf_map_lookup_elem(&kbp6_clusterips, addr);
		if (kind)
			return *(volatile __u32 *)kind == CLUSTER_IP_FOREIGN ? STAT_MAX : STAT_REFUSED_UNKNOWN_PORT;
		if (r.kind == RANGE_SERVICE_CIDR)
			return STAT_REFUSED_UNALLOCATED;
		return STAT_MAX;
	}
	return STAT_MAX;
}

/* Reads v with one load per word, in order (see frontend6_of). */
static __always_inline void read_revnat6(const struct revnat6_value *v, struct revnat6_value *out)
{
	out->addr[0] = *(volatile __be32 *)&v->addr[0];
	out->addr[1] = *(volatile __be32 *)&v->addr[1];
	out->addr[2] = *(volatile __be32 *)&v->addr[2];
	out->addr[3] = *(volatile __be32 *)&v->addr[3];
	out->port = *(volatile __be16 *)&v->port;
	out->pad = 0;
}

static __always_inline void write_revnat6(struct revnat6_value *v, const struct revnat6_value *in)
{
	*(volatile __be32 *)&v->addr[0] = in->addr[0];
	*(volatile __be32 *)&v->addr[1] = in->addr[1];
	*(volatile __be32 *)&v->addr[2] = in->addr[2];
	*(volatile __be32 *)&v->addr[3] = in->addr[3];
	*(volatile __be16 *)&v->port = in->port;
}

static __always_inline int revnat6_equal(const struct revnat6_value *a, const struct revnat6_value *b)
{
	return a->addr[0] == b->addr[0] && a->addr[1] == b->addr[1] &&
	       a->addr[2] == b->addr[2] && a->addr[3] == b->addr[3] && a->port == b->port;
}

/*
 * remember_frontend for an IPv6 socket sent to an IPv6 backend: the same
 * entry per socket cookie, created once and written in place, in
 * kbp6_revnat. A pair being replaced has seq 0 while it is written, and
 * the entry's next seq after; a reader uses a pair only if it read the
 * same nonzero seq before and after it.
 */
static __always_inline void remember_frontend6(struct bpf_sock_addr *ctx,
					       const struct revnat6_value *be,
					       const struct revnat6_value *fe)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sock_revnat6 *entry;
	__u32 i, seq;
	long err;

	entry = bpf_map_lookup_elem(&kbp6_revnat, &cookie);
	if (!entry) {
		struct sock_revnat6 fresh = {};

		fresh.pairs[0].seq = 1;
		fresh.pairs[0].backend = *be;
		fresh.pairs[0].frontend = *fe;
		fresh.next = 1;
		fresh.seq = 1;
		err = bpf_map_update_elem(&kbp6_revnat, &cookie, &fresh, BPF_NOEXIST);
		if (err == 0)
			return;
		if (err == -EEXIST)
			entry = bpf_map_lookup_elem(&kbp6_revnat, &cookie);
		if (!entry) {
			count_event(STAT_REVNAT_UPDATE_FAILED);
			return;
		}
	}
	seq = *(volatile __u32 *)&entry->seq + 1;
	if (seq == 0)
		seq = 1;
	/* A UDP socket calls sendmsg per datagram: write only on change. */
#pragma unroll
	for (i = 0; i < REVNAT_PAIRS; i++) {
		struct revnat6_pair *p = &entry->pairs[i];
		struct revnat6_value b, f;

		kbp_keep_pointer(p);
		if (*(volatile __u64 *)&p->seq == 0)
			continue;
		read_revnat6(&p->backend, &b);
		if (!revnat6_equal(&b, be))
			continue;
		read_revnat6(&p->frontend, &f);
		if (revnat6_equal(&f, fe))
			return;
		*(volatile __u32 *)&entry->seq = seq;
		*(volatile __u64 *)&p->seq = 0;
		write_revnat6(&p->frontend, fe);
		*(volatile __u64 *)&p->seq = seq;
		return;
	}
	/* Two threads racing here may pick one pair: one backend is lost. */
	i = *(volatile __u32 *)&entry->next & (REVNAT_PAIRS - 1);
	*(volatile __u32 *)&entry->next = i + 1;
	*(volatile __u32 *)&entry->seq = seq;
	{
		struct revnat6_pair *p = &entry->pairs[i];

		kbp_keep_pointer(p);
		*(volatile __u64 *)&p->seq = 0;
		write_revnat6(&p->backend, be);
		write_revnat6(&p->frontend, fe);
		*(volatile __u64 *)&p->seq = seq;
	}
}

/* The IPv6 destination in ctx, for the *6 programs. */
static __always_inline void user_ip6_of(struct bpf_sock_addr *ctx, __be32 *addr)
{
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
}

/*
 * choose_backend for a real IPv6 destination, over the kbp6_* maps; the
 * caller rewrites ctx to *backend.
 */
static __always_inline int choose_backend6(struct bpf_sock_addr *ctx, struct revnat6_value *backend,
					   int *verdict, enum stat_index translated_event)
{
	struct svc6_key frontend = {};
	struct revnat6_value fe = {};
	union svc_word svc;
	struct backend6_value *found;
	enum stat_index reason;
	__u32 backend_id;
	__u8 proto = ctx->protocol;

	*verdict = 1;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	user_ip6_of(ctx, frontend.addr);
	frontend.port = (__be16)ctx->user_port;
	frontend.proto = proto;
	if (!read_value64(&kbp6_services, &frontend, &svc.word)) {
		reason = refusal_of6((const struct in6_words *)frontend.addr);
		if (reason != STAT_MAX && socket_lb_applies(ctx, node_word()))
			*verdict = refuse(reason, &kbp6_svc_stats, 0);
		return 0;
	}
	if (!pick_backend_id(ctx, proto, svc.word, &backend_id, verdict, KBP6_ID_MAPS))
		return 0;
	/*
	 * Written once and deleted a grace period after the last slot or
	 * match entry naming it went (as kbp_backends): the entry does not
	 * change under us, and is copied at once.
	 */
	found = bpf_map_lookup_elem(&kbp6_backends, &backend_id);
	if (!found) {
		*verdict = refuse(STAT_REFUSED_MISSING_BACKEND, &kbp6_svc_stats,
				  svc.value.id & SVC_ID_MASK);
		return 0;
	}
	backend->addr[0] = found->addr[0];
	backend->addr[1] = found->addr[1];
	backend->addr[2] = found->addr[2];
	backend->addr[3] = found->addr[3];
	backend->port = found->port;
	backend->pad = 0;
	__builtin_memcpy(fe.addr, frontend.addr, sizeof(fe.addr));
	fe.port = frontend.port;
	remember_frontend6(ctx, backend, &fe);
	count_translated(svc.value.id, &kbp6_svc_stats, translated_event);
	return 1;
}

/*
 * frontend_of for a socket whose peer (in ctx) is a real IPv6 address.
 * A pair's seq is read before and after the pair, and the pair used only
 * if both reads agree and are not 0 (see remember_frontend6).
 */
static __always_inline int frontend6_of(struct bpf_sock_addr *ctx, struct revnat6_value *frontend)
{
	__u64 cookie;
	struct revnat6_value want = {};
	struct sock_revnat6 *entry;
	__u32 i;

	user_ip6_of(ctx, want.addr);
	if ((want.addr[0] | want.addr[1] | want.addr[2] | want.addr[3]) == 0)
		return 0;
	want.port = (__be16)ctx->user_port;
	cookie = bpf_get_socket_cookie(ctx);
	entry = bpf_map_lookup_elem(&kbp6_revnat, &cookie);
	if (!entry)
		return 0;
#pragma unroll
	for (i = 0; i < REVNAT_PAIRS; i++) {
		struct revnat6_pair *p = &entry->pairs[i];
		struct revnat6_value b;
		__u64 seq;

		kbp_keep_pointer(p);
		seq = *(volatile __u64 *)&p->seq;
		if (seq == 0)
			continue;
		read_revnat6(&p->backend, &b);
		if (!revnat6_equal(&b, &want))
			continue;
		read_revnat6(&p->frontend, frontend);
		if (*(volatile __u64 *)&p->seq != seq)
			continue;
		count_event(STAT_REVNAT_TRANSLATED);
		{
			struct svc6_key key = {
				.port = frontend->port,
				.proto = (__u8)ctx->protocol,
			};

			__builtin_memcpy(key.addr, frontend->addr, sizeof(key.addr));
			count_reverse(&kbp6_services, &kbp6_svc_stats, &key);
		}
		return 1;
	}
	return 0;
}

static __always_inline int translate6(struct bpf_sock_addr *ctx, enum stat_index translated_event)
{
	int verdict;
	struct revnat6_value backend;

	if (choose_backend6(ctx, &backend, &verdict, translated_event)) {
		ctx->user_ip6[0] = backend.addr[0];
		ctx->user_ip6[1] = backend.addr[1];
		ctx->user_ip6[2] = backend.addr[2];
		ctx->user_ip6[3] = backend.addr[3];
		ctx->user_port = (__u32)backend.port;
	}
	return verdict;
}

static __always_inline int reverse_translate6(struct bpf_sock_addr *ctx)
{
	struct revnat6_value frontend;

	if (frontend6_of(ctx, &frontend)) {
		ctx->user_ip6[0] = frontend.addr[0];
		ctx->user_ip6[1] = frontend.addr[1];
		ctx->user_ip6[2] = frontend.addr[2];
		ctx->user_ip6[3] = frontend.addr[3];
		ctx->user_port = (__u32)frontend.port;
	}
	return 1;
}

SEC("cgroup/connect4")
int kbp_connect4(struct bpf_sock_addr *ctx)
{
	return translate4(ctx, STAT_CONNECT_TRANSLATED);
}

/* Runs only for sendmsg() with an address, that is unconnected UDP. */
SEC("cgroup/sendmsg4")
int kbp_sendmsg4(struct bpf_sock_addr *ctx)
{
	return translate4(ctx, STAT_SENDMSG_TRANSLATED);
}

SEC("cgroup/recvmsg4")
int kbp_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse_translate4(ctx);
}

SEC("cgroup/getpeername4")
int kbp_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse_translate4(ctx);
}

SEC("cgroup/connect6")
int kbp_connect6(struct bpf_sock_addr *ctx)
{
	if (user_ip6_is_v4_mapped(ctx))
		return translate_v4_mapped(ctx, STAT_CONNECT_TRANSLATED);
	return translate6(ctx, STAT_CONNECT_TRANSLATED);
}

/*
 * Unconnected UDP to a real IPv6 address (since Linux 4.18). A v4-mapped
 * destination never reaches it (sendmsg4 runs instead, see the top), and
 * is left alone should it ever.
 */
SEC("cgroup/sendmsg6")
int kbp_sendmsg6(struct bpf_sock_addr *ctx)
{
	if (user_ip6_is_v4_mapped(ctx))
		return 1;
	return translate6(ctx, STAT_SENDMSG_TRANSLATED);
}

SEC("cgroup/recvmsg6")
int kbp_recvmsg6(struct bpf_sock_addr *ctx)
{
	if (user_ip6_is_v4_mapped(ctx))
		return reverse_translate_v4_mapped(ctx);
	return reverse_translate6(ctx);
}

SEC("cgroup/getpeername6")
int kbp_getpeername6(struct bpf_sock_addr *ctx)
{
	if (user_ip6_is_v4_mapped(ctx))
		return reverse_translate_v4_mapped(ctx);
	return reverse_translate6(ctx);
}

/*
 * Every TCP and UDP socket's entry goes when the socket does, keyed by its
 * cookie alone: unconnected sockets, sockets the UDP cleanup destroyed
 * (udp_abort clears the peer before release) and sockets that reconnected
 * leave nothing behind. Other protocols are never translated. The hook
 * runs for AF_INET and AF_INET6 sockets (inet_release) since Linux 5.9;
 * bpf_get_socket_cookie is allowed in it since 5.7. An AF_INET6 socket may
 * have entries in both reverse maps (v4-mapped and IPv6 peers); an
 * AF_INET socket has none in kbp6_revnat, and costs no second delete.
 */
SEC("cgroup/sock_release")
int kbp_sock_release(struct bpf_sock *sk)
{
	__u32 proto = sk->protocol;
	__u64 cookie;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	cookie = bpf_get_socket_cookie(sk);
	bpf_map_delete_elem(&kbp_revnat, &cookie);
	if (sk->family == AF_INET6)
		bpf_map_delete_elem(&kbp6_revnat, &cookie);
	return 1;
}
