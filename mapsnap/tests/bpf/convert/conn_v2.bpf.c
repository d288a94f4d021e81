// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Conversion test fixture, version 2 of the conntrack-style map of conn_v1.bpf.c:
// - packets widened to __u64, delta widened to __s32, mtu narrowed to __u16;
// - rx_port renamed local_port, legacy_flags removed, zone and created new;
// - members reordered, endpoint reordered with a new ifindex;
// - hist grows from 4 to 8 elements; enum conn_state renumbered, CS_OLD_ONLY gone;
// - bitfields reordered and retries widened; the key gains an ifindex.
//
//   clang -O2 -g -target bpf -I/usr/include/$(uname -m)-linux-gnu -c conn_v2.bpf.c

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define CLOCK(spec) __attribute__((btf_decl_tag("mapsnap:clock=" spec)))

typedef __u32 boot_s_t CLOCK("boottime_s");

enum conn_state {
	CS_NONE = 0,
	CS_ESTABLISHED = 1,
	CS_SYN = 2,
	CS_FIN = 3,
	CS_CLOSING = 4,
};

struct endpoint {
	__u16 port;
	__u32 addr;
	__u32 ifindex;
};

struct conn_key {
	__u32 ifindex;
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
	__u64 bytes;
	__u64 packets;
	enum conn_state state;
	__u16 local_port;
	__u8 retries : 6, seen_reply : 1, dir : 1;
	__u32 hist[8];
	struct endpoint peer;
	__u64 expires CLOCK("monotonic_ns");
	boot_s_t last_seen;
	__u32 zone;
	__u64 created;
	__s32 delta;
	__u16 mtu;
	union conn_label label;
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
	__u64 hits;
	struct bpf_spin_lock lock;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct locked_s);
} locks SEC(".maps");

SEC("xdp")
int count(struct xdp_md *ctx)
{
	struct conn_key key = { .ifindex = ctx->ingress_ifindex };
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
