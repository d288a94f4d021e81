// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Conversion test fixture, version 1 of a conntrack-style map: the entry layout that
// conn_v2.bpf.c changes (widened counter, renamed, new, removed and reordered members,
// nested struct, longer array, renumbered enum, bitfields, decl-tagged timestamps).
// Only the BTF matters to the tests; the program keeps the object realistic.
//
//   clang -O2 -g -target bpf -I/usr/include/$(uname -m)-linux-gnu -c conn_v1.bpf.c

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define CLOCK(spec) __attribute__((btf_decl_tag("mapsnap:clock=" spec)))

/* A timestamp type: every member of this type is a CLOCK_BOOTTIME second count. */
typedef __u32 boot_s_t CLOCK("boottime_s");

enum conn_state {
	CS_NONE = 0,
	CS_SYN = 1,
	CS_ESTABLISHED = 2,
	CS_FIN = 3,
	CS_OLD_ONLY = 4,
};

struct endpoint {
	__u32 addr;
	__u16 port;
};

struct conn_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

union conn_label {
	__u32 id;
	__u8 bytes[4];
};

struct conn {
	__u32 packets;
	__u64 bytes;
	__u64 expires CLOCK("monotonic_ns");
	boot_s_t last_seen;
	__u16 rx_port;
	__u32 legacy_flags;
	enum conn_state state;
	struct endpoint peer;
	__u32 hist[4];
	__u8 dir : 1, seen_reply : 1, retries : 4;
	__s16 delta;
	__u32 mtu;
	union conn_label label;
};

/* Pairs for refusal tests (conn_bad.bpf.c has the incompatible versions). */
struct arr_s {
	__u32 hist[4];
};

struct un_s {
	union conn_label label;
};

struct kind_s {
	__u64 x;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct conn_key);
	__type(value, struct conn);
} conns SEC(".maps");

/*
 * Kernel-managed fields live in their own value type: the kernel refuses BTF in which a
 * struct holding a bpf_spin_lock (or bpf_timer, ...) contains bitfields, even nested.
 */
struct locked_s {
	struct bpf_spin_lock lock;
	__u32 hits;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct locked_s);
} locks SEC(".maps");

struct arr_s g_arr;
struct un_s g_un;
struct kind_s g_kind;

SEC("xdp")
int count(struct xdp_md *ctx)
{
	struct conn_key key = {};
	struct conn *c = bpf_map_lookup_elem(&conns, &key);

	if (c) {
		__sync_fetch_and_add(&c->packets, 1);
		__sync_fetch_and_add(&c->bytes, ctx->data_end - ctx->data);
		c->expires = bpf_ktime_get_ns() + 30000000000ULL;
	}
	__u32 zero = 0;
	struct locked_s *l = bpf_map_lookup_elem(&locks, &zero);

	if (l) {
		bpf_spin_lock(&l->lock);
		l->hits++;
		bpf_spin_unlock(&l->lock);
	}
	return XDP_PASS;
}
