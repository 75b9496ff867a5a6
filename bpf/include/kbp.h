/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The few kernel UAPI definitions and helper declarations kube-bpf-proxy's
 * programs need. Kept here, instead of including linux/bpf.h and libbpf's
 * headers, so that the objects build from this directory alone with any clang
 * that has a BPF target and the build does not depend on the host's kernel
 * headers. Everything below is stable UAPI: the layout of struct
 * bpf_sock_addr and the helper numbers never change once released.
 */
#ifndef KBP_H
#define KBP_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef __u16 __be16;
typedef __u32 __be32;

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define EEXIST 17
#define ECONNREFUSED 111

/* Byte order: the programs compare addresses, which are big-endian, with constants. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define kbp_htonl(x) __builtin_bswap32(x)
#else
#define kbp_htonl(x) (x)
#endif

/* Map types and flags (include/uapi/linux/bpf.h). */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_HASH 5
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_LRU_HASH 9
#define BPF_F_NO_PREALLOC (1U << 0)
#define BPF_ANY 0
#define BPF_NOEXIST 1

/* libbpf's pinning convention: the loader pins the map under its name. */
#define LIBBPF_PIN_BY_NAME 1

/*
 * The context of the cgroup/connect, sendmsg, recvmsg and getpeername hooks.
 * The kernel lets the *4 programs access user_ip4 only and the *6 programs
 * user_ip6 only (the verifier refuses the other).
 */
struct bpf_sock_addr {
	__u32 user_family;
	__u32 user_ip4;    /* network byte order */
	__u32 user_ip6[4];
	__u32 user_port;   /* network byte order, in the low 16 bits */
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 msg_src_ip4;
	__u32 msg_src_ip6[4];
	__u64 sk;
};

/* The context of cgroup/sock_release (fields up to those we read). */
struct bpf_sock {
	__u32 bound_dev_if;
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 mark;
	__u32 priority;
	__u32 src_ip4;
	__u32 src_ip6[4];
	__u32 src_port;   /* host byte order */
	__be16 dst_port;  /* network byte order; 16 bits wide since Linux 5.17 */
	__u16 pad_dst_port;
	__u32 dst_ip4;    /* network byte order */
	__u32 dst_ip6[4]; /* network byte order */
};

/* BTF-style map definitions, as understood by libbpf and cilium/ebpf. */
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

#define SEC(name) __attribute__((section(name), used))
#define __always_inline inline __attribute__((always_inline))

/* Helpers, by their fixed numbers in enum bpf_func_id. */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
				   __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
/* Since Linux 4.1. */
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static __u32 (*bpf_get_prandom_u32)(void) = (void *)7;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)46;
/* Since Linux 5.7 for these programs; NULL would be the initial namespace's. */
static __u64 (*bpf_get_netns_cookie)(void *ctx) = (void *)122;
/*
 * Since Linux 5.11: CLOCK_MONOTONIC as of the last tick, without reading a
 * clock. Called only where kbp_have_ktime_coarse says the kernel has it.
 */
static __u64 (*bpf_ktime_get_coarse_ns)(void) = (void *)160;
/*
 * Since Linux 5.18: lets a cgroup program that denies a call choose the
 * errno. Called only where kbp_have_set_retval says the kernel has it.
 */
static int (*bpf_set_retval)(int retval) = (void *)187;

#endif /* KBP_H */
