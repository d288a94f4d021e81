// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Conntrack-style XDP program, version 2. Against version 1 the key gains the ingress
// interface (first member), and the entry reorders `expires` to the front, widens
// `packets` (32 -> 64 bits) and `last_len` (16 -> 32), renumbers the enum, drops `legacy`
// and adds `zone` and `created`. Otherwise it behaves as version 1.

#include "xdp_ct.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* New flows get this zone; converted ones get it with --default zone=1. */
#define CT_ZONE 1

struct ct_key {
	__u32 ifindex;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

enum ct_state {
	CT_CLOSED = 4,
	CT_ESTABLISHED = 5,
	CT_NEW = 6,
};

struct ct_entry {
	__u64 expires CLOCK("monotonic_ns");
	__u64 packets;
	__u64 bytes;
	__u32 zone;
	enum ct_state state;
	__u32 last_len;
	__u64 created CLOCK("monotonic_ns");
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
} ct SEC(".maps");

SEC("xdp")
int xdp_ct(struct xdp_md *ctx)
{
	struct ct_key k = {};
	struct ct_entry *e;
	struct flow f;
	__u64 now;

	if (parse_flow(ctx, &f))
		return XDP_PASS;
	k.ifindex = ctx->ingress_ifindex;
	k.saddr = f.saddr;
	k.daddr = f.daddr;
	k.sport = f.sport;
	k.dport = f.dport;
	k.proto = IPPROTO_UDP;
	now = bpf_ktime_get_ns();
	e = bpf_map_lookup_elem(&ct, &k);
	if (!e) {
		struct ct_entry n = {
			.expires = now + CT_LIFETIME_NS,
			.packets = 1,
			.bytes = f.len,
			.zone = CT_ZONE,
			.state = CT_NEW,
			.last_len = f.len,
			.created = now,
		};
		bpf_map_update_elem(&ct, &k, &n, BPF_NOEXIST);
		return XDP_PASS;
	}
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, f.len);
	e->expires = now + CT_LIFETIME_NS;
	e->last_len = f.len;
	e->state = CT_ESTABLISHED;
	return XDP_PASS;
}
